"""Post-federation personalisation of a site's private adaptation layers
(or, ``train.personalize.layers: all``, of every weight).

During the rounds a site's private layers (``model.adaptation``: GroupNorm
affines, input adapter) are trained against its own drifting copy of the
shared weights, then paired with the *aggregated* shared weights at
evaluation. ``train.personalize`` closes that gap once the federation is
over: the site fine-tunes only its private layers against the selected
global model on its own training data (shared weights frozen), keeps the
epoch with the best local validation Dice (epoch 0, the layers as federated,
included) and stores them apart from the per-round layers. Nothing leaves
the site but metrics.

Under DP the epochs are DP-SGD through the site's accountant at the run's
noise; the rounds reserved their steps from round 1
(:meth:`SiteSession.plan <medseg_core.training.site.SiteSession.plan>`,
``reserve_epochs``), so the site's cap holds without a second calibration.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from medseg_core.adaptation import AdaptationStore, split_state
from medseg_core.calibration import check_threshold_mode
from medseg_core.errors import ConfigError, PrivacyBudgetExceeded
from medseg_core.privacy.accountant import epsilon_of, save_accountant
from medseg_core.privacy.budget import RoundPrivacyPlan, plan_round
from medseg_core.training.session import (
    FitSettings,
    build_segmenter,
    evaluate_state,
    fit,
    load_state,
)

if TYPE_CHECKING:
    from medseg_core.training.site import SiteSession

__all__ = ["PersonalizeOutcome", "personal_store", "personalize", "personalization_plan"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PersonalizeOutcome:
    """A site's post-federation personalisation (:func:`personalize`)."""

    val_dice_before: float  # local validation Dice of the global model + federated private layers
    val_dice_after: float  # ... with the kept personalised private layers
    epochs_kept: int  # 0: no epoch beat the federated ones, which are kept
    epochs: int
    steps: int
    epsilon: float | None  # cumulative, after the personalisation (None without DP)
    privacy: dict | None  # the RoundPrivacyPlan of the epochs, as a dict


def personal_store(state_dir: str | Path, run_name: str) -> AdaptationStore:
    """Where the personalised private layers of ``run_name`` live (apart
    from the per-round ones, which stay as trained)."""
    return AdaptationStore(state_dir, f"{run_name}#personalized")


def personalize(
    sess: SiteSession, global_state: Mapping[str, np.ndarray], run_name: str, model_round: int, *,
    epochs: int, lr: float, batch_size: int, optimizer: str = "adam", momentum: float = 0.0,
    min_component_voxels: int = 0, refine: str = "none",
    positives_gate_open: bool | None = None, threshold: str = "argmax",
    calibration_cases: int | None = None, layers: str = "private",
) -> PersonalizeOutcome:
    """Fine-tune only ``sess``'s private layers against the global model of
    ``model_round`` for ``epochs`` epochs (``optimizer`` at ``lr``, SGD with
    ``momentum``; the round's loss) and store the epoch with the best local
    validation Dice.
    ``positives_gate_open``: the weak positives' closed-loop warm-up after
    that round (``train.weak.positives_gate``; None: no gate).
    ``threshold``: how validation Dice is scored (``evaluation.threshold``),
    so the epoch kept is the best at the operating point the site is
    evaluated at: ``"site"`` recalibrates the foreground threshold on the
    site's training labels for every candidate epoch, as evaluation does
    (on at most ``calibration_cases`` of them, ``evaluation.calibration_cases``).
    ``layers="all"`` (``train.personalize.layers``) fine-tunes every weight
    instead and stores the whole state at the site: local fine-tuning of the
    federated model (of a plain FedAvg one: FedAvg-FT, Wang et al. 2019,
    "Federated evaluation of on-device personalization"). The global model
    the server publishes keeps the federation's weights; under DP the epochs
    are DP-SGD over every weight, from the same reserved budget.

    Raises
    ------
    ConfigError
        No private parameters (``model.adaptation: none``), or no local
        validation split to pick the epoch with.
    PrivacyBudgetExceeded
        The rounds reserved no budget for these epochs, or they would pass
        the cap; nothing is trained.
    """
    site = sess.site
    if layers not in ("private", "all"):
        raise ValueError(f"layers={layers!r}: expected 'private' or 'all'")
    if layers == "private" and not sess.local_keys:
        raise ConfigError(
            f"site {site.id!r}: personalisation trains the site-private layers, and "
            "model.adaptation is 'none'. Fix: set model.adaptation, or train.personalize.epochs: 0"
        )
    if sess.val_set is None:
        raise ConfigError(
            f"site {site.id!r}: personalisation keeps the epoch with the best local "
            "validation Dice, and this site has no validation cases with masks (a bag or "
            "image-level site, or val_fraction 0). Fix: give the site masked cases and "
            "val_fraction > 0, or train.personalize.epochs: 0"
        )
    check_threshold_mode(threshold)
    done = site.state_dir / "personalized.json"
    if done.is_file():
        prev = json.loads(done.read_text(encoding="utf-8"))
        if prev.get("run") == run_name and prev.get("model_round") == model_round:
            # WARNING: privacy invariant. A repeated request (server resumed)
            # is answered from the record; training again would spend twice.
            return PersonalizeOutcome(**prev["outcome"])
    torch.set_num_threads(site.torch_threads)
    state = sess.full_state(global_state, run_name, model_round)

    def val_dice(st: Mapping[str, np.ndarray]) -> float:
        model = build_segmenter(sess.model_cfg, sess.data_cfg)
        load_state(model, st)
        tau = (sess.site_threshold(model, min_component_voxels=min_component_voxels, refine=refine,
                                   calibration_cases=calibration_cases)
               if threshold == "site" else None)
        return evaluate_state(model, None, sess.val_set, num_classes=sess.data_cfg.num_classes,
                              min_component_voxels=min_component_voxels, refine=refine,
                              threshold=tau).dice

    before = val_dice(state)
    trained = sess.local_keys if layers == "private" else frozenset(state)
    best, best_epoch, best_private = before, 0, split_state(state, trained)[1]
    accountant = sess.load_accountant() if site.dp_enabled else None
    plan = None if accountant is None else personalization_plan(
        sess, run_name, batch_size, epochs, accountant)
    weak = sess.weak_settings.for_round(model_round, positives_gate_open) if sess.weak else None
    steps = 0
    for epoch in range(1, epochs + 1):
        model = build_segmenter(sess.model_cfg, sess.data_cfg)  # fresh: no Opacus hooks
        load_state(model, state)
        settings = FitSettings(epochs=1, lr=lr, batch_size=batch_size, optimizer=optimizer,
                               momentum=momentum,
                               seed=sess.round_seed(model_round) + 7919 * epoch,
                               intensity=sess.data_cfg.intensity_augment)
        res = fit(model, sess.train_set, settings, num_classes=sess.data_cfg.num_classes,
                  privacy=plan, accountant=accountant, secure_mode=site.secure_mode,
                  weak=weak, only=trained)
        steps += res.steps
        if accountant is not None:
            save_accountant(accountant, sess.accountant_path)
        state = res.state
        dice = val_dice(state)
        logger.info("site %s personalisation epoch %d/%d: val Dice %.4f (federated %.4f)",
                    site.id, epoch, epochs, dice, before)
        if dice > best:
            best, best_epoch = dice, epoch
            best_private = split_state(state, trained)[1]
    epsilon = None
    if accountant is not None and plan is not None:
        epsilon = epsilon_of(accountant, site.delta)
        sess.append_ledger(model_round, plan, epsilon, steps, phase="personalize")
    personal_store(site.state_dir, run_name).save(model_round, best_private)
    out = PersonalizeOutcome(val_dice_before=before, val_dice_after=best, epochs_kept=best_epoch,
                             epochs=epochs, steps=steps, epsilon=epsilon,
                             privacy=None if plan is None else asdict(plan))
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps({"run": run_name, "model_round": model_round,
                               "outcome": asdict(out)}), encoding="utf-8")
    os.replace(tmp, done)
    return out


def personalization_plan(sess: SiteSession, run_name: str, batch_size: int, epochs: int,
                         accountant: object) -> RoundPrivacyPlan:
    """The DP plan of ``epochs`` personalisation epochs: at the noise of the
    run's rounds, which reserved their steps.

    Raises
    ------
    PrivacyBudgetExceeded
        The rounds reserved fewer steps than asked for (or at another sample
        rate), or the epochs would take the site past its cap.
    """
    site = sess.site
    spe = sess.dp_steps_per_epoch(batch_size)
    q, steps = 1.0 / spe, spe * epochs
    path = site.state_dir / "privacy_plan.json"
    stored = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    if stored is None or stored.get("run") != run_name:
        # the site trained no round of this run: its whole remaining budget is free
        return plan_round(accountant, epsilon_cap=site.epsilon, delta=site.delta,
                          max_grad_norm=site.max_grad_norm, sample_rate=q,
                          steps_this_round=steps, rounds_remaining=1)
    reserved = int(stored.get("reserve_steps", 0))
    if reserved < steps or stored.get("sample_rate") != q:
        raise PrivacyBudgetExceeded(
            f"site {site.id!r}: personalisation asks for {steps} DP steps at sample rate "
            f"{q:.4g}, but the rounds of run {run_name!r} reserved {reserved} at "
            f"{stored.get('sample_rate')}; nothing is trained. Fix: set "
            "train.personalize.epochs (and batch_size) before the run starts"
        )
    return sess.fixed_noise_plan(accountant, float(stored["noise_multiplier"]), q, steps,
                                 "personalisation")
