"""CAM pseudo-masks of image-level positives, and the size constraint.

The joint loss of :mod:`medseg_core.weak.cam` (and the MIL loss of
:mod:`medseg_core.weak.mil`) trains the decoder on an image-level positive
against the pseudo-mask built here, on the pixels it is sure of
(:func:`pseudo_mask_ce`), and optionally against the size constraint of
:func:`size_prior_loss`. Their options are fields of
:class:`medseg_core.weak.settings.WeakSettings`.

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

import torch
import torch.nn.functional as F
from torch import Tensor

from medseg_core.data.slices import IGNORE_LABEL
from medseg_core.refine import pamr
from medseg_core.weak.settings import WeakSettings, pixel_ce

__all__ = ["blob_map", "difference_of_gaussians", "pseudo_mask_ce", "pseudo_masks", "size_prior_loss"]


def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of ``(B, 1, H, W)`` (reflect padding, 3 sigma)."""
    r = max(1, int(math.ceil(3.0 * sigma)))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))


def difference_of_gaussians(image: Tensor, sigmas: tuple[float, float]) -> Tensor:
    """Signed ``G(s1) * x - G(s2) * x`` ``(B, 1, H, W)`` of the centre channel of
    ``image`` ``(B, C, H, W)``, in its own (z-scored) units: positive on bright
    blobs of about the scale between the two widths, negative on dark ones (the
    classic scale-space approximation of the Laplacian of Gaussian, Lindeberg 1998)."""
    x = image[:, image.shape[1] // 2:image.shape[1] // 2 + 1]
    if min(x.shape[-2:]) <= 3.0 * sigmas[1]:
        raise ValueError(f"image {tuple(x.shape[-2:])} too small for blob_sigmas {list(sigmas)}; "
                         "fix: smaller train.weak.blob_sigmas")
    return _gaussian_blur(x, sigmas[0]) - _gaussian_blur(x, sigmas[1])


@torch.no_grad()
def blob_map(image: Tensor, threshold: float, sigmas: tuple[float, float] = (1.0, 4.0),
             dilate: int = 2) -> Tensor:
    """Pixels of focal intensity abnormalities, bright or dark:
    ``|difference_of_gaussians| > threshold``, grown by ``dilate`` px.
    Returns ``(B, 1, H, W)`` bool."""
    dog = difference_of_gaussians(image, sigmas).abs() > threshold
    if dilate > 0:
        dog = F.max_pool2d(dog.to(image.dtype), 2 * dilate + 1, stride=1, padding=dilate) > 0
    return dog


@torch.no_grad()
def pseudo_masks(
    cam: Tensor, seg_logits: Tensor, s: WeakSettings, *, cam_flipped: Tensor | None = None,
    image: Tensor | None = None, grow_steps: int = 16,
) -> Tensor:
    """Refined pseudo-masks of positive images.

    With ``cam_bootstrap``, a positive image on which the decoder predicts no
    foreground pixel at all has nothing to agree with: its CAM region
    (``>= tau_fg * max``) alone is taken as foreground. Without it such an
    image only contributes background (its CAM-low pixels). Measured on the
    mixed-regime scenario under DP it did not stop the weak arm collapsing
    to empty predictions (docs/results-log.md), so it is off by default.

    With ``pseudo_fg="decoder"`` the foreground is the decoder's own most
    lesion-like region instead: pixels whose foreground probability is at
    least ``tau_fg`` times the image's maximum and at least ``fg_floor``
    (an adaptive, per-image threshold on the decoder rather than on the
    CAM). It exists because, measured on the mixed-regime scenario under DP,
    the bottleneck CAM (1/8 resolution, lesions of 2.5 % of the image) did
    not localise: its ``>= 0.5 * max`` region had Dice 0.01-0.12 with the
    lesions, so "CAM agrees" left almost no foreground (recall 0-1 %), while
    the decoder's top region had precision 0.55-0.80 (docs/results-log.md).

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

    With ``bg_source="decoder"`` the CAM has no say in the background: a
    positive's pixels are background where the (refined) decoder probability
    is below ``bg_max_p`` (0.2 if unset), and only in an image where the
    decoder has found a lesion (``p >= 0.5`` somewhere); a positive on which
    it finds none gets no background at all (the label says a lesion is
    there, so no pixel is known to be background). Measured on stop 11's
    selected checkpoint of the mixed-regime scenario (seed 1, no DP;
    ``benchmarks/pseudo_masks.py``), the bottleneck CAM classified
    (image AUC 0.79-0.86) but did not localise: its maximum lay within 3 px
    of a lesion in 23-29 % of positives and its ``>= 0.5 * max`` region had
    Dice 0.11-0.14 with the lesions; its low region reaches into lesions
    (29-41 % of lesion pixels, above) wherever its maximum is elsewhere.

    With ``bg_blob`` set (needs ``image``), a positive's pixels inside an image
    blob are never pseudo-background, whatever the CAM or the decoder says:
    :func:`blob_map`, ``|difference of Gaussians| > bg_blob`` at widths
    ``blob_sigmas`` (the input is z-scored per case, so the threshold is in
    its standard deviations), grown by ``blob_dilate`` px. Lesions are focal
    intensity abnormalities, brighter or darker than their surround; the
    rules above cannot tell a lesion the decoder misses from background, and
    the CAM-low rule taught the bright lesions (25 % of the synthetic ones)
    as background until the shared decoder detected none of them at any
    site (docs/results-log.md). On the mixed-regime scenario's test
    splits the blob map at threshold 0.5 covers most lesion pixels and a
    small share of all pixels (``benchmarks/weak_rules.py`` prints both).

    With ``fg_max_fraction`` set, an image whose pseudo-foreground covers
    more than that fraction of it gets none (those pixels are ignored, not
    background): a lesion-sized region is plausible, half the image is not.
    An untrained decoder says p ~ 0.5 everywhere; taken as foreground, that
    flooded the weak arm under DP from round 1 (docs/results-log.md).

    Trained with, neither the decoder source nor growing beat the agreement
    rule on the mixed-regime scenario (docs/results-log.md: growing
    destabilised training, at ``grow=0.1`` it flooded the image while the
    decoder was untrained); both are off by default.

    Parameters
    ----------
    cam
        ``(B, 1, h, w)`` CAM logits of the images.
    seg_logits
        ``(B, K, H, W)`` decoder logits.
    s
        The thresholds and options above: ``tau_fg``, ``tau_bg``,
        ``cam_bootstrap``, ``pseudo_fg``, ``fg_floor``, ``grow``,
        ``bg_margin``, ``refine``, ``pamr_dilations``, ``pamr_iterations``,
        ``bg_max_p``, ``bg_source``, ``bg_blob``, ``blob_sigmas``, ``blob_dilate``,
        ``fg_max_fraction`` (no other field is read).
    cam_flipped
        CAM of the horizontally flipped images (flipped back inside), or None.
    image
        ``(B, C, H, W)`` input images (needed with ``refine="pamr"`` and ``bg_blob``), or None.
    grow_steps
        At most this many rings are grown (with ``s.grow`` set).

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
    if s.refine == "pamr":
        if image is None:
            raise ValueError("pseudo_masks(refine='pamr') needs the input images")
        p_fg = pamr(image, p_fg, dilations=s.pamr_dilations, iterations=s.pamr_iterations)
    elif s.refine != "none":
        raise ValueError(f"unknown pseudo-mask refinement {s.refine!r}; valid: ['none', 'pamr']")
    out = torch.full_like(rel, IGNORE_LABEL, dtype=torch.int64)
    if s.bg_source == "cam":
        background = rel < s.tau_bg
        if s.bg_max_p is not None:
            background = background & (p_fg < s.bg_max_p)
    elif s.bg_source == "decoder":
        found = (p_fg >= 0.5).flatten(1).any(dim=1)[:, None, None, None]
        background = (p_fg < (0.2 if s.bg_max_p is None else s.bg_max_p)) & found
    else:
        raise ValueError(f"unknown pseudo-background source {s.bg_source!r}; valid: ['cam', 'decoder']")
    if s.bg_blob is not None:
        if image is None:
            raise ValueError("pseudo_masks(bg_blob=...) needs the input images")
        background = background & ~blob_map(image, s.bg_blob, s.blob_sigmas, s.blob_dilate)
    if s.bg_margin > 0:
        near = F.max_pool2d((p_fg >= 0.5).to(p_fg.dtype), 2 * s.bg_margin + 1, stride=1,
                            padding=s.bg_margin) > 0
        background = background & ~near
    out[background] = 0
    if s.pseudo_fg == "decoder":
        p_max = p_fg.flatten(1).amax(dim=1)[:, None, None, None]
        fg = (p_fg >= s.tau_fg * p_max) & (p_fg >= s.fg_floor)
    elif s.pseudo_fg == "agree":
        fg = p_fg >= 0.5
        if s.cam_bootstrap:
            silent = ~fg.flatten(1).any(dim=1)  # the decoder finds nothing in the image
            fg = fg | silent[:, None, None, None]
        fg = fg & (rel >= s.tau_fg)
    else:
        raise ValueError(f"unknown pseudo-foreground source {s.pseudo_fg!r}; valid: ['agree', 'decoder']")
    if s.grow is not None:
        allowed = (p_fg >= s.grow) & (rel >= s.tau_bg)
        for _ in range(grow_steps):
            grown = fg | (F.max_pool2d(fg.to(p_fg.dtype), 3, stride=1, padding=1) > 0) & allowed
            if torch.equal(grown, fg):
                break
            fg = grown
    if s.fg_max_fraction is not None:
        implausible = fg.flatten(1).float().mean(dim=1) > s.fg_max_fraction
        fg = fg & ~implausible[:, None, None, None]
    out[fg] = 1
    return out


def pseudo_mask_ce(cam: Tensor, logits: Tensor, s: WeakSettings,
                   image: Tensor | None = None) -> Tensor:
    """Per image ``(N,)``: cross-entropy against the refined CAM pseudo-mask
    (:func:`pseudo_masks`), averaged over the pixels it is sure of. ``image``:
    the model's input (needed with ``refine="pamr"``)."""
    pseudo = pseudo_masks(cam.detach(), logits.detach(), s,
                          image=None if image is None else image.detach())
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
