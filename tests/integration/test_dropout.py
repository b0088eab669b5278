"""A site that drops out mid-run does not stall the round; it rejoins later.

Two virtual sites on Flower's simulation engine; ``site-b`` does not answer
round 2 in time (``drop_rounds: [2]``: it stalls past the server's
``round_timeout_s``). Round 2 must complete with ``site-a`` alone, and
``site-b`` must be back in round 3.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from medseg_core.store import RunStore
from _runner import simulate

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCENARIO = """
name: dropout
seed: 4
rounds: 3
sites:
  - {id: site-a, n_train: 6, n_test: 2}
  - {id: site-b, n_train: 6, n_test: 2, drop_rounds: [2], drop_seconds: 100}
model: {channels: [8, 16], strides: [2], norm_groups: 4}
data: {image_size: 32}
train: {local_epochs: 1, batch_size: 4}
privacy: {enabled: true, epsilon: 8.0}
strategy: {round_timeout_s: 50, min_train_nodes: 1}
"""


def test_dropped_site_does_not_stall_and_rejoins(tmp_path: Path) -> None:
    out, summary, _ = simulate(tmp_path, SCENARIO)
    run_id = summary["federated"]["run_id"]
    with RunStore(out / "server" / "runstore.sqlite") as store:
        rounds = {r["round"]: r for r in store.rounds(run_id)}
        assert [rounds[r]["n_accepted"] for r in (1, 2, 3)] == [2, 1, 2]
        assert all(r["finished_at"] is not None for r in rounds.values())
        ledger_b = [r.round for r in store.ledger(run_id, "site-b")]
        assert ledger_b == [1, 3]  # no privacy spent in the round it missed
    assert set(summary["federated"]["per_site"]) == {"site-a", "site-b"}
