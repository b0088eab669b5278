"""The sites of a scenario: a generated hospital (:class:`SyntheticSiteSpec`,
with its scanner :class:`ShiftSpec`), a real-anatomy one
(:class:`AnatomySiteSpec`) or a directory of the user's own data
(:class:`PathSiteSpec`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from medseg_core.config.base import Attack, LabelRegime, _Strict

__all__ = ["AnatomySiteSpec", "PathSiteSpec", "ShiftSpec", "SiteSpec", "SyntheticSiteSpec"]


class ShiftSpec(_Strict):
    """A synthetic site's scanner / protocol shift."""

    intensity_scale: float = Field(default=1.0, gt=0.0)
    intensity_offset: float = 0.0
    gamma: float = Field(default=1.0, gt=0.0)
    bias_field: float = Field(default=0.0, ge=0.0, le=1.0)
    noise_std: float = Field(default=0.02, ge=0.0)
    blur_sigma: float = Field(default=0.0, ge=0.0)
    downsample: float = Field(default=1.0, ge=1.0, le=4.0)


class SyntheticSiteSpec(_Strict):
    """A generated hospital: phantoms with lesions under a scanner shift."""

    id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    kind: Literal["synthetic"] = "synthetic"
    n_train: int = Field(default=40, ge=2)
    n_test: int = Field(default=10, ge=1)
    dims: Literal[2, 3] = 2
    depth: int = Field(default=8, ge=1)
    lesion_prevalence: float = Field(default=0.7, ge=0.0, le=1.0)
    label_regime: LabelRegime = LabelRegime.MASK
    bag_size: int = Field(default=4, ge=2)
    unlabeled_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)  # training cases without labels
    class_noise: float = Field(default=0.0, ge=0.0, le=0.5)  # image-level labels flipped
    shift: ShiftSpec = ShiftSpec()
    epsilon: float | None = Field(default=None, gt=0.0)
    attack: Attack = Attack.NONE
    drop_rounds: tuple[int, ...] = ()  # simulation only: the site is unreachable these rounds
    drop_seconds: float = Field(default=120.0, gt=0.0)  # ... stalling this long (> round timeout)


class AnatomySiteSpec(_Strict):
    """A real-anatomy site: MNI152 brain-mask segmentation from nilearn's
    offline templates (``pip install medseg-fl[anatomy]``)."""

    id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    kind: Literal["anatomy"]
    source: str
    n_train: int = Field(default=24, ge=1)
    n_test: int = Field(default=8, ge=1)
    label_regime: LabelRegime = LabelRegime.MASK
    epsilon: float | None = Field(default=None, gt=0.0)
    attack: Attack = Attack.NONE
    drop_rounds: tuple[int, ...] = ()  # simulation only: the site is unreachable these rounds
    drop_seconds: float = Field(default=120.0, gt=0.0)  # ... stalling this long (> round timeout)


class PathSiteSpec(_Strict):
    """A site given as a directory in the dataset.json format."""

    id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    path: Path
    label_regime: LabelRegime = LabelRegime.MASK
    epsilon: float | None = Field(default=None, gt=0.0)
    attack: Attack = Attack.NONE
    drop_rounds: tuple[int, ...] = ()  # simulation only: the site is unreachable these rounds
    drop_seconds: float = Field(default=120.0, gt=0.0)  # ... stalling this long (> round timeout)


SiteSpec = Annotated[
    SyntheticSiteSpec | AnatomySiteSpec | PathSiteSpec, Field(union_mode="left_to_right")
]
