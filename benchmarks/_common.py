"""Shared by the benchmark scripts (run as scripts: their folder is on sys.path)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

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
