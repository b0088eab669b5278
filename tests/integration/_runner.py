"""Shared runner for the integration tests: the real `medseg simulate` CLI in
a subprocess (its own Ray, private FLWR_HOME and RAY_TMPDIR)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A TCP port nothing listens on at 127.0.0.1 (for a SuperLink or SuperNode)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def simulate(tmp_path: Path, scenario_text: str, *extra: str) -> tuple[Path, dict[str, Any], str]:
    """Run ``medseg simulate`` on a scenario; returns (out dir, summary, stdout)."""
    cfg = tmp_path / "scenario.yaml"
    cfg.write_text(scenario_text)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "simulations.cli", "simulate", "--config", str(cfg),
         "--out", str(out), *extra],
        capture_output=True, text=True, timeout=1200, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, json.loads((out / "summary.json").read_text()), proc.stdout
