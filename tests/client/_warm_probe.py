"""A task body for the warm-executor tests: records what its process started with."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def probe(runtime_api_address: str, token: str, parent_pid: int) -> None:
    out = Path(os.environ["MEDSEG_WARM_PROBE_DIR"]) / f"{token}.json"
    out.write_text(json.dumps({"pid": os.getpid(), "ppid": os.getppid(), "parent_pid": parent_pid,
                               "address": runtime_api_address,
                               "modules": sorted(m for m in ("json", "colorsys", "wave") if m in sys.modules)}))
