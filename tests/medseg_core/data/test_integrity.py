"""check_site collects every problem of a site in one report."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg_core.data import integrity
from medseg_core.data.integrity import IntegrityReport, check_site, require_valid_site
from medseg_core.data.io import write_nifti
from medseg_core.errors import DataIntegrityError

LABELS = {"0": "background", "1": "lesion"}


def _pair(root: Path, name: str, image: np.ndarray, mask: np.ndarray,
          image_spacing=None, mask_spacing=None) -> dict[str, str]:
    entry = {"image": f"imagesTr/{name}.nii.gz", "label": f"labelsTr/{name}.nii.gz"}
    write_nifti(image, root / entry["image"], image_spacing)
    write_nifti(mask, root / entry["label"], mask_spacing)
    return entry


@pytest.fixture
def broken_site(tmp_path: Path, write_dataset_json) -> Path:
    """A site with one case per problem kind (plus a clean one)."""
    rng = np.random.default_rng(0)
    good = rng.normal(size=(16, 16)).astype(np.float32)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:8, 4:8] = 1
    root = tmp_path / "site"
    entries = [_pair(root, "good", good, mask)]
    # shape mismatch
    entries.append(_pair(root, "shape", rng.normal(size=(16, 16)), np.zeros((14, 16), np.uint8)))
    # NaN pixels
    nan_image = rng.normal(size=(16, 16)).astype(np.float32)
    nan_image[0, :3] = np.nan
    nan_image[1, 0] = np.inf
    entries.append(_pair(root, "nan", nan_image, mask))
    # undeclared label value 7
    bad_mask = mask.copy()
    bad_mask[0, 0] = 7
    entries.append(_pair(root, "badlabel", rng.normal(size=(16, 16)), bad_mask))
    # constant image
    entries.append(_pair(root, "empty", np.zeros((16, 16), np.float32), mask))
    # same file listed twice, and a copy of "good" under another name
    entries.append(dict(entries[0]))
    entries.append(_pair(root, "copy", good.copy(), mask))
    # missing image file
    entries.append({"image": "imagesTr/missing.nii.gz", "label": "labelsTr/good.nii.gz"})
    # corrupt image file
    (root / "imagesTr/corrupt.nii.gz").write_bytes(b"\x00garbage" * 30)
    entries.append({"image": "imagesTr/corrupt.nii.gz"})
    # spacing mismatch, and affine (origin) mismatch
    entries.append(_pair(root, "spacing", rng.normal(size=(16, 16)), mask,
                         image_spacing=(1.0, 1.0), mask_spacing=(1.0, 2.0)))
    entries.append(_pair(root, "origin", rng.normal(size=(16, 16)), mask))
    shifted = np.eye(4)
    shifted[:3, 3] = (5.0, 0.0, 0.0)
    nib.save(nib.Nifti1Image(mask, shifted), str(root / "labelsTr/origin.nii.gz"))
    # a malformed entry
    entries.append({"label": "labelsTr/good.nii.gz"})
    # test split: a leak of "good" into the test set
    write_nifti(good, root / "imagesTs/leak.nii.gz")
    write_dataset_json(root, {"labels": LABELS, "training": entries,
                              "test": ["imagesTs/leak.nii.gz"]})
    return root


def test_check_site_reports_every_problem(broken_site: Path) -> None:
    # Act
    report = check_site(broken_site)

    # Assert
    found = {(p.case_id, p.kind) for p in report.problems}
    assert found == {
        ("shape", "shape_mismatch"),
        ("nan", "nan_or_inf"),
        ("badlabel", "label_values"),
        ("empty", "empty_image"),
        ("good__2", "duplicate_case"),
        ("copy", "duplicate_case"),
        ("missing", "missing_file"),
        ("corrupt", "unreadable"),
        ("spacing", "spacing_mismatch"),
        ("origin", "affine_mismatch"),
        ("<dataset>", "datalist"),
        ("leak", "duplicate_case"),
    }
    assert len(report.problems) == len(found)
    assert report.n_cases == 12 and not report.ok


def test_problem_details_name_both_values(broken_site: Path) -> None:
    report = check_site(broken_site)
    detail = {(p.case_id, p.kind): p.detail for p in report.problems}

    assert detail["shape", "shape_mismatch"] == "image shape (16, 16) != label shape (14, 16)"
    assert "3 NaN and 1 Inf voxel(s) of 256" in detail["nan", "nan_or_inf"]
    assert detail["badlabel", "label_values"].startswith(
        "label values [7] not in declared labels [0, 1]")
    assert "all 256 voxels = 0" in detail["empty", "empty_image"]
    assert detail["good__2", "duplicate_case"] == (
        "good (training) and good__2 (training) list the same image file imagesTr/good.nii.gz")
    assert "good (training) and copy (training) have identical pixel content" in detail[
        "copy", "duplicate_case"]
    assert "good (training) and leak (test)" in detail["leak", "duplicate_case"]
    assert detail["missing", "missing_file"] == "image file imagesTr/missing.nii.gz does not exist"
    assert "nibabel reader failed" in detail["corrupt", "unreadable"]
    assert detail["spacing", "spacing_mismatch"].startswith(
        "image spacing (1, 1) mm != label spacing (1, 2) mm")
    assert "5." in detail["origin", "affine_mismatch"] and " != label affine " in detail[
        "origin", "affine_mismatch"]
    assert detail["<dataset>", "datalist"].startswith('training[11]: entry has no "image" key')


def test_format_lists_header_problems_and_fixes(broken_site: Path) -> None:
    text = check_site(broken_site).format()

    lines = text.splitlines()
    assert lines[0] == (f"integrity check of {broken_site}: 12 problem(s); 11 of 12 case(s) "
                        "affected, 1 datalist problem(s)")
    assert "  - shape [shape_mismatch]: image shape (16, 16) != label shape (14, 16)" in lines
    assert "fix:" in lines
    assert any(line.startswith("  - label_values: remap the mask values") for line in lines)
    assert lines[-1].startswith("then run the check again")


def test_each_image_is_read_once(broken_site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    real = integrity.read_image

    def counting(path):
        calls.append(Path(path))
        return real(path)

    monkeypatch.setattr(integrity, "read_image", counting)

    check_site(broken_site)

    images = [c for c in calls if c.parent.name.startswith("images")]
    # 12 cases: one lists an already-read file, one a missing file -> 10 reads
    assert len(images) == len(set(images)) == 10


def test_clean_site_is_ok(tmp_path: Path, write_dataset_json, make_case) -> None:
    root = tmp_path / "clean"
    entries = [make_case(root, f"c{i}", seed=i, **{"class": 1}) for i in range(3)]
    write_dataset_json(root, {"labels": LABELS, "training": entries})

    report = check_site(root)

    assert report.ok and report.problems == () and report.n_cases == 3
    assert report.format() == f"integrity check of {root}: 3 cases, OK"


def test_missing_dataset_json_is_a_problem_not_an_exception(tmp_path: Path) -> None:
    report = check_site(tmp_path)

    assert report.n_cases == 0
    assert [(p.case_id, p.kind) for p in report.problems] == [("<dataset>", "datalist")]
    assert "dataset.json does not exist" in report.problems[0].detail


def test_require_valid_site_raises_with_report(broken_site: Path) -> None:
    with pytest.raises(DataIntegrityError, match=r"12 problem\(s\);[\s\S]*shape_mismatch") as info:
        require_valid_site(broken_site)

    assert isinstance(info.value.report, IntegrityReport)
    assert len(info.value.report.problems) == 12


def test_require_valid_site_returns_datalist(tmp_path: Path, write_dataset_json,
                                             make_case) -> None:
    root = tmp_path / "clean"
    write_dataset_json(root, {"training": [make_case(root, "a"), make_case(root, "b", seed=1)]})

    datalist = require_valid_site(root)

    assert [c.case_id for c in datalist.cases] == ["a", "b"]


def test_non_integer_label_values_are_reported(tmp_path: Path, write_dataset_json) -> None:
    root = tmp_path / "s"
    mask = np.zeros((8, 8), np.float32)
    mask[0, 0] = 0.5
    entry = _pair(root, "half", np.random.default_rng(0).normal(size=(8, 8)), mask)
    write_dataset_json(root, {"labels": LABELS, "training": [entry]})

    report = check_site(root)

    assert [p.kind for p in report.problems] == ["label_values"]
    assert "label values [0.5]" in report.problems[0].detail
