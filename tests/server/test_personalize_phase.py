"""The server's personalisation phase against real ClientApps (no Ray): a
site that can personalise is scored with its personalised layers, one that
cannot says why and is scored with its layers as federated."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from client import site_runtime
from client.records import state_to_record
from medseg_core.config import ScenarioConfig, load_site_config, parse_model
from medseg_core.store import RunStore
from medseg_core.training import personalize as personalize_module
from medseg_core.training import site as site_module
from medseg_core.training.personalize import personal_store
from medseg_core.training.site import SiteSession
from server.federation import initial_state
from server.phases import FederationOutcome, evaluate_sites, personalize_sites
from server.strategies import build_strategy

from local_grid import LocalGrid, site_yamls


def test_a_site_that_cannot_personalise_says_why_and_keeps_its_federated_score(
        tmp_path: Path, monkeypatch) -> None:
    site_runtime._SESSIONS.clear()
    calibrated: list[str] = []  # evaluation.threshold reaches the personalisation's epoch pick
    real_threshold = SiteSession.site_threshold
    monkeypatch.setattr(SiteSession, "site_threshold", lambda self, model, **kw: (
        calibrated.append(self.site.id), real_threshold(self, model, **kw))[1])
    optimisers: list[tuple[str, float, float]] = []  # train.personalize's optimiser reaches the fit
    real_fit = personalize_module.fit
    monkeypatch.setattr(personalize_module, "fit", lambda model, data, settings, **kw: (
        optimisers.append((settings.optimizer, settings.lr, settings.momentum)),
        real_fit(model, data, settings, **kw))[1])
    scenario = parse_model(ScenarioConfig, {
        "rounds": 1,
        "sites": [{"id": "ok", "n_train": 12, "n_test": 3}, {"id": "no-val", "n_train": 12, "n_test": 3}],
        "model": {"channels": [8, 16], "strides": [2], "norm_groups": 4, "adaptation": "norm"},
        "data": {"image_size": 32, "val_fraction": 0.25},
        "train": {"batch_size": 4,
                  "personalize": {"epochs": 1, "lr": 0.01, "optimizer": "sgd", "momentum": 0.9}},
        "privacy": {"enabled": False},
        "evaluation": {"threshold": "site"},
    })
    paths = site_yamls(scenario, tmp_path)
    cfg = yaml.safe_load(paths[2].read_text())
    paths[2].write_text(yaml.safe_dump({**cfg, "val_fraction": 0.0}))  # nothing to pick an epoch with
    grid = LocalGrid(paths)
    arrays = state_to_record(initial_state(scenario))
    with RunStore(tmp_path / "runstore.sqlite") as store:
        store.start_run("run-p", name="p", config={}, versions={}, git_rev=None)
        node_sites: dict[int, str] = {}
        strategy = build_strategy(scenario.strategy, n_sites=2)
        outcome = FederationOutcome(run_id="run-p", rounds=1)
        args = (grid, strategy, scenario, "run-p", 1, 1, arrays, "test", store, node_sites, outcome,
                60.0)
        evaluate_sites(*args)  # as in run_federation: the test split first, as federated
        federated = {s: r.dice for s, r in outcome.sites.items()}
        calibrated.clear()
        reports = personalize_sites(grid, scenario, "run-p", 1, arrays, store, node_sites, 60.0)
        assert set(reports["ok"]) == {"layers", "val_dice_before", "val_dice_after", "epochs_kept"}
        assert reports["ok"]["layers"] == "private"
        assert "no validation cases with masks" in reports["no-val"]["error"]
        assert calibrated == ["ok", "ok"]  # the federated layers and the one epoch
        assert optimisers == [("sgd", 0.01, 0.9)]
        [rej] = store.rejections("run-p")
        assert (rej["site_id"], rej["kind"], rej["round"]) == ("no-val", "personalize-error", 2)
        evaluate_sites(*args, personalized=True)
    assert outcome.sites["ok"].personalized and not outcome.sites["no-val"].personalized
    assert outcome.sites["no-val"].dice == federated["no-val"]


def test_every_weight_is_fine_tuned_when_the_scenario_says_so(tmp_path: Path, monkeypatch) -> None:
    """train.personalize.layers: all reaches the sites through the personalise
    message: on plain FedAvg (no private layers) each site fine-tunes every
    weight (FedAvg-FT), and is then scored with its own whole model."""
    site_runtime._SESSIONS.clear()
    trained: list[int] = []
    real_fit = personalize_module.fit
    monkeypatch.setattr(personalize_module, "fit", lambda model, data, settings, **kw: (
        trained.append(len(kw["only"])), real_fit(model, data, settings, **kw))[1])
    scenario = parse_model(ScenarioConfig, {
        "rounds": 1,
        "sites": [{"id": "a", "n_train": 12, "n_test": 3}, {"id": "b", "n_train": 12, "n_test": 3}],
        "model": {"channels": [8, 16], "strides": [2], "norm_groups": 4, "adaptation": "none"},
        "data": {"image_size": 32, "val_fraction": 0.25},
        "train": {"batch_size": 4, "personalize": {"epochs": 1, "lr": 0.05, "layers": "all"}},
        "privacy": {"enabled": False},
    })
    grid = LocalGrid(site_yamls(scenario, tmp_path))
    state = initial_state(scenario)
    arrays = state_to_record(state)
    with RunStore(tmp_path / "runstore.sqlite") as store:
        store.start_run("run-ft", name="ft", config={}, versions={}, git_rev=None)
        reports = personalize_sites(grid, scenario, "run-ft", 1, arrays, store, {}, 60.0)
        assert {r["layers"] for r in reports.values()} == {"all"} and len(reports) == 2
        assert trained == [len(state)] * 2  # every key of the model, at both sites
        loaded: list[dict] = []  # what each site's evaluation scores: its own whole model
        real_load = site_module.load_state
        monkeypatch.setattr(site_module, "load_state",
                            lambda m, st: (loaded.append(dict(st)), real_load(m, st))[1])
        outcome = FederationOutcome(run_id="run-ft", rounds=1)
        evaluate_sites(grid, build_strategy(scenario.strategy, n_sites=2), scenario, "run-ft", 1, 1,
                       arrays, "test", store, {}, outcome, 60.0, personalized=True)
    assert all(r.personalized for r in outcome.sites.values()) and len(outcome.sites) == 2
    assert len(loaded) == 2  # the strategy samples the sites in its own order
    for sid in ("a", "b"):
        site_cfg = load_site_config(tmp_path / "sites" / sid / "site.yaml")
        kept = personal_store(site_cfg.state_dir, "run-ft").load_at(1)
        [st] = [st for st in loaded if set(st) == set(kept)
                and all(np.array_equal(st[k], kept[k]) for k in kept)]
        assert any(not np.array_equal(st[k], state[k]) for k in state)  # not the global model
