"""`medseg simulate` end to end on Flower's simulation engine (Ray), DP on.

Runs the real CLI in a subprocess (its own Ray instance, private FLWR_HOME
and RAY_TMPDIR) on a 2-site x 2-round scenario and inspects what it leaves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medseg_core.checkpoint import latest_checkpoint, load_checkpoint
from medseg_core.config import load_scenario, load_site_config
from medseg_core.errors import PrivacyBudgetExceeded
from medseg_core.store import RunStore
from medseg_core.training.session import build_segmenter, load_state
from medseg_core.training.site import RoundRequest, SiteSession

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCENARIO = """
name: it2x2
seed: 1
rounds: 2
sites:
  - {id: site-a, dims: 2, n_train: 10, n_test: 3}
  - {id: site-b, dims: 3, depth: 4, n_train: 3, n_test: 1, shift: {intensity_scale: 1.4, noise_std: 0.05}}
model: {channels: [8, 16], strides: [2], norm_groups: 4, adaptation: norm+adapter}
data: {image_size: 32, val_fraction: 0.25}
train: {local_epochs: 1, batch_size: 4, lr: 0.005, personalize: {epochs: 2}}
privacy: {enabled: true, epsilon: 6.0, delta: 1.0e-5}
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("sim")
    cfg = root / "it.yaml"
    cfg.write_text(SCENARIO)
    out = root / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "simulations.cli", "simulate", "--config", str(cfg), "--out", str(out)],
        capture_output=True, text=True, timeout=600, env=env, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    summary = json.loads((out / "summary.json").read_text())
    return {"out": out, "cfg": cfg, "summary": summary, "stdout": proc.stdout}


def test_summary_has_required_keys(run: dict) -> None:
    s = run["summary"]
    assert s["rounds"] == 2 and s["sites"] == ["site-a", "site-b"]
    assert s["pooled"] is None and s["local"] is None
    assert isinstance(s["wall_seconds"], float)
    per_site = s["federated"]["per_site"]
    assert set(per_site) == {"site-a", "site-b"}
    for v in per_site.values():
        assert 0.0 <= v["dice"] <= 1.0
        assert 0.0 < v["epsilon"] <= 6.0 + 1e-6
        assert v["n_train"] > 0
    # the standard error over the site's test cases travels with the Dice;
    # site-b has a single test volume, so it has none
    assert 0.0 <= per_site["site-a"]["dice_se"] <= 0.6
    assert per_site["site-b"]["dice_se"] is None
    assert "site-a" in run["stdout"] and "epsilon" in run["stdout"]  # the per-site table
    # train.personalize: each site fine-tuned its private layers after the rounds
    for sid, v in per_site.items():
        rep = v["personalization"]
        assert v["personalized"] is True, rep
        assert 0.0 <= rep["val_dice_before"] <= rep["val_dice_after"] <= 1.0
        assert rep["epochs_kept"] in (0, 1, 2)
        assert 0.0 <= v["dice_global"] <= 1.0
        assert f"{sid}: personalised private layers" in run["stdout"]


def test_epsilon_grows_monotonically_and_run_level_is_max(run: dict) -> None:
    with RunStore(run["out"] / "server" / "runstore.sqlite") as store:
        run_id = run["summary"]["federated"]["run_id"]
        for site in ("site-a", "site-b"):
            eps = [r.epsilon for r in store.ledger(run_id, site)]
            assert [r.round for r in store.ledger(run_id, site)] == [1, 2, 3]  # 3: personalisation
            assert eps[0] < eps[1] < eps[2] <= 6.0 + 1e-6
        assert store.max_epsilon(run_id) == {
            s: max(r.epsilon for r in store.ledger(run_id, s)) for s in ("site-a", "site-b")}
        for site, v in run["summary"]["federated"]["per_site"].items():
            assert v["epsilon"] == pytest.approx(store.max_epsilon(run_id)[site])


def test_run_store_holds_every_round(run: dict) -> None:
    with RunStore(run["out"] / "server" / "runstore.sqlite") as store:
        run_id = run["summary"]["federated"]["run_id"]
        rounds = store.rounds(run_id)
        assert [r["round"] for r in rounds] == [1, 2]
        assert all(r["finished_at"] is not None and r["n_accepted"] == 2 for r in rounds)
        assert store.run(run_id)["status"] == "completed"
        train_rows = store.site_metrics(run_id, phase="train")
        assert len(train_rows) == 4
        evals = store.site_metrics(run_id, phase="evaluate")
        for split in ("test", "test+personalized"):
            assert {r["site_id"] for r in evals if r["split"] == split} == {"site-a", "site-b"}


def test_final_checkpoint_reloads_into_the_model(run: dict) -> None:
    ck = load_checkpoint(latest_checkpoint(run["out"] / "server" / "checkpoints"))
    assert ck.round == 2
    scenario = load_scenario(run["cfg"])
    run_id = run["summary"]["federated"]["run_id"]
    sess = SiteSession(load_site_config(run["out"] / "sites" / "site-a" / "site.yaml"),
                       model_cfg=scenario.model, data_cfg=scenario.data)
    model = build_segmenter(scenario.model, scenario.data)
    # strict: the global shared weights + the site's own adaptation layers
    load_state(model, sess.full_state(ck.arrays, run_id, 2))
    assert ck.meta["config"]["rounds"] == 2
    selected = run["summary"]["federated"]["selected_round"]
    best = load_checkpoint(run["out"] / "server" / "checkpoints" / f"round_{selected:04d}")
    site_a = run["summary"]["federated"]["per_site"]["site-a"]
    reloaded = sess.evaluate(best.arrays, "test", run_name=run_id, model_round=selected).dice
    assert reloaded == pytest.approx(site_a["dice_global"], abs=1e-6)
    personal = sess.evaluate(best.arrays, "test", run_name=run_id, model_round=selected,
                             personalized=True).dice
    assert personal == pytest.approx(site_a["dice"], abs=1e-6)


def test_adaptation_layers_stay_on_the_sites(run: dict) -> None:
    """The server never held a private parameter; every site kept its own, per round."""
    from medseg_core.adaptation import AdaptationStore

    scenario = load_scenario(run["cfg"])
    run_id = run["summary"]["federated"]["run_id"]
    ck = load_checkpoint(latest_checkpoint(run["out"] / "server" / "checkpoints"))
    privates = []
    for sid in ("site-a", "site-b"):
        sess = SiteSession(load_site_config(run["out"] / "sites" / sid / "site.yaml"),
                           model_cfg=scenario.model, data_cfg=scenario.data)
        assert sess.local_keys and not set(ck.arrays) & sess.local_keys
        store = AdaptationStore(sess.site.state_dir, run_id)
        assert store.rounds() == [1, 2]
        privates.append(store.load_at(2))
        selected = run["summary"]["federated"]["selected_round"]
        assert sess.has_personalized(run_id, selected)
    # each site's layers are its own (trained on its own data, never averaged)
    k = "adapter.conv2.weight"
    assert not (privates[0][k] == privates[1][k]).all()
    with RunStore(run["out"] / "server" / "runstore.sqlite") as store:
        assert store.rejections(run_id) == []


def test_accountant_survives_client_restart(run: dict) -> None:
    """A new process state (fresh SiteSession) resumes the site's accountant."""
    scenario = load_scenario(run["cfg"])
    site = load_site_config(run["out"] / "sites" / "site-a" / "site.yaml")
    sess = SiteSession(site, model_cfg=scenario.model, data_cfg=scenario.data)
    with RunStore(run["out"] / "server" / "runstore.sqlite") as store:
        last = store.ledger(run["summary"]["federated"]["run_id"], "site-a")[-1].epsilon
    assert sess.epsilon_spent() == pytest.approx(last, rel=1e-9)
    # The run planned its noise to spend the cap over its 2 rounds and the
    # personalisation, so the restarted site must refuse any further round
    # rather than start from 0.
    ck = load_checkpoint(latest_checkpoint(run["out"] / "server" / "checkpoints"))
    before = sess.accountant_path.read_bytes()
    with pytest.raises(PrivacyBudgetExceeded, match=r"cap 6"):
        sess.train_round(ck.arrays, RoundRequest(
            server_round=3, total_rounds=3, local_epochs=1, lr=0.005, batch_size=4,
            run_name=run["summary"]["federated"]["run_id"], reserve_epochs=2))
    assert sess.accountant_path.read_bytes() == before


def test_personalisation_benchmark_refuses_a_dp_run(run: dict) -> None:
    """Under DP the rounds reserve the personalisation's budget, so it cannot be added later."""
    bench = Path(__file__).resolve().parents[2] / "benchmarks" / "personalize_run.py"
    proc = subprocess.run([sys.executable, str(bench), str(run["out"])], capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode != 0
    assert "trained under DP" in proc.stderr and "--dp off" in proc.stderr
