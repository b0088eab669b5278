"""Segmentation loss: Dice + cross-entropy (MONAI ``DiceCELoss``).

The Dice term follows Milletari et al. 2016 (V-Net, arXiv:1606.04797); the
compound Dice + CE loss is the nnU-Net default (Isensee et al. 2021, Nature
Methods 18:203-211).
"""

from __future__ import annotations

from monai.losses import DiceCELoss
from torch import nn

from medseg_core.errors import ConfigError

__all__ = ["build_loss"]


def build_loss(num_classes: int) -> nn.Module:
    """Dice + cross-entropy on logits.

    Parameters
    ----------
    num_classes
        Number of classes ``K`` including background (>= 2).

    Returns
    -------
    nn.Module
        ``monai.losses.DiceCELoss`` called as ``loss(logits, target)`` with
        ``logits`` (B, K, H, W) float32 and ``target`` (B, 1, H, W) int64 in
        ``[0, K)``; returns a scalar float32 tensor.

    Raises
    ------
    ConfigError
        ``num_classes`` is not an int >= 2.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(
            f"num_classes must be an int >= 2 (background + at least one class), got {num_classes!r}"
        )
    # WARNING: privacy invariant. batch=False (MONAI's default) computes Dice
    # per sample and averages: the loss is a mean of per-sample terms, as
    # DP-SGD's per-sample clipping with loss_reduction="mean" assumes.
    # batch=True would pool Dice over the batch and couple samples' gradients.
    return DiceCELoss(to_onehot_y=True, softmax=True, batch=False, reduction="mean")
