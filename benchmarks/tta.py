"""Test-time adaptation of a hospital that never trained, before/after.

Takes a finished ``medseg simulate`` run whose model has site-private
adaptation layers, generates a new synthetic hospital with its own scanner
shift (same seed and data settings as the run), and runs ``medseg adapt`` on
it with the run's selected global checkpoint: test Dice with the initial
private layers (identity adapter, unit norms) and after adapting them to the
hospital's unlabeled training images.

    .venv/bin/python benchmarks/tta.py --run runs/bench-adaptation/dp-on-seed0-norm-adapter
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medseg_core.config import ScenarioConfig, SyntheticSiteSpec, parse_model  # noqa: E402
from medseg_core.sites import materialise_site  # noqa: E402

NEW_SITE = {"id": "new-hospital", "n_train": 200, "n_test": 30, "lesion_prevalence": 0.7,
            "shift": {"gamma": 1.8, "bias_field": 0.4, "blur_sigma": 0.8, "noise_std": 0.06}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="output directory of a medseg simulate run")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=5e-3)
    args = ap.parse_args()
    run = Path(args.run)
    scenario = parse_model(ScenarioConfig, json.loads((run / "scenario.json").read_text()))
    summary = json.loads((run / "summary.json").read_text())
    rnd = summary["federated"]["selected_round"]
    ck = run / "server" / "checkpoints" / f"round_{rnd:04d}"
    spec = parse_model(SyntheticSiteSpec, NEW_SITE)
    site = materialise_site(spec, scenario, run / "tta", dp_enabled=False)
    import shutil

    shutil.rmtree(site.state_dir, ignore_errors=True)  # a hospital that never trained
    site_yaml = run / "tta" / "sites" / spec.id / "site.yaml"
    out = subprocess.run(
        [sys.executable, "-m", "simulations.cli", "adapt", "--site", str(site_yaml),
         "--checkpoint", str(ck), "--epochs", str(args.epochs), "--lr", str(args.lr),
         "--min-component-voxels", str(scenario.evaluation.min_component_voxels)],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout
    rep = json.loads(out[out.index("{"):])
    print(f"run {run} (adaptation {scenario.model.adaptation.value}, round {rnd}); new site "
          f"{site.id}: {spec.shift.model_dump(exclude_defaults=True)}")
    print(f"  test Dice before TTA {rep['test_dice_before']:.4f}, after {rep['test_dice_after']:.4f} "
          f"({rep['test_dice_after'] - rep['test_dice_before']:+.4f}); mean entropy "
          f"{rep['entropy_before']:.4f} -> {rep['entropy_after']:.4f} in {rep['steps']} steps")


if __name__ == "__main__":
    main()
