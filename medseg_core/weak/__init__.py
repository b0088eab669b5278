"""Weak supervision: segmenters trained from image-level labels.

* :mod:`.cam` - the joint loss (masks where a case has one; image-level
  labels everywhere else);
* :mod:`.pseudo` - CAM pseudo-masks with a refinement step, the size
  constraint;
* :mod:`.settings` - :class:`WeakSettings` and the per-sample terms the
  losses share;
* :mod:`.mil` - bags (patient = bag = one DP sample), per-bag gradients
  under Opacus, and the MIL loss (attention or max pooling);
* :mod:`.bag_scores` - the bag-level prediction: the federated MIL head, or
  one a site refits over bottleneck or lesion-map instance embeddings.
"""

from medseg_core.weak.cam import WeakSegLoss
from medseg_core.weak.mil import (
    BagSet,
    MilLoss,
    bags_from_slices,
    check_bags,
    fold_bag_grad_samples,
)
from medseg_core.weak.pseudo import pseudo_masks
from medseg_core.weak.settings import WeakSettings, positives_gate_open

__all__ = [
    "BagSet",
    "MilLoss",
    "WeakSegLoss",
    "WeakSettings",
    "bags_from_slices",
    "check_bags",
    "fold_bag_grad_samples",
    "positives_gate_open",
    "pseudo_masks",
]
