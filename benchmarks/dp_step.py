"""Benchmark: cost of one DP-SGD step relative to a plain step, side by side.

Times one optimizer step (zero_grad, forward, DiceCE loss, backward, Adam
step) on a fixed batch of 16 x 1 x 64 x 64 for the default model
(``ModelConfig()``: MONAI UNet, channels 16-128, GroupNorm, LeakyReLU) and
for each way of computing per-sample gradients with Opacus:

* ``hooks, Opacus stock``  -- Opacus' unfold-based conv sampler; the
  ConvTranspose2d layers of UNet's up path fall back to ``torch.func``;
* ``functorch``             -- ``torch.func`` vmap for every layer;
* ``hooks + medseg convT``  -- only the ConvTranspose sampler of
  ``medseg_core.privacy.grad_samplers`` (stock conv sampler);
* ``hooks + medseg conv+convT`` -- what ``medseg_core`` uses: conv and convT
  per-sample weight gradients from one grouped convolution backward;
* ``ghost``                 -- Opacus ghost clipping (norm samplers exist only
  for Linear/Embedding, so convolutions still materialise per-sample grads,
  plus a second backward pass);
* ``PReLU``                 -- UNet with MONAI's default PReLU activation,
  which has no Opacus hook sampler (``torch.func`` fallback) -- why the
  registry uses LeakyReLU;

and, for the upsampling choice, MONAI BasicUNet (same channels mapped to its
features) with transposed-conv vs. non-trainable (1x1 conv + bilinear)
upsampling.

All variants are built first, warmed up, then timed round-robin (one step of
each variant per repetition) so that background load on a shared machine
hits all of them alike; the table shows the median over ``--steps``
repetitions and ratios to the plain step of the same network and to the
plain default UNet.

Run: ``.venv/bin/python benchmarks/dp_step.py [--steps N] [--threads T]``
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from monai.networks.nets import BasicUNet, UNet
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medseg_core.config import ModelConfig  # noqa: E402
from medseg_core.losses import build_loss  # noqa: E402
from medseg_core.models import basicunet_features, build_model  # noqa: E402
from medseg_core.models.registry import _ACT, _PLACEHOLDER_NORM, _fit_group_norms  # noqa: E402
from medseg_core.privacy import make_private, new_accountant  # noqa: E402
from medseg_core.privacy.grad_samplers import (  # noqa: E402
    CONV_TRANSPOSE_TYPES,
    compute_conv_transpose_grad_sample,
    opacus_default_samplers,
)
from medseg_core.training import make_optimizer  # noqa: E402

BATCH, SIZE, IN_CH, CLASSES = 16, 64, 1, 2
SIGMA, CLIP = 1.0, 1.0


@dataclass
class Variant:
    label: str
    net: str
    build: Callable[[], Callable[[], None]]  # returns the step function
    baseline: str  # label of the plain variant of the same network
    # Sampler table in force from construction to the last backward pass.
    context: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext
    step: Callable[[], None] | None = None
    times: list[float] = field(default_factory=list)


@contextlib.contextmanager
def _convt_only() -> Iterator[None]:
    """Stock Opacus samplers plus only the medseg ConvTranspose sampler."""
    with opacus_default_samplers():
        from opacus.grad_sample import GradSampleHooks

        for t in CONV_TRANSPOSE_TYPES:
            GradSampleHooks.GRAD_SAMPLERS[t] = compute_conv_transpose_grad_sample
        yield


class _PerSampleDiceCE(nn.Module):
    """DiceCE with a ``reduction`` switch: ghost clipping asks for per-sample losses."""

    def __init__(self) -> None:
        super().__init__()
        self.reduction = "mean"
        self.dice = DiceLoss(to_onehot_y=True, softmax=True, reduction="none")

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        dice = self.dice(logits, target).flatten(1).mean(1)
        ce = F.cross_entropy(logits, target[:, 0], reduction="none").flatten(1).mean(1)
        per_sample = dice + ce
        if self.reduction == "none":
            return per_sample
        return per_sample.mean() if self.reduction == "mean" else per_sample.sum()


def _data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, IN_CH, SIZE, SIZE, generator=g)
    y = (torch.rand(BATCH, 1, SIZE, SIZE, generator=g) > 0.7).long()
    return x, y


def _model(name: str, variant: str | None = None) -> nn.Module:
    """The registry model, or a MONAI-default variant of it for comparison.

    ``variant="deconv"``: BasicUNet with MONAI's transposed-conv upsampling;
    ``variant="prelu"``: UNet with MONAI's default PReLU activation (Opacus has
    no hook sampler for PReLU, so it falls back to ``torch.func``).
    """
    torch.manual_seed(0)
    cfg = ModelConfig(name=name)
    if variant is None:
        return build_model(cfg, in_channels=IN_CH, out_channels=CLASSES)
    if variant == "deconv":
        net: nn.Module = BasicUNet(
            spatial_dims=2, in_channels=IN_CH, out_channels=CLASSES,
            features=basicunet_features(cfg.channels), act=_ACT, norm=_PLACEHOLDER_NORM,
            upsample="deconv",
        )
    elif variant == "prelu":
        net = UNet(
            spatial_dims=2, in_channels=IN_CH, out_channels=CLASSES, channels=cfg.channels,
            strides=cfg.strides, num_res_units=cfg.num_res_units, act="prelu", norm=_PLACEHOLDER_NORM,
        )
    else:
        raise ValueError(f"unknown variant {variant!r}; expected None, 'deconv' or 'prelu'")
    return _fit_group_norms(net, cfg.norm_groups)


def _plain(net: str, x: Tensor, y: Tensor, variant: str | None = None) -> Callable[[], None]:
    model = _model(net, variant)
    opt = make_optimizer(model, "adam", 1e-3)
    loss_fn = build_loss(CLASSES)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return step


def _dp(net: str, x: Tensor, y: Tensor, mode: str = "hooks", variant: str | None = None) -> Callable[[], None]:
    model = _model(net, variant)
    opt = make_optimizer(model, "adam", 1e-3)
    loader = DataLoader(TensorDataset(x.repeat(8, 1, 1, 1), y.repeat(8, 1, 1, 1)), batch_size=BATCH)
    pt = make_private(
        model, opt, loader, accountant=new_accountant("rdp"), noise_multiplier=SIGMA,
        max_grad_norm=CLIP, grad_sample_mode=mode,
    )
    loss_fn = build_loss(CLASSES)

    def step() -> None:
        pt.optimizer.zero_grad(set_to_none=True)
        loss_fn(pt.model(x), y).backward()
        pt.optimizer.step()

    return step


def _ghost(net: str, x: Tensor, y: Tensor) -> Callable[[], None]:
    from opacus import PrivacyEngine

    model = _model(net)
    opt = make_optimizer(model, "adam", 1e-3)
    loader = DataLoader(TensorDataset(x.repeat(8, 1, 1, 1), y.repeat(8, 1, 1, 1)), batch_size=BATCH)
    gmodel, gopt, crit, _ = PrivacyEngine(accountant="rdp").make_private(
        module=model, optimizer=opt, data_loader=loader, criterion=_PerSampleDiceCE(),
        noise_multiplier=SIGMA, max_grad_norm=CLIP, grad_sample_mode="ghost",
    )

    def step() -> None:
        gopt.zero_grad(set_to_none=True)
        crit(gmodel(x), y).backward()
        gopt.step()

    return step


def _variants(x: Tensor, y: Tensor, *, basicunet: bool) -> tuple[list[Variant], str]:
    plain_u, plain_p = "plain (no DP)", "plain, PReLU (MONAI default act)"
    plain_bd, plain_bn = "plain, deconv upsample", "plain, nontrainable upsample"
    stock = opacus_default_samplers
    variants = [
        Variant(plain_u, "unet", lambda: _plain("unet", x, y), plain_u),
        Variant(plain_p, "unet", lambda: _plain("unet", x, y, "prelu"), plain_p),
        Variant("DP stock, PReLU (MONAI default act)", "unet",
                lambda: _dp("unet", x, y, variant="prelu"), plain_p, stock),
        Variant("DP hooks, Opacus stock samplers", "unet", lambda: _dp("unet", x, y), plain_u, stock),
        Variant("DP functorch (vmap all layers)", "unet", lambda: _dp("unet", x, y, "functorch"), plain_u),
        Variant("DP ghost clipping (Opacus)", "unet", lambda: _ghost("unet", x, y), plain_u, stock),
        Variant("DP hooks + medseg convT sampler", "unet", lambda: _dp("unet", x, y), plain_u, _convt_only),
        Variant("DP hooks + medseg conv+convT [used]", "unet", lambda: _dp("unet", x, y), plain_u),
    ]
    if basicunet:
        variants += [
            Variant(plain_bd, "basicunet", lambda: _plain("basicunet", x, y, "deconv"), plain_bd),
            Variant(plain_bn, "basicunet", lambda: _plain("basicunet", x, y), plain_bn),
            Variant("DP stock, deconv upsample", "basicunet",
                    lambda: _dp("basicunet", x, y, variant="deconv"), plain_bd, stock),
            Variant("DP medseg, deconv upsample", "basicunet",
                    lambda: _dp("basicunet", x, y, variant="deconv"), plain_bd),
            Variant("DP medseg, nontrainable [used]", "basicunet", lambda: _dp("basicunet", x, y), plain_bn),
        ]
    return variants, plain_u


def _time(variants: list[Variant], *, steps: int, warmup: int) -> float:
    """Build and warm up every variant, then time them round-robin; returns seconds."""
    t0 = time.perf_counter()
    for v in variants:
        with v.context():
            v.step = v.build()
            for _ in range(warmup):
                v.step()
    for _ in range(steps):
        for v in variants:
            assert v.step is not None
            with v.context():
                start = time.perf_counter()
                v.step()
                v.times.append(time.perf_counter() - start)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed repetitions per variant (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--no-basicunet", action="store_true", help="skip the BasicUNet rows")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--steps and --threads must be >= 1, --warmup >= 0")
    torch.set_num_threads(args.threads)
    x, y = _data()
    variants, plain_u = _variants(x, y, basicunet=not args.no_basicunet)
    with warnings.catch_warnings():
        # Opacus' secure-RNG / experimental notices and torch's "full backward
        # hook without input grads" notice would repeat for every variant.
        warnings.filterwarnings("ignore", module=r"opacus\..*")
        warnings.filterwarnings("ignore", message=r"Full backward hook is firing")
        total = _time(variants, steps=args.steps, warmup=args.warmup)

    ms = {v.label: 1e3 * statistics.median(v.times) for v in variants}
    print(
        f"DP-SGD step, batch {BATCH}x{IN_CH}x{SIZE}x{SIZE}, DiceCE + Adam, sigma={SIGMA}, C={CLIP}; "
        f"torch {torch.__version__}, {args.threads} thread(s), median of {args.steps} steps "
        f"(round-robin, {args.warmup} warm-up), {total:.1f} s"
    )
    header = f"| {'net':<9} | {'variant':<36} | {'ms/step':>8} | {'x plain (same net)':>18} | {'x plain UNet':>12} |"
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    for v in variants:
        m = ms[v.label]
        print(f"| {v.net:<9} | {v.label:<36} | {m:8.1f} | {m / ms[v.baseline]:18.2f} | {m / ms[plain_u]:12.2f} |")


if __name__ == "__main__":
    main()
