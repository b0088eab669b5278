"""Numpy state dicts <-> Flower ArrayRecords (shared by client and server)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

__all__ = ["record_to_state", "state_to_record"]


def state_to_record(state: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Numpy state dict -> ArrayRecord (order preserved)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def record_to_state(record: ArrayRecord) -> dict[str, np.ndarray]:
    """ArrayRecord -> numpy state dict."""
    return {k: v.numpy() for k, v in record.items()}
