"""Flower ClientApp (Message API): one hospital site.

Message in -> :class:`medseg_core.training.site.SiteSession` -> message out.
Replies carry only model weights and metrics; the site config, images and
accountant state stay on the site.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from flwr.app import (
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from medseg_core import keys
from medseg_core.adaptation import check_shared_only
from medseg_core.attacks import apply_attack
from medseg_core.errors import (
    AdaptationLeakError,
    ConfigError,
    DataIntegrityError,
    PrivacyBudgetExceeded,
)
from medseg_core.training.site import RoundRequest

from client.records import record_to_state, state_to_record
from client.site_runtime import resolve_site, session_for

__all__ = ["app", "build_client_app", "state_to_record", "record_to_state"]

logger = logging.getLogger(__name__)

_TRAIN_KEYS = {
    keys.SERVER_ROUND: int, keys.TOTAL_ROUNDS: int, keys.LOCAL_EPOCHS: int,
    keys.LEARNING_RATE: float, "batch-size": int, "optimizer": str,
    "model": str, "data": str,
}
_EVAL_KEYS = {keys.SERVER_ROUND: int, keys.EVAL_SPLIT: str, "model": str, "data": str}
_PERSONALIZE_KEYS = {keys.MODEL_ROUND: int, keys.RUN_NAME: str, keys.PERSONALIZE_EPOCHS: int,
                     keys.LEARNING_RATE: float, "batch-size": int, "model": str, "data": str}


def _config(msg: Message, required: Mapping[str, type]) -> ConfigRecord:
    """The message's ConfigRecord, checked for the keys this handler needs."""
    content = msg.content
    if keys.CONFIG not in content.config_records or keys.ARRAYS not in content.array_records:
        raise ConfigError(
            f"server message lacks '{keys.CONFIG}' or '{keys.ARRAYS}' records "
            f"(got {sorted(content.keys())}); server and client versions may differ"
        )
    cfg = content.config_records[keys.CONFIG]
    problems = [
        f"{k!r} (expected {t.__name__}, got {type(cfg.get(k)).__name__})"
        for k, t in required.items()
        if k not in cfg or not isinstance(cfg[k], t | (int if t is float else t))
    ]
    if problems:
        raise ConfigError(
            "server message config is missing or mistyped: " + ", ".join(problems)
            + "; upgrade the server and the sites to the same medseg-fl version"
        )
    return cfg


def _gate(cfg: ConfigRecord) -> bool | None:
    """The weak positives' closed-loop warm-up in a train or personalize
    message (``train.weak.positives_gate``); None where the run has none."""
    if keys.POSITIVES_GATE not in cfg:
        return None
    v = cfg[keys.POSITIVES_GATE]
    if not isinstance(v, bool):
        raise ConfigError(
            f"server message config {keys.POSITIVES_GATE!r} must be a bool, got "
            f"{type(v).__name__} {v!r}; upgrade the server and the sites to the same "
            "medseg-fl version"
        )
    return v


def _error_reply(msg: Message, code: int, exc: Exception) -> Message:
    logger.warning("refusing %s: %s", msg.metadata.message_type, exc)
    return Message(Error(code=code, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)


#: Why a site refuses a message, as the error code the server records.
_REFUSALS: tuple[tuple[type[Exception], int], ...] = (
    (PrivacyBudgetExceeded, keys.ERR_BUDGET_EXHAUSTED),
    (DataIntegrityError, keys.ERR_DATA_INTEGRITY),
    (ConfigError, keys.ERR_SITE_CONFIG),
    (AdaptationLeakError, keys.ERR_ADAPTATION_LEAK),
)


def _refusal(msg: Message, exc: Exception, action: str) -> Message:
    """The error reply for ``exc``: a known refusal's code, else 4000 with the
    traceback in the site's log (the server must learn why, not just that)."""
    for kind, code in _REFUSALS:
        if isinstance(exc, kind):
            return _error_reply(msg, code, exc)
    logger.exception("%s failed", action)
    return _error_reply(msg, keys.ERR_CLIENT_FAILURE, exc)


def build_client_app(site_map: Mapping[int, str] | None = None) -> ClientApp:
    """Build the ClientApp.

    Parameters
    ----------
    site_map
        Simulation only: partition-id -> path of that virtual site's
        ``site.yaml``. Deployments pass the path through node_config instead.
    """
    app = ClientApp()
    site_map = dict(site_map) if site_map is not None else None

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        try:
            cfg = _config(msg, _TRAIN_KEYS)
            site = resolve_site(context.node_config, context.run_config, site_map)
            session = session_for(site, str(cfg["model"]), str(cfg["data"]),
                                  str(cfg.get("weak", "{}")))
            req = RoundRequest(
                server_round=int(cfg[keys.SERVER_ROUND]),
                total_rounds=int(cfg[keys.TOTAL_ROUNDS]),
                local_epochs=int(cfg[keys.LOCAL_EPOCHS]),
                lr=float(cfg[keys.LEARNING_RATE]),
                batch_size=int(cfg["batch-size"]),
                bag_batch_size=int(cfg.get(keys.BAG_BATCH_SIZE, 0)) or None,
                optimizer=str(cfg["optimizer"]),
                momentum=float(cfg.get("momentum", 0.0)),
                proximal_mu=float(cfg.get(keys.PROXIMAL_MU, 0.0)),
                run_name=str(cfg.get(keys.RUN_NAME, "")),
                min_component_voxels=int(cfg.get(keys.MIN_COMPONENT_VOXELS, 0)),
                refine=str(cfg.get(keys.EVAL_REFINE, "none")),
                reserve_epochs=int(cfg.get(keys.PERSONALIZE_EPOCHS, 0)),
                positives_gate_open=_gate(cfg),
                adaptation_from_round=int(cfg.get(keys.ADAPTATION_FROM_ROUND, 1)),
                private_epochs=int(cfg.get(keys.PRIVATE_EPOCHS, 0)),
            )
            global_state = record_to_state(msg.content.array_records[keys.ARRAYS])
            if req.server_round in site.drop_rounds:  # simulated outage (tests, scenarios)
                logger.warning("site %s: simulated drop-out in round %d (%.0f s)", site.id,
                               req.server_round, site.drop_seconds)
                time.sleep(site.drop_seconds)
                raise ConfigError(f"site {site.id!r} dropped out of round {req.server_round} "
                                  "(simulated: drop_rounds)")
            outcome = session.train_round(global_state, req)
        except Exception as exc:  # noqa: BLE001 - the server must learn why, not just that
            return _refusal(msg, exc, "training")

        metrics = MetricRecord({
            keys.NUM_EXAMPLES: outcome.n_train,
            keys.TRAIN_LOSS: float(outcome.fit.loss),
            keys.DICE: float(outcome.val.dice) if outcome.val is not None else 0.0,
            keys.TRAIN_SECONDS: float(outcome.fit.seconds),
        })
        site_rec = ConfigRecord({
            keys.SITE_ID: site.id,
            keys.LABEL_REGIME: site.label_regime.value,
            keys.DP_ENABLED: site.dp_enabled,
            keys.N_TRAIN: outcome.n_train,
        })
        try:
            # WARNING: privacy invariant. The last check before anything
            # leaves the site: no site-private adaptation parameter.
            sent = apply_attack(site.attack, outcome.shared, global_state)
            check_shared_only(sent, session.local_keys, what=f"site {site.id!r} train reply")
        except AdaptationLeakError as exc:
            return _error_reply(msg, keys.ERR_ADAPTATION_LEAK, exc)
        content = RecordDict({
            keys.ARRAYS: state_to_record(sent),
            keys.METRICS: metrics,
            keys.SITE: site_rec,
        })
        if outcome.privacy is not None and outcome.epsilon is not None:
            p = outcome.privacy
            content["privacy"] = ConfigRecord({
                keys.EPSILON: float(outcome.epsilon),
                keys.DELTA: float(p.delta),
                keys.NOISE_MULTIPLIER: float(p.noise_multiplier),
                keys.MAX_GRAD_NORM: float(p.max_grad_norm),
                keys.SAMPLE_RATE: float(p.sample_rate),
                keys.STEPS: int(outcome.fit.steps),
                keys.ACCOUNTANT: str(p.accountant),
            })
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        try:
            cfg = _config(msg, _EVAL_KEYS)
            site = resolve_site(context.node_config, context.run_config, site_map)
            session = session_for(site, str(cfg["model"]), str(cfg["data"]),
                                  str(cfg.get("weak", "{}")))
            split = str(cfg[keys.EVAL_SPLIT])
            run_name = str(cfg.get(keys.RUN_NAME, ""))
            model_round = int(cfg.get(keys.MODEL_ROUND, cfg[keys.SERVER_ROUND]))
            # A site whose personalisation failed is scored with its layers as
            # federated, and says so (keys.PERSONALIZED in the reply).
            personalized = bool(cfg.get(keys.PERSONALIZED, False)) and session.has_personalized(
                run_name, model_round)
            res = session.evaluate(
                record_to_state(msg.content.array_records[keys.ARRAYS]), split,
                min_component_voxels=int(cfg.get(keys.MIN_COMPONENT_VOXELS, 0)),
                run_name=run_name, model_round=model_round,
                bag_gate=bool(cfg.get(keys.BAG_GATE, False)),
                refine=str(cfg.get(keys.EVAL_REFINE, "none")),
                personalized=personalized,
                threshold=str(cfg.get(keys.EVAL_THRESHOLD, "argmax")),
                calibration_cases=int(cfg.get(keys.EVAL_CALIBRATION_CASES, 0)) or None,
                mil_head=str(cfg.get(keys.EVAL_MIL_HEAD, "federated")),
            )
        except Exception as exc:  # noqa: BLE001
            return _refusal(msg, exc, "evaluation")
        # A site without masks on this split reports num-examples 0: its Dice
        # carries no weight (the key set stays the same for every site).
        content = RecordDict({
            keys.METRICS: MetricRecord({
                keys.NUM_EXAMPLES: res.n_dice,
                keys.DICE: float(res.dice) if res.dice is not None else 0.0,
            }),
            keys.SITE: ConfigRecord({
                keys.SITE_ID: site.id,
                keys.LABEL_REGIME: site.label_regime.value,
                keys.DP_ENABLED: site.dp_enabled,
                keys.N_TRAIN: len(session.train_set),
                keys.HD95: float(res.hd95) if res.hd95 is not None else float("nan"),
                keys.AUC: float(res.auc) if res.auc is not None else float("nan"),
                keys.MIL_AUC: float(res.mil_auc) if res.mil_auc is not None else float("nan"),
                keys.EMPTY_DICE: float(res.empty_dice) if res.empty_dice is not None else float("nan"),
                keys.DICE_SE: float(res.dice_se) if res.dice_se is not None else float("nan"),
                keys.THRESHOLD: float(res.threshold) if res.threshold is not None else float("nan"),
                keys.EVAL_SPLIT: split,
                keys.PERSONALIZED: personalized,
                "epsilon-spent": float(session.epsilon_spent()) if site.dp_enabled else -1.0,
            }),
        })
        return Message(content=content, reply_to=msg)

    @app.train("personalize")
    def personalize(msg: Message, context: Context) -> Message:
        """Post-federation personalisation of the site's private layers, or
        of every weight (``train.personalize``). The reply carries metrics
        only: the personalised weights never leave the site."""
        try:
            cfg = _config(msg, _PERSONALIZE_KEYS)
            site = resolve_site(context.node_config, context.run_config, site_map)
            session = session_for(site, str(cfg["model"]), str(cfg["data"]),
                                  str(cfg.get("weak", "{}")))
            out = session.personalize(
                record_to_state(msg.content.array_records[keys.ARRAYS]),
                str(cfg[keys.RUN_NAME]), int(cfg[keys.MODEL_ROUND]),
                epochs=int(cfg[keys.PERSONALIZE_EPOCHS]), lr=float(cfg[keys.LEARNING_RATE]),
                optimizer=str(cfg.get(keys.PERSONALIZE_OPTIMIZER, "adam")),
                momentum=float(cfg.get(keys.PERSONALIZE_MOMENTUM, 0.0)),
                layers=str(cfg.get(keys.PERSONALIZE_LAYERS, "private")),
                batch_size=int(cfg["batch-size"]),
                min_component_voxels=int(cfg.get(keys.MIN_COMPONENT_VOXELS, 0)),
                refine=str(cfg.get(keys.EVAL_REFINE, "none")),
                positives_gate_open=_gate(cfg),
                threshold=str(cfg.get(keys.EVAL_THRESHOLD, "argmax")),
                calibration_cases=int(cfg.get(keys.EVAL_CALIBRATION_CASES, 0)) or None,
            )
        except Exception as exc:  # noqa: BLE001
            return _refusal(msg, exc, "personalisation")
        content = RecordDict({
            keys.METRICS: MetricRecord({
                keys.DICE_BEFORE: float(out.val_dice_before),
                keys.DICE: float(out.val_dice_after),
                keys.EPOCHS_KEPT: int(out.epochs_kept),
                keys.STEPS: int(out.steps),
            }),
            keys.SITE: ConfigRecord({keys.SITE_ID: site.id, keys.DP_ENABLED: site.dp_enabled}),
        })
        if out.privacy is not None and out.epsilon is not None:
            p = out.privacy
            content["privacy"] = ConfigRecord({
                keys.EPSILON: float(out.epsilon),
                keys.DELTA: float(p["delta"]),
                keys.NOISE_MULTIPLIER: float(p["noise_multiplier"]),
                keys.MAX_GRAD_NORM: float(p["max_grad_norm"]),
                keys.SAMPLE_RATE: float(p["sample_rate"]),
                keys.STEPS: int(out.steps),
                keys.ACCOUNTANT: str(p["accountant"]),
            })
        return Message(content=content, reply_to=msg)

    return app


# `flwr run` / flower-supernode entry point (site config via node_config).
app = build_client_app()
