"""How good are the weak sites' pseudo-masks? Scored against held-out masks.

Synthetic sites keep every mask on disk (``dataset.json`` leaves them out for
weak regimes), so a finished ``medseg simulate`` run can be asked what its
pseudo-masks would have taught. For one global checkpoint of the run and
every 2D site, on the positive cases of the site's test split (never trained
on), prints:

* ``auc``: image-level AUC of the CAM head's logit (the run's ``train.weak.cam_pooling``:
  global average or smooth max of the CAM);
* ``point``: fraction of positives whose CAM maximum lies within 3 px of a lesion;
* ``cam>=t``: Dice of the CAM region above ``t`` x its per-image maximum;
* for the pseudo-mask rules of ``medseg_core/weak/pseudo.py``
  (``agree``: CAM >= 0.5 max and decoder p >= 0.5; ``decoder``: p >= 0.5 x
  its per-image maximum and >= ``fg_floor``): precision and recall of the
  pseudo-foreground, and ``lesion-as-bg``, the fraction of lesion pixels the
  CAM-background rule (< 0.2 max) labels background;
* ``pamr``: the same for the decoder's probability refined by the image's
  affinities (``train.weak.refine: pamr``, p >= 0.5 after refinement), and
  ``lesion-as-bg`` when background also needs the refined p < 0.2
  (``train.weak.bg_max_p: 0.2``);
* per lesion (connected component of the test mask), by polarity (brighter
  or darker than a 1-3 px ring around it; the synthetic sites draw 25 %
  bright): the fraction the decoder detects (p >= 0.5 on >= 10 % of it) and
  its mean pixel recall.

    .venv/bin/python benchmarks/pseudo_masks.py RUN_DIR [--round N] [--fg-floor 0.2 0.5]

``RUN_DIR`` is a ``medseg simulate --out`` directory (its ``full-masks/``
arm works too); ``--round`` defaults to the round the run selected.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
import torch.nn.functional as F

from medseg_core.checkpoint import load_checkpoint
from medseg_core.config import ScenarioConfig, parse_model
from medseg_core.metrics import roc_auc
from medseg_core.models.heads import last_cam
from medseg_core.sites import materialise_site
from medseg_core.training.session import build_segmenter, load_state
from medseg_core.training.site import SiteSession
from medseg_core.weak import WeakSettings, pseudo_masks
from medseg_core.weak.settings import cam_image_logit
from medseg_core.refine import pamr


def _dice(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten(1).float(), b.flatten(1).float()
    return float((2 * (a * b).sum(1) / (a.sum(1) + b.sum(1)).clamp_min(1)).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--round", type=int, default=None)
    ap.add_argument("--fg-floor", type=float, nargs="+", default=[0.2, 0.5])
    args = ap.parse_args()
    scenario = parse_model(ScenarioConfig, json.loads((args.run / "scenario.json").read_text()))
    if scenario.model.weak_head != "cam":
        raise SystemExit(f"{args.run}: the model has no CAM head (model.weak_head: "
                         f"{scenario.model.weak_head!r}); nothing to score")
    rnd = args.round or json.loads((args.run / "summary.json").read_text())["federated"]["selected_round"]
    weak = WeakSettings.from_config(scenario.train.weak)
    ck = args.run / "server" / "checkpoints" / f"round_{rnd:04d}"
    model = build_segmenter(scenario.model, scenario.data)
    load_state(model, {**{k: v.numpy() for k, v in model.state_dict().items()},
                       **load_checkpoint(ck).arrays})
    model.eval()
    print(f"run {args.run}, global model of round {rnd} (site-private layers not merged)")
    for spec in scenario.sites:
        if spec.dims == 3:
            continue
        site = materialise_site(spec, scenario, args.run)
        test = SiteSession(site, model_cfg=scenario.model, data_cfg=scenario.data).test_set
        y = test.labels[:, 0] > 0
        pos = y.flatten(1).any(1)
        if not bool(pos.any()):
            print(f"{spec.id:20s} [{spec.label_regime}] no lesion in its test split: nothing to score")
            continue
        with torch.no_grad():
            logits = model(test.images)
            cam = last_cam(model)
        lesions = per_lesion(test.images[:, 0].numpy(), y.numpy(),
                              logits.softmax(1)[:, 1:].sum(1).numpy())
        images = test.images[pos]
        auc = roc_auc(cam_image_logit(cam, weak), pos.long())  # nan with one class only
        logits, cam, y = logits[pos], cam[pos], y[pos]
        c = F.interpolate(F.relu(cam), size=y.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        rel = c / c.flatten(1).amax(1).clamp_min(1e-6)[:, None, None]
        near = F.max_pool2d(y[:, None].float(), 7, 1, 3)[:, 0] > 0
        point = float(near.flatten(1).gather(1, c.flatten(1).argmax(1, keepdim=True)).float().mean())
        parts = [f"{spec.id:20s} [{spec.label_regime}] auc {auc:.3f} point {point:.2f}",
                 " ".join(f"cam>={t} {_dice(rel >= t, y):.3f}" for t in (0.3, 0.5, 0.7))]
        rules = [("agree", "agree", 0.2)] + [(f"decoder(floor {f})", "decoder", f) for f in args.fg_floor]
        for name, source, floor in rules:
            pm = pseudo_masks(cam, logits, WeakSettings(pseudo_fg=source, fg_floor=floor))[:, 0]
            fg = pm == 1
            prec = float((fg & y).sum()) / max(int(fg.sum()), 1)
            rec = float((fg & y).sum()) / int(y.sum())
            parts.append(f"{name}: prec {prec:.2f} rec {rec:.2f}")
        parts.append(f"lesion-as-bg {float(((rel < 0.2) & y).sum()) / int(y.sum()):.2f}")
        q = pamr(images, logits.softmax(1)[:, 1:].sum(1, keepdim=True))[:, 0]
        fg = q >= 0.5
        parts.append(f"pamr: prec {float((fg & y).sum()) / max(int(fg.sum()), 1):.2f} "
                     f"rec {float((fg & y).sum()) / int(y.sum()):.2f} lesion-as-bg "
                     f"{float(((rel < 0.2) & (q < 0.2) & y).sum()) / int(y.sum()):.2f}")
        parts.append(lesions)
        print(" | ".join(parts))


def per_lesion(images: np.ndarray, masks: np.ndarray, p: np.ndarray) -> str:
    """Detection rate and mean recall of the decoder per lesion, bright vs dark."""
    rows = []
    for x, y, pi in zip(images, masks, p):
        lab, n = ndimage.label(y)
        for j in range(1, n + 1):
            m = lab == j
            ring = ndimage.binary_dilation(m, iterations=3) & ~ndimage.binary_dilation(m) & ~y
            bright = bool(ring.any()) and float(x[m].mean()) > float(x[ring].mean())
            rows.append((bright, float((pi[m] >= 0.5).mean())))
    out = []
    for name, want in (("bright", True), ("dark", False)):
        rec = [r for b, r in rows if b == want]
        det = np.mean([r >= 0.1 for r in rec]) if rec else float("nan")
        out.append(f"{name} lesions {len(rec)}: detected {det:.2f} recall "
                   f"{np.mean(rec) if rec else float('nan'):.2f}")
    return ", ".join(out)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
