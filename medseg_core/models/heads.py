"""Heads on a segmenter's encoder: the class-activation-map (CAM) head.

:class:`CamSegmenter` puts a 1x1 convolution on the encoder bottleneck of a
MONAI segmenter. Its output is a class activation map (Zhou et al. 2016,
"Learning Deep Features for Discriminative Localization", CVPR): global
average pooling of the map is the image-level logit (GAP-then-linear equals
linear-then-GAP), and the map itself localises what drove the decision. It
is trained on image-level labels and turned into pseudo-masks for the
segmentation decoder (:mod:`medseg_core.weak`).

The head is a plain ``Conv2d`` on the same forward pass, so Opacus computes
its per-sample gradients with the rest of the network.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from monai.networks.layers.simplelayers import SkipConnection
from monai.networks.nets import BasicUNet, UNet
from torch import nn

if TYPE_CHECKING:
    from medseg_core.config import ModelConfig

__all__ = ["CamSegmenter", "bottleneck_of", "last_cam"]


def bottleneck_of(net: nn.Module, cfg: ModelConfig) -> tuple[nn.Module, int]:
    """The encoder's deepest block of a registered MONAI network and its width.

    Raises
    ------
    ValueError
        ``net`` is not a MONAI ``UNet`` / ``BasicUNet``.
    """
    if isinstance(net, UNet):
        skips = [m for m in net.modules() if isinstance(m, SkipConnection)]
        return skips[-1].submodule, int(cfg.channels[-1])
    if isinstance(net, BasicUNet):
        from medseg_core.models.registry import basicunet_features

        return net.down_4, basicunet_features(tuple(cfg.channels))[4]
    raise ValueError(
        f"no CAM head for {type(net).__name__}; supported: MONAI UNet and BasicUNet"
    )


class CamSegmenter(nn.Module):
    """A segmenter plus a CAM head on its encoder bottleneck.

    ``forward(x)`` returns the segmentation logits ``(B, K, H, W)`` and
    leaves the CAM logits ``(B, 1, h, w)`` (bottleneck resolution) in
    :attr:`last_cam`.
    """

    def __init__(self, net: nn.Module, *, bottleneck: nn.Module, channels: int) -> None:
        super().__init__()
        self.net = net
        self.cam_head = nn.Conv2d(channels, 1, kernel_size=1)
        self.last_cam: torch.Tensor | None = None
        self._features: torch.Tensor | None = None
        bottleneck.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self._features = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        seg = self.net(x)
        if self._features is None:  # pragma: no cover - the hook always fires
            raise RuntimeError("the bottleneck hook did not fire")
        self.last_cam = self.cam_head(self._features)
        self._features = None
        return seg


def last_cam(model: nn.Module) -> torch.Tensor | None:
    """The CAM of the last forward pass of ``model`` (plain, adapted or
    Opacus-wrapped), or None if it has no CAM head."""
    for m in model.modules():
        if isinstance(m, CamSegmenter):
            return m.last_cam
    return None
