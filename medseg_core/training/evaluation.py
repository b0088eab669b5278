"""A site's evaluation of a model on one split: Dice/HD95 where cases have
masks, image-level AUC where they have a ``class``, and what an
all-background prediction would score (to read a collapsed model's Dice)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from medseg_core.data.slices import SliceSet
from medseg_core.metrics import case_scores, roc_auc
from medseg_core.training.session import evaluate_state
from medseg_core.weak.bag_scores import bag_probabilities

__all__ = ["SiteEval", "case_has_lesion", "evaluate_split"]


@dataclass(frozen=True)
class SiteEval:
    """A site's evaluation: Dice/HD95 over its cases with masks (None if it
    has none), the number of slices they cover, and the image-level AUC
    (None unless both classes occur)."""

    dice: float | None
    hd95: float | None
    n_dice: int
    auc: float | None = None
    # Dice an all-background prediction would score (the fraction of scored
    # cases without a lesion: an empty case predicted empty scores 1)
    empty_dice: float | None = None
    # standard error of ``dice`` over the scored cases (None with fewer than two)
    dice_se: float | None = None
    # bag sites: AUC of the MIL head's bag-level prediction (None otherwise)
    mil_auc: float | None = None
    # the foreground threshold the masks were scored at (None: the argmax;
    # evaluation.threshold: site, medseg_core/calibration.py)
    threshold: float | None = None


def case_has_lesion(data: SliceSet) -> torch.Tensor:
    """``(n_cases,)`` bool: whether a case's mask has any foreground (``data`` has masks)."""
    return torch.zeros(len(data.case_ids), dtype=torch.int64).scatter_reduce(
        0, data.case_index, (data.labels.flatten(1) > 0).any(dim=1).long(), reduce="amax",
        include_self=False).bool()


def case_classes(data: SliceSet) -> torch.Tensor:
    """``(n_cases,)`` int64: each case's image-level or bag ``class`` (the
    maximum over its slices), -1 where unknown."""
    return torch.full((len(data.case_ids),), -1, dtype=torch.int64).scatter_reduce(
        0, data.case_index, data.classes, reduce="amax", include_self=False)


def _cases_with_masks(data: SliceSet) -> SliceSet | None:
    """The cases of ``data`` that have masks, or None."""
    if data.labels is None:
        return None
    has = data.has_mask
    keep = sorted({int(c) for c in data.case_index[has].tolist()})
    return data.subset(keep) if keep else None


def evaluate_split(
    model: nn.Module, data: SliceSet, *, num_classes: int, min_component_voxels: int = 0,
    with_auc: bool = False, bags: bool = False, bag_gate: bool = False, refine: str = "none",
    threshold: float | None = None, mil_head: nn.Module | None = None,
) -> SiteEval:
    """Score ``model`` (weights loaded) on ``data``.

    Dice/HD95 over the cases with masks; with ``with_auc``, the image-level
    AUC over the cases with a known ``class``, scored by the maximum
    foreground probability over the case. With ``bags`` (each case is a MIL
    bag and the model has a MIL head), also the AUC of the MIL head's
    bag-level prediction (with ``with_auc``); with ``bag_gate`` as well, a
    case the MIL head calls negative (probability < 0.5) is segmented as
    all background. ``mil_head``: the MIL head that makes the bag-level
    prediction (both uses) instead of the model's own, e.g. the site's
    (:func:`medseg_core.weak.bag_scores.refit_mil_head`). ``refine``,
    ``threshold``: post-processing of the predictions
    (:func:`medseg_core.metrics.evaluate_segmentation`).
    """
    if bag_gate and not bags:
        raise ValueError("bag_gate needs bags=True (cases that are MIL bags and a MIL head)")
    masked = _cases_with_masks(data)
    seg, empty = None, None
    if masked is not None:
        keep = (bag_probabilities(model, masked.images, masked.case_index, head=mil_head) >= 0.5
                if bag_gate else None)
        seg = evaluate_state(model, None, masked, num_classes=num_classes,
                             min_component_voxels=min_component_voxels, case_keep=keep,
                             refine=refine, threshold=threshold)
        empty = float((~case_has_lesion(masked)).float().mean())
    auc, mil_auc = float("nan"), float("nan")
    if with_auc and len(data):
        case_cls = case_classes(data)
        known = case_cls >= 0
        if bool(known.any()):
            scores = case_scores(model, data.images, data.case_index)
            auc = roc_auc(scores[known], case_cls[known])
            if bags:
                probs = bag_probabilities(model, data.images, data.case_index, head=mil_head)
                mil_auc = roc_auc(probs[known], case_cls[known])
    return SiteEval(
        dice=None if seg is None else float(seg.dice),
        hd95=None if seg is None or not np.isfinite(seg.hd95) else float(seg.hd95),
        n_dice=0 if masked is None else len(masked), auc=None if np.isnan(auc) else auc,
        empty_dice=empty,
        dice_se=None if seg is None or not np.isfinite(seg.dice_se) else float(seg.dice_se),
        mil_auc=None if np.isnan(mil_auc) else mil_auc, threshold=threshold,
    )
