"""Site data: datalists, image I/O, integrity checks, 2D slices, generated sites.

Pipeline of one site::

    require_valid_site(dir)          # dataset.json + every image checked, or a full report
      -> Datalist.split("training")  # Case records (paths, optional mask/class/bag)
      -> load_slices(cases, ...)     # SliceSet: (N, C, S, S) tensors by case
      -> split_cases(...)            # train / val by case, then SliceSet.subset

:mod:`~medseg_core.data.synthetic` and :mod:`~medseg_core.data.anatomy` write
sites in the same ``dataset.json`` form (the latter needs the ``anatomy``
extra, nilearn, which it imports only when called).
"""

from __future__ import annotations

from medseg_core.data.anatomy import ANATOMY_SOURCES, generate_anatomy_sites
from medseg_core.data.datalist import Case, Datalist, load_datalist
from medseg_core.data.integrity import (
    IntegrityReport,
    Problem,
    check_site,
    require_valid_site,
)
from medseg_core.data.io import SUPPORTED_EXTENSIONS, ImageMeta, read_image, write_nifti
from medseg_core.data.slices import SliceSet, load_slices, split_cases
from medseg_core.data.synthetic import generate_site, generate_sites

__all__ = [
    "ANATOMY_SOURCES",
    "SUPPORTED_EXTENSIONS",
    "Case",
    "Datalist",
    "ImageMeta",
    "IntegrityReport",
    "Problem",
    "SliceSet",
    "check_site",
    "generate_anatomy_sites",
    "generate_site",
    "generate_sites",
    "load_datalist",
    "load_slices",
    "read_image",
    "require_valid_site",
    "split_cases",
    "write_nifti",
]

