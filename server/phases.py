"""The federation's phases besides training, and what they report:
evaluation of a global model on every site's split (each round's
validation, the selected model's test) and post-federation
personalisation of the sites' private layers (``train.personalize``)."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from medseg_core import keys
from medseg_core.config import ScenarioConfig
from medseg_core.store import LedgerRow, RunStore

from server.messaging import in_site_order, send, site_of, site_settings

__all__ = ["FederationOutcome", "SiteResult", "SplitScore", "evaluate_sites", "ledger_row",
           "personalize_sites"]

logger = logging.getLogger(__name__)


@dataclass
class SiteResult:
    """A site's final figures (test split of that site)."""

    dice: float | None = None
    hd95: float | None = None
    epsilon: float | None = None
    n_train: int | None = None
    label_regime: str | None = None
    bag_auc: float | None = None
    mil_auc: float | None = None  # bag sites: the MIL head's bag-level prediction
    threshold: float | None = None  # evaluation.threshold: site: the site's calibrated one
    dice_empty_baseline: float | None = None
    dice_se: float | None = None
    # train.personalize: ``dice`` is with the site's personalised private
    # layers when ``personalized``; ``dice_global`` is the same global model
    # with the private layers as federated; ``personalization`` is the site's
    # report (local val Dice before/after, epoch kept) or {"error": why}
    personalized: bool = False
    dice_global: float | None = None
    personalization: dict[str, Any] | None = None


class SplitScore(NamedTuple):
    """A global model's score on one split of every site: the Dice weighted
    by each site's scored slices, and the Dice an all-background prediction
    scores on the same cases, weighted alike (None where no site scored, or
    a scoring site did not report it)."""

    dice: float | None
    empty_dice: float | None


@dataclass
class FederationOutcome:
    """What a federated run produced."""

    run_id: str
    rounds: int
    selected_round: int = 0
    sites: dict[str, SiteResult] = field(default_factory=dict)
    dice_mean: float | None = None
    rejected: int = 0
    checkpoint: str | None = None
    wall_seconds: float = 0.0
    # train.weak.positives_gate: the rounds in which weak positives trained the
    # decoder (None: the run has no gate)
    positives_rounds: list[int] | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def evaluate_sites(
    grid: Grid,
    strategy: Any,
    scenario: ScenarioConfig,
    run_id: str,
    rnd: int,
    model_round: int,
    arrays: ArrayRecord,
    split: str,
    store: RunStore,
    node_sites: dict[int, str],
    outcome: FederationOutcome,
    timeout: float,
    *,
    personalized: bool = False,
) -> SplitScore:
    """Evaluate the global model of ``model_round`` on every site's ``split``
    (each site merges in its private adaptation layers of that round, or
    with ``personalized`` its personalised ones where it has them);
    returns the weighted Dice and the empty prediction's."""
    cfg = ConfigRecord({
        keys.EVAL_SPLIT: split,
        keys.RUN_NAME: run_id,
        keys.MODEL_ROUND: model_round,
        keys.BAG_GATE: scenario.evaluation.bag_gate,
        keys.PERSONALIZED: personalized,
        **site_settings(scenario),
    })
    replies = in_site_order(send(grid, strategy.configure_evaluate(rnd, arrays, cfg, grid),
                                  timeout), node_sites)
    num, num_empty, den = 0.0, 0.0, 0.0
    for node, reply in replies:
        site = site_of(reply, node_sites, node)
        if reply.has_error():
            store.add_rejection(run_id, rnd, site, node_id=node,
                                kind="eval-error", reason=reply.error.reason or "")
            continue
        m = reply.content.metric_records.get(keys.METRICS)
        s = reply.content.config_records.get(keys.SITE)
        if m is None or s is None or not math.isfinite(float(m.get(keys.DICE, math.nan))):
            store.add_rejection(run_id, rnd, site, node_id=node,
                                kind="eval-invalid", reason="evaluate reply lacks finite dice")
            continue
        dice, n = float(m[keys.DICE]), int(m[keys.NUM_EXAMPLES])
        hd = float(s.get(keys.HD95, math.nan))
        auc = float(s.get(keys.AUC, math.nan))
        mil_auc = float(s.get(keys.MIL_AUC, math.nan))
        tau = float(s.get(keys.THRESHOLD, math.nan))
        empty = float(s.get(keys.EMPTY_DICE, math.nan))
        se = float(s.get(keys.DICE_SE, math.nan))
        # n == 0: the site has no masks on this split (image-level labels only)
        store.add_site_metrics(run_id, rnd, site, phase="evaluate",
                               split=f"{split}+personalized" if personalized else split,
                               num_examples=n, dice=dice if n else None,
                               hd95=hd if math.isfinite(hd) else None)
        if n:  # a site with no masks on this split scores nothing (its empty Dice is NaN)
            num, num_empty, den = num + dice * n, num_empty + empty * n, den + n
        if split == "test":
            outcome.sites[site] = SiteResult(
                dice=dice if n else None, hd95=hd if math.isfinite(hd) else None,
                n_train=int(s.get(keys.N_TRAIN, 0)), label_regime=str(s.get(keys.LABEL_REGIME, "")),
                bag_auc=auc if math.isfinite(auc) else None,
                mil_auc=mil_auc if math.isfinite(mil_auc) else None,
                threshold=tau if math.isfinite(tau) else None,
                dice_empty_baseline=empty if math.isfinite(empty) else None,
                dice_se=se if n and math.isfinite(se) else None,
                personalized=bool(s.get(keys.PERSONALIZED, False)),
            )
    if not den:
        return SplitScore(None, None)
    return SplitScore(num / den, num_empty / den if math.isfinite(num_empty) else None)


def personalize_sites(
    grid: Grid,
    scenario: ScenarioConfig,
    run_id: str,
    model_round: int,
    arrays: ArrayRecord,
    store: RunStore,
    node_sites: dict[int, str],
    timeout: float,
    positives_gate_open: bool | None = None,
) -> dict[str, dict[str, Any]]:
    """Ask every site to personalise its private layers (``layers: all``:
    every weight) against the selected global model (``train.personalize``);
    returns each site's report.
    ``positives_gate_open``: the weak positives' closed-loop warm-up after
    ``model_round`` (None: the run has no gate).

    Replies carry metrics (and the DP spend) only. A site's DP spend is
    recorded in the ledger as round ``rounds + 1``, so the run's epsilon
    (a max over sites) includes it."""
    p = scenario.train.personalize
    cfg = ConfigRecord({
        keys.MODEL_ROUND: model_round,
        keys.RUN_NAME: run_id,
        keys.PERSONALIZE_EPOCHS: p.epochs,
        keys.LEARNING_RATE: p.lr,
        keys.PERSONALIZE_OPTIMIZER: p.optimizer,
        keys.PERSONALIZE_MOMENTUM: p.momentum,
        keys.PERSONALIZE_LAYERS: p.layers,
        "batch-size": scenario.train.batch_size,
        **site_settings(scenario),
    })
    if positives_gate_open is not None:
        cfg[keys.POSITIVES_GATE] = positives_gate_open
    content = RecordDict({keys.ARRAYS: arrays, keys.CONFIG: cfg})
    msgs = [Message(content=content, message_type="train.personalize", dst_node_id=node)
            for node in grid.get_node_ids()]
    logger.info("personalising the %s of %d site(s) on the round-%d model (%d epoch(s))",
                "private layers" if p.layers == "private" else "every weight", len(msgs),
                model_round, p.epochs)
    reports: dict[str, dict[str, Any]] = {}
    for node, reply in in_site_order(send(grid, msgs, timeout), node_sites):
        site = site_of(reply, node_sites, node)
        if reply.has_error():
            reason = reply.error.reason or f"error code {reply.error.code}"
            logger.warning("site %s: personalisation refused or failed: %s", site, reason)
            store.add_rejection(run_id, scenario.rounds + 1, site, node_id=node,
                                kind="personalize-error", reason=reason)
            reports[site] = {"error": reason}
            continue
        m = reply.content.metric_records[keys.METRICS]
        reports[site] = {"layers": p.layers,
                         "val_dice_before": float(m[keys.DICE_BEFORE]),
                         "val_dice_after": float(m[keys.DICE]),
                         "epochs_kept": int(m[keys.EPOCHS_KEPT])}
        priv = reply.content.config_records.get("privacy")
        if priv is not None:
            reports[site]["epsilon"] = float(priv[keys.EPSILON])
            store.add_ledger(run_id, ledger_row(site, scenario.rounds + 1, priv))
    return reports


def ledger_row(site: str, rnd: int, priv: ConfigRecord) -> LedgerRow:
    """The privacy-ledger row of a reply's ``privacy`` record."""
    return LedgerRow(
        site_id=site, round=rnd,
        noise_multiplier=float(priv[keys.NOISE_MULTIPLIER]),
        max_grad_norm=float(priv[keys.MAX_GRAD_NORM]),
        sample_rate=float(priv[keys.SAMPLE_RATE]),
        steps=int(priv[keys.STEPS]), epsilon=float(priv[keys.EPSILON]),
        delta=float(priv[keys.DELTA]), accountant=str(priv[keys.ACCOUNTANT]),
    )
