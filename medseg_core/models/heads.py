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

__all__ = ["CamSegmenter", "MilHead", "bottleneck_of", "cam_segmenter", "encoder_decoder_names",
           "last_cam"]


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


def encoder_decoder_names(model: nn.Module) -> tuple[frozenset[str], frozenset[str]]:
    """Parameter names (as ``model.named_parameters()`` gives them) of the
    segmentation network's encoder (down-path and bottleneck) and decoder
    (up-path and output convolution). Heads and adaptation layers are in
    neither.

    MONAI's ``UNet`` nests every level as ``Sequential(down, SkipConnection(
    deeper levels), up)``: the decoder is the third block of each. In
    ``BasicUNet`` it is ``upcat_4`` ... ``upcat_1`` and ``final_conv``.

    Raises
    ------
    ValueError
        ``model`` holds no MONAI ``UNet`` / ``BasicUNet``.
    """
    nets = [m for m in model.modules() if isinstance(m, UNet | BasicUNet)]
    if not nets:
        raise ValueError(f"no MONAI UNet or BasicUNet in {type(model).__name__}: no encoder/decoder split")
    net = nets[0]
    if isinstance(net, UNet):
        ups = [s[2] for s in net.modules()
               if isinstance(s, nn.Sequential) and len(s) == 3 and isinstance(s[1], SkipConnection)]
    else:
        ups = [net.upcat_4, net.upcat_3, net.upcat_2, net.upcat_1, net.final_conv]
    up_ids = {id(p) for u in ups for p in u.parameters()}
    net_ids = {id(p) for p in net.parameters()}
    named = list(model.named_parameters())
    return (frozenset(n for n, p in named if id(p) in net_ids and id(p) not in up_ids),
            frozenset(n for n, p in named if id(p) in up_ids))


class CamSegmenter(nn.Module):
    """A segmenter plus a CAM head on its encoder bottleneck.

    ``forward(x)`` returns the segmentation logits ``(B, K, H, W)`` and
    leaves the CAM logits ``(B, 1, h, w)`` (bottleneck resolution) in
    :attr:`last_cam`.
    """

    def __init__(self, net: nn.Module, *, bottleneck: nn.Module, channels: int,
                 mil_pooling: str = "none") -> None:
        super().__init__()
        self.net = net
        self.cam_head = nn.Conv2d(channels, 1, kernel_size=1)
        self.mil_head = MilHead(channels, pooling=mil_pooling) if mil_pooling != "none" else None
        self.last_cam: torch.Tensor | None = None
        self.last_input: torch.Tensor | None = None  # the weak loss refines pseudo-masks with it
        self.last_features: torch.Tensor | None = None
        self._features: torch.Tensor | None = None
        bottleneck.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self._features = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        seg = self.net(x)
        self.last_input = x
        if self._features is None:  # pragma: no cover - the hook always fires
            raise RuntimeError("the bottleneck hook did not fire")
        self.last_cam = self.cam_head(self._features)
        self.last_features, self._features = self._features, None
        return seg


def cam_segmenter(model: nn.Module) -> CamSegmenter | None:
    """The :class:`CamSegmenter` inside ``model`` (plain, adapted or
    Opacus-wrapped), or None."""
    for m in model.modules():
        if isinstance(m, CamSegmenter):
            return m
    return None


def last_cam(model: nn.Module) -> torch.Tensor | None:
    """The CAM of the last forward pass of ``model``, or None if it has no CAM head."""
    m = cam_segmenter(model)
    return None if m is None else m.last_cam


class MilHead(nn.Module):
    """Bag classifier over instance embeddings (multiple-instance learning).

    ``pooling="attention"``: gated attention pooling (Ilse, Tomczak & Welling
    2018, "Attention-based Deep Multiple Instance Learning", ICML, eq. 9):
    ``a_k = softmax_k(w^T (tanh(V h_k) * sigmoid(U h_k)))``, ``z = sum_k a_k h_k``,
    bag logit ``= c^T z + b``. ``pooling="max"``: the baseline, bag logit
    ``= max_k (c^T h_k + b)``.

    Instances are rows of ``h``; a bag is ``K`` consecutive rows. Every layer
    is a ``Linear`` applied row-wise, so Opacus computes per-row gradients
    that :func:`medseg_core.weak.mil.fold_bag_grad_samples` sums per bag.
    """

    def __init__(self, channels: int, *, pooling: str = "attention", hidden: int = 32) -> None:
        super().__init__()
        if pooling not in ("attention", "max"):
            raise ValueError(f"unknown MIL pooling {pooling!r}; valid: ['attention', 'max']")
        self.pooling, self.hidden = pooling, hidden
        self.classifier = nn.Linear(channels, 1)
        if pooling == "attention":
            self.att_v = nn.Linear(channels, hidden)
            self.att_u = nn.Linear(channels, hidden)
            self.att_w = nn.Linear(hidden, 1)

    def forward(self, h: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bag logits ``(B,)`` and instance weights ``(B, K)`` (attention, or
        a one-hot of the arg-max instance).

        Parameters
        ----------
        h
            ``(B * K, C)`` instance embeddings, bag-major.
        valid
            ``(B, K)`` bool: real instances (False: padding).
        """
        b, k = valid.shape
        neg = torch.finfo(h.dtype).min
        if self.pooling == "attention":
            gate = torch.tanh(self.att_v(h)) * torch.sigmoid(self.att_u(h))
            scores = self.att_w(gate).view(b, k).masked_fill(~valid, neg)
            att = scores.softmax(dim=1)
            z = (att.unsqueeze(-1) * h.view(b, k, h.shape[-1])).sum(dim=1)
            return self.classifier(z).squeeze(-1), att
        inst = self.classifier(h).view(b, k).masked_fill(~valid, neg)
        top = inst.argmax(dim=1)
        return inst.amax(dim=1), torch.nn.functional.one_hot(top, k).to(h.dtype)
