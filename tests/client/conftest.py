"""A tiny real site on disk and the ClientApp driven in-process."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.supercore.task_identity import TaskIdentity

from medseg_core.config import ScenarioConfig, SyntheticSiteSpec, parse_model
from medseg_core.sites import materialise_site

TINY = {
    "name": "tiny",
    "rounds": 3,
    "sites": [{"id": "h1", "n_train": 10, "n_test": 3}],
    "model": {"channels": [8, 16], "strides": [2], "norm_groups": 4},
    "data": {"image_size": 32, "val_fraction": 0.2},
    "train": {"local_epochs": 1, "batch_size": 4},
}


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 0


@pytest.fixture(autouse=True)
def _fresh_sessions() -> None:
    from client import site_runtime

    site_runtime._SESSIONS.clear()


@pytest.fixture
def tiny_scenario() -> ScenarioConfig:
    return parse_model(ScenarioConfig, TINY)


@pytest.fixture
def site_yaml(tmp_path: Path, tiny_scenario: ScenarioConfig) -> Path:
    spec = tiny_scenario.sites[0]
    assert isinstance(spec, SyntheticSiteSpec)
    materialise_site(spec, tiny_scenario, tmp_path)
    return tmp_path / "sites" / "h1" / "site.yaml"
