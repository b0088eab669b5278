"""The real ClientApp, called in-process with real Flower messages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client.app import build_client_app, record_to_state, state_to_record
from medseg_core import keys
from medseg_core.config import ScenarioConfig, load_site_config, parse_model
from medseg_core.data.io import write_nifti
from medseg_core.privacy.accountant import epsilon_of, load_accountant
from medseg_core.sites import materialise_site
from server.federation import _train_config, initial_state


def _train_msg(scenario: ScenarioConfig, rnd: int, state: dict | None = None, **over) -> Message:
    cfg = _train_config(scenario, "test-run")
    cfg[keys.SERVER_ROUND] = rnd
    cfg.update(over)
    content = RecordDict({
        keys.ARRAYS: state_to_record(state or initial_state(scenario)),
        keys.CONFIG: ConfigRecord(cfg),
    })
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


def _ctx(site_yaml: Path) -> Context:
    return Context(run_id=1, node_id=1, node_config={"site-config": str(site_yaml)},
                   state=RecordDict(), run_config={})


def test_train_reply_carries_only_weights_metrics_and_privacy(
    site_yaml: Path, tiny_scenario: ScenarioConfig
) -> None:
    app = build_client_app()
    reply = app(_train_msg(tiny_scenario, 1), _ctx(site_yaml))
    assert not reply.has_error(), reply.error
    c = reply.content
    assert set(c.array_records) == {keys.ARRAYS}
    assert set(record_to_state(c.array_records[keys.ARRAYS])) == set(initial_state(tiny_scenario))
    assert set(c.metric_records[keys.METRICS]) == {
        keys.NUM_EXAMPLES, keys.TRAIN_LOSS, keys.DICE, keys.TRAIN_SECONDS}
    assert set(c.config_records) == {keys.SITE, "privacy"}
    assert c.config_records[keys.SITE][keys.SITE_ID] == "h1"
    assert 0 < c.config_records["privacy"][keys.EPSILON] <= 8.0
    # no path, file name or pixel data leaves the site
    flat = repr(c.config_records[keys.SITE]) + repr(c.config_records["privacy"])
    assert str(load_site_config(site_yaml).data_dir) not in flat


def test_epsilon_composes_and_survives_client_restart(
    site_yaml: Path, tiny_scenario: ScenarioConfig
) -> None:
    from client import site_runtime

    eps = []
    for rnd in (1, 2):
        reply = build_client_app()(_train_msg(tiny_scenario, rnd), _ctx(site_yaml))
        eps.append(reply.content.config_records["privacy"][keys.EPSILON])
    site_runtime._SESSIONS.clear()  # the client process restarts: nothing in memory
    reply = build_client_app()(_train_msg(tiny_scenario, 3), _ctx(site_yaml))
    eps.append(reply.content.config_records["privacy"][keys.EPSILON])
    assert eps[0] < eps[1] < eps[2] <= 8.0 + 1e-6
    site = load_site_config(site_yaml)
    stored = epsilon_of(load_accountant(site.state_dir / "accountant.json", "rdp"), site.delta)
    assert np.isclose(stored, eps[2])
    ledger = (site.state_dir / "ledger.jsonl").read_text().splitlines()
    assert len(ledger) == 3


def test_spent_budget_gets_error_reply_and_trains_nothing(
    site_yaml: Path, tiny_scenario: ScenarioConfig
) -> None:
    app = build_client_app()
    # a one-round plan spends the whole cap in round 1 ...
    first = app(_train_msg(tiny_scenario, 1, **{keys.TOTAL_ROUNDS: 1}), _ctx(site_yaml))
    assert not first.has_error()
    site = load_site_config(site_yaml)
    before = (site.state_dir / "accountant.json").read_bytes()
    # ... so any further round must be refused
    reply = app(_train_msg(tiny_scenario, 2, **{keys.TOTAL_ROUNDS: 1}), _ctx(site_yaml))
    assert reply.has_error()
    assert reply.error.code == keys.ERR_BUDGET_EXHAUSTED
    assert "PrivacyBudgetExceeded" in reply.error.reason and "8" in reply.error.reason
    assert (site.state_dir / "accountant.json").read_bytes() == before


def test_corrupt_site_data_gets_integrity_error_reply(
    site_yaml: Path, tiny_scenario: ScenarioConfig
) -> None:
    site = load_site_config(site_yaml)
    img = sorted((site.data_dir / "imagesTr").iterdir())[0]
    write_nifti(np.full((32, 32), np.nan, np.float32), img)
    reply = build_client_app()(_train_msg(tiny_scenario, 1), _ctx(site_yaml))
    assert reply.has_error()
    assert reply.error.code == keys.ERR_DATA_INTEGRITY
    assert "nan" in reply.error.reason.lower()


def test_node_without_site_config_is_told_how_to_fix(tiny_scenario: ScenarioConfig) -> None:
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply = build_client_app()(_train_msg(tiny_scenario, 1), ctx)
    assert reply.has_error()
    assert reply.error.code == keys.ERR_SITE_CONFIG
    assert "--node-config" in reply.error.reason


def test_mistyped_server_config_refused(site_yaml: Path, tiny_scenario: ScenarioConfig) -> None:
    reply = build_client_app()(
        _train_msg(tiny_scenario, 1, **{keys.LOCAL_EPOCHS: "two"}), _ctx(site_yaml)
    )
    assert reply.has_error() and "local-epochs" in reply.error.reason
    gate = build_client_app()(_train_msg(tiny_scenario, 1, **{keys.POSITIVES_GATE: 1}),
                              _ctx(site_yaml))
    assert gate.has_error() and gate.error.code == keys.ERR_SITE_CONFIG
    assert f"'{keys.POSITIVES_GATE}' must be a bool, got int 1" in gate.error.reason


def test_evaluate_reports_dice_on_test_split(site_yaml: Path, tiny_scenario: ScenarioConfig) -> None:
    cfg = ConfigRecord({keys.SERVER_ROUND: 1, keys.EVAL_SPLIT: "test",
                        "model": tiny_scenario.model.model_dump_json(),
                        "data": tiny_scenario.data.model_dump_json()})
    msg = Message(RecordDict({keys.ARRAYS: state_to_record(initial_state(tiny_scenario)),
                              keys.CONFIG: cfg}), dst_node_id=1, message_type=MessageType.EVALUATE)
    reply = build_client_app()(msg, _ctx(site_yaml))
    m = reply.content.metric_records[keys.METRICS]
    assert 0.0 <= m[keys.DICE] <= 1.0 and m[keys.NUM_EXAMPLES] > 0
    assert not reply.content.array_records  # evaluation sends no weights back
    assert yaml.safe_load(site_yaml.read_text())["id"] == "h1"
    assert isinstance(ArrayRecord(), ArrayRecord)


def test_sites_do_not_share_random_streams(tmp_path: Path, tiny_scenario: ScenarioConfig) -> None:
    from medseg_core.config import SiteConfig
    from medseg_core.training.site import SiteSession

    def seed_of(site_id: str) -> int:
        sess = SiteSession.__new__(SiteSession)
        sess.site = SiteConfig(id=site_id, data_dir=tmp_path, state_dir=tmp_path)
        return sess.round_seed(3)

    assert seed_of("a") != seed_of("b")
    assert seed_of("a") == seed_of("a")


def test_evaluation_refinement_reaches_the_site_and_a_bad_value_is_named(
    site_yaml: Path, tiny_scenario: ScenarioConfig
) -> None:
    scenario = tiny_scenario.model_copy(
        update={"evaluation": tiny_scenario.evaluation.model_copy(update={"refine": "pamr"})})
    assert _train_config(scenario, "r")[keys.EVAL_REFINE] == "pamr"  # validation during training

    def evaluate(refine: str) -> Message:
        cfg = ConfigRecord({keys.SERVER_ROUND: 1, keys.EVAL_SPLIT: "test", keys.EVAL_REFINE: refine,
                            "model": tiny_scenario.model.model_dump_json(),
                            "data": tiny_scenario.data.model_dump_json()})
        msg = Message(RecordDict({keys.ARRAYS: state_to_record(initial_state(tiny_scenario)),
                                  keys.CONFIG: cfg}), dst_node_id=1,
                      message_type=MessageType.EVALUATE)
        return build_client_app()(msg, _ctx(site_yaml))

    ok = evaluate("pamr")
    assert not ok.has_error() and 0.0 <= ok.content.metric_records[keys.METRICS][keys.DICE] <= 1.0
    bad = evaluate("crf")
    assert bad.has_error()
    assert "'crf'" in bad.error.reason and "pamr" in bad.error.reason


def test_bag_batch_size_reaches_a_mil_site_through_the_train_message(tmp_path: Path) -> None:
    """``train.bag_batch_size`` travels in the train message and sets the MIL
    site's bags per DP step: its ledger's sample rate is 4 of 8 bags, where
    without it 8 slices' worth (2 bags of 4 slices) is 2 of 8."""
    def ledger_rate(bags: int | None, out: Path) -> float:
        scenario = parse_model(ScenarioConfig, {
            "rounds": 2,
            "sites": [{"id": "mil", "dims": 3, "depth": 4, "n_train": 8, "n_test": 3,
                       "label_regime": "bag", "lesion_prevalence": 0.5}],
            "model": {"channels": [8, 16], "strides": [2], "norm_groups": 4,
                      "mil_pooling": "attention"},
            "data": {"image_size": 32},
            "train": {"batch_size": 8, "bag_batch_size": bags, "optimizer": "sgd", "lr": 0.05},
            "privacy": {"epsilon": 8.0}})
        materialise_site(scenario.sites[0], scenario, out)
        msg = _train_msg(scenario, 1)
        assert msg.content.config_records[keys.CONFIG][keys.BAG_BATCH_SIZE] == (bags or 0)
        reply = build_client_app()(msg, _ctx(out / "sites" / "mil" / "site.yaml"))
        assert not reply.has_error(), reply.error
        row = json.loads((out / "sites" / "mil" / "state" / "ledger.jsonl").read_text()
                         .splitlines()[-1])
        return float(row["sample_rate"])

    assert ledger_rate(4, tmp_path / "a") == 0.5
    assert ledger_rate(None, tmp_path / "b") == 0.25
