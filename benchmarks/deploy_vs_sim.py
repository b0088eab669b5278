"""Round time on Flower's deployment engine against its simulation engine.

Runs one scenario (default: the quick one, 2 sites x 2 rounds) twice, back
to back on this machine: ``medseg simulate`` (Ray) and a real deployment on
127.0.0.1 (``medseg certs`` -> ``medseg server`` with TLS + SuperNode
authentication -> ``medseg nodes add`` -> one ``medseg client`` per site).
The deployment runs twice: with Flower's default isolation (``medseg client
--cold``: a fresh ``flwr-clientapp`` process, cold torch import, per message)
and with medseg's warm fork-server executor (the default). Prints the
server's federation loop time (rounds + evaluations, from
``federated.json``) for each, the ratios to simulation and warm / cold, plus
the end-to-end wall time including process start-up.

    .venv/bin/python benchmarks/deploy_vs_sim.py [--config simulations/configs/quick.yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medseg_core.config import load_scenario  # noqa: E402
from medseg_core.sites import materialise_site  # noqa: E402


def _medseg(*args: str) -> list[str]:
    return [sys.executable, "-m", "simulations.cli", *args]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int) -> None:
    for _ in range(120):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(port)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "simulations" / "configs" / "quick.yaml"))
    ap.add_argument("--arms", nargs="+", choices=["cold", "warm"], default=["cold", "warm"],
                    help="deployments to run: Flower's default per-message ClientApp process "
                         "(cold) and medseg's warm fork-server executor (warm)")
    args = ap.parse_args()
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    tmp = Path(tempfile.mkdtemp(prefix="deploybench"))
    scenario = load_scenario(args.config)

    t0 = time.perf_counter()
    subprocess.run(_medseg("simulate", "--config", args.config, "--out", str(tmp / "sim")),
                   cwd=ROOT, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sim_total = time.perf_counter() - t0
    sim_loop = json.loads((tmp / "sim" / "server" / "federated.json").read_text())["wall_seconds"]

    sites = {}
    for spec in scenario.sites:
        materialise_site(spec, scenario, tmp / "hospitals")
        sites[spec.id] = tmp / "hospitals" / "sites" / spec.id / "site.yaml"
    certs = tmp / "certs"
    nodes = [a for sid in sites for a in ("--node", sid)]
    subprocess.run(_medseg("certs", "--out", str(certs), "--san", "127.0.0.1", *nodes),
                   check=True, env=env, stdout=subprocess.DEVNULL)
    arms = {}
    for arm in args.arms:
        arms[arm] = _deploy(args.config, tmp / arm, sites, certs, env, cold=arm == "cold")

    n = scenario.rounds
    print(f"scenario {args.config}: {len(sites)} sites x {n} rounds")
    print(f"  simulation  (Ray):                       federation loop {sim_loop:7.1f} s "
          f"({sim_loop / n:.1f} s/round), end to end {sim_total:.1f} s")
    for arm, (loop, total) in arms.items():
        label = {"cold": "deployment, Flower default (cold)", "warm": "deployment, warm executor"}[arm]
        print(f"  {label:<39}: federation loop {loop:7.1f} s ({loop / n:.1f} s/round), "
              f"end to end {total:.1f} s")
    for arm, (loop, _) in arms.items():
        print(f"  deployment ({arm}) / simulation round time: {loop / sim_loop:.2f}x")
    if {"cold", "warm"} <= set(arms):
        print(f"  warm / cold deployment round time: {arms['warm'][0] / arms['cold'][0]:.2f}x")


def _deploy(config: str, tmp: Path, sites: dict, certs: Path, env: dict, *, cold: bool,
            kill_after: int | None = None) -> tuple[float, float]:
    """One deployment on 127.0.0.1 (TLS + node auth); (federation loop s, end-to-end s).

    With ``kill_after=k`` the aggregator (``medseg server``, its SuperLink and
    ServerApp) is killed with SIGKILL as soon as round k's checkpoint exists,
    then restarted with ``--resume``; the sites keep running.
    """
    work, port = tmp / "server", _port()
    procs = []
    server_cmd = _medseg("server", "--config", config, "--certs", str(certs), "--port", str(port),
                         "--workdir", str(work))
    t0 = time.perf_counter()
    try:
        server = subprocess.Popen(server_cmd, env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)
        procs.append(server)
        _wait_port(port)
        time.sleep(2)
        for sid in sites:
            subprocess.run(_medseg("nodes", "add", str(certs / "nodes" / f"{sid}.pub"), "--workdir",
                                   str(work)), check=True, env=env, stdout=subprocess.DEVNULL)
            procs.append(subprocess.Popen(
                _medseg("client", "--site", str(sites[sid]), "--server", f"127.0.0.1:{port}",
                        "--ca", str(certs / "ca.crt"), "--key", str(certs / "nodes" / sid),
                        "--port", str(_port()), "--state", str(tmp / f"{sid}-home"),
                        *(["--cold"] if cold else [])),
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        if kill_after is not None:
            marker = work / "server" / "checkpoints" / f"round_{kill_after:04d}" / "meta.json"
            while not marker.is_file():
                if server.poll() is not None:
                    raise SystemExit(f"the run ended before round {kill_after}; see {work / 'run.log'}")
                time.sleep(0.2)
            for pgid in (server.pid, int((work / "superlink.pid").read_text())):
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            server.wait()
            server = subprocess.Popen([*server_cmd, "--resume"], env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True)
            procs.append(server)
        if server.wait(timeout=1800) != 0:
            raise SystemExit(f"deployment run failed; see {work / 'run.log'}")
        total = time.perf_counter() - t0
        loop = json.loads((work / "server" / "federated.json").read_text())["wall_seconds"]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        time.sleep(2)
    return loop, total


if __name__ == "__main__":
    main()
