"""Reading and writing images through MONAI's readers.

Every format a site may hold is read by :func:`read_image` into one shape and
dtype convention: a channel-less ``float32`` array plus :class:`ImageMeta`
(spacing in mm, a 4x4 affine, the spatial shape).

=====================  ====================  ===========================
extension              MONAI reader          array axes
=====================  ====================  ===========================
``.nii``, ``.nii.gz``  ``NibabelReader``     as stored (voxel i, j, k)
``.nrrd``, ``.nhdr``   ``NrrdReader``        as stored
``.png``, ``.jpg``     ``PILReader``         (rows, columns), as numpy/PIL
``.dcm`` or a folder   ``PydicomReader``     (columns, rows[, slices]), as ITK
=====================  ====================  ===========================

A folder is read as one DICOM series (slices sorted by position).
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg_core.errors import DataIntegrityError

__all__ = ["SUPPORTED_EXTENSIONS", "ImageMeta", "read_image", "write_nifti"]

logger = logging.getLogger(__name__)

_READER_BY_SUFFIX: dict[str, str] = {
    ".nii.gz": "nibabel",
    ".nii": "nibabel",
    ".nrrd": "nrrd",
    ".nhdr": "nrrd",
    ".png": "pil",
    ".jpg": "pil",
    ".jpeg": "pil",
    ".dcm": "pydicom",
}
#: File endings :func:`read_image` accepts (plus a folder holding a DICOM series).
SUPPORTED_EXTENSIONS: tuple[str, ...] = tuple(_READER_BY_SUFFIX)

# ITU-R 601-2 luma, the weights PIL uses for mode "L".
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)


@dataclass(frozen=True)
class ImageMeta:
    """Geometry of an image.

    Attributes
    ----------
    spacing
        Voxel size per spatial axis in mm (column norms of the affine).
    affine
        ``(4, 4)`` float64 voxel-to-world matrix (MONAI's convention, RAS);
        identity-based for formats without geometry (PNG/JPG).
    shape
        Spatial shape, equal to the returned array's shape.
    """

    spacing: tuple[float, ...]
    affine: np.ndarray
    shape: tuple[int, ...]


def _reader_kind(path: Path) -> str | None:
    if path.is_dir():
        return "pydicom"
    lower = path.name.lower()
    for suffix, kind in _READER_BY_SUFFIX.items():
        if lower.endswith(suffix):
            return kind
    return None


@functools.cache
def _loader() -> Any:
    """One MONAI ``LoadImage`` (building it instantiates every reader: do it once)."""
    from monai.transforms.io.array import LoadImage

    with warnings.catch_warnings():
        # LoadImage instantiates every MONAI reader, including the GPU DICOM
        # decoder we never use (we always pass the reader); its "did not
        # register" warning is noise on CPU machines. Local, single-message filter.
        warnings.filterwarnings("ignore", message=r"NvImgCodecPydicomReader.*")
        return LoadImage(image_only=False, dtype=np.float32)


@functools.cache
def _reader(kind: str) -> Any:
    from monai.data.image_reader import (
        NibabelReader,
        NrrdReader,
        PILReader,
        PydicomReader,
    )

    if kind == "nibabel":
        return NibabelReader()
    if kind == "nrrd":
        return NrrdReader()
    if kind == "pil":
        # numpy convention (rows, columns), the array PIL itself gives.
        return PILReader(reverse_indexing=False)
    return PydicomReader()


def _fail(path: Path, reason: str, fix: str) -> DataIntegrityError:
    return DataIntegrityError(f"cannot read image {path}: {reason}; {fix}")


def _to_single_channel(array: np.ndarray, channel_dim: Any, path: Path) -> np.ndarray:
    """Drop the channel axis: squeeze a singleton, RGB(A) -> grey for 2D images."""
    try:
        cdim = int(channel_dim)
    except (TypeError, ValueError):  # NaN / "no_channel": nothing to drop
        return array
    array = np.moveaxis(array, cdim, -1)
    n_channels = array.shape[-1]
    if n_channels == 1:
        return array[..., 0]
    if array.ndim == 3 and n_channels in (3, 4):
        grey = np.tensordot(array[..., :3].astype(np.float64), _LUMA, axes=([-1], [0]))
        return grey.astype(np.float32)
    raise _fail(
        path,
        f"it has {n_channels} channels (shape {tuple(array.shape)})",
        "expected one channel (or RGB for a 2D picture); split multi-channel "
        "volumes into one file per channel",
    )


def read_image(path: str | Path) -> tuple[np.ndarray, ImageMeta]:
    """Read one image (or DICOM series folder) with MONAI's ``LoadImage``.

    Parameters
    ----------
    path
        A ``.nii``/``.nii.gz``, ``.nrrd``/``.nhdr``, ``.png``/``.jpg``/``.jpeg``
        or ``.dcm`` file, or a folder holding one DICOM series.

    Returns
    -------
    array : np.ndarray
        ``float32``, channel-less: ``(H, W)`` for 2D or ``(H, W, D)`` for 3D.
        RGB(A) pictures are converted to grey (ITU-R 601-2 luma); DICOM
        values have the rescale slope/intercept applied.
    meta : ImageMeta
        Spacing (mm), 4x4 affine and spatial shape.

    Raises
    ------
    DataIntegrityError
        The file does not exist, has an unsupported extension, is corrupt or
        unreadable, or has several channels.
    """
    path = Path(path)
    if not path.exists():
        raise _fail(path, "the file does not exist", "check the path in dataset.json")
    kind = _reader_kind(path)
    if kind is None:
        raise _fail(
            path,
            f"unsupported extension {''.join(path.suffixes)!r}",
            f"supported: {', '.join(SUPPORTED_EXTENSIONS)} or a folder holding a "
            "DICOM series; convert the image to NIfTI",
        )
    try:
        data, meta = _loader()(str(path), reader=_reader(kind))
        array = np.asarray(data, dtype=np.float32)
        affine = np.asarray(meta.get("affine", np.eye(4)), dtype=np.float64)
        channel_dim = meta.get("original_channel_dim")
    except Exception as exc:  # noqa: BLE001 - any reader failure means "unreadable"
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        raise _fail(
            path,
            f"{kind} reader failed ({reason})",
            "the file is corrupt or not in the format its extension says; "
            "re-export it or remove the case from dataset.json",
        ) from None
    array = np.ascontiguousarray(_to_single_channel(array, channel_dim, path))
    if array.ndim not in (2, 3):
        raise _fail(
            path,
            f"it has {array.ndim} spatial dimensions (shape {array.shape})",
            "expected a 2D image or a 3D volume",
        )
    if affine.shape != (4, 4):
        full = np.eye(4)
        n = min(affine.shape[0], 4) - 1
        full[:n, :n] = affine[:n, :n]
        full[:n, 3] = affine[:n, -1]
        affine = full
    spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, : array.ndim], axis=0))
    return array, ImageMeta(spacing=spacing, affine=affine, shape=tuple(array.shape))


def write_nifti(
    array: np.ndarray, path: Path, spacing: Sequence[float] | None = None
) -> None:
    """Write a 2D or 3D array as NIfTI with a diagonal affine (nibabel).

    Parameters
    ----------
    array
        ``(H, W)`` or ``(H, W, D)``. ``bool`` is stored as ``uint8``,
        ``float64`` as ``float32``; other dtypes as given.
    path
        Target file (``.nii`` or ``.nii.gz``); parent folders are created.
    spacing
        Voxel size per axis in mm (default 1.0 each).

    Raises
    ------
    ValueError
        The array is not 2D/3D, or ``spacing`` has the wrong length or a
        non-positive entry.
    """
    import nibabel as nib

    array = np.asarray(array)
    if array.ndim not in (2, 3):
        raise ValueError(
            f"write_nifti takes a 2D or 3D array, got shape {array.shape}; "
            "squeeze channel axes first"
        )
    spacing_t = tuple(float(s) for s in (spacing if spacing is not None else (1.0,) * array.ndim))
    if len(spacing_t) != array.ndim or not all(np.isfinite(s) and s > 0 for s in spacing_t):
        raise ValueError(
            f"spacing {spacing_t} must hold {array.ndim} positive finite values "
            f"(one per axis of shape {array.shape})"
        )
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    elif array.dtype == np.float64:
        array = array.astype(np.float32)
    affine = np.diag([*spacing_t, *(1.0,) * (3 - array.ndim), 1.0])
    image = nib.Nifti1Image(array, affine)
    image.header.set_zooms(spacing_t)
    image.header.set_xyzt_units("mm")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
