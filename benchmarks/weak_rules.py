"""Pseudo-mask rules side by side, fast: an in-process federation of the 2D sites.

The real figures of the weak/full target come from ``medseg simulate
--compare`` (Flower, Ray, every site, 25+ minutes a run on this machine).
To choose between pseudo-mask rules before spending that, this script
federates the scenario's **2D sites only** in one process, without Flower:
every round each site runs the site runtime's own round
(``SiteSession.train_round``: same data, losses, augmentation, per-round
seeds and, with ``--dp on``, the same DP-SGD plan and accountant as in a
federation) from the global weights, the global weights
move by FedAvgM (the scenario's ``strategy.server_momentum``, 0 = FedAvg;
weights = training cases x ``strategy.regime_weights``, each array averaged
over the sites that changed it, as the server does), and the round with
the best mean validation Dice (sites with validation masks, refined as
``evaluation.refine``) is scored on every site's test split. About 10 s a
round for the mixed-regime scenario's three 2D sites without DP.

For every variant (``NAME='{"weak option": value, ...}'``, applied on top
of the scenario's ``train.weak``) and seed it prints the selected round,
the mean validation Dice of every round (a flood shows as a fall below the
empty prediction's), test Dice per site and, per site, the fraction of
bright / dark test lesions the decoder detects (p >= 0.5 on >= 10 % of the
lesion) and their mean pixel recall (``benchmarks/pseudo_masks.py``) and,
for a variant with ``bg_blob``, the share of lesion pixels and of all pixels
its blob map covers. ``--full`` adds the arm with every site given full
masks and prints weak / full per image-level site.

A variant with ``"positives_gate": MARGIN`` runs the closed-loop warm-up
as the federation does (``server/federation.py``, the same
:func:`medseg_core.weak.positives_gate_open`): its positives' decoder terms
train in a round only if the previous round's validation Dice beat the
empty prediction's by at least MARGIN. It prints the rounds the gate was
open.

It is a proxy: no 3D/MIL site (whose update the scenario down-weights to
0.1), so its Dice is not the scenario's.

    .venv/bin/python benchmarks/weak_rules.py [--config simulations/configs/mixed_regime.yaml]
        [--seeds 0 1 2 3] [--rounds 15] [--full] [--jobs 2] [--dp off|on]
        [--variants committed='{}' blob='{"bg_blob": 0.5}']

Per seed the data differ, and so do the weak arm's dynamics (runs of one
variant differ by several hundredths between seeds): it prints, per variant,
the mean over seeds and the mean paired difference to the first variant
with its standard error.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from _common import ROOT
from pseudo_masks import per_lesion

from medseg_core.config import LabelRegime, ScenarioConfig, WeakConfig, parse_model
from medseg_core.errors import ConfigError
from medseg_core.sites import materialise_site
from medseg_core.training.evaluation import case_has_lesion
from medseg_core.training.session import build_segmenter, evaluate_state, load_state
from medseg_core.training.site import RoundRequest, SiteSession
from medseg_core.weak import positives_gate_open
from medseg_core.weak.pseudo import blob_map
from simulations.runner import full_mask_variant


def federate(scenario: ScenarioConfig, weak_over: dict, workdir: Path, rounds: int, dp: bool) -> dict:
    """One in-process FedAvgM run of the scenario's 2D sites; its selected round and scores."""
    sessions: dict[str, SiteSession] = {}
    weights: dict[str, float] = {}
    regime_w = scenario.strategy.regime_weights or {}
    # the variant's options, validated as a scenario's train.weak would be
    weak_cfg = parse_model(WeakConfig, {**scenario.train.weak.model_dump(), **weak_over})
    for spec in scenario.sites:
        if getattr(spec, "dims", 2) != 2 or spec.label_regime == LabelRegime.BAG:
            continue
        site = materialise_site(spec, scenario, workdir, dp_enabled=dp)
        sess = SiteSession(site, model_cfg=scenario.model, data_cfg=scenario.data, weak_cfg=weak_cfg)
        sessions[spec.id] = sess
        weights[spec.id] = len(sess.train_set) * regime_w.get(spec.label_regime, 1.0)
    torch.manual_seed(scenario.seed)
    g = {k: v.detach().numpy().copy() for k, v in
         build_segmenter(scenario.model, scenario.data).state_dict().items()}
    mom = {k: np.zeros_like(v) for k, v in g.items()}
    beta = scenario.strategy.server_momentum if scenario.strategy.name == "fedavgm" else 0.0
    tr = scenario.train
    refine = scenario.evaluation.refine
    mcv = scenario.evaluation.min_component_voxels
    best: tuple[float, int, dict] = (-1.0, 0, g)
    trajectory: list[float] = []
    gate_open: list[bool] = []
    with_val = [s for s in sessions.values() if s.val_set is not None]
    # weighted by validation slices, as the federation's validation Dice is
    n_val = np.array([len(s.val_set) for s in with_val], dtype=float)
    # an all-background prediction scores the share of validation cases without a lesion
    empty = float(np.average([float((~case_has_lesion(s.val_set)).float().mean())
                              for s in with_val], weights=n_val)) if with_val else None
    mean_val: float | None = None
    eps: dict[str, float | None] = {}
    for r in range(1, rounds + 1):
        replies: dict[str, dict[str, np.ndarray]] = {}
        is_open = positives_gate_open(mean_val, empty, weak_cfg.positives_gate)
        if is_open is not None:
            gate_open.append(is_open)
        for sid, sess in sessions.items():
            # the site runtime's own round (DP plan, accountant, seeds) from the global weights
            res = sess.train_round(g, RoundRequest(
                server_round=r, total_rounds=rounds, local_epochs=tr.local_epochs, lr=tr.lr,
                batch_size=tr.batch_size, optimizer=tr.optimizer, momentum=tr.momentum,
                run_name="weak-rules", min_component_voxels=mcv, refine=refine,
                positives_gate_open=is_open))
            eps[sid] = res.epsilon
            replies[sid] = res.shared
        # each array averaged over the sites that changed it, as the server does
        # (server.federation.average_over_trainers; train.weak.weak_sites_freeze)
        new = {}
        for k, ref in g.items():
            trained = [sid for sid in replies if not np.array_equal(replies[sid][k], ref)] or list(replies)
            tw = sum(weights[sid] for sid in trained)
            new[k] = sum((weights[sid] / tw) * replies[sid][k] for sid in trained)
        for k in g:  # FedAvgM (Hsu et al. 2019), server learning rate 1
            mom[k] = beta * mom[k] + (g[k] - new[k])
            g[k] = (g[k] - mom[k]).astype(g[k].dtype)
        vals = [evaluate_state(build_segmenter(scenario.model, scenario.data), g, s.val_set,
                               num_classes=scenario.data.num_classes, min_component_voxels=mcv,
                               refine=refine).dice
                for s in with_val]
        mean_val = float(np.average(vals, weights=n_val)) if vals else None
        trajectory.append(mean_val if mean_val is not None else float("nan"))
        if mean_val is not None:
            if mean_val > best[0]:
                best = (mean_val, r, {k: v.copy() for k, v in g.items()})
    model = build_segmenter(scenario.model, scenario.data)
    load_state(model, best[2])
    model.eval()
    out = {"round": best[1], "dice": {}, "lesions": {}, "epsilon": eps, "val": trajectory,
           "gate": gate_open}
    for sid, sess in sessions.items():
        ts = sess.test_set
        out["dice"][sid] = evaluate_state(build_segmenter(scenario.model, scenario.data), best[2], ts,
                                          num_classes=scenario.data.num_classes,
                                          min_component_voxels=mcv, refine=refine).dice
        with torch.no_grad():
            p = model(ts.images).softmax(dim=1)[:, 1:].sum(dim=1).numpy()
        out["lesions"][sid] = per_lesion(ts.images[:, 0].numpy(), ts.labels[:, 0].numpy() > 0, p)
        w = sess.weak_settings
        if w.bg_blob is not None:  # what the blob prior keeps from being background
            blobs = blob_map(ts.images, w.bg_blob, w.blob_sigmas, w.blob_dilate)
            les = ts.labels > 0
            out["lesions"][sid] += (f"; blob map: {float(blobs[les].float().mean()):.2f} of lesion "
                                    f"pixels, {float(blobs.float().mean()):.2f} of all pixels")
    return out


def _task(args: tuple[str, int, str, dict, bool, int, str, bool]) -> tuple[int, str, dict, float]:
    """One (seed, arm) run in a worker process."""
    config, seed, name, over, full, rounds, tmp, dp = args
    torch.set_num_threads(1)
    base = parse_model(ScenarioConfig, yaml.safe_load(Path(config).read_text()))
    scenario = base.model_copy(update={"seed": seed})
    if full:
        scenario = full_mask_variant(scenario)
    t0 = time.perf_counter()
    res = federate(scenario, over, Path(tmp) / f"s{seed}-{name}", rounds, dp)
    return seed, name, res, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "simulations" / "configs" / "mixed_regime.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--rounds", type=int, default=None, help="default: the scenario's")
    ap.add_argument("--full", action="store_true", help="also the arm with every site given full masks")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel (one core each)")
    ap.add_argument("--dp", choices=["on", "off"], default="off",
                    help="on: every site trains under DP-SGD at the scenario's privacy settings")
    ap.add_argument("--variants", nargs="+", default=["committed={}"],
                    help="NAME='{JSON weak options}', applied on top of the scenario's train.weak")
    args = ap.parse_args()
    variants: dict[str, dict] = {}
    for v in args.variants:
        name, sep, js = v.partition("=")
        try:
            variants[name] = json.loads(js) if sep else {}
        except json.JSONDecodeError as exc:
            raise SystemExit(f"--variants {v!r}: not NAME='{{JSON}}' ({exc}); "
                             "fix: e.g. blob='{\"bg_blob\": 0.5}'") from exc
    base = parse_model(ScenarioConfig, yaml.safe_load(Path(args.config).read_text()))
    for name, over in variants.items():  # refuse a bad variant before any run starts
        try:
            parse_model(WeakConfig, {**base.train.weak.model_dump(), **over})
        except ConfigError as exc:
            raise SystemExit(f"--variants {name}: {exc}") from exc
    rounds = args.rounds or base.rounds
    image_ids = [s.id for s in base.sites if s.label_regime == LabelRegime.IMAGE]
    arms = list(variants.items()) + ([("full masks", {})] if args.full else [])
    print(f"scenario {args.config}: 2D sites only, DP {args.dp}, FedAvgM in-process, {rounds} rounds, "
          f"seeds {args.seeds}; image-level sites {image_ids}", flush=True)
    results: dict[tuple[int, str], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tasks = [(args.config, seed, name, over, name == "full masks", rounds, tmp, args.dp == "on")
                 for seed in args.seeds for name, over in arms]
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(args.jobs) as pool:
            for seed, name, res, wall in pool.imap_unordered(_task, tasks):
                results[seed, name] = res
                dice = " / ".join(f"{d:.3f}" for d in res["dice"].values())
                eps = max((e for e in res["epsilon"].values() if e is not None), default=None)
                print(f"seed {seed} {name:12s} round {res['round']:2d} test Dice {dice} ({wall:.0f} s"
                      + (f", max epsilon {eps:.2f})" if eps is not None else ")"), flush=True)
                print("    validation Dice by round " + " ".join(f"{v:.2f}" for v in res["val"])
                      + ("; gate open in rounds " + str([i + 1 for i, o in enumerate(res["gate"]) if o])
                         if res["gate"] else ""), flush=True)
                for sid, les in res["lesions"].items():
                    print(f"    {sid:20s} {les}", flush=True)
    print(f"\nmean over seeds {args.seeds} of the image-level sites' test Dice "
          f"({', '.join(image_ids)}), and of the difference to the first variant (+- SE):")
    first = next(iter(variants))
    for name, _ in arms:
        per = np.array([[results[s, name]["dice"][i] for i in image_ids] for s in args.seeds])
        line = f"  {name:12s} " + " / ".join(f"{m:.3f}" for m in per.mean(axis=0))
        if name != first and name != "full masks":
            ref = np.array([[results[s, first]["dice"][i] for i in image_ids] for s in args.seeds])
            d = (per - ref).mean(axis=1)
            se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
            line += f"   vs {first}: {d.mean():+.3f} +- {se:.3f}"
        if args.full:
            full = np.array([[results[s, "full masks"]["dice"][i] for i in image_ids] for s in args.seeds])
            line += "   weak / full " + " / ".join(f"{r:.2f}" for r in (per / full).mean(axis=0))
        print(line)


if __name__ == "__main__":
    main()
