"""Strong augmentation for FixMatch on z-scored image slices.

FixMatch (Sohn et al. 2020) pairs a weak view (here: the random flips every
training slice gets) with a strong one. For single-channel medical slices
RandAugment's colour operations reduce to intensity changes; the strong view
is a random contrast/brightness change, Gaussian noise, and one Cutout
square (DeVries & Taylor 2017), all applied to the weak view.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["strong_augment"]


def strong_augment(x: Tensor, *, cutout_frac: float = 0.25) -> Tensor:
    """A strongly augmented copy of one ``(C, H, W)`` z-scored slice (global RNG)."""
    gain = 0.7 + 0.6 * torch.rand(())
    shift = -0.3 + 0.6 * torch.rand(())
    out = x * gain + shift + 0.1 * torch.rand(()) * torch.randn_like(x)
    h, w = x.shape[-2:]
    ch, cw = max(1, int(h * cutout_frac)), max(1, int(w * cutout_frac))
    top = int(torch.randint(0, h - ch + 1, ()))
    left = int(torch.randint(0, w - cw + 1, ()))
    out[..., top:top + ch, left:left + cw] = 0.0
    return out
