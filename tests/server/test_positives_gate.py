"""The weak positives' closed-loop warm-up (``train.weak.positives_gate``):
the decision, the site honouring it, and the server deciding it every round
from the last validation, also across a resume (real ClientApps, no Ray)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from client import site_runtime
from medseg_core import keys
from medseg_core.checkpoint import load_checkpoint
from medseg_core.config import ScenarioConfig, TrainConfig, WeakConfig, parse_model
from medseg_core.errors import ConfigError
from medseg_core.sites import materialise_site
from medseg_core.training.site import RoundRequest, SiteSession
from medseg_core.weak import WeakSettings, positives_gate_open
from server.federation import initial_state, run_federation

from local_grid import LocalGrid, site_yamls


@pytest.mark.parametrize(("val", "empty", "margin", "expected"), [
    (0.6, 0.3, None, None),  # no gate
    (None, None, 0.1, False),  # round 1: nothing validated yet
    (0.6, None, 0.1, False),  # a scoring site did not report the empty prediction's Dice
    (math.nan, 0.3, 0.1, False),
    (0.45, 0.3, 0.1, True),
    (0.35, 0.3, 0.1, False),  # above the empty prediction, by less than the margin
    (0.2, 0.3, 0.0, False),  # fell back below it: closed again
])
def test_the_gate_opens_only_on_a_validation_margin_over_the_empty_prediction(
        val: float | None, empty: float | None, margin: float | None, expected: bool | None) -> None:
    assert positives_gate_open(val, empty, margin) is expected


def test_a_closed_gate_overrides_the_fixed_warm_up_and_an_open_one_does_not_extend_it() -> None:
    s = WeakSettings(positives_from_round=3)
    assert [s.for_round(r, None).positives for r in (2, 3)] == [False, True]
    assert [s.for_round(r, True).positives for r in (2, 3)] == [False, True]
    assert [s.for_round(r, False).positives for r in (2, 3)] == [False, False]


def test_before_the_gate_opens_positives_can_train_with_the_unrefined_agreement_rule() -> None:
    block = WeakSettings.from_config(WeakConfig(
        pseudo_fg="decoder", refine="pamr", bg_blob=0.5, positives_gate=0.1,
        positives_before_gate="agree", positives_from_round=2))
    closed, opened = block.for_round(3, False), block.for_round(3, True)
    assert (closed.positives, closed.pseudo_fg, closed.refine, closed.bg_blob) == \
        (True, "agree", "none", 0.5)
    assert (opened.positives, opened.pseudo_fg, opened.refine) == (True, "decoder", "pamr")
    assert not block.for_round(1, False).positives  # the fixed warm-up still comes first
    with pytest.raises(ConfigError, match=r"positives_before_gate is 'agree'.*Fix: set positives_gate"):
        parse_model(TrainConfig, {"weak": {"positives_before_gate": "agree"}})


@pytest.mark.parametrize("bad", [-0.1, 1.0, "high"])
def test_a_bad_gate_margin_is_refused_with_its_name(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"positives_gate"):
        parse_model(TrainConfig, {"weak": {"positives_gate": bad}})


def _scenario(rounds: int, personalize: int = 0, **weak) -> ScenarioConfig:
    return parse_model(ScenarioConfig, {
        "rounds": rounds, "seed": 3,
        "sites": [{"id": "masks", "n_train": 12, "n_test": 3, "label_regime": "mask",
                   "lesion_prevalence": 1.0},
                  {"id": "reports", "n_train": 12, "n_test": 3, "label_regime": "image",
                   "lesion_prevalence": 0.5}],
        "model": {"channels": [8, 16], "strides": [2], "norm_groups": 4, "weak_head": "cam",
                  "adaptation": "norm"},
        "data": {"image_size": 32, "val_fraction": 0.25},
        "train": {"batch_size": 4, "lr": 0.01, "weak": weak,
                  "personalize": {"epochs": personalize, "lr": 0.01}},
        "privacy": {"enabled": False},
    })


def test_an_image_site_trains_on_its_positives_only_where_the_gate_is_open(tmp_path: Path) -> None:
    scenario = _scenario(1)
    site = materialise_site(scenario.sites[1], scenario, tmp_path)
    sess = SiteSession(site, model_cfg=scenario.model, data_cfg=scenario.data,
                       weak_cfg=scenario.train.weak)
    late = SiteSession(site, model_cfg=scenario.model, data_cfg=scenario.data,
                       weak_cfg=WeakConfig(positives_from_round=99))
    g = initial_state(scenario)

    def shared(s: SiteSession, run: str, gate: bool | None) -> dict[str, np.ndarray]:
        return s.train_round(g, RoundRequest(server_round=1, total_rounds=1, local_epochs=1, lr=0.01,
                                             batch_size=4, run_name=run,
                                             positives_gate_open=gate)).shared

    closed, opened, warm = shared(sess, "closed", False), shared(sess, "open", True), \
        shared(late, "warm", None)
    assert all(np.array_equal(closed[k], warm[k]) for k in closed)  # = positives not trained
    assert any(not np.array_equal(closed[k], opened[k]) for k in closed)


def _train_gates(grid: LocalGrid) -> dict[int, bool]:
    out = {}
    for m in grid.pushed:
        cfg = m.content.config_records[keys.CONFIG]
        if m.metadata.message_type == "train":
            out[int(cfg[keys.SERVER_ROUND])] = cfg[keys.POSITIVES_GATE]
    return out


def test_the_server_decides_the_gate_from_the_last_validation_and_rebuilds_it_on_resume(
        tmp_path: Path) -> None:
    site_runtime._SESSIONS.clear()
    scenario = _scenario(2, personalize=1, positives_gate=0.0)
    paths = site_yamls(scenario, tmp_path)
    out = tmp_path / "run"
    grid = LocalGrid(paths)
    first = run_federation(grid, scenario, out, run_id="gate")
    # every validation case of the mask site has a lesion: the empty prediction
    # scores 0, so a 0 margin opens the gate from round 2 on, never in round 1
    assert _train_gates(grid) == {1: False, 2: True}
    assert first.positives_rounds == [2]
    metas = {r: load_checkpoint(out / "checkpoints" / f"round_{r:04d}").meta for r in (1, 2)}
    assert metas[1]["val_empty_dice"] == 0.0 and metas[1]["val_dice"] is not None
    assert [metas[r]["positives_gate_open"] for r in (1, 2)] == [False, True]

    # the selected model's personalisation trains on positives as its next round would
    [pers] = [m for m in grid.pushed if m.metadata.message_type == "train.personalize"][:1]
    assert pers.content.config_records[keys.CONFIG][keys.POSITIVES_GATE] is True

    # resumed for a third round: its gate follows round 2's checkpoint (a run
    # that forgot it would start closed), and the rounds before keep their record
    resumed_grid = LocalGrid(paths)
    again = run_federation(resumed_grid, scenario.model_copy(update={"rounds": 3}), out,
                           run_id="gate", resume=True)
    assert _train_gates(resumed_grid) == {3: True}
    assert again.positives_rounds == [2, 3]


def test_without_a_gate_no_train_message_carries_one(tmp_path: Path) -> None:
    site_runtime._SESSIONS.clear()
    scenario = _scenario(1)
    paths = site_yamls(scenario, tmp_path)
    grid = LocalGrid(paths)
    outcome = run_federation(grid, scenario, tmp_path / "run", run_id="no-gate")
    trains = [m for m in grid.pushed if m.metadata.message_type == "train"]
    assert trains and all(keys.POSITIVES_GATE not in m.content.config_records[keys.CONFIG]
                          for m in trains)
    assert outcome.positives_rounds is None
