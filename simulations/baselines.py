"""Pooled and local-only baselines at equal compute, framework-free.

Equal compute means the same number of sample passes per site as the
federation: ``rounds * local_epochs`` epochs over a site's training data.
The pooled model trains that many epochs on the union of the sites'
training data; each local model trains that many epochs on its own site.
Both use the same training code, model, seed and privacy settings as the
federation (DP at the site's epsilon cap when the scenario has DP on).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from medseg_core.config import ScenarioConfig, SiteConfig
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

__all__ = ["ArmResult", "run_local", "run_pooled"]

logger = logging.getLogger(__name__)


@dataclass
class ArmResult:
    """Per-site test figures of one baseline arm."""

    per_site: dict[str, dict[str, float | int | None]]

    @property
    def dice_mean(self) -> float:
        """Unweighted mean of per-site Dice (sites count equally)."""
        return float(np.mean([float(v["dice"]) for v in self.per_site.values()]))  # type: ignore[arg-type]


def _train_arm(
    scenario: ScenarioConfig,
    init: dict[str, np.ndarray],
    train,  # noqa: ANN001 - SliceSet
    *,
    dp: bool,
    epsilon_cap: float,
    seed: int,
) -> tuple[dict[str, np.ndarray], float | None]:
    epochs = scenario.rounds * scenario.train.local_epochs
    model = build_segmenter(scenario.model, scenario.data)
    load_state(model, init)
    plan, acc = None, None
    if dp:
        acc = new_accountant(scenario.privacy.accountant)
        spe = steps_per_epoch(len(train), scenario.train.batch_size)
        plan = plan_round(
            acc, epsilon_cap=epsilon_cap, delta=scenario.privacy.delta,
            max_grad_norm=scenario.privacy.max_grad_norm, sample_rate=1.0 / spe,
            steps_this_round=spe * epochs, rounds_remaining=1,
        )
    res = fit(
        model, train,
        FitSettings(epochs=epochs, lr=scenario.train.lr, batch_size=scenario.train.batch_size,
                    optimizer=scenario.train.optimizer, momentum=scenario.train.momentum,
                    seed=seed),
        num_classes=scenario.data.num_classes, privacy=plan, accountant=acc,
        secure_mode=scenario.privacy.secure_mode,
    )
    eps = epsilon_of(acc, scenario.privacy.delta) if acc is not None else None
    return res.state, eps


def run_pooled(
    scenario: ScenarioConfig, sites: list[SiteConfig], init: dict[str, np.ndarray], *, dp: bool
) -> ArmResult:
    """Centralised training on the union of the sites' training data."""
    sessions = [SiteSession(s, model_cfg=scenario.model, data_cfg=scenario.data) for s in sites]
    union = concat_slicesets([s.train_set for s in sessions])
    cap = min(s.epsilon for s in sites)
    logger.info("pooled baseline: %d slices, dp=%s", len(union), dp)
    state, eps = _train_arm(scenario, init, union, dp=dp, epsilon_cap=cap, seed=scenario.seed)
    model = build_segmenter(scenario.model, scenario.data)
    per_site: dict[str, dict[str, float | int | None]] = {}
    for site, sess in zip(sites, sessions, strict=True):
        m = evaluate_state(model, state, sess.test_set, num_classes=scenario.data.num_classes,
                           min_component_voxels=scenario.evaluation.min_component_voxels)
        per_site[site.id] = {"dice": m.dice, "epsilon": eps, "n_train": len(union),
                             "hd95": None if np.isnan(m.hd95) else m.hd95}
    return ArmResult(per_site)


def run_local(
    scenario: ScenarioConfig, sites: list[SiteConfig], init: dict[str, np.ndarray], *, dp: bool
) -> ArmResult:
    """Each site trains alone on its own data; evaluated on its own test split."""
    per_site: dict[str, dict[str, float | int | None]] = {}
    for i, site in enumerate(sites):
        sess = SiteSession(site, model_cfg=scenario.model, data_cfg=scenario.data)
        logger.info("local baseline %s: %d slices, dp=%s", site.id, len(sess.train_set), dp)
        state, eps = _train_arm(
            scenario, init, sess.train_set, dp=dp, epsilon_cap=site.epsilon,
            seed=scenario.seed + 1 + i,
        )
        model = build_segmenter(scenario.model, scenario.data)
        m = evaluate_state(model, state, sess.test_set, num_classes=scenario.data.num_classes,
                           min_component_voxels=scenario.evaluation.min_component_voxels)
        per_site[site.id] = {"dice": m.dice, "epsilon": eps, "n_train": len(sess.train_set),
                             "hd95": None if np.isnan(m.hd95) else m.hd95}
    return ArmResult(per_site)
