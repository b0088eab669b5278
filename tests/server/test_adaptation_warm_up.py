"""``train.adaptation_from_round``: a site's private adaptation layers wait
while the shared weights train, then train from that round on. Real
ClientApps behind the server's round loop (no Ray), DP-SGD on, and the
config errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from client import site_runtime
from medseg_core import keys
from medseg_core.adaptation import AdaptationStore
from medseg_core.config import ScenarioConfig, parse_model
from medseg_core.config.loading import load_site_config
from medseg_core.errors import ConfigError
from medseg_core.training.site import SiteSession
from server.federation import run_federation

from local_grid import LocalGrid, shift_pair, site_yamls


def _raw(*, rounds: int = 3, start: int = 3, adaptation: str = "adapter") -> dict:
    return shift_pair(seed=2, rounds=rounds, adaptation=adaptation, dp=True,
                      train={"lr": 0.01, "adaptation_from_round": start})


def test_private_layers_wait_until_their_round_then_train(tmp_path: Path) -> None:
    site_runtime._SESSIONS.clear()
    scenario = parse_model(ScenarioConfig, _raw())
    grid = LocalGrid(site_yamls(scenario, tmp_path))
    run_federation(grid, scenario, tmp_path / "run", run_id="warm")
    train = [m for m in grid.pushed if m.metadata.message_type == "train"]
    assert {int(m.content.config_records[keys.CONFIG][keys.ADAPTATION_FROM_ROUND])
            for m in train} == {3}  # the setting reaches every site in every round
    for spec in scenario.sites:
        sess = SiteSession(load_site_config(tmp_path / "sites" / spec.id / "site.yaml"),
                           model_cfg=scenario.model, data_cfg=scenario.data)
        init = sess._initial_private()
        store = AdaptationStore(sess.site.state_dir, "warm")
        assert store.rounds() == [1, 2, 3]
        for rnd in (1, 2):  # saved every round, and still the initial (identity) adapter
            at = store.load_at(rnd)
            assert set(at) == set(init) and all(np.array_equal(at[k], init[k]) for k in init)
        last = store.load_at(3)
        assert any(not np.array_equal(last[k], init[k]) for k in init), spec.id


@pytest.mark.parametrize(("change", "msg"), [
    ({"adaptation": "none"}, r"adaptation_from_round is 3 but model.adaptation is 'none'.*Fix"),
    ({"rounds": 2}, r"adaptation_from_round is 3 but the run has 2 round\(s\).*Fix: a round "
                    r"from 1 to 2"),
    ({"start": 0}, r"adaptation_from_round"),
])
def test_a_warm_up_that_cannot_apply_is_refused(change: dict, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        parse_model(ScenarioConfig, _raw(**change))
