"""Pooled and local-only baselines at equal compute, framework-free.

Equal compute means the same number of sample passes per site as the
federation: ``rounds * local_epochs`` epochs over a site's training data.
The pooled model trains that many epochs on the union of the sites'
training data; each local model trains that many epochs on its own site.
Both use the same training code, model, seed, optimiser, privacy settings
and model selection as the federation: training runs in ``rounds`` chunks of
``local_epochs`` epochs (the optimiser restarts each chunk, as it does on a
site each round), DP noise is calibrated once for the whole budget, and with
``evaluation.select: best_val`` the chunk with the best validation Dice is
kept. Test splits are only used for the final score.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from medseg_core.config import AdaptationMode, ScenarioConfig, SiteConfig
from medseg_core.data.slices import SliceSet
from medseg_core.privacy.accountant import epsilon_of, new_accountant
from medseg_core.privacy.budget import plan_round
from medseg_core.training.session import (
    FitSettings,
    build_segmenter,
    concat_slicesets,
    evaluate_state,
    fit,
    load_state,
    steps_per_epoch,
)
from medseg_core.training.site import SiteSession
from medseg_core.weak import WeakSettings

__all__ = ["ArmResult", "plain_scenario", "run_local", "run_pooled"]

logger = logging.getLogger(__name__)


@dataclass
class ArmResult:
    """Per-site test figures of one baseline arm."""

    per_site: dict[str, dict[str, float | int | None]]

    @property
    def dice_mean(self) -> float:
        """Unweighted mean of per-site Dice (sites count equally)."""
        dices = [float(v["dice"]) for v in self.per_site.values() if v["dice"] is not None]  # type: ignore[arg-type]
        return float(np.mean(dices)) if dices else float("nan")


def plain_scenario(scenario: ScenarioConfig) -> ScenarioConfig:
    """The scenario with no site-private adaptation layers.

    The pooled model is one centralised model (no sites to adapt to); a local
    model is wholly private anyway. Both therefore train the plain segmenter.
    """
    model = scenario.model.model_copy(update={"adaptation": AdaptationMode.NONE})
    return scenario.model_copy(update={"model": model})


def _train_arm(
    scenario: ScenarioConfig,
    init: dict[str, np.ndarray],
    train: SliceSet,
    val: SliceSet | None,
    *,
    dp: bool,
    epsilon_cap: float,
    seed: int,
) -> tuple[dict[str, np.ndarray], float | None]:
    t = scenario.train
    acc = new_accountant(scenario.privacy.accountant) if dp else None
    plan = None
    if acc is not None:
        spe = steps_per_epoch(len(train), t.batch_size)
        plan = plan_round(
            acc, epsilon_cap=epsilon_cap, delta=scenario.privacy.delta,
            max_grad_norm=scenario.privacy.max_grad_norm, sample_rate=1.0 / spe,
            steps_this_round=spe * t.local_epochs, rounds_remaining=scenario.rounds,
        )
    state, best_state, best_val = init, init, -1.0
    for chunk in range(1, scenario.rounds + 1):
        model = build_segmenter(scenario.model, scenario.data)
        load_state(model, state)
        res = fit(
            model, train,
            FitSettings(epochs=t.local_epochs, lr=t.lr, batch_size=t.batch_size,
                        optimizer=t.optimizer, momentum=t.momentum, seed=seed * 1000 + chunk),
            num_classes=scenario.data.num_classes, privacy=plan, accountant=acc,
            secure_mode=scenario.privacy.secure_mode,
            weak=WeakSettings.from_config(scenario.train.weak)
            if scenario.model.weak_head == "cam" else None,
        )
        state = res.state
        if scenario.evaluation.select == "last" or val is None:
            best_state = state
            continue
        v = evaluate_state(
            build_segmenter(scenario.model, scenario.data), state, val,
            num_classes=scenario.data.num_classes,
            min_component_voxels=scenario.evaluation.min_component_voxels,
            refine=scenario.evaluation.refine,
        ).dice  # (argmax: a pooled / local baseline's validation picks its round uncalibrated)
        if v > best_val:
            best_state, best_val = state, v
    eps = epsilon_of(acc, scenario.privacy.delta) if acc is not None else None
    return best_state, eps


def _score(scenario: ScenarioConfig, state: dict[str, np.ndarray], sess: SiteSession) -> dict:
    m = sess.evaluate(state, "test", min_component_voxels=scenario.evaluation.min_component_voxels,
                      bag_gate=scenario.evaluation.bag_gate, refine=scenario.evaluation.refine,
                      threshold=scenario.evaluation.threshold,
                      mil_head=scenario.evaluation.mil_head)
    out: dict = {"dice": m.dice, "hd95": m.hd95, "dice_empty_baseline": m.empty_dice,
                 "dice_se": m.dice_se}
    if m.auc is not None:
        out["bag_auc"] = m.auc
    if m.mil_auc is not None:
        out["mil_auc"] = m.mil_auc
    return out


def run_pooled(
    scenario: ScenarioConfig, sites: list[SiteConfig], init: dict[str, np.ndarray], *, dp: bool
) -> ArmResult:
    """Centralised training on the union of the sites' training data.

    ``init`` is the initial state of :func:`plain_scenario`'s model.
    """
    scenario = plain_scenario(scenario)
    sessions = [SiteSession(s, model_cfg=scenario.model, data_cfg=scenario.data,
                            weak_cfg=scenario.train.weak) for s in sites]
    union = concat_slicesets([s.train_set for s in sessions])
    vals = [s.val_set for s in sessions if s.val_set is not None]
    val = concat_slicesets(vals) if vals else None
    cap = min(s.epsilon for s in sites)
    logger.info("pooled baseline: %d slices, dp=%s", len(union), dp)
    state, eps = _train_arm(scenario, init, union, val, dp=dp, epsilon_cap=cap, seed=scenario.seed)
    return ArmResult({
        site.id: {**_score(scenario, state, sess), "epsilon": eps, "n_train": len(union)}
        for site, sess in zip(sites, sessions, strict=True)
    })


def run_local(
    scenario: ScenarioConfig, sites: list[SiteConfig], init: dict[str, np.ndarray], *, dp: bool
) -> ArmResult:
    """Each site trains alone on its own data; evaluated on its own test split.

    ``init`` is the initial state of :func:`plain_scenario`'s model.
    """
    scenario = plain_scenario(scenario)
    per_site: dict[str, dict[str, float | int | None]] = {}
    for i, site in enumerate(sites):
        sess = SiteSession(site, model_cfg=scenario.model, data_cfg=scenario.data,
                           weak_cfg=scenario.train.weak)
        logger.info("local baseline %s: %d slices, dp=%s", site.id, len(sess.train_set), dp)
        state, eps = _train_arm(
            scenario, init, sess.train_set, sess.val_set, dp=dp, epsilon_cap=site.epsilon,
            seed=scenario.seed + 1 + i,
        )
        per_site[site.id] = {**_score(scenario, state, sess), "epsilon": eps,
                             "n_train": len(sess.train_set)}
    return ArmResult(per_site)
