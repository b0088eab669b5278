"""Validate client train replies before they reach aggregation.

A reply is accepted only if its ArrayRecord has exactly the global model's
keys, shapes and a floating dtype, every value is finite, its MetricRecord
carries a positive finite ``num-examples``, and (optionally) the update's L2
norm ``||w_site - w_global||`` is within a bound. Anything else is rejected
with a reason that names the key and the values; the caller logs it in the
run store and aggregates without it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Message

from medseg_core import keys

__all__ = ["ReplyVerdict", "update_norm", "validate_train_reply"]


@dataclass(frozen=True)
class ReplyVerdict:
    """Outcome of validating one reply."""

    accepted: bool
    reason: str = ""
    norm: float | None = None


def update_norm(state: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """L2 norm of ``state - reference`` over all floating arrays."""
    total = 0.0
    for k, ref in reference.items():
        if np.issubdtype(ref.dtype, np.floating):
            d = state[k].astype(np.float64) - ref.astype(np.float64)
            total += float(np.dot(d.ravel(), d.ravel()))
    return math.sqrt(total)


def validate_train_reply(
    msg: Message,
    reference: Mapping[str, np.ndarray],
    *,
    max_update_norm: float | None = None,
) -> ReplyVerdict:
    """Check one train reply against the global model ``reference``.

    Parameters
    ----------
    msg
        A reply without error (error replies are handled by the caller).
    reference
        The global model sent this round: key -> array.
    max_update_norm
        Reject updates whose distance to ``reference`` exceeds this L2 norm.
    """
    content = msg.content
    arrays = content.array_records
    if list(arrays.keys()) != [keys.ARRAYS]:
        return ReplyVerdict(False, f"expected exactly one ArrayRecord '{keys.ARRAYS}', "
                                   f"got {sorted(arrays.keys())}")
    metrics = content.metric_records
    if keys.METRICS not in metrics or len(metrics) != 1:
        return ReplyVerdict(False, f"expected exactly one MetricRecord '{keys.METRICS}', "
                                   f"got {sorted(metrics.keys())}")
    n = metrics[keys.METRICS].get(keys.NUM_EXAMPLES)
    if not isinstance(n, int | float) or not math.isfinite(float(n)) or n <= 0:
        return ReplyVerdict(False, f"'{keys.NUM_EXAMPLES}' must be a positive finite number, got {n!r}")
    for k, v in metrics[keys.METRICS].items():
        if isinstance(v, float) and not math.isfinite(v):
            return ReplyVerdict(False, f"metric {k!r} is not finite ({v!r})")
    record = arrays[keys.ARRAYS]
    got, want = set(record.keys()), set(reference.keys())
    if got != want:
        missing, extra = sorted(want - got), sorted(got - want)
        return ReplyVerdict(
            False,
            f"array keys differ from the global model: missing {missing[:5]}"
            f"{'…' if len(missing) > 5 else ''}, unexpected {extra[:5]}{'…' if len(extra) > 5 else ''}",
        )
    state: dict[str, np.ndarray] = {}
    for k, ref in reference.items():
        arr = record[k].numpy()
        if tuple(arr.shape) != tuple(ref.shape):
            return ReplyVerdict(False, f"array {k!r} has shape {tuple(arr.shape)}, "
                                       f"global model has {tuple(ref.shape)}")
        if arr.dtype != ref.dtype:
            return ReplyVerdict(False, f"array {k!r} has dtype {arr.dtype}, global model has {ref.dtype}")
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            return ReplyVerdict(False, f"array {k!r} has {bad} non-finite values (NaN/Inf)")
        state[k] = arr
    norm = update_norm(state, reference)
    if max_update_norm is not None and norm > max_update_norm:
        return ReplyVerdict(False, f"update norm {norm:.4g} exceeds the bound {max_update_norm:.4g}",
                            norm=norm)
    priv = content.config_records.get("privacy")
    if priv is not None:
        eps = priv.get(keys.EPSILON)
        if not isinstance(eps, int | float) or not math.isfinite(float(eps)) or eps < 0:
            return ReplyVerdict(False, f"privacy record epsilon must be finite and >= 0, got {eps!r}")
    return ReplyVerdict(True, norm=norm)
