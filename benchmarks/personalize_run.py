"""Post-federation personalisation (``train.personalize``) of a finished run.

    .venv/bin/python benchmarks/personalize_run.py RUN_DIR --epochs 9 \\
        --optimizer sgd --lr 0.1 --momentum 0.9 [--against NONE_RUN_DIR]

``medseg simulate`` personalises each site's private layers after the last
round when the scenario sets ``train.personalize.epochs``. This runs the same
phase on a run that finished without it: for every site, the real
:meth:`SiteSession.personalize` (the epoch kept by the site's validation
Dice at its own threshold) against the run's selected global model, then
the real :meth:`SiteSession.evaluate` on the test split with the
personalised layers, as the run's test phase would have scored them. The
site's state is copied to a temporary folder first, so the run is left as it
was. Without DP, training is deterministic, so a run of the same scenario
with the same ``train.personalize`` gives the same figures
(``tests/integration/test_personalize_run.py`` checks that on a small run).
Only runs without DP: under DP the rounds reserve the personalisation's
budget from round 1, so it cannot be added afterwards.

``--all-weights`` fine-tunes every weight instead, shared and private
(``train.personalize.layers: all``; on a ``model.adaptation: none`` run,
FedAvg-FT): the baseline that tells what the private layers add over
fine-tuning as such.

Prints, per site: test Dice as federated, personalised, the epoch kept and
the validation Dice before and after; then the mean and worst site, and with
``--against`` (a ``model.adaptation: none`` run of the same scenario) both
minus that run's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

from medseg_core.checkpoint import load_checkpoint
from medseg_core.config import ScenarioConfig, parse_model
from medseg_core.errors import ConfigError
from medseg_core.sites import materialise_site
from medseg_core.training.site import SiteSession


def personalise_run(run: Path, *, epochs: int, optimizer: str, lr: float, momentum: float,
                    sites: list[str] | None = None,
                    all_weights: bool = False) -> dict[str, dict[str, float | int]]:
    """Per site of ``run``: test Dice as federated and personalised, the
    epoch kept, validation Dice before and after."""
    scenario = parse_model(ScenarioConfig, json.loads((run / "scenario.json").read_text()))
    if scenario.privacy.enabled:
        raise ConfigError(
            f"{run} trained under DP: its rounds reserved no budget for personalisation, so it "
            "cannot be added afterwards. Fix: set train.personalize in the scenario and run it "
            "again, or give a run made with --dp off")
    federated = json.loads((run / "summary.json").read_text())["federated"]
    rnd, run_id = federated["selected_round"], federated["run_id"]
    arrays = load_checkpoint(run / "server" / "checkpoints" / f"round_{rnd:04d}").arrays
    ev = scenario.evaluation
    out: dict[str, dict[str, float | int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for spec in scenario.sites:
            if sites is not None and spec.id not in sites:
                continue
            site = materialise_site(spec, scenario, run)
            state = Path(tmp) / spec.id
            shutil.copytree(site.state_dir, state)
            sess = SiteSession(site.model_copy(update={"state_dir": state}),
                               model_cfg=scenario.model, data_cfg=scenario.data,
                               weak_cfg=scenario.train.weak)
            scoring = dict(min_component_voxels=ev.min_component_voxels, refine=ev.refine,
                           threshold=ev.threshold, calibration_cases=ev.calibration_cases)
            res = sess.personalize(arrays, run_id, rnd, epochs=epochs, lr=lr, optimizer=optimizer,
                                   momentum=momentum, batch_size=scenario.train.batch_size,
                                   layers="all" if all_weights else "private", **scoring)
            dice = {p: sess.evaluate(arrays, "test", run_name=run_id, model_round=rnd,
                                     personalized=p, **scoring).dice
                    for p in (False, True)}
            out[spec.id] = {"federated": dice[False], "personalized": dice[True],
                            "epochs_kept": res.epochs_kept, "val_before": res.val_dice_before,
                            "val_after": res.val_dice_after}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--epochs", type=int, default=9)
    ap.add_argument("--optimizer", choices=("adam", "sgd"), default="sgd")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--site", nargs="+", default=None, help="site ids (default: every site)")
    ap.add_argument("--all-weights", action="store_true",
                    help="fine-tune every weight, shared and private (on a plain FedAvg run: FedAvg-FT)")
    ap.add_argument("--against", type=Path, default=None,
                    help="a model.adaptation: none run of the same scenario")
    args = ap.parse_args()
    torch.set_num_threads(1)
    per_site = personalise_run(args.run, epochs=args.epochs, optimizer=args.optimizer, lr=args.lr,
                               momentum=args.momentum, sites=args.site,
                               all_weights=args.all_weights)
    for sid, r in per_site.items():
        print(f"{sid:14s} test Dice federated {r['federated']:.3f} -> personalised "
              f"{r['personalized']:.3f} (epoch {r['epochs_kept']} kept; val "
              f"{r['val_before']:.3f} -> {r['val_after']:.3f})")
    nd = None
    if args.against is not None:
        none = json.loads((args.against / "summary.json").read_text())["federated"]["per_site"]
        nd = [none[s]["dice"] for s in per_site]
    for k in ("federated", "personalized"):
        v = [r[k] for r in per_site.values()]
        mean, worst = sum(v) / len(v), min(v)
        print(f"{k:13s} mean {mean:.3f}, worst site {worst:.3f}", end="")
        if nd is not None:
            print(f" | minus none: mean {mean - sum(nd) / len(nd):+.3f}, worst site "
                  f"{worst - min(nd):+.3f}", end="")
        print()


if __name__ == "__main__":
    main()
