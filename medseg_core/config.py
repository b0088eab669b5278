"""Configuration models: YAML file -> pydantic model validated once at the edge.

This is the only module that knows configuration key names. Everything
downstream receives frozen pydantic objects.

Two kinds of file exist:

* a **scenario** (:class:`ScenarioConfig`): what the federation runs (rounds,
  model, strategy, privacy defaults) and, for simulations, which sites exist;
* a **site** (:class:`SiteConfig`): one hospital's private facts (data
  directory, epsilon cap, label regime). It is read by that site's client
  only and never sent anywhere.
"""

from __future__ import annotations

import difflib
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from medseg_core.errors import ConfigError

__all__ = [
    "DataConfig",
    "EvalConfig",
    "LabelRegime",
    "AnatomySiteSpec",
    "Attack",
    "ModelConfig",
    "PathSiteSpec",
    "PersonalizeConfig",
    "PrivacyConfig",
    "ScenarioConfig",
    "ShiftSpec",
    "SimulationConfig",
    "SiteConfig",
    "SiteSpec",
    "StrategyConfig",
    "StrategyName",
    "SyntheticSiteSpec",
    "TrainConfig",
    "WeakConfig",
    "load_scenario",
    "load_site_config",
    "load_yaml_model",
    "parse_model",
]

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


class ModelConfig(_Strict):
    """Segmenter architecture (MONAI constructor vocabulary)."""

    name: str = "unet"
    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = (2, 2, 2)
    num_res_units: int = Field(default=1, ge=0)
    norm_groups: int = Field(default=8, ge=1)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    adaptation: AdaptationMode = AdaptationMode.NONE
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
    # "pamr": every scored prediction's class probabilities are refined by the
    # image's own local affinities before the argmax (medseg_core/refine.py): a
    # post-processing step like min_component_voxels, applied to every arm
    refine: Literal["none", "pamr"] = "none"


class PrivacyConfig(_Strict):
    """Differential-privacy defaults; a site's own config may lower the cap."""

    enabled: bool = True
    epsilon: float = Field(default=8.0, gt=0.0)
    delta: float = Field(default=1e-5, gt=0.0, lt=1.0)
    max_grad_norm: float = Field(default=1.0, gt=0.0)
    accountant: Literal["rdp", "prv", "gdp"] = "rdp"
    secure_mode: bool = False


class WeakConfig(_Strict):
    """Options of weak / semi-supervised training (each on or off, measured)."""

    fixmatch: bool = False  # FixMatch consistency on unlabeled cases (Sohn et al. 2020)
    fixmatch_threshold: float = Field(default=0.95, gt=0.5, lt=1.0)
    fixmatch_weight: float = Field(default=1.0, ge=0.0)
    noisy_labels: Literal["none", "gce"] = "none"  # generalized CE for noisy image labels
    gce_q: float = Field(default=0.7, gt=0.0, le=1.0)
    imbalance: Literal["none", "focal"] = "none"  # focal loss against class imbalance
    focal_gamma: float = Field(default=2.0, ge=0.0)
    # positives on which the decoder predicts nothing take their CAM region as
    # pseudo-foreground (else they only teach background; see weak/pseudo.py)
    cam_bootstrap: bool = False
    # positives' pseudo-foreground: "agree" (CAM region where the decoder also says
    # lesion) or "decoder" (the decoder's own top region: p >= tau_fg * max p, >= fg_floor)
    pseudo_fg: Literal["agree", "decoder"] = "agree"
    fg_floor: float = Field(default=0.2, gt=0.0, lt=1.0)
    # CAM-low pixels (< tau_bg * max) of positives as background (off: positives
    # teach foreground only; negatives still teach background)
    pseudo_bg: bool = True
    # pixels within this many pixels of the decoder's predicted lesion (p >= 0.5) are
    # never pseudo-background (an unsure band: the blobby CAM-low region reached into
    # lesions and trained their edges as background); 0: off
    bg_margin: int = Field(default=0, ge=0, le=16)
    # seeded region growing of the pseudo-foreground (Huang et al. 2018, DSRG) into
    # neighbouring pixels where the decoder's foreground probability is >= grow
    grow: float | None = Field(default=None, gt=0.0, lt=1.0)
    # "pamr": the decoder's foreground probability is refined by the image's local
    # affinities before the rules above read it (Araslanov & Roth 2020; medseg_core/refine.py)
    refine: Literal["none", "pamr"] = "none"
    pamr_dilations: tuple[int, ...] = (1, 2)
    pamr_iterations: int = Field(default=10, ge=1, le=100)
    # a CAM-low pixel of a positive is background only where the (refined) decoder
    # probability is below this too (None: the CAM alone decides)
    bg_max_p: float | None = Field(default=None, gt=0.0, lt=1.0)
    # where a positive's pseudo-background comes from: "cam" (CAM-low pixels, and
    # decoder below bg_max_p if set) or "decoder" (decoder below bg_max_p, default
    # 0.2, only in an image where the decoder found a lesion; weak/pseudo.py)
    bg_source: Literal["cam", "decoder"] = "cam"
    # a positive's pixels inside an image blob (|difference of Gaussians| of the
    # input above this, in the input's z-units, grown by blob_dilate px) are never
    # pseudo-background, whatever the CAM or decoder says: lesions are focal
    # intensity abnormalities, bright or dark (None: off; weak/pseudo.py)
    bg_blob: float | None = Field(default=None, gt=0.0)
    blob_sigmas: tuple[float, float] = (1.0, 4.0)
    blob_dilate: int = Field(default=2, ge=0, le=16)
    # a positive whose pseudo-foreground covers more than this fraction of the image
    # gets none (ignored, not background): an untrained decoder's p ~ 0.5 everywhere
    # is not a lesion (None: no limit)
    fg_max_fraction: float | None = Field(default=None, gt=0.0, le=1.0)
    # size constraint on positives (CCNN, Pathak et al. 2015): [min, max] foreground
    # area of a positive image (MIL: of a positive bag), as a fraction of one image
    size_prior: tuple[float, float] | None = None
    size_weight: float = Field(default=1.0, ge=0.0)
    # first round in which positives' pseudo-mask and size terms train the decoder
    # (before it, weak cases train the CAM/MIL heads and their negatives only)
    positives_from_round: int = Field(default=1, ge=1)
    # closed-loop warm-up: positives' decoder terms train in a round only if the
    # previous round's validation Dice (the federation's, over the sites with
    # masks) beat the all-background prediction's Dice on the same cases by at
    # least this margin; closed in round 1, closed again whenever the Dice falls
    # back. Under DP, pseudo-masks read from a decoder that has not learned
    # lesions flooded the weak arm (README, "Stop 16"). None: off (the fixed
    # positives_from_round alone); with both, both must allow it
    positives_gate: float | None = Field(default=None, ge=0.0, lt=1.0)
    # what positives train while that gate is closed: "off" (nothing: the CAM/MIL
    # heads, the MIL constraint and negatives only) or "agree" (the agreement rule,
    # CAM region where the decoder also says lesion, with no refinement: the rule
    # that did not flood under DP); needs positives_gate
    positives_before_gate: Literal["off", "agree"] = "off"
    # weight of the weak cases' pixel terms (negatives' exact background, positives'
    # pseudo-masks and size prior) against a mask case's Dice + CE
    weak_weight: float = Field(default=1.0, ge=0.0)
    # weight of a MIL bag's classification loss
    bag_weight: float = Field(default=1.0, ge=0.0)
    # how the CAM head's map becomes the image-level logit: "mean" (global average
    # pooling, Zhou et al. 2016) or "lse" (log-sum-exp, a smooth max, Pinheiro &
    # Collobert 2015): a lesion covering 1-2 of the 8x8 bottleneck cells is diluted
    # 30-60x by the average; measured, the smooth max localised worse (README,
    # "Weak labels"; weak/settings.py)
    cam_pooling: Literal["mean", "lse"] = "mean"
    # weight of the CAM head's image-level classification loss (0.2: at 1 the
    # decoder of a 2-site federation collapsed; docs/architecture.md)
    cam_weight: float = Field(default=0.2, ge=0.0)
    # weight of the pixel-level MIL constraint on the decoder (Pathak et al. 2015):
    # a log-sum-exp of its foreground logit says "lesion somewhere" on positives,
    # "nowhere" on negatives (0: off; it hurt in the 2-site runs, docs/architecture.md)
    mil_weight: float = Field(default=0.0, ge=0.0)

    @model_validator(mode="after")
    def _before_gate_needs_a_gate(self) -> WeakConfig:
        if self.positives_before_gate != "off" and self.positives_gate is None:
            raise ValueError(
                f"train.weak.positives_before_gate is {self.positives_before_gate!r} but "
                "train.weak.positives_gate is unset, so there is no gate to be before. Fix: set "
                "positives_gate (e.g. 0.1), or leave positives_before_gate out"
            )
        return self

    @field_validator("pamr_dilations")
    @classmethod
    def _pamr_dilations(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or min(v) < 1 or max(v) > 32:
            raise ValueError(
                f"train.weak.pamr_dilations must be 1-32 px neighbour distances; got {list(v)}. "
                "Fix: e.g. [1, 2] for lesions of a few pixels' radius"
            )
        return v

    @field_validator("size_prior")
    @classmethod
    def _size_prior_bounds(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not 0.0 < v[0] < v[1] <= 1.0:
            raise ValueError(
                f"train.weak.size_prior must be [min, max] with 0 < min < max <= 1 (fractions "
                f"of one image's area that a positive case's lesions cover); got {list(v)}. "
                "Fix: e.g. [0.005, 0.12] for lesions of 20-500 px in a 64 x 64 image, or leave "
                "it out (no size prior)"
            )
        return v

    @field_validator("blob_sigmas")
    @classmethod
    def _blob_sigmas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 < v[0] < v[1] <= 32.0:
            raise ValueError(
                f"train.weak.blob_sigmas must be [inner, outer] Gaussian widths in px with "
                f"0 < inner < outer <= 32; got {list(v)}. Fix: e.g. [1, 4] for lesions of "
                "3-8 px radius (inner below the lesion radius, outer about it)"
            )
        return v


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
    lr: float = Field(default=1e-3, gt=0.0)
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = Field(default=0.0, ge=0.0, lt=1.0)  # SGD only
    weak: WeakConfig = WeakConfig()
    personalize: PersonalizeConfig = PersonalizeConfig()


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


class SimulationConfig(_Strict):
    """Flower simulation-engine resources."""

    num_cpus_per_client: float = Field(default=1.0, gt=0.0)
    torch_threads: int = Field(default=1, ge=1)


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


# --------------------------------------------------------------------------
# Loading and error formatting
# --------------------------------------------------------------------------


def _choice_message(value: object, choices: list[str]) -> str:
    close = difflib.get_close_matches(str(value), choices, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown option {value!r}; valid choices: {choices}{hint}"


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names valid at ``loc`` (used to suggest a fix for an unknown key)."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int) or current is None:
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        nxt = None
        for cand in candidates:
            for sub in (cand, *getattr(cand, "__args__", ())):
                if isinstance(sub, type) and issubclass(sub, BaseModel):
                    nxt = sub
                    break
            if nxt:
                break
        current = nxt
    return sorted(getattr(current, "model_fields", {}))


def format_validation_error(
    exc: ValidationError, model: type[BaseModel], source: str
) -> str:
    """Turn a pydantic error into one line per problem: key, value, expected."""
    lines = [f"invalid configuration in {source}:"]
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        key = ".".join(str(p) for p in loc) or "<root>"
        value = err.get("input")
        if err.get("type") == "extra_forbidden":
            valid = _fields_at(model, loc)
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            lines.append(
                f"  - {key}: unknown key (value {value!r}); valid keys here: {valid}{hint}"
            )
        else:
            msg = err.get("msg", "invalid value")
            lines.append(f"  - {key}: {msg} (got {value!r})")
    lines.append("Fix the listed keys and run again.")
    return "\n".join(lines)


def parse_model(model: type[M], data: Any, source: str = "<config>") -> M:
    """Validate ``data`` into ``model``; raise :class:`ConfigError` on failure."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, model, source)) from None


def load_yaml_model(model: type[M], path: str | Path) -> M:
    """Read a YAML file and validate it into ``model``.

    Raises
    ------
    ConfigError
        The file is missing, is not YAML, is not a mapping, or fails
        validation (every problem is listed).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"config file {str(path)!r} does not exist; pass the path of a YAML file "
            "(see simulations/configs/ for examples)"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(path)!r} must hold a mapping of keys, got "
            f"{type(data).__name__}"
        )
    obj = parse_model(model, data, source=str(path))
    return _resolve_relative_paths(obj, path.parent)


def _resolve_relative_paths(obj: M, base: Path) -> M:
    """Make relative site paths relative to the config file's directory."""
    if isinstance(obj, ScenarioConfig):
        sites = tuple(
            s.model_copy(update={"path": (base / s.path).resolve()})
            if isinstance(s, PathSiteSpec) and not s.path.is_absolute()
            else s
            for s in obj.sites
        )
        return obj.model_copy(update={"sites": sites})  # type: ignore[return-value]
    if isinstance(obj, SiteConfig):
        upd = {}
        for key in ("data_dir", "state_dir"):
            p = getattr(obj, key)
            if not p.is_absolute():
                upd[key] = (base / p).resolve()
        return obj.model_copy(update=upd) if upd else obj  # type: ignore[return-value]
    return obj


def load_scenario(path: str | Path) -> ScenarioConfig:
    """Load and validate a scenario YAML file."""
    return load_yaml_model(ScenarioConfig, path)


def load_site_config(path: str | Path) -> SiteConfig:
    """Load and validate a site YAML file (read on the site only)."""
    return load_yaml_model(SiteConfig, path)
