"""Self-describing safetensors checkpoints."""

from pathlib import Path

import numpy as np
import pytest

from medseg_core.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from medseg_core.errors import CheckpointError


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": np.zeros(4, np.float32)}


def test_round_trip_with_metadata(tmp_path: Path) -> None:
    d = save_checkpoint(tmp_path, round=3, arrays=_arrays(), config={"rounds": 5})
    ck = load_checkpoint(d)
    assert ck.round == 3
    np.testing.assert_array_equal(ck.arrays["w"], _arrays()["w"])
    assert ck.meta["config"] == {"rounds": 5}
    assert {"torch", "monai", "opacus"} <= set(ck.meta["versions"])


def test_latest_picks_highest_complete_round(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, round=1, arrays=_arrays(), config={})
    save_checkpoint(tmp_path, round=2, arrays=_arrays(), config={})
    (tmp_path / "round_0003").mkdir()  # incomplete, e.g. a crash
    assert latest_checkpoint(tmp_path) == tmp_path / "round_0002"
    assert latest_checkpoint(tmp_path / "none") is None


def test_tampered_weights_refused(tmp_path: Path) -> None:
    d = save_checkpoint(tmp_path, round=1, arrays=_arrays(), config={})
    from safetensors.numpy import save_file

    bad = _arrays()
    bad["w"][0, 0] += 1.0
    save_file(bad, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="does not match its metadata"):
        load_checkpoint(d)


def test_incomplete_checkpoint_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(tmp_path)
