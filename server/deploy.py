"""Deployment: Flower's SuperLink / SuperNode processes behind ``medseg``.

The same ServerApp and ClientApp as ``medseg simulate`` run on Flower's
deployment engine:

* :func:`start_superlink` - one HTTPS port for Fleet, Control and Runtime
  APIs, TLS from ``medseg certs`` and SuperNode authentication on by
  default; ``insecure=True`` only behind an explicit flag (logged loudly);
* :func:`write_connection` - the Flower configuration (``FLWR_HOME/
  config.toml``) that ``flwr run`` and ``flwr supernode register`` read;
* :func:`register_node` / :func:`unregister_node` - ``medseg nodes add/remove``;
* :func:`supernode_command` - what ``medseg client`` runs at a hospital:
  a SuperNode with the federation's CA, the site's private key, and the
  path of its private ``site.yaml`` in ``--node-config`` (the site config
  itself never leaves the site);
* :func:`run_federation_remote` - ``flwr run`` of this project on the SuperLink.

Every process is started with its own process group so it can be stopped,
with its children, by PID (:func:`stop`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from medseg_core.errors import ConfigError

__all__ = [
    "Proc",
    "deploy_env",
    "register_node",
    "run_statuses",
    "run_federation_remote",
    "start_superlink",
    "stop",
    "stop_unfinished_runs",
    "supernode_command",
    "unregister_node",
    "write_connection",
]

logger = logging.getLogger(__name__)

CONNECTION = "medseg"
PROJECT_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Proc:
    """A started process and its log file."""

    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:  # noqa: D102
        return self.popen.pid

    def tail(self, n: int = 40) -> str:
        """The last ``n`` lines of its log."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""


def deploy_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower's processes: private FLWR_HOME, no telemetry,
    and this interpreter's bin directory first on PATH (SuperLink starts
    ``flower-superexec`` by name)."""
    bindir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
    }


def _bin(name: str) -> str:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else (shutil.which(name) or name)


def _spawn(cmd: list[str], log: Path, env: dict[str, str]) -> Proc:
    log.parent.mkdir(parents=True, exist_ok=True)
    fh = open(log, "ab")  # noqa: SIM115 - owned by the child
    p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                         start_new_session=True)
    return Proc(p, log)


def _check_certs(*paths: Path) -> None:
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        raise ConfigError(
            f"TLS file(s) not found: {missing}; create them with `medseg certs --out DIR "
            "--san HOST` or pass --insecure (development only: traffic is not encrypted)"
        )


def start_superlink(
    certs: Path | None, *, port: int, flwr_home: Path, log: Path, database: Path,
    host: str = "127.0.0.1", insecure: bool = False, node_auth: bool = True,
) -> Proc:
    """Start a SuperLink (TLS + SuperNode authentication unless told otherwise).

    Raises
    ------
    ConfigError
        TLS requested but the certificate files are missing.
    """
    cmd = [_bin("flower-superlink"), "--host", host, "--port", str(port),
           "--database", str(database), "--disable-runtime-dependency-installation"]
    if insecure:
        logger.warning("!!! SuperLink WITHOUT TLS: model updates cross the network unencrypted. "
                       "Development only. !!!")
        cmd.append("--insecure")
    else:
        if certs is None:
            raise ConfigError("TLS needs --certs DIR (from `medseg certs`) or --insecure")
        ca, crt, key = certs / "ca.crt", certs / "server.crt", certs / "server.key"
        _check_certs(ca, crt, key)
        cmd += ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(crt), "--ssl-keyfile", str(key)]
    if node_auth:
        cmd.append("--enable-supernode-auth")
    return _spawn(cmd, log, deploy_env(flwr_home))


def write_connection(flwr_home: Path, address: str, ca_cert: Path | None) -> Path:
    """Write the SuperLink connection ``medseg`` into ``FLWR_HOME/config.toml``."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
             f'address = "{address}"']
    lines.append(f'root-certificates = "{ca_cert}"' if ca_cert else "insecure = true")
    path = flwr_home / "config.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _flwr(args: list[str], flwr_home: Path, timeout: float = 120) -> str:
    res = subprocess.run([_bin("flwr"), *args], env=deploy_env(flwr_home), capture_output=True,
                         text=True, timeout=timeout, check=False)
    out = res.stdout + res.stderr
    if res.returncode != 0:
        raise ConfigError(f"`flwr {' '.join(args)}` failed (exit {res.returncode}): {out.strip()[-800:]}")
    return out


def _flwr_json(args: list[str], flwr_home: Path) -> dict:
    """``flwr ARGS --format json``'s JSON object (the CLI may print lines before it)."""
    out = _flwr([*args, "--format", "json"], flwr_home)
    return json.loads(out[out.index("{"):])


def wait_for_port(port: int, host: str = "127.0.0.1", timeout: float = 60,
                  proc: subprocess.Popen | None = None) -> None:
    """Wait until something listens on ``host:port`` (or until ``proc``, the
    process that should open it, has exited: the caller reads its exit code)."""
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return
        with socket.socket() as s:
            s.settimeout(1)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


def register_node(public_key: Path, flwr_home: Path, name: str | None = None) -> str:
    """Register a site's public key with the SuperLink; returns the node id."""
    args = ["supernode", "register", str(public_key), CONNECTION, "--format", "json"]
    if name:
        args += ["--name", name]
    out = _flwr(args, flwr_home)
    m = re.search(r'"node[-_]id"\s*:\s*"?(\d+)', out) or re.search(r"SuperNode (\d+)", out)
    if not m:
        raise ConfigError(f"could not read the node id from flwr's answer: {out.strip()[-400:]}")
    return m.group(1)


def unregister_node(node_id: str, flwr_home: Path) -> None:
    """Remove a registered node from the federation."""
    _flwr(["supernode", "unregister", str(node_id), CONNECTION], flwr_home)


def online_nodes(flwr_home: Path) -> list[str]:
    """Ids of the SuperNodes the SuperLink reports as online."""
    nodes = _flwr_json(["supernode", "list", CONNECTION], flwr_home).get("nodes", [])
    return [str(n.get("node-id", n.get("node_id"))) for n in nodes
            if str(n.get("status", "")).lower() == "online"]


def run_statuses(flwr_home: Path) -> dict[str, str]:
    """Every Flower run the SuperLink holds: run id -> status, lower case
    (``flwr ls``; e.g. ``running``, ``finished:completed``)."""
    runs = _flwr_json(["ls", CONNECTION], flwr_home).get("runs", [])
    return {str(r["run-id"]): str(r.get("status", "")).lower() for r in runs}


def stop_unfinished_runs(flwr_home: Path) -> list[str]:
    """Stop every Flower run the SuperLink still holds as unfinished.

    After ``kill -9`` of the aggregator, the SuperLink's database still holds
    the dead run, and with it the instructions already queued for the sites;
    until Flower marks that run finished (its ServerApp heartbeat lapses), a
    restarted SuperLink still hands them out. ``flwr stop`` finishes the run
    and deletes its queued messages. A run already marked finished is left
    alone: Flower purges its messages itself; so is one the SuperLink finishes
    between ``flwr ls`` and ``flwr stop`` (that answer is not an error).
    Returns the ids of the runs this call stopped.
    """
    stale = [run_id for run_id, status in run_statuses(flwr_home).items()
             if not status.startswith("finished")]
    stopped = []
    for run_id in stale:
        try:
            _flwr(["stop", run_id, CONNECTION], flwr_home)
        except ConfigError as err:
            # the SuperLink may finish the dead run itself (its ServerApp task lapsed)
            # between `flwr ls` and `flwr stop`: then there is nothing left to stop
            if "already finished" not in str(err):
                raise
            logger.info("Flower run %s finished on its own before it was stopped", run_id)
            continue
        stopped.append(run_id)
        logger.warning("stopped Flower run %s, left unfinished by the interrupted aggregator "
                       "(its queued messages to the sites are deleted)", run_id)
    return stopped


def supernode_command(
    *, site_yaml: Path, server: str, ca_cert: Path | None, private_key: Path | None,
    port: int, insecure: bool = False,
) -> list[str]:
    """The SuperNode command line for one hospital: ``flower-supernode``'s
    arguments, run as ``python -m client.supernode`` (Flower's SuperNode with
    each reply paired to the message it answers; see that module).

    Raises
    ------
    ConfigError
        Missing site config, CA certificate or private key.
    """
    if not Path(site_yaml).is_file():
        raise ConfigError(f"site config {site_yaml} not found; it is the site's private "
                          "site.yaml (data dir, epsilon cap, state dir)")
    cmd = [sys.executable, "-m", "client.supernode", "--superlink", server, "--port", str(port),
           "--node-config", f'site-config="{Path(site_yaml).resolve()}"']
    if insecure:
        logger.warning("!!! SuperNode WITHOUT TLS: development only. !!!")
        cmd.append("--insecure")
    else:
        if ca_cert is None:
            raise ConfigError("TLS needs --ca CA.crt (the federation's CA certificate) or --insecure")
        _check_certs(Path(ca_cert))
        cmd += ["--root-certificates", str(ca_cert)]
    if private_key is not None:
        if not Path(private_key).is_file():
            raise ConfigError(f"node private key {private_key} not found; create it with "
                              "`medseg certs --node SITE_ID` and register its .pub on the server")
        cmd += ["--auth-supernode-private-key", str(private_key)]
    return cmd


def run_federation_remote(
    scenario: Path, workdir: Path, flwr_home: Path, *, log: Path, timeout: float | None = None,
    run_name: str = "", resume: bool = False,
) -> int:
    """``flwr run`` this project on the ``medseg`` SuperLink and stream its log."""
    run_config = (f'scenario="{Path(scenario).resolve()}" workdir="{Path(workdir).resolve()}" '
                  f'run-name="{run_name}" resume={"true" if resume else "false"}')

    cmd = [_bin("flwr"), "run", str(PROJECT_ROOT), CONNECTION, "--run-config", run_config,
           "--stream"]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        res = subprocess.run(cmd, env=deploy_env(flwr_home), stdout=fh, stderr=subprocess.STDOUT,
                             timeout=timeout, check=False)
    return res.returncode


def stop(proc: Proc, timeout: float = 15) -> None:
    """Stop a started process and its process group (SIGTERM, then SIGKILL)."""
    if proc.popen.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.popen.wait(timeout=timeout)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.popen.wait(timeout=timeout)
