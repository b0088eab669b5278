"""Sites from real anatomy shipped offline: the MNI152 templates in nilearn.

Task: brain-mask segmentation on 2D axial slices. One site per template
source; each site has its own scanner shift (and so its own native grid), so
the federation is feature-shifted like hospitals with different scanners:

==================  =============================================  =========
source              image                                          grid
==================  =============================================  =========
``mni152_t1_1mm``   T1 template, 1 mm (skull-stripped)              S
``mni152_t1_2mm``   T1 template resampled to 2 mm, brighter, bias   S / 1.5
``mni152_gm``       grey-matter probability map, 1 mm, blurred      S
``mni152_wm``       white-matter probability map, 1 mm, bias       S / 1.25
==================  =============================================  =========

The label is nilearn's MNI152 brain mask, sampled through the same transform
as the image. Cases are slices spread over the brain's axial extent, each
with its own small in-plane rotation / scale / shift, a slight tilt of the
slice plane and a smooth elastic displacement, so no two cases are alike.

Everything comes from files installed with nilearn (``load_mni152_*``); no
``fetch_*`` function (which downloads) is called. nilearn is an optional
dependency: ``pip install medseg-fl[anatomy]``.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from medseg_core.config import ShiftSpec
from medseg_core.data.datalist import DATASET_FILE
from medseg_core.data.io import write_nifti
from medseg_core.data.scanner import apply_shift, native_size, resize_mask
from medseg_core.data.sitedir import build_site_dir, make_fingerprint
from medseg_core.errors import ConfigError, MedsegError

__all__ = [
    "ANATOMY_SOURCES",
    "AnatomyUnavailableError",
    "generate_anatomy_site",
    "generate_anatomy_sites",
]

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
_GENERATOR_NAME = "medseg_core.data.anatomy"
FOV_MM = 192.0


@dataclass(frozen=True)
class _Source:
    loader: str  # nilearn.datasets function returning a Nifti1Image
    resolution: int  # mm
    shift: ShiftSpec
    description: str


_SOURCES: dict[str, _Source] = {
    "mni152_t1_1mm": _Source(
        "load_mni152_template", 1, ShiftSpec(noise_std=0.02), "MNI152 T1 template, 1 mm"
    ),
    "mni152_t1_2mm": _Source(
        "load_mni152_template",
        2,
        ShiftSpec(intensity_scale=1.4, intensity_offset=0.1, gamma=0.8, bias_field=0.25,
                  noise_std=0.03, downsample=1.5),
        "MNI152 T1 template, 2 mm",
    ),
    "mni152_gm": _Source(
        "load_mni152_gm_template",
        1,
        ShiftSpec(intensity_scale=0.9, gamma=1.2, blur_sigma=0.6, noise_std=0.02),
        "MNI152 grey-matter probability map, 1 mm",
    ),
    "mni152_wm": _Source(
        "load_mni152_wm_template",
        1,
        ShiftSpec(intensity_offset=-0.05, bias_field=0.3, noise_std=0.04, downsample=1.25),
        "MNI152 white-matter probability map, 1 mm",
    ),
}
#: Template sources available offline (site ids of :func:`generate_anatomy_sites`).
ANATOMY_SOURCES: tuple[str, ...] = tuple(_SOURCES)


class AnatomyUnavailableError(MedsegError, ImportError):
    """The optional ``anatomy`` extra (nilearn) is not installed."""


def _nilearn_datasets() -> Any:
    try:
        return importlib.import_module("nilearn.datasets")
    except ImportError as exc:
        raise AnatomyUnavailableError(
            f"anatomy sites need nilearn, which is not installed ({exc}); run "
            "`pip install medseg-fl[anatomy]` and try again"
        ) from None


def _load(source: _Source) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    """Image volume + affine, brain mask + affine (float32), nilearn version."""
    datasets = _nilearn_datasets()
    image = getattr(datasets, source.loader)(resolution=source.resolution)
    mask = datasets.load_mni152_brain_mask(resolution=source.resolution)
    import nilearn

    return (
        np.asarray(image.get_fdata(), dtype=np.float32),
        np.asarray(image.affine, dtype=np.float64),
        np.asarray(mask.get_fdata() > 0.5, dtype=np.float32),
        np.asarray(mask.affine, dtype=np.float64),
        str(nilearn.__version__),
    )


def _sample(volume: np.ndarray, affine: np.ndarray, world: np.ndarray) -> np.ndarray:
    """Trilinear sample of ``volume`` at world points ``(3, ...)`` (0 outside)."""
    inv = np.linalg.inv(affine)
    flat = world.reshape(3, -1)
    vox = inv[:3, :3] @ flat + inv[:3, 3:4]
    out = ndimage.map_coordinates(volume, vox, order=1, mode="constant", cval=0.0)
    return out.reshape(world.shape[1:])


def _slice_levels(mask: np.ndarray, mask_affine: np.ndarray, n: int,
                  rng: np.random.Generator) -> np.ndarray:
    """``n`` axial levels (mm) spread over slices holding >= 25 % of the largest brain area."""
    area = mask.sum(axis=(0, 1))
    ks = np.nonzero(area >= 0.25 * area.max())[0]
    z_lo = float(mask_affine[2, 2] * ks.min() + mask_affine[2, 3])
    z_hi = float(mask_affine[2, 2] * ks.max() + mask_affine[2, 3])
    strata = (np.arange(n) + rng.uniform(0.0, 1.0, size=n)) / n
    return z_lo + (z_hi - z_lo) * strata


def _case_grid(rng: np.random.Generator, size: int, centre: np.ndarray,
               z_mm: float) -> np.ndarray:
    """World coordinates ``(3, S, S)`` of a perturbed axial slice at ``z_mm``."""
    theta = np.deg2rad(rng.uniform(-10.0, 10.0))
    tilt = np.deg2rad(rng.uniform(-6.0, 6.0))
    scale = rng.uniform(0.92, 1.08)
    shift = rng.uniform(-6.0, 6.0, size=2)
    elastic = [ndimage.gaussian_filter(rng.normal(size=(size, size)), sigma=size / 8)
               for _ in range(2)]
    elastic = [3.0 * e / max(float(np.abs(e).max()), 1e-8) for e in elastic]  # <= 3 mm
    axis = ((np.arange(size) + 0.5) / size - 0.5) * FOV_MM
    p, q = np.meshgrid(axis, axis, indexing="ij")  # (x, y) offsets in mm
    p, q = scale * (p + elastic[0]), scale * (q + elastic[1])
    c, s = np.cos(theta), np.sin(theta)
    x = centre[0] + shift[0] + c * p - s * q
    y = centre[1] + shift[1] + s * p + c * q
    z = z_mm + np.sin(tilt) * (q / scale)
    return np.stack([x, y, z])


def _write_site(name: str, root: Path, seed: int, n_train: int, n_test: int,
                image_size: int, fingerprint: dict[str, Any]) -> None:
    source = _SOURCES[name]
    volume, affine, mask, mask_affine, _ = _load(source)
    vmax = float(np.percentile(volume[volume > 0], 99.5)) if (volume > 0).any() else 1.0
    volume = volume / max(vmax, 1e-6)
    rng = np.random.default_rng(np.random.SeedSequence([seed, ANATOMY_SOURCES.index(name), 7]))
    levels = _slice_levels(mask, mask_affine, n_train + n_test, rng)
    is_test = np.zeros(len(levels), dtype=bool)
    is_test[rng.permutation(len(levels))[:n_test]] = True
    centre = np.array(mask_affine[:3, :3] @ np.mean(np.nonzero(mask), axis=1)
                      + mask_affine[:3, 3])
    native = native_size(image_size, source.shift)
    spacing = (FOV_MM / native, FOV_MM / native)
    entries: dict[str, list[dict[str, Any]]] = {"training": [], "test": []}
    counters = {"training": 0, "test": 0}
    for level_no, z_mm in enumerate(levels):
        split = "test" if is_test[level_no] else "training"
        i = counters[split]
        counters[split] += 1
        prefix, sub = ("test", "Ts") if split == "test" else ("case", "Tr")
        case_rng = np.random.default_rng(
            np.random.SeedSequence([seed, ANATOMY_SOURCES.index(name), level_no])
        )
        world = _case_grid(case_rng, image_size, centre, float(z_mm))
        image_hr = _sample(volume, affine, world)
        mask_hr = (_sample(mask, mask_affine, world) >= 0.5).astype(np.uint8)
        image = apply_shift(image_hr, source.shift, case_rng, native)
        label = resize_mask(mask_hr, native)
        case = f"{prefix}_{i:03d}"
        image_rel, label_rel = f"images{sub}/{case}.nii.gz", f"labels{sub}/{case}.nii.gz"
        write_nifti(image, root / image_rel, spacing)
        write_nifti(label, root / label_rel, spacing)
        entries[split].append({"image": image_rel, "label": label_rel, "class": int(label.any())})
    dataset = {
        "name": name,
        "description": f"brain-mask segmentation on axial slices of the {source.description} "
        "(nilearn, offline), generated by medseg_core.data.anatomy",
        "tensorImageSize": "2D",
        "modality": {"0": name},
        "labels": {"0": "background", "1": "brain"},
        "numTraining": n_train,
        "numTest": n_test,
        "training": entries["training"],
        "test": entries["test"],
        "generator": fingerprint,
    }
    (root / DATASET_FILE).write_text(json.dumps(dataset, indent=1), encoding="utf-8")


def generate_anatomy_site(
    source: str,
    out_dir: str | Path,
    *,
    seed: int,
    n_train: int = 24,
    n_test: int = 8,
    image_size: int = 64,
) -> Path:
    """Write (or reuse) one anatomy site from one template source.

    Parameters
    ----------
    source
        One of :data:`ANATOMY_SOURCES`.
    out_dir
        Site directory (MSD layout, as :func:`~medseg_core.data.synthetic.generate_site`).
    seed
        Fixes the slice levels, the per-case perturbations and the noise.
    n_train, n_test
        Number of training / test slices (>= 1 each).
    image_size
        Full-resolution size ``S`` of the slices (>= 16) over a 192 mm field
        of view; stored at ``round(S / downsample)`` of the source's shift.

    Raises
    ------
    ConfigError
        Unknown ``source`` or invalid counts / size.
    AnatomyUnavailableError
        nilearn is not installed.
    DataIntegrityError
        ``out_dir`` holds other data.
    """
    if source not in _SOURCES:
        import difflib

        close = difflib.get_close_matches(source, ANATOMY_SOURCES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"unknown anatomy source {source!r}; valid: {list(ANATOMY_SOURCES)}{hint}"
        )
    if n_train < 1 or n_test < 1 or image_size < 16:
        raise ConfigError(
            f"n_train={n_train}, n_test={n_test}, image_size={image_size}; expected "
            "n_train >= 1, n_test >= 1 and image_size >= 16"
        )
    _nilearn_datasets()  # fail early and clearly when the extra is missing
    import nilearn

    fingerprint = make_fingerprint(
        {
            "name": _GENERATOR_NAME,
            "version": GENERATOR_VERSION,
            "source": source,
            "seed": seed,
            "n_train": n_train,
            "n_test": n_test,
            "image_size": image_size,
            "nilearn": str(nilearn.__version__),
        }
    )
    path, built = build_site_dir(
        out_dir,
        fingerprint,
        lambda tmp: _write_site(source, tmp, seed, n_train, n_test, image_size, fingerprint),
    )
    logger.info("anatomy site %s %s", source, "generated" if built else "reused")
    return path


def generate_anatomy_sites(
    out_root: str | Path,
    *,
    seed: int,
    n_train: int = 24,
    n_test: int = 8,
    image_size: int = 64,
    sources: Sequence[str] | None = None,
) -> dict[str, Path]:
    """Write (or reuse) one brain-mask site per template source.

    Parameters
    ----------
    out_root
        Sites go to ``out_root/<source>``.
    seed, n_train, n_test, image_size
        As :func:`generate_anatomy_site`.
    sources
        Subset of :data:`ANATOMY_SOURCES` (default: all).

    Returns
    -------
    dict[str, Path]
        Source name (usable as a site id) -> site directory.

    Raises
    ------
    ConfigError
        An unknown source, or invalid counts / size.
    AnatomyUnavailableError
        nilearn is not installed: ``pip install medseg-fl[anatomy]``.
    """
    chosen = tuple(ANATOMY_SOURCES if sources is None else sources)
    unknown = [s for s in chosen if s not in _SOURCES]
    if unknown:
        raise ConfigError(
            f"unknown anatomy source(s) {unknown}; valid: {list(ANATOMY_SOURCES)}"
        )
    return {
        s: generate_anatomy_site(s, Path(out_root) / s, seed=seed, n_train=n_train,
                                 n_test=n_test, image_size=image_size)
        for s in chosen
    }
