"""Hospital deployment on Flower's deployment engine, as processes on 127.0.0.1.

`medseg certs` -> `medseg server` (SuperLink with TLS + SuperNode
authentication) -> `medseg nodes add` -> `medseg client` per site, the same
ServerApp/ClientApp as simulation. Every process is started here and stopped
by PID (its process group).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _runner import free_port

from medseg_core.config import load_scenario, load_site_config
from medseg_core.sites import materialise_site
from medseg_core.store import RunStore

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCENARIO = """
name: deploy2x2
seed: 5
rounds: 2
sites:
  - {id: site-a, n_train: 8, n_test: 3}
  - {id: site-b, n_train: 8, n_test: 3, shift: {gamma: 1.2}}
model: {channels: [8, 16], strides: [2], norm_groups: 4}
data: {image_size: 32, val_fraction: 0.25}
train: {local_epochs: 1, batch_size: 4, lr: 0.01}
privacy: {enabled: true, epsilon: 8.0}
strategy: {round_timeout_s: 300}
"""


def _medseg(*args: str) -> list[str]:
    return [sys.executable, "-m", "simulations.cli", *args]


def _wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(port)


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


class _Deployment:
    """Certificates, hospitals' sites, and the processes of one federation on 127.0.0.1."""

    def __init__(self, tmp: Path, scenario_text: str, extra_nodes: tuple[str, ...] = ()) -> None:
        self.tmp, self.cfg = tmp, tmp / "run.yaml"
        self.cfg.write_text(scenario_text)
        scenario = load_scenario(self.cfg)
        self.site_yaml: dict[str, Path] = {}
        for spec in scenario.sites:  # each hospital's own data and private site.yaml
            materialise_site(spec, scenario, tmp / "hospitals")
            self.site_yaml[spec.id] = tmp / "hospitals" / "sites" / spec.id / "site.yaml"
        self.certs = tmp / "certs"
        nodes = [a for sid in (*self.site_yaml, *extra_nodes) for a in ("--node", sid)]
        subprocess.run(_medseg("certs", "--out", str(self.certs), "--san", "127.0.0.1", *nodes),
                       check=True, env=ENV)
        self.port, self.work = free_port(), tmp / "server"
        self.procs: list[subprocess.Popen] = []
        self.server_cmd = _medseg("server", "--config", str(self.cfg), "--certs", str(self.certs),
                                  "--port", str(self.port), "--workdir", str(self.work),
                                  "--wait", "300")

    def spawn(self, cmd: list[str], log: str) -> subprocess.Popen:
        fh = open(self.tmp / log, "ab")  # noqa: SIM115 - owned by the child
        p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=ENV,
                             start_new_session=True)
        self.procs.append(p)
        return p

    def start_server(self, *extra: str, log: str = "server.log") -> subprocess.Popen:
        return self.spawn(self.server_cmd + list(extra), log)

    def register(self) -> None:
        _wait_port(self.port)
        time.sleep(2)  # the connection file is written right after the port opens
        for sid in self.site_yaml:
            subprocess.run(_medseg("nodes", "add", str(self.certs / "nodes" / f"{sid}.pub"),
                                   "--workdir", str(self.work)), check=True, env=ENV, timeout=120)

    def client(self, site: str, key: str | None, log: str, *, insecure: bool = False,
               cold: bool = False) -> subprocess.Popen:
        cmd = ["client", "--site", str(self.site_yaml[site]), "--server", f"127.0.0.1:{self.port}",
               "--port", str(free_port()), "--state", str(self.tmp / f"{log}-home")]
        cmd += ["--cold"] if cold else []
        cmd += ["--insecure"] if insecure else ["--ca", str(self.certs / "ca.crt")]
        if key is not None:
            cmd += ["--key", str(self.certs / "nodes" / key)]
        return self.spawn(_medseg(*cmd), log)

    def log(self, name: str) -> str:
        return (self.tmp / name).read_text(errors="replace")

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            _stop(p)
        try:
            os.killpg(int((self.work / "superlink.pid").read_text()), signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError, ValueError):
            pass


def test_tls_federation_with_registered_nodes(tmp_path: Path) -> None:
    d = _Deployment(tmp_path, SCENARIO, extra_nodes=("intruder",))
    try:
        server = d.start_server()
        d.register()
        d.client("site-a", "intruder", "intruder.log")  # a key nobody registered
        d.client("site-b", None, "notls.log", insecure=True)  # no TLS
        d.client("site-a", "site-a", "site-a.log")
        d.client("site-b", "site-b", "site-b.log", cold=True)  # Flower's default isolation
        rc = server.wait(timeout=900)
        work = d.work
        assert rc == 0, d.log("server.log")[-3000:] + (work / "run.log").read_text(
            errors="replace")[-3000:]
        fed = json.loads((work / "server" / "federated.json").read_text())
        assert set(fed["sites"]) == {"site-a", "site-b"}
        for r in fed["sites"].values():
            assert 0.0 <= r["dice"] <= 1.0 and 0.0 < r["epsilon"] <= 8.0 + 1e-6
        with RunStore(work / "server" / "runstore.sqlite") as store:
            rounds = store.rounds(fed["run_id"])
            assert [r["round"] for r in rounds] == [1, 2]
            assert all(r["n_accepted"] == 2 for r in rounds)
        # the site configs never left the sites: the server's files do not name them
        server_text = "".join(p.read_text(errors="replace") for p in work.rglob("*.json"))
        assert str(d.site_yaml["site-a"].parent) not in server_text
        # an unregistered key and a node without TLS never joined
        intruder_log, notls_log = d.log("intruder.log"), d.log("notls.log")
        assert "SuperNode ID" not in intruder_log, intruder_log[-2000:]
        assert "Failed to activate SuperNode" in intruder_log, intruder_log[-2000:]
        assert "SuperNode ID" not in notls_log, notls_log[-2000:]
        assert "Connection attempt failed" in notls_log, notls_log[-2000:]
        # site-a: every message ran in a task process forked from the warm executor,
        # torch preloaded; site-b (--cold): in a fresh flwr-clientapp process each
        text = d.log("site-a.log")
        tasks = re.findall(r"\[medseg warm\] task process (\d+) preloaded: (.*)", text)
        replies = re.findall(r"Sending: (train|evaluate) message", text)
        # 2 rounds x (train + validation) + the final test evaluation
        assert len(tasks) == len(replies) == 5, text[-3000:]
        assert len({pid for pid, _ in tasks}) == 5  # a fresh process per message
        assert all("torch" in libs and "opacus" in libs for _, libs in tasks)
        text = d.log("site-b.log")
        assert "[medseg warm]" not in text, text[-3000:]
        assert "[medseg supernode] Flower SuperNode, replies paired" in text, text[:2000]
        assert len(re.findall(r"Start `flwr-clientapp` process", text)) == 5, text[-3000:]
        assert len(re.findall(r"Sending: (train|evaluate) message", text)) == 5, text[-3000:]
    finally:
        d.stop_all()


def _ledger_rows(db: Path) -> list[tuple]:
    import sqlite3

    with sqlite3.connect(db) as c:
        return sorted(c.execute("SELECT run_id, site_id, round, epsilon FROM privacy_ledger"))


def test_kill_9_server_and_resume(tmp_path: Path) -> None:
    """kill -9 the server mid-run; `medseg server --resume` finishes the same run."""
    d = _Deployment(tmp_path, SCENARIO.replace("rounds: 2", "rounds: 3"))
    work = d.work
    try:
        server = d.start_server()
        d.register()
        # site-a on the warm executor, site-b on Flower's (--cold). Either SuperNode may
        # pull the killed run's queued message just as the restarted SuperLink marks that
        # run finished; Flower's loop then sent every later reply one message late and the
        # resumed run timed out (1 run in 4, both executors); client.supernode pairs them.
        d.client("site-a", "site-a", "site-a.log")
        d.client("site-b", "site-b", "site-b.log", cold=True)
        first = work / "server" / "checkpoints" / "round_0001"
        deadline = time.monotonic() + 600
        while not (first / "meta.json").is_file():
            assert server.poll() is None, d.log("server.log")[-3000:]
            assert time.monotonic() < deadline, "round 1 never completed"
            time.sleep(0.5)
        # kill -9 the aggregator: medseg server, the SuperLink and the ServerApp under it
        link_pid = int((work / "superlink.pid").read_text())
        for pgid in (server.pid, link_pid):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        server.wait(timeout=30)
        db = work / "server" / "runstore.sqlite"
        before = _ledger_rows(db)
        run_name = (work / "run-name").read_text().strip()
        assert before and {r[0] for r in before} == {run_name}
        assert max(r[2] for r in before) in (1, 2)  # killed mid-run

        resumed = d.start_server("--resume", log="server-resumed.log")
        rc = resumed.wait(timeout=900)
        assert rc == 0, d.log("server-resumed.log")[-3000:] + (work / "run.log").read_text(
            errors="replace")[-3000:]
        after = _ledger_rows(db)
        assert set(before) <= set(after)  # nothing lost, nothing rewritten
        keys = [(r[1], r[2]) for r in after]
        assert len(keys) == len(set(keys)) == 2 * 3  # one row per site and round, none twice
        fed = json.loads((work / "server" / "federated.json").read_text())
        assert fed["run_id"] == run_name and set(fed["sites"]) == {"site-a", "site-b"}
        with RunStore(db) as store:
            assert [r["round"] for r in store.rounds(run_name)] == [1, 2, 3]
            assert all(r["finished_at"] is not None for r in store.rounds(run_name))
            # both sites in every round (the dead Flower run, if the SuperLink still held
            # it as running, was stopped first with its queued messages)
            assert all(r["n_accepted"] == 2 for r in store.rounds(run_name))
        # each site's epsilon only grew, across the crash (its own accountant)
        for sid in ("site-a", "site-b"):
            eps = [r[3] for r in after if r[1] == sid]
            assert eps == sorted(eps)
            assert "[medseg supernode] Flower SuperNode, replies paired" in d.log(f"{sid}.log")
    finally:
        d.stop_all()


def test_site_killed_mid_run_rejoins_with_its_accountant(tmp_path: Path) -> None:
    """kill -9 one hospital after round 1: round 2 goes on without it; restarted
    on the same state it rejoins, and its epsilon never goes down."""
    text = SCENARIO.replace("rounds: 2", "rounds: 4").replace(
        "strategy: {round_timeout_s: 300}", "strategy: {round_timeout_s: 40, min_train_nodes: 1}")
    d = _Deployment(tmp_path, text)
    ck = d.work / "server" / "checkpoints"
    site_state = load_site_config(d.site_yaml["site-b"]).state_dir

    def wait_round(rnd: int, server: subprocess.Popen) -> None:
        deadline = time.monotonic() + 600
        while not (ck / f"round_{rnd:04d}" / "meta.json").is_file():
            assert server.poll() is None, d.log("server.log")[-3000:]
            assert time.monotonic() < deadline, f"round {rnd} never completed"
            time.sleep(0.5)

    try:
        server = d.start_server()
        d.register()
        d.client("site-a", "site-a", "site-a.log")
        site_b = d.client("site-b", "site-b", "site-b.log")
        wait_round(1, server)
        os.killpg(site_b.pid, signal.SIGKILL)  # SuperNode, warm executor and its task processes
        site_b.wait(timeout=30)
        eps_before = _site_epsilon(site_state)
        wait_round(2, server)  # closes after the round timeout, with site-a alone
        d.client("site-b", "site-b", "site-b.log")  # same key, site.yaml and state
        rc = server.wait(timeout=900)
        assert rc == 0, d.log("server.log")[-3000:] + (d.work / "run.log").read_text(
            errors="replace")[-3000:]
        fed = json.loads((d.work / "server" / "federated.json").read_text())
        with RunStore(d.work / "server" / "runstore.sqlite") as store:
            rounds = {r["round"]: r for r in store.rounds(fed["run_id"])}
            assert sorted(rounds) == [1, 2, 3, 4]
            assert rounds[1]["n_accepted"] == 2 and rounds[2]["n_accepted"] == 1
            trained = {(r["site_id"], r["round"]) for r in store.site_metrics(fed["run_id"], phase="train")}
            # a message site-b never got is recorded against site-b, not the SuperLink's node id
            missed = {(r["site_id"], r["round"]) for r in store.rejections(fed["run_id"])}
        assert {("site-b", 2), ("site-b", 3)} & missed and {s for s, _ in missed} == {"site-b"}, missed
        assert ("site-b", 2) not in trained
        assert {("site-b", 3), ("site-b", 4)} & trained, sorted(trained)  # back after the restart
        eps = [r[3] for r in _ledger_rows(d.work / "server" / "runstore.sqlite") if r[1] == "site-b"]
        assert len(eps) >= 2 and eps == sorted(eps) and eps[-1] > eps[0]
        assert _site_epsilon(site_state) > eps_before  # its own accountant resumed, not reset
    finally:
        d.stop_all()


def _site_epsilon(state_dir: Path) -> float:
    """The epsilon a site's own ledger (state_dir/ledger.jsonl) says it has spent."""
    ledger = Path(state_dir) / "ledger.jsonl"
    if not ledger.is_file():
        return 0.0
    return max((json.loads(line)["epsilon_after"] for line in ledger.read_text().splitlines()
                if line.strip()), default=0.0)
