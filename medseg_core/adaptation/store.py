"""A site's own store of its private adaptation parameters.

One safetensors file per (run, round) under ``state_dir/adaptation/``: the
parameters a site had after training that round. Training round ``r`` starts
from the latest stored round before ``r`` (so a resumed server that replays a
round never compounds it), and evaluating the global model of round ``m``
pairs it with the site's parameters of round ``m`` (or the latest before, if
the site missed round ``m``). Files are small (norm affine + adapter: a few
thousand floats) and nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

__all__ = ["AdaptationStore"]

logger = logging.getLogger(__name__)

_FILE = re.compile(r"^round_(\d{4,})\.safetensors$")


class AdaptationStore:
    """Per-round private parameters of one site.

    Parameters
    ----------
    state_dir
        The site's private state directory.
    run_name
        The federation run; parameters of another run never mix in.
    """

    def __init__(self, state_dir: str | Path, run_name: str) -> None:
        tag = hashlib.sha256(run_name.encode()).hexdigest()[:16]
        self.dir = Path(state_dir) / "adaptation" / tag

    def rounds(self) -> list[int]:
        """Rounds with stored parameters, ascending."""
        if not self.dir.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.dir.iterdir() if (m := _FILE.match(p.name)))

    def save(self, server_round: int, state: Mapping[str, np.ndarray]) -> Path:
        """Store the parameters after ``server_round`` (atomic, fsynced)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"round_{server_round:04d}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return path

    def load_before(self, server_round: int) -> dict[str, np.ndarray] | None:
        """Parameters of the latest round ``< server_round`` (None: none yet)."""
        return self._load(max((r for r in self.rounds() if r < server_round), default=None))

    def load_at(self, server_round: int) -> dict[str, np.ndarray] | None:
        """Parameters of ``server_round``, else of the latest round before it."""
        return self._load(max((r for r in self.rounds() if r <= server_round), default=None))

    def _load(self, rnd: int | None) -> dict[str, np.ndarray] | None:
        if rnd is None:
            return None
        return dict(load_file(str(self.dir / f"round_{rnd:04d}.safetensors")))
