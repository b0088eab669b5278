"""Weak-supervision options, each against off, side by side.

For one scenario (default: the mixed-regime one), runs ``medseg simulate``
in pairs that differ in one option only, with the same seed and sites:

* ``fixmatch``: image-level sites hold 40 % deliberately unlabeled cases;
  off ignores them, on trains them by FixMatch consistency;
* ``noisy``: 20 % of the image-level sites' labels are flipped; plain
  cross-entropy against generalized cross-entropy (``gce``);
* ``imbalance``: plain against focal loss.

Prints the mean test Dice of the weak-label sites (and of all sites) per arm
and the difference on - off.

    .venv/bin/python benchmarks/weak_options.py [--config ...] [--options fixmatch noisy imbalance]
        [--dp on] [--rounds 8]
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import yaml

from _common import ROOT, run_scenario

PAIRS = {
    "fixmatch": ({"unlabeled_fraction": 0.4}, {}, {"fixmatch": True}),
    "noisy": ({"class_noise": 0.2}, {}, {"noisy_labels": "gce"}),
    "imbalance": ({}, {}, {"imbalance": "focal"}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "simulations" / "configs" / "mixed_regime.yaml"))
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-weak-options"))
    ap.add_argument("--options", nargs="+", choices=sorted(PAIRS), default=sorted(PAIRS))
    ap.add_argument("--dp", choices=["on", "off"], default="on")
    ap.add_argument("--rounds", type=int, default=None, help="override the scenario's rounds")
    args = ap.parse_args()
    base = yaml.safe_load(Path(args.config).read_text())
    if args.rounds:
        base["rounds"] = args.rounds
    weak_ids = [s["id"] for s in base["sites"] if s.get("label_regime") == "image"]
    print(f"scenario: {args.config}; DP {args.dp}; rounds {base['rounds']}; "
          f"weak-label (image) sites: {weak_ids}")
    for option in args.options:
        site_edit, off_weak, on_weak = PAIRS[option]
        rows = {}
        for arm, weak in (("off", off_weak), ("on", on_weak)):
            cfg = copy.deepcopy(base)
            for s in cfg["sites"]:
                if s["id"] in weak_ids:
                    s.update(site_edit)
            cfg.setdefault("train", {})["weak"] = weak
            summary, wall = run_scenario(cfg, Path(args.out) / f"{option}-{arm}", args.dp)
            per = summary["federated"]["per_site"]
            weak_mean = sum(per[i]["dice"] for i in weak_ids) / len(weak_ids)
            rows[arm] = weak_mean
            sites = ", ".join(f"{k} {v['dice']:.3f}" for k, v in per.items())
            print(f"  {option:<10} {arm:<3}: weak-site Dice {weak_mean:.4f}  all-site Dice "
                  f"{summary['federated']['dice_mean']:.4f}  ({sites}; {wall:.0f} s)")
        print(f"  {option:<10} on - off: weak-site Dice {rows['on'] - rows['off']:+.4f}")


if __name__ == "__main__":
    main()
