"""A site's record of the rounds it answered, so a replayed round is free.

After a server crash, ``medseg server --resume`` replays the round that was
in flight, sending the same global model (the last checkpoint) again. A site
that already trained that round must not train it again: a second DP-SGD
pass spends privacy budget a second time (epsilon only grows) and changes
the update. So a site keeps, per (run, round, hash of the global model), the
outcome it sent, and answers a replay with exactly that outcome without
touching its accountant.

Stored under ``state_dir/replies/``: the shared weights (safetensors) and
the statistics (JSON). Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

__all__ = ["ReplyCache", "state_digest"]


def state_digest(state: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over the keys, dtypes, shapes and bytes of a state, in key order."""
    h = hashlib.sha256()
    for k in sorted(state):
        a = np.ascontiguousarray(state[k])
        h.update(f"{k}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


class ReplyCache:
    """The outcomes a site sent, keyed by run, round and global-model digest."""

    def __init__(self, state_dir: str | Path, run_name: str) -> None:
        tag = hashlib.sha256(run_name.encode()).hexdigest()[:16]
        self.dir = Path(state_dir) / "replies" / tag

    def _base(self, server_round: int, digest: str) -> Path:
        return self.dir / f"round_{server_round:04d}_{digest[:24]}"

    def get(self, server_round: int, digest: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        """The stored (shared weights, statistics) of this round, or None."""
        base = self._base(server_round, digest)
        meta, weights = base.with_suffix(".json"), base.with_suffix(".safetensors")
        if not (meta.is_file() and weights.is_file()):
            return None
        return dict(load_file(str(weights))), json.loads(meta.read_text(encoding="utf-8"))

    def put(self, server_round: int, digest: str, shared: Mapping[str, np.ndarray],
            stats: Mapping[str, Any]) -> None:
        """Store an outcome (weights first, statistics last: a half-written
        entry has no .json and is never read)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        base = self._base(server_round, digest)
        tmp = base.with_suffix(".st.tmp")
        save_file({k: np.ascontiguousarray(v) for k, v in shared.items()}, str(tmp))
        os.replace(tmp, base.with_suffix(".safetensors"))
        jtmp = base.with_suffix(".json.tmp")
        jtmp.write_text(json.dumps(dict(stats), default=_jsonable), encoding="utf-8")
        os.replace(jtmp, base.with_suffix(".json"))


def _jsonable(obj: object) -> object:
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)  # type: ignore[arg-type]
    if isinstance(obj, np.floating | np.integer):
        return obj.item()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")
