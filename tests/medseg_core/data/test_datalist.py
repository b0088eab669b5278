"""dataset.json parsing: good files, and every malformed form with its message."""

from __future__ import annotations

from pathlib import Path

import pytest

from medseg_core.data.datalist import Case, case_id_from_path, load_datalist
from medseg_core.errors import DataIntegrityError

GOOD = {
    "name": "hospital-a",
    "labels": {"0": "background", "1": "lesion"},
    "training": [
        {"image": "imagesTr/case_003.nii.gz", "label": "labelsTr/case_003.nii.gz",
         "class": 1, "bag": "b3"},
        {"image": "./imagesTr/case_004.nii.gz", "class": 0},
    ],
    "test": ["imagesTs/case_101.nii.gz", {"image": "imagesTs/case_102.nrrd", "label": "x.nrrd"}],
}


def test_load_datalist_parses_entries_and_strings(tmp_path: Path, write_dataset_json) -> None:
    # Arrange
    write_dataset_json(tmp_path, GOOD)

    # Act
    dl = load_datalist(tmp_path)

    # Assert
    assert dl.name == "hospital-a"
    assert dl.labels == {0: "background", 1: "lesion"}
    assert dl.root == tmp_path.resolve()
    assert [c.case_id for c in dl.cases] == ["case_003", "case_004", "case_101", "case_102"]
    first = dl.cases[0]
    assert first == Case(
        case_id="case_003",
        image=tmp_path / "imagesTr/case_003.nii.gz",
        label=tmp_path / "labelsTr/case_003.nii.gz",
        cls=1,
        bag="b3",
        split="training",
    )
    assert dl.cases[1].image == tmp_path / "imagesTr/case_004.nii.gz"  # "./" normalised
    assert dl.cases[1].label is None and dl.cases[1].bag is None and dl.cases[1].cls == 0
    assert dl.cases[2].label is None and dl.cases[2].cls is None
    assert [c.case_id for c in dl.split("test")] == ["case_101", "case_102"]
    assert all(c.split == "training" for c in dl.split("training"))


def test_load_datalist_defaults_labels_and_name(tmp_path: Path, write_dataset_json) -> None:
    write_dataset_json(tmp_path / "site-b", {"training": [{"image": "a.png"}]})

    dl = load_datalist(tmp_path / "site-b")

    assert dl.labels == {0: "background", 1: "foreground"}
    assert dl.name == "site-b"
    assert dl.split("test") == ()


def test_repeated_stems_get_unique_case_ids(tmp_path: Path, write_dataset_json) -> None:
    write_dataset_json(tmp_path, {
        "training": [{"image": "imagesTr/a.nii.gz"}, {"image": "other/a.nii"}],
        "test": [{"image": "imagesTs/a.nii.gz"}],
    })

    ids = [c.case_id for c in load_datalist(tmp_path).cases]

    assert ids == ["a", "a__2", "a__3"]


@pytest.mark.parametrize(
    ("path", "expected"),
    [("imagesTr/case_003.nii.gz", "case_003"), ("x/y.NRRD", "y"), ("p.jpeg", "p"),
     ("series/patient7", "patient7"), ("scan.v2.dcm", "scan.v2")],
)
def test_case_id_from_path(path: str, expected: str) -> None:
    assert case_id_from_path(path) == expected


def test_missing_dataset_json_names_file_and_fix(tmp_path: Path) -> None:
    with pytest.raises(DataIntegrityError, match=r"dataset\.json does not exist.*Decathlon"):
        load_datalist(tmp_path)


def test_malformed_json(tmp_path: Path, write_dataset_json) -> None:
    write_dataset_json(tmp_path, '{"training": [,]}')

    with pytest.raises(DataIntegrityError, match=r"is not valid JSON .*fix the syntax"):
        load_datalist(tmp_path)


def test_json_not_an_object(tmp_path: Path, write_dataset_json) -> None:
    write_dataset_json(tmp_path, [{"image": "a.nii"}])

    with pytest.raises(DataIntegrityError, match=r"must hold a JSON object.*got a JSON list"):
        load_datalist(tmp_path)


def test_missing_training(tmp_path: Path, write_dataset_json) -> None:
    write_dataset_json(tmp_path, {"name": "x", "test": []})

    with pytest.raises(DataIntegrityError, match=r'no "training" list \(top-level keys: \[.name.'):
        load_datalist(tmp_path)


@pytest.mark.parametrize("bad", ["1", 1.0, True, -1])
def test_class_must_be_int(tmp_path: Path, write_dataset_json, bad: object) -> None:
    write_dataset_json(tmp_path, {"training": [{"image": "a.nii.gz", "class": bad}]})

    with pytest.raises(DataIntegrityError, match=r'training\[0\]: "class" must be a non-negative '
                       r"integer .*got " + repr(bad).replace(".", r"\.")):
        load_datalist(tmp_path)


def test_every_entry_problem_is_listed_at_once(tmp_path: Path, write_dataset_json) -> None:
    write_dataset_json(tmp_path, {
        "labels": {"zero": "background"},
        "training": [
            {"label": "l.nii.gz"},
            {"image": "b.nii.gz", "bag": 3},
            42,
            {"image": ""},
        ],
        "test": {"image": "t.nii.gz"},
    })

    with pytest.raises(DataIntegrityError) as info:
        load_datalist(tmp_path)

    message = str(info.value)
    assert "6 problem(s)" in message
    assert 'training[0]: entry has no "image" key' in message
    assert 'training[1]: "bag" must be a non-empty string bag id, got 3 (int)' in message
    assert "training[2]: entry must be an object" in message
    assert 'training[3]: "image" must be a non-empty path string' in message
    assert '"labels" key \'zero\' is not an integer' in message
    assert '"test" must be a list of entries, got dict' in message
    assert info.value.report is None


def test_split_rejects_unknown_name(tmp_path: Path, write_dataset_json) -> None:
    write_dataset_json(tmp_path, {"training": []})

    with pytest.raises(ValueError, match=r"unknown split 'val'; expected one of"):
        load_datalist(tmp_path).split("val")  # type: ignore[arg-type]
