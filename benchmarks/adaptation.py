"""Site-private adaptation layers against plain FedAvg, side by side.

Runs ``medseg simulate`` on one scenario once per adaptation mode (``none``
is plain FedAvg: every parameter aggregated), with the same seed, sites,
DP setting and compute, each in its own process, and prints per-site test
Dice, the mean and the worst site, and each mode's difference to ``none``.
With ``--personalize N`` every mode with private layers also personalises
them for N epochs after the rounds (``train.personalize``); its row is then
the personalised Dice and a second row, ``(as federated)``, the same run's
global model with the private layers as federated. ``fedavg-ft`` is plain
FedAvg whose sites then fine-tune every weight the same way
(``train.personalize.layers: all``): the local fine-tuning baseline.

    .venv/bin/python benchmarks/adaptation.py [--config simulations/configs/strong_shift.yaml]
        [--modes none adapter fedavg-ft] [--dp on off] [--seeds 0] [--personalize 4]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml
from _common import ROOT, run_scenario

from medseg_core.config import ScenarioConfig, parse_model


def mode_config(base: dict, seed: int, mode: str, personalize: int | None) -> dict:
    """The scenario dict ``base`` as one arm: ``seed``, ``model.adaptation:
    mode``, and ``train.personalize.epochs`` (``personalize``, or the
    scenario's own; 0 for ``none``, which has nothing private to personalise),
    in the scenario and in its ``without_dp`` block where that sets it.
    ``fedavg-ft`` is plain FedAvg (``model.adaptation: none``) whose sites
    then fine-tune every weight (``train.personalize.layers: all``) with the
    same personalisation settings: FedAvg-FT, the local fine-tuning baseline.
    The plain arms also drop ``train.adaptation_from_round`` and
    ``train.private_epochs``, in both places: plain FedAvg has no private
    layers to start or to train alone, and the scenario refuses both options
    there."""
    private_only = ("adaptation_from_round", "private_epochs")
    ft = mode == "fedavg-ft"
    plain = ft or mode == "none"
    every = {"layers": "all"} if ft else {}
    train = dict(base.get("train", {}))
    pers = train.get("personalize", {}).get("epochs", 0) if personalize is None else personalize
    train["personalize"] = {**train.get("personalize", {}), "epochs": 0 if mode == "none" else pers,
                            **every}
    arm = {**base, "seed": seed, "model": {**base["model"], "adaptation": "none" if plain else mode},
           "train": train}
    if plain:
        for key in private_only:
            train.pop(key, None)
    if "train" not in base.get("without_dp", {}):
        return arm
    no_dp = {k: v for k, v in base["without_dp"]["train"].items()
             if not plain or k not in private_only}
    if "personalize" in no_dp:
        no_dp["personalize"] = {**no_dp["personalize"], **every}
        if mode == "none" or personalize is not None:
            no_dp["personalize"]["epochs"] = 0 if mode == "none" else personalize
    arm["without_dp"] = {**base["without_dp"], "train": no_dp}
    return arm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "simulations" / "configs" / "strong_shift.yaml"))
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-adaptation"))
    ap.add_argument("--modes", nargs="+", default=["none", "norm+adapter"],
                    choices=["none", "norm", "adapter", "norm+adapter", "fedavg-ft"])
    ap.add_argument("--dp", nargs="+", choices=["on", "off"], default=["on"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--personalize", type=int, default=None, metavar="EPOCHS",
                    help="train.personalize.epochs for the modes with private layers "
                         "(default: the scenario's)")
    args = ap.parse_args()
    base = yaml.safe_load(Path(args.config).read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for dp in args.dp if "fedavg-ft" in args.modes else ():  # refused before any arm runs
        arm = mode_config(base, args.seeds[0], "fedavg-ft", args.personalize)
        if not parse_model(ScenarioConfig, arm).for_privacy(dp == "on").train.personalize.epochs:
            raise SystemExit(
                f"dp-{dp}-seed{args.seeds[0]}-fedavg-ft: the scenario sets no personalisation "
                f"epochs with DP {dp}, so fedavg-ft would be plain FedAvg. Fix: --personalize "
                "EPOCHS (under DP their budget is reserved from round 1)")
    print(f"scenario: {args.config}; modes {args.modes}; seeds {args.seeds}")
    for dp in args.dp:
        for seed in args.seeds:
            rows: dict[str, dict] = {}
            for mode in args.modes:
                tag = f"dp-{dp}-seed{seed}-{mode.replace('+', '-')}"
                summ, wall = run_scenario(mode_config(base, seed, mode, args.personalize), out / tag, dp)
                rows[mode] = summ = {**summ, "_wall": wall}
                per = summ["federated"]["per_site"]
                if any("dice_global" in v for v in per.values()):
                    rows[f"{mode} (as federated)"] = {**summ, "federated": {**summ["federated"], "per_site": {
                        k: {"dice": v.get("dice_global", v["dice"])} for k, v in per.items()}}}
            sites = rows[args.modes[0]]["sites"]
            print(f"\nDP {dp}, seed {seed}: federated test Dice ± standard error over the "
                  f"site's test cases, per site ({', '.join(sites)})")
            stats = {}
            for mode, s in rows.items():
                d = [s["federated"]["per_site"][x]["dice"] for x in sites]
                stats[mode] = (sum(d) / len(d), min(d))
                se = [s["federated"]["per_site"][x].get("dice_se") for x in sites]
                per = "  ".join(f"{v:.4f}" + (f" ± {e:.3f}" if e is not None else "")
                                for v, e in zip(d, se, strict=True))
                print(f"  {mode:<27} {per}   mean {stats[mode][0]:.4f}  worst {stats[mode][1]:.4f}"
                      f"  ({s['_wall']:.0f} s)")
            if "none" in stats:
                for mode, (mean, worst) in stats.items():
                    if mode != "none":
                        print(f"  {mode} - none: mean {mean - stats['none'][0]:+.4f}, "
                              f"worst site {worst - stats['none'][1]:+.4f}")


if __name__ == "__main__":
    main()
