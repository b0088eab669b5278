"""Writing generated sites safely: fingerprint, reuse, atomic install.

A generator builds the whole site in a temporary sibling folder and moves it
into place only when complete, so a half-written site is never seen (and two
processes generating the same site do not corrupt each other). The inputs'
fingerprint lives in ``dataset.json`` under ``"generator"``: a directory
generated from the same inputs is reused; one generated from other inputs is
replaced; anything else (real data!) is never touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medseg_core.data.datalist import DATASET_FILE
from medseg_core.errors import DataIntegrityError

__all__ = ["build_site_dir", "make_fingerprint"]


def make_fingerprint(payload: dict[str, Any]) -> dict[str, Any]:
    """``payload`` plus ``"sha256"`` of its canonical JSON (JSON-able values only)."""
    out = dict(payload)
    out["sha256"] = hashlib.sha256(
        json.dumps(payload, sort_keys=True).encode("utf-8")
    ).hexdigest()
    return out


def _generator_block(out_dir: Path) -> tuple[bool, dict[str, Any] | None]:
    """``(has_dataset_json, its "generator" object or None)``."""
    path = out_dir / DATASET_FILE
    if not path.is_file():
        return False, None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True, None
    gen = data.get("generator") if isinstance(data, dict) else None
    return True, gen if isinstance(gen, dict) else None


def _is_reusable(out_dir: Path, fingerprint: dict[str, Any]) -> bool:
    _, gen = _generator_block(out_dir)
    if gen is None or gen.get("sha256") != fingerprint["sha256"]:
        return False
    data = json.loads((out_dir / DATASET_FILE).read_text(encoding="utf-8"))
    files = [
        e[k]
        for split in ("training", "test")
        for e in data.get(split, [])
        if isinstance(e, dict)
        for k in ("image", "label")
        if k in e
    ]
    return all((out_dir / f).is_file() for f in files)


def _install(tmp: Path, out_dir: Path, fingerprint: dict[str, Any]) -> None:
    """Move a finished site into place; tolerate a concurrent identical writer."""
    if _is_reusable(out_dir, fingerprint):  # a concurrent writer finished first
        return
    trash = None
    if out_dir.exists():
        if not any(out_dir.iterdir()):
            out_dir.rmdir()
        else:  # a stale generated site (checked by build_site_dir)
            trash = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out_dir, trash)
    try:
        os.replace(tmp, out_dir)
    except OSError:
        if not _is_reusable(out_dir, fingerprint):
            raise
    finally:
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)


def build_site_dir(
    out_dir: str | Path, fingerprint: dict[str, Any], build: Callable[[Path], None]
) -> tuple[Path, bool]:
    """Reuse ``out_dir`` if generated from ``fingerprint``, else build it.

    Parameters
    ----------
    out_dir
        Site directory.
    fingerprint
        From :func:`make_fingerprint`; ``build`` must store it in
        ``dataset.json`` under ``"generator"`` (and write ``dataset.json`` last).
    build
        Writes the complete site into the folder it is given.

    Returns
    -------
    path, built : tuple[Path, bool]
        The absolute site directory and whether it was (re)built.

    Raises
    ------
    DataIntegrityError
        ``out_dir`` holds other data (a ``dataset.json`` without a generator
        fingerprint, or other files); it is never overwritten.
    """
    out_dir = Path(os.path.abspath(Path(out_dir).expanduser()))
    if _is_reusable(out_dir, fingerprint):
        return out_dir, False
    has_json, gen = _generator_block(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and gen is None:
        what = f"a {DATASET_FILE} not written by a generator" if has_json else "other files"
        raise DataIntegrityError(
            f"refusing to generate a site into {out_dir}: it holds {what}; expected an "
            "empty or previously generated directory; choose another output directory "
            "or empty this one"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        build(tmp)
        _install(tmp, out_dir, fingerprint)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir, True
