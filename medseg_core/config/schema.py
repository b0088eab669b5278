"""The scenario (what the federation runs) and the site (one hospital's private facts)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from medseg_core.config.base import (
    AdaptationMode,
    Attack,
    LabelRegime,
    StrategyName,
    _choice_message,
    _Strict,
)
from medseg_core.config.site_specs import (
    AnatomySiteSpec,
    PathSiteSpec,
    SiteSpec,
    SyntheticSiteSpec,
)
from medseg_core.config.weak import WeakConfig


class ModelConfig(_Strict):
    """Segmenter architecture (MONAI constructor vocabulary)."""

    name: str = "unet"
    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = (2, 2, 2)
    num_res_units: int = Field(default=1, ge=0)
    norm_groups: int = Field(default=8, ge=1)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    adaptation: AdaptationMode = AdaptationMode.NONE
    # coarse grid of the input adapter's case-conditional intensity field (0: none)
    adapter_field_grid: int = Field(default=8, ge=0, le=64)
    # width and 3x3 depth of the input adapter's residual block
    adapter_hidden: int = Field(default=8, ge=1, le=64)
    adapter_depth: int = Field(default=1, ge=1, le=8)
    weak_head: Literal["none", "cam"] = "none"  # CAM head for image-level labels
    mil_pooling: Literal["none", "attention", "max"] = "none"  # MIL bag head (implies the CAM head)

    @field_validator("name")
    @classmethod
    def _known_model(cls, value: str) -> str:
        from medseg_core.models.registry import MODEL_REGISTRY

        if value not in MODEL_REGISTRY:
            raise ValueError(_choice_message(value, sorted(MODEL_REGISTRY)))
        return value

    @model_validator(mode="after")
    def _check_shape(self) -> ModelConfig:
        if len(self.strides) != len(self.channels) - 1:
            raise ValueError(
                f"strides has {len(self.strides)} entries but channels has "
                f"{len(self.channels)}; expected len(strides) == len(channels) - 1"
            )
        bad = [c for c in self.channels if c % self.norm_groups]
        if bad:
            raise ValueError(
                f"channels {bad} are not divisible by norm_groups={self.norm_groups}; "
                "GroupNorm needs every channel count to be a multiple of norm_groups"
            )
        return self


class DataConfig(_Strict):
    """How site images become training tensors."""

    image_size: int = Field(default=64, ge=16, le=512)
    context_slices: int = Field(default=0, ge=0, le=3)
    num_classes: int = Field(default=2, ge=2)
    val_fraction: float = Field(default=0.2, ge=0.0, lt=1.0)
    # nnU-Net's default intensity augmentations (noise, blur, brightness, contrast,
    # low resolution, gamma; medseg_core/data/augment.py) on every training sample,
    # besides the random flips; against the scanner shift between sites
    intensity_augment: bool = False


class EvalConfig(_Strict):
    """How predictions are scored (the same for every arm of a comparison)."""

    # nnU-Net-style post-processing: predicted components smaller than this
    # many voxels are removed before scoring (0 = raw argmax).
    min_component_voxels: int = Field(default=0, ge=0)
    # Which global model is final: the last round's, or the round with the
    # best federated validation Dice (sites' own validation splits; the test
    # splits are never looked at). Baselines select the same way.
    select: Literal["last", "best_val"] = "last"
    # MIL sites: a bag (e.g. a volume) that the MIL head's bag-level prediction
    # calls negative (p < 0.5) is segmented as all background; other sites ignore it
    bag_gate: bool = False
    # MIL sites: which MIL head makes the bag-level prediction (mil_auc, and the
    # bag_gate): "federated" (the aggregated head) or a head fitted for the
    # scored model on the site's own training bags (medseg_core/weak/bag_scores.py
    # refit_mil_head; it stays at the site, like a site threshold), over the
    # encoder's bottleneck embeddings ("site") or over the segmenter's own
    # lesion map per instance ("site-decoder", decoder_instance_features). The
    # federated head is trained against a round's local encoder and scored on
    # the next average; in the mixed-regime scenario its bag AUC stayed near
    # chance (docs/results-log.md, "Stop 31", "Stop 32")
    mil_head: Literal["federated", "site", "site-decoder"] = "federated"
    # "pamr": every scored prediction's class probabilities are refined by the
    # image's own local affinities before the argmax (medseg_core/refine.py): a
    # post-processing step like min_component_voxels, applied to every arm
    refine: Literal["none", "pamr"] = "none"
    # "site": every site scores at its own foreground threshold, calibrated for
    # the model being scored on its own training cases' labels (image-level class,
    # bag label, or a mask with or without lesion): the threshold in 0.05-0.95 at
    # which "the case has a predicted lesion" best matches them (balanced
    # accuracy; medseg_core/calibration.py). Binary segmentation only.
    # "argmax": no calibration
    threshold: Literal["argmax", "site"] = "argmax"
    # with threshold "site": calibrate on at most this many training cases, a
    # seeded draw stratified by label, the same cases every round (None: all).
    # Calibration predicts every case it reads (PAMR-refined with refine: pamr)
    # whenever a site with masks on the scored split is evaluated: on
    # mixed_regime.yaml more than a round's DP training (docs/results-log.md, "Stop 26")
    calibration_cases: int | None = Field(default=None, ge=2)

    @model_validator(mode="after")
    def _calibration_needs_site_thresholds(self) -> EvalConfig:
        if self.calibration_cases is not None and self.threshold != "site":
            raise ValueError(
                f"evaluation.calibration_cases is {self.calibration_cases} but "
                f"evaluation.threshold is {self.threshold!r}: nothing is calibrated at the "
                "argmax. Fix: evaluation.threshold: site, or drop calibration_cases"
            )
        return self


class PrivacyConfig(_Strict):
    """Differential-privacy defaults; a site's own config may lower the cap."""

    enabled: bool = True
    epsilon: float = Field(default=8.0, gt=0.0)
    delta: float = Field(default=1e-5, gt=0.0, lt=1.0)
    max_grad_norm: float = Field(default=1.0, gt=0.0)
    accountant: Literal["rdp", "prv", "gdp"] = "rdp"
    secure_mode: bool = False


class PersonalizeConfig(_Strict):
    """Post-federation personalisation of each site's private adaptation layers.

    During the rounds a site's private layers (``model.adaptation``) are
    trained against its own drifting copy of the shared weights, then paired
    with the *aggregated* shared weights at evaluation: a mismatch. After the
    last round each site fine-tunes only its private layers against the
    selected global model on its own training data (shared weights frozen,
    Adam), keeps the epoch with the best local validation Dice (epoch 0, no
    change, included) and stores them; nothing is sent but metrics. Under DP
    the epochs are DP-SGD through the site's accountant and their budget is
    reserved from the first round (the rounds' noise is calibrated for the
    rounds plus these epochs), so the site's cap holds.
    """

    epochs: int = Field(default=0, ge=0)  # 0: off
    lr: float = Field(default=1e-3, gt=0.0)


class TrainConfig(_Strict):
    """Local optimisation settings sent with every round."""

    local_epochs: int = Field(default=1, ge=1)
    batch_size: int = Field(default=16, ge=1)
    # MIL sites: bags per step (a bag is one DP-SGD sample). None: about
    # batch_size / K, a step's slices matching the other sites'. 32 on
    # mixed_regime.yaml (~4 by default) was no better (docs/results-log.md, "Stop 25")
    bag_batch_size: int | None = Field(default=None, ge=1)
    lr: float = Field(default=1e-3, gt=0.0)
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = Field(default=0.0, ge=0.0, lt=1.0)  # SGD only
    weak: WeakConfig = WeakConfig()
    personalize: PersonalizeConfig = PersonalizeConfig()
    # the first round in which a site trains its private adaptation layers
    # (model.adaptation); before it they keep their initial values (the input
    # adapter is the identity) and only the shared weights train. Under DP an
    # adapter trained from round 1 takes its own un-averaged noise while the
    # shared model has learned nothing yet; on a late-learning seed that kept
    # every site at the empty prediction (docs/results-log.md, "Stop 28")
    adaptation_from_round: int = Field(default=1, ge=1)


class StrategyConfig(_Strict):
    """Server strategy and the checks applied to updates before aggregation."""

    name: StrategyName = StrategyName.FEDAVG
    fraction_train: float = Field(default=1.0, gt=0.0, le=1.0)
    min_train_nodes: int | None = Field(default=None, ge=1)
    proximal_mu: float = Field(default=0.01, ge=0.0)
    server_lr: float | None = Field(default=None, gt=0.0)  # None: the strategy's default
    server_momentum: float = Field(default=0.0, ge=0.0, lt=1.0)  # fedavgm
    trim_beta: float = Field(default=0.2, ge=0.0, lt=0.5)
    num_malicious_nodes: int = Field(default=0, ge=0)
    max_update_norm: float | None = Field(default=None, gt=0.0)
    round_timeout_s: float = Field(default=3600.0, gt=0.0)
    # aggregation weight per label regime, times the site's number of examples
    # (e.g. {image: 0.25, bag: 0.25}: a mask site counts 4x per case); default 1
    regime_weights: dict[LabelRegime, float] = Field(default_factory=dict)

    @field_validator("regime_weights")
    @classmethod
    def _positive_weights(cls, v: dict[LabelRegime, float]) -> dict[LabelRegime, float]:
        bad = {str(k): w for k, w in v.items() if not (w > 0.0 and w < float("inf"))}
        if bad:
            raise ValueError(
                f"strategy.regime_weights must be positive finite numbers; got {bad}. Fix: give "
                "each label regime a weight > 0 (1 = by number of examples; to leave a site out "
                "of aggregation, remove the site instead)"
            )
        return v


class SimulationConfig(_Strict):
    """Flower simulation-engine resources."""

    num_cpus_per_client: float = Field(default=1.0, gt=0.0)
    torch_threads: int = Field(default=1, ge=1)


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
                f"evaluation.mil_head is {mode!r} but model.mil_pooling is 'none': the model has no "
                "MIL head to refit. Fix: model.mil_pooling: attention (or max), or "
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
        n = self.train.personalize.epochs
        if n and self.model.adaptation == AdaptationMode.NONE:
            raise ValueError(
                f"train.personalize.epochs is {n} but model.adaptation is 'none': there are no "
                "site-private layers to personalise. Fix: set model.adaptation to 'norm', "
                "'adapter' or 'norm+adapter', or train.personalize.epochs: 0"
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
