"""A mixed-regime federation (masks + image-level labels) through Flower's
simulation engine, with ``--compare`` (the same sites given full masks)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from _runner import simulate

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCENARIO = """
name: weak2x2
seed: 3
rounds: 2
sites:
  - {id: masks, n_train: 10, n_test: 4, label_regime: mask}
  - {id: reports, n_train: 10, n_test: 4, label_regime: image, lesion_prevalence: 0.5,
     shift: {gamma: 1.3}}
  - {id: volumes, dims: 3, depth: 4, n_train: 6, n_test: 4, label_regime: bag,
     lesion_prevalence: 0.5}
model: {channels: [8, 16], strides: [2], norm_groups: 4, weak_head: cam, mil_pooling: attention}
data: {image_size: 32, val_fraction: 0.25}
train: {local_epochs: 1, batch_size: 4, lr: 0.01,
       weak: {mil_weight: 0.2, weak_sites_freeze: decoder, weak_sites_freeze_from_round: 2}}
       # as mixed_regime.yaml: the pixel-level MIL constraint; the sites without masks train
       # the decoder in round 1 and leave it to the mask site from round 2
privacy: {enabled: true, epsilon: 8.0}
strategy: {regime_weights: {image: 0.5}}   # the image site's update counts half in the average
evaluation: {bag_gate: true, mil_head: site-decoder}
  # the MIL site's volumes are segmented only where a MIL head says lesion: the one
  # it refits for the scored model on its own training bags, over the lesion map
"""


def test_mixed_regime_federation_with_compare(tmp_path: Path) -> None:
    out, s, stdout = simulate(tmp_path, SCENARIO, "--compare")
    per = s["federated"]["per_site"]
    assert per["masks"]["label_regime"] == "mask" and per["reports"]["label_regime"] == "image"
    for sid in ("masks", "reports"):
        assert 0.0 <= per[sid]["dice"] <= 1.0  # synthetic test masks, scoring only
        assert 0.0 <= per[sid]["bag_auc"] <= 1.0
        assert 0.0 < per[sid]["epsilon"] <= 8.0 + 1e-6
    assert per["volumes"]["label_regime"] == "bag"
    assert 0.0 <= per["volumes"]["mil_auc"] <= 1.0  # the site MIL head's bag-level prediction
    assert "volumes: bag-level AUC of the MIL head" in stdout
    assert s["federated"]["rejected_updates"] == 0
    cmp = s["compare"]
    assert cmp["weak_sites"] == ["reports", "volumes"]
    full = cmp["full_masks"]["per_site"]["reports"]
    assert full["label_regime"] == "mask"
    assert cmp["weak_over_full"]["reports"] == pytest.approx(per["reports"]["dice"] / full["dice"])
    assert "weak-label Dice / full-mask Dice" in stdout

    # the pseudo-mask benchmark scores this run's CAM and pseudo-masks against
    # the held-out masks, for both sites
    bench = Path(__file__).resolve().parents[2] / "benchmarks" / "pseudo_masks.py"
    proc = subprocess.run([sys.executable, str(bench), str(out)], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if " auc " in line]
    assert [r.split()[0] for r in rows] == ["masks", "reports"]
    assert all("agree: prec" in r and "lesion-as-bg" in r for r in rows)

    # the post-processing benchmark scores the same checkpoint raw and PAMR-refined,
    # every site; raw reproduces the run's own test Dice
    bench = bench.with_name("refine.py")
    proc = subprocess.run([sys.executable, str(bench), str(out)], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split()[0]: line for line in proc.stdout.splitlines() if "| none: dice" in line}
    assert set(rows) == {"masks", "reports", "volumes"}
    for sid, row in rows.items():
        raw = float(row.split("none: dice ")[1].split()[0])
        assert raw == pytest.approx(per[sid]["dice"], abs=5e-4)
        assert "pamr: dice" in row

    # --site-threshold adds each site's calibrated threshold (evaluation.threshold: site)
    proc = subprocess.run([sys.executable, str(bench), str(out), "--site-threshold"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = next(line for line in proc.stdout.splitlines() if line.startswith("reports "))
    tau = float(row.split("pamr at site threshold ")[1].split(":")[0])
    assert 0.0 < tau < 1.0 and "false-positive cases" in row.split("site threshold")[1]

    # the calibration benchmark: each site's threshold on all its training
    # cases and on seeded subsets (evaluation.calibration_cases), side by side
    bench = bench.with_name("calibration.py")
    proc = subprocess.run([sys.executable, str(bench), str(out), "--cases", "4", "--draws", "2"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split()[0]: line for line in proc.stdout.splitlines() if "cases: all" in line}
    assert rows, proc.stdout
    for row in rows.values():
        sub = row.split("| 4 cases: ")[1]
        taus = [float(t) for t in sub.split("thresholds ")[1].split(",")[0].split()]
        assert len(taus) == 2 and all(0.0 < t < 1.0 for t in taus)
        assert "test Dice - all's" in sub

    # the shift benchmark re-renders a shifted site's test phantoms without each
    # part of its shift; "as shifted" is the run's own test Dice
    proc = subprocess.run([sys.executable, str(bench.with_name("shift_parts.py")), str(out)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()}
    assert "nothing to take apart" in rows["masks"]
    shown = dict(part.rsplit(" ", 1) for part in rows["reports"].split(": ", 1)[1].split(" | "))
    assert set(shown) == {"as shifted", "without gamma"}
    assert float(shown["as shifted"]) == pytest.approx(per["reports"]["dice"], abs=5e-4)

    # the MIL-head benchmark scores the same checkpoint's bag-level predictions side
    # by side; its site-decoder head is the one the run scored with (evaluation.mil_head)
    proc = subprocess.run([sys.executable, str(bench.with_name("mil_head.py")), str(out)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = next(line for line in proc.stdout.splitlines() if " volumes (round " in line)
    assert "mil_auc site " in row
    site = float(row.split("mil_auc site-decoder ")[1].split()[0])
    assert site == pytest.approx(per["volumes"]["mil_auc"], abs=5e-4)
    assert float(row.split("bag_auc ")[1].split()[0]) == pytest.approx(per["volumes"]["bag_auc"],
                                                                        abs=5e-4)

    # the multi-seed weak / full benchmark reads this run's two arms (laid out
    # as it writes them) instead of running them again, and prints the ratio
    # --compare computed
    layout = tmp_path / "bench"
    layout.mkdir()
    (layout / "dp-on-seed3-weak").symlink_to(out)
    (layout / "dp-on-seed3-full").symlink_to(out / "full-masks")
    proc = subprocess.run([sys.executable, str(bench.with_name("weak_full.py")), "--config",
                           str(tmp_path / "scenario.yaml"), "--seeds", "3", "--out", str(layout)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = next(line for line in proc.stdout.splitlines() if line.startswith("seed 3 "))
    shown = float(row.split("| reports ")[1].split("= ")[1].split()[0])
    assert shown == pytest.approx(cmp["weak_over_full"]["reports"], abs=0.005)
    assert "volumes " in row and "mil_auc" in row
    assert "mean of the per-seed ratios over seeds [3]" in proc.stdout
    target = "seeds [3] (1 of 1)" if cmp["weak_over_full"]["reports"] >= 0.85 else "seeds [] (0 of 1)"
    assert target in proc.stdout
