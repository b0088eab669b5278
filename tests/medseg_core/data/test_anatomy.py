"""Brain-mask sites from nilearn's offline MNI152 templates."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from medseg_core.data.anatomy import (
    ANATOMY_SOURCES,
    AnatomyUnavailableError,
    generate_anatomy_sites,
)
from medseg_core.data.integrity import check_site
from medseg_core.data.io import read_image
from medseg_core.errors import ConfigError

SIZE = 32


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("nilearn", reason="anatomy sites need the optional nilearn extra")
    root = tmp_path_factory.mktemp("anatomy")
    return generate_anatomy_sites(root, seed=0, n_train=3, n_test=2, image_size=SIZE,
                                  sources=("mni152_t1_1mm", "mni152_wm"))


def test_sources_listed() -> None:
    assert ANATOMY_SOURCES == ("mni152_t1_1mm", "mni152_t1_2mm", "mni152_gm", "mni152_wm")


def test_anatomy_sites_are_valid_brain_mask_sites(sites: dict[str, Path]) -> None:
    assert set(sites) == {"mni152_t1_1mm", "mni152_wm"}
    for name, site in sites.items():
        report = check_site(site)
        assert report.ok, report.format()
        data = json.loads((site / "dataset.json").read_text())
        assert data["labels"] == {"0": "background", "1": "brain"}
        assert len(data["training"]) == 3 and len(data["test"]) == 2
        fractions = []
        for entry in data["training"] + data["test"]:
            mask, _ = read_image(site / entry["label"])
            fractions.append(float(mask.mean()))
            assert entry["class"] == 1
        assert min(fractions) > 0.05 and max(fractions) < 0.8, (name, fractions)


def test_sites_differ_by_scanner_grid_and_cases_differ(sites: dict[str, Path]) -> None:
    t1, _ = read_image(sites["mni152_t1_1mm"] / "imagesTr/case_000.nii.gz")
    wm, wm_meta = read_image(sites["mni152_wm"] / "imagesTr/case_000.nii.gz")
    other, _ = read_image(sites["mni152_t1_1mm"] / "imagesTr/case_001.nii.gz")

    assert t1.shape == (SIZE, SIZE)
    assert wm.shape == (26, 26)  # downsample 1.25
    assert wm_meta.spacing[0] == pytest.approx(192.0 / 26)
    assert not np.allclose(t1, other)


def test_regeneration_is_reused(sites: dict[str, Path]) -> None:
    stamp = (sites["mni152_wm"] / "dataset.json").stat().st_mtime_ns

    again = generate_anatomy_sites(sites["mni152_wm"].parent, seed=0, n_train=3, n_test=2,
                                   image_size=SIZE, sources=["mni152_wm"])

    assert (again["mni152_wm"] / "dataset.json").stat().st_mtime_ns == stamp


def test_unknown_source_suggests_a_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown anatomy source 'mni152_gn'.*did you mean "
                       r"'mni152_gm'"):
        from medseg_core.data.anatomy import generate_anatomy_site

        generate_anatomy_site("mni152_gn", tmp_path, seed=0)


def test_unknown_sources_listed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown anatomy source\(s\) \['brain'\]; valid"):
        generate_anatomy_sites(tmp_path, seed=0, sources=["brain"])


def test_missing_nilearn_says_how_to_install(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nilearn.datasets", None)  # import now fails

    with pytest.raises(AnatomyUnavailableError, match=r"pip install medseg-fl\[anatomy\]"):
        generate_anatomy_sites(tmp_path, seed=0, sources=["mni152_gm"])
