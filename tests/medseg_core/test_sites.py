"""Scenario site specs -> site directories and private site configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medseg_core.attacks import apply_attack
from medseg_core.config import Attack, ScenarioConfig, load_site_config, parse_model
from medseg_core.sites import materialise_site, materialise_sites
from medseg_core.training.site import RoundRequest, SiteSession


def _scenario(sites: list[dict]) -> ScenarioConfig:
    return parse_model(ScenarioConfig, {
        "sites": sites, "model": {"channels": [8, 16], "strides": [2], "norm_groups": 4},
        "data": {"image_size": 32}, "privacy": {"epsilon": 5.0},
    })


def test_materialise_writes_private_site_yaml(tmp_path: Path) -> None:
    scenario = _scenario([{"id": "a", "n_train": 4, "n_test": 2, "epsilon": 2.0}, {"id": "b", "n_train": 4}])
    sites = materialise_sites(scenario, tmp_path)
    assert [s.id for s in sites] == ["a", "b"]
    a = load_site_config(tmp_path / "sites" / "a" / "site.yaml")
    assert a.epsilon == 2.0 and sites[1].epsilon == 5.0  # site cap overrides the default
    assert (a.data_dir / "dataset.json").is_file()


def test_path_site_uses_the_users_directory(tmp_path: Path) -> None:
    first = materialise_site(_scenario([{"id": "g", "n_train": 4}]).sites[0], _scenario([{"id": "g"}]),
                             tmp_path / "gen")
    scenario = _scenario([{"id": "mine", "path": str(first.data_dir)}])
    site = materialise_site(scenario.sites[0], scenario, tmp_path / "run")
    assert site.data_dir == first.data_dir


def test_anatomy_site_trains_one_round(tmp_path: Path) -> None:
    pytest.importorskip("nilearn")
    scenario = _scenario([{"id": "t1", "kind": "anatomy", "source": "mni152_t1_2mm",
                           "n_train": 6, "n_test": 2}])
    site = materialise_site(scenario.sites[0], scenario, tmp_path)
    site = site.model_copy(update={"dp_enabled": False})
    sess = SiteSession(site, model_cfg=scenario.model, data_cfg=scenario.data)
    assert sess.train_set.labels is not None and int(sess.train_set.labels.max()) == 1
    from server.federation import initial_state

    out = sess.train_round(initial_state(scenario), RoundRequest(
        server_round=1, total_rounds=1, local_epochs=1, lr=0.01, batch_size=4))
    assert np.isfinite(out.fit.loss) and out.epsilon is None


def test_unknown_anatomy_source_is_clear(tmp_path: Path) -> None:
    pytest.importorskip("nilearn")
    scenario = _scenario([{"id": "x", "kind": "anatomy", "source": "mni999"}])
    with pytest.raises(Exception, match="mni999"):
        materialise_site(scenario.sites[0], scenario, tmp_path)


@pytest.mark.parametrize(("attack", "expected"), [
    (Attack.NONE, 2.0), (Attack.SIGN_FLIP, 0.0), (Attack.SCALE, 11.0), (Attack.FLIP_SCALE, -9.0)])
def test_attacks(attack: Attack, expected: float) -> None:
    g, l_ = {"w": np.ones(3, np.float32)}, {"w": np.full(3, 2.0, np.float32)}
    assert apply_attack(attack, l_, g)["w"][0] == expected
    assert np.isnan(apply_attack(Attack.NAN, l_, g)["w"]).all()
