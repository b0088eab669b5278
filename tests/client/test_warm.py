"""The warm ClientApp executor: preloaded fork server, one fresh process per task.

The whole path (SuperNode in process isolation + this executor running
Flower's ``run_clientapp`` over TLS) is driven end to end by
``tests/integration/test_deployment.py``; these tests pin the executor's own
contract.
"""

from __future__ import annotations

import json
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from client import warm


@dataclass
class _Spec:  # the fields of Flower's ExecutionSpec the executor reads
    task_id: int
    token: str
    runtime_api_address: str = "127.0.0.1:1"


def test_secret_is_private_and_fresh(tmp_path: Path) -> None:
    a = warm.write_secret(tmp_path / "s" / "secret")
    assert stat.S_IMODE((tmp_path / "s" / "secret").stat().st_mode) == 0o600
    assert len(a) == 32 and (tmp_path / "s" / "secret").read_bytes() == a
    assert warm.write_secret(tmp_path / "s" / "secret") != a


def test_each_task_is_a_fresh_process_forked_with_the_preload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    monkeypatch.setenv("MEDSEG_WARM_PROBE_DIR", str(tmp_path))
    from _warm_probe import probe

    ex = warm.ForkServerExecutor(preload=["colorsys", "_warm_probe"], target=probe)
    try:
        for i in (1, 2):
            assert str(ex.launch(_Spec(task_id=i, token=f"t{i}")).status) == "accepted"
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"t{i}.json").is_file() for i in (1, 2)):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(0.5)
        ex.reconcile()
        assert ex.launched == 2 and not ex._running  # both reaped
    finally:
        ex.close()
    seen = [json.loads((tmp_path / f"t{i}.json").read_text()) for i in (1, 2)]
    assert seen[0]["pid"] != seen[1]["pid"] and os.getpid() not in {s["pid"] for s in seen}
    assert all(s["parent_pid"] == os.getpid() for s in seen)  # tasks watch the executor
    assert all(s["ppid"] == seen[0]["ppid"] != os.getpid() for s in seen)  # forked by one server
    assert all(s["modules"] == ["colorsys", "json"] for s in seen)  # preloaded there; "wave" never
