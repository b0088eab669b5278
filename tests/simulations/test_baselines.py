"""Pooled and local-only baselines (``medseg simulate --baselines``) on real
training: the same DP path, budget and model selection as the federation."""

from __future__ import annotations

import math

import pytest

from medseg_core.config import AdaptationMode, ScenarioConfig, parse_model
from medseg_core.sites import materialise_sites
from server.federation import initial_state
from simulations.baselines import plain_scenario, run_local, run_pooled

SCENARIO = {
    "name": "baselines",
    "seed": 3,
    "rounds": 2,
    "sites": [
        {"id": "site-a", "n_train": 13, "n_test": 4},
        {"id": "site-b", "dims": 3, "depth": 4, "n_train": 3, "n_test": 2,
         "shift": {"intensity_scale": 1.3}},
    ],
    "model": {"channels": [8, 16], "strides": [2], "norm_groups": 4, "adaptation": "norm+adapter"},
    "data": {"image_size": 32, "val_fraction": 0.25},
    "train": {"local_epochs": 1, "batch_size": 4, "lr": 0.01},
    "privacy": {"enabled": True, "epsilon": 5.0, "delta": 1.0e-5},
    "evaluation": {"select": "best_val"},
}


@pytest.fixture(scope="module")
def scenario() -> ScenarioConfig:
    return parse_model(ScenarioConfig, SCENARIO, source="test")


@pytest.fixture(scope="module")
def arms(scenario: ScenarioConfig, tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("baselines")
    sites = materialise_sites(scenario, work, dp_enabled=True)
    init = initial_state(plain_scenario(scenario))
    return {
        "sites": sites,
        "pooled": run_pooled(scenario, sites, init, dp=True),
        "local": run_local(scenario, sites, init, dp=True),
    }


def test_baselines_train_the_plain_segmenter(scenario: ScenarioConfig) -> None:
    # one centralised model has no site to adapt to; a local model is all private
    assert plain_scenario(scenario).model.adaptation is AdaptationMode.NONE
    assert scenario.model.adaptation is AdaptationMode.NORM_ADAPTER  # the input is untouched
    assert not any(k.startswith("adapter.") for k in initial_state(plain_scenario(scenario)))


def test_pooled_trains_on_the_union_and_spends_the_tightest_cap(arms: dict) -> None:
    pooled = arms["pooled"].per_site
    n_union = sum(v["n_train"] for v in arms["local"].per_site.values())
    assert set(pooled) == {"site-a", "site-b"}
    for v in pooled.values():
        assert v["n_train"] == n_union
        # noise is calibrated once so the whole budget lands at the cap
        assert 0.9 * 5.0 < v["epsilon"] <= 5.0 + 1e-6


def test_local_models_train_on_their_own_site_under_its_cap(arms: dict) -> None:
    local = arms["local"].per_site
    assert local["site-a"]["n_train"] > local["site-b"]["n_train"] > 0
    for v in local.values():
        assert 0.9 * 5.0 < v["epsilon"] <= 5.0 + 1e-6


def test_each_arm_scores_every_site_on_its_own_test_split(arms: dict) -> None:
    for arm in ("pooled", "local"):
        res = arms[arm]
        for sid, v in res.per_site.items():
            assert 0.0 <= v["dice"] <= 1.0, (arm, sid)
            assert math.isfinite(v["dice_se"]) and v["dice_se"] >= 0.0, (arm, sid)
            assert 0.0 <= v["dice_empty_baseline"] <= 1.0
        assert res.dice_mean == pytest.approx(sum(v["dice"] for v in res.per_site.values()) / 2)

