"""The scenario (what the federation runs) and the site (one hospital's private facts).

The scenario's sections are in :mod:`medseg_core.config.sections`; this
module holds what joins them: the cross-section rules, the ``without_dp``
block and the site file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from medseg_core.config.base import AdaptationMode, Attack, LabelRegime, _Strict
from medseg_core.config.sections import (
    DataConfig,
    EvalConfig,
    ModelConfig,
    PrivacyConfig,
    SimulationConfig,
    StrategyConfig,
    TrainConfig,
)
from medseg_core.config.site_specs import (
    AnatomySiteSpec,
    PathSiteSpec,
    SiteSpec,
    SyntheticSiteSpec,
)


# The top-level scenario keys a ``without_dp`` block may set.
WITHOUT_DP_KEYS = ("rounds", "model", "data", "train", "strategy", "evaluation", "simulation")


def _overlay(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into ``base``: mappings key by key, anything else replaced."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _overlay(out[key], value)
        else:
            out[key] = value
    return out


class ScenarioConfig(_Strict):
    """A whole federation: sites, model, training, privacy and strategy."""

    name: str = Field(default="default", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    seed: int = 0
    rounds: int = Field(default=5, ge=1)
    sites: tuple[SiteSpec, ...] = Field(min_length=1)
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    strategy: StrategyConfig = StrategyConfig()
    evaluation: EvalConfig = EvalConfig()
    simulation: SimulationConfig = SimulationConfig()
    # Settings for the same federation when it runs without DP (privacy.enabled
    # false, or `medseg simulate --dp off`): a partial scenario merged over this
    # one, mappings key by key. DP-SGD's clipping and noise change which
    # aggregation weights and schedules work (the committed scenarios' comments
    # give the measurements), so one scenario file carries both; the run applies
    # this block itself (for_privacy) and records the settings it ran with.
    without_dp: dict[str, Any] | None = None

    @field_validator("sites", mode="before")
    @classmethod
    def _site_kind(cls, value: Any) -> Any:
        # Pick the union member explicitly so errors name the right fields.
        if not isinstance(value, list | tuple):
            return value
        out: list[Any] = []
        for entry in value:
            if isinstance(entry, dict) and "path" in entry:
                out.append(PathSiteSpec.model_validate(entry))
            elif isinstance(entry, dict) and entry.get("kind") == "anatomy":
                out.append(AnatomySiteSpec.model_validate(entry))
            elif isinstance(entry, dict):
                out.append(SyntheticSiteSpec.model_validate(entry))
            else:
                out.append(entry)
        return out

    @model_validator(mode="after")
    def _unique_ids(self) -> ScenarioConfig:
        ids = [s.id for s in self.sites]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"site ids must be unique; duplicated: {dup}")
        return self

    @model_validator(mode="after")
    def _site_threshold_is_binary(self) -> ScenarioConfig:
        if self.evaluation.threshold == "site" and self.data.num_classes != 2:
            raise ValueError(
                f"evaluation.threshold is 'site' but data.num_classes is {self.data.num_classes}: "
                "a site's calibrated threshold is on one foreground class's probability. Fix: "
                "evaluation.threshold: argmax, or a binary task (num_classes: 2)"
            )
        return self

    @model_validator(mode="after")
    def _site_mil_head_needs_a_mil_head(self) -> ScenarioConfig:
        mode = self.evaluation.mil_head
        if mode != "federated" and self.model.mil_pooling == "none":
            raise ValueError(
                f"evaluation.mil_head is {mode!r} but model.mil_pooling is 'none': the model has "
                "no MIL head to refit. Fix: model.mil_pooling: attention (or max), or "
                "evaluation.mil_head: federated"
            )
        return self

    @model_validator(mode="after")
    def _frozen_part_needs_a_mask_site(self) -> ScenarioConfig:
        part = self.train.weak.weak_sites_freeze
        weak = {LabelRegime.IMAGE, LabelRegime.BAG}
        if part != "none" and all(s.label_regime in weak for s in self.sites):
            raise ValueError(
                f"train.weak.weak_sites_freeze is {part!r} but every site's label_regime is image "
                f"or bag: no site would ever train the {part}. Fix: add a site with masks "
                "(label_regime mask or mixed), or set weak_sites_freeze: none"
            )
        start = self.train.weak.weak_sites_freeze_from_round
        if part != "none" and start > self.rounds:
            raise ValueError(
                f"train.weak.weak_sites_freeze_from_round is {start} but the run has "
                f"{self.rounds} round(s): the {part} would never be frozen. Fix: a round from 1 "
                f"to {self.rounds}, or weak_sites_freeze: none"
            )
        return self

    @model_validator(mode="after")
    def _private_epochs_need_private_layers_and_no_dp(self) -> ScenarioConfig:
        n = self.train.private_epochs
        if n and self.model.adaptation == AdaptationMode.NONE:
            raise ValueError(
                f"train.private_epochs is {n} but model.adaptation is 'none': there are no "
                "private layers to train alone. Fix: set model.adaptation (e.g. adapter), or "
                "train.private_epochs: 0")
        if n and self.privacy.enabled:
            raise ValueError(
                f"train.private_epochs is {n} with privacy.enabled: the DP plan budgets "
                "train.local_epochs per round, and the private-only epochs would spend more. "
                "Fix: train.private_epochs: 0, or set it in the scenario's without_dp block")
        return self

    @model_validator(mode="after")
    def _adaptation_warm_up_needs_private_layers(self) -> ScenarioConfig:
        start = self.train.adaptation_from_round
        if start == 1:
            return self
        if self.model.adaptation == AdaptationMode.NONE:
            raise ValueError(
                f"train.adaptation_from_round is {start} but model.adaptation is 'none': there "
                "are no private layers to start training. Fix: set model.adaptation (e.g. "
                "adapter), or leave adaptation_from_round out"
            )
        if start > self.rounds:
            raise ValueError(
                f"train.adaptation_from_round is {start} but the run has {self.rounds} round(s): "
                f"the private layers would never train. Fix: a round from 1 to {self.rounds}"
            )
        return self

    @model_validator(mode="after")
    def _without_dp_is_a_valid_override(self) -> ScenarioConfig:
        if self.without_dp is not None:
            self._merged_without_dp()  # raises ValueError naming the bad key
        return self

    def _merged_without_dp(self) -> ScenarioConfig:
        """This scenario with ``without_dp`` merged over it and DP off."""
        block = self.without_dp or {}
        bad = sorted(set(block) - set(WITHOUT_DP_KEYS))
        if bad:
            raise ValueError(
                f"without_dp sets {bad}: it may only set {list(WITHOUT_DP_KEYS)}. The sites, "
                "name and seed are the federation's own and privacy is what the block depends "
                f"on. Fix: move {bad} out of without_dp"
            )
        base = json.loads(self.model_dump_json(exclude={"without_dp", "sites"}))
        merged = _overlay(base, block)
        merged["privacy"]["enabled"] = False
        merged["sites"] = self.sites
        try:
            return type(self).model_validate(merged)
        except ValidationError as exc:
            problems = "; ".join(
                f"without_dp.{'.'.join(str(p) for p in e['loc'])}: {e['msg']} "
                f"(got {e.get('input')!r})" if e["loc"] else e["msg"].removeprefix("Value error, ")
                for e in exc.errors()
            )
            raise ValueError(
                f"the scenario with its without_dp settings applied is invalid: {problems}. "
                "Fix those keys in without_dp"
            ) from None

    def for_privacy(self, enabled: bool | None = None) -> ScenarioConfig:
        """The scenario a run executes: ``privacy.enabled`` set to ``enabled``
        (None: the scenario's own) and, when DP is off, the ``without_dp``
        settings merged in. The result has no ``without_dp`` block left, so
        writing it out records exactly what ran."""
        on = self.privacy.enabled if enabled is None else enabled
        run = self if on or self.without_dp is None else self._merged_without_dp()
        return run.model_copy(update={
            "privacy": run.privacy.model_copy(update={"enabled": on}), "without_dp": None,
        })

    @model_validator(mode="after")
    def _personalize_needs_private_layers(self) -> ScenarioConfig:
        p = self.train.personalize
        if p.epochs and p.layers == "private" and self.model.adaptation == AdaptationMode.NONE:
            raise ValueError(
                f"train.personalize.epochs is {p.epochs} with layers 'private' but "
                "model.adaptation is 'none': there are no site-private layers to personalise. "
                "Fix: set model.adaptation to 'norm', 'adapter' or 'norm+adapter', or "
                "train.personalize.layers: all (fine-tune every weight), or "
                "train.personalize.epochs: 0"
            )
        return self


class SiteConfig(_Strict):
    """One hospital's private configuration; never leaves the site.

    Parameters
    ----------
    id
        Site identifier reported to the server (not a patient identifier).
    data_dir
        Directory holding ``dataset.json`` and the images.
    state_dir
        Where the site keeps its own state across rounds and restarts
        (privacy accountant, local layers).
    epsilon, delta
        The site's privacy budget: training that would push the accountant's
        epsilon (at ``delta``) past ``epsilon`` is refused.
    """

    id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    data_dir: Path
    state_dir: Path
    label_regime: LabelRegime = LabelRegime.MASK
    epsilon: float = Field(default=8.0, gt=0.0)
    delta: float = Field(default=1e-5, gt=0.0, lt=1.0)
    dp_enabled: bool = True
    max_grad_norm: float = Field(default=1.0, gt=0.0)
    accountant: Literal["rdp", "prv", "gdp"] = "rdp"
    secure_mode: bool = False
    val_fraction: float = Field(default=0.2, ge=0.0, lt=1.0)
    # nnU-Net's default intensity augmentations (noise, blur, brightness, contrast,
    # low resolution, gamma; medseg_core/data/augment.py) on every training sample,
    # besides the random flips; against the scanner shift between sites
    intensity_augment: bool = False
    seed: int = 0
    torch_threads: int = Field(default=1, ge=1)
    # Simulation only: make this site's replies misbehave (robustness tests).
    attack: Attack = Attack.NONE
    # Simulation only: in these rounds the site does not answer in time (it
    # stalls for drop_seconds, past the server's round timeout), then rejoins.
    drop_rounds: tuple[int, ...] = ()
    drop_seconds: float = Field(default=120.0, gt=0.0)
