"""Weak-label Dice over full-mask Dice, per seed, and over the seeds.

For each seed, runs a scenario (``seed`` set) and its full-mask variant
(:func:`simulations.runner.full_mask_variant`: every synthetic site given
full masks, the same images and test cases), each as its own ``medseg
simulate`` process, ``--jobs`` at a time; then prints, per seed, each
weak site's test Dice in both arms and their ratio, the round each arm's
validation picked, and the MIL site's bag-level AUCs; and, over the seeds,
the mean of the per-seed ratios and the seeds on which every image-level
site meets ``--target``. This is how the README's weak / full rows are
measured: ``medseg simulate --compare`` does the same for one seed.

An arm whose ``summary.json`` is already under ``--out`` is read, not
rerun, so an interrupted benchmark resumes and a table can be reprinted.

    .venv/bin/python benchmarks/weak_full.py [--config simulations/configs/mixed_regime.yaml]
        [--seeds 0 1 2 3 4 5] [--dp on] [--jobs 2] [--out runs/bench-weak-full] [--target 0.85]

A weak site is a synthetic site whose label regime is not ``mask`` in the
scenario (the full-mask variant gives only synthetic sites masks).
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml
from _common import ROOT, run_scenario

from medseg_core.config import LabelRegime, ScenarioConfig, SyntheticSiteSpec, parse_model
from simulations.runner import full_mask_variant


def _arm(cfg: dict, out: Path, dp: str) -> dict:
    done = out / "summary.json"
    if done.is_file():
        return json.loads(done.read_text())
    return run_scenario(cfg, out, dp)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "simulations" / "configs" / "mixed_regime.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--dp", choices=["on", "off"], default="on")
    ap.add_argument("--jobs", type=int, default=1, help="arms run at once (each its own process)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-weak-full"))
    ap.add_argument("--target", type=float, default=0.85)
    args = ap.parse_args()
    base = parse_model(ScenarioConfig, yaml.safe_load(Path(args.config).read_text()),
                       source=args.config)
    synthetic = [s for s in base.sites if isinstance(s, SyntheticSiteSpec)]
    weak = [s.id for s in synthetic if s.label_regime != LabelRegime.MASK]
    image = [s.id for s in synthetic if s.label_regime == LabelRegime.IMAGE]
    if not weak:
        raise SystemExit(f"{args.config}: every site has masks; nothing to compare. Fix: a scenario "
                         "with image-level or bag sites (label_regime: image / bag)")
    out = Path(args.out)
    jobs = []
    for seed in args.seeds:
        scenario = base.model_copy(update={"seed": seed})
        for arm, sc in (("weak", scenario), ("full", full_mask_variant(scenario))):
            jobs.append(((seed, arm), json.loads(sc.model_dump_json()), out / f"dp-{args.dp}-seed{seed}-{arm}"))
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futures = {key: pool.submit(_arm, cfg, path, args.dp) for key, cfg, path in jobs}
        runs = {key: f.result() for key, f in futures.items()}

    print(f"scenario {args.config}, DP {args.dp}: test Dice weak arm / full-mask arm = ratio, per "
          f"weak site; the round each arm's validation picked")
    ratios: dict[str, list[float]] = {s: [] for s in weak}
    met = []
    for seed in args.seeds:
        w, f = runs[(seed, "weak")]["federated"], runs[(seed, "full")]["federated"]
        parts = [f"seed {seed} (rounds {w['selected_round']} / {f['selected_round']})"]
        ok = True
        for s in weak:
            dw, df = w["per_site"][s]["dice"], f["per_site"][s]["dice"]
            r = dw / df if df else float("nan")
            ratios[s].append(r)
            ok = ok and (s not in image or r >= args.target)
            extra = ""
            if w["per_site"][s].get("mil_auc") is not None:
                extra = (f" (bag_auc {w['per_site'][s].get('bag_auc', float('nan')):.2f}, "
                         f"mil_auc {w['per_site'][s]['mil_auc']:.2f})")
            parts.append(f"{s} {dw:.3f} / {df:.3f} = {r:.2f}{extra}")
        if ok and image:
            met.append(seed)
        print(" | ".join(parts))
    means = " | ".join(f"{s} {sum(v) / len(v):.3f}" for s, v in ratios.items())
    print(f"mean of the per-seed ratios over seeds {args.seeds}: {means}")
    if image:
        print(f"every image-level site >= {args.target}: seeds {met} ({len(met)} of {len(args.seeds)})")


if __name__ == "__main__":
    main()
