"""``train.private_epochs``: FedRep's local order, the private adaptation
layers alone (shared weights frozen) before each round's local epochs.
Real ClientApps behind the server's round loop (no Ray), and the errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from client import site_runtime
from medseg_core import keys
from medseg_core.config import ScenarioConfig, parse_model
from medseg_core.config.loading import load_site_config
from medseg_core.errors import ConfigError
from medseg_core.training.rounds import RoundRequest
from medseg_core.training.session import FitSettings, build_segmenter
from medseg_core.training.site import SiteSession
from server.federation import run_federation

from local_grid import LocalGrid, shift_pair, site_yamls


def _raw(*, epochs: int = 1, dp: bool = False, adaptation: str = "adapter") -> dict:
    return shift_pair(seed=3, rounds=2, adaptation=adaptation, dp=dp,
                      train={"lr": 0.05, "private_epochs": epochs})


def _session(scenario: ScenarioConfig, root: Path, site: str) -> SiteSession:
    return SiteSession(load_site_config(root / "sites" / site / "site.yaml"),
                       model_cfg=scenario.model, data_cfg=scenario.data)


def test_private_layers_train_alone_first_and_the_run_goes_on(tmp_path: Path) -> None:
    site_runtime._SESSIONS.clear()
    scenario = parse_model(ScenarioConfig, _raw())
    grid = LocalGrid(site_yamls(scenario, tmp_path))
    run_federation(grid, scenario, tmp_path / "run", run_id="fedrep")
    train = [m for m in grid.pushed if m.metadata.message_type == "train"]
    assert len(train) == 4 and {int(m.content.config_records[keys.CONFIG][keys.PRIVATE_EPOCHS])
                                for m in train} == {1}
    # the private phase itself, on the real session: only the private layers
    # move, and every weight is trainable again for the local epochs
    sess = _session(scenario, tmp_path, "dark")
    model = build_segmenter(scenario.model, scenario.data)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    req = RoundRequest(server_round=1, total_rounds=2, local_epochs=1, lr=0.05, batch_size=4,
                       optimizer="sgd", momentum=0.9, private_epochs=2)
    settings = FitSettings(epochs=1, lr=0.05, batch_size=4, optimizer="sgd", momentum=0.9, seed=0)
    sess._fit_private_first(model, req, settings, sess.weak_settings, None)
    after = model.state_dict()
    moved = {k for k in after if not torch.equal(after[k], before[k])}
    assert moved and moved <= sess.local_keys, sorted(moved - sess.local_keys)[:4]
    assert all(p.requires_grad for p in model.parameters())


def test_a_dp_site_refuses_private_epochs_before_training(tmp_path: Path) -> None:
    # the scenario refuses DP + private_epochs at load; a deployed site that
    # turns DP on itself gets the request anyway, and refuses it, spending nothing
    scenario = parse_model(ScenarioConfig, _raw(epochs=0, dp=True))
    site_yamls(scenario, tmp_path)
    sess = _session(scenario, tmp_path, "ref")
    shared = {k: v.numpy() for k, v in build_segmenter(scenario.model, scenario.data)
              .state_dict().items() if k not in sess.local_keys}
    req = RoundRequest(server_round=1, total_rounds=2, local_epochs=1, lr=0.05, batch_size=4,
                       optimizer="sgd", private_epochs=1, run_name="dp")
    with pytest.raises(ConfigError, match=r"site ref: train.private_epochs is 1 but this site "
                                          r"trains under DP.*Fix"):
        sess.train_round(shared, req)
    assert not sess.accountant_path.exists() or sess.load_accountant().history == []


@pytest.mark.parametrize(("change", "msg"), [
    ({"adaptation": "none"}, r"private_epochs is 1 but model.adaptation is 'none'.*Fix"),
    ({"dp": True}, r"private_epochs is 1 with privacy.enabled.*Fix: .*without_dp"),
    ({"epochs": -1}, r"private_epochs"),
])
def test_private_epochs_that_cannot_apply_are_refused(change: dict, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        parse_model(ScenarioConfig, _raw(**change))


def test_private_epochs_in_without_dp_apply_only_without_dp() -> None:
    raw = {**_raw(epochs=0, dp=True), "without_dp": {"train": {"private_epochs": 2}}}
    scenario = parse_model(ScenarioConfig, raw)
    assert scenario.for_privacy().train.private_epochs == 0
    assert scenario.for_privacy(False).train.private_epochs == 2
    assert np.isclose(scenario.for_privacy(False).train.lr, 0.05)
