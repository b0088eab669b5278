"""Local training: optimizer factory and an epoch loop with an optional FedProx term.

No Flower and no Opacus here: the loop works with any ``(model, loader,
optimizer)``, plain or made private by
:func:`medseg_core.privacy.engine.make_private`.
"""

from __future__ import annotations

import difflib
import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from medseg_core.errors import ConfigError

__all__ = ["OPTIMIZERS", "TrainResult", "make_optimizer", "train_epochs"]

logger = logging.getLogger(__name__)

OPTIMIZERS: tuple[str, ...] = ("adam", "sgd")
# Prefix under which Opacus' GradSampleModule registers the wrapped model.
_WRAPPER_PREFIX = "_module."


@dataclass(frozen=True)
class TrainResult:
    """Summary of one call to :func:`train_epochs`.

    Attributes
    ----------
    loss
        Mean training loss over the steps that saw data (NaN if none did).
    steps
        Optimizer steps taken (including noise-only steps on empty batches of
        a DP optimizer).
    num_examples
        Samples processed (sum of batch sizes).
    seconds
        Wall-clock duration.
    """

    loss: float
    steps: int
    num_examples: int
    seconds: float


def make_optimizer(
    model: nn.Module, name: Literal["adam", "sgd"], lr: float, *, momentum: float = 0.0
) -> torch.optim.Optimizer:
    """Optimizer over ``model``'s trainable parameters.

    Parameters
    ----------
    model
        The (plain) model; build the optimizer before
        :func:`medseg_core.privacy.engine.make_private`.
    name
        ``"adam"`` (Kingma & Ba 2015, arXiv:1412.6980) or ``"sgd"``.
    lr
        Learning rate > 0.
    momentum
        SGD (heavy-ball) momentum in [0, 1); ignored by Adam.

    Raises
    ------
    ConfigError
        Unknown ``name`` (valid names and a did-you-mean listed) or bad ``lr``.
    """
    if name not in OPTIMIZERS:
        close = difflib.get_close_matches(str(name), list(OPTIMIZERS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"unknown optimizer {name!r}; valid names: {list(OPTIMIZERS)}{hint}. "
            "Set train.optimizer in the scenario config."
        )
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"learning rate must be finite and > 0, got {lr!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"model {type(model).__name__} has no trainable parameters")
    if name == "adam":
        return torch.optim.Adam(params, lr=float(lr))
    if not 0.0 <= momentum < 1.0:
        raise ConfigError(f"momentum must be in [0, 1), got {momentum!r}")
    return torch.optim.SGD(params, lr=float(lr), momentum=float(momentum))


def _is_dp_optimizer(optimizer: torch.optim.Optimizer) -> bool:
    # Duck-typed so this module stays free of Opacus: a DP optimizer exposes
    # its noise multiplier.
    return hasattr(optimizer, "noise_multiplier")


def _plain_name(name: str) -> str:
    while name.startswith(_WRAPPER_PREFIX):
        name = name[len(_WRAPPER_PREFIX) :]
    return name


def _anchor_pairs(model: nn.Module, anchor: Mapping[str, Tensor]) -> list[tuple[nn.Parameter, Tensor]]:
    """Pair each trainable parameter with its anchor tensor (plain-model keys)."""
    pairs: list[tuple[nn.Parameter, Tensor]] = []
    missing: list[str] = []
    bad_shape: list[str] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = name if name in anchor else _plain_name(name)
        ref = anchor.get(key)
        if ref is None:
            missing.append(key)
        elif tuple(ref.shape) != tuple(p.shape):
            bad_shape.append(f"{key}: anchor {tuple(ref.shape)} vs parameter {tuple(p.shape)}")
        else:
            pairs.append((p, ref.detach().to(device=p.device, dtype=p.dtype)))
    if missing or bad_shape:
        raise ConfigError(
            f"FedProx anchor does not match the model: {len(missing)} missing key(s) "
            f"{missing[:5]}{'...' if len(missing) > 5 else ''}, {len(bad_shape)} shape mismatch(es) "
            f"{bad_shape[:5]}. Pass the global weights received this round, keyed like the plain "
            "model's state_dict()."
        )
    return pairs


@torch.no_grad()
def _proximal_step(
    optimizer: torch.optim.Optimizer, pairs: list[tuple[nn.Parameter, Tensor]], mu: float
) -> None:
    """``w <- w - lr * mu * (w - anchor)`` for every paired parameter."""
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    for p, ref in pairs:
        lr = lr_of.get(id(p))
        if lr is not None:
            p.sub_(p - ref, alpha=lr * mu)


def _batch_pair(batch: Any) -> tuple[Tensor, Any]:
    if isinstance(batch, list | tuple) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, list | tuple) and len(batch) in (3, 4):
        # (images, labels, classes[, weak views for FixMatch])
        return batch[0], tuple(batch[1:])
    raise ConfigError(
        "the training loader must yield (images, labels) or (images, labels, classes), got "
        f"{type(batch).__name__}"
        f"{f' of length {len(batch)}' if isinstance(batch, list | tuple) else ''}"
    )


def train_epochs(
    model: nn.Module,
    loader: Iterable[Any],
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    *,
    epochs: int,
    proximal_mu: float = 0.0,
    anchor: Mapping[str, Tensor] | None = None,
) -> TrainResult:
    """Train ``model`` for ``epochs`` passes over ``loader``.

    Parameters
    ----------
    model
        Plain module or Opacus wrapper; returns logits ``(B, K, H, W)``.
    loader
        Yields ``(images, labels)``: ``(B, C, H, W)`` float32 and
        ``(B, 1, H, W)`` int64, or ``(images, labels, classes)`` with
        ``(B,)`` int64 image labels (weak supervision; the loss then receives
        ``(labels, classes)``). ``B`` may be 0 (Poisson sampling).
    optimizer
        Plain or DP optimizer over ``model``'s parameters.
    loss_fn
        ``loss_fn(logits, labels) -> scalar``, a mean over samples.
    epochs
        Passes over ``loader`` (>= 1).
    proximal_mu
        FedProx coefficient ``mu`` >= 0 (Li et al. 2020, "Federated
        Optimization in Heterogeneous Networks", MLSys, arXiv:1812.06127).
    anchor
        Global weights of this round, keyed like the plain model's
        ``state_dict`` (an Opacus ``_module.`` prefix on the model side is
        handled). Required when ``proximal_mu > 0``.

    Returns
    -------
    TrainResult

    Raises
    ------
    ConfigError
        Bad ``epochs`` / ``proximal_mu``, missing or mismatched ``anchor``, or a
        loader that does not yield pairs.
    FloatingPointError
        The loss became NaN or infinite.

    Notes
    -----
    FedProx adds ``mu/2 * ||w - w_anchor||^2`` to the local objective. Its
    gradient ``mu * (w - w_anchor)`` does not depend on data, so it is applied
    as a separate step after each ``optimizer.step()``:
    ``w <- w - lr * mu * (w - w_anchor)``. Putting it in the loss would be
    wrong under DP-SGD: Opacus' per-sample hooks only see the data term, so
    the proximal gradient would be silently dropped (and it must not be
    clipped or noised anyway; as post-processing it costs no privacy).

    An empty batch is skipped for a plain optimizer. A DP optimizer (one with
    a ``noise_multiplier``) still takes its step on an empty batch -- zero
    clipped gradient plus noise, recorded by the accountant -- because
    Poisson-sampled DP-SGD releases a noisy update at every step and the
    privacy analysis counts them all; skipping would make the number of
    updates depend on which samples were drawn.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"epochs must be an int >= 1, got {epochs!r}")
    if not (isinstance(proximal_mu, int | float) and math.isfinite(proximal_mu) and proximal_mu >= 0):
        raise ConfigError(f"proximal_mu must be finite and >= 0, got {proximal_mu!r}")
    pairs: list[tuple[nn.Parameter, Tensor]] = []
    if proximal_mu > 0:
        if anchor is None:
            raise ConfigError(
                f"proximal_mu={proximal_mu} needs the round's global weights as anchor; pass "
                "anchor=<state_dict received from the server> or set proximal_mu=0"
            )
        pairs = _anchor_pairs(model, anchor)
    dp = _is_dp_optimizer(optimizer)
    was_training = model.training
    model.train()
    start = time.perf_counter()
    loss_sum, loss_steps, steps, examples, empty = 0.0, 0, 0, 0, 0
    try:
        for _ in range(epochs):
            for batch in loader:
                images, labels = _batch_pair(batch)
                n = int(images.shape[0])
                if n == 0:
                    empty += 1
                    if not dp:
                        continue
                    # Noise-only DP step: a zero loss that still runs the
                    # hooks, so every parameter gets an empty grad_sample.
                    optimizer.zero_grad(set_to_none=True)
                    (model(images).sum() * 0.0).backward()
                    optimizer.step()
                else:
                    optimizer.zero_grad(set_to_none=True)
                    loss = loss_fn(model(images), labels)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(
                            f"training loss became {loss.item()} at step {steps + 1}; lower the "
                            "learning rate (train.lr) or check the inputs for NaN/inf"
                        )
                    loss.backward()
                    optimizer.step()
                    loss_sum += float(loss.detach())
                    loss_steps += 1
                    examples += n
                steps += 1
                if pairs:
                    _proximal_step(optimizer, pairs, float(proximal_mu))
    finally:
        optimizer.zero_grad(set_to_none=True)
        model.train(was_training)
    seconds = time.perf_counter() - start
    if empty:
        logger.debug("%d empty batch(es) %s", empty, "noise-only steps" if dp else "skipped")
    return TrainResult(
        loss=loss_sum / loss_steps if loss_steps else math.nan,
        steps=steps,
        num_examples=examples,
        seconds=seconds,
    )
