"""Joint mask + image-level training with CAM pseudo-masks.

Per sample, in one batch (every term depends on that sample only, so the
batch loss is a mean of per-sample losses, as DP-SGD requires):

* a case **with a mask**: Dice + cross-entropy (the spine's loss);
* every case **with an image-level class** (masks included): binary
  cross-entropy of the CAM head's image logit (global average or smooth
  max of the CAM, ``cam_pooling``; :class:`medseg_core.models.heads.CamSegmenter`);
* an image-level **negative**: its mask is known exactly (all background):
  cross-entropy against background;
* an image-level **positive**: cross-entropy against a refined CAM
  pseudo-mask on the pixels the pseudo-mask is sure of (the refinement
  rules: :mod:`medseg_core.weak.pseudo`);
* optionally (``mil_weight > 0``; off by default, it hurt in our runs) the
  MIL constraint below on both.

MIL constraint (pixels as instances, the image as the bag; Pathak et al.
2015, "Fully Convolutional Multi-Class Multiple Instance Learning", ICLR
workshop): a log-sum-exp (smooth max, Pinheiro & Collobert 2015, CVPR) of
the decoder's foreground-vs-background logit must say "lesion somewhere" for
positives and "nowhere" for negatives.

The pseudo-mask rules (:func:`medseg_core.weak.pseudo.pseudo_masks`) and
the size constraint live in :mod:`medseg_core.weak.pseudo`, the settings and
the shared per-sample terms in :mod:`medseg_core.weak.settings`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import Tensor, nn

from medseg_core.data.slices import IGNORE_LABEL
from medseg_core.models.heads import cam_segmenter
from medseg_core.weak.pseudo import pseudo_mask_ce, size_prior_loss
from medseg_core.weak.settings import (
    WeakSettings,
    cam_image_logit,
    image_label_loss,
    pixel_ce,
    smooth_max,
)

__all__ = ["WeakSegLoss"]


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
