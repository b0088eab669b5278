"""What does ``evaluation.refine: pamr`` change? Both post-processings side by side.

For one global checkpoint of a finished ``medseg simulate`` run (its selected
round by default), merged with each site's private adaptation layers of that
round where the run has them (``model.adaptation``), and every site, scores
the test split twice, with the run's own ``min_component_voxels`` (and MIL
bag gate): raw argmax and PAMR-refined (:func:`medseg_core.refine.pamr`).
Prints the test Dice of each, the Dice over positive cases, and the
fraction of lesion-free test cases that get any predicted lesion
(false-positive cases). With ``--site-threshold`` a third column:
PAMR-refined at the site's own calibrated foreground threshold
(``evaluation.threshold: site``, :mod:`medseg_core.calibration`: calibrated
for this checkpoint on the site's training labels), and the threshold.

    .venv/bin/python benchmarks/refine.py RUN_DIR [--round N] [--site-threshold]

``RUN_DIR`` is a ``medseg simulate --out`` directory or its ``full-masks/``
arm.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from _common import bag_gate_keep, run_site_models

from medseg_core.calibration import calibrate_threshold
from medseg_core.metrics import evaluate_segmentation
from medseg_core.training.evaluation import case_has_lesion


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--round", type=int, default=None)
    ap.add_argument("--site-threshold", action="store_true",
                    help="also score at each site's calibrated threshold (refined)")
    args = ap.parse_args()
    printed = False
    for scenario, sess, model, rnd in run_site_models(args.run, args.round):
        ev, spec = scenario.evaluation, sess.site
        if not printed:
            print(f"run {args.run}, global model of round {rnd}; min_component_voxels "
                  f"{ev.min_component_voxels}, bag_gate {ev.bag_gate}")
            printed = True
        test = sess.test_set
        if test.labels is None:
            print(f"{spec.id:20s} no test masks: nothing to score")
            continue
        has_fg = case_has_lesion(test).numpy()
        keep = bag_gate_keep(scenario, sess, model, test)
        parts = [f"{spec.id:20s}"]
        arms: list[tuple[str, str, float | None]] = [("none", "none", None), ("pamr", "pamr", None)]
        if args.site_threshold:
            tr = sess.train_set
            found = calibrate_threshold(model, tr.images, tr.case_index, sess.train_case_labels,
                                        min_component_voxels=ev.min_component_voxels, refine="pamr")
            if found is not None:
                arms.append((f"pamr at site threshold {found[0]:.2f}", "pamr", found[0]))
        for name, refine, tau in arms:
            m = evaluate_segmentation(model, test.images, test.labels, test.case_index,
                                      num_classes=scenario.data.num_classes,
                                      min_component_voxels=ev.min_component_voxels,
                                      case_keep=keep, refine=refine, threshold=tau)
            d = np.asarray(m.per_case_dice)
            fp = float((d[~has_fg] < 1.0).mean()) if (~has_fg).any() else float("nan")
            parts.append(f"{name}: dice {m.dice:.3f} (positives {d[has_fg].mean():.3f}, "
                         f"false-positive cases {fp:.2f})")
        print(" | ".join(parts))


if __name__ == "__main__":
    main()
