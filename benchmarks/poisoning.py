"""One poisoned site out of five: plain FedAvg against robust aggregation.

Five synthetic hospitals (2D, each its own scanner shift) train the same
global model; the fifth, ``mallory``, trains honestly and then corrupts the
update it sends (``attack: sign_flip`` sends ``g - (l - g)``, ``attack:
flip_scale`` sends ``g - 10 (l - g)``; ``scale``, ``g + 10 (l - g)``, is a
boosted honest update and helps an under-trained model, so it is not in the
default set). Each arm is one ``medseg simulate`` run
with the same seed and data; the figure is the mean test Dice of the four
honest sites (mallory's own Dice is left out of every arm, so the numbers
compare like with like).

Arms (``--arms`` selects): ``clean-<strategy>`` (no attack) and
``<attack>-<strategy>`` for every attack and strategy listed.

    .venv/bin/python benchmarks/poisoning.py [--dp off] [--rounds 8]
        [--attacks sign_flip flip_scale] [--strategies fedavg fedtrimmedavg fedmedian krum]
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

from _common import ROOT, run_scenario

SCENARIO = {
    "name": "poisoning",
    "seed": 0,
    "rounds": 8,
    "sites": [
        {"id": "hospital-a", "n_train": 160, "n_test": 30, "lesion_prevalence": 0.7,
         "shift": {"noise_std": 0.02}},
        {"id": "hospital-b", "n_train": 160, "n_test": 30, "lesion_prevalence": 0.8,
         "shift": {"intensity_scale": 1.3, "gamma": 0.9, "bias_field": 0.15, "noise_std": 0.04}},
        {"id": "hospital-c", "n_train": 160, "n_test": 30, "lesion_prevalence": 0.6,
         "shift": {"intensity_offset": 0.1, "gamma": 1.15, "blur_sigma": 0.5, "noise_std": 0.03}},
        {"id": "hospital-d", "n_train": 160, "n_test": 30, "lesion_prevalence": 0.7,
         "shift": {"intensity_scale": 0.85, "noise_std": 0.03}},
        {"id": "mallory", "n_train": 160, "n_test": 30, "lesion_prevalence": 0.7,
         "shift": {"gamma": 1.1, "noise_std": 0.02}},
    ],
    "model": {"name": "unet", "channels": [8, 16, 32, 64], "strides": [2, 2, 2],
              "num_res_units": 1, "norm_groups": 4},
    "data": {"image_size": 64, "val_fraction": 0.2},
    "train": {"local_epochs": 1, "batch_size": 32, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9},
    "privacy": {"enabled": True, "epsilon": 8.0, "delta": 1.0e-5, "max_grad_norm": 1.0},
    "strategy": {"name": "fedavg", "trim_beta": 0.2, "num_malicious_nodes": 1},
    "evaluation": {"min_component_voxels": 10, "select": "best_val"},
}
ATTACKER = "mallory"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-poisoning"))
    ap.add_argument("--dp", choices=["on", "off"], default="off")
    ap.add_argument("--rounds", type=int, default=SCENARIO["rounds"])
    ap.add_argument("--attacks", nargs="+", default=["sign_flip", "flip_scale"],
                    choices=["sign_flip", "flip_scale", "scale", "nan"])
    ap.add_argument("--strategies", nargs="+", default=["fedavg", "fedtrimmedavg"],
                    choices=["fedavg", "fedmedian", "fedtrimmedavg", "krum"])
    ap.add_argument("--norm-bound", type=float, default=None,
                    help="also run every attack under FedAvg with this max_update_norm")
    args = ap.parse_args()

    arms: list[tuple[str, str, dict]] = []
    for strategy in args.strategies:
        arms.append((f"clean-{strategy}", "none", {"name": strategy}))
    for attack in args.attacks:
        for strategy in args.strategies:
            arms.append((f"{attack}-{strategy}", attack, {"name": strategy}))
        if args.norm_bound:
            arms.append((f"{attack}-fedavg+bound", attack,
                         {"name": "fedavg", "max_update_norm": args.norm_bound}))

    print(f"5 sites, 1 attacker ({ATTACKER}); DP {args.dp}; {args.rounds} rounds; "
          "figure: mean test Dice of the 4 honest sites")
    results: dict[str, float] = {}
    for name, attack, strategy in arms:
        cfg = copy.deepcopy(SCENARIO)
        cfg["rounds"] = args.rounds
        cfg["strategy"].update(strategy)
        for s in cfg["sites"]:
            if s["id"] == ATTACKER:
                s["attack"] = attack
        summary, wall = run_scenario(cfg, Path(args.out) / name, args.dp)
        fed = summary["federated"]
        honest = [v["dice"] for k, v in fed["per_site"].items() if k != ATTACKER]
        results[name] = sum(honest) / len(honest)
        print(f"  {name:<24} honest-site Dice {results[name]:.4f}  rejected updates "
              f"{fed.get('rejected_updates', 0)}  ({wall:.0f} s)", flush=True)
    clean = results.get("clean-fedavg")
    if clean:
        print("relative to clean FedAvg:")
        for name, dice in results.items():
            print(f"  {name:<24} {dice / clean:.3f}x")


if __name__ == "__main__":
    main()
