"""``benchmarks/accountants.py``: the same recorded DP-SGD read by each accountant."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from medseg_core.privacy.accountant import epsilon_of, new_accountant, save_accountant
from medseg_core.privacy.noise import calibrate_noise, projected_epsilon

BENCH = Path(__file__).resolve().parents[3] / "benchmarks" / "accountants.py"


def _site(run: Path, site_id: str, history: list[tuple[float, float, int]] | None) -> None:
    d = run / "sites" / site_id
    (d / "state").mkdir(parents=True)
    (d / "site.yaml").write_text(yaml.safe_dump({
        "id": site_id, "data_dir": str(run / "data" / site_id), "state_dir": str(d / "state"),
        "epsilon": 8.0, "delta": 1e-5, "accountant": "rdp"}))
    if history is not None:
        acc = new_accountant("rdp")
        acc.history = list(history)
        save_accountant(acc, d / "state" / "accountant.json")


def _run(run: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BENCH), str(run)], capture_output=True, text=True,
                          timeout=120, check=False)


def test_prints_each_accountants_epsilon_and_calibrated_noise(tmp_path: Path) -> None:
    q, steps = 32 / 600, 285
    sigma = calibrate_noise(new_accountant("rdp"), target_epsilon=8.0, delta=1e-5,
                            sample_rate=q, steps=steps)
    _site(tmp_path, "a", [(sigma, q, 100), (sigma, q, 185)])
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = [line for line in proc.stdout.splitlines() if line.startswith("a:")]
    assert f"{steps} steps at noise {sigma:.4f} (rdp)" in row
    acc = new_accountant("prv")
    acc.history = [(sigma, q, steps)]
    prv_eps = epsilon_of(acc, 1e-5)
    rdp_eps = projected_epsilon(new_accountant("rdp"), noise_multiplier=sigma, sample_rate=q,
                                steps=steps, delta=1e-5)
    assert f"rdp {rdp_eps:.3f} / prv {prv_eps:.3f}" in row
    # PRV is the tighter accountant: less epsilon for the same steps, so less
    # noise for the same cap; RDP's own calibration reproduces the recorded noise
    assert prv_eps < rdp_eps <= 8.0
    assert f"rdp {sigma:.4f} (1.000x" in row
    prv_sigma = float(row.split("prv ")[-1].split()[0])
    assert 0.9 * sigma < prv_sigma < sigma


@pytest.mark.parametrize("history, says", [
    (None, "no .*accountant.json; the site trained no DP round"),
    ([(1.0, 0.05, 10), (1.2, 0.05, 10)], r"\(noise, sample rate\) pairs .* Fix:"),
])
def test_refuses_a_site_it_cannot_compare(tmp_path: Path, history, says: str) -> None:
    _site(tmp_path, "a", history)
    proc = _run(tmp_path)
    assert proc.returncode != 0
    assert re.search(says, proc.stderr), proc.stderr[-2000:]
