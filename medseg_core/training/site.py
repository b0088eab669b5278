"""A hospital site's training runtime, framework-free.

:class:`SiteSession` owns one site's data tensors (through its base
:class:`medseg_core.training.site_data.SiteData`), its privacy accountant
(persisted in the site's ``state_dir``) and its budget. The Flower client is
a thin adapter: message in -> ``train_round`` / ``evaluate`` -> message out.

State kept in ``state_dir`` (never sent anywhere):

* ``accountant.json`` - the Opacus accountant's history, so epsilon composes
  over every round and survives a restart of the client process;
* ``ledger.jsonl`` - the site's own append-only privacy ledger;
* ``adaptation/`` - the site-private adaptation parameters of every round
  (:mod:`medseg_core.adaptation`), which are merged into the global model on
  arrival and split off again before anything is sent.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping
from dataclasses import asdict, replace
from functools import cached_property

import numpy as np
import torch
from torch import nn

from medseg_core.adaptation import AdaptationStore, check_shared_only, local_keys, merge_state, split_state
from medseg_core.adaptation.tta import TTAResult, adapt_unlabeled
from medseg_core.calibration import calibrate_threshold, check_threshold_mode
from medseg_core.config import DataConfig, LabelRegime, ModelConfig, SiteConfig, WeakConfig
from medseg_core.data.integrity import require_valid_site
from medseg_core.data.slices import SliceSet, load_slices
from medseg_core.errors import ConfigError
from medseg_core.weak import WeakSettings
from medseg_core.weak.bag_scores import MIL_HEAD_MODES, SITE_HEAD_EMBEDDINGS, refit_mil_head
from medseg_core.privacy.accountant import epsilon_of, save_accountant
from medseg_core.privacy.budget import RoundPrivacyPlan
from medseg_core.training.evaluation import SiteEval, evaluate_split
from medseg_core.training.personalize import PersonalizeOutcome, personal_store, personalize
from medseg_core.training.replay import ReplyCache, state_digest
from medseg_core.training.bags import fit_bags
from medseg_core.training.session import (
    FitResult,
    FitSettings,
    build_segmenter,
    evaluate_state,
    fit,
    load_state,
    weak_site_trainable,
)
from medseg_core.training.rounds import RoundOutcome, RoundRequest, outcome_from_cache
from medseg_core.training.site_privacy import SitePrivacy

__all__ = ["PersonalizeOutcome", "RoundOutcome", "RoundRequest", "SiteEval", "SiteSession"]

logger = logging.getLogger(__name__)


class SiteSession(SitePrivacy):
    """One site's data, model factory and privacy state.

    Parameters
    ----------
    site
        The site's private configuration.
    model_cfg, data_cfg
        The federation's model and data settings (from the server).

    Raises
    ------
    DataIntegrityError
        The site's data fails its integrity check (the full report is in the
        message); training is refused.
    """

    def __init__(self, site: SiteConfig, *, model_cfg: ModelConfig, data_cfg: DataConfig,
                 weak_cfg: WeakConfig | None = None) -> None:
        self.site = site
        self.model_cfg = model_cfg
        self.data_cfg = data_cfg
        self.weak_settings = WeakSettings.from_config(weak_cfg)
        self.datalist = require_valid_site(site.data_dir)
        self.site.state_dir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------ adaptation
    @cached_property
    def local_keys(self) -> frozenset[str]:
        """State-dict keys this site keeps private (``model.adaptation``)."""
        return local_keys(build_segmenter(self.model_cfg, self.data_cfg), self.model_cfg.adaptation)

    def _initial_private(self) -> dict[str, np.ndarray]:
        """Private parameters before the site's first round (seeded; the
        adapter is the identity and norm layers scale 1, shift 0)."""
        torch.manual_seed(self.site.seed)
        model = build_segmenter(self.model_cfg, self.data_cfg)
        state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
        return split_state(state, self.local_keys)[1]

    def private_state(self, run_name: str, model_round: int, *, before: bool = False) -> dict[str, np.ndarray]:
        """The site's private parameters to pair with the global model of
        ``model_round`` (``before=True``: to start training that round)."""
        if not self.local_keys:
            return {}
        store = AdaptationStore(self.site.state_dir, run_name)
        found = store.load_before(model_round) if before else store.load_at(model_round)
        return found if found is not None else self._initial_private()

    def full_state(self, global_state: Mapping[str, np.ndarray], run_name: str, model_round: int,
                   *, before: bool = False) -> dict[str, np.ndarray]:
        """The global shared weights merged with this site's private ones."""
        private = self.private_state(run_name, model_round, before=before)
        return merge_state(global_state, private)

    @cached_property
    def unlabeled_images(self) -> torch.Tensor:
        """Every training slice's image, masks ignored (for test-time adaptation)."""
        return load_slices(
            self.datalist.split("training"), image_size=self.data_cfg.image_size,
            context_slices=self.data_cfg.context_slices, require_labels=False,
        ).images

    def test_time_adapt(
        self, global_state: Mapping[str, np.ndarray], run_name: str, model_round: int, *,
        epochs: int = 2, lr: float = 1e-3,
    ) -> TTAResult:
        """Adapt this site's private parameters to its unlabeled images
        (:func:`medseg_core.adaptation.tta.adapt_unlabeled`) and store them as
        the site's parameters for ``model_round``, so evaluation uses them."""
        torch.set_num_threads(self.site.torch_threads)
        model = build_segmenter(self.model_cfg, self.data_cfg)
        load_state(model, self.full_state(global_state, run_name, model_round))
        res = adapt_unlabeled(model, self.unlabeled_images, self.local_keys, epochs=epochs, lr=lr,
                              seed=self.round_seed(model_round))
        AdaptationStore(self.site.state_dir, run_name).save(model_round, res.private)
        return res

    def has_personalized(self, run_name: str, model_round: int) -> bool:
        """Whether :meth:`personalize` stored layers for this run and round."""
        return model_round in personal_store(self.site.state_dir, run_name).rounds()

    def personalize(
        self, global_state: Mapping[str, np.ndarray], run_name: str, model_round: int, *,
        epochs: int, lr: float, batch_size: int, optimizer: str = "adam", momentum: float = 0.0,
        min_component_voxels: int = 0, refine: str = "none",
        positives_gate_open: bool | None = None, threshold: str = "argmax",
        calibration_cases: int | None = None, layers: str = "private",
    ) -> PersonalizeOutcome:
        """Fine-tune only this site's private layers (``layers="all"``: every
        weight) against the global model of ``model_round``
        (:func:`medseg_core.training.personalize.personalize`)."""
        return personalize(self, global_state, run_name, model_round, epochs=epochs, lr=lr,
                           batch_size=batch_size, optimizer=optimizer, momentum=momentum,
                           min_component_voxels=min_component_voxels, refine=refine,
                           positives_gate_open=positives_gate_open,
                           threshold=threshold, calibration_cases=calibration_cases,
                           layers=layers)

    def export_shared(self, state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The part of ``state`` that may be sent; raises AdaptationLeakError
        if a private key would remain (nothing is sent then)."""
        shared, _ = split_state(state, self.local_keys)
        check_shared_only(shared, self.local_keys, what=f"site {self.site.id!r} outgoing update")
        return shared

    # ------------------------------------------------------------------ round
    def train_round(self, global_state: Mapping[str, np.ndarray], req: RoundRequest) -> RoundOutcome:
        """Train from the global weights for one round.

        Raises
        ------
        PrivacyBudgetExceeded
            This round would take the site past its epsilon cap; nothing is
            trained and the accountant is unchanged.
        """
        torch.set_num_threads(self.site.torch_threads)
        digest = state_digest(global_state)
        cache = ReplyCache(self.site.state_dir, req.run_name)
        replay = cache.get(req.server_round, digest)
        if replay is not None:
            # WARNING: privacy invariant. A replayed round (server resumed
            # after a crash) is answered with what was sent the first time;
            # training again would spend the budget twice.
            logger.info("site %s round %d: replayed request, answering with the stored reply",
                        self.site.id, req.server_round)
            return outcome_from_cache(*replay)
        model = build_segmenter(self.model_cfg, self.data_cfg)
        load_state(model, self.full_state(global_state, req.run_name, req.server_round, before=True))
        accountant = self.load_accountant() if self.site.dp_enabled else None
        plan = self.plan(req, accountant=accountant) if accountant is not None else None
        settings = FitSettings(
            epochs=req.local_epochs, lr=req.lr, batch_size=req.batch_size,
            bag_batch_size=req.bag_batch_size,
            optimizer=req.optimizer, momentum=req.momentum, proximal_mu=req.proximal_mu,
            seed=self.round_seed(req.server_round), intensity=self.data_cfg.intensity_augment,
        )
        weak = self.weak_settings.for_round(req.server_round, req.positives_gate_open)
        # a site without masks leaves train.weak.weak_sites_freeze's part to the mask sites
        only = weak_site_trainable(model, weak.weak_sites_freeze, self.local_keys) if (
            self.weak and self.site.label_regime in (LabelRegime.IMAGE, LabelRegime.BAG)) else None
        if self.local_keys and req.server_round < req.adaptation_from_round:
            # the private layers' warm-up: they wait while the shared weights train
            shared_only = frozenset(n for n, _ in model.named_parameters()
                                    if n not in self.local_keys)
            only = shared_only if only is None else only & shared_only
        elif self.local_keys and req.private_epochs:
            self._fit_private_first(model, req, settings, weak, plan)
        result = self._fit(model, settings, plan=plan, accountant=accountant, weak=weak, only=only)
        shared = self.export_shared(result.state)
        if self.local_keys:
            AdaptationStore(self.site.state_dir, req.run_name).save(
                req.server_round, split_state(result.state, self.local_keys)[1]
            )
        epsilon = None
        if accountant is not None and plan is not None:
            # WARNING: persist before replying, so a crash after the reply
            # can never lose spent budget (epsilon only grows).
            save_accountant(accountant, self.accountant_path)
            epsilon = epsilon_of(accountant, self.site.delta)
            self.append_ledger(req.server_round, plan, epsilon, result.steps)
        val = None
        if self.val_set is not None:
            val = evaluate_state(
                build_segmenter(self.model_cfg, self.data_cfg), result.state, self.val_set,
                num_classes=self.data_cfg.num_classes,
                min_component_voxels=req.min_component_voxels, refine=req.refine,
            )
        logger.info(
            "site %s round %d: loss %.4f, steps %d, eps %s",
            self.site.id, req.server_round, result.loss, result.steps,
            "n/a" if epsilon is None else f"{epsilon:.3f}",
        )
        outcome = RoundOutcome(
            fit=result, shared=shared, n_train=len(self.train_set), val=val, privacy=plan,
            epsilon=epsilon,
        )
        cache.put(req.server_round, digest, shared, {
            "loss": result.loss, "steps": result.steps, "num_examples": result.num_examples,
            "seconds": result.seconds, "n_train": outcome.n_train, "epsilon": epsilon,
            "privacy": None if plan is None else asdict(plan),
            "val": None if val is None else {"dice": val.dice, "hd95": val.hd95,
                                             "n_cases": val.n_cases},
        })
        return outcome

    def _fit_private_first(self, model: nn.Module, req: RoundRequest, settings: FitSettings,
                           weak: WeakSettings, plan: RoundPrivacyPlan | None) -> None:
        """FedRep's local order (Collins et al. 2021): the private adaptation
        layers alone for ``req.private_epochs`` epochs, the shared weights
        frozen, so they fit the new global model before the shared weights
        move. Trains ``model`` in place and leaves every weight trainable."""
        if plan is not None:
            raise ConfigError(
                f"site {self.site.id}: train.private_epochs is {req.private_epochs} but this site "
                "trains under DP, whose plan budgets train.local_epochs per round. Fix: "
                "train.private_epochs: 0, or set it in the scenario's without_dp block")
        private = frozenset(n for n, _ in model.named_parameters() if n in self.local_keys)
        first = replace(settings, epochs=req.private_epochs, seed=settings.seed + 1)
        self._fit(model, first, plan=None, accountant=None, weak=weak, only=private)
        model.requires_grad_(True)  # fit's own set_trainable picks what the local epochs train

    def _fit(self, model: nn.Module, settings: FitSettings, *, plan: RoundPrivacyPlan | None,
             accountant: object | None, weak: WeakSettings,
             only: frozenset[str] | None) -> FitResult:
        """One local training session on this site's data: bags at a MIL
        site (:func:`fit_bags`), slices elsewhere (:func:`fit`)."""
        if self.is_bag_site:
            return fit_bags(model, self.train_bags, settings, privacy=plan, accountant=accountant,
                            secure_mode=self.site.secure_mode, weak=weak, only=only)
        return fit(model, self.train_set, settings, num_classes=self.data_cfg.num_classes,
                   privacy=plan, accountant=accountant, secure_mode=self.site.secure_mode,
                   weak=weak if self.weak else None, only=only)

    def round_seed(self, server_round: int) -> int:
        """Per-site, per-round seed: sites must not share random streams
        (same shuffles and augmentations everywhere would correlate them)."""
        return (self.site.seed * 1_000_003 + zlib.crc32(self.site.id.encode()) * 101
                + server_round) % (2**31)

    def split_set(self, split: str) -> SliceSet:
        """The slices of ``"val"`` (training slices when there is no
        validation split) or ``"test"``."""
        if split == "test":
            return self.test_set
        if split == "val":
            return self.val_set if self.val_set is not None else self.train_set
        raise ValueError(f"unknown split {split!r}; expected 'val' or 'test'")

    def site_threshold(self, model: nn.Module, *, min_component_voxels: int = 0,
                       refine: str = "none", calibration_cases: int | None = None) -> float | None:
        """The foreground threshold calibrated for ``model`` on this site's
        training labels (``evaluation.threshold: site``), on at most
        ``calibration_cases`` of its cases (the same draw every round); None
        (the argmax) where they hold one class only."""
        tr = self.train_set
        found = calibrate_threshold(model, tr.images, tr.case_index, self.train_case_labels,
                                    min_component_voxels=min_component_voxels, refine=refine,
                                    max_cases=calibration_cases, seed=self.round_seed(0))
        if found is None:
            logger.warning("site %s: its training cases hold one class only; scored at the "
                           "argmax (evaluation.threshold: site)", self.site.id)
            return None
        return found[0]

    def site_mil_head(self, model: nn.Module, mode: str = "site") -> nn.Module | None:
        """The MIL head refit for ``model`` on this site's training bags
        (``evaluation.mil_head``: ``site`` over bottleneck, ``site-decoder``
        over decoder instance embeddings;
        :func:`medseg_core.weak.bag_scores.refit_mil_head`, seeded per site); None
        (the federated head) where they hold one class only."""
        if mode not in SITE_HEAD_EMBEDDINGS:
            raise ValueError(f"unknown site MIL head {mode!r}; valid: {list(SITE_HEAD_EMBEDDINGS)}")
        tr = self.train_set
        head = refit_mil_head(model, tr.images, tr.case_index, self.train_case_labels,
                              seed=self.round_seed(0), embedding=SITE_HEAD_EMBEDDINGS[mode])
        if head is None:
            logger.warning("site %s: its training bags hold one class only; the bag-level "
                           "prediction is the federated MIL head's (evaluation.mil_head: %s)",
                           self.site.id, mode)
        return head

    def evaluate(
        self, state: Mapping[str, np.ndarray], split: str, *, min_component_voxels: int = 0,
        run_name: str = "", model_round: int = 0, bag_gate: bool = False, refine: str = "none",
        personalized: bool = False, threshold: str = "argmax", calibration_cases: int | None = None,
        mil_head: str = "federated",
    ) -> SiteEval:
        """Metrics of the global ``state`` (of round ``model_round``) on the
        site's ``"val"`` or ``"test"`` split, with the site's private
        adaptation parameters of that round merged in.

        Dice/HD95 are computed on the cases with masks; the image-level AUC
        (test split) on the cases with a known ``class``, scored by the
        maximum foreground probability over the case; at a bag site also the
        AUC of the MIL head's bag-level prediction, and with ``bag_gate`` a
        bag the MIL head calls negative is segmented as all background
        (``evaluation.bag_gate``; other sites ignore it). ``refine``: see
        ``evaluation.refine``. ``personalized``: with the private layers
        :meth:`personalize` kept for ``model_round``. ``threshold="site"``:
        masks are scored at the foreground threshold calibrated for this
        model on the site's own training labels
        (:func:`medseg_core.calibration.calibrate_threshold`;
        ``evaluation.threshold``); the argmax where they hold one class only.
        ``calibration_cases``: ``evaluation.calibration_cases``.
        ``mil_head="site"`` or ``"site-decoder"`` (a bag site): the bag-level
        prediction (its AUC and the gate) is made by a MIL head fitted for this
        model on the site's own training bags, over bottleneck or decoder
        instance embeddings (:func:`medseg_core.weak.bag_scores.refit_mil_head`;
        ``evaluation.mil_head``) instead of the federated one; the federated
        head where those bags hold one class only.

        Raises
        ------
        ConfigError
            ``personalized`` but the site holds no personalised layers for
            this run and round.
        """
        check_threshold_mode(threshold)
        if mil_head not in MIL_HEAD_MODES:
            raise ValueError(f"unknown evaluation mil_head {mil_head!r}; valid: {list(MIL_HEAD_MODES)}")
        model = build_segmenter(self.model_cfg, self.data_cfg)
        if personalized:
            if not self.has_personalized(run_name, model_round):
                raise ConfigError(
                    f"site {self.site.id!r} holds no personalised layers for run {run_name!r}, "
                    f"round {model_round}: personalisation did not run or failed there (the site's "
                    "log says why). Fix: personalise first (train.personalize.epochs > 0), or "
                    "evaluate with personalized=False"
                )
            kept = personal_store(self.site.state_dir, run_name).load_at(model_round)
            # train.personalize.layers: all kept the whole model, shared weights
            # included: it replaces the global one (load_state is strict)
            load_state(model, merge_state(state, kept) if set(kept) <= self.local_keys else kept)
        else:
            load_state(model, self.full_state(state, run_name, model_round))
        bags = self.is_bag_site
        data = self.split_set(split)
        tau = None
        if threshold == "site" and data.labels is not None and bool(data.has_mask.any()):
            tau = self.site_threshold(model, min_component_voxels=min_component_voxels,
                                      refine=refine, calibration_cases=calibration_cases)
        # the bag-level prediction is used by the gate, and scored on the test split
        head = (self.site_mil_head(model, mil_head)
                if mil_head != "federated" and bags and (bag_gate or split == "test") else None)
        return evaluate_split(model, data, num_classes=self.data_cfg.num_classes,
                              min_component_voxels=min_component_voxels,
                              with_auc=split == "test", bags=bags, bag_gate=bag_gate and bags,
                              refine=refine, threshold=tau, mil_head=head)
