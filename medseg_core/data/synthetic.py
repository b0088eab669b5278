"""Deterministic synthetic hospital sites (no downloads).

Each case is a phantom of :func:`medseg_core.data.phantom.render_phantom`
(anatomy-like organs, 1-3 lesions in 75 % dark / 25 % bright).

The site's :class:`~medseg_core.config.ShiftSpec` is applied to the image
only (see :mod:`medseg_core.data.scanner`); ``downsample`` stores the site at
a coarser grid (``round(image_size / downsample)`` px, spacing
``image_size / n`` mm), so loaders resize it back.

Layout written (MSD form)::

    out_dir/dataset.json
    out_dir/imagesTr/case_000.nii.gz  out_dir/labelsTr/case_000.nii.gz ...
    out_dir/imagesTs/test_000.nii.gz  out_dir/labelsTs/test_000.nii.gz ...

Every mask file is written, even when the site's label regime leaves it out
of ``dataset.json`` (so full-mask comparisons remain possible). The inputs'
fingerprint is stored under ``"generator"``; a directory generated from the
same inputs is reused as is.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from medseg_core.config import LabelRegime, SyntheticSiteSpec
from medseg_core.data.datalist import DATASET_FILE
from medseg_core.data.io import write_nifti
from medseg_core.data.phantom import render_phantom
from medseg_core.data.scanner import apply_shift, native_size, resize_mask
from medseg_core.data.sitedir import build_site_dir, make_fingerprint
from medseg_core.errors import ConfigError

__all__ = ["GENERATOR_VERSION", "generate_site", "generate_sites", "render_phantom"]

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 2  # 2: MIL bag members carry the bag label
_GENERATOR_NAME = "medseg_core.data.synthetic"
SLICE_SPACING_MM = 2.0
LABELS = {"0": "background", "1": "lesion"}
_MIXED_CYCLE = (LabelRegime.MASK, LabelRegime.IMAGE, LabelRegime.BAG)


# --------------------------------------------------------------------------
# Site generation
# --------------------------------------------------------------------------


def _id_words(site_id: str) -> list[int]:
    digest = hashlib.sha256(site_id.encode("utf-8")).digest()
    return [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]


def _rng(seed: int, site_id: str, *stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *_id_words(site_id), *stream]))


def _fingerprint(spec: SyntheticSiteSpec, seed: int, image_size: int,
                 full_masks: bool) -> dict[str, Any]:
    # epsilon is a privacy setting, not a data setting: changing it must not regenerate
    return make_fingerprint(
        {
            "name": _GENERATOR_NAME,
            "version": GENERATOR_VERSION,
            "seed": seed,
            "image_size": image_size,
            "full_masks": full_masks,
            "spec": spec.model_dump(mode="json", exclude={"epsilon"}),
        }
    )


def _case_regime(spec: SyntheticSiteSpec, index: int) -> LabelRegime:
    if spec.label_regime == LabelRegime.MIXED:
        return _MIXED_CYCLE[index % len(_MIXED_CYCLE)]
    return spec.label_regime


def _positives(n: int, prevalence: float, rng: np.random.Generator) -> np.ndarray:
    """Exactly ``round(n * prevalence)`` positive cases, at random positions."""
    flags = np.zeros(n, dtype=bool)
    flags[rng.permutation(n)[: round(n * prevalence)]] = True
    return flags


def _write_site(spec: SyntheticSiteSpec, root: Path, seed: int, image_size: int,
                full_masks: bool, fingerprint: dict[str, Any]) -> None:
    native = native_size(image_size, spec.shift)
    in_plane = image_size / native
    spacing = (in_plane, in_plane) if spec.dims == 2 else (in_plane, in_plane, SLICE_SPACING_MM)
    depth = None if spec.dims == 2 else spec.depth
    entries: dict[str, list[dict[str, Any]]] = {"training": [], "test": []}
    bag_counter = 0
    pick = _rng(seed, spec.id, 300).permutation(spec.n_train)
    n_unl = round(spec.n_train * spec.unlabeled_fraction)
    unlabeled = set(pick[:n_unl].tolist())
    noisy = set(pick[n_unl:n_unl + round(spec.n_train * spec.class_noise)].tolist())
    for split_no, (split, n, prefix, sub) in enumerate(
        (("training", spec.n_train, "case", "Tr"), ("test", spec.n_test, "test", "Ts"))
    ):
        positive = _positives(n, spec.lesion_prevalence, _rng(seed, spec.id, 100 + split_no))
        for i in range(n):
            case = f"{prefix}_{i:03d}"
            anatomy = _rng(seed, spec.id, split_no, i, 0)
            scanner = _rng(seed, spec.id, split_no, i, 1)
            phantom, mask_hr = render_phantom(anatomy, image_size, depth, bool(positive[i]))
            image = apply_shift(phantom, spec.shift, scanner, native)
            mask = resize_mask(mask_hr, native)
            image_rel, label_rel = f"images{sub}/{case}.nii.gz", f"labels{sub}/{case}.nii.gz"
            write_nifti(image, root / image_rel, spacing)
            write_nifti(mask, root / label_rel, spacing)
            cls = int(mask.any())
            entry: dict[str, Any] = {"image": image_rel}
            if split == "test":
                entry.update({"label": label_rel, "class": cls})
            elif i in unlabeled:
                entry["class"] = None  # deliberately unlabeled: image only
            else:
                regime = _case_regime(spec, i)
                if regime == LabelRegime.MASK or full_masks:
                    entry["label"] = label_rel
                # simulated report errors: some image-level labels flipped
                entry["class"] = 1 - cls if (i in noisy and "label" not in entry) else cls
                if regime == LabelRegime.BAG:
                    if spec.dims == 3:
                        entry["bag"] = f"bag_{case}"
                    else:
                        entry["bag"] = f"bag_{bag_counter // spec.bag_size:03d}"
                        bag_counter += 1
            entries[split].append(entry)
    # A MIL bag is labelled as a whole: positive if any member is. Members
    # carry the bag's label, never their own (that would be instance supervision).
    bag_label: dict[str, int] = {}
    for e in entries["training"]:
        if "bag" in e:
            bag_label[e["bag"]] = max(bag_label.get(e["bag"], 0), int(e["class"]))
    for e in entries["training"]:
        if "bag" in e:
            e["class"] = bag_label[e["bag"]]
    dataset = {
        "name": spec.id,
        "description": "synthetic phantom site generated by medseg_core.data.synthetic",
        "tensorImageSize": f"{spec.dims}D",
        "modality": {"0": "synthetic"},
        "labels": LABELS,
        "label_regime": str(spec.label_regime),
        "numTraining": spec.n_train,
        "numTest": spec.n_test,
        "training": entries["training"],
        "test": entries["test"],
        "generator": fingerprint,
    }
    # dataset.json last: a half-written directory is never mistaken for a site
    (root / DATASET_FILE).write_text(json.dumps(dataset, indent=1), encoding="utf-8")


def generate_site(
    spec: SyntheticSiteSpec,
    out_dir: str | Path,
    *,
    seed: int,
    image_size: int = 64,
    full_masks: bool = False,
) -> Path:
    """Write a synthetic site (or reuse one generated from the same inputs).

    Parameters
    ----------
    spec
        The site: case counts, 2D/3D, lesion prevalence, label regime, shift.
    out_dir
        Site directory to create (``dataset.json``, ``imagesTr/``, ``labelsTr/``,
        ``imagesTs/``, ``labelsTs/``).
    seed
        Scenario seed; with ``spec`` and the arguments below it fixes every voxel.
    image_size
        Full-resolution in-plane size ``S`` (>= 16); stored at
        ``round(S / spec.shift.downsample)``.
    full_masks
        Reference masks in ``dataset.json`` for every training case whatever
        the regime (for full-supervision baselines).

    Returns
    -------
    Path
        ``out_dir``.

    Raises
    ------
    ValueError
        ``image_size < 16``.
    DataIntegrityError
        ``out_dir`` holds other data (a ``dataset.json`` this generator did not
        write, or other files); it is never overwritten.
    """
    if image_size < 16:
        raise ValueError(f"image_size={image_size}; expected >= 16")
    fingerprint = _fingerprint(spec, seed, image_size, full_masks)
    path, built = build_site_dir(
        out_dir,
        fingerprint,
        lambda tmp: _write_site(spec, tmp, seed, image_size, full_masks, fingerprint),
    )
    if built:
        logger.info(
            "synthetic site generated: %d training + %d test cases (%dD)",
            spec.n_train, spec.n_test, spec.dims,
        )
    else:
        logger.debug("synthetic site reused (fingerprint %s)", fingerprint["sha256"][:12])
    return path


def generate_sites(
    specs: Iterable[SyntheticSiteSpec],
    out_root: str | Path,
    *,
    seed: int,
    image_size: int = 64,
    full_masks: bool = False,
) -> dict[str, Path]:
    """Generate (or reuse) several synthetic sites as ``out_root/<site id>``.

    Raises
    ------
    ConfigError
        A spec is not a :class:`~medseg_core.config.SyntheticSiteSpec` (e.g. a
        path site): filter the scenario's sites first.
    """
    out: dict[str, Path] = {}
    for spec in specs:
        if not isinstance(spec, SyntheticSiteSpec):
            raise ConfigError(
                f"site {getattr(spec, 'id', spec)!r} is a {type(spec).__name__}, not a "
                "SyntheticSiteSpec; pass only synthetic sites to generate_sites "
                "(e.g. [s for s in scenario.sites if isinstance(s, SyntheticSiteSpec)])"
            )
        out[spec.id] = generate_site(
            spec, Path(out_root) / spec.id, seed=seed, image_size=image_size,
            full_masks=full_masks,
        )
    return out
