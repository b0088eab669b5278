"""Intensity augmentation against scanner/protocol shift, per training sample.

nnU-Net's default intensity augmentations (Isensee et al. 2021, Nature
Methods; batchgenerators' probabilities), built from MONAI transforms:
Gaussian noise (p 0.1), Gaussian blur (p 0.2, sigma 0.5-1), brightness
(multiplicative, p 0.15), contrast (about the mean, range preserved,
p 0.15), simulated low resolution (p 0.25, zoom 0.5-1), gamma (p 0.3, and
p 0.1 on the inverted image, statistics retained). Each image (or MIL bag,
whose slices are the channels and so share one draw) gets its own draw; the
transforms act on one sample at a time, so DP-SGD's per-sample unit holds.
A federation whose sites' scanners differ needs the model to meet their
differences in training; a site never shows its images to another, so a
site that holds masks can only meet the others' contrasts this way.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.transforms import (
    Compose,
    RandAdjustContrast,
    RandGaussianNoise,
    RandGaussianSmooth,
    RandScaleIntensity,
    RandScaleIntensityFixedMean,
    RandSimulateLowResolution,
)
from monai.utils import convert_to_tensor
from torch import Tensor

__all__ = ["intensity_augmentation"]


def intensity_augmentation(seed: int) -> Callable[[Tensor], Tensor]:
    """A per-sample intensity augmentation ``(C, H, W) -> (C, H, W)``,
    seeded (the same seed draws the same sequence of transforms)."""
    chain = Compose([
        RandGaussianNoise(prob=0.1, mean=0.0, std=0.1),
        RandGaussianSmooth(sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0), prob=0.2),
        RandScaleIntensity(factors=0.25, prob=0.15),
        RandScaleIntensityFixedMean(factors=0.25, prob=0.15, preserve_range=True),
        RandSimulateLowResolution(prob=0.25, zoom_range=(0.5, 1.0), upsample_mode="bilinear"),
        RandAdjustContrast(prob=0.1, gamma=(0.7, 1.5), invert_image=True, retain_stats=True),
        RandAdjustContrast(prob=0.3, gamma=(0.7, 1.5), retain_stats=True),
    ])
    chain.set_random_state(seed=seed % (2**32))

    def apply(x: Tensor) -> Tensor:
        if x.ndim != 3:
            raise ValueError(f"intensity augmentation takes one (C, H, W) sample; got shape "
                             f"{tuple(x.shape)}")
        out = convert_to_tensor(chain(x), track_meta=False, dtype=torch.float32)
        return out.contiguous()

    return apply
