"""Federated vs pooled vs local-only Dice, with and without DP, in one run.

Runs ``medseg simulate --baselines`` on a scenario twice (DP on at the
scenario's epsilon, then DP off), each in its own process so Ray starts
clean, and prints one table with the ratios the product is judged by.

    .venv/bin/python benchmarks/federation.py [--config simulations/configs/default.yaml] [--quick]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(config: str, out: Path, dp: str, quick: bool) -> dict:
    cmd = [sys.executable, "-m", "simulations.cli", "simulate", "--config", config,
           "--out", str(out), "--baselines", "--dp", dp] + (["--quick"] if quick else [])
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    summary = json.loads((out / "summary.json").read_text())
    summary["_wall"] = time.perf_counter() - t0
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "simulations" / "configs" / "default.yaml"))
    ap.add_argument("--out", default=str(ROOT / "runs" / "benchmark"))
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    results = {dp: _run(args.config, out / f"dp-{dp}", dp, args.quick) for dp in ("on", "off")}

    print(f"scenario: {args.config}{' (quick)' if args.quick else ''}")
    sites = results["on"]["sites"]
    print(f"{'arm':<10}{'dp':>5}" + "".join(f"{s:>14}" for s in sites) + f"{'mean':>10}")
    for dp, s in results.items():
        for arm in ("federated", "pooled", "local"):
            row = f"{arm:<10}{dp:>5}"
            for site in sites:
                row += f"{s[arm]['per_site'][site]['dice']:>14.4f}"
            print(row + f"{s[arm]['dice_mean']:>10.4f}")
    for dp, s in results.items():
        fed, pooled, local = (s[a]["dice_mean"] for a in ("federated", "pooled", "local"))
        eps = max((v["epsilon"] or 0.0) for v in s["federated"]["per_site"].values()) if dp == "on" else None
        print(
            f"DP {dp:<3}: federated/pooled = {fed / pooled:.3f}   federated - local mean = {fed - local:+.4f}"
            f"   max site epsilon = {eps if eps is None else round(eps, 3)}"
            f"   simulate wall = {s['federated']['wall_seconds']:.0f} s (all arms {s['_wall']:.0f} s)"
        )
    on, off = results["on"]["federated"]["dice_mean"], results["off"]["federated"]["dice_mean"]
    print(f"cost of DP (federated): Dice {off:.4f} -> {on:.4f} ({on / off:.3f}x)")


if __name__ == "__main__":
    main()
