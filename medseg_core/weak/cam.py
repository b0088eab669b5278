"""Joint mask + image-level training with CAM pseudo-masks.

Per sample, in one batch (every term depends on that sample only, so the
batch loss is a mean of per-sample losses, as DP-SGD requires):

* a case **with a mask**: Dice + cross-entropy (the spine's loss);
* every case **with an image-level class** (masks included): binary
  cross-entropy of the CAM head's image logit (global average of the CAM,
  :class:`medseg_core.models.heads.CamSegmenter`);
* an image-level **negative**: its mask is known exactly (all background):
  cross-entropy against background;
* an image-level **positive**: cross-entropy against a refined CAM
  pseudo-mask on the pixels the pseudo-mask is sure of;
* optionally (``mil_weight > 0``; off by default, it hurt in our runs) the
  MIL constraint below on both.

MIL constraint (pixels as instances, the image as the bag; Pathak et al.
2015, "Fully Convolutional Multi-Class Multiple Instance Learning", ICLR
workshop): a log-sum-exp (smooth max, Pinheiro & Collobert 2015, CVPR) of
the decoder's foreground-vs-background logit must say "lesion somewhere" for
positives and "nowhere" for negatives.

Refinement of the CAM into a pseudo-mask (:func:`pseudo_masks`). The CAM is
computed at the bottleneck (1/8 of the image side): it finds the lesion but
its outline is a blob. The decoder is sharp but, on a site whose scanner it
has not learned, may fire on the wrong structures. A pixel is taken as
foreground only where both agree (CAM above an adaptive, per-image threshold
``tau_fg * max(CAM)`` and decoder probability above 0.5), and as background
where the CAM is clearly low (``< tau_bg * max(CAM)``); everything else is
ignored. (:func:`pseudo_masks` can also average the CAM over the image and
its horizontal flip; the training loss uses the single CAM of the forward
pass it already has, so no extra forward pass is spent.) The adaptive threshold follows the usual CAM practice (Zhou et
al. 2016 used 20 % of the max for boxes); agreement with the decoder is a
co-training style check between two views of the same network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import Tensor, nn

from medseg_core.data.slices import IGNORE_LABEL
from medseg_core.models.heads import cam_segmenter
from medseg_core.refine import pamr

__all__ = ["WeakSegLoss", "WeakSettings", "cam_image_logit", "image_label_loss", "pixel_ce", "pseudo_mask_ce",
           "pseudo_masks", "size_prior_loss", "smooth_max"]


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
    bg_max_p: float | None = None  # CAM-low background also needs decoder p below this
    fg_max_fraction: float | None = None  # a larger pseudo-foreground is dropped (ignored)
    pseudo_fg: str = "agree"  # "agree": CAM and decoder; "decoder": the decoder's own top region
    fg_floor: float = 0.2  # "decoder": minimum foreground probability of a pseudo-foreground pixel
    grow: float | None = None  # seeded region growing into pixels with decoder p >= grow
    cam_bootstrap: bool = False  # CAM region as foreground where the decoder finds nothing
    size_prior: tuple[float, float] | None = None  # [min, max] lesion area of a positive
    size_weight: float = 1.0
    positives_from_round: int = 1  # warm-up: positives' decoder terms start in this round
    positives: bool = True  # this round trains the decoder on positives (see the warm-up)
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

    def for_round(self, server_round: int) -> WeakSettings:
        """The settings of one training round (the positives' warm-up)."""
        return replace(self, positives=server_round >= self.positives_from_round)


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


@torch.no_grad()
def pseudo_masks(
    cam: Tensor, cam_flipped: Tensor | None, seg_logits: Tensor, *, tau_fg: float, tau_bg: float,
    bootstrap: bool = False, fg_source: str = "agree", fg_floor: float = 0.2,
    grow: float | None = None, grow_steps: int = 16, bg_margin: int = 0,
    image: Tensor | None = None, refine: str = "none", pamr_dilations: tuple[int, ...] = (1, 2),
    pamr_iterations: int = 10, bg_max_p: float | None = None,
    fg_max_fraction: float | None = None,
) -> Tensor:
    """Refined pseudo-masks of positive images.

    With ``bootstrap``, a positive image on which the decoder predicts no
    foreground pixel at all has nothing to agree with: its CAM region
    (``>= tau_fg * max``) alone is taken as foreground. Without it such an
    image only contributes background (its CAM-low pixels). Measured on the
    mixed-regime scenario under DP it did not stop the weak arm collapsing
    to empty predictions (README), so it is off by default.

    With ``fg_source="decoder"`` the foreground is the decoder's own most
    lesion-like region instead: pixels whose foreground probability is at
    least ``tau_fg`` times the image's maximum and at least ``fg_floor``
    (an adaptive, per-image threshold on the decoder rather than on the
    CAM). It exists because, measured on the mixed-regime scenario under DP,
    the bottleneck CAM (1/8 resolution, lesions of 2.5 % of the image) did
    not localise: its ``>= 0.5 * max`` region had Dice 0.01-0.12 with the
    lesions, so "CAM agrees" left almost no foreground (recall 0-1 %), while
    the decoder's top region had precision 0.55-0.80 (README, "Weak labels").

    With ``grow`` set, the foreground found so far is a seed that grows, one
    8-connected ring per step for up to ``grow_steps`` steps, into pixels
    where the decoder's foreground probability is at least ``grow`` and the
    CAM is not clearly low (``>= tau_bg * max``): the seeded region growing
    of Huang et al. (2018, CVPR, "Weakly-Supervised Semantic Segmentation
    Network with Deep Seeded Region Growing"). The agreement rule is precise
    but keeps only the decoder's confident core (without DP, precision
    0.89-0.91 at recall 0.33-0.39 on the mixed-regime scenario); growing at
    ``p >= 0.3`` reached recall 0.41-0.52 at precision 0.84-0.88
    (``benchmarks/pseudo_masks.py``).

    With ``bg_margin`` > 0, pixels within ``bg_margin`` pixels (Chebyshev
    distance) of the decoder's predicted lesion (p >= 0.5) are never
    pseudo-background: a band of "unsure" around what the decoder finds. The
    bottleneck CAM is a blob at 1/8 resolution; its low region reaches into
    lesions (without DP it called 22-32 % of lesion pixels background,
    ``benchmarks/pseudo_masks.py``), and the weak arm's decoder came out
    precise but with about half the recall of the full-mask arm (0.36-0.43
    against 0.74-0.83 on test positives): the CAM-low rule was training the
    lesions' edges as background.

    With ``refine="pamr"`` (needs ``image``), the decoder's foreground
    probability is first refined by the image's local affinities
    (:func:`medseg_core.refine.pamr`, Araslanov & Roth 2020) and every
    rule below reads the refined value. Measured on the mixed-regime scenario
    (``benchmarks/pseudo_masks.py``, test positives of the three 2D sites, no DP):
    ``p >= 0.5`` had precision 0.88-0.92 at recall 0.40-0.49, refined
    0.98-0.99 at 0.44-0.59; under DP (seed 1) 0.43-0.58 at 0.24-0.27 against
    0.86-0.92 at 0.20-0.23: speckle is averaged away and a lesion's rim
    takes its confident core's value.

    With ``bg_max_p`` set, a CAM-low pixel is background only where the
    (refined) decoder probability is also below ``bg_max_p``: both views agree,
    as for the foreground. The CAM is computed at 1/8 resolution and its
    maximum sits on one lesion; in images with several lesions the others
    fall below ``tau_bg * max``: measured as above, the CAM-low rule alone
    labelled 29-41 % of lesion pixels background without DP and 40-85 % under
    DP; requiring the refined decoder below 0.2 too, 6-14 % and 15-51 %.

    With ``fg_max_fraction`` set, an image whose pseudo-foreground covers
    more than that fraction of it gets none (those pixels are ignored, not
    background): a lesion-sized region is plausible, half the image is not.
    An untrained decoder says p ~ 0.5 everywhere; taken as foreground, that
    flooded the weak arm under DP from round 1 (README, "Weak labels").

    Trained with, neither the decoder source nor growing beat the agreement
    rule on the mixed-regime scenario (README, "Weak labels": growing
    destabilised training, at ``grow=0.1`` it flooded the image while the
    decoder was untrained); both are off by default.

    Parameters
    ----------
    cam
        ``(B, 1, h, w)`` CAM logits of the images.
    cam_flipped
        CAM of the horizontally flipped images (flipped back inside), or None.
    seg_logits
        ``(B, K, H, W)`` decoder logits.

    Returns
    -------
    Tensor
        ``(B, 1, H, W)`` int64: 1 foreground, 0 background,
        :data:`IGNORE_LABEL` unsure.
    """
    c = F.relu(cam)
    if cam_flipped is not None:
        c = 0.5 * (c + F.relu(cam_flipped.flip(-1)))
    c = F.interpolate(c, size=seg_logits.shape[-2:], mode="bilinear", align_corners=False)
    rel = c / c.flatten(1).amax(dim=1).clamp_min(1e-6)[:, None, None, None]
    p_fg = seg_logits.softmax(dim=1)[:, 1:].sum(dim=1, keepdim=True)
    if refine == "pamr":
        if image is None:
            raise ValueError("pseudo_masks(refine='pamr') needs the input images")
        p_fg = pamr(image, p_fg, dilations=pamr_dilations, iterations=pamr_iterations)
    elif refine != "none":
        raise ValueError(f"unknown pseudo-mask refinement {refine!r}; valid: ['none', 'pamr']")
    out = torch.full_like(rel, IGNORE_LABEL, dtype=torch.int64)
    background = rel < tau_bg
    if bg_max_p is not None:
        background = background & (p_fg < bg_max_p)
    if bg_margin > 0:
        near = F.max_pool2d((p_fg >= 0.5).to(p_fg.dtype), 2 * bg_margin + 1, stride=1,
                            padding=bg_margin) > 0
        background = background & ~near
    out[background] = 0
    if fg_source == "decoder":
        p_max = p_fg.flatten(1).amax(dim=1)[:, None, None, None]
        fg = (p_fg >= tau_fg * p_max) & (p_fg >= fg_floor)
    elif fg_source == "agree":
        fg = p_fg >= 0.5
        if bootstrap:
            silent = ~fg.flatten(1).any(dim=1)  # the decoder finds nothing in the image
            fg = fg | silent[:, None, None, None]
        fg = fg & (rel >= tau_fg)
    else:
        raise ValueError(f"unknown pseudo-foreground source {fg_source!r}; valid: ['agree', 'decoder']")
    if grow is not None:
        allowed = (p_fg >= grow) & (rel >= tau_bg)
        for _ in range(grow_steps):
            grown = fg | (F.max_pool2d(fg.to(p_fg.dtype), 3, stride=1, padding=1) > 0) & allowed
            if torch.equal(grown, fg):
                break
            fg = grown
    if fg_max_fraction is not None:
        implausible = fg.flatten(1).float().mean(dim=1) > fg_max_fraction
        fg = fg & ~implausible[:, None, None, None]
    out[fg] = 1
    return out


def pseudo_mask_ce(cam: Tensor, logits: Tensor, s: WeakSettings,
                   image: Tensor | None = None) -> Tensor:
    """Per image ``(N,)``: cross-entropy against the refined CAM pseudo-mask
    (:func:`pseudo_masks`), averaged over the pixels it is sure of. ``image``:
    the model's input (needed with ``refine="pamr"``)."""
    pseudo = pseudo_masks(cam.detach(), None, logits.detach(), tau_fg=s.tau_fg, tau_bg=s.tau_bg,
                          bootstrap=s.cam_bootstrap, fg_source=s.pseudo_fg, fg_floor=s.fg_floor,
                          grow=s.grow, bg_margin=s.bg_margin,
                          image=None if image is None else image.detach(), refine=s.refine,
                          pamr_dilations=s.pamr_dilations, pamr_iterations=s.pamr_iterations,
                          bg_max_p=s.bg_max_p, fg_max_fraction=s.fg_max_fraction)
    if not s.pseudo_bg:
        pseudo = torch.where(pseudo == 0, torch.full_like(pseudo, IGNORE_LABEL), pseudo)
    sure = (pseudo != IGNORE_LABEL)[:, 0].to(logits.dtype)
    ce = pixel_ce(logits, pseudo[:, 0].clamp_min(0), s)
    return (ce * sure).flatten(1).sum(dim=1) / sure.flatten(1).sum(dim=1).clamp_min(1.0)


def size_prior_loss(logits: Tensor, groups: int, prior: tuple[float, float], s: WeakSettings,
                    valid: Tensor | None = None) -> Tensor:
    """Size-constrained pseudo-labels of positive cases, one loss per group.

    A group is one positive image, or the instances of one positive MIL bag
    (``logits`` rows ``g * K .. g * K + K - 1``). A positive group holds at
    least ``min * H * W`` lesion pixels and at most ``max * H * W``. This is
    the hard (top-k) form of the constrained CNN of Pathak, Kraehenbuehl &
    Darrell (2015, ICCV, "Constrained Convolutional Neural Networks for Weakly
    Supervised Segmentation"), whose latent target is the distribution
    closest to the prediction that satisfies the constraint; here the
    target is hard. Where the decoder predicts fewer
    foreground pixels than the minimum, its ``ceil(min * H * W)`` most
    lesion-like pixels become foreground targets; where it predicts more
    than the maximum, the foreground pixels beyond the top ``max * H * W``
    become background targets; a group inside the bounds costs nothing.
    Unlike the CAM pseudo-masks, this pushes towards foreground even when the
    decoder predicts none at all (the collapse of weak sites under DP), and
    the cross-entropy of a hard target keeps a gradient where a penalty on
    the soft area would vanish (softmax saturated at background).

    Parameters
    ----------
    logits
        ``(G * K, C, H, W)`` decoder logits.
    groups
        ``G``.
    prior
        ``(min, max)`` fractions of one image's area.
    valid
        ``(G, K)`` bool: real instances (padding is never picked), or None.

    Returns
    -------
    Tensor
        ``(G,)`` mean cross-entropy over each group's constrained pixels
        (0 for a group inside the bounds).
    """
    n, _, h, w = logits.shape
    k_lo = max(1, int(math.ceil(prior[0] * h * w)))
    k_hi = max(k_lo, int(math.floor(prior[1] * h * w)))
    with torch.no_grad():
        p = logits.softmax(dim=1)[:, 1:].sum(dim=1)  # (G * K, H, W) foreground probability
        if valid is not None:
            p = torch.where(valid.reshape(n)[:, None, None], p, torch.full_like(p, -1.0))
        p = p.reshape(groups, -1)
        order = p.argsort(dim=1, descending=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(p.shape[1], device=p.device).expand_as(order))
        fg = p >= 0.5
        count = fg.sum(dim=1, keepdim=True)
        target = torch.full_like(order, IGNORE_LABEL)
        target[(rank < k_lo) & (count < k_lo)] = 1
        target[(rank >= k_hi) & fg & (count > k_hi)] = 0
    ce = pixel_ce(logits, target.reshape(n, h, w).clamp_min(0), s).reshape(groups, -1)
    sure = (target != IGNORE_LABEL).to(logits.dtype)
    return (ce * sure).sum(dim=1) / sure.sum(dim=1).clamp_min(1.0)


class WeakSegLoss(nn.Module):
    """Mean over the batch of the per-sample terms in the module docstring.

    Parameters
    ----------
    model
        The (plain) model being trained; it must have a CAM head. Its
        ``last_cam`` is read after each forward pass.
    settings
        Weights and thresholds.

    Notes
    -----
    ``forward(logits, (labels, classes))``: ``labels`` ``(B, 1, H, W)``
    int64 with :data:`IGNORE_LABEL` for cases without a mask; ``classes``
    ``(B,)`` int64 image label, -1 unknown. Only binary segmentation
    (background + one foreground class) is supported for image-level cases.
    """

    def __init__(self, model: nn.Module, settings: WeakSettings | None = None) -> None:
        super().__init__()
        self.model = [model]  # a list: not registered as a submodule
        self.s = settings or WeakSettings()
        self.dice = DiceLoss(to_onehot_y=True, softmax=True, batch=False, reduction="none")

    def forward(self, logits: Tensor, target: tuple[Tensor, ...]) -> Tensor:  # noqa: D102
        labels, classes = target[0], target[1]
        weak_view = target[2] if len(target) > 2 else None
        seg_model = cam_segmenter(self.model[0])
        cam = None if seg_model is None else seg_model.last_cam
        if cam is None:
            raise ValueError("WeakSegLoss needs a model with a CAM head (model.weak_head: cam)")
        b = logits.shape[0]
        has_mask = (labels[:, 0, 0, 0] != IGNORE_LABEL).to(logits.dtype)
        known = (classes >= 0).to(logits.dtype)
        pos = ((classes == 1) & (has_mask == 0)).to(logits.dtype)
        neg = ((classes == 0) & (has_mask == 0)).to(logits.dtype)

        safe = labels.clamp_min(0)
        dice = self.dice(logits, safe).flatten(1).mean(dim=1)
        ce = F.cross_entropy(logits, safe[:, 0], reduction="none").flatten(1).mean(dim=1)
        seg = (dice + ce) * has_mask

        img_logit = cam_image_logit(cam, self.s)
        cam_loss = image_label_loss(img_logit, classes.clamp_min(0).to(logits.dtype), self.s) * known

        mil = logits.new_zeros(b)
        if self.s.mil_weight > 0:
            margin = logits[:, 1:].logsumexp(dim=1) - logits[:, 0]  # (B, H, W) fg-vs-bg logit
            mil = image_label_loss(smooth_max(margin, self.s.lse_r), pos, self.s) * (pos + neg)

        bg_ce = pixel_ce(logits, torch.zeros_like(safe[:, 0]), self.s)
        bg_ce = bg_ce.flatten(1).mean(dim=1) * neg
        weak = self.s.neg_weight * bg_ce
        if bool(pos.any()) and self.s.positives:
            weak = weak + pseudo_mask_ce(cam, logits, self.s, seg_model.last_input) * pos
            if self.s.size_prior is not None:
                weak = weak + self.s.size_weight * size_prior_loss(logits, b, self.s.size_prior,
                                                                   self.s) * pos
        total = (seg + self.s.cam_weight * cam_loss + self.s.weak_weight * weak
                 + self.s.mil_weight * mil)
        if self.s.fixmatch and weak_view is not None:
            total = total + self.s.fixmatch_weight * self._fixmatch(logits, weak_view, known, has_mask)
        return total.sum() / b

    def _fixmatch(self, logits: Tensor, weak_view: Tensor, known: Tensor, has_mask: Tensor) -> Tensor:
        """FixMatch (Sohn et al. 2020, NeurIPS) per sample, on unlabeled cases:
        pixels whose prediction on the weakly augmented view is confident
        (max probability >= threshold) become targets for the prediction on
        the strongly augmented view (``logits``); other pixels are ignored."""
        unl = (known == 0) & (has_mask == 0)
        out = logits.new_zeros(logits.shape[0])
        if not bool(unl.any()):
            return out
        idx = unl.nonzero(as_tuple=True)[0]
        with torch.no_grad():
            probs = self.model[0](weak_view[idx]).softmax(dim=1)
        conf, target = probs.max(dim=1)
        keep = (conf >= self.s.fixmatch_threshold).to(logits.dtype)
        ce = pixel_ce(logits[idx], target, self.s)
        return out.index_add(0, idx, (ce * keep).flatten(1).mean(dim=1))
