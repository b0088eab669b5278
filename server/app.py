"""Flower ServerApp (Message API).

``medseg simulate`` builds it with the scenario in hand
(:func:`build_server_app`); ``flwr run`` and ``flower-superlink`` load the
module-level ``app``, which reads ``scenario`` and ``workdir`` from the run
config.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from medseg_core.config import ScenarioConfig, load_scenario

from server.federation import run_federation

__all__ = ["app", "build_server_app"]

logger = logging.getLogger(__name__)


def build_server_app(
    scenario: ScenarioConfig | None = None,
    out_dir: str | Path | None = None,
    *,
    run_id: str | None = None,
    resume: bool = False,
) -> ServerApp:
    """Build the ServerApp; arguments left None come from the run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        scen = scenario or load_scenario(str(context.run_config["scenario"])).for_privacy()
        out = Path(out_dir or str(context.run_config.get("workdir", "runs/flwr-run")))
        # A deployment passes a stable run name (and resume) in the run
        # config, so a restarted server continues the same run.
        name = str(context.run_config.get("run-name", "") or "")
        run_federation(
            grid, scen, out / "server" if out_dir is None else out,
            run_id=run_id or name or f"{scen.name}-{context.run_id}",
            resume=resume or bool(context.run_config.get("resume", False)),
        )

    return app


app = build_server_app()
