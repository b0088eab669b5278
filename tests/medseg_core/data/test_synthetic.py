"""Synthetic sites: determinism, reuse, label regimes, lesions, shift."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import ndimage

from medseg_core.config import LabelRegime, PathSiteSpec, ShiftSpec, SyntheticSiteSpec
from medseg_core.data.datalist import load_datalist
from medseg_core.data.integrity import check_site
from medseg_core.data.io import read_image
from medseg_core.data.slices import load_slices
from medseg_core.data.synthetic import generate_site, generate_sites
from medseg_core.errors import ConfigError, DataIntegrityError

SIZE = 32


def _spec(**kw: Any) -> SyntheticSiteSpec:
    base: dict[str, Any] = {"id": "h1", "n_train": 6, "n_test": 2}
    base.update(kw)
    return SyntheticSiteSpec(**base)


def _arrays(site: Path) -> dict[str, np.ndarray]:
    return {
        str(p.relative_to(site)): read_image(p)[0]
        for p in sorted(site.rglob("*.nii.gz"))
    }


def _dataset(site: Path) -> dict[str, Any]:
    return json.loads((site / "dataset.json").read_text())


def test_generate_site_is_deterministic(tmp_path: Path) -> None:
    # Arrange
    spec = _spec(shift=ShiftSpec(bias_field=0.2, noise_std=0.05))

    # Act
    a = generate_site(spec, tmp_path / "a", seed=7, image_size=SIZE)
    b = generate_site(spec, tmp_path / "b", seed=7, image_size=SIZE)
    c = generate_site(spec, tmp_path / "c", seed=8, image_size=SIZE)

    # Assert
    arrays_a, arrays_b = _arrays(a), _arrays(b)
    assert arrays_a.keys() == arrays_b.keys() and len(arrays_a) == 16
    for key in arrays_a:
        assert arrays_a[key].tobytes() == arrays_b[key].tobytes(), key
    assert _dataset(a) == _dataset(b)
    assert not np.array_equal(arrays_a["imagesTr/case_000.nii.gz"],
                              _arrays(c)["imagesTr/case_000.nii.gz"])


def test_generated_site_layout_and_integrity(tmp_path: Path) -> None:
    site = generate_site(_spec(), tmp_path / "s", seed=0, image_size=SIZE)

    data = _dataset(site)
    assert data["labels"] == {"0": "background", "1": "lesion"}
    assert data["name"] == "h1" and data["generator"]["seed"] == 0
    assert {d.name for d in site.iterdir()} == {
        "dataset.json", "imagesTr", "labelsTr", "imagesTs", "labelsTs"}
    report = check_site(site)
    assert report.ok, report.format()
    image, meta = read_image(site / "imagesTr/case_000.nii.gz")
    assert image.shape == (SIZE, SIZE) and meta.spacing == pytest.approx((1.0, 1.0))


def test_existing_site_is_reused_and_changed_inputs_regenerate(tmp_path: Path) -> None:
    out = tmp_path / "s"
    generate_site(_spec(), out, seed=0, image_size=SIZE)
    first = out / "imagesTr/case_000.nii.gz"
    stamp = first.stat().st_mtime_ns

    generate_site(_spec(epsilon=2.0), out, seed=0, image_size=SIZE)  # privacy-only change
    assert first.stat().st_mtime_ns == stamp

    generate_site(_spec(n_train=3), out, seed=0, image_size=SIZE)
    assert len(_dataset(out)["training"]) == 3
    assert not (out / "imagesTr/case_005.nii.gz").exists()


def test_refuses_to_overwrite_foreign_data(tmp_path: Path, write_dataset_json) -> None:
    write_dataset_json(tmp_path / "real", {"training": [{"image": "a.nii.gz"}]})

    with pytest.raises(DataIntegrityError, match=r"refusing to generate a site into .*real: it "
                       r"holds a dataset\.json not written by a generator"):
        generate_site(_spec(), tmp_path / "real", seed=0, image_size=SIZE)
    assert _dataset(tmp_path / "real") == {"training": [{"image": "a.nii.gz"}]}


def _keys(entries: list[dict[str, Any]]) -> list[set[str]]:
    return [set(e) for e in entries]


@pytest.mark.parametrize(
    ("regime", "full_masks", "keys"),
    [
        (LabelRegime.MASK, False, {"image", "label", "class"}),
        (LabelRegime.IMAGE, False, {"image", "class"}),
        (LabelRegime.IMAGE, True, {"image", "label", "class"}),
        (LabelRegime.BAG, False, {"image", "class", "bag"}),
        (LabelRegime.BAG, True, {"image", "label", "class", "bag"}),
    ],
)
def test_label_regimes_write_the_right_keys(tmp_path: Path, regime: LabelRegime,
                                            full_masks: bool, keys: set[str]) -> None:
    site = generate_site(_spec(label_regime=regime), tmp_path / "s", seed=0,
                         image_size=SIZE, full_masks=full_masks)

    data = _dataset(site)

    assert _keys(data["training"]) == [keys] * 6
    assert _keys(data["test"]) == [{"image", "label", "class"}] * 2
    assert len(list((site / "labelsTr").glob("*.nii.gz"))) == 6  # masks always on disk


def test_mixed_regime_cycles_and_2d_bags_group_consecutive_cases(tmp_path: Path) -> None:
    site = generate_site(_spec(label_regime=LabelRegime.MIXED, n_train=9, bag_size=2),
                         tmp_path / "s", seed=0, image_size=SIZE)

    training = _dataset(site)["training"]

    assert _keys(training)[:3] == [{"image", "label", "class"}, {"image", "class"},
                                   {"image", "class", "bag"}]
    assert [e.get("bag") for e in training if "bag" in e] == ["bag_000", "bag_000", "bag_001"]


def test_2d_bag_labels_match_masks(tmp_path: Path) -> None:
    site = generate_site(_spec(label_regime=LabelRegime.BAG, n_train=8, bag_size=4),
                         tmp_path / "s", seed=1, image_size=SIZE)

    training = _dataset(site)["training"]

    assert [e["bag"] for e in training] == ["bag_000"] * 4 + ["bag_001"] * 4
    for b in range(2):  # every member carries its bag's label: positive if any member is
        members = range(4 * b, 4 * b + 4)
        bag_label = max(int(read_image(site / f"labelsTr/case_{i:03d}.nii.gz")[0].any())
                        for i in members)
        assert {training[i]["class"] for i in members} == {bag_label}


def test_3d_bags_are_volumes_and_lesions_span_slices(tmp_path: Path) -> None:
    spec = _spec(dims=3, depth=6, n_train=4, lesion_prevalence=1.0,
                 label_regime=LabelRegime.BAG)
    site = generate_site(spec, tmp_path / "s", seed=0, image_size=SIZE)

    training = _dataset(site)["training"]
    assert [e["bag"] for e in training] == [f"bag_case_{i:03d}" for i in range(4)]
    spans = []
    for i in range(4):
        mask, meta = read_image(site / f"labelsTr/case_{i:03d}.nii.gz")
        assert mask.shape == (SIZE, SIZE, 6) and meta.spacing[2] == pytest.approx(2.0)
        per_slice = mask.sum(axis=(0, 1)) > 0
        spans.append(int(per_slice.sum()))
        assert training[i]["class"] == 1
    assert max(spans) >= 2 and min(spans) >= 1


@pytest.mark.parametrize(("prevalence", "n_pos"), [(0.0, 0), (0.5, 10), (1.0, 20)])
def test_lesions_follow_the_prevalence(tmp_path: Path, prevalence: float, n_pos: int) -> None:
    spec = _spec(n_train=20, n_test=4, lesion_prevalence=prevalence)
    site = generate_site(spec, tmp_path / "s", seed=0, image_size=SIZE)

    masks = [read_image(p)[0] for p in sorted((site / "labelsTr").glob("*.nii.gz"))]

    assert sum(int(m.any()) for m in masks) == n_pos
    assert [e["class"] for e in _dataset(site)["training"]] == [int(m.any()) for m in masks]


def test_lesions_have_visible_contrast(tmp_path: Path) -> None:
    site = generate_site(_spec(n_train=12, lesion_prevalence=1.0, id="contrast"),
                         tmp_path / "s", seed=0, image_size=64)

    contrasts = []
    for i in range(12):
        image, _ = read_image(site / f"imagesTr/case_{i:03d}.nii.gz")
        mask, _ = read_image(site / f"labelsTr/case_{i:03d}.nii.gz")
        lesion = mask > 0
        ring = ndimage.binary_dilation(lesion, iterations=3) & ~ndimage.binary_dilation(
            lesion, iterations=1)
        contrasts.append(abs(float(image[lesion].mean() - image[ring].mean())))

    # lesions differ from their surroundings by a good part of the [0, 1] range
    assert np.median(contrasts) > 0.15


def test_downsample_stores_a_coarser_grid(tmp_path: Path) -> None:
    spec = _spec(shift=ShiftSpec(downsample=2.0, blur_sigma=0.5, gamma=0.7,
                                 intensity_scale=3.0, intensity_offset=1.0))
    site = generate_site(spec, tmp_path / "s", seed=0, image_size=SIZE)

    image, meta = read_image(site / "imagesTr/case_000.nii.gz")
    mask, mask_meta = read_image(site / "labelsTr/case_000.nii.gz")

    assert image.shape == mask.shape == (16, 16)
    assert meta.spacing == pytest.approx((2.0, 2.0)) == mask_meta.spacing
    assert image.max() > 2.5  # intensity_scale / offset applied
    slices = load_slices(load_datalist(site).split("training"), image_size=SIZE)
    assert slices.images.shape == (6, 1, SIZE, SIZE)


def test_generate_sites_uses_site_ids(tmp_path: Path) -> None:
    specs = [_spec(id="a"), _spec(id="b", dims=3, depth=2)]

    out = generate_sites(specs, tmp_path, seed=0, image_size=SIZE)

    assert out == {"a": tmp_path / "a", "b": tmp_path / "b"}
    assert not np.array_equal(read_image(out["a"] / "imagesTr/case_000.nii.gz")[0],
                              read_image(out["b"] / "imagesTr/case_000.nii.gz")[0][..., 0])


def test_generate_sites_rejects_path_sites(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"site 'p' is a PathSiteSpec, not a SyntheticSiteSpec"):
        generate_sites([PathSiteSpec(id="p", path=tmp_path)], tmp_path, seed=0)


def test_generate_site_rejects_tiny_images(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"image_size=8; expected >= 16"):
        generate_site(_spec(), tmp_path / "s", seed=0, image_size=8)
