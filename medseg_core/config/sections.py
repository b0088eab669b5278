"""The scenario's sections: model, data, evaluation, privacy, training,
strategy and simulation resources, each validated on its own. The rules
across sections live in :class:`~medseg_core.config.schema.ScenarioConfig`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from medseg_core.config.base import (
    AdaptationMode,
    LabelRegime,
    StrategyName,
    _choice_message,
    _Strict,
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
    ``optimizer``), keeps the epoch with the best local validation Dice (epoch 0, no
    change, included) and stores them; nothing is sent but metrics. Under DP
    the epochs are DP-SGD through the site's accountant and their budget is
    reserved from the first round (the rounds' noise is calibrated for the
    rounds plus these epochs), so the site's cap holds.

    ``layers: all`` fine-tunes every weight instead, shared ones included,
    and keeps the whole model at the site: local fine-tuning of the
    federated model (on a plain FedAvg federation, ``model.adaptation:
    none``, this is FedAvg-FT; Wang et al. 2019). The published global model
    is unchanged; the site's own model is scored as ``dice`` and the global
    one as ``dice_global``, as with the private layers.
    """

    epochs: int = Field(default=0, ge=0)  # 0: off
    # private: the site-private adaptation layers only; all: every weight
    layers: Literal["private", "all"] = "private"
    lr: float = Field(default=1e-3, gt=0.0)
    # the rounds' optimiser (sgd, momentum 0.9, lr 0.1 on strong_shift.yaml)
    # moves the small private layers much further per epoch than Adam at 1e-3
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = Field(default=0.0, ge=0.0, lt=1.0)  # SGD only

    @model_validator(mode="after")
    def _momentum_needs_sgd(self) -> PersonalizeConfig:
        if self.momentum and self.optimizer != "sgd":
            raise ValueError(
                f"train.personalize.momentum is {self.momentum} but train.personalize.optimizer "
                f"is {self.optimizer!r}; momentum is an SGD setting. Fix: optimizer: sgd, or "
                "momentum: 0")
        return self


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
    # epochs, each round, in which a site trains its private adaptation layers
    # alone (the shared weights frozen) before its local_epochs of all weights:
    # FedRep's local update order (Collins et al. 2021), so the private layers
    # fit the new global model before the shared weights move. Without DP only:
    # the DP plan budgets local_epochs per round
    private_epochs: int = Field(default=0, ge=0, le=20)


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
