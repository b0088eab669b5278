"""The `medseg` command line (in-process, real code paths)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medseg_core.config import SyntheticSiteSpec
from medseg_core.data.io import write_nifti
from medseg_core.data.synthetic import generate_site
from simulations.cli import main


@pytest.fixture
def site(tmp_path: Path) -> Path:
    return generate_site(SyntheticSiteSpec(id="s", n_train=4, n_test=2), tmp_path / "s", seed=0,
                         image_size=32)


def test_check_data_clean_site_exits_zero(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-data", str(site)]) == 0
    assert capsys.readouterr().out.strip().endswith("6 cases, OK")


def test_check_data_reports_every_problem_and_exits_one(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ds = json.loads((site / "dataset.json").read_text())
    first, second = ds["training"][0], ds["training"][1]
    write_nifti(np.full((32, 32), np.nan, np.float32), site / first["image"])
    write_nifti(np.zeros((20, 32), np.float32), site / second["label"])
    assert main(["check-data", str(site)]) == 1
    out = capsys.readouterr().out
    assert "nan_or_inf" in out and "shape_mismatch" in out
    assert "(20, 32)" in out


def test_check_data_json_output(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-data", "--json", str(site)]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


def test_bad_scenario_is_a_clear_error_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("sites: [{id: a}]\nstrategy: {name: fedsgd}\n")
    assert main(["simulate", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "strategy.name" in err and "fedavg" in err


def test_missing_dataset_json_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-data", str(tmp_path)]) == 1
    assert "dataset.json" in capsys.readouterr().out


def test_make_site_writes_data_and_a_site_yaml_with_its_own_state_dir(tmp_path, capsys) -> None:
    from medseg_core.config import load_site_config
    from simulations.cli import main

    cfg = tmp_path / "s.yaml"
    cfg.write_text("sites:\n  - {id: h1, n_train: 4, n_test: 2}\ndata: {image_size: 32}\n")
    assert main(["make-site", "--config", str(cfg), "--site", "h1", "--out", str(tmp_path / "d"),
                 "--state-dir", str(tmp_path / "state"), "--site-yaml",
                 str(tmp_path / "d" / "site.yaml")]) == 0
    site = load_site_config(tmp_path / "d" / "site.yaml")
    assert site.state_dir == (tmp_path / "state").resolve()
    assert (site.data_dir / "dataset.json").is_file()
    assert main(["make-site", "--config", str(cfg), "--site", "nope", "--out", str(tmp_path)]) == 2
    assert "'nope' is not in" in capsys.readouterr().err
