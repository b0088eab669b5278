"""Strategy registry and metric aggregation."""

import pytest
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedMedian, FedProx, FedTrimmedAvg, Krum

from medseg_core.config import StrategyConfig, StrategyName
from server.strategies import build_strategy, weighted_mean_metrics


@pytest.mark.parametrize(
    ("name", "cls"),
    [(StrategyName.FEDAVG, FedAvg), (StrategyName.FEDAVGM, FedAvgM), (StrategyName.FEDPROX, FedProx), (StrategyName.FEDADAM, FedAdam),
     (StrategyName.FEDMEDIAN, FedMedian), (StrategyName.FEDTRIMMEDAVG, FedTrimmedAvg),
     (StrategyName.KRUM, Krum)],
)
def test_every_configured_strategy_builds(name: StrategyName, cls: type) -> None:
    strategy = build_strategy(StrategyConfig(name=name), n_sites=3)
    assert type(strategy) is cls
    assert strategy.min_train_nodes == 3


def test_fedprox_carries_mu() -> None:
    strategy = build_strategy(StrategyConfig(name="fedprox", proximal_mu=0.5), n_sites=2)
    assert strategy.proximal_mu == 0.5


def test_weighted_mean_metrics() -> None:
    recs = [RecordDict({"m": MetricRecord({"num-examples": 10, "dice": 0.2})}),
            RecordDict({"m": MetricRecord({"num-examples": 30, "dice": 0.6})})]
    out = weighted_mean_metrics(recs, "num-examples")
    assert out["dice"] == pytest.approx(0.5)
    assert out["num-examples"] == 40


def test_fedavgm_carries_server_momentum() -> None:
    strategy = build_strategy(StrategyConfig(name="fedavgm", server_momentum=0.5), n_sites=3)
    assert strategy.server_momentum == 0.5 and strategy.server_learning_rate == 1.0


def _train_reply(value: float, n: int, regime: str):  # noqa: ANN202
    import numpy as np
    from flwr.app import ConfigRecord, Message

    from client.records import state_to_record
    from medseg_core import keys

    ins = Message(RecordDict({}), dst_node_id=1, message_type="train")
    content = RecordDict({
        keys.ARRAYS: state_to_record({"w": np.full((2,), value, dtype=np.float32)}),
        keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: n, keys.TRAIN_LOSS: 0.1}),
        keys.SITE: ConfigRecord({keys.SITE_ID: regime, keys.LABEL_REGIME: regime}),
    })
    return Message(content, reply_to=ins)


@pytest.mark.parametrize("name", [StrategyName.FEDAVG, StrategyName.FEDAVGM])
def test_regime_weights_set_what_aggregation_weighs_by(name: StrategyName) -> None:
    from server.federation import set_aggregation_weight

    cfg = StrategyConfig(name=name, regime_weights={"image": 0.25})
    replies = [_train_reply(1.0, 100, "mask"), _train_reply(0.0, 100, "image"),
               _train_reply(0.0, 100, "bag")]
    assert [set_aggregation_weight(r, cfg) for r in replies] == [100.0, 25.0, 100.0]
    strategy = build_strategy(cfg, n_sites=3)
    if name == StrategyName.FEDAVGM:  # FedAvgM steps from the current global model
        import numpy as np

        from client.records import state_to_record

        strategy.current_arrays = state_to_record({"w": np.zeros((2,), dtype=np.float32)})
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    assert arrays["w"].numpy() == pytest.approx(100 / 225)  # not the unweighted 1 / 3


def test_regime_weights_must_be_positive_known_regimes() -> None:
    from medseg_core.config import parse_model
    from medseg_core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"regime_weights.*positive.*got \{'image': 0.0\}.*Fix"):
        parse_model(StrategyConfig, {"regime_weights": {"image": 0.0}})
    with pytest.raises(ConfigError, match=r"regime_weights.*(mask|image|bag)"):
        parse_model(StrategyConfig, {"regime_weights": {"images": 0.5}})


def test_replies_in_site_order_aggregate_the_same_whatever_order_they_arrived_in() -> None:
    """A float32 weighted sum depends on its order; arrival order changes from
    run to run, so the server sorts replies by site before aggregating."""
    import numpy as np
    from flwr.app import ConfigRecord, Message

    from client.records import state_to_record
    from medseg_core import keys
    from server.federation import in_site_order, set_aggregation_weight

    rng = np.random.default_rng(0)

    def reply(site: str, node: int, n: int):  # noqa: ANN202
        ins = Message(RecordDict({}), dst_node_id=node, message_type="train")
        content = RecordDict({
            keys.ARRAYS: state_to_record({"w": rng.standard_normal(4096).astype(np.float32)}),
            keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: n, keys.TRAIN_LOSS: 0.1}),
            keys.SITE: ConfigRecord({keys.SITE_ID: site, keys.LABEL_REGIME: "mask"}),
        })
        msg = Message(content, reply_to=ins)
        set_aggregation_weight(msg, StrategyConfig(name="fedavg"))
        return node, msg

    pairs = [reply("masks", 7, 480), reply("reports-1", 3, 600), reply("reports-2", 11, 600),
             reply("volumes", 5, 60)]

    def aggregate(order: list[tuple[int, Message]]) -> np.ndarray:
        arrays, _ = build_strategy(StrategyConfig(name="fedavg"), n_sites=4).aggregate_train(
            1, [m for _, m in order])
        return arrays["w"].numpy()

    arrived = [pairs[3], pairs[1], pairs[0], pairs[2]]
    assert not np.array_equal(aggregate(pairs), aggregate(arrived))  # order shows in the bits
    node_sites: dict[int, str] = {}
    assert [n for n, _ in in_site_order(arrived, node_sites)] == [7, 3, 11, 5]
    assert node_sites == {7: "masks", 3: "reports-1", 11: "reports-2", 5: "volumes"}
    assert np.array_equal(aggregate(in_site_order(arrived, node_sites)),
                          aggregate(in_site_order(list(reversed(pairs)), node_sites)))


@pytest.mark.parametrize("name", [StrategyName.FEDAVG, StrategyName.FEDAVGM])
def test_an_array_is_averaged_over_the_sites_that_trained_it(name: StrategyName) -> None:
    """A site that did not train a head returns it unchanged; its copy must not
    pull the aggregate back (the MIL head trained by one bag site)."""
    import numpy as np
    from flwr.app import ConfigRecord, Message

    from client.records import state_to_record
    from medseg_core import keys
    from server.federation import average_over_trainers, set_aggregation_weight

    ref = {"body": np.zeros(3, np.float32), "mil_head": np.zeros(2, np.float32),
           "unused": np.ones(2, np.float32), "steps": np.array([5], np.int64)}

    def reply(body: float, head: float | None, n: int) -> Message:
        state = {"body": np.full(3, body, np.float32),
                 "mil_head": ref["mil_head"] if head is None else np.full(2, head, np.float32),
                 "unused": ref["unused"], "steps": ref["steps"]}
        ins = Message(RecordDict({}), dst_node_id=1, message_type="train")
        msg = Message(RecordDict({
            keys.ARRAYS: state_to_record(state),
            keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: n, keys.TRAIN_LOSS: 0.1}),
            keys.SITE: ConfigRecord({keys.SITE_ID: "s", keys.LABEL_REGIME: "mask"}),
        }), reply_to=ins)
        set_aggregation_weight(msg, StrategyConfig(name="fedavg"))
        return msg

    # two sites trained the MIL head (weights 100 and 300), two did not
    replies = [reply(1.0, 2.0, 100), reply(2.0, None, 200), reply(3.0, 6.0, 300),
               reply(4.0, None, 400)]
    assert average_over_trainers(replies, ref) == ["mil_head"]
    strategy = build_strategy(StrategyConfig(name=name), n_sites=4)
    if name == StrategyName.FEDAVGM:
        strategy.current_arrays = state_to_record(ref)
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays["mil_head"].numpy() == pytest.approx((100 * 2.0 + 300 * 6.0) / 400)  # 5.0
    assert arrays["body"].numpy() == pytest.approx((100 + 400 + 900 + 1600) / 1000)  # everyone
    assert arrays["unused"].numpy() == pytest.approx(1.0)
    # nobody trained it, or everybody did: nothing to fill
    assert average_over_trainers([reply(1.0, None, 10), reply(2.0, None, 10)], ref) == []
    assert average_over_trainers([reply(1.0, 1.0, 10), reply(2.0, 3.0, 10)], ref) == []
