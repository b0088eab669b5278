"""A site sending NaN weights is rejected with its reason; the round goes on.

Three virtual sites on Flower's simulation engine, one of which corrupts its
update (``attack: nan``); the server must log the rejection in the run store,
aggregate the two honest updates only and produce a finite global model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medseg_core.checkpoint import latest_checkpoint, load_checkpoint
from medseg_core.store import RunStore
from _runner import simulate

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCENARIO = """
name: poisoned
seed: 2
rounds: 1
sites:
  - {id: honest-1, n_train: 6, n_test: 2}
  - {id: honest-2, n_train: 6, n_test: 2}
  - {id: mallory, n_train: 6, n_test: 2, attack: nan}
model: {channels: [8, 16], strides: [2], norm_groups: 4}
data: {image_size: 32}
train: {local_epochs: 1, batch_size: 4}
privacy: {enabled: false}
"""


def test_nan_update_rejected_logged_and_excluded(tmp_path: Path) -> None:
    out, summary, _ = simulate(tmp_path, SCENARIO)
    assert summary["federated"]["rejected_updates"] == 1
    with RunStore(out / "server" / "runstore.sqlite") as store:
        run_id = summary["federated"]["run_id"]
        (rej,) = store.rejections(run_id)
        assert rej["site_id"] == "mallory" and rej["kind"] == "validation"
        assert "non-finite" in rej["reason"]
        (rnd,) = store.rounds(run_id)
        assert (rnd["n_sampled"], rnd["n_accepted"], rnd["n_rejected"]) == (3, 2, 1)
        assert {r["site_id"] for r in store.site_metrics(run_id, phase="train")} == {"honest-1", "honest-2"}
    ck = load_checkpoint(latest_checkpoint(out / "server" / "checkpoints"))
    assert all(np.isfinite(a).all() for a in ck.arrays.values())
    assert summary["dp"] is False
    assert all(v["epsilon"] is None for v in summary["federated"]["per_site"].values())
