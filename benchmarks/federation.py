"""Federated vs pooled vs local-only Dice, with and without DP.

Runs ``medseg simulate --baselines`` on a scenario with DP on (the
scenario's epsilon) and with DP off, each run in its own process so Ray
starts clean, for one or more seeds (a seed regenerates the synthetic sites,
the initial model and every random stream), and prints per-seed rows plus
mean and standard deviation of the ratios the product is judged by.

    .venv/bin/python benchmarks/federation.py [--config simulations/configs/default.yaml]
        [--seeds 0 1 2] [--dp on off] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("federated", "pooled", "local")


def _run(config: Path, out: Path, dp: str, quick: bool) -> dict:
    cmd = [sys.executable, "-m", "simulations.cli", "simulate", "--config", str(config),
           "--out", str(out), "--baselines", "--dp", dp] + (["--quick"] if quick else [])
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    summary = json.loads((out / "summary.json").read_text())
    summary["_wall"] = time.perf_counter() - t0
    return summary


def _ms(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def _dice_se(v: dict) -> str:
    se = v.get("dice_se")
    return f"{v['dice']:.4f} ± {se:.3f}" if se is not None else f"{v['dice']:.4f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "simulations" / "configs" / "default.yaml"))
    ap.add_argument("--out", default=str(ROOT / "runs" / "benchmark"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--dp", nargs="+", choices=["on", "off"], default=["on", "off"])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    base = yaml.safe_load(Path(args.config).read_text())
    print(f"scenario: {args.config}{' (quick)' if args.quick else ''}; seeds {args.seeds}")
    results: dict[str, list[dict]] = {dp: [] for dp in args.dp}
    for dp in args.dp:
        for seed in args.seeds:
            cfg = out / f"seed{seed}.yaml"
            cfg.parent.mkdir(parents=True, exist_ok=True)
            cfg.write_text(yaml.safe_dump({**base, "seed": seed}, sort_keys=False))
            s = _run(cfg, out / f"dp-{dp}-seed{seed}", dp, args.quick)
            results[dp].append(s)
            sites = s["sites"]
            print(f"\nDP {dp}, seed {seed}: Dice ± its standard error over the site's test "
                  f"cases, per site ({', '.join(sites)}), and mean")
            for arm in ARMS:
                per = "  ".join(_dice_se(s[arm]["per_site"][x]) for x in sites)
                print(f"  {arm:<10} {per}   mean {s[arm]['dice_mean']:.4f}")
            eps = [v["epsilon"] for v in s["federated"]["per_site"].values()]
            print(f"  max site epsilon {max(eps) if dp == 'on' else None}; selected round "
                  f"{s['federated'].get('selected_round')}; simulate wall {s['federated']['wall_seconds']:.0f} s, "
                  f"all arms {s['_wall']:.0f} s")
    print("\nsummary (mean ± sd over seeds)")
    for dp, runs in results.items():
        fed = [r["federated"]["dice_mean"] for r in runs]
        pooled = [r["pooled"]["dice_mean"] for r in runs]
        local = [r["local"]["dice_mean"] for r in runs]
        ratio = [f / p for f, p in zip(fed, pooled, strict=True)]
        margin = [f - loc for f, loc in zip(fed, local, strict=True)]
        print(f"DP {dp:<3}: federated {_ms(fed)}  pooled {_ms(pooled)}  local {_ms(local)}  "
              f"federated/pooled {_ms(ratio)}  federated-local {_ms(margin)}")
    if "on" in results and "off" in results:
        on = [r["federated"]["dice_mean"] for r in results["on"]]
        off = [r["federated"]["dice_mean"] for r in results["off"]]
        print(f"cost of DP (federated Dice, DP on / DP off): {_ms([a / b for a, b in zip(on, off, strict=True)])}")


if __name__ == "__main__":
    main()
