"""Personalisation with SGD, in the run and afterwards (``benchmarks/personalize_run.py``).

Three `medseg simulate` runs of one no-DP scenario with a site-private input
adapter: one with ``train.personalize`` (SGD with momentum, the setting
reaching the sites through the personalise message), one without, one with
``train.personalize.layers: all``. The benchmark then personalises the
second run's sites with the same settings; without DP training is
deterministic, so it must reproduce the first run's personalised test Dice
site by site, and its "as federated" Dice must be the second run's own; with
``--all-weights`` it must reproduce the third run's.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from _runner import simulate

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "personalize_run.py"

SCENARIO = """
name: personalise-sgd
seed: 2
rounds: 2
sites:
  - {id: site-a, n_train: 12, n_test: 3}
  - {id: site-b, n_train: 12, n_test: 3, shift: {gamma: 0.5, bias_field: 0.6, noise_std: 0.1}}
model: {channels: [8, 16], strides: [2], norm_groups: 4, adaptation: adapter}
data: {image_size: 32, val_fraction: 0.25}
train: {local_epochs: 1, batch_size: 4, optimizer: sgd, lr: 0.05, momentum: 0.9%s}
privacy: {enabled: false}
evaluation: {threshold: site}
"""
PERSONALIZE = ", personalize: {epochs: 2, optimizer: sgd, lr: 0.1, momentum: 0.9}"


def test_benchmark_reproduces_the_runs_own_personalisation(tmp_path: Path) -> None:
    (tmp_path / "with").mkdir()
    (tmp_path / "without").mkdir()
    _, with_p, _ = simulate(tmp_path / "with", SCENARIO % PERSONALIZE)
    out, without, _ = simulate(tmp_path / "without", SCENARIO % "")
    proc = subprocess.run([sys.executable, str(BENCH), str(out), "--epochs", "2", "--optimizer",
                           "sgd", "--lr", "0.1", "--momentum", "0.9", "--against", str(out)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split()[0]: line for line in proc.stdout.splitlines() if "test Dice" in line}
    assert set(rows) == {"site-a", "site-b"}
    moved = False
    for sid, row in rows.items():
        ran = with_p["federated"]["per_site"][sid]
        assert ran["personalized"] is True
        federated = float(row.split("federated ")[1].split()[0])
        personalised = float(row.split("personalised ")[1].split()[0])
        kept = int(row.split("(epoch ")[1].split()[0])
        assert federated == pytest.approx(without["federated"]["per_site"][sid]["dice"], abs=5e-4)
        assert federated == pytest.approx(ran["dice_global"], abs=5e-4)  # same federation
        assert personalised == pytest.approx(ran["dice"], abs=5e-4)
        assert kept == ran["personalization"]["epochs_kept"]
        moved |= kept > 0
    assert moved, proc.stdout  # SGD at 0.1 moved some site's layers past its federated ones
    # --all-weights fine-tunes the shared weights too and keeps the whole model, which is then
    # scored alone (load_state is strict: a state of private layers only would not load); a run
    # with train.personalize.layers: all does the same in the run, so the figures are the same
    (tmp_path / "every").mkdir()
    _, every, _ = simulate(tmp_path / "every", SCENARIO % PERSONALIZE.replace("{", "{layers: all, "))
    ft = subprocess.run([sys.executable, str(BENCH), str(out), "--all-weights", "--epochs", "2",
                         "--optimizer", "sgd", "--lr", "0.1", "--momentum", "0.9"],
                        capture_output=True, text=True, timeout=600, check=False)
    assert ft.returncode == 0, ft.stderr[-3000:]
    tuned = {line.split()[0]: line for line in ft.stdout.splitlines() if "test Dice" in line}
    assert set(tuned) == set(rows)
    for sid, row in tuned.items():
        assert row.split("personalised")[0] == rows[sid].split("personalised")[0]
        ran = every["federated"]["per_site"][sid]
        assert ran["personalization"]["layers"] == "all"
        assert float(row.split("personalised ")[1].split()[0]) == pytest.approx(ran["dice"], abs=5e-4)
        assert int(row.split("(epoch ")[1].split()[0]) == ran["personalization"]["epochs_kept"]
    # --against this run itself: the federated row is +0.000 on both figures
    assert "federated     mean" in proc.stdout and "minus none: mean +0.000, worst site +0.000" in (
        proc.stdout)
