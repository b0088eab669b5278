"""Every message a site sends carries shared parameters only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from client.app import build_client_app, record_to_state, state_to_record
from medseg_core import keys
from medseg_core.adaptation import AdaptationStore, local_keys
from medseg_core.config import (
    AdaptationMode,
    PersonalizeConfig,
    ScenarioConfig,
    SyntheticSiteSpec,
    load_site_config,
)
from medseg_core.sites import materialise_site
from medseg_core.training.session import build_segmenter
from server.federation import _train_config, initial_state


@pytest.fixture
def adapted(tmp_path: Path, tiny_scenario: ScenarioConfig) -> tuple[ScenarioConfig, Path]:
    model = tiny_scenario.model.model_copy(update={"adaptation": AdaptationMode.NORM_ADAPTER})
    train = tiny_scenario.train.model_copy(
        update={"personalize": PersonalizeConfig(epochs=1)})  # the rounds reserve its budget
    scenario = tiny_scenario.model_copy(update={"model": model, "train": train})
    spec = scenario.sites[0]
    assert isinstance(spec, SyntheticSiteSpec)
    materialise_site(spec, scenario, tmp_path)
    return scenario, tmp_path / "sites" / "h1" / "site.yaml"


def _msg(scenario: ScenarioConfig, rnd: int, state: dict, kind: str) -> Message:
    if kind == MessageType.TRAIN:
        cfg = _train_config(scenario, "run-x")
    elif kind == "train.personalize":
        cfg = {keys.RUN_NAME: "run-x", keys.MODEL_ROUND: rnd, keys.PERSONALIZE_EPOCHS: 1,
               keys.LEARNING_RATE: 1e-2, "batch-size": 4,
               "model": scenario.model.model_dump_json(), "data": scenario.data.model_dump_json()}
    else:
        cfg = {keys.EVAL_SPLIT: "test", keys.RUN_NAME: "run-x", keys.MODEL_ROUND: rnd,
               "model": scenario.model.model_dump_json(), "data": scenario.data.model_dump_json()}
    cfg[keys.SERVER_ROUND] = rnd
    return Message(RecordDict({keys.ARRAYS: state_to_record(state), keys.CONFIG: ConfigRecord(cfg)}),
                   dst_node_id=1, message_type=kind)


def _ctx(site_yaml: Path) -> Context:
    return Context(run_id=1, node_id=1, node_config={"site-config": str(site_yaml)},
                   state=RecordDict(), run_config={})


def _sent_keys(reply: Message) -> set[str]:
    out: set[str] = set()
    for rec in reply.content.array_records.values():
        out |= set(rec.keys())
    return out


def test_no_message_a_site_sends_holds_an_adaptation_key(adapted) -> None:
    scenario, site_yaml = adapted
    local = local_keys(build_segmenter(scenario.model, scenario.data), scenario.model.adaptation)
    assert local  # the test would be vacuous otherwise
    app = build_client_app()
    state = initial_state(scenario)
    assert not set(state) & local  # the server never holds one either
    sent: list[Message] = []
    for rnd in (1, 2):
        reply = app(_msg(scenario, rnd, state, MessageType.TRAIN), _ctx(site_yaml))
        assert not reply.has_error(), reply.error
        sent.append(reply)
        state = record_to_state(reply.content.array_records[keys.ARRAYS])
        sent.append(app(_msg(scenario, rnd, state, MessageType.EVALUATE), _ctx(site_yaml)))
    # post-federation personalisation: metrics only, not even shared weights
    reply = app(_msg(scenario, 2, state, "train.personalize"), _ctx(site_yaml))
    assert not reply.has_error(), reply.error
    assert not reply.content.array_records
    m = reply.content.metric_records[keys.METRICS]
    assert 0.0 <= m[keys.DICE_BEFORE] <= m[keys.DICE] <= 1.0 and m[keys.STEPS] > 0
    sent.append(reply)
    ev = _msg(scenario, 2, state, MessageType.EVALUATE)
    ev.content.config_records[keys.CONFIG][keys.PERSONALIZED] = True
    sent.append(app(ev, _ctx(site_yaml)))
    assert sent[-1].content.config_records[keys.SITE][keys.PERSONALIZED] is True
    for reply in sent:
        assert not _sent_keys(reply) & local
        for rec in reply.content.config_records.values():
            assert not any(k in str(dict(rec)) for k in local)
    assert set(record_to_state(sent[0].content.array_records[keys.ARRAYS])) == set(
        initial_state(scenario))
    # the private parameters stayed on the site, one file per round, and trained
    site = load_site_config(site_yaml)
    store = AdaptationStore(site.state_dir, "run-x")
    assert store.rounds() == [1, 2]
    adapter_out = store.load_at(2)["adapter.conv2.weight"]
    assert set(store.load_at(2)) == local and np.abs(adapter_out).sum() > 0


def test_a_leaking_update_is_refused_before_sending(adapted, monkeypatch) -> None:
    scenario, site_yaml = adapted
    import client.app as client_app

    # a bug between training and sending that puts a private parameter back
    def leaky(attack, state, reference):
        return {**state, "adapter.conv2.bias": np.zeros(1, np.float32)}

    monkeypatch.setattr(client_app, "apply_attack", leaky)
    reply = build_client_app()(
        _msg(scenario, 1, initial_state(scenario), MessageType.TRAIN), _ctx(site_yaml))
    assert reply.has_error()
    assert reply.error.code == keys.ERR_ADAPTATION_LEAK
    assert "site-private adaptation parameter" in reply.error.reason
    assert not reply.has_content()  # nothing was sent


def test_private_parameters_survive_a_client_restart(adapted) -> None:
    from client import site_runtime

    scenario, site_yaml = adapted
    state = initial_state(scenario)
    build_client_app()(_msg(scenario, 1, state, MessageType.TRAIN), _ctx(site_yaml))
    site = load_site_config(site_yaml)
    after_1 = AdaptationStore(site.state_dir, "run-x").load_at(1)
    site_runtime._SESSIONS.clear()  # the client process restarts
    sess = site_runtime.session_for(site, scenario.model.model_dump_json(),
                                    scenario.data.model_dump_json())
    resumed = sess.private_state("run-x", 2, before=True)
    assert resumed.keys() == after_1.keys()
    assert all(np.array_equal(resumed[k], after_1[k]) for k in after_1)
    fresh = sess.private_state("another-run", 2, before=True)
    assert not np.array_equal(fresh["adapter.conv2.weight"], after_1["adapter.conv2.weight"])
