"""Options of the weak-label and MIL training terms (``train.weak`` of a scenario)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from medseg_core.config.base import _Strict

__all__ = ["WeakConfig"]


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
    # lesions flooded the weak arm (docs/results-log.md, "Stop 16"). None: off (the fixed
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
    # weight of the negatives' exact-background term within it (an image-level
    # negative, or every instance of a negative bag): all of a negative's pixels
    # are background, against the few pseudo-labelled pixels of a positive
    neg_weight: float = Field(default=1.0, ge=0.0)
    # weight of a MIL bag's classification loss
    bag_weight: float = Field(default=1.0, ge=0.0)
    # the MIL head reads the encoder's features detached: the bag classification
    # loss trains the head alone, as a probe on the shared encoder, and sends no
    # gradient into it. Joint (false), the head and the bag site's local encoder
    # fit each other, and the average over sites undoes most of the encoder's side
    # (the bag site counts 0.1 in the mixed-regime scenario): in one no-DP run the
    # head trained in a round scored a bag AUC of 0.12-0.84 on that round's global
    # encoder. Measured on mixed_regime.yaml (docs/results-log.md, "Stop 31"):
    # without DP, seeds 0-4, image sites' weak / full mean 0.865 / 0.859 (off:
    # 0.815 / 0.842), 2 seeds of 5 at 0.85, mil_auc mean 0.60 (off: 0.49); under
    # DP, seeds 0-1, lower on both (0.86 / 0.91 and 0.82 / 0.96 against 0.88 /
    # 0.97 and 0.90 / 0.96; mil_auc 0.42, 0.44 against 0.79, 0.65). Off by default
    # and in the scenarios
    mil_head_detach: bool = False
    # how the CAM head's map becomes the image-level logit: "mean" (global average
    # pooling, Zhou et al. 2016) or "lse" (log-sum-exp, a smooth max, Pinheiro &
    # Collobert 2015): a lesion covering 1-2 of the 8x8 bottleneck cells is diluted
    # 30-60x by the average; measured, the smooth max localised worse (docs/results-log.md;
    # weak/settings.py)
    cam_pooling: Literal["mean", "lse"] = "mean"
    # weight of the CAM head's image-level classification loss (0.2: at 1 the
    # decoder of a 2-site federation collapsed; docs/architecture.md)
    cam_weight: float = Field(default=0.2, ge=0.0)
    # weight of the pixel-level MIL constraint on the decoder (Pathak et al. 2015):
    # a log-sum-exp of its foreground logit says "lesion somewhere" on positives,
    # "nowhere" on negatives (0: off; it hurt in the 2-site runs, docs/architecture.md)
    mil_weight: float = Field(default=0.0, ge=0.0)
    # what a site without masks (label regime image or bag) leaves untrained, so
    # that only the sites with masks move it: "decoder" (the segmentation up-path;
    # the weak terms still reach the encoder through it) or "encoder" (down-path
    # and bottleneck). Heads and private adaptation layers train as before. The
    # server averages each array over the sites that changed it
    # (server.federation.average_over_trainers), so the frozen copies do not
    # dilute it. Under DP a weak site's noisy, background-heavy pixel terms pulled
    # the shared decoder to "no lesion" (docs/results-log.md, "Stop 18"); freezing it there did
    # not lift the image-level sites (docs/results-log.md, "Stop 19"). "none": every site trains
    # every shared array
    weak_sites_freeze: Literal["none", "decoder", "encoder"] = "none"
    # the first round the freeze applies in; before it, the sites without masks
    # train every shared array too (1: frozen from the start). Frozen from round
    # 1, a seed whose initial model learns late under DP never left the empty
    # prediction on the mask site's updates alone; with every site training the
    # decoder for the first rounds, it did (docs/results-log.md, "Stop 28")
    weak_sites_freeze_from_round: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _before_gate_needs_a_gate(self) -> WeakConfig:
        if self.positives_before_gate != "off" and self.positives_gate is None:
            raise ValueError(
                f"train.weak.positives_before_gate is {self.positives_before_gate!r} but "
                "train.weak.positives_gate is unset, so there is no gate to be before. Fix: set "
                "positives_gate (e.g. 0.1), or leave positives_before_gate out"
            )
        return self

    @model_validator(mode="after")
    def _freeze_from_round_needs_a_freeze(self) -> WeakConfig:
        if self.weak_sites_freeze_from_round != 1 and self.weak_sites_freeze == "none":
            raise ValueError(
                f"train.weak.weak_sites_freeze_from_round is {self.weak_sites_freeze_from_round} "
                "but weak_sites_freeze is 'none', so nothing is frozen from that round. Fix: set "
                "weak_sites_freeze (e.g. decoder), or leave weak_sites_freeze_from_round out"
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
