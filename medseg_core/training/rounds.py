"""One training round between the server and a site: what the server asks
(:class:`RoundRequest`) and what the site answers (:class:`RoundOutcome`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medseg_core.metrics import SegMetrics
from medseg_core.privacy.budget import RoundPrivacyPlan
from medseg_core.training.session import FitResult

__all__ = ["RoundOutcome", "RoundRequest", "outcome_from_cache"]


@dataclass(frozen=True)
class RoundRequest:
    """What the server asks of a site for one training round."""

    server_round: int
    total_rounds: int
    local_epochs: int
    lr: float
    batch_size: int
    # MIL sites: bags per step (train.bag_batch_size); None: about batch_size / K
    bag_batch_size: int | None = None
    optimizer: str = "adam"
    momentum: float = 0.0
    proximal_mu: float = 0.0
    run_name: str = ""
    min_component_voxels: int = 0
    refine: str = "none"  # post-processing of the validation predictions (evaluation.refine)
    # train.weak.positives_gate: whether this round trains the decoder on weak
    # positives (None: the run has no gate)
    positives_gate_open: bool | None = None
    # epochs of post-federation personalisation whose DP budget the rounds
    # leave free (train.personalize.epochs; 0: none)
    reserve_epochs: int = 0
    # train.adaptation_from_round: before this round the site's private
    # adaptation layers stay as they are and only the shared weights train
    adaptation_from_round: int = 1
    # train.private_epochs: epochs of the private layers alone (shared weights
    # frozen) before the local epochs, from adaptation_from_round on; no DP
    private_epochs: int = 0


def outcome_from_cache(shared: dict[str, np.ndarray], stats: dict) -> RoundOutcome:
    """A stored reply as a :class:`RoundOutcome` (see :mod:`.replay`)."""
    val = stats.get("val")
    return RoundOutcome(
        fit=FitResult(state=shared, loss=float(stats["loss"]), steps=int(stats["steps"]),
                      num_examples=int(stats["num_examples"]), seconds=float(stats["seconds"])),
        shared=shared, n_train=int(stats["n_train"]),
        val=None if val is None else SegMetrics(dice=float(val["dice"]), hd95=float(val["hd95"]),
                                                n_cases=int(val["n_cases"]), per_case_dice=()),
        privacy=None if stats.get("privacy") is None else RoundPrivacyPlan(**stats["privacy"]),
        epsilon=None if stats.get("epsilon") is None else float(stats["epsilon"]),
    )


@dataclass(frozen=True)
class RoundOutcome:
    """A site's result for one round (weights + statistics + privacy).

    ``shared`` is the only state that may leave the site: the trained
    weights without the site-private adaptation parameters.
    """

    fit: FitResult
    shared: dict[str, np.ndarray]
    n_train: int
    val: SegMetrics | None
    privacy: RoundPrivacyPlan | None
    epsilon: float | None  # cumulative, measured by the accountant after the round
