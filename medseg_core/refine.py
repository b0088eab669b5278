"""Pixel-adaptive refinement of a probability map by the image's own local affinities.

PAMR (Araslanov & Roth 2020, CVPR, "Single-Stage Semantic Segmentation from
Image Labels"): each pixel's value becomes a weighted mean of its neighbours
(8 directions at each dilation), the weights a softmax over neighbours of
``-|I_j - I_i| / (0.1 * sigma_i)``, with ``sigma_i`` the standard deviation
of the image over pixel ``i``'s neighbours; iterated. Values spread inside
regions of similar intensity and stop at edges: a pixel tends to the mean
of its region, so the rim of a lesion whose core the decoder is sure of
takes the core's value, and isolated speckles are averaged away. No
learned parameters. Used twice: on the weak sites' pseudo-masks during training (``train.weak.refine``, inside the site's
loss) and as post-processing of every prediction that is scored
(``evaluation.refine``, the same for every arm of a comparison).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["pamr"]


def _neighbours(x: Tensor, dilations: tuple[int, ...]) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, C, N, H, W)``: the 8 neighbours at each dilation
    (replicate padding at the border)."""
    pad = max(dilations)
    h, w = x.shape[-2:]
    xp = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    shifts = [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1)
              if (dy, dx) != (0, 0)]
    return torch.stack([xp[..., pad + a:pad + a + h, pad + b:pad + b + w] for a, b in shifts], dim=2)


@torch.no_grad()
def pamr(image: Tensor, prob: Tensor, *, dilations: tuple[int, ...] = (1, 2),
         iterations: int = 10, temperature: float = 0.1) -> Tensor:
    """Refine ``prob`` ``(B, K, H, W)`` with the affinities of ``image`` ``(B, C, H, W)``.

    Parameters
    ----------
    image
        The input the probabilities were predicted from (any intensity scale:
        differences are divided by the local standard deviation).
    prob
        Per-pixel values to refine (e.g. the decoder's foreground probability),
        same ``H, W`` as ``image``.
    dilations
        Neighbour distances in pixels. Small ones for small lesions: on the
        mixed-regime scenario (lesion radius 3-8 px at 64 px) dilations up to 8
        let lesions drain into the organ around them (``benchmarks/pseudo_masks.py``).
    iterations
        Averaging steps.
    temperature
        Scale of the affinity (0.1 in the paper).

    Returns
    -------
    Tensor
        Refined values, same shape as ``prob``; each is a convex combination of
        the input values, so probabilities stay in [0, 1].
    """
    if image.shape[-2:] != prob.shape[-2:] or image.shape[0] != prob.shape[0]:
        raise ValueError(f"pamr: image {tuple(image.shape)} and prob {tuple(prob.shape)} must "
                         "share batch size and H, W")
    if not dilations or min(dilations) < 1:
        raise ValueError(f"pamr: dilations must be positive pixel distances; got {dilations}")
    nb = _neighbours(image.to(prob.dtype), dilations)
    diff = (nb - image.to(prob.dtype)[:, :, None]).abs()
    sigma = nb.std(dim=2, keepdim=True)
    affinity = (-diff / (1e-8 + temperature * sigma)).mean(dim=1, keepdim=True).softmax(dim=2)
    out = prob
    for _ in range(iterations):
        out = (_neighbours(out, dilations) * affinity).sum(dim=2)
    return out
