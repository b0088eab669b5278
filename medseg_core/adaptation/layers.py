"""Residual input adapter for per-site scanner/protocol shift.

A scanner shift (gain, offset, gamma, bias field, blur) acts on the image
before any anatomy is seen, so the cheapest place to absorb it is a small
residual block at the input (the residual-adapter idea of Rebuffi et al. 2017,
"Learning multiple visual domains with residual adapters", NeurIPS, applied
to the input domain). The last convolution is zero-initialised, so a fresh
adapter is the identity map and a site that has not trained yet sees exactly
the global model.

Both modules are DP-compatible (plain convolutions, parameter-free
non-inplace activation), so they train inside the same Opacus DP-SGD step
and accountant as the shared weights.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ADAPTER_PREFIX", "AdaptedSegmenter", "InputAdapter"]

ADAPTER_PREFIX = "adapter."
"""State-dict prefix of the input adapter inside :class:`AdaptedSegmenter`."""


class InputAdapter(nn.Module):
    """``x + conv1x1(act(conv3x3(x)))``, identity at initialisation.

    Parameters
    ----------
    channels
        Image channels ``C`` of the ``(B, C, H, W)`` input.
    hidden
        Width of the hidden layer.
    """

    def __init__(self, channels: int, hidden: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, hidden, kernel_size=3, padding=1)
        self.act = nn.LeakyReLU(0.1, inplace=False)
        self.conv2 = nn.Conv2d(hidden, channels, kernel_size=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x + self.conv2(self.act(self.conv1(x)))


class AdaptedSegmenter(nn.Module):
    """A segmenter with a site-private :class:`InputAdapter` in front.

    State-dict keys: ``adapter.*`` (site-private) and ``net.*`` (the
    segmenter, shared except for what the adaptation mode keeps local).
    """

    def __init__(self, net: nn.Module, *, in_channels: int, hidden: int = 8) -> None:
        super().__init__()
        self.adapter = InputAdapter(in_channels, hidden)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.net(self.adapter(x))
