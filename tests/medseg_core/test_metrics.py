"""Tests for medseg_core.metrics: case-level Dice and HD95."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from medseg_core.errors import DataIntegrityError
from medseg_core.metrics import SegMetrics, evaluate_segmentation

torch.set_num_threads(1)

H = W = 12


class _Echo(nn.Module):
    """Predicts the label map stored in image channel 0 (logits = one-hot)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pred = x[:, 0].round().long()
        return nn.functional.one_hot(pred, self.num_classes).movedim(-1, 1).float() + 0 * self.dummy


def _empty(n: int) -> torch.Tensor:
    return torch.zeros(n, 1, H, W, dtype=torch.int64)


def _evaluate(pred: torch.Tensor, gt: torch.Tensor, cases: list[int], num_classes: int = 2) -> SegMetrics:
    return evaluate_segmentation(
        _Echo(num_classes),
        pred.float(),
        gt,
        torch.tensor(cases, dtype=torch.int64),
        num_classes=num_classes,
        batch_size=3,
    )


def test_perfect_prediction_gives_dice_one_and_hd95_zero() -> None:
    gt = _empty(4)
    gt[0, 0, 2:6, 2:6] = 1
    gt[2, 0, 5:9, 1:4] = 1

    m = _evaluate(gt.clone(), gt, [0, 0, 1, 1])

    assert m.dice == 1.0
    assert m.hd95 == 0.0
    assert m.n_cases == 2
    assert m.per_case_dice == (1.0, 1.0)
    assert m.dice_se == 0.0


def test_empty_ground_truth_scores_one_if_prediction_empty_else_zero() -> None:
    pred = _empty(2)
    pred[1, 0, 0:2, 0:2] = 1  # case 1 predicts lesion pixels, case 0 does not

    m = _evaluate(pred, _empty(2), [0, 1])

    assert m.per_case_dice == (1.0, 0.0)
    assert m.dice == 0.5
    # sample sd of (1, 0) is sqrt(0.5); standard error sqrt(0.5 / 2) = 0.5
    assert m.dice_se == pytest.approx(0.5)
    assert math.isnan(m.hd95)  # no case has non-empty GT and prediction


def test_known_partial_overlap() -> None:
    gt, pred = _empty(1), _empty(1)
    gt[0, 0, 0, 0:4] = 1  # 4 pixels
    pred[0, 0, 0, 2:8] = 1  # 6 pixels, 2 shared -> 2*2/(4+6)

    m = _evaluate(pred, gt, [0])

    assert m.dice == pytest.approx(0.4)


def test_slices_of_a_case_are_scored_as_one_volume() -> None:
    # slice a: exact 4-pixel hit; slice b: empty GT, 4 false-positive pixels.
    # Volume Dice = 2*4/(4+8) = 2/3; a mean over slices would give (1+0)/2.
    gt, pred = _empty(2), _empty(2)
    gt[0, 0, 0:2, 0:2] = 1
    pred[0, 0, 0:2, 0:2] = 1
    pred[1, 0, 5:7, 5:7] = 1

    m = _evaluate(pred, gt, [7, 7])

    assert m.n_cases == 1
    assert m.dice == pytest.approx(2 / 3)


def test_cases_are_grouped_by_case_index_not_by_position() -> None:
    gt, pred = _empty(4), _empty(4)
    gt[:, 0, 0:2, 0:2] = 1
    pred[[0, 2], 0, 0:2, 0:2] = 1  # case 5 (rows 0, 2) perfect
    pred[[1, 3], 0, 0:2, 0:1] = 1  # case 3 (rows 1, 3): 4 of 8 pixels -> 2*4/(8+4)

    m = _evaluate(pred, gt, [5, 3, 5, 3])

    assert m.per_case_dice == pytest.approx((2 / 3, 1.0))  # ascending case_index: 3, 5
    assert m.dice == pytest.approx((2 / 3 + 1.0) / 2)


def test_hd95_in_pixels_for_a_shifted_point() -> None:
    gt, pred = _empty(1), _empty(1)
    gt[0, 0, 5, 2] = 1
    pred[0, 0, 5, 6] = 1

    m = _evaluate(pred, gt, [0])

    assert m.hd95 == pytest.approx(4.0)
    assert m.dice == 0.0


def test_multiclass_dice_averages_foreground_classes() -> None:
    gt, pred = _empty(1), _empty(1)
    gt[0, 0, 0:2, 0:2] = 1
    gt[0, 0, 6:8, 6:8] = 2
    pred[0, 0, 0:2, 0:2] = 1  # class 1 perfect, class 2 missed

    m = _evaluate(pred, gt, [0], num_classes=3)

    assert m.dice == pytest.approx(0.5)


@pytest.mark.parametrize("training", [True, False])
def test_model_mode_is_restored(training: bool) -> None:
    model = _Echo(2).train(training)
    seen: list[bool] = []
    model.register_forward_hook(lambda mod, i, o: seen.append(mod.training))

    evaluate_segmentation(model, torch.zeros(2, 1, H, W), _empty(2), torch.tensor([0, 1]), num_classes=2)

    assert seen == [False]
    assert model.training is training


def test_label_out_of_range_raises_data_integrity_error() -> None:
    gt = _empty(1)
    gt[0, 0, 0, 0] = 2

    with pytest.raises(DataIntegrityError, match=r"label values span \[0, 2\] but num_classes=2"):
        _evaluate(_empty(1), gt, [0])


def test_mismatched_shapes_raise_value_error() -> None:
    with pytest.raises(ValueError, match=r"case_index must have shape \(N,\) = \(2,\), got \(3,\)"):
        _evaluate(_empty(2), _empty(2), [0, 1, 2])
    with pytest.raises(ValueError, match=r"labels must have shape \(N, 1, H, W\)"):
        evaluate_segmentation(_Echo(2), torch.zeros(2, 1, H, W), _empty(3), torch.tensor([0, 1]), num_classes=2)


def test_remove_small_components_keeps_large_and_drops_specks() -> None:
    from medseg_core.metrics import remove_small_components

    pred = torch.zeros(2, 8, 8, dtype=torch.int64)
    pred[0, 1:4, 1:4] = 1          # 9 voxels ...
    pred[1, 1:4, 1:4] = 1          # ... + 9 connected across slices = 18
    pred[0, 6, 6] = 1              # a 1-voxel speck
    out = remove_small_components(pred, min_voxels=5)
    assert int(out.sum()) == 18
    assert int(out[0, 6, 6]) == 0
    assert int(pred[0, 6, 6]) == 1  # input untouched


def test_postprocessing_changes_the_score_of_a_false_positive_speck() -> None:
    from medseg_core.metrics import evaluate_segmentation

    class Speck(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            logits = torch.zeros(x.shape[0], 2, *x.shape[2:])
            logits[:, 0] = 1.0
            logits[:, 1, 0, 0] = 2.0  # one false-positive pixel per slice
            return logits

    images = torch.zeros(2, 1, 8, 8)
    labels = torch.zeros(2, 1, 8, 8, dtype=torch.int64)  # lesion-free case
    idx = torch.tensor([0, 1])
    raw = evaluate_segmentation(Speck(), images, labels, idx, num_classes=2)
    clean = evaluate_segmentation(Speck(), images, labels, idx, num_classes=2, min_component_voxels=2)
    assert raw.dice == 0.0 and clean.dice == 1.0


def test_pamr_refinement_removes_speckle_and_keeps_a_lesion_of_its_own_intensity() -> None:
    from medseg_core.metrics import evaluate_segmentation

    torch.manual_seed(0)
    images = 0.3 + 0.01 * torch.randn(2, 1, 24, 24)
    images[..., 8:16, 8:16] += 0.4  # a bright lesion, 8 x 8
    labels = torch.zeros(2, 1, 24, 24, dtype=torch.int64)
    labels[..., 8:16, 8:16] = 1

    class Noisy(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            logits = torch.zeros(x.shape[0], 2, *x.shape[2:])
            logits[:, 0] = 3.0
            logits[:, 1, 9:15, 9:15] = 6.0  # the lesion, less its rim ...
            logits[:, 1, 2, 2] = logits[:, 1, 20, 5] = 6.0  # ... and two speckles in flat tissue
            logits[:, 1, 9, 9] = 0.0  # a hole inside it
            return logits

    idx = torch.tensor([0, 1])
    raw = evaluate_segmentation(Noisy(), images, labels, idx, num_classes=2)
    ref = evaluate_segmentation(Noisy(), images, labels, idx, num_classes=2, refine="pamr")
    assert ref.dice > raw.dice
    assert ref.dice > 0.9
    with pytest.raises(ValueError, match=r"'crf'.*valid: \['none', 'pamr'\]"):
        evaluate_segmentation(Noisy(), images, labels, idx, num_classes=2, refine="crf")
