"""Tiny on-disk sites for the data tests."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from medseg_core.data.io import write_nifti

SiteWriter = Callable[..., Path]


@pytest.fixture
def write_dataset_json() -> SiteWriter:
    """Write ``dataset.json`` from a dict (or raw text) into a directory."""

    def _write(root: Path, content: dict[str, Any] | list[Any] | str) -> Path:
        root.mkdir(parents=True, exist_ok=True)
        text = content if isinstance(content, str) else json.dumps(content)
        (root / "dataset.json").write_text(text, encoding="utf-8")
        return root

    return _write


def phantom(shape: tuple[int, ...], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A random image and a binary mask with a square of foreground."""
    rng = np.random.default_rng(seed)
    image = rng.normal(size=shape).astype(np.float32)
    mask = np.zeros(shape, dtype=np.uint8)
    mask[2:5, 3:6] = 1
    return image, mask


@pytest.fixture
def make_case() -> Callable[..., dict[str, Any]]:
    """Write an image (+ mask) under ``root``; return its dataset.json entry."""

    def _make(root: Path, name: str, shape: tuple[int, ...] = (8, 8), seed: int = 0,
              split: str = "Tr", label: bool = True, **extra: Any) -> dict[str, Any]:
        image, mask = phantom(shape, seed)
        entry: dict[str, Any] = {"image": f"images{split}/{name}.nii.gz"}
        write_nifti(image, root / entry["image"])
        if label:
            entry["label"] = f"labels{split}/{name}.nii.gz"
            write_nifti(mask, root / entry["label"])
        entry.update(extra)
        return entry

    return _make
