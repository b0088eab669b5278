"""Warm ClientApp executor: one fork per message instead of one cold start.

In Flower's default ``--isolation subprocess`` the SuperNode starts
``flower-superexec``, which launches a fresh ``flwr-clientapp`` process for
every message. Each one re-imports torch, MONAI and Opacus: about 7 s of CPU
on this project's 2-core reference machine, twice per site per round (train
and evaluate), which made a deployed round ~3.7x slower than the same round in
simulation.

``medseg client`` therefore starts its SuperNode with ``--isolation process``
and runs :func:`serve` next to it. It is Flower's own SuperExec loop (poll the
SuperNode's Runtime API with ``AcquireTask``, launch the task with its token),
with one difference in *how* a task process starts: from a
:mod:`multiprocessing` fork server that imported the heavy libraries once.
Each message still runs in its own fresh process (Flower's
:func:`~flwr.supernode.runtime.run_clientapp.run_clientapp`, same token
protocol, same FAB installation and app loading), so a crash or a memory leak
in one round cannot touch the next, and the app's own code is still the FAB the
server sent: the project's packages are dropped from the forked child's module
table before the app is loaded, only third-party libraries stay warm.

The Runtime API listens on 127.0.0.1 only; ``AcquireTask`` is additionally
protected by a per-start random SuperExec secret (``--superexec-auth-secret-file``
on the SuperNode), so no other local process can take this site's tasks.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import secrets
import signal
import sys
import time
from collections.abc import Sequence
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import ClassVar

logger = logging.getLogger("medseg.client.warm")

#: Imported once by the fork server; every task process starts with them loaded.
PRELOAD: tuple[str, ...] = (
    "numpy",
    "torch",
    "monai.networks.nets",
    "monai.losses",
    "monai.metrics",
    "monai.transforms",
    "opacus",
    "safetensors.numpy",
    "flwr.clientapp",
    "flwr.supernode.runtime.run_clientapp",
)
#: Packages of this project: a task must load them from the FAB, not the executor.
PROJECT_PACKAGES = frozenset({"medseg_core", "client", "server", "simulations"})
POLL_INTERVAL_S = 0.1


def write_secret(path: Path) -> bytes:
    """Write a fresh SuperExec auth secret readable by the owner only."""
    secret = secrets.token_bytes(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(secret)
    return secret


def run_task(runtime_api_address: str, token: str, parent_pid: int) -> None:
    """Body of one task process (forked from the warm server)."""
    warm = [m for m in PRELOAD if m in sys.modules]
    for name in [n for n in sys.modules if n.split(".")[0] in PROJECT_PACKAGES]:
        del sys.modules[name]
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    print(f"[medseg warm] task process {os.getpid()} preloaded: {', '.join(warm) or 'none'}",
          flush=True)
    run_clientapp(runtime_api_address=runtime_api_address, token=token, insecure=True,
                  certificates=None, parent_pid=parent_pid, runtime_dependency_install=False)


class ForkServerExecutor:
    """A Flower SuperExec executor that starts task processes from a warm fork server.

    Implements the executor protocol of ``flwr.supercore.superexec.executor``
    (``get_eligible_capacity``, ``wait_for_capacity``, ``launch``,
    ``reconcile``, ``close``).
    """

    def __init__(self, preload: Sequence[str] = PRELOAD, target=run_task) -> None:
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(list(preload))
        self._target = target
        self._running: dict[int, BaseProcess] = {}
        self.launched = 0

    def warm_up(self) -> None:
        """Start the fork server now (it imports :data:`PRELOAD` in the background)."""
        from multiprocessing import forkserver

        forkserver.ensure_running()

    def get_eligible_capacity(self, supported_task_types: set, **_: object) -> tuple[set, set]:
        return supported_task_types, set()

    def wait_for_capacity(self, *_: object, **__: object) -> None:
        return None

    def launch(self, spec: object):  # ExecutionSpec -> LaunchResult
        from flwr.supercore.superexec.executor import LaunchResult

        proc = self._ctx.Process(
            target=self._target, name=f"medseg-task-{spec.task_id}",  # type: ignore[attr-defined]
            args=(spec.runtime_api_address, spec.token, os.getpid()),  # type: ignore[attr-defined]
            daemon=False,
        )
        proc.start()
        self._running[spec.task_id] = proc  # type: ignore[attr-defined]
        self.launched += 1
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap finished task processes (Flower itself records their outcome)."""
        for task_id, proc in list(self._running.items()):
            if not proc.is_alive():
                proc.join(0)
                if proc.exitcode not in (0, None):
                    logger.warning("task %s exited with code %s", task_id, proc.exitcode)
                del self._running[task_id]

    def close(self) -> None:
        for proc in self._running.values():
            if proc.is_alive():
                proc.terminate()
        for proc in self._running.values():
            proc.join(5)
        self._running.clear()


def _plugin_class():
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.plugin.base_exec_plugin import BaseExecPlugin

    class ClientAppPlugin(BaseExecPlugin):
        """Flower's SuperExec plugin, restricted to ClientApp tasks."""

        supported_task_types: ClassVar[frozenset] = frozenset({TaskType.CLIENT_APP})

    return ClientAppPlugin


def serve(
    runtime_api_address: str,
    *,
    secret: bytes | None,
    executor: ForkServerExecutor | None = None,
    should_stop=lambda: False,
    poll_interval: float = POLL_INTERVAL_S,
) -> None:
    """Acquire ClientApp tasks from the local SuperNode and run them warm.

    Returns when ``should_stop()`` is true (checked every poll).
    """
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=no-name-in-module
    from flwr.supercore.interceptors import (
        RuntimeVersionHttpInterceptor,
        SuperExecAuthHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    executor = executor or ForkServerExecutor()
    interceptors: list = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if secret:
        interceptors.append(SuperExecAuthHttpInterceptor(
            master_secret=secret, protected_methods=frozenset({"/flwr.proto.Runtime/AcquireTask"})))
    retry = make_simple_http_retry_invoker()
    retry.max_tries = 3  # the loop itself retries, checking should_stop() in between
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address, insecure=True, root_certificates=None,
        interceptors=interceptors, retry_invoker=retry,
    )
    plugin = _plugin_class()(runtime_api_address=runtime_api_address, insecure=True,
                             root_certificates_path=None, runtime_dependency_install=False,
                             executor=executor)
    try:
        while not should_stop():
            executor.reconcile()
            try:
                res = client.AcquireTask(AcquireTaskRequest(
                    supported_task_types=sorted(plugin.supported_task_types),
                    agentapp_fab_hashes=[]))
            except Exception as err:  # noqa: BLE001 - SuperNode restarting or gone
                if should_stop():
                    break
                logger.warning("SuperNode Runtime API %s not reachable (%s); retrying",
                               runtime_api_address, err)
                time.sleep(1.0)
                continue
            if res.HasField("task") and res.token:
                result = plugin.launch_task(token=res.token, task=res.task)
                if str(result.status) != "accepted":
                    logger.error("task %d not launched: %s", res.task.task_id, result.message)
                continue  # another task may be waiting (train + evaluate back to back)
            time.sleep(poll_interval)
    finally:
        client.close()
        executor.close()


def run_site(supernode_cmd: Sequence[str], env: dict[str, str], *, port: int, secret_file: Path) -> int:
    """Run one hospital: its SuperNode (``--isolation process``) plus the warm executor.

    Returns the SuperNode's exit code. SIGTERM / SIGINT stop both (the
    SuperNode first, then running tasks).
    """
    import subprocess

    from server.deploy import wait_for_port

    os.environ.update(env)  # FLWR_HOME etc. for the fork server and every task process
    secret = write_secret(secret_file)
    cmd = [*supernode_cmd, "--isolation", "process", "--superexec-auth-secret-file", str(secret_file)]
    executor = ForkServerExecutor()
    executor.warm_up()
    supernode = subprocess.Popen(cmd, env=env)
    stop = {"signal": 0}

    def _on_signal(signum: int, _frame: object) -> None:
        stop["signal"] = signum

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    print(f"[medseg warm] SuperNode pid {supernode.pid}; warm ClientApp executor pid {os.getpid()} "
          f"(preloading {len(PRELOAD)} libraries)", flush=True)
    try:
        wait_for_port(port, timeout=120, proc=supernode)
        serve(f"127.0.0.1:{port}", secret=secret, executor=executor,
              should_stop=lambda: bool(stop["signal"]) or supernode.poll() is not None)
    finally:
        if supernode.poll() is None:
            supernode.terminate()
            try:
                supernode.wait(15)
            except subprocess.TimeoutExpired:
                supernode.kill()
                supernode.wait()
    code = supernode.returncode
    if stop["signal"]:
        print(f"[medseg warm] stopped by signal {stop['signal']}", flush=True)
        return 0
    print(f"[medseg warm] SuperNode exited with code {code}", flush=True)
    return int(code or 0)
