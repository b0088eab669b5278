"""Case-level segmentation metrics (MONAI ``DiceMetric`` / ``HausdorffDistanceMetric``).

Slices are scored per *case*: all slices sharing a ``case_index`` are
stacked into one volume ``(D, H, W)`` (a 2D case is a single slice), so Dice
of a 3D case is its volumetric Dice, not a mean over slices. Reporting
follows Maier-Hein et al. 2024, "Metrics reloaded" (Nature Methods
21:195-212): Dice for overlap, the 95th-percentile Hausdorff distance for
boundary errors.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from scipy import ndimage
from torch import Tensor, nn

from medseg_core.calibration import foreground_probability
from medseg_core.errors import DataIntegrityError
from medseg_core.refine import pamr

__all__ = [
    "case_scores",
    "roc_auc","SegMetrics", "evaluate_segmentation", "remove_small_components"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegMetrics:
    """Segmentation quality over a set of cases.

    Attributes
    ----------
    dice
        Mean over cases of the per-case foreground Dice (mean over classes
        ``1..K-1`` of MONAI ``DiceMetric``, ``include_background=False``) on the
        case's whole stack of slices. A class absent from the ground truth
        scores 1.0 if it is absent from the prediction too, else 0.0 (MONAI's
        ``ignore_empty=False``; its default ``ignore_empty=True`` would give NaN).
        NaN if there are no cases.
    hd95
        Mean over cases of the 95th-percentile symmetric Hausdorff distance in
        pixels (voxels for a stack, unit spacing), averaged over the
        foreground classes present in both ground truth and prediction; cases
        with no such class are left out. NaN if no case qualifies.
    n_cases
        Number of distinct cases.
    per_case_dice
        Per-case Dice, in ascending ``case_index`` order.
    """

    dice: float
    hd95: float
    n_cases: int
    per_case_dice: tuple[float, ...]

    @property
    def dice_se(self) -> float:
        """Standard error of :attr:`dice` over cases (sample sd / sqrt(n));
        NaN with fewer than two per-case values. With 30 test cases and a
        per-case sd of 0.3 it is about 0.055: differences between two models
        smaller than that are noise."""
        n = len(self.per_case_dice)
        if n < 2:
            return math.nan
        mean = sum(self.per_case_dice) / n
        var = sum((d - mean) ** 2 for d in self.per_case_dice) / (n - 1)
        return math.sqrt(var / n)


def _check_inputs(images: Tensor, labels: Tensor, case_index: Tensor, num_classes: int, batch_size: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if images.ndim != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    n, _, h, w = images.shape
    if tuple(labels.shape) != (n, 1, h, w):
        raise ValueError(
            f"labels must have shape (N, 1, H, W) = {(n, 1, h, w)} to match images, got {tuple(labels.shape)}"
        )
    if tuple(case_index.shape) != (n,):
        raise ValueError(f"case_index must have shape (N,) = ({n},), got {tuple(case_index.shape)}")
    if labels.is_floating_point() or case_index.is_floating_point():
        raise ValueError(
            f"labels and case_index must be integer tensors, got {labels.dtype} and {case_index.dtype}"
        )
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DataIntegrityError(
            f"label values span [{int(labels.min())}, {int(labels.max())}] but num_classes="
            f"{num_classes} allows [0, {num_classes - 1}]; check the site's label maps or "
            "data.num_classes in the scenario config"
        )


@torch.no_grad()
def _predict(model: nn.Module, images: Tensor, batch_size: int, refine: str = "none",
             threshold: float | None = None) -> Tensor:
    """Argmax labels ``(N, H, W)`` int64 on CPU (``refine="pamr"``: of the class
    probabilities refined by :func:`medseg_core.refine.pamr`). With
    ``threshold`` (binary segmentation only): foreground where its
    probability is at least ``threshold`` (argmax is 0.5)."""
    if refine not in ("none", "pamr"):
        raise ValueError(f"unknown prediction refinement {refine!r}; valid: ['none', 'pamr']")
    if threshold is not None:
        return (foreground_probability(model, images, refine=refine, batch_size=batch_size)
                >= threshold).long()
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].to(device)
        logits = model(x)
        if refine == "pamr":
            logits = pamr(x, logits.softmax(dim=1))  # probabilities: the same argmax order
        out.append(logits.argmax(dim=1).cpu())
    return torch.cat(out) if out else torch.zeros((0, *images.shape[2:]), dtype=torch.int64)


def _one_hot(volume: Tensor, num_classes: int) -> Tensor:
    """``(D, H, W)`` int -> ``(1, K, H, W)`` if ``D == 1`` else ``(1, K, D, H, W)``, float32."""
    x = volume[0] if volume.shape[0] == 1 else volume
    return F.one_hot(x.long(), num_classes).movedim(-1, 0).unsqueeze(0).float()


def remove_small_components(pred: Tensor, min_voxels: int) -> Tensor:
    """Set foreground components smaller than ``min_voxels`` to background.

    Parameters
    ----------
    pred
        ``(S, H, W)`` int64 label map of one case (its stacked slices).
    min_voxels
        Components (per class, full 3D connectivity) with fewer voxels are
        removed; the nnU-Net post-processing step, here with a fixed size.

    Returns
    -------
    Tensor
        A new ``(S, H, W)`` int64 label map.
    """
    out = pred.clone().numpy()
    structure = np.ones((3, 3, 3), dtype=bool)
    for cls in np.unique(out):
        if cls == 0:
            continue
        comps, n = ndimage.label(out == cls, structure=structure)
        if n == 0:
            continue
        sizes = np.bincount(comps.ravel())
        small = np.flatnonzero(sizes < min_voxels)
        small = small[small != 0]
        out[np.isin(comps, small)] = 0
    return torch.from_numpy(out)


@torch.no_grad()
def evaluate_segmentation(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    case_index: Tensor,
    *,
    num_classes: int,
    batch_size: int = 64,
    min_component_voxels: int = 0,
    case_keep: Tensor | None = None,
    refine: str = "none",
    threshold: float | None = None,
) -> SegMetrics:
    """Predict every slice, group slices into cases and score each case.

    Parameters
    ----------
    model
        Segmenter returning logits ``(B, K, H, W)``; put in eval mode during
        the call and restored to its previous mode afterwards.
    images
        ``(N, C, H, W)`` float32 slices.
    labels
        ``(N, 1, H, W)`` int64 ground truth in ``[0, K)``.
    case_index
        ``(N,)`` int64 case id of each slice; a case's slices are stacked in
        the order they appear.
    num_classes
        ``K``, background included.
    batch_size
        Slices per forward pass.
    min_component_voxels
        nnU-Net-style post-processing: predicted connected components
        (per class, 3D connectivity over a case's stacked slices) smaller
        than this many voxels are set to background before scoring. 0 keeps
        the raw prediction.
    case_keep
        ``(n_cases,)`` bool indexed by case id, or None: a case whose entry
        is False is predicted all background (a case-level classifier's
        gate, e.g. the MIL head's bag prediction).
    refine
        ``"pamr"``: each slice's class probabilities are refined by the
        image's local affinities before the argmax
        (:func:`medseg_core.refine.pamr`; ``evaluation.refine``).
    threshold
        Binary segmentation: foreground where its (refined) probability is at
        least this, instead of the argmax (a site's calibrated threshold,
        :func:`medseg_core.calibration.calibrate_threshold`).

    Returns
    -------
    SegMetrics

    Raises
    ------
    ValueError
        Shapes or dtypes do not match the description above.
    DataIntegrityError
        A label value outside ``[0, K)``.
    """
    _check_inputs(images, labels, case_index, num_classes, batch_size)
    was_training = model.training
    model.eval()
    try:
        preds = _predict(model, images, batch_size, refine, threshold)
    finally:
        model.train(was_training)

    dice_metric = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
    hd_metric = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
    gt = labels[:, 0].cpu()
    cases = case_index.cpu()
    if case_keep is not None:
        preds = torch.where(case_keep.cpu()[cases][:, None, None], preds, torch.zeros_like(preds))
    per_case_dice: list[float] = []
    per_case_hd: list[float] = []
    for case in torch.unique(cases).tolist():
        rows = torch.nonzero(cases == case).squeeze(1)
        pred_case = preds[rows]
        if min_component_voxels > 0:
            pred_case = remove_small_components(pred_case, min_component_voxels)
        p = _one_hot(pred_case, num_classes)
        y = _one_hot(gt[rows], num_classes)
        per_case_dice.append(float(dice_metric(y_pred=p, y=y).mean()))
        hds = [
            float(hd_metric(y_pred=p[:, c : c + 1], y=y[:, c : c + 1]).item())
            for c in range(1, num_classes)
            if bool(y[:, c].any()) and bool(p[:, c].any())
        ]
        if hds:
            per_case_hd.append(sum(hds) / len(hds))
    n_cases = len(per_case_dice)
    dice = sum(per_case_dice) / n_cases if n_cases else math.nan
    hd95 = sum(per_case_hd) / len(per_case_hd) if per_case_hd else math.nan
    logger.debug("evaluated %d slices in %d cases: dice=%.4f hd95=%.3f", images.shape[0], n_cases, dice, hd95)
    return SegMetrics(dice=dice, hd95=hd95, n_cases=n_cases, per_case_dice=tuple(per_case_dice))


@torch.no_grad()
def case_scores(model: nn.Module, images: Tensor, case_index: Tensor, *, batch_size: int = 64) -> Tensor:
    """Image/bag-level score per case: the maximum foreground probability
    over the case's pixels (all its slices).

    Returns
    -------
    Tensor
        ``(n_cases,)`` float32, ``n_cases = case_index.max() + 1``.
    """
    was = model.training
    model.eval()
    try:
        per_slice = torch.cat([
            model(images[i:i + batch_size]).softmax(dim=1)[:, 1:].sum(dim=1).flatten(1).amax(dim=1)
            for i in range(0, len(images), batch_size)
        ]) if len(images) else torch.zeros(0)
    finally:
        model.train(was)
    n = int(case_index.max()) + 1 if len(case_index) else 0
    out = torch.zeros(n)
    return out.scatter_reduce(0, case_index, per_slice, reduce="amax", include_self=False)


def roc_auc(scores: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve (MONAI ``compute_roc_auc``); NaN unless both
    classes are present."""
    from monai.metrics import compute_roc_auc

    if len(labels) == 0 or bool((labels == labels[0]).all()):
        return float("nan")
    return float(compute_roc_auc(scores.float(), labels.float()))
