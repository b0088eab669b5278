"""Cases -> SliceSet tensors, and the by-case train/val split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medseg_core.data.datalist import Case
from medseg_core.data.io import write_nifti
from medseg_core.data.slices import IGNORE_LABEL, SliceSet, load_slices, split_cases
from medseg_core.errors import DataIntegrityError


def _case(root: Path, name: str, image: np.ndarray, mask: np.ndarray | None = None,
          cls: int | None = None, bag: str | None = None) -> Case:
    image_path = root / f"{name}.nii.gz"
    write_nifti(image, image_path)
    label_path = None
    if mask is not None:
        label_path = root / f"{name}_seg.nii.gz"
        write_nifti(mask.astype(np.uint8), label_path)
    return Case(name, image_path, label_path, cls, bag, "training")


def _volume(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(3.0, 2.0, size=shape).astype(np.float32)


def test_3d_context_slices_are_edge_replicated_neighbours(tmp_path: Path) -> None:
    # Arrange: 8x8x4 volume, image_size equal to the native size (no resize)
    volume = _volume((8, 8, 4))
    mask = np.zeros((8, 8, 4), np.uint8)
    mask[2:4, 2:4, 1] = 1
    case = _case(tmp_path, "v", volume, mask)
    zscored = (volume - volume.mean()) / volume.std()

    # Act
    s = load_slices([case], image_size=8, context_slices=1)

    # Assert
    assert s.images.shape == (4, 3, 8, 8) and s.images.dtype == torch.float32
    assert s.labels is not None and s.labels.shape == (4, 1, 8, 8)
    assert s.labels.dtype == torch.int64
    np.testing.assert_allclose(s.images[0, 0], zscored[..., 0], atol=1e-5)  # replicated edge
    np.testing.assert_allclose(s.images[0, 1], zscored[..., 0], atol=1e-5)
    np.testing.assert_allclose(s.images[0, 2], zscored[..., 1], atol=1e-5)
    np.testing.assert_allclose(s.images[2, 0], zscored[..., 1], atol=1e-5)
    np.testing.assert_allclose(s.images[3, 2], zscored[..., 3], atol=1e-5)
    assert s.classes.tolist() == [0, 1, 0, 0]
    assert s.case_index.tolist() == [0, 0, 0, 0] and s.case_ids == ("v",)
    assert float(s.images[:, 1].mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(s.images[:, 1].std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)


def test_2d_image_is_replicated_into_every_channel_and_resized(tmp_path: Path) -> None:
    image = _volume((20, 12))
    mask = np.zeros((20, 12), np.uint8)
    mask[5:15, 3:9] = 1
    case = _case(tmp_path, "p", image, mask, cls=1, bag="b0")

    s = load_slices([case], image_size=16, context_slices=2)

    assert s.images.shape == (1, 5, 16, 16)
    assert all(torch.equal(s.images[0, 0], s.images[0, c]) for c in range(1, 5))
    assert s.labels is not None and set(s.labels.unique().tolist()) == {0, 1}
    fraction = float(s.labels.float().mean())
    assert fraction == pytest.approx(mask.mean(), abs=0.05)  # nearest resize keeps the area
    assert s.bags == ("b0",) and len(s) == 1


def test_classes_come_from_mask_then_class_then_minus_one(tmp_path: Path) -> None:
    empty_mask = np.zeros((8, 8), np.uint8)
    cases = [
        _case(tmp_path, "masked", _volume((8, 8)), empty_mask, cls=1),  # mask wins over class
        _case(tmp_path, "weak", _volume((8, 8), 1), cls=1, bag="bag7"),
        _case(tmp_path, "unknown", _volume((8, 8, 2), 2)),
    ]

    s = load_slices(cases, image_size=8, require_labels=False)

    assert s.classes.tolist() == [0, 1, -1, -1]
    assert s.labels is not None
    assert s.has_mask.tolist() == [True, False, False, False]
    assert bool((s.labels[1:] == IGNORE_LABEL).all())
    assert s.bags == (None, "bag7", None, None)
    assert s.case_index.tolist() == [0, 1, 2, 2]


def test_no_masks_gives_labels_none(tmp_path: Path) -> None:
    cases = [_case(tmp_path, "a", _volume((8, 8)), cls=0)]

    s = load_slices(cases, image_size=8, require_labels=False)

    assert s.labels is None and s.has_mask.tolist() == [False]


def test_require_labels_names_every_maskless_case(tmp_path: Path) -> None:
    cases = [_case(tmp_path, "with", _volume((8, 8)), np.zeros((8, 8))),
             _case(tmp_path, "without1", _volume((8, 8))),
             _case(tmp_path, "without2", _volume((8, 8)))]

    with pytest.raises(DataIntegrityError, match=r"2 case\(s\) have no \"label\" mask.*"
                       r"\['without1', 'without2'\].*require_labels=False"):
        load_slices(cases, image_size=8)


def test_shape_mismatch_is_an_integrity_error(tmp_path: Path) -> None:
    case = _case(tmp_path, "bad", _volume((8, 8)), np.zeros((6, 8)))

    with pytest.raises(DataIntegrityError, match=r"case bad: image shape \(8, 8\) != label shape "
                       r"\(6, 8\)"):
        load_slices([case], image_size=8)


def test_constant_image_does_not_divide_by_zero(tmp_path: Path) -> None:
    case = _case(tmp_path, "flat", np.full((8, 8), 5.0, np.float32), np.zeros((8, 8)))

    s = load_slices([case], image_size=8)

    assert torch.isfinite(s.images).all() and float(s.images.abs().max()) == 0.0


def test_subset_keeps_slices_of_chosen_cases_in_order(tmp_path: Path) -> None:
    cases = [_case(tmp_path, f"c{i}", _volume((8, 8, i + 1), i), np.zeros((8, 8, i + 1)))
             for i in range(3)]
    s = load_slices(cases, image_size=8)

    sub = s.subset([2, 0])

    assert sub.case_ids == ("c2", "c0")
    assert sub.case_index.tolist() == [0, 0, 0, 1]
    assert torch.equal(sub.images[:3], s.images[s.case_index == 2])
    assert torch.equal(sub.images[3:], s.images[s.case_index == 0])
    assert len(s.subset([])) == 0


@pytest.mark.parametrize("positions", [[3], [-1], [0, 0]])
def test_subset_rejects_bad_positions(tmp_path: Path, positions: list[int]) -> None:
    s = load_slices([_case(tmp_path, "a", _volume((8, 8)), np.zeros((8, 8)))], image_size=8)

    with pytest.raises(ValueError, match=r"must be distinct and within \[0, 1\)"):
        s.subset(positions)


def test_sliceset_rejects_inconsistent_lengths() -> None:
    with pytest.raises(ValueError, match=r"images has 2 slices but \{'bags': 1\}"):
        SliceSet(torch.zeros(2, 1, 4, 4), None, torch.zeros(2, dtype=torch.int64), ("a",),
                 torch.zeros(2, dtype=torch.int64), (None,))


def test_empty_case_list_gives_empty_set() -> None:
    s = load_slices([], image_size=16, context_slices=1)

    assert s.images.shape == (0, 3, 16, 16) and s.labels is None and len(s) == 0


def test_split_cases_is_deterministic_and_by_case() -> None:
    train, val = split_cases(10, 0.2, seed=3)

    assert (train, val) == split_cases(10, 0.2, seed=3)
    assert len(val) == 2 and len(train) == 8
    assert sorted(train + val) == list(range(10))
    assert {tuple(split_cases(10, 0.2, seed=s)[1]) for s in range(10)} != {tuple(val)}


def test_split_cases_edge_cases() -> None:
    assert split_cases(5, 0.0, seed=0) == ([0, 1, 2, 3, 4], [])
    assert split_cases(1, 0.5, seed=0) == ([0], [])
    assert len(split_cases(2, 0.1, seed=0)[1]) == 1  # a requested fraction never rounds to 0


@pytest.mark.parametrize(
    ("n", "frac", "match"),
    [(0, 0.2, r"n_cases=0; a site needs at least 1 case"),
     (5, 1.0, r"val_fraction=1\.0; expected a value in \[0, 1\)"),
     (5, -0.1, r"val_fraction=-0\.1")],
)
def test_split_cases_rejects_bad_arguments(n: int, frac: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        split_cases(n, frac, seed=0)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 60), frac=st.floats(0.0, 0.95), seed=st.integers(0, 2**31))
def test_split_cases_properties(n: int, frac: float, seed: int) -> None:
    train, val = split_cases(n, frac, seed)

    assert sorted(train + val) == list(range(n))
    assert not set(train) & set(val)
    assert len(train) >= 1
    assert abs(len(val) - n * frac) <= 1.0 or (frac > 0 and len(val) == 1)
