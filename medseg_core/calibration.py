"""A site's own operating threshold, calibrated on its own image-level labels.

Under DP-SGD a federated segmenter can rank a site's cases well (the
maximum lesion probability separates positives from negatives: image AUC
0.88-0.97 on the mixed-regime image sites) while its probabilities sit on
the wrong side of 0.5 at that site: lesions at p = 0.3 (timid), or a
background region at p = 0.6 (flooded). The argmax then scores the ranking
badly. Every site knows, for its own training cases, whether each has a
lesion: an image-level ``class``, a bag's label, or a mask with or without
foreground. :func:`calibrate_threshold` picks the foreground threshold at
which "the case has a predicted lesion" (at least ``min_component_voxels``
pixels at or above it; scoring also asks them to be connected) best agrees
with those labels: the balanced accuracy, ties to the threshold
nearest 0.5. This is the site choosing its operating point, as a deployed
classifier's is chosen at each hospital; it reads only the site's own
training labels and the global model, and is used by ``evaluation.threshold:
site`` for every scored prediction at that site (validation and test, every
arm alike).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from medseg_core.refine import pamr

__all__ = ["THRESHOLD_GRID", "THRESHOLD_MODES", "calibrate_threshold", "calibration_cases",
           "check_threshold_mode", "foreground_probability"]

THRESHOLD_GRID: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20))
"""Candidate thresholds, 0.05 to 0.95."""

THRESHOLD_MODES: tuple[str, ...] = ("argmax", "site")
"""How masks are scored (``evaluation.threshold``): at the argmax, or at the
site's calibrated threshold."""


def check_threshold_mode(mode: str) -> None:
    """Raise ValueError unless ``mode`` is one of :data:`THRESHOLD_MODES`."""
    if mode not in THRESHOLD_MODES:
        raise ValueError(f"unknown evaluation threshold {mode!r}; valid: {list(THRESHOLD_MODES)}")


@torch.no_grad()
def foreground_probability(model: nn.Module, images: Tensor, *, refine: str = "none",
                           batch_size: int = 64) -> Tensor:
    """``(N, H, W)`` probability of the foreground class (binary
    segmentation), PAMR-refined with ``refine="pamr"`` as scoring does."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].to(device)
            p = model(x).softmax(dim=1)
            if p.shape[1] != 2:
                raise ValueError(f"a foreground threshold needs binary segmentation; the model "
                                 f"predicts {p.shape[1]} classes")
            out.append((pamr(x, p) if refine == "pamr" else p)[:, 1].cpu())
    finally:
        model.train(was)
    return torch.cat(out) if out else torch.zeros((0, *images.shape[2:]))


def calibration_cases(case_labels: Tensor, max_cases: int | None, seed: int) -> Tensor:
    """``(n_cases,)`` bool: the known cases calibration reads.

    All of them when ``max_cases`` is None or not below their number; else a
    seeded draw of ``max_cases`` stratified by label: each class keeps its
    share of the known cases (rounded, at least one case of each class
    present), so the balanced accuracy is estimated on both classes. The
    same ``seed`` gives the same cases, so a site's thresholds of different
    rounds are read on the same cases.
    """
    if max_cases is not None and max_cases < 2:
        raise ValueError(f"calibration needs at least 2 cases (one of each class), got "
                         f"max_cases={max_cases}; fix: evaluation.calibration_cases >= 2")
    known = case_labels >= 0
    if max_cases is None or int(known.sum()) <= max_cases:
        return known
    g = torch.Generator().manual_seed(seed)
    pos = torch.nonzero(case_labels == 1).squeeze(1)
    neg = torch.nonzero(case_labels == 0).squeeze(1)
    n_pos = round(max_cases * len(pos) / int(known.sum()))
    if len(pos) and len(neg):
        n_pos = min(max(n_pos, 1), max_cases - 1)  # one of each class at least
    keep = torch.zeros_like(known)
    for idx, n in ((pos, n_pos), (neg, max_cases - n_pos)):
        keep[idx[torch.randperm(len(idx), generator=g)[:n]]] = True
    return keep


def calibrate_threshold(
    model: nn.Module, images: Tensor, case_index: Tensor, case_labels: Tensor, *,
    min_component_voxels: int = 0, refine: str = "none",
    grid: tuple[float, ...] = THRESHOLD_GRID, max_cases: int | None = None, seed: int = 0,
) -> tuple[float, float] | None:
    """The grid threshold whose "case has a predicted lesion" best matches
    ``case_labels`` (balanced accuracy; ties: nearest 0.5).

    Parameters
    ----------
    images, case_index
        The site's training slices and the case of each.
    case_labels
        ``(n_cases,)`` int64: 1 lesion, 0 none, -1 unknown (not used).
    max_cases, seed
        Read at most this many known cases, drawn by :func:`calibration_cases`
        with ``seed`` (None: all). Only their slices are predicted, which is
        the cost of calibration.

    Returns
    -------
    (threshold, balanced accuracy), or None when the known labels do not
    hold both classes (nothing to calibrate against).
    """
    if not bool((case_labels == 1).any()) or not bool((case_labels == 0).any()):
        return None
    known = calibration_cases(case_labels, max_cases, seed)
    pos, neg = known & (case_labels == 1), known & (case_labels == 0)
    slices = known[case_index]
    case_index = case_index[slices]
    prob = foreground_probability(model, images[slices], refine=refine).flatten(1)
    # a case's reach: the highest threshold at which at least min_component_voxels
    # of its pixels are foreground (its k-th highest probability; connectivity is
    # not checked, which keeps this cheap enough for every evaluation round)
    k = max(1, min_component_voxels)
    reach = torch.zeros(len(case_labels))
    for c in torch.nonzero(known).squeeze(1).tolist():
        p = prob[case_index == c].flatten()
        reach[c] = p.topk(min(k, p.numel())).values[-1]
    best: tuple[float, float] | None = None
    for t in grid:
        hit = reach >= t
        ba = 0.5 * (float(hit[pos].float().mean()) + float((~hit[neg]).float().mean()))
        if best is None or ba > best[1] + 1e-12 or (
                abs(ba - best[1]) <= 1e-12 and abs(t - 0.5) < abs(best[0] - 0.5)):
            best = (t, ba)
    return best
