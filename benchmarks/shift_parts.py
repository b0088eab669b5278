"""Where does a shifted site lose its Dice? Each part of its scanner shift, side by side.

For every synthetic site with a scanner shift (``shift:`` in the scenario)
of a finished ``medseg simulate`` run, this renders the site's own test
phantoms again (same anatomy, lesions and masks; the scanner's random draws
are their own stream) under its shift with one part reset to the unshifted
default at a time, and with every part reset, and scores the run's model
for that site (the selected round, the site's private layers merged, as the
run scored it) on each at the site's threshold from the run. The first
column reproduces the run's test Dice. A part whose removal lifts the Dice
is what the site's adaptation layers have left to absorb; a part whose
removal does not (noise, say) is not what limits the site.

    .venv/bin/python benchmarks/shift_parts.py RUN_DIR [--site ID ...] [--round N]

Torch runs on one thread, as a site's evaluation does by default.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from _common import run_site_models

from medseg_core.config import ShiftSpec, SyntheticSiteSpec
from medseg_core.metrics import evaluate_segmentation
from medseg_core.sites import materialise_site
from medseg_core.training.site import SiteSession


def shift_variants(shift: ShiftSpec) -> dict[str, ShiftSpec]:
    """``as shifted``, ``without P`` for each part P set away from its
    default, and ``unshifted`` (every part at its default)."""
    default = ShiftSpec()
    parts = [k for k in ShiftSpec.model_fields if getattr(shift, k) != getattr(default, k)]
    out = {"as shifted": shift}
    out.update({f"without {k}": shift.model_copy(update={k: getattr(default, k)}) for k in parts})
    if len(parts) > 1:
        out["unshifted"] = default
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--site", nargs="+", default=None, help="site ids (default: every shifted site)")
    ap.add_argument("--round", type=int, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    per_site = json.loads((args.run / "summary.json").read_text())["federated"]["per_site"]
    for scenario, sess, model, rnd in run_site_models(args.run, args.round):
        spec = next(s for s in scenario.sites if s.id == sess.site.id)
        if args.site is not None and spec.id not in args.site:
            continue
        if not isinstance(spec, SyntheticSiteSpec) or spec.shift == ShiftSpec():
            print(f"{spec.id:20s} not a synthetic site with a shift: nothing to take apart")
            continue
        tau = per_site[spec.id].get("threshold")
        ev = scenario.evaluation
        parts = []
        for name, shift in shift_variants(spec.shift).items():
            # the test split's phantoms and scanner draws do not depend on n_train
            variant = spec.model_copy(update={"shift": shift, "n_train": 2})
            with tempfile.TemporaryDirectory() as tmp:
                test = SiteSession(materialise_site(variant, scenario, tmp), model_cfg=scenario.model,
                                   data_cfg=scenario.data).test_set
                dice = evaluate_segmentation(
                    model, test.images, test.labels, test.case_index,
                    num_classes=scenario.data.num_classes,
                    min_component_voxels=ev.min_component_voxels, refine=ev.refine,
                    threshold=tau).dice
            parts.append(f"{name} {dice:.3f}")
        at = "argmax" if tau is None else f"threshold {tau:.2f}"
        print(f"{spec.id:20s} round {rnd}, {at}: " + " | ".join(parts), flush=True)


if __name__ == "__main__":
    main()
