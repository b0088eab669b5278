"""Per-sample gradient samplers vs. brute force (torch.func and a per-sample loop)."""

from __future__ import annotations

import warnings

import pytest
import torch
from opacus import GradSampleModule
from opacus.grad_sample import GradSampleHooks
from opacus.grad_sample.conv import compute_conv_grad_sample as opacus_conv_sampler
from torch import nn
from torch.func import functional_call, grad, vmap

import medseg_core.privacy  # noqa: F401  (registers the samplers)
from medseg_core.config import ModelConfig
from medseg_core.models import build_model
from medseg_core.privacy.grad_samplers import (
    compute_conv_grad_sample,
    compute_conv_transpose_grad_sample,
    opacus_default_samplers,
)

torch.set_num_threads(1)
ATOL = RTOL = 1e-5


def _func_per_sample(layer: nn.Module, x: torch.Tensor, backprops: torch.Tensor) -> dict[str, torch.Tensor]:
    """Reference: d/dparams <layer(x_i), g_i> for every sample i with torch.func."""
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def inner(p: dict[str, torch.Tensor], xi: torch.Tensor, gi: torch.Tensor) -> torch.Tensor:
        return (functional_call(layer, p, (xi.unsqueeze(0),)) * gi.unsqueeze(0)).sum()

    return vmap(grad(inner), in_dims=(None, 0, 0))(params, x, backprops)


LAYERS = {
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1), (3, 4, 11)),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, stride=1, padding=1), (3, 4, 7, 6)),
    "conv2d-groups-dilation": (lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2), (3, 4, 7, 7)),
    "conv2d-reflect-stride": (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode="reflect"), (2, 3, 8, 7)),
    "conv2d-nobias": (lambda: nn.Conv2d(3, 4, 1, bias=False), (2, 3, 5, 5)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 3, padding=1), (2, 2, 4, 5, 3)),
    "convT1d": (lambda: nn.ConvTranspose1d(4, 3, 3, stride=2, padding=1, output_padding=1), (3, 4, 6)),
    "convT2d": (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1), (3, 4, 5, 4)),
    "convT2d-groups": (lambda: nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2), (3, 4, 3, 3)),
    "convT2d-dilation": (lambda: nn.ConvTranspose2d(3, 2, 3, stride=1, padding=2, dilation=2), (2, 3, 5, 5)),
    "convT3d": (lambda: nn.ConvTranspose3d(2, 3, 3, stride=2, padding=1, output_padding=1), (2, 2, 3, 3, 2)),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_sampler_matches_torch_func_per_sample_gradients(name: str) -> None:
    # Arrange
    torch.manual_seed(0)
    make, shape = LAYERS[name]
    layer = make()
    x = torch.randn(shape)
    g = torch.randn_like(layer(x))
    sampler = compute_conv_transpose_grad_sample if "convT" in name else compute_conv_grad_sample

    # Act
    ours = sampler(layer, [x], g)
    ref = _func_per_sample(layer, x, g)

    # Assert
    assert set(ours) == set(layer.parameters())
    for pname, p in layer.named_parameters():
        assert ours[p].shape == (shape[0], *p.shape)
        torch.testing.assert_close(ours[p], ref[pname], atol=ATOL, rtol=RTOL)


def test_conv_sampler_agrees_with_opacus_stock_sampler() -> None:
    torch.manual_seed(1)
    layer = nn.Conv2d(3, 5, 3, stride=2, padding=1)
    x = torch.randn(4, 3, 9, 9)
    g = torch.randn_like(layer(x))

    ours = compute_conv_grad_sample(layer, [x], g)
    stock = opacus_conv_sampler(layer, [x], g)

    for p in layer.parameters():
        torch.testing.assert_close(ours[p], stock[p], atol=ATOL, rtol=RTOL)


def test_transposed_conv_with_explicit_output_size() -> None:
    torch.manual_seed(2)
    layer = nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1)
    x = torch.randn(2, 2, 4, 4)
    out = layer(x, output_size=[8, 8])  # output_padding 1 chosen at call time
    g = torch.randn_like(out)

    ours = compute_conv_transpose_grad_sample(layer, [x], g)

    for i in range(2):
        layer.zero_grad()
        (layer(x[i : i + 1], output_size=[8, 8]) * g[i : i + 1]).sum().backward()
        torch.testing.assert_close(ours[layer.weight][i], layer.weight.grad, atol=ATOL, rtol=RTOL)


def test_empty_batch_gives_zero_gradients() -> None:
    layer = nn.ConvTranspose2d(2, 3, 2, stride=2)

    ours = compute_conv_transpose_grad_sample(layer, [torch.zeros(0, 2, 3, 3)], torch.zeros(0, 3, 6, 6))

    assert ours[layer.weight].abs().sum() == 0
    assert ours[layer.bias].shape[1:] == layer.bias.shape


def test_unet_per_sample_gradients_through_opacus_match_a_per_sample_loop() -> None:
    # Arrange: the real model under Opacus hooks (conv, convT, GroupNorm samplers).
    torch.manual_seed(0)
    cfg = ModelConfig(channels=(4, 8), strides=(2,), norm_groups=2, num_res_units=1)
    model = build_model(cfg, in_channels=1, out_channels=2)
    x = torch.randn(3, 1, 8, 8)
    target = torch.randn(3, 2, 8, 8)
    expected = {
        name: torch.stack([
            torch.autograd.grad((model(x[i : i + 1]) * target[i : i + 1]).sum(), p)[0] for i in range(3)
        ])
        for name, p in model.named_parameters()
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gsm = GradSampleModule(model, loss_reduction="sum")

        # Act
        (gsm(x) * target).sum().backward()

    # Assert
    assert len(expected) == len(list(model.parameters())) > 10
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad_sample, expected[name], atol=ATOL, rtol=RTOL)
    gsm.to_standard_module()


def test_samplers_are_registered_and_default_context_restores_them() -> None:
    table = GradSampleHooks.GRAD_SAMPLERS
    assert table[nn.ConvTranspose2d] is compute_conv_transpose_grad_sample
    assert table[nn.Conv2d] is compute_conv_grad_sample

    with opacus_default_samplers():
        assert nn.ConvTranspose2d not in table
        assert table[nn.Conv2d] is opacus_conv_sampler

    assert table[nn.ConvTranspose2d] is compute_conv_transpose_grad_sample
    assert table[nn.Conv2d] is compute_conv_grad_sample
