"""Benchmark: cost of one DP-SGD step relative to a plain step, side by side.

Times one optimizer step (zero_grad, forward, DiceCE loss, backward,
optimizer step) on a fixed synthetic batch.

Main table -- the scenario of ``--config`` (default
``simulations/configs/default.yaml``): its model
(``medseg_core.training.session.build_segmenter(scenario.model,
scenario.data)``), its ``train.batch_size`` and its optimizer
(``medseg_core.training.loop.make_optimizer`` with ``train.optimizer``,
``train.lr``, ``train.momentum``), on ``data.image_size`` images. Every DP
row goes through the product path, ``medseg_core.privacy.make_private`` with a
fresh accountant (``new_accountant(privacy.accountant)``), noise multiplier
1.0 and ``privacy.max_grad_norm``:

* ``plain (no DP)``;
* ``DP hooks, Opacus stock samplers`` -- Opacus' own unfold-based conv
  sampler (``opacus_default_samplers()``); ConvTranspose layers fall back to
  ``torch.func``;
* ``DP functorch``                    -- ``torch.func`` vmap for every layer;
* ``DP hooks + medseg conv+convT samplers [used]`` -- what ``medseg_core``
  registers: conv and convT per-sample weight gradients from one grouped
  convolution backward.

Reference tables (``--reference``): ``ModelConfig()`` defaults (UNet
channels 16-128), batch 16, Adam 1e-3, with the rows above plus

* ``hooks + medseg convT``  -- only the ConvTranspose sampler of
  ``medseg_core.privacy.grad_samplers`` (stock conv sampler);
* ``ghost``                 -- Opacus ghost clipping (norm samplers exist only
  for Linear/Embedding, so convolutions still materialise per-sample grads,
  plus a second backward pass);
* ``PReLU``                 -- UNet with MONAI's default PReLU activation,
  which has no Opacus hook sampler (``torch.func`` fallback) -- why the
  registry uses LeakyReLU;

and, for the upsampling choice, MONAI BasicUNet (same channels mapped to its
features) with transposed-conv vs. non-trainable (1x1 conv + bilinear)
upsampling (skip with ``--no-basicunet``).

Within a table all variants are built first, warmed up, then timed
round-robin (one step of each variant per repetition) so that background load
on a shared machine hits all of them alike; a table shows the median over
``--steps`` repetitions and ratios to the plain step of the same network
(the reference table also to its plain UNet). The last line summarises the main table.

Run: ``.venv/bin/python benchmarks/dp_step.py [--config PATH] [--reference]
[--steps N] [--threads T]``
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medseg_core.config import ModelConfig, ScenarioConfig, load_scenario  # noqa: E402
from medseg_core.losses import build_loss  # noqa: E402
from medseg_core.models import basicunet_features, build_model  # noqa: E402
from medseg_core.models.registry import _ACT, _PLACEHOLDER_NORM, _fit_group_norms  # noqa: E402
from medseg_core.privacy import make_private, new_accountant  # noqa: E402
from medseg_core.privacy.grad_samplers import (  # noqa: E402
    CONV_TRANSPOSE_TYPES,
    compute_conv_transpose_grad_sample,
    opacus_default_samplers,
)
from medseg_core.training.loop import make_optimizer  # noqa: E402
from medseg_core.training.session import build_segmenter  # noqa: E402

DEFAULT_CONFIG = ROOT / "simulations" / "configs" / "default.yaml"
SIGMA = 1.0  # noise multiplier: the step cost does not depend on its value
REF_BATCH, REF_SIZE, REF_IN_CH, REF_CLASSES, REF_CLIP = 16, 64, 1, 2, 1.0

PLAIN = "plain (no DP)"
STOCK = "DP hooks, Opacus stock samplers"
USED = "DP hooks + medseg conv+convT samplers [used]"


@dataclass(frozen=True)
class Workload:
    """A fixed batch plus the optimizer, loss and DP settings of one table.

    ``x``: ``(B, C, H, W)`` float32; ``y``: ``(B, 1, H, W)`` int64 labels.
    """

    x: Tensor
    y: Tensor
    classes: int
    optimizer: str
    lr: float
    momentum: float
    accountant: str
    max_grad_norm: float

    @property
    def batch(self) -> int:
        return int(self.x.shape[0])

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return make_optimizer(model, self.optimizer, self.lr, momentum=self.momentum)  # type: ignore[arg-type]

    def loader(self) -> DataLoader:
        """8 batches' worth of data: sample rate 1/8, expected batch = ``batch``."""
        ds = TensorDataset(self.x.repeat(8, 1, 1, 1), self.y.repeat(8, 1, 1, 1))
        return DataLoader(ds, batch_size=self.batch)


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


def _data(batch: int, in_ch: int, size: int, classes: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, in_ch, size, size, generator=g)
    y = torch.randint(0, classes, (batch, 1, size, size), generator=g)
    if classes == 2:  # ~30 % foreground, like a lesion mask
        y = (torch.rand(batch, 1, size, size, generator=g) > 0.7).long()
    return x, y


def _reference_model(name: str, variant: str | None = None) -> nn.Module:
    """The registry model for ``ModelConfig(name=name)``, or a MONAI-default variant of it.

    ``variant="deconv"``: BasicUNet with MONAI's transposed-conv upsampling;
    ``variant="prelu"``: UNet with MONAI's default PReLU activation (Opacus has
    no hook sampler for PReLU, so it falls back to ``torch.func``).
    """
    torch.manual_seed(0)
    cfg = ModelConfig(name=name)
    if variant is None:
        return build_model(cfg, in_channels=REF_IN_CH, out_channels=REF_CLASSES)
    if variant == "deconv":
        net: nn.Module = BasicUNet(
            spatial_dims=2, in_channels=REF_IN_CH, out_channels=REF_CLASSES,
            features=basicunet_features(cfg.channels), act=_ACT, norm=_PLACEHOLDER_NORM,
            upsample="deconv",
        )
    elif variant == "prelu":
        net = UNet(
            spatial_dims=2, in_channels=REF_IN_CH, out_channels=REF_CLASSES, channels=cfg.channels,
            strides=cfg.strides, num_res_units=cfg.num_res_units, act="prelu", norm=_PLACEHOLDER_NORM,
        )
    else:
        raise ValueError(f"unknown variant {variant!r}; expected None, 'deconv' or 'prelu'")
    return _fit_group_norms(net, cfg.norm_groups)


def _plain(w: Workload, make_model: Callable[[], nn.Module]) -> Callable[[], None]:
    model = make_model()
    opt = w.make_optimizer(model)
    loss_fn = build_loss(w.classes)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(w.x), w.y).backward()
        opt.step()

    return step


def _dp(w: Workload, make_model: Callable[[], nn.Module], mode: str = "hooks") -> Callable[[], None]:
    """A DP-SGD step through the product path (``medseg_core.privacy.make_private``)."""
    model = make_model()
    opt = w.make_optimizer(model)
    pt = make_private(
        model, opt, w.loader(), accountant=new_accountant(w.accountant),  # type: ignore[arg-type]
        noise_multiplier=SIGMA, max_grad_norm=w.max_grad_norm, grad_sample_mode=mode,
    )
    loss_fn = build_loss(w.classes)

    def step() -> None:
        pt.optimizer.zero_grad(set_to_none=True)
        loss_fn(pt.model(w.x), w.y).backward()
        pt.optimizer.step()

    return step


def _ghost(w: Workload, make_model: Callable[[], nn.Module]) -> Callable[[], None]:
    """Opacus ghost clipping: not offered by ``make_private``, so Opacus directly."""
    from opacus import PrivacyEngine

    model = make_model()
    opt = w.make_optimizer(model)
    gmodel, gopt, crit, _ = PrivacyEngine(accountant=w.accountant).make_private(
        module=model, optimizer=opt, data_loader=w.loader(), criterion=_PerSampleDiceCE(),
        noise_multiplier=SIGMA, max_grad_norm=w.max_grad_norm, grad_sample_mode="ghost",
    )

    def step() -> None:
        gopt.zero_grad(set_to_none=True)
        crit(gmodel(w.x), w.y).backward()
        gopt.step()

    return step


def _scenario_workload(scenario: ScenarioConfig) -> tuple[Workload, Callable[[], nn.Module]]:
    data, train = scenario.data, scenario.train
    in_ch = 1 + 2 * data.context_slices  # as build_segmenter
    x, y = _data(train.batch_size, in_ch, data.image_size, data.num_classes)
    w = Workload(
        x=x, y=y, classes=data.num_classes, optimizer=train.optimizer, lr=train.lr,
        momentum=train.momentum, accountant=scenario.privacy.accountant,
        max_grad_norm=scenario.privacy.max_grad_norm,
    )

    def make_model() -> nn.Module:
        torch.manual_seed(scenario.seed)
        return build_segmenter(scenario.model, data)

    return w, make_model


def _scenario_variants(scenario: ScenarioConfig) -> list[Variant]:
    w, mk = _scenario_workload(scenario)
    net = scenario.model.name
    return [
        Variant(PLAIN, net, lambda: _plain(w, mk), PLAIN),
        Variant(STOCK, net, lambda: _dp(w, mk), PLAIN, opacus_default_samplers),
        Variant("DP functorch", net, lambda: _dp(w, mk, "functorch"), PLAIN),
        Variant(USED, net, lambda: _dp(w, mk), PLAIN),
    ]


def _reference_variants(*, basicunet: bool) -> list[Variant]:
    x, y = _data(REF_BATCH, REF_IN_CH, REF_SIZE, REF_CLASSES)
    w = Workload(
        x=x, y=y, classes=REF_CLASSES, optimizer="adam", lr=1e-3, momentum=0.0,
        accountant="rdp", max_grad_norm=REF_CLIP,
    )

    def mk(name: str, variant: str | None = None) -> Callable[[], nn.Module]:
        return lambda: _reference_model(name, variant)

    unet = mk("unet")
    plain_p = "plain, PReLU (MONAI default act)"
    plain_bd, plain_bn = "plain, deconv upsample", "plain, nontrainable upsample"
    stock = opacus_default_samplers
    variants = [
        Variant(PLAIN, "unet", lambda: _plain(w, unet), PLAIN),
        Variant(plain_p, "unet", lambda: _plain(w, mk("unet", "prelu")), plain_p),
        Variant("DP stock, PReLU (MONAI default act)", "unet",
                lambda: _dp(w, mk("unet", "prelu")), plain_p, stock),
        Variant(STOCK, "unet", lambda: _dp(w, unet), PLAIN, stock),
        Variant("DP functorch (vmap all layers)", "unet", lambda: _dp(w, unet, "functorch"), PLAIN),
        Variant("DP ghost clipping (Opacus)", "unet", lambda: _ghost(w, unet), PLAIN, stock),
        Variant("DP hooks + medseg convT sampler", "unet", lambda: _dp(w, unet), PLAIN, _convt_only),
        Variant(USED, "unet", lambda: _dp(w, unet), PLAIN),
    ]
    if basicunet:
        variants += [
            Variant(plain_bd, "basicunet", lambda: _plain(w, mk("basicunet", "deconv")), plain_bd),
            Variant(plain_bn, "basicunet", lambda: _plain(w, mk("basicunet")), plain_bn),
            Variant("DP stock, deconv upsample", "basicunet",
                    lambda: _dp(w, mk("basicunet", "deconv")), plain_bd, stock),
            Variant("DP medseg, deconv upsample", "basicunet",
                    lambda: _dp(w, mk("basicunet", "deconv")), plain_bd),
            Variant("DP medseg, nontrainable [used]", "basicunet",
                    lambda: _dp(w, mk("basicunet")), plain_bn),
        ]
    return variants


def _time(variants: list[Variant], *, steps: int, warmup: int) -> float:
    """Build and warm up every variant, then time them round-robin; returns seconds."""
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        # Opacus' secure-RNG / experimental notices and torch's "full backward
        # hook without input grads" notice would repeat for every variant.
        warnings.filterwarnings("ignore", module=r"opacus\..*")
        warnings.filterwarnings("ignore", message=r"Full backward hook is firing")
        for v in variants:
            with v.context():
                v.step = v.build()
                for _ in range(warmup):
                    v.step()
        for _ in range(steps):
            for v in variants:
                if v.step is None:
                    raise RuntimeError(f"variant {v.label!r} was not built")
                with v.context():
                    start = time.perf_counter()
                    v.step()
                    v.times.append(time.perf_counter() - start)
    return time.perf_counter() - t0


def _table(variants: list[Variant], *, overall: str | None = None) -> dict[str, float]:
    """Print one markdown table; returns the median ms/step per label.

    ``overall``: label of a plain variant every row is also compared with
    (adds the ``net`` and ``x plain <its net>`` columns, for tables with
    several networks).
    """
    ms = {v.label: 1e3 * statistics.median(v.times) for v in variants}
    width = max(len(v.label) for v in variants)
    net_w = max(len("net"), *(len(v.net) for v in variants))
    net_head = f" {'net':<{net_w}} |" if overall else ""
    same = "x plain (same net)" if overall else "x plain"
    over = " x plain " + next((v.net for v in variants if v.label == overall), "")
    over_head = f"{over} |" if overall else ""
    header = f"|{net_head} {'variant':<{width}} | {'ms/step':>8} | {same} |{over_head}"
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    for v in variants:
        m = ms[v.label]
        net_cell = f" {v.net:<{net_w}} |" if overall else ""
        over_cell = f" {m / ms[overall]:{len(over) - 1}.2f} |" if overall else ""
        print(f"|{net_cell} {v.label:<{width}} | {m:8.1f} | {m / ms[v.baseline]:{len(same)}.2f} |{over_cell}")
    return ms


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help="scenario YAML whose model, batch size and optimizer are timed "
                        "(default simulations/configs/default.yaml)")
    parser.add_argument("--reference", action="store_true",
                        help="also time the reference rows (ModelConfig() defaults, batch 16, Adam; "
                        "PReLU, ghost, BasicUNet)")
    parser.add_argument("--no-basicunet", action="store_true", help="with --reference: skip the BasicUNet rows")
    parser.add_argument("--steps", type=int, default=10, help="timed repetitions per variant (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--steps and --threads must be >= 1, --warmup >= 0")
    scenario = load_scenario(args.config)
    torch.set_num_threads(args.threads)
    run = (f"torch {torch.__version__}, {args.threads} thread(s), median of {args.steps} steps "
           f"(round-robin, {args.warmup} warm-up)")

    main_variants = _scenario_variants(scenario)
    total = _time(main_variants, steps=args.steps, warmup=args.warmup)
    m, d, t = scenario.model, scenario.data, scenario.train
    opt = f"{t.optimizer} lr={t.lr}" + (f" momentum={t.momentum}" if t.optimizer == "sgd" else "")
    print(
        f"Scenario {scenario.name!r} ({args.config}): {m.name} channels {list(m.channels)}, "
        f"strides {list(m.strides)}, norm_groups {m.norm_groups}; batch "
        f"{t.batch_size}x{1 + 2 * d.context_slices}x{d.image_size}x{d.image_size}, {d.num_classes} classes, "
        f"DiceCE + {opt}; make_private(sigma={SIGMA}, C={scenario.privacy.max_grad_norm}, "
        f"fresh {scenario.privacy.accountant} accountant); {run}, {total:.1f} s"
    )
    ms = _table(main_variants)

    if args.reference:
        ref_variants = _reference_variants(basicunet=not args.no_basicunet)
        ref_total = _time(ref_variants, steps=args.steps, warmup=args.warmup)
        print()
        print(
            f"Reference: ModelConfig() defaults (channels 16-128), batch "
            f"{REF_BATCH}x{REF_IN_CH}x{REF_SIZE}x{REF_SIZE}, DiceCE + adam lr=0.001, "
            f"sigma={SIGMA}, C={REF_CLIP}; {run}, {ref_total:.1f} s"
        )
        _table(ref_variants, overall=PLAIN)

    print()
    print(
        f"DP-SGD step / plain step ({scenario.name} scenario model, batch {t.batch_size}): "
        f"{ms[USED] / ms[PLAIN]:.2f}x (Opacus stock hooks: {ms[STOCK] / ms[PLAIN]:.2f}x)"
    )


if __name__ == "__main__":
    main()
