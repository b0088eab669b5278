"""Simulated scanner / protocol shift (a :class:`~medseg_core.config.ShiftSpec`).

Used by the synthetic and anatomy site generators to give each hospital its
own acquisition: a smooth multiplicative bias field, blur, lower resolution,
a gamma curve, noise and a linear intensity change. Only images are shifted;
masks are only resampled onto the same (native) grid.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from medseg_core.config import ShiftSpec

__all__ = ["apply_shift", "area_resize", "native_size", "resize_mask"]


def native_size(image_size: int, shift: ShiftSpec) -> int:
    """In-plane size of the stored grid: ``round(image_size / downsample)`` (>= 8)."""
    return max(8, round(image_size / shift.downsample))


def area_resize(x: np.ndarray, size: int) -> np.ndarray:
    """Resize the first two axes of ``(H, W)`` or ``(H, W, D)`` to ``(size, size)``.

    Area averaging (anti-aliased) when shrinking, bilinear when growing.
    Deterministic on CPU; uses one torch thread.
    """
    if x.shape[:2] == (size, size):
        return x.astype(np.float32, copy=True)
    vol = x[..., None] if x.ndim == 2 else x
    t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(vol, 2, 0), dtype=np.float32))[:, None]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if size < x.shape[0]:
            out = F.interpolate(t, size=(size, size), mode="area")
        else:
            out = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    finally:
        torch.set_num_threads(before)
    res = np.moveaxis(out[:, 0].numpy(), 0, 2)
    return res[..., 0] if x.ndim == 2 else res


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Resample a binary mask like the image (area fraction >= 0.5), ``uint8``."""
    if mask.shape[:2] == (size, size):
        return mask.astype(np.uint8)
    return (area_resize(mask.astype(np.float32), size) >= 0.5).astype(np.uint8)


def _bias(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Smooth field in [-1, 1] over the first two axes (constant along depth)."""
    coarse = rng.uniform(-1.0, 1.0, size=(4, 4))
    zoom = (shape[0] / 4.0, shape[1] / 4.0)
    field = ndimage.zoom(coarse, zoom, order=3, mode="nearest", grid_mode=True)
    field = field[: shape[0], : shape[1]]
    field = field / max(float(np.abs(field).max()), 1e-6)
    return field if len(shape) == 2 else np.repeat(field[..., None], shape[2], axis=2)


def apply_shift(
    image: np.ndarray, shift: ShiftSpec, rng: np.random.Generator, size: int
) -> np.ndarray:
    """Acquire a high-resolution phantom with a site's scanner.

    Parameters
    ----------
    image
        ``(S, S)`` or ``(S, S, D)`` float, intensities roughly in ``[0, 1]``.
    shift
        The site's shift. Order: bias field (``x * (1 + bias_field * b)``),
        Gaussian blur (``blur_sigma`` px, in-plane), resolution loss (area
        resize to ``size``), gamma on the ``[0, 1]``-normalised image, Gaussian
        noise (``noise_std``), then ``x * intensity_scale + intensity_offset``.
    rng
        Source of the bias field and the noise (consumed in that order).
    size
        Stored in-plane size (see :func:`native_size`).

    Returns
    -------
    np.ndarray
        ``(size, size[, D])`` float32.
    """
    x = image.astype(np.float64, copy=True)
    bias = _bias(x.shape, rng)
    if shift.bias_field > 0:
        x = x * np.clip(1.0 + shift.bias_field * bias, 0.05, None)
    if shift.blur_sigma > 0:
        sigma = (shift.blur_sigma, shift.blur_sigma) + ((0.0,) if x.ndim == 3 else ())
        x = ndimage.gaussian_filter(x, sigma=sigma, mode="nearest")
    x = area_resize(x, size).astype(np.float64)
    if shift.gamma != 1.0:
        lo, hi = float(x.min()), float(x.max())
        if hi > lo:
            x = lo + (hi - lo) * ((x - lo) / (hi - lo)) ** shift.gamma
    noise = rng.normal(0.0, 1.0, size=x.shape)
    if shift.noise_std > 0:
        x = x + shift.noise_std * noise
    x = x * shift.intensity_scale + shift.intensity_offset
    return x.astype(np.float32)
