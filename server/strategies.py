"""Strategy registry: config name -> Flower Message-API strategy.

Aggregation is Flower's own (FedAvg, FedAvgM, FedProx, FedAdam, FedMedian,
FedTrimmedAvg, Krum). What medseg adds wraps around them in
:mod:`server.federation`: reply validation before aggregation, the privacy
ledger, checkpoints and the run store.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    Strategy,
)

from medseg_core import keys
from medseg_core.config import StrategyConfig, StrategyName

__all__ = ["STRATEGIES", "build_strategy", "weighted_mean_metrics"]


def weighted_mean_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Example-weighted mean of every metric (Dice, loss); weights summed.

    Privacy is not aggregated here: the run-level epsilon of a site is taken
    from its privacy records as a max, never averaged (see server.federation).
    """
    weights = [float(next(iter(r.metric_records.values()))[weight_key]) for r in records]
    total = sum(weights) or 1.0
    out: dict[str, float] = {}
    for rec, w in zip(records, weights, strict=True):
        for k, v in next(iter(rec.metric_records.values())).items():
            if k == weight_key or isinstance(v, list):
                continue
            out[k] = out.get(k, 0.0) + float(v) * w / total
    out[weight_key] = total
    return MetricRecord(out)


def _common(cfg: StrategyConfig, n_sites: int) -> dict[str, object]:
    min_nodes = cfg.min_train_nodes or n_sites
    return {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": 1.0,
        "min_train_nodes": min_nodes,
        "min_evaluate_nodes": min_nodes,
        "min_available_nodes": min_nodes,
        # set by server.federation on each accepted reply (num-examples x
        # strategy.regime_weights of the site's label regime)
        "weighted_by_key": keys.AGG_WEIGHT,
        "arrayrecord_key": keys.ARRAYS,
        "configrecord_key": keys.CONFIG,
        "train_metrics_aggr_fn": weighted_mean_metrics,
        "evaluate_metrics_aggr_fn": weighted_mean_metrics,
    }


STRATEGIES: dict[StrategyName, Callable[[StrategyConfig, int], Strategy]] = {
    StrategyName.FEDAVG: lambda c, n: FedAvg(**_common(c, n)),  # type: ignore[arg-type]
    StrategyName.FEDAVGM: lambda c, n: FedAvgM(  # type: ignore[arg-type]
        **_common(c, n), server_learning_rate=c.server_lr or 1.0, server_momentum=c.server_momentum
    ),
    StrategyName.FEDPROX: lambda c, n: FedProx(**_common(c, n), proximal_mu=c.proximal_mu),  # type: ignore[arg-type]
    StrategyName.FEDADAM: lambda c, n: FedAdam(**_common(c, n), eta=c.server_lr or 0.01),  # type: ignore[arg-type]
    StrategyName.FEDMEDIAN: lambda c, n: FedMedian(**_common(c, n)),  # type: ignore[arg-type]
    StrategyName.FEDTRIMMEDAVG: lambda c, n: FedTrimmedAvg(**_common(c, n), beta=c.trim_beta),  # type: ignore[arg-type]
    StrategyName.KRUM: lambda c, n: Krum(**_common(c, n), num_malicious_nodes=c.num_malicious_nodes),  # type: ignore[arg-type]
}


def build_strategy(cfg: StrategyConfig, n_sites: int) -> Strategy:
    """Instantiate the configured Flower strategy for ``n_sites`` sites."""
    return STRATEGIES[cfg.name](cfg, n_sites)
