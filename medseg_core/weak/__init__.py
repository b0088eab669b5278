"""Weak supervision: segmenters trained from image-level labels.

* :mod:`.cam` - CAM pseudo-masks with a refinement step and the joint loss
  (masks where a case has one; image-level labels everywhere else).
"""

from medseg_core.weak.cam import WeakSegLoss, WeakSettings, pseudo_masks

__all__ = ["WeakSegLoss", "WeakSettings", "pseudo_masks"]
