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
