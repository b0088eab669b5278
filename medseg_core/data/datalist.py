"""Site datalists: ``dataset.json`` in the Medical Segmentation Decathlon form.

A site is a directory holding a ``dataset.json`` such as::

    {
      "name": "hospital-a",
      "labels": {"0": "background", "1": "lesion"},
      "training": [
        {"image": "imagesTr/case_003.nii.gz", "label": "labelsTr/case_003.nii.gz",
         "class": 1, "bag": "b3"}
      ],
      "test": ["imagesTs/case_101.nii.gz"]
    }

Paths are relative to the directory. Per case ``label`` (mask path),
``class`` (integer image-level label) and ``bag`` (bag id for multiple-instance
learning) are optional. Entries may be objects or, as in the original MSD
test lists, plain strings (image only). Other keys are ignored, so MSD extras
(``modality``, ``numTraining``...) and generator fingerprints may stay.

This module only parses and validates the *file*; whether the referenced
images exist and agree with their masks is :mod:`medseg_core.data.integrity`'s
job.
The parsed records, :class:`~medseg_core.data.cases.Case` and
:class:`~medseg_core.data.cases.Datalist`, live in :mod:`medseg_core.data.cases`
(re-exported here).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medseg_core.data.cases import SPLITS, Case, Datalist, Split
from medseg_core.errors import DataIntegrityError

__all__ = [
    "DATASET_FILE",
    "DEFAULT_LABELS",
    "IMAGE_SUFFIXES",
    "Case",
    "Datalist",
    "Split",
    "case_id_from_path",
    "load_datalist",
]

logger = logging.getLogger(__name__)

DATASET_FILE = "dataset.json"
DEFAULT_LABELS: dict[int, str] = {0: "background", 1: "foreground"}
#: File-name endings stripped to form a case id (longest first).
IMAGE_SUFFIXES: tuple[str, ...] = (
    ".nii.gz",
    ".nii",
    ".nrrd",
    ".nhdr",
    ".png",
    ".jpeg",
    ".jpg",
    ".dcm",
)
def case_id_from_path(path: str | Path) -> str:
    """Case id of an image path: its file name without an image suffix.

    ``imagesTr/case_003.nii.gz`` -> ``"case_003"``; a DICOM series folder
    ``imagesTr/patient7/`` -> ``"patient7"``.
    """
    name = Path(path).name
    lower = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


# --------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _EntryProblem:
    """A problem in one part of ``dataset.json`` (``where`` names the entry)."""

    where: str
    detail: str


def _read_json(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """Read ``path`` as a JSON object; return ``(data, None)`` or ``(None, why)``."""
    if not path.is_file():
        return None, (
            f"{path} does not exist; every site directory needs a {DATASET_FILE} "
            "in the Medical Segmentation Decathlon form "
            '({"labels": {...}, "training": [{"image": ..., "label": ...}], "test": [...]})'
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return None, f"{path} is not valid JSON ({exc}); fix the syntax and run again"
    except OSError as exc:
        return None, f"cannot read {path} ({exc}); check the file's permissions"
    if not isinstance(data, dict):
        return None, (
            f"{path} must hold a JSON object with a \"training\" list, "
            f"got a JSON {type(data).__name__}; wrap the content in an object"
        )
    return data, None


def _parse_labels(raw: Any, problems: list[_EntryProblem]) -> dict[int, str]:
    if raw is None:
        return dict(DEFAULT_LABELS)
    if not isinstance(raw, dict) or not raw:
        problems.append(
            _EntryProblem(
                '"labels"',
                f'"labels" must be a non-empty object mapping integer values to names, '
                f'got {raw!r}; e.g. {{"0": "background", "1": "lesion"}}',
            )
        )
        return dict(DEFAULT_LABELS)
    labels: dict[int, str] = {}
    for key, value in raw.items():
        try:
            ivalue = int(key)
        except (TypeError, ValueError):
            problems.append(
                _EntryProblem(
                    '"labels"',
                    f'"labels" key {key!r} is not an integer mask value; '
                    'use keys such as "0", "1"',
                )
            )
            continue
        if ivalue < 0 or not isinstance(value, str):
            problems.append(
                _EntryProblem(
                    '"labels"',
                    f'"labels" entry {key!r}: {value!r} must map a non-negative integer '
                    "to a name (string)",
                )
            )
            continue
        labels[ivalue] = value
    return labels or dict(DEFAULT_LABELS)


def _optional_path(entry: dict[str, Any], key: str, where: str,
                   problems: list[_EntryProblem]) -> str | None:
    value = entry.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        problems.append(
            _EntryProblem(
                where,
                f'"{key}" must be a non-empty path string relative to the site '
                f"directory, got {value!r}",
            )
        )
        return None
    return value


def _parse_entry(
    entry: Any, split: str, index: int, problems: list[_EntryProblem]
) -> dict[str, Any] | None:
    """Validate one entry; return its fields or ``None`` (problems recorded)."""
    where = f"{split}[{index}]"
    if isinstance(entry, str):
        entry = {"image": entry}
    if not isinstance(entry, dict):
        problems.append(
            _EntryProblem(
                where,
                f"entry must be an object with an \"image\" path (or a plain path "
                f"string), got {type(entry).__name__} {entry!r}",
            )
        )
        return None
    n_before = len(problems)
    if "image" not in entry:
        problems.append(
            _EntryProblem(
                where,
                f'entry has no "image" key (keys: {sorted(entry)}); add the image '
                'path, e.g. "image": "imagesTr/case_000.nii.gz"',
            )
        )
    image = _optional_path(entry, "image", where, problems)
    label = _optional_path(entry, "label", where, problems)
    cls = entry.get("class")
    if cls is not None and (isinstance(cls, bool) or not isinstance(cls, int) or cls < 0):
        problems.append(
            _EntryProblem(
                where,
                f'"class" must be a non-negative integer image-level label, got '
                f"{cls!r} ({type(cls).__name__}); write e.g. \"class\": 1 (no quotes)",
            )
        )
    bag = entry.get("bag")
    if bag is not None and (not isinstance(bag, str) or not bag):
        problems.append(
            _EntryProblem(
                where,
                f'"bag" must be a non-empty string bag id, got {bag!r} '
                f'({type(bag).__name__}); write e.g. "bag": "{bag}"',
            )
        )
    if len(problems) > n_before or image is None:
        return None
    return {"image": image, "label": label, "class": cls, "bag": bag,
            "unlabeled": "class" in entry and cls is None and label is None}


def _resolve(root: Path, rel: str) -> Path:
    # normpath, not resolve(): keep symlinked data folders as the user named them.
    return Path(os.path.normpath(root / rel))


def _parse_datalist(
    site_dir: str | Path,
) -> tuple[Datalist | None, list[_EntryProblem], Path]:
    """Parse ``site_dir/dataset.json``, collecting every problem.

    Returns the datalist of the valid entries (``None`` when the file itself
    is unusable), the problems found, and the path of the file.
    """
    root = Path(os.path.abspath(Path(site_dir).expanduser()))
    json_path = root / DATASET_FILE
    data, why = _read_json(json_path)
    if data is None:
        return None, [_EntryProblem("<file>", why or "unreadable")], json_path

    problems: list[_EntryProblem] = []
    name = data.get("name", root.name)
    if not isinstance(name, str):
        problems.append(_EntryProblem('"name"', f'"name" must be a string, got {name!r}'))
        name = root.name
    labels = _parse_labels(data.get("labels"), problems)

    if "training" not in data:
        problems.append(
            _EntryProblem(
                '"training"',
                f'no "training" list (top-level keys: {sorted(data)}); add '
                '"training": [{"image": ..., "label": ...}, ...]',
            )
        )
    raw_splits: dict[str, list[Any]] = {}
    for split in SPLITS:
        raw = data.get(split, [])
        if not isinstance(raw, list):
            problems.append(
                _EntryProblem(
                    f'"{split}"',
                    f'"{split}" must be a list of entries, got {type(raw).__name__}',
                )
            )
            raw = []
        raw_splits[split] = raw

    cases: list[Case] = []
    seen_ids: dict[str, int] = {}
    for split in SPLITS:
        for index, entry in enumerate(raw_splits[split]):
            fields = _parse_entry(entry, split, index, problems)
            if fields is None:
                continue
            if labels and fields["class"] is not None and fields["class"] not in labels:
                problems.append(_EntryProblem(
                    f"{split}[{index}]",
                    f'"class" {fields["class"]} is not a declared label {sorted(labels)} '
                    f'({labels}); use one of the keys of "labels" or declare it there',
                ))
                continue
            base_id = case_id_from_path(fields["image"].rstrip("/\\"))
            count = seen_ids.get(base_id, 0) + 1
            seen_ids[base_id] = count
            case_id = base_id if count == 1 else f"{base_id}__{count}"
            cases.append(
                Case(
                    case_id=case_id,
                    image=_resolve(root, fields["image"]),
                    label=_resolve(root, fields["label"]) if fields["label"] else None,
                    cls=fields["class"],
                    bag=fields["bag"],
                    split=split,  # type: ignore[arg-type]
                    unlabeled=bool(fields["unlabeled"]),
                )
            )
    return Datalist(root=root, name=name, labels=labels, cases=tuple(cases)), problems, json_path


def _format_problems(json_path: Path, problems: list[_EntryProblem]) -> str:
    """One message listing every problem of a ``dataset.json``."""
    lines = [f"invalid datalist {json_path}: {len(problems)} problem(s)"]
    lines += [f"  - {p.where}: {p.detail}" for p in problems]
    lines.append(f"Fix {json_path} (see the MSD dataset.json form) and run again.")
    return "\n".join(lines)


def load_datalist(site_dir: str | Path) -> Datalist:
    """Read and validate ``site_dir/dataset.json``.

    Only the file is checked (structure and types); use
    :func:`medseg_core.data.integrity.check_site` to check the images.

    Parameters
    ----------
    site_dir
        Directory holding ``dataset.json``.

    Returns
    -------
    Datalist
        Cases with absolute paths; training cases first, then test cases.

    Raises
    ------
    DataIntegrityError
        ``dataset.json`` is missing, not JSON, not an object, has no
        ``"training"`` list, or has malformed entries (no ``"image"``, a
        non-integer ``"class"``, a non-string ``"bag"``...). The message lists
        every problem with the offending value and the fix; ``report`` is
        ``None``.
    """
    datalist, problems, json_path = _parse_datalist(site_dir)
    if problems or datalist is None:
        raise DataIntegrityError(_format_problems(json_path, problems))
    logger.debug(
        "datalist loaded: %d training and %d test cases",
        len(datalist.split("training")),
        len(datalist.split("test")),
    )
    return datalist
