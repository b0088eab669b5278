"""`medseg server --resume` stops the interrupted Flower run on a real SuperLink,
including when the SuperLink finishes it itself between listing and stopping."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from _runner import free_port

from server import deploy

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCENARIO = """
name: stopme
seed: 5
rounds: 2
sites:
  - {id: site-a, n_train: 8, n_test: 3}
  - {id: site-b, n_train: 8, n_test: 3}
model: {channels: [8, 16], strides: [2], norm_groups: 4}
data: {image_size: 32, val_fraction: 0.25}
train: {local_epochs: 1, batch_size: 4, lr: 0.01}
privacy: {enabled: false}
strategy: {round_timeout_s: 300}
"""


def test_stop_unfinished_runs_on_a_live_superlink(tmp_path: Path, monkeypatch) -> None:
    home, port = tmp_path / "flwr-home", free_port()
    cfg = tmp_path / "run.yaml"
    cfg.write_text(SCENARIO)
    link = deploy.start_superlink(None, port=port, flwr_home=home, log=tmp_path / "superlink.log",
                                  database=tmp_path / "superlink.db", insecure=True,
                                  node_auth=False)
    try:
        deploy.wait_for_port(port, timeout=60, proc=link.popen)
        deploy.write_connection(home, f"127.0.0.1:{port}", None)
        # a run whose ServerApp waits for sites that never come: the aggregator's dead run
        run_config = f'scenario="{cfg}" workdir="{tmp_path / "work"}" run-name="stopme"'
        deploy._flwr(["run", str(deploy.PROJECT_ROOT), deploy.CONNECTION, "--run-config",
                      run_config], home)
        deadline = time.monotonic() + 60
        while not deploy.run_statuses(home) and time.monotonic() < deadline:
            time.sleep(1)
        ((run_id, status),) = deploy.run_statuses(home).items()
        assert not status.startswith("finished"), status

        assert deploy.stop_unfinished_runs(home) == [run_id]
        assert deploy.run_statuses(home)[run_id].startswith("finished")
        assert deploy.stop_unfinished_runs(home) == []  # a finished run is left alone

        # the race: `flwr ls` still shows it running, `flwr stop` finds it finished
        listed = {"runs": [{"run-id": run_id, "status": "running"}]}
        real = deploy._flwr_json
        monkeypatch.setattr(deploy, "_flwr_json",
                            lambda args, h: listed if args[0] == "ls" else real(args, h))
        assert deploy.stop_unfinished_runs(home) == []
        # any other failure of `flwr stop` is still an error
        listed["runs"][0]["run-id"] = "12345"
        with pytest.raises(deploy.ConfigError, match="flwr stop 12345"):
            deploy.stop_unfinished_runs(home)
    finally:
        deploy.stop(link)  # the SuperLink and the ServerApp it started (its process group)
