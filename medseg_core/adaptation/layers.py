"""Site-private input adapter for per-site scanner/protocol shift.

A scanner shift (gain, offset, gamma, bias field, blur, noise) acts on the
image before any anatomy is seen, so the cheapest place to absorb it is at the
input. The adapter has two parts, both zero-initialised at their last layer,
so a fresh adapter is the identity map and a site that has not trained yet
sees exactly the global model:

* a **case-conditional intensity field**: ``x * exp(g) + b``, where the smooth
  log-gain ``g`` and offset ``b`` are predicted from the case's own coarse
  (``field_grid`` x ``field_grid``) local mean and second moment and
  bilinearly upsampled. A multiplicative bias field differs from case to case
  (coil position, patient size), so no fixed per-site filter can undo it;
  after the per-case z-score of loading, a raw-domain gain ``B`` becomes
  exactly such a gain plus offset, which is why both are predicted (the
  retrospective shading-correction model of Likar et al. 2001, learned here
  end to end from the segmentation loss instead of an entropy criterion);
* a **residual block** ``x + conv1x1(act(conv3x3(x)))`` for what is left
  (intensity curve, noise, blur): the residual-adapter idea of Rebuffi et al.
  2017 ("Learning multiple visual domains with residual adapters", NeurIPS),
  applied to the input domain. ``depth`` stacks more 3x3 layers inside it
  (receptive field ``2 * depth + 1``): a wider, deeper block is a small
  learned denoiser, as residual denoisers are built (DnCNN, Zhang et al.
  2017), for a site whose scanner adds more noise than the others'.

Both are DP-compatible (plain convolutions, parameter-free pooling,
interpolation and non-inplace activation), so they train inside the same
Opacus DP-SGD step and accountant as the shared weights; every case's field
depends on that case alone, so per-sample clipping still bounds it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ADAPTER_PREFIX", "AdaptedSegmenter", "InputAdapter"]

ADAPTER_PREFIX = "adapter."
"""State-dict prefix of the input adapter inside :class:`AdaptedSegmenter`."""


class InputAdapter(nn.Module):
    """Intensity field then residual block, identity at initialisation.

    Parameters
    ----------
    channels
        Image channels ``C`` of the ``(B, C, H, W)`` input.
    hidden
        Width of the hidden layers.
    field_grid
        Side of the coarse grid the case-conditional field is predicted on
        (``model.adapter_field_grid``); ``0`` leaves the field out (the
        residual block alone, the adapter before stop 23).
    depth
        3x3 convolutions in the residual block (``model.adapter_depth``).
    """

    def __init__(self, channels: int, hidden: int = 8, field_grid: int = 8,
                 depth: int = 1) -> None:
        super().__init__()
        if field_grid < 0:
            raise ValueError(f"field_grid={field_grid} must be >= 0 (0: no intensity field)")
        if hidden < 1 or depth < 1:
            raise ValueError(f"hidden={hidden} and depth={depth} must both be >= 1")
        self.field_grid = field_grid
        self.conv1 = nn.Conv2d(channels, hidden, kernel_size=3, padding=1)
        self.act = nn.LeakyReLU(0.1, inplace=False)
        self.conv2 = nn.Conv2d(hidden, channels, kernel_size=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        if field_grid:  # created after the residual block: same init draws as field_grid=0
            self.field1 = nn.Conv2d(2 * channels, hidden, kernel_size=3, padding=1)
            self.field2 = nn.Conv2d(hidden, hidden, kernel_size=3, padding=1)
            self.field3 = nn.Conv2d(hidden, 2 * channels, kernel_size=1)
            nn.init.zeros_(self.field3.weight)
            nn.init.zeros_(self.field3.bias)
        # created last: depth 1 draws the same initial weights as before it existed
        self.deeper = nn.ModuleList(nn.Conv2d(hidden, hidden, kernel_size=3, padding=1)
                                    for _ in range(depth - 1))

    def field(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-gain and offset maps ``(B, C, H, W)`` each, for the cases in ``x``."""
        g = self.field_grid
        coarse = torch.cat([F.adaptive_avg_pool2d(x, g), F.adaptive_avg_pool2d(x * x, g)], dim=1)
        f = self.field3(self.act(self.field2(self.act(self.field1(coarse)))))
        f = F.interpolate(f, size=x.shape[-2:], mode="bilinear", align_corners=False)
        gain, offset = f.chunk(2, dim=1)
        return gain, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.field_grid:
            gain, offset = self.field(x)
            x = x * torch.exp(gain) + offset
        h = self.act(self.conv1(x))
        for conv in self.deeper:
            h = self.act(conv(h))
        return x + self.conv2(h)


class AdaptedSegmenter(nn.Module):
    """A segmenter with a site-private :class:`InputAdapter` in front.

    State-dict keys: ``adapter.*`` (site-private) and ``net.*`` (the
    segmenter, shared except for what the adaptation mode keeps local).
    """

    def __init__(self, net: nn.Module, *, in_channels: int, hidden: int = 8,
                 field_grid: int = 8, depth: int = 1) -> None:
        super().__init__()
        self.adapter = InputAdapter(in_channels, hidden, field_grid, depth)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.net(self.adapter(x))
