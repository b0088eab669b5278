"""Settings of the weak losses and the per-sample terms they share.

:class:`WeakSettings` holds the weights, thresholds and options of the weak
losses; the functions here are the image-level and pixel-level terms used by
the joint loss (:mod:`medseg_core.weak.cam`), the pseudo-mask rules
(:mod:`medseg_core.weak.pseudo`) and the MIL loss (:mod:`medseg_core.weak.mil`).
This module imports none of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["WeakSettings", "cam_image_logit", "image_label_loss", "pixel_ce", "positives_gate_open",
           "smooth_max"]


@dataclass(frozen=True)
class WeakSettings:
    """Weights, thresholds and options of the weak loss
    (:class:`medseg_core.config.WeakConfig` holds the user-facing options)."""

    # Defaults chosen on a 2-site mask + image-level federation (DP off and
    # on, 8 rounds): the CAM classification loss at full weight and the
    # log-sum-exp MIL constraint both pulled the shared decoder towards
    # "no lesion anywhere" (weak and mask sites collapsed to empty
    # predictions); at cam_weight 0.2 without the constraint the image-level
    # site reached its full-mask Dice. See docs/architecture.md.
    cam_weight: float = 0.2
    bag_weight: float = 1.0  # MIL bag classification loss
    mil_head_detach: bool = False  # the bag loss trains the MIL head only, not the encoder
    weak_weight: float = 1.0
    mil_weight: float = 0.0
    tau_fg: float = 0.5
    tau_bg: float = 0.2
    lse_r: float = 5.0
    cam_pooling: str = "mean"  # "lse": the CAM's smooth max (sharpness lse_r) is the image logit
    neg_weight: float = 1.0  # weight of the exact-background term of image-level negatives
    pseudo_bg: bool = True  # use CAM-low pixels of positives as background
    bg_margin: int = 0  # pixels within this distance of the decoder's lesion are never background
    refine: str = "none"  # "pamr": decoder probability refined by image affinities (medseg_core/refine.py)
    pamr_dilations: tuple[int, ...] = (1, 2)
    pamr_iterations: int = 10
    bg_source: str = "cam"  # "decoder": background where the decoder is low, once it found a lesion
    bg_max_p: float | None = None  # CAM-low background also needs decoder p below this
    bg_blob: float | None = None  # pixels of image blobs (|DoG| above this, z-units) are never background
    blob_sigmas: tuple[float, float] = (1.0, 4.0)  # the DoG's inner and outer Gaussian (px)
    blob_dilate: int = 2  # the blob region grows by this many px (lesion rims)
    fg_max_fraction: float | None = None  # a larger pseudo-foreground is dropped (ignored)
    pseudo_fg: str = "agree"  # "agree": CAM and decoder; "decoder": the decoder's own top region
    fg_floor: float = 0.2  # "decoder": minimum foreground probability of a pseudo-foreground pixel
    grow: float | None = None  # seeded region growing into pixels with decoder p >= grow
    cam_bootstrap: bool = False  # CAM region as foreground where the decoder finds nothing
    size_prior: tuple[float, float] | None = None  # [min, max] lesion area of a positive
    size_weight: float = 1.0
    positives_from_round: int = 1  # warm-up: positives' decoder terms start in this round
    positives_gate: float | None = None  # server side: the closed-loop warm-up's margin
    positives_before_gate: str = "off"  # "agree": the unrefined agreement rule while it is closed
    positives: bool = True  # this round trains the decoder on positives (see the warm-up)
    weak_sites_freeze: str = "none"  # "decoder" / "encoder": left untrained at sites without masks
    weak_sites_freeze_from_round: int = 1  # the freeze applies from this round on
    fixmatch: bool = False
    fixmatch_threshold: float = 0.95
    fixmatch_weight: float = 1.0
    noisy_labels: str = "none"
    gce_q: float = 0.7
    imbalance: str = "none"
    focal_gamma: float = 2.0

    @classmethod
    def from_config(cls, cfg: object | None) -> WeakSettings:
        """From a :class:`medseg_core.config.WeakConfig` (None: defaults)."""
        if cfg is None:
            return cls()
        return cls(**{n: getattr(cfg, n) for n in type(cfg).model_fields})

    def for_round(self, server_round: int, gate_open: bool | None = None) -> WeakSettings:
        """The settings of one training round (the positives' warm-up, and
        ``weak_sites_freeze``, which applies from ``weak_sites_freeze_from_round``).

        ``gate_open``: the server's closed-loop warm-up for this round
        (:func:`positives_gate_open`); None where the run has no gate. While
        it is closed, ``positives_before_gate="agree"`` trains positives with
        the agreement rule, unrefined, instead of not at all."""
        warm = server_round >= self.positives_from_round
        freeze = (self.weak_sites_freeze if server_round >= self.weak_sites_freeze_from_round
                  else "none")
        if gate_open is False and warm and self.positives_before_gate == "agree":
            return replace(self, positives=True, pseudo_fg="agree", refine="none",
                           weak_sites_freeze=freeze)
        return replace(self, positives=warm and gate_open is not False, weak_sites_freeze=freeze)


def positives_gate_open(val_dice: float | None, empty_dice: float | None,
                        margin: float | None) -> bool | None:
    """Whether the next round trains the decoder on positives, by the
    closed-loop warm-up ``train.weak.positives_gate`` (``margin``).

    Open only if the last round's validation Dice beat the Dice of an
    all-background prediction on the same cases by at least ``margin``;
    closed before the first validation (``val_dice`` None) and when either
    is unknown. None where there is no gate (``margin`` None).
    """
    if margin is None:
        return None
    if val_dice is None or empty_dice is None or not (math.isfinite(val_dice)
                                                      and math.isfinite(empty_dice)):
        return False
    return val_dice - empty_dice >= margin


def smooth_max(x: Tensor, r: float) -> Tensor:
    """Per row of ``x`` ``(B, ...)``: ``log(mean(exp(r * x))) / r``, between the
    mean (``r -> 0``) and the maximum (``r -> inf``) of the row (Pinheiro &
    Collobert 2015, CVPR)."""
    flat = x.flatten(1)
    return (torch.logsumexp(r * flat, dim=1) - math.log(flat.shape[1])) / r


def cam_image_logit(cam: Tensor, s: WeakSettings) -> Tensor:
    """Image-level logit ``(B,)`` of CAM logits ``(B, 1, h, w)``.

    ``cam_pooling="mean"``: global average pooling (Zhou et al. 2016), the
    classic CAM. ``"lse"``: the smooth max :func:`smooth_max` at sharpness
    ``lse_r``. The bottleneck CAM is 8 x 8 cells for a 64 px image and a
    lesion covers one or two of them, so under the average its evidence is
    diluted 30-60 times and the head can satisfy the label through
    image-wide cues instead; the smooth max is decided by the most
    lesion-like cells, which is what the pseudo-mask rules then read.
    Measured on the mixed-regime scenario without DP (seeds 0 and 1,
    docs/results-log.md) it did the opposite: the CAM's image AUC fell from
    0.79-0.86 to 0.55-0.76, its maximum left the lesions (within 3 px of one
    in 0-2 % of positives) and the weak arm's Dice fell; off by default.
    """
    if s.cam_pooling == "lse":
        return smooth_max(cam, s.lse_r)
    if s.cam_pooling != "mean":
        raise ValueError(f"unknown CAM pooling {s.cam_pooling!r}; valid: ['mean', 'lse']")
    return cam.flatten(1).mean(dim=1)


def image_label_loss(logit: Tensor, target: Tensor, s: WeakSettings) -> Tensor:
    """Per-sample loss of an image-level logit against a 0/1 label.

    Binary cross-entropy by default; ``noisy_labels="gce"``: generalized
    cross-entropy ``(1 - p_y^q) / q`` (Zhang & Sabuncu 2018, NeurIPS), which
    bounds what a wrong label can cost; ``imbalance="focal"``: the focal
    factor ``(1 - p_y)^gamma`` (Lin et al. 2017, ICCV) down-weights easy,
    majority-class cases.
    """
    p = torch.sigmoid(logit)
    p_y = torch.where(target > 0.5, p, 1.0 - p).clamp(1e-6, 1.0)
    if s.noisy_labels == "gce":
        loss = (1.0 - p_y.pow(s.gce_q)) / s.gce_q
    else:
        loss = F.binary_cross_entropy_with_logits(logit, target, reduction="none")
    if s.imbalance == "focal":
        loss = loss * (1.0 - p_y).pow(s.focal_gamma)
    return loss


def pixel_ce(logits: Tensor, target: Tensor, s: WeakSettings) -> Tensor:
    """Per-pixel cross-entropy ``(B, H, W)``, focal-weighted with ``imbalance="focal"``."""
    ce = F.cross_entropy(logits, target, reduction="none")
    if s.imbalance == "focal":
        p_t = torch.exp(-ce)
        ce = ce * (1.0 - p_t).pow(s.focal_gamma)
    return ce
