"""Shared by the benchmark scripts (run as scripts: their folder is on sys.path)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]


def run_scenario(cfg: dict, out: Path, dp: str) -> tuple[dict, float]:
    """``medseg simulate`` one scenario dict in its own process; (summary, wall seconds)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "scenario.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "simulations.cli", "simulate", "--config", str(path),
                    "--out", str(out), "--dp", dp], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text()), time.perf_counter() - t0


def run_site_models(run: Path, rnd: int | None = None) -> Iterator[tuple[Any, Any, Any, int]]:
    """Every site of a finished ``medseg simulate`` run (``RUN_DIR``, or its
    ``full-masks/`` arm) with the global model of round ``rnd`` (None: the
    run's selected round), merged with that site's private adaptation layers
    of the round where the run has them, as the run scored it.

    Yields ``(scenario, site session, model in eval mode, round)``; the model
    object is reused from site to site.
    """
    from medseg_core.checkpoint import load_checkpoint
    from medseg_core.config import ScenarioConfig, parse_model
    from medseg_core.sites import materialise_site
    from medseg_core.training.session import build_segmenter, load_state
    from medseg_core.training.site import SiteSession

    scenario = parse_model(ScenarioConfig, json.loads((run / "scenario.json").read_text()))
    federated = json.loads((run / "summary.json").read_text())["federated"]
    rnd = rnd or federated["selected_round"]
    model = build_segmenter(scenario.model, scenario.data)
    defaults = {k: v.numpy() for k, v in model.state_dict().items()}
    arrays = load_checkpoint(run / "server" / "checkpoints" / f"round_{rnd:04d}").arrays
    for spec in scenario.sites:
        sess = SiteSession(materialise_site(spec, scenario, run),
                           model_cfg=scenario.model, data_cfg=scenario.data)
        shared = {**{k: v for k, v in defaults.items() if k not in sess.local_keys}, **arrays}
        load_state(model, sess.full_state(shared, federated["run_id"], rnd))
        model.eval()
        yield scenario, sess, model, rnd


def bag_gate_keep(scenario: Any, sess: Any, model: Any, data: Any) -> Any:
    """Which of ``data``'s cases the run's bag gate keeps, as the run scored
    them (``evaluation.bag_gate``, with the MIL head ``evaluation.mil_head``
    names); None where there is no gate (or not a bag site)."""
    from medseg_core.weak.bag_scores import bag_probabilities

    if not (scenario.evaluation.bag_gate and sess.is_bag_site):
        return None
    mode = scenario.evaluation.mil_head
    head = sess.site_mil_head(model, mode) if mode != "federated" else None
    return bag_probabilities(model, data.images, data.case_index, head=head) >= 0.5
