"""A scenario's ``without_dp`` settings reach the run that has DP off.

The scenario runs with DP in its file and ``medseg simulate --dp off``: the
federation must run with the block merged in (here one round instead of two,
and FedAvgM instead of FedAvg), record what it ran, and train without DP.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medseg_core.config import load_site_config
from medseg_core.store import RunStore
from _runner import simulate

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCENARIO = """
name: without-dp
seed: 4
rounds: 2
sites:
  - {id: site-a, n_train: 6, n_test: 2}
  - {id: site-b, n_train: 6, n_test: 2, shift: {gamma: 1.5}}
model: {channels: [8, 16], strides: [2], norm_groups: 4}
data: {image_size: 32}
train: {local_epochs: 1, batch_size: 4}
privacy: {enabled: true, epsilon: 8.0}
without_dp:
  rounds: 1
  strategy: {name: fedavgm, server_momentum: 0.5}
"""


def test_dp_off_runs_the_without_dp_settings(tmp_path: Path) -> None:
    out, summary, _ = simulate(tmp_path, SCENARIO, "--dp", "off")
    assert summary["dp"] is False
    assert summary["without_dp"] == {"rounds": 1,
                                     "strategy": {"name": "fedavgm", "server_momentum": 0.5}}
    assert summary["rounds"] == 1 and summary["strategy"] == "fedavgm"
    with RunStore(out / "server" / "runstore.sqlite") as store:
        assert len(store.rounds(summary["federated"]["run_id"])) == 1
    ran = json.loads((out / "scenario.json").read_text())  # what ran, recorded
    assert ran["privacy"]["enabled"] is False and ran["without_dp"] is None
    assert ran["rounds"] == 1 and ran["strategy"]["server_momentum"] == 0.5
    assert ran["train"]["batch_size"] == 4  # the rest of the scenario as written
    for sid in ("site-a", "site-b"):
        assert load_site_config(out / "sites" / sid / "site.yaml").dp_enabled is False
        assert summary["federated"]["per_site"][sid]["epsilon"] is None
