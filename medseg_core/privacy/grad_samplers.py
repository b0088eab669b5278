"""Per-sample gradient samplers for convolutions, registered with Opacus.

Opacus' hook mode computes per-sample gradients with one hand-written
function per layer type (Yousefpour et al. 2021, "Opacus: User-Friendly
Differential Privacy Library in PyTorch", arXiv:2109.12298). Two gaps matter
for the U-Nets in :mod:`medseg_core.models`:

* ``nn.ConvTranspose{1,2,3}d`` (MONAI ``UNet``'s up path) has no sampler, so
  Opacus falls back to ``torch.func.vmap`` over the layer -- correct, but it
  re-runs the layer once per sample.
* The stock ``nn.Conv{1,2,3}d`` sampler materialises ``unfold(x)``, a copy of
  the activations ``k**d`` times larger (9x for 3x3 kernels), then contracts it
  with an einsum. On CPU with wide feature maps this dominates the DP step.

Both are replaced here by one idea (Rochette et al. 2019, "Efficient
Per-Example Gradient Computations in Convolutional Neural Networks",
arXiv:1912.06015): fold the batch into the channel axis and ask the
convolution backend for the *weight* gradient of a grouped convolution with
``groups = B * layer.groups``. Group ``b`` sees only sample ``b``, so the
grouped weight gradient, reshaped to ``(B, *weight.shape)``, is exactly the
stack of per-sample weight gradients. The backend's weight-gradient kernel
(oneDNN / cuDNN) does the work without the unfold copy.

The samplers are registered when :mod:`medseg_core.privacy` is imported.
:func:`opacus_default_samplers` temporarily restores Opacus' own choices
(used by the benchmark and the tests to compare both).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from opacus.grad_sample import GradSampleHooks, GradSampleHooksFastGradientClipping
from opacus.grad_sample.conv import compute_conv_grad_sample as _opacus_conv_grad_sample
from opacus.grad_sample.utils import register_grad_sampler
from torch import Tensor, nn

__all__ = [
    "CONV_TYPES",
    "CONV_TRANSPOSE_TYPES",
    "compute_conv_grad_sample",
    "compute_conv_transpose_grad_sample",
    "opacus_default_samplers",
    "register_grad_samplers",
]

logger = logging.getLogger(__name__)

CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSE_TYPES: tuple[type[nn.Module], ...] = (
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)

# The ghost-clipping hooks inherit the same dict today; dedupe in case a
# later Opacus gives them their own table.
_SAMPLER_TABLES = tuple(
    {
        id(t): t
        for t in (GradSampleHooks.GRAD_SAMPLERS, GradSampleHooksFastGradientClipping.GRAD_SAMPLERS)
    }.values()
)


def _grouped_weight_grad(
    activations: Tensor,
    backprops: Tensor,
    weight: Tensor,
    *,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    transposed: bool,
    output_padding: Sequence[int],
) -> Tensor:
    """Per-sample weight gradients through one grouped convolution backward.

    Parameters
    ----------
    activations
        Layer input, shape ``(B, C_in, *spatial_in)``.
    backprops
        Gradient of the loss w.r.t. the layer output, shape
        ``(B, C_out, *spatial_out)``, already scaled by Opacus for the loss
        reduction.
    weight
        The layer weight: ``(C_out, C_in/groups, *k)`` for a convolution,
        ``(C_in, C_out/groups, *k)`` for a transposed convolution.

    Returns
    -------
    Tensor
        Shape ``(B, *weight.shape)``, dtype of ``backprops``.
    """
    n = activations.shape[0]
    x = activations.reshape(1, n * activations.shape[1], *activations.shape[2:])
    g = backprops.reshape(1, n * backprops.shape[1], *backprops.shape[2:])
    # Only the weight's shape is read when grad_input is not requested; an
    # expanded view avoids materialising B copies of the weight.
    w = weight.detach().unsqueeze(0).expand(n, *weight.shape)
    w = w.reshape(n * weight.shape[0], *weight.shape[1:])
    _, grad_w, _ = torch.ops.aten.convolution_backward(
        g,
        x,
        w,
        None,
        list(stride),
        list(padding),
        list(dilation),
        transposed,
        list(output_padding),
        n * groups,
        [False, True, False],
    )
    return grad_w.reshape(n, *weight.shape)


def compute_conv_grad_sample(
    layer: nn.Conv1d | nn.Conv2d | nn.Conv3d,
    activations: list[Tensor],
    backprops: Tensor,
) -> dict[nn.Parameter, Tensor]:
    """Per-sample gradients of ``nn.Conv{1,2,3}d`` (grouped-backward trick).

    Parameters
    ----------
    layer
        The convolution.
    activations
        ``[x]`` with ``x`` of shape ``(B, C_in, *spatial_in)``.
    backprops
        Shape ``(B, C_out, *spatial_out)``.

    Returns
    -------
    dict
        ``weight -> (B, C_out, C_in/groups, *k)`` and, with a trainable bias,
        ``bias -> (B, C_out)``.

    Notes
    -----
    String paddings (``"same"`` / ``"valid"``) and empty batches are delegated
    to Opacus' own sampler.
    """
    x = activations[0].to(backprops.dtype)
    if x.shape[0] == 0 or isinstance(layer.padding, str):
        return _opacus_conv_grad_sample(layer, activations, backprops)
    padding: Sequence[int] = layer.padding
    if layer.padding_mode != "zeros":
        # Mirror nn.ConvNd._conv_forward: explicit pad, then an unpadded conv.
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        padding = (0,) * len(layer.kernel_size)
    ret: dict[nn.Parameter, Tensor] = {}
    if layer.weight.requires_grad:
        ret[layer.weight] = _grouped_weight_grad(
            x,
            backprops,
            layer.weight,
            stride=layer.stride,
            padding=padding,
            dilation=layer.dilation,
            groups=layer.groups,
            transposed=False,
            output_padding=(0,) * len(layer.kernel_size),
        )
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = backprops.flatten(2).sum(dim=2)
    return ret


def compute_conv_transpose_grad_sample(
    layer: nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d,
    activations: list[Tensor],
    backprops: Tensor,
) -> dict[nn.Parameter, Tensor]:
    """Per-sample gradients of ``nn.ConvTranspose{1,2,3}d``.

    Parameters
    ----------
    layer
        The transposed convolution (``padding_mode="zeros"``, the only mode
        PyTorch supports for it).
    activations
        ``[x]`` with ``x`` of shape ``(B, C_in, *spatial_in)``.
    backprops
        Shape ``(B, C_out, *spatial_out)``.

    Returns
    -------
    dict
        ``weight -> (B, C_in, C_out/groups, *k)`` and, with a trainable bias,
        ``bias -> (B, C_out)``.

    Notes
    -----
    The output padding is recovered from the actual output shape, so calls
    with an explicit ``output_size=`` are handled too.
    """
    x = activations[0].to(backprops.dtype)
    n = x.shape[0]
    ret: dict[nn.Parameter, Tensor] = {}
    if n == 0:
        ret[layer.weight] = torch.zeros_like(layer.weight).unsqueeze(0)
        if layer.bias is not None and layer.bias.requires_grad:
            ret[layer.bias] = torch.zeros_like(layer.bias).unsqueeze(0)
        return ret
    output_padding = [
        out - ((inp - 1) * s - 2 * p + d * (k - 1) + 1)
        for out, inp, s, p, d, k in zip(
            backprops.shape[2:],
            x.shape[2:],
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.kernel_size,
            strict=True,
        )
    ]
    if layer.weight.requires_grad:
        ret[layer.weight] = _grouped_weight_grad(
            x,
            backprops,
            layer.weight,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=layer.groups,
            transposed=True,
            output_padding=output_padding,
        )
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = backprops.flatten(2).sum(dim=2)
    return ret


_OURS = {
    **{t: compute_conv_grad_sample for t in CONV_TYPES},
    **{t: compute_conv_transpose_grad_sample for t in CONV_TRANSPOSE_TYPES},
}


def register_grad_samplers() -> None:
    """Register this module's samplers with Opacus (idempotent).

    Affects every Opacus ``GradSampleModule`` created afterwards in this
    process, in ``hooks`` and ``ghost`` modes (``functorch`` mode ignores
    registered samplers by design).
    """
    register_grad_sampler(list(CONV_TYPES))(compute_conv_grad_sample)
    register_grad_sampler(list(CONV_TRANSPOSE_TYPES))(compute_conv_transpose_grad_sample)
    logger.debug("registered medseg per-sample gradient samplers for %s", sorted(t.__name__ for t in _OURS))


@contextmanager
def opacus_default_samplers() -> Iterator[None]:
    """Temporarily restore Opacus' stock sampler choices.

    Inside the block convolutions use Opacus' unfold-based sampler and
    transposed convolutions fall back to ``torch.func``. Meant for benchmarks
    and tests; wrap the whole life of a ``GradSampleModule`` (creation to last
    backward pass), since samplers are looked up at every backward pass.
    """
    saved = [dict(table) for table in _SAMPLER_TABLES]
    try:
        for table in _SAMPLER_TABLES:
            for t in CONV_TYPES:
                table[t] = _opacus_conv_grad_sample
            for t in CONV_TRANSPOSE_TYPES:
                table.pop(t, None)
        yield
    finally:
        for table, old in zip(_SAMPLER_TABLES, saved, strict=True):
            table.clear()
            table.update(old)
