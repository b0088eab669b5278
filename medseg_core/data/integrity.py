"""Site integrity check before training, in the spirit of nnU-Net's
``verify_dataset_integrity``: read every case once and report *every* problem,
each with both offending values, instead of failing on the first.

Checks, per case: the files exist and can be read; the image is finite and
not constant; image and mask agree in shape, spacing (relative tolerance
1e-3) and affine (origin / direction); mask values are declared in
``dataset.json`` ``"labels"``. Across cases: no image file is listed twice
and no two images have identical pixel content (a train/test leak, or a
copy-paste error).

WARNING: the report names cases and paths; it is for the site's own operator.
Log only counts (this module logs nothing else) and never send a report to
the server.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg_core.data.datalist import (
    DATASET_FILE,
    Case,
    Datalist,
    _parse_datalist,
)
from medseg_core.data.io import ImageMeta, read_image
from medseg_core.errors import DataIntegrityError

__all__ = [
    "PROBLEM_KINDS",
    "IntegrityReport",
    "Problem",
    "check_site",
    "require_valid_site",
]

logger = logging.getLogger(__name__)

DATASET_SCOPE = "<dataset>"
SPACING_RTOL = 1e-3

#: Problem kinds and the fix suggested for each in :meth:`IntegrityReport.format`.
PROBLEM_KINDS: dict[str, str] = {
    "datalist": f"correct {DATASET_FILE} as described on each line",
    "missing_file": f"restore the file or fix its path in {DATASET_FILE}",
    "unreadable": "re-export the file (NIfTI is safest) or remove the case",
    "nan_or_inf": "re-export the image without NaN/Inf voxels (or remove the case)",
    "empty_image": "remove the case or replace the blank export",
    "shape_mismatch": "resample the mask onto the image grid",
    "spacing_mismatch": "resample the mask onto the image grid (same spacing)",
    "affine_mismatch": "copy the image's geometry (origin/direction) into the mask header",
    "label_values": f"remap the mask values or declare them in {DATASET_FILE} \"labels\"",
    "duplicate_case": "keep one copy of each image (a train/test duplicate leaks the test set)",
}


@dataclass(frozen=True)
class Problem:
    """One problem found in a site.

    Attributes
    ----------
    case_id
        The case, or ``"<dataset>"`` for dataset-level problems (including a
        malformed entry, which has no case id: its detail starts with its
        position, e.g. ``training[3]: ...``).
    kind
        One of :data:`PROBLEM_KINDS`.
    detail
        What is wrong, naming both values where there are two.
    """

    case_id: str
    kind: str
    detail: str


@dataclass(frozen=True)
class IntegrityReport:
    """Every problem found in one site.

    Attributes
    ----------
    site_dir
        The checked directory.
    n_cases
        Cases listed (well-formed entries) in ``dataset.json``.
    problems
        In the order found: datalist problems, then per case in file order.
    """

    site_dir: Path
    n_cases: int
    problems: tuple[Problem, ...]

    @property
    def ok(self) -> bool:
        """``True`` when no problem was found."""
        return not self.problems

    def kinds(self) -> set[str]:
        """The problem kinds present."""
        return {p.kind for p in self.problems}

    def format(self) -> str:
        """Human-readable report: a header, one line per problem, the fixes."""
        if self.ok:
            return f"integrity check of {self.site_dir}: {self.n_cases} cases, OK"
        bad_cases = {p.case_id for p in self.problems if p.kind != "datalist"}
        n_datalist = sum(p.kind == "datalist" for p in self.problems)
        header = (
            f"integrity check of {self.site_dir}: {len(self.problems)} problem(s); "
            f"{len(bad_cases)} of {self.n_cases} case(s) affected, "
            f"{n_datalist} datalist problem(s)"
        )
        lines = [header]
        lines += [f"  - {p.case_id} [{p.kind}]: {p.detail}" for p in self.problems]
        lines.append("fix:")
        present = self.kinds()
        lines += [f"  - {kind}: {fix}" for kind, fix in PROBLEM_KINDS.items() if kind in present]
        lines.append(
            "then run the check again (`medseg check-data SITE_DIR`); the site "
            "cannot train until it passes."
        )
        return "\n".join(lines)


def _fmt(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def _fmt_affine(affine: np.ndarray) -> str:
    return np.array2string(affine[:3], precision=3, suppress_small=True, separator=", ").replace(
        "\n", ""
    )


def _rel(path: Path, root: Path) -> str:
    """``path`` relative to the site (shorter reports), else as is."""
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _try_read(path: Path, root: Path, case_id: str, what: str,
              problems: list[Problem]) -> tuple[np.ndarray, ImageMeta] | None:
    if not path.exists():
        problems.append(
            Problem(case_id, "missing_file", f"{what} file {_rel(path, root)} does not exist")
        )
        return None
    try:
        return read_image(path)
    except DataIntegrityError as exc:
        detail = str(exc).replace(str(root) + os.sep, "")
        problems.append(Problem(case_id, "unreadable", f"{what}: {detail}"))
        return None


def _check_image(case_id: str, image: np.ndarray, problems: list[Problem]) -> bool:
    """Finite and not constant; returns whether the image is usable for hashing."""
    finite = np.isfinite(image)
    if not finite.all():
        n_nan = int(np.isnan(image).sum())
        n_inf = int(image.size - finite.sum()) - n_nan
        problems.append(
            Problem(
                case_id,
                "nan_or_inf",
                f"image has {n_nan} NaN and {n_inf} Inf voxel(s) of {image.size}; "
                "expected all finite",
            )
        )
        return False
    lo, hi = float(image.min()), float(image.max())
    if lo == hi:
        problems.append(
            Problem(
                case_id,
                "empty_image",
                f"image is constant (all {image.size} voxels = {lo:g}); expected varying "
                "intensities",
            )
        )
        return False
    return True


def _check_pair(case: Case, image: tuple[np.ndarray, ImageMeta],
                label: tuple[np.ndarray, ImageMeta], labels: dict[int, str],
                problems: list[Problem]) -> None:
    _, imeta = image
    lab, lmeta = label
    cid = case.case_id
    if imeta.shape != lmeta.shape:
        problems.append(
            Problem(cid, "shape_mismatch",
                    f"image shape {imeta.shape} != label shape {lmeta.shape}")
        )
    elif not np.allclose(imeta.spacing, lmeta.spacing, rtol=SPACING_RTOL, atol=0.0):
        problems.append(
            Problem(cid, "spacing_mismatch",
                    f"image spacing {_fmt(imeta.spacing)} mm != label spacing "
                    f"{_fmt(lmeta.spacing)} mm (relative tolerance {SPACING_RTOL:g})")
        )
    else:
        # Spacing agrees: compare the rest of the geometry (origin, direction).
        scale = max(max(imeta.spacing), 1e-6)
        if not np.allclose(imeta.affine, lmeta.affine, rtol=SPACING_RTOL,
                           atol=SPACING_RTOL * scale):
            problems.append(
                Problem(cid, "affine_mismatch",
                        f"image affine {_fmt_affine(imeta.affine)} != label affine "
                        f"{_fmt_affine(lmeta.affine)}")
            )
    finite = np.isfinite(lab)
    values = np.unique(lab[finite])
    bad = [float(v) for v in values if v != np.round(v) or int(v) not in labels]
    n_nonfinite = int(lab.size - finite.sum())
    if bad or n_nonfinite:
        shown = ", ".join(f"{v:g}" for v in bad[:10]) + (" ..." if len(bad) > 10 else "")
        extra = f" and {n_nonfinite} NaN/Inf voxel(s)" if n_nonfinite else ""
        problems.append(
            Problem(cid, "label_values",
                    f"label values [{shown}]{extra} not in declared labels "
                    f"{sorted(labels)} ({labels})")
        )


def _check(site_dir: str | Path) -> tuple[IntegrityReport, Datalist | None]:
    datalist, entry_problems, json_path = _parse_datalist(site_dir)
    site = json_path.parent
    problems = [
        Problem(DATASET_SCOPE, "datalist",
                p.detail if p.where.startswith(("<", '"')) else f"{p.where}: {p.detail}")
        for p in entry_problems
    ]
    if datalist is None:
        return IntegrityReport(site, 0, tuple(problems)), None

    first_by_path: dict[Path, Case] = {}
    first_by_hash: dict[str, Case] = {}
    for case in datalist.cases:
        cid = case.case_id
        if case.image in first_by_path:
            other = first_by_path[case.image]
            problems.append(
                Problem(cid, "duplicate_case",
                        f"{other.case_id} ({other.split}) and {cid} ({case.split}) list the "
                        f"same image file {_rel(case.image, datalist.root)}")
            )
            continue  # same file: its problems are already reported once
        first_by_path[case.image] = case
        image = _try_read(case.image, datalist.root, cid, "image", problems)
        label = (
            _try_read(case.label, datalist.root, cid, "label", problems) if case.label else None
        )
        if image is not None and _check_image(cid, image[0], problems):
            digest = hashlib.sha256(
                repr(image[0].shape).encode() + image[0].tobytes()
            ).hexdigest()
            if digest in first_by_hash:
                other = first_by_hash[digest]
                problems.append(
                    Problem(cid, "duplicate_case",
                            f"{other.case_id} ({other.split}) and {cid} ({case.split}) have "
                            f"identical pixel content (sha256 {digest[:12]})")
                )
            else:
                first_by_hash[digest] = case
        if image is not None and label is not None:
            _check_pair(case, image, label, datalist.labels, problems)
    report = IntegrityReport(site, len(datalist.cases), tuple(problems))
    logger.info(
        "integrity check: %d cases, %d problem(s)", report.n_cases, len(report.problems)
    )
    return report, datalist


def check_site(site_dir: str | Path) -> IntegrityReport:
    """Check a site directory and collect every problem.

    Each image and mask is read once. Never raises for data problems: a
    missing or malformed ``dataset.json`` becomes a ``"datalist"`` problem.

    Parameters
    ----------
    site_dir
        Directory holding ``dataset.json``.

    Returns
    -------
    IntegrityReport
        ``report.ok`` is ``True`` when the site is clean; ``report.format()``
        is the human-readable report.
    """
    return _check(site_dir)[0]


def require_valid_site(site_dir: str | Path) -> Datalist:
    """Check a site and return its datalist, or raise with the full report.

    Raises
    ------
    DataIntegrityError
        Any problem was found; the message is ``report.format()`` and
        ``error.report`` is the :class:`IntegrityReport`.
    """
    report, datalist = _check(site_dir)
    if not report.ok or datalist is None:
        raise DataIntegrityError(report.format(), report)
    return datalist
