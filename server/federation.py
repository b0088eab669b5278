"""The federation's round loop, around a Flower strategy.

Flower's ``Strategy.start`` runs all rounds in one call; a hospital
aggregator needs more between rounds, so this loop calls the strategy's own
``configure_*`` / ``aggregate_*`` steps and adds, every round:

1. validation of every train reply before aggregation (rejections logged in
   the run store with their reason);
2. the privacy ledger (one row per site and round; epsilon is the site's
   cumulative value, the run-level epsilon of a site is a max);
3. a checkpoint (safetensors + resolved config + versions) and the round's
   row in the run store, after which the round counts as completed.

``resume=True`` continues after the last completed round.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from medseg_core import keys
from medseg_core.adaptation import local_keys, split_state
from medseg_core.checkpoint import (
    git_revision,
    latest_checkpoint,
    load_checkpoint,
    package_versions,
    save_checkpoint,
)
from medseg_core.config import ScenarioConfig, StrategyConfig
from medseg_core.store import RunStore
from medseg_core.training.session import build_segmenter
from medseg_core.weak import positives_gate_open

from client.records import record_to_state, state_to_record
from server.messaging import in_site_order, send, site_of, site_settings
from server.phases import (
    FederationOutcome,
    SiteResult,
    SplitScore,
    evaluate_sites,
    ledger_row,
    personalize_sites,
)
from server.strategies import build_strategy
from server.validation import validate_train_reply

__all__ = ["FederationOutcome", "SiteResult", "average_over_trainers", "in_site_order",
           "initial_state", "run_federation", "set_aggregation_weight"]

logger = logging.getLogger(__name__)


def initial_state(scenario: ScenarioConfig) -> dict[str, np.ndarray]:
    """The seeded initial global model as numpy arrays: the shared
    parameters only (site-private adaptation layers never exist here)."""
    torch.manual_seed(scenario.seed)
    model = build_segmenter(scenario.model, scenario.data)
    state = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
    return split_state(state, local_keys(model, scenario.model.adaptation))[0]


def _train_config(scenario: ScenarioConfig, run_id: str) -> dict[str, Any]:
    t = scenario.train
    return {
        keys.TOTAL_ROUNDS: scenario.rounds,
        keys.LOCAL_EPOCHS: t.local_epochs,
        keys.LEARNING_RATE: t.lr,
        "batch-size": t.batch_size,
        keys.BAG_BATCH_SIZE: t.bag_batch_size or 0,
        "optimizer": t.optimizer,
        "momentum": t.momentum,
        keys.RUN_NAME: run_id,
        keys.PERSONALIZE_EPOCHS: t.personalize.epochs,
        keys.ADAPTATION_FROM_ROUND: t.adaptation_from_round,
        keys.PRIVATE_EPOCHS: t.private_epochs,
        **site_settings(scenario),
    }


def run_federation(
    grid: Grid,
    scenario: ScenarioConfig,
    out_dir: str | Path,
    *,
    run_id: str,
    resume: bool = False,
) -> FederationOutcome:
    """Run (or resume) the federation described by ``scenario``.

    Writes ``out_dir/runstore.sqlite``, ``out_dir/checkpoints/round_XXXX`` and
    ``out_dir/federated.json``.
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    store = RunStore(out / "runstore.sqlite")
    ckdir = out / "checkpoints"
    config_json = json.loads(scenario.model_dump_json())
    state = initial_state(scenario)
    start = 1
    gate = scenario.train.weak.positives_gate
    last_val = SplitScore(None, None)  # the last round's validation (the positives' gate)
    if resume:
        last = latest_checkpoint(ckdir)
        if last is not None:
            ck = load_checkpoint(last)
            state, start = ck.arrays, ck.round + 1
            last_val = SplitScore(ck.meta.get("val_dice"), ck.meta.get("val_empty_dice"))
            logger.info("resuming run %s after round %d", run_id, ck.round)
    store.start_run(
        run_id, name=scenario.name, config=config_json, versions=package_versions(),
        git_rev=git_revision(),
    )
    strategy = build_strategy(scenario.strategy, n_sites=len(scenario.sites))
    arrays: ArrayRecord = state_to_record(state)
    node_sites: dict[int, str] = {}
    outcome = FederationOutcome(run_id=run_id, rounds=scenario.rounds)
    gate_rounds = _gate_rounds_so_far(ckdir, start) if gate is not None else []
    outcome.positives_rounds = gate_rounds if gate is not None else None
    timeout = scenario.strategy.round_timeout_s

    if scenario.evaluation.select == "best_val":
        best_round, best_val = _best_so_far(store, run_id, start)
    else:
        best_round, best_val = start - 1, None
    best_arrays = arrays if best_round in (0, start - 1) else state_to_record(
        load_checkpoint(ckdir / f"round_{best_round:04d}").arrays
    )
    for rnd in range(start, scenario.rounds + 1):
        logger.info("round %d/%d: training", rnd, scenario.rounds)
        store.start_round(run_id, rnd)
        reference = record_to_state(arrays)
        train_cfg = _train_config(scenario, run_id)
        gate_open = positives_gate_open(last_val.dice, last_val.empty_dice, gate)
        if gate_open is not None:
            train_cfg[keys.POSITIVES_GATE] = gate_open
            if gate_open:
                gate_rounds.append(rnd)
            logger.info("round %d: weak positives' decoder terms %s (validation Dice %s, "
                        "empty prediction %s, gate %g)", rnd, "on" if gate_open else "off",
                        _fmt(last_val.dice), _fmt(last_val.empty_dice), gate)
        replies = in_site_order(send(
            grid, strategy.configure_train(rnd, arrays, ConfigRecord(train_cfg), grid), timeout,
        ), node_sites)
        accepted: list[Message] = []
        eps_round: list[float] = []
        losses: list[tuple[float, float]] = []
        for node, reply in replies:
            site = site_of(reply, node_sites, node)
            if reply.has_error():
                reason = reply.error.reason or f"error code {reply.error.code}"
                logger.warning("round %d: site %s answered with an error: %s", rnd, site, reason)
                store.add_rejection(run_id, rnd, site, node_id=node, kind="error-reply", reason=reason)
                continue
            verdict = validate_train_reply(
                reply, reference, max_update_norm=scenario.strategy.max_update_norm
            )
            if not verdict.accepted:
                logger.warning("round %d: update of site %s rejected: %s", rnd, site, verdict.reason)
                store.add_rejection(run_id, rnd, site, node_id=node, kind="validation",
                                    reason=verdict.reason)
                outcome.rejected += 1
                continue
            accepted.append(reply)
            m = reply.content.metric_records[keys.METRICS]
            n = int(m[keys.NUM_EXAMPLES])
            set_aggregation_weight(reply, scenario.strategy)
            losses.append((float(m[keys.TRAIN_LOSS]), n))
            store.add_site_metrics(
                run_id, rnd, site, phase="train", split="val", num_examples=n,
                loss=float(m[keys.TRAIN_LOSS]), dice=float(m[keys.DICE]),
                seconds=float(m.get(keys.TRAIN_SECONDS, math.nan)),
            )
            priv = reply.content.config_records.get("privacy")
            if priv is not None:
                eps = float(priv[keys.EPSILON])
                eps_round.append(eps)
                store.add_ledger(run_id, ledger_row(site, rnd, priv))
        if accepted:
            filled = average_over_trainers(accepted, reference)
            if filled:
                logger.debug("round %d: averaged over the sites that trained them: %s", rnd, filled)
            new_arrays, _ = strategy.aggregate_train(rnd, accepted)
            if new_arrays is not None:
                arrays = new_arrays
        else:
            logger.warning("round %d: no update accepted; the global model is unchanged", rnd)

        last_val = evaluate_sites(
            grid, strategy, scenario, run_id, rnd, rnd, arrays, "val", store, node_sites, outcome,
            timeout,
        )
        val_dice = last_val.dice
        if scenario.evaluation.select == "last" or (
            val_dice is not None and (best_val is None or val_dice > best_val)
        ):
            best_round, best_val, best_arrays = rnd, val_dice, arrays
        ck = save_checkpoint(
            ckdir, round=rnd, arrays=record_to_state(arrays), config=config_json,
            extra={"run_id": run_id, "val_dice": val_dice, "val_empty_dice": last_val.empty_dice,
                   "positives_gate_open": gate_open},
        )
        outcome.checkpoint = str(ck)
        total_n = sum(n for _, n in losses)
        store.finish_round(
            run_id, rnd, n_sampled=len(replies), n_accepted=len(accepted),
            n_rejected=len(replies) - len(accepted),
            train_loss=(sum(loss * n for loss, n in losses) / total_n) if total_n else None,
            val_dice=val_dice,
            # WARNING: the run's epsilon is a max over sites, never a mean.
            epsilon_max=max(eps_round) if eps_round else None,
        )
        logger.info(
            "round %d/%d done: %d/%d updates accepted, val dice %.4f, max eps %s",
            rnd, scenario.rounds, len(accepted), len(replies),
            val_dice if val_dice is not None else float("nan"),
            f"{max(eps_round):.3f}" if eps_round else "n/a",
        )

    # The final model is scored once on every site's test split.
    outcome.selected_round = best_round
    logger.info("final model: round %d (select=%s); testing on every site",
                best_round, scenario.evaluation.select)
    evaluate_sites(grid, strategy, scenario, run_id, scenario.rounds, best_round, best_arrays, "test",
              store, node_sites, outcome, timeout)
    if scenario.train.personalize.epochs:
        federated = {site: r.dice for site, r in outcome.sites.items()}
        # the empty prediction's Dice is the split's, the same every round
        reports = personalize_sites(
            grid, scenario, run_id, best_round, best_arrays, store, node_sites, timeout,
            positives_gate_open(best_val, last_val.empty_dice, gate))
        evaluate_sites(grid, strategy, scenario, run_id, scenario.rounds, best_round, best_arrays,
                  "test", store, node_sites, outcome, timeout, personalized=True)
        for site, r in outcome.sites.items():
            r.dice_global = federated.get(site)
            r.personalization = reports.get(site, {"error": "no personalisation reply"})
    for site, eps in store.max_epsilon(run_id).items():
        outcome.sites.setdefault(site, SiteResult()).epsilon = eps
    dices = [s.dice for s in outcome.sites.values() if s.dice is not None]
    outcome.dice_mean = float(np.mean(dices)) if dices else None
    outcome.wall_seconds = time.perf_counter() - t0
    store.finish_run(run_id)
    store.close()
    (out / "federated.json").write_text(json.dumps(outcome.to_json(), indent=2), encoding="utf-8")
    return outcome


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _gate_rounds_so_far(ckdir: Path, start: int) -> list[int]:
    """The rounds before ``start`` (resume) in which the positives' gate was
    open, from their checkpoints."""
    rounds = []
    for rnd in range(1, start):
        path = ckdir / f"round_{rnd:04d}"
        if path.is_dir() and load_checkpoint(path).meta.get("positives_gate_open"):
            rounds.append(rnd)
    return rounds


def _best_so_far(store: RunStore, run_id: str, start: int) -> tuple[int, float | None]:
    """(round, val dice) of the best completed round before ``start`` (resume)."""
    done = [r for r in store.rounds(run_id)
            if r["finished_at"] is not None and r["round"] < start and r["val_dice"] is not None]
    if not done:
        return 0, None
    best = max(done, key=lambda r: r["val_dice"])
    return int(best["round"]), float(best["val_dice"])


def set_aggregation_weight(reply: Message, cfg: StrategyConfig) -> float:
    """Set (and return) the weight aggregation gives an accepted train reply:
    its number of examples times ``strategy.regime_weights`` of its site's
    label regime (1 where none is set).

    Weighting is post-processing of what the site sent, so it changes no
    site's privacy guarantee; a down-weighted site's DP noise is scaled down
    with its update.
    """
    m = reply.content.metric_records[keys.METRICS]
    rec = reply.content.config_records.get(keys.SITE)
    regime = str(rec.get(keys.LABEL_REGIME, "")) if rec is not None else ""
    factor = cfg.regime_weights.get(regime, 1.0)  # type: ignore[call-overload]
    w = float(m[keys.NUM_EXAMPLES]) * float(factor)
    m[keys.AGG_WEIGHT] = w
    return w


def average_over_trainers(replies: list[Message], reference: dict[str, np.ndarray]) -> list[str]:
    """Make every array's aggregate an average over the sites that trained it.

    A site returns an array bit-identical to the round's global one when it
    did not train it: a head its data does not use (the MIL head at a site
    without bags, the CAM head at a site without image-level classes). In a
    weighted average those copies pull the array back towards where it was:
    the MIL head of the mixed-regime scenario, trained by one site weighted
    0.1 x 600 slices = 60 against 1680 images, moved about 1/30 of its step
    each round and its bag-level AUC stayed at chance. For each floating
    array that some accepted replies changed and others did not, the
    unchanged copies are replaced by the weighted mean (``agg-weight``) of
    the changed ones, so any weighted average over all replies (FedAvg,
    FedAvgM's pseudo-gradient, FedProx, FedAdam) equals the average over the
    sites that trained the array. This is post-processing of what the sites
    sent: no site's privacy guarantee changes. Arrays every site changed, or
    none, are left as they are.

    Returns
    -------
    list[str]
        The keys whose unchanged copies were replaced.
    """
    weights = [float(r.content.metric_records[keys.METRICS][keys.AGG_WEIGHT]) for r in replies]
    recs = [r.content.array_records[keys.ARRAYS] for r in replies]
    filled = []
    for k, ref in reference.items():
        if not np.issubdtype(ref.dtype, np.floating):
            continue
        vals = [rec[k].numpy() for rec in recs]
        same = [np.array_equal(v, ref) for v in vals]
        trained_w = sum(w for w, s in zip(weights, same, strict=True) if not s)
        if all(same) or not any(same) or trained_w <= 0:
            continue
        mean = sum(w * v.astype(np.float64) for w, v, s in zip(weights, vals, same, strict=True)
                   if not s) / trained_w
        fill = Array(np.ascontiguousarray(mean.astype(ref.dtype)))
        for rec, s in zip(recs, same, strict=True):
            if s:
                rec[k] = fill
        filled.append(k)
    return filled
