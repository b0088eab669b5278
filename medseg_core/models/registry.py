"""Registry of DP-compatible 2D segmenters (MONAI networks).

Every registered builder returns a network that Opacus can train with
per-sample gradients (Abadi et al. 2016, "Deep Learning with Differential
Privacy", arXiv:1607.00133):

* normalisation is ``nn.GroupNorm`` (Wu & He 2018, arXiv:1803.08494), which
  normalises each sample on its own and keeps no running statistics;
* activations are non-inplace ``LeakyReLU`` -- parameter-free (no PReLU, for
  which Opacus has no hook sampler) and safe under Opacus' full backward hooks
  (an in-place op on a hooked module's output raises in autograd).

This module must not import :mod:`medseg_core.config` at import time: the
config validates ``ModelConfig.name`` against :data:`MODEL_REGISTRY` by
importing this module lazily.
"""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from monai.networks.nets import BasicUNet, UNet
from opacus.utils.module_utils import trainable_modules
from opacus.validators import ModuleValidator
from torch import nn

from medseg_core.adaptation.layers import AdaptedSegmenter
from medseg_core.errors import ConfigError
from medseg_core.models.heads import CamSegmenter, bottleneck_of

if TYPE_CHECKING:
    from medseg_core.config import ModelConfig

__all__ = [
    "MODEL_REGISTRY",
    "build_model",
    "validate_dp_compatible",
]

logger = logging.getLogger(__name__)

SPATIAL_DIMS = 2
# LeakyReLU, not ReLU: no dead units in small federated models; parameter-free.
_ACT: tuple[str, dict[str, object]] = ("leakyrelu", {"negative_slope": 0.1, "inplace": False})
_BASICUNET_LEVELS = 5  # BasicUNet has a fixed 5-level encoder (4 poolings)


# Built with one group (valid for any width), then refitted by _fit_group_norms.
_PLACEHOLDER_NORM: tuple[str, dict[str, object]] = ("group", {"num_groups": 1, "affine": True})


def _fit_group_norms(model: nn.Module, num_groups: int) -> nn.Module:
    """Give every ``GroupNorm`` ``gcd(num_groups, C)`` groups, in place.

    MONAI passes one ``num_groups`` to every norm layer, but some layers are
    narrower than the configured widths (MONAI ``UNet`` normalises its top
    up-convolution over ``out_channels``, i.e. the number of classes). A
    fresh ``GroupNorm`` is an identity map (weight 1, bias 0), so replacing it
    changes nothing but the grouping.
    """
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is nn.GroupNorm:
                groups = math.gcd(num_groups, child.num_channels)
                if groups != num_groups:
                    logger.debug(
                        "GroupNorm over %d channels uses %d groups instead of %d "
                        "(channel count not divisible)",
                        child.num_channels,
                        groups,
                        num_groups,
                    )
                setattr(
                    parent,
                    child_name,
                    nn.GroupNorm(groups, child.num_channels, eps=child.eps, affine=True),
                )
    return model


def _build_unet(cfg: ModelConfig, *, in_channels: int, out_channels: int) -> nn.Module:
    """MONAI ``UNet`` (Kerfoot et al. 2018, residual units; Ronneberger et al. 2015).

    ``cfg.channels`` / ``cfg.strides`` / ``cfg.num_res_units`` / ``cfg.dropout``
    map one-to-one onto MONAI's arguments. The up path uses transposed
    convolutions; :mod:`medseg_core.privacy.grad_samplers` gives Opacus a fast
    per-sample sampler for them.
    """
    model = UNet(
        spatial_dims=SPATIAL_DIMS,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=tuple(cfg.channels),
        strides=tuple(cfg.strides),
        kernel_size=3,
        up_kernel_size=3,
        num_res_units=cfg.num_res_units,
        act=_ACT,
        norm=_PLACEHOLDER_NORM,
        dropout=cfg.dropout,
        bias=True,
    )
    return _fit_group_norms(model, cfg.norm_groups)


def basicunet_features(channels: tuple[int, ...]) -> tuple[int, int, int, int, int, int]:
    """Map ``ModelConfig.channels`` to BasicUNet's six ``features``.

    The first five are the encoder widths: ``channels`` trimmed to five
    entries, or padded by doubling the last width. The sixth (width after the
    last upsampling) is ``channels[0]``.

    Examples
    --------
    >>> basicunet_features((16, 32, 64, 128))
    (16, 32, 64, 128, 256, 16)
    """
    if not channels:
        raise ConfigError("model channels is empty; expected at least one width, e.g. [16, 32, 64, 128]")
    enc = list(channels[:_BASICUNET_LEVELS])
    while len(enc) < _BASICUNET_LEVELS:
        enc.append(enc[-1] * 2)
    return (enc[0], enc[1], enc[2], enc[3], enc[4], channels[0])


def _build_basicunet(cfg: ModelConfig, *, in_channels: int, out_channels: int) -> nn.Module:
    """MONAI ``BasicUNet`` (Falk et al. 2019, Nature Methods 16:67-70).

    ``cfg.channels`` becomes ``features`` via :func:`basicunet_features`;
    ``cfg.strides`` and ``cfg.num_res_units`` do not apply (BasicUNet always
    pools by 2 and uses plain double convolutions). Upsampling is
    ``"nontrainable"`` (1x1 convolution + bilinear interpolation) rather than a
    transposed convolution: cheaper per-sample gradients under DP-SGD and no
    checkerboard artefacts (Odena et al. 2016, Distill).
    """
    model = BasicUNet(
        spatial_dims=SPATIAL_DIMS,
        in_channels=in_channels,
        out_channels=out_channels,
        features=basicunet_features(tuple(cfg.channels)),
        act=_ACT,
        norm=_PLACEHOLDER_NORM,
        bias=True,
        dropout=cfg.dropout,
        upsample="nontrainable",
    )
    return _fit_group_norms(model, cfg.norm_groups)


MODEL_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "unet": _build_unet,
    "basicunet": _build_basicunet,
}
"""Model name -> builder ``(cfg, *, in_channels, out_channels) -> nn.Module``."""


def build_model(cfg: ModelConfig, *, in_channels: int, out_channels: int) -> nn.Module:
    """Build the 2D segmenter named by ``cfg.name``.

    Parameters
    ----------
    cfg
        Architecture settings (:class:`medseg_core.config.ModelConfig`).
    in_channels
        Image channels ``C`` of the input ``(B, C, H, W)`` float32 batch
        (e.g. ``1 + 2 * context_slices``).
    out_channels
        Number of classes ``K`` including background; the model returns
        logits of shape ``(B, K, H, W)``.

    Returns
    -------
    nn.Module
        A network in training mode that passes :func:`validate_dp_compatible`.

    Raises
    ------
    ConfigError
        Unknown model name (valid names and a did-you-mean are listed), a
        non-positive channel count, or a network that is not DP-compatible.
    """
    builder = MODEL_REGISTRY.get(cfg.name)
    if builder is None:
        valid = sorted(MODEL_REGISTRY)
        close = difflib.get_close_matches(str(cfg.name), valid, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"unknown model name {cfg.name!r}; valid names: {valid}{hint}. "
            "Set model.name in the scenario config to one of them."
        )
    for arg, value in (("in_channels", in_channels), ("out_channels", out_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{arg} must be a positive int, got {value!r}")
    model = builder(cfg, in_channels=in_channels, out_channels=out_channels)
    if cfg.weak_head == "cam" or cfg.mil_pooling != "none":
        # CAM head on the encoder bottleneck (weak image-level supervision).
        neck, width = bottleneck_of(model, cfg)
        model = CamSegmenter(model, bottleneck=neck, channels=width, mil_pooling=cfg.mil_pooling)
    if cfg.adaptation in ("adapter", "norm+adapter"):
        # Site-private input adapter (medseg_core.adaptation): identity at init.
        model = AdaptedSegmenter(model, in_channels=in_channels, hidden=cfg.adapter_hidden,
                                 field_grid=cfg.adapter_field_grid, depth=cfg.adapter_depth)
    validate_dp_compatible(model)
    logger.debug(
        "built %s: %d parameters", cfg.name, sum(p.numel() for p in model.parameters())
    )
    return model


def validate_dp_compatible(model: nn.Module) -> None:
    """Check that Opacus can train ``model`` with per-sample gradients.

    Runs the checks of ``opacus.validators.ModuleValidator.validate`` (e.g.
    BatchNorm, InstanceNorm with running stats) on every trainable submodule,
    plus two that Opacus only hits at training time: submodules that hold
    both trainable parameters and buffers, and in-place activations (which
    break Opacus' full backward hooks). The training-mode requirement of
    ``ModuleValidator`` is not checked: this is a structural check, and
    :func:`medseg_core.privacy.engine.make_private` puts the model in training
    mode itself.

    Parameters
    ----------
    model
        Any ``nn.Module``.

    Raises
    ------
    ConfigError
        Listing every problem found, one per line with the submodule's name and
        type, and how to fix it.
    """
    problems: list[str] = []
    # WARNING: privacy invariant. Every module is checked, not only trainable
    # ones (as Opacus does): a parameter-free norm that tracks running stats
    # (e.g. InstanceNorm2d(affine=False, track_running_stats=True)) would
    # export un-noised statistics of the private data.
    for name, sub in model.named_modules():
        validator = ModuleValidator.VALIDATORS.get(type(sub))
        if validator is not None:
            for err in validator(sub):
                problems.append(f"{name or '<root>'} ({type(sub).__name__}): {err}")
    for name, sub in trainable_modules(model):
        buffers = [b for b, _ in sub.named_buffers(recurse=False)]
        if buffers and type(sub) not in ModuleValidator.VALIDATORS:
            problems.append(
                f"{name or '<root>'} ({type(sub).__name__}): trainable module holds "
                f"buffers {buffers}; buffers are not privatised by DP-SGD"
            )
    for name, sub in model.named_modules():
        if getattr(sub, "inplace", False) is True:
            problems.append(
                f"{name or '<root>'} ({type(sub).__name__}): inplace=True breaks Opacus' "
                "backward hooks; construct it with inplace=False"
            )
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(
            f"model {type(model).__name__} is not compatible with DP-SGD "
            f"({len(problems)} problem(s)):\n{listing}\n"
            "Use GroupNorm (or InstanceNorm without running stats) and non-inplace "
            "activations, e.g. via medseg_core.models.build_model, or "
            "opacus.validators.ModuleValidator.fix(model)."
        )
