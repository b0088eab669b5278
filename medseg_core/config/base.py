"""The configuration models' strict base, their enums and the choice message."""

from __future__ import annotations

import difflib
from enum import StrEnum
from typing import TypeVar

from pydantic import BaseModel, ConfigDict

__all__ = ["AdaptationMode", "Attack", "LabelRegime", "StrategyName"]

M = TypeVar("M", bound=BaseModel)


class _Strict(BaseModel):
    """Base: unknown keys are errors, objects are frozen after validation."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class LabelRegime(StrEnum):
    """What supervision a site (or case) carries."""

    MASK = "mask"  # voxel masks
    IMAGE = "image"  # image-level class only
    BAG = "bag"  # MIL bags with bag-level labels
    MIXED = "mixed"  # a site whose cases mix the above


class Attack(StrEnum):
    """Simulated misbehaviour of a site's replies (for robustness tests only)."""

    NONE = "none"
    NAN = "nan"  # every weight NaN
    SIGN_FLIP = "sign_flip"  # w_global - (w_local - w_global)
    SCALE = "scale"  # w_global + 10 * (w_local - w_global): a boosted honest update
    FLIP_SCALE = "flip_scale"  # w_global - 10 * (w_local - w_global): boosted and reversed


class AdaptationMode(StrEnum):
    """Which parameters each site keeps private (never aggregated, never sent)."""

    NONE = "none"
    NORM = "norm"  # FedBN/SiloBN: every norm layer's affine scale and shift
    ADAPTER = "adapter"  # a residual input adapter in front of the segmenter
    NORM_ADAPTER = "norm+adapter"


class StrategyName(StrEnum):
    """Server aggregation strategies (Flower's Message-API strategies)."""

    FEDAVG = "fedavg"
    FEDAVGM = "fedavgm"
    FEDPROX = "fedprox"
    FEDADAM = "fedadam"
    FEDMEDIAN = "fedmedian"
    FEDTRIMMEDAVG = "fedtrimmedavg"
    KRUM = "krum"


def _choice_message(value: object, choices: list[str]) -> str:
    close = difflib.get_close_matches(str(value), choices, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown option {value!r}; valid choices: {choices}{hint}"
