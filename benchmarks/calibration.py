"""What does ``evaluation.calibration_cases`` cost and save? All cases and subsets side by side.

``evaluation.threshold: site`` calibrates every site's foreground threshold
on its training cases at every validation (:mod:`medseg_core.calibration`),
and predicts every case it reads (PAMR-refined with ``evaluation.refine:
pamr``). For one global checkpoint of a finished ``medseg simulate`` run (its
selected round by default, each site's private layers merged as in the run)
and every site whose training labels hold both classes, this prints, in one
process:

* the seconds of one calibration on all the site's cases, and on each subset
  size of ``--cases`` (its first draw), with the ratio subset / all;
* the threshold each gives, over ``--draws`` seeded draws per size;
* the test Dice at each threshold, and its difference from all cases'.

    .venv/bin/python benchmarks/calibration.py RUN_DIR [--round N] [--cases 128 64] [--draws 5]

Torch runs on one thread, as a site's evaluation does by default.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _common import bag_gate_keep, run_site_models

from medseg_core.calibration import calibrate_threshold
from medseg_core.metrics import evaluate_segmentation


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--round", type=int, default=None)
    ap.add_argument("--cases", type=int, nargs="+", default=[128, 64])
    ap.add_argument("--draws", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    for scenario, sess, model, rnd in run_site_models(args.run, args.round):
        ev, tr, test = scenario.evaluation, sess.train_set, sess.test_set
        if test.labels is None:
            print(f"{sess.site.id:20s} no test masks: nothing to score")
            continue
        n_known = int((sess.train_case_labels >= 0).sum())

        def calibrate(max_cases: int | None, seed: int) -> tuple[float | None, float]:
            t0 = time.perf_counter()
            found = calibrate_threshold(model, tr.images, tr.case_index, sess.train_case_labels,
                                        min_component_voxels=ev.min_component_voxels,
                                        refine=ev.refine, max_cases=max_cases, seed=seed)
            return (None if found is None else found[0]), time.perf_counter() - t0

        scored: dict[float, float] = {}
        keep = bag_gate_keep(scenario, sess, model, test)  # as the run scored

        def dice(tau: float) -> float:
            if tau not in scored:
                scored[tau] = evaluate_segmentation(
                    model, test.images, test.labels, test.case_index,
                    num_classes=scenario.data.num_classes,
                    min_component_voxels=ev.min_component_voxels, case_keep=keep,
                    refine=ev.refine, threshold=tau).dice
            return scored[tau]

        tau_all, sec_all = calibrate(None, 0)
        if tau_all is None:
            print(f"{sess.site.id:20s} its training labels hold one class: nothing to calibrate")
            continue
        parts = [f"{sess.site.id:20s} round {rnd}, {n_known} cases: all {sec_all:.2f} s, "
                 f"threshold {tau_all:.2f}, test Dice {dice(tau_all):.3f}"]
        for n in args.cases:
            draws = [calibrate(n, seed) for seed in range(args.draws)]
            taus = [t for t, _ in draws if t is not None]
            diffs = [dice(t) - dice(tau_all) for t in taus]
            parts.append(
                f"{n} cases: {draws[0][1]:.2f} s ({draws[0][1] / sec_all:.2f}x), thresholds "
                f"{' '.join(f'{t:.2f}' for t in taus)}, test Dice - all's "
                f"{' '.join(f'{d:+.3f}' for d in diffs)} (mean {sum(diffs) / len(diffs):+.3f})")
        print(" | ".join(parts), flush=True)


if __name__ == "__main__":
    main()
