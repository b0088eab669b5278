"""Self-describing checkpoints: weights (safetensors) + resolved config,
package versions, git revision, round and a content hash.

Nothing here unpickles: weights are safetensors, metadata is JSON.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from medseg_core.errors import CheckpointError

__all__ = [
    "Checkpoint",
    "git_revision",
    "latest_checkpoint",
    "load_checkpoint",
    "package_versions",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

_PACKAGES = ("medseg-fl", "torch", "monai", "opacus", "flwr", "numpy", "safetensors")
_WEIGHTS = "model.safetensors"
_META = "meta.json"


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that determine a checkpoint."""
    out: dict[str, str] = {}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def git_revision(path: Path | None = None) -> str | None:
    """Git revision of the source tree, or None outside a checkout."""
    here = path or Path(__file__).resolve().parent
    try:
        res = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
            timeout=5, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.strip() or None if res.returncode == 0 else None


def _digest(arrays: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        h.update(key.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint."""

    path: Path
    round: int
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Weights as torch tensors, ready for ``model.load_state_dict``."""
        return {k: torch.from_numpy(np.array(v)) for k, v in self.arrays.items()}


def save_checkpoint(
    directory: str | Path,
    *,
    round: int,  # noqa: A002 - the federated-learning word
    arrays: Mapping[str, np.ndarray],
    config: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``directory/round_XXXX/{model.safetensors, meta.json}`` atomically.

    The round directory is written under a temporary name and renamed, so a
    crash never leaves a half-written checkpoint that looks complete.

    Returns
    -------
    Path
        The round directory.
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"round_{round:04d}"
    tmp = root / f".round_{round:04d}.tmp"
    if tmp.exists():
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    tmp.mkdir()
    contiguous = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    save_file(contiguous, str(tmp / _WEIGHTS))
    meta = {
        "round": round,
        "sha256": _digest(contiguous),
        "shapes": {k: list(v.shape) for k, v in contiguous.items()},
        "config": dict(config),
        "versions": package_versions(),
        "git_rev": git_revision(),
        **(dict(extra) if extra else {}),
    }
    (tmp / _META).write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        for f in final.iterdir():
            f.unlink()
        final.rmdir()
    os.replace(tmp, final)
    logger.info("checkpoint round %d -> %s", round, final)
    return final


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load and verify a checkpoint directory written by :func:`save_checkpoint`.

    Raises
    ------
    CheckpointError
        Missing files, unreadable weights, or a content hash that does not
        match the metadata (a corrupted or tampered checkpoint).
    """
    path = Path(path)
    wfile, mfile = path / _WEIGHTS, path / _META
    if not wfile.is_file() or not mfile.is_file():
        raise CheckpointError(
            f"checkpoint {str(path)!r} is incomplete: expected {_WEIGHTS} and {_META}; "
            "point at a round_XXXX directory written by medseg"
        )
    try:
        meta = json.loads(mfile.read_text(encoding="utf-8"))
        arrays = load_file(str(wfile))
    except (OSError, ValueError, json.JSONDecodeError) as exc:  # safetensors raises ValueError-likes
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read: {exc}") from None
    except Exception as exc:  # safetensors_rust.SafetensorError is not a ValueError
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read: {exc}") from None
    digest = _digest(arrays)
    if digest != meta.get("sha256"):
        raise CheckpointError(
            f"checkpoint {str(path)!r} content hash {digest[:12]}… does not match its "
            f"metadata {str(meta.get('sha256'))[:12]}…; the weights are corrupted or were "
            "modified; restore it from a backup or resume from an earlier round"
        )
    return Checkpoint(path=path, round=int(meta["round"]), arrays=arrays, meta=meta)


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The highest complete ``round_XXXX`` directory under ``directory``, or None."""
    root = Path(directory)
    if not root.is_dir():
        return None
    rounds = sorted(p for p in root.glob("round_*") if (p / _META).is_file())
    return rounds[-1] if rounds else None
