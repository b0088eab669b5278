"""Which bag-level prediction works at a MIL site? Three side by side, per run.

For the global model of a finished ``medseg simulate`` run (its selected
round by default), at every bag site, the ROC AUC on the test bags of:

* ``bag_auc``: the decoder's maximum lesion probability over the bag;
* ``mil_auc federated``: the MIL head as the federation trained it
  (``evaluation.mil_head: federated``);
* ``mil_auc site``: a MIL head fitted for this model on the site's own
  training bags over the bottleneck instance embeddings
  (``evaluation.mil_head: site``: the site's own call,
  ``SiteSession.site_mil_head``), and that head's AUC on the training bags
  it was fitted on;
* ``mil_auc site-decoder``: the same over the segmenter's lesion map per
  instance (``evaluation.mil_head: site-decoder``), and its training AUC.

Then the mean of each column over the runs given.

    .venv/bin/python benchmarks/mil_head.py RUN_DIR [RUN_DIR ...] [--round N]

``RUN_DIR`` is a ``medseg simulate --out`` directory (or its ``full-masks/``
arm) whose scenario has a MIL head (``model.mil_pooling``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from _common import run_site_models

from medseg_core.metrics import case_scores, roc_auc
from medseg_core.training.evaluation import case_classes
from medseg_core.weak.bag_scores import bag_probabilities


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--round", type=int, default=None)
    args = ap.parse_args()
    rows: list[tuple[float, ...]] = []
    for run in args.runs:
        found = False
        for scenario, sess, model, rnd in run_site_models(run, args.round):
            if not sess.is_bag_site:
                continue
            if scenario.model.mil_pooling == "none":
                raise SystemExit(f"{run}: model.mil_pooling is 'none': no MIL head to compare. "
                                 "Fix: pass runs of a scenario with a MIL head")
            found = True
            te, tr = sess.test_set, sess.train_set
            y = case_classes(te)
            known = y >= 0
            ytr = sess.train_case_labels
            decoder = roc_auc(case_scores(model, te.images, te.case_index)[known], y[known])
            federated = roc_auc(bag_probabilities(model, te.images, te.case_index)[known], y[known])
            heads = {mode: sess.site_mil_head(model, mode) for mode in ("site", "site-decoder")}
            if any(h is None for h in heads.values()):
                print(f"{run} {sess.site.id}: training bags of one class, no site head")
                continue
            cells, row = [], [decoder, federated]
            for mode, head in heads.items():
                auc = roc_auc(bag_probabilities(model, te.images, te.case_index, head=head)[known],
                              y[known])
                fit = roc_auc(bag_probabilities(model, tr.images, tr.case_index, head=head)[ytr >= 0],
                              ytr[ytr >= 0])
                row.append(auc)
                cells.append(f"mil_auc {mode} {auc:.3f} (on its training bags {fit:.3f})")
            rows.append(tuple(row))
            print(f"{run} {sess.site.id} (round {rnd}, {int(known.sum())} test bags): bag_auc "
                  f"{decoder:.3f} | mil_auc federated {federated:.3f} | " + " | ".join(cells),
                  flush=True)
        if not found:
            raise SystemExit(f"{run}: no bag site (label_regime: bag). Fix: pass runs with one")
    if len(rows) > 1:
        m = np.asarray(rows).mean(axis=0)
        print(f"mean over {len(rows)} bag sites: bag_auc {m[0]:.3f} | mil_auc federated "
              f"{m[1]:.3f} | mil_auc site {m[2]:.3f} | mil_auc site-decoder {m[3]:.3f}")


if __name__ == "__main__":
    main()
