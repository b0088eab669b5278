"""Weak supervision: segmenters trained from image-level labels.

* :mod:`.cam` - CAM pseudo-masks with a refinement step and the joint loss
  (masks where a case has one; image-level labels everywhere else);
* :mod:`.mil` - bags (patient = bag = one DP sample), per-bag gradients
  under Opacus, and the MIL loss (attention or max pooling).
"""

from medseg_core.weak.cam import WeakSegLoss, WeakSettings, pseudo_masks
from medseg_core.weak.mil import (
    BagSet,
    MilLoss,
    bags_from_slices,
    check_bags,
    fold_bag_grad_samples,
)

__all__ = [
    "BagSet",
    "MilLoss",
    "WeakSegLoss",
    "WeakSettings",
    "bags_from_slices",
    "check_bags",
    "fold_bag_grad_samples",
    "pseudo_masks",
]
