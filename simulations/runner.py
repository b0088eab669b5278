"""``medseg simulate``: a whole federation on Flower's simulation engine.

The same ServerApp and ClientApp a deployment uses run here on virtual
SuperNodes (Ray backend), one per scenario site. With ``baselines=True`` the
pooled and local-only arms are trained at equal compute afterwards and all
three land in ``summary.json``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medseg_core.config import LabelRegime, ScenarioConfig, SyntheticSiteSpec
from medseg_core.sites import materialise_sites

__all__ = ["SimulationOptions", "quick_variant", "run_simulate", "set_flower_env"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimulationOptions:
    """Options of one ``medseg simulate`` invocation."""

    out_dir: Path
    baselines: bool = False
    quick: bool = False
    dp: bool | None = None  # None: as the scenario says
    verbose: bool = False
    compare: bool = False  # also run every synthetic site with full masks


def quick_variant(scenario: ScenarioConfig) -> ScenarioConfig:
    """A smaller version of ``scenario`` for smoke runs (``--quick``)."""
    sites = tuple(
        s.model_copy(update={"n_train": min(s.n_train, 16), "n_test": min(s.n_test, 6)})
        if isinstance(s, SyntheticSiteSpec) else s
        for s in scenario.sites
    )
    return scenario.model_copy(update={
        "rounds": min(scenario.rounds, 2),
        "sites": sites,
        "train": scenario.train.model_copy(update={"local_epochs": 1}),
    })


def set_flower_env(flwr_home: Path) -> dict[str, str | None]:
    """Private Flower/Ray settings for one run; returns the previous values."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="msray"))  # short: Ray's socket paths are length-limited
    new = {
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_HOME": str(flwr_home),
        "RAY_TMPDIR": str(ray_tmp),
        "RAY_DEDUP_LOGS": "0",
        "OMP_NUM_THREADS": "1",
        "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    }
    old = {k: os.environ.get(k) for k in new}
    os.environ.update(new)
    return old


def _restore_env(old: dict[str, str | None]) -> None:
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def run_simulate(scenario: ScenarioConfig, opts: SimulationOptions) -> dict[str, Any]:
    """Run the federation (and optionally the baselines); write ``summary.json``.

    Returns
    -------
    dict
        The summary, as written to ``opts.out_dir / "summary.json"``.
    """
    from flwr.simulation import run_simulation  # deferred: heavy import

    from client.app import build_client_app
    from server.app import build_server_app
    from server.federation import initial_state

    run = scenario.for_privacy(opts.dp)  # without DP, with the scenario's without_dp settings
    applied = None if run.privacy.enabled else scenario.without_dp
    scenario = run
    if opts.quick:
        scenario = quick_variant(scenario)
    out = opts.out_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "scenario.json").write_text(scenario.model_dump_json(indent=2), encoding="utf-8")
    t0 = time.perf_counter()
    sites = materialise_sites(scenario, out, dp_enabled=opts.dp)
    for s in sites:  # a fresh run starts with fresh site state
        shutil.rmtree(s.state_dir, ignore_errors=True)
    dp = sites[0].dp_enabled
    site_map = {i: str(out / "sites" / s.id / "site.yaml") for i, s in enumerate(sites)}
    run_id = f"{scenario.name}-{int(time.time())}"

    old = set_flower_env(out / "flwr-home")
    try:
        run_simulation(
            server_app=build_server_app(scenario, out / "server", run_id=run_id),
            client_app=build_client_app(site_map),
            num_supernodes=len(sites),
            backend_config={
                "client_resources": {
                    "num_cpus": scenario.simulation.num_cpus_per_client, "num_gpus": 0.0,
                },
                "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False},
            },
            verbose_logging=opts.verbose,
        )
    finally:
        ray_tmp = os.environ["RAY_TMPDIR"]
        _restore_env(old)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    fed_path = out / "server" / "federated.json"
    if not fed_path.is_file():
        raise RuntimeError(
            f"the federation did not finish: {fed_path} is missing; see the Flower log above"
        )
    fed = json.loads(fed_path.read_text(encoding="utf-8"))
    fed_seconds = time.perf_counter() - t0

    summary: dict[str, Any] = {
        "rounds": scenario.rounds,
        "sites": [s.id for s in sites],
        "dp": dp,
        "epsilon_cap": {s.id: s.epsilon for s in sites} if dp else None,
        "delta": scenario.privacy.delta if dp else None,
        "strategy": scenario.strategy.name.value,
        "adaptation": scenario.model.adaptation.value,
        "without_dp": applied,  # the scenario's without_dp settings this run merged in
        "federated": {
            "dice_mean": fed["dice_mean"],
            "per_site": {
                sid: {"dice": r["dice"], "epsilon": r["epsilon"], "n_train": r["n_train"],
                      "hd95": r["hd95"], "label_regime": r["label_regime"],
                      **({"bag_auc": r["bag_auc"]} if r.get("bag_auc") is not None else {}),
                      **({"mil_auc": r["mil_auc"]} if r.get("mil_auc") is not None else {}),
                      **({"threshold": r["threshold"]} if r.get("threshold") is not None else {}),
                      "dice_empty_baseline": r.get("dice_empty_baseline"),
                      "dice_se": r.get("dice_se"),
                      **({"dice_global": r.get("dice_global"), "personalized": r["personalized"],
                          "personalization": r["personalization"]}
                         if r.get("personalization") is not None else {})}
                for sid, r in fed["sites"].items()
            },
            "rejected_updates": fed["rejected"],
            "selected_round": fed["selected_round"],
            "checkpoint": fed["checkpoint"],
            "run_id": run_id,
            "wall_seconds": fed_seconds,
        },
        "pooled": None,
        "local": None,
    }
    if opts.baselines:
        from simulations.baselines import plain_scenario, run_local, run_pooled

        init = initial_state(plain_scenario(scenario))
        pooled = run_pooled(scenario, sites, init, dp=dp)
        local = run_local(scenario, sites, init, dp=dp)
        summary["pooled"] = {"dice_mean": pooled.dice_mean, "per_site": pooled.per_site}
        summary["local"] = {"dice_mean": local.dice_mean, "per_site": local.per_site}
    if opts.compare:
        summary["compare"] = _compare_full_masks(scenario, summary, out, dp=dp, verbose=opts.verbose)
    summary["wall_seconds"] = time.perf_counter() - t0
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary


def full_mask_variant(scenario: ScenarioConfig) -> ScenarioConfig:
    """``scenario`` with every synthetic site given full masks (same seed,
    so the same images, lesions and test cases)."""
    sites = tuple(
        s.model_copy(update={"label_regime": LabelRegime.MASK}) if isinstance(s, SyntheticSiteSpec)
        else s
        for s in scenario.sites
    )
    return scenario.model_copy(update={"sites": sites, "name": f"{scenario.name}-full-masks"})


def _compare_full_masks(
    scenario: ScenarioConfig, summary: dict[str, Any], out: Path, *, dp: bool, verbose: bool
) -> dict[str, Any]:
    """Run the full-mask variant (own process: a clean Ray) and compare per site."""
    import subprocess
    import sys

    import yaml

    sub = out / "full-masks"
    sub.mkdir(parents=True, exist_ok=True)
    cfg = sub / "scenario.yaml"
    cfg.write_text(yaml.safe_dump(json.loads(full_mask_variant(scenario).model_dump_json())),
                   encoding="utf-8")
    cmd = [sys.executable, "-m", "simulations.cli"] + (["-v"] if verbose else []) + [
        "simulate", "--config", str(cfg), "--out", str(sub), "--dp", "on" if dp else "off"]
    logger.info("--compare: the same scenario with full masks -> %s", sub)
    subprocess.run(cmd, check=True)
    full = json.loads((sub / "summary.json").read_text(encoding="utf-8"))
    weak_sites = [
        s.id for s in scenario.sites
        if isinstance(s, SyntheticSiteSpec) and s.label_regime != LabelRegime.MASK
    ]
    ratios = {}
    for sid in weak_sites:
        w = summary["federated"]["per_site"].get(sid, {}).get("dice")
        f = full["federated"]["per_site"].get(sid, {}).get("dice")
        ratios[sid] = (w / f) if w is not None and f else None
    valid = [r for r in ratios.values() if r is not None]
    return {
        "full_masks": {"dice_mean": full["federated"]["dice_mean"],
                       "per_site": full["federated"]["per_site"]},
        "weak_sites": weak_sites,
        "weak_over_full": ratios,
        "weak_over_full_mean": (sum(valid) / len(valid)) if valid else None,
    }


def format_table(summary: dict[str, Any]) -> str:
    """The per-site table printed at the end of ``medseg simulate``."""
    arms = [a for a in ("federated", "pooled", "local") if summary.get(a)]
    head = f"{'site':<14}{'n_train':>8}" + "".join(f"{a + ' dice':>20}" for a in arms) + f"{'epsilon':>10}"
    lines = [head, "-" * len(head)]
    for sid in summary["sites"]:
        fed = summary["federated"]["per_site"].get(sid, {})
        row = f"{sid:<14}{fed.get('n_train') or 0:>8}"
        for a in arms:
            v = summary[a]["per_site"].get(sid, {})
            d, se = v.get("dice"), v.get("dice_se")
            cell = "-" if d is None else f"{d:.4f}" + (f" ± {se:.3f}" if se is not None else "")
            row += f"{cell:>20}"
        eps = fed.get("epsilon")
        row += f"{eps:>10.3f}" if eps is not None else f"{'off':>10}"
        lines.append(row)
    mean = f"{'mean':<14}{'':>8}"
    for a in arms:
        d = summary[a]["dice_mean"]
        mean += f"{d:>20.4f}" if d is not None else f"{'-':>20}"
    lines += ["-" * len(head), mean, "(± : standard error of the site's Dice over its test cases)"]
    if summary.get("pooled") and summary["federated"]["dice_mean"]:
        lines.append(
            f"federated / pooled Dice = {summary['federated']['dice_mean'] / summary['pooled']['dice_mean']:.3f}"
        )
    for sid in summary["sites"]:
        fed = summary["federated"]["per_site"].get(sid, {})
        if fed.get("mil_auc") is not None:
            dec = fed.get("bag_auc")
            lines.append(f"{sid}: bag-level AUC of the MIL head {fed['mil_auc']:.3f} (the "
                         f"decoder's maximum: {'-' if dec is None else f'{dec:.3f}'})")
    for sid in summary["sites"]:
        fed = summary["federated"]["per_site"].get(sid, {})
        rep = fed.get("personalization")
        if rep is None:
            continue
        if "error" in rep:
            lines.append(f"{sid}: not personalised ({rep['error']}); its Dice is the federated one")
            continue
        g = fed.get("dice_global")
        every = rep.get("layers") == "all"
        lines.append(f"{sid}: personalised {'every weight' if every else 'private layers'} (epoch "
                     f"{rep['epochs_kept']} kept; local val Dice {rep['val_dice_before']:.4f} -> "
                     f"{rep['val_dice_after']:.4f}); test Dice of the "
                     f"{'global model' if every else 'layers as federated'} "
                     f"{'-' if g is None else f'{g:.4f}'}")
    cmp = summary.get("compare")
    if cmp:
        for sid, r in cmp["weak_over_full"].items():
            full = cmp["full_masks"]["per_site"].get(sid, {}).get("dice")
            empty = summary["federated"]["per_site"].get(sid, {}).get("dice_empty_baseline")
            lines.append(f"{sid}: weak-label Dice / full-mask Dice = "
                         f"{'-' if r is None else f'{r:.3f}'} (full masks: "
                         f"{'-' if full is None else f'{full:.4f}'}; an all-background "
                         f"prediction would score {'-' if empty is None else f'{empty:.3f}'})")
    lines.append(f"wall time {summary['wall_seconds']:.1f} s")
    return "\n".join(lines)
