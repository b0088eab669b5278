"""A site's cases as parsed from its ``dataset.json``: :class:`Case` (one
image, its optional mask and weak labels) and :class:`Datalist` (the file).

Parsing and validation are :mod:`medseg_core.data.datalist`'s job, which
also re-exports both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = ["SPLITS", "Case", "Datalist", "Split"]

SPLITS: tuple[str, ...] = ("training", "test")

Split = Literal["training", "test"]


@dataclass(frozen=True)
class Case:
    """One image (and optionally its mask and weak labels) of a site.

    Attributes
    ----------
    case_id
        Stable id derived from the image path stem (``imagesTr/case_003.nii.gz``
        -> ``"case_003"``); unique within a site (a repeated stem gets a
        ``__2``, ``__3``... suffix in file order).
    image
        Absolute path of the image file (or DICOM series folder).
    label
        Absolute path of the voxel mask, or ``None``.
    cls
        The entry's ``"class"``: integer image-level label (>= 0), or ``None``.
    bag
        The entry's ``"bag"``: bag id for multiple-instance learning, or ``None``.
    unlabeled
        The entry says ``"class": null``: deliberately unlabeled (used by
        FixMatch), as opposed to a class that was forgotten.
    split
        ``"training"`` or ``"test"``.
    """

    case_id: str
    image: Path
    label: Path | None
    cls: int | None
    bag: str | None
    split: Split
    unlabeled: bool = False


@dataclass(frozen=True)
class Datalist:
    """A parsed ``dataset.json``.

    Attributes
    ----------
    root
        Absolute site directory; relative paths are resolved against it.
    name
        ``"name"`` from the file, or the directory name when absent.
    labels
        Declared mask values -> names, from ``"labels"``; defaults to
        ``{0: "background", 1: "foreground"}``.
    cases
        Training cases first, then test cases, each in file order.
    """

    root: Path
    name: str
    labels: dict[int, str]
    cases: tuple[Case, ...]

    def split(self, which: Split) -> tuple[Case, ...]:
        """Cases of one split, in file order.

        Raises
        ------
        ValueError
            ``which`` is not ``"training"`` or ``"test"``.
        """
        if which not in SPLITS:
            raise ValueError(
                f"unknown split {which!r}; expected one of {list(SPLITS)}"
            )
        return tuple(c for c in self.cases if c.split == which)
