"""Site runtime glue: resolve this node's site config and keep its session.

The site config is private to the hospital. It is found, in order:

1. ``node_config["site-config"]``: a YAML path given to ``flower-supernode
   --node-config`` (deployment);
2. a mapping partition-id -> site.yaml handed to :func:`client.app.build_client_app`
   (``medseg simulate``);
3. ``run_config["scenario"]`` + ``node_config["partition-id"]`` (``flwr run``
   simulation): the site is materialised under ``run_config["workdir"]``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medseg_core.config import (
    DataConfig,
    ModelConfig,
    SiteConfig,
    WeakConfig,
    load_scenario,
    load_site_config,
    parse_model,
)
from medseg_core.errors import ConfigError
from medseg_core.sites import materialise_site
from medseg_core.training.site import SiteSession

__all__ = ["resolve_site", "session_for"]

logger = logging.getLogger(__name__)

_SESSIONS: dict[str, SiteSession] = {}


def resolve_site(
    node_config: Mapping[str, Any],
    run_config: Mapping[str, Any],
    site_map: Mapping[int, str] | None,
) -> SiteConfig:
    """Find this node's private site config (see module docstring)."""
    if "site-config" in node_config:
        return load_site_config(str(node_config["site-config"]))
    pid = node_config.get("partition-id")
    if site_map is not None and pid is not None:
        if int(pid) not in site_map:
            raise ConfigError(
                f"no site for partition-id {pid}; known partitions: {sorted(site_map)}"
            )
        return load_site_config(site_map[int(pid)])
    if "scenario" in run_config and pid is not None:
        scenario = load_scenario(str(run_config["scenario"]))
        if int(pid) >= len(scenario.sites):
            raise ConfigError(
                f"partition-id {pid} has no site: the scenario lists "
                f"{len(scenario.sites)} sites; run with num-supernodes = {len(scenario.sites)}"
            )
        workdir = Path(str(run_config.get("workdir", "runs/flwr-run")))
        return materialise_site(scenario.sites[int(pid)], scenario, workdir)
    raise ConfigError(
        "this node has no site config: start the SuperNode with "
        "--node-config 'site-config=\"/path/site.yaml\"' (see `medseg client --help`)"
    )


def session_for(site: SiteConfig, model_json: str, data_json: str, weak_json: str = "{}") -> SiteSession:
    """The cached :class:`SiteSession` for this site and federation settings.

    The model and data settings come from the server message and are
    validated here, at the trust boundary.
    """
    model_cfg = parse_model(ModelConfig, json.loads(model_json), source="server message 'model'")
    data_cfg = parse_model(DataConfig, json.loads(data_json), source="server message 'data'")
    weak_cfg = parse_model(WeakConfig, json.loads(weak_json), source="server message 'weak'")
    key = json.dumps(
        [site.model_dump(mode="json"), model_cfg.model_dump(mode="json"),
         data_cfg.model_dump(mode="json"), weak_cfg.model_dump(mode="json")],
        sort_keys=True,
    )
    if key not in _SESSIONS:
        _SESSIONS.clear()  # one site per process; drop stale tensors
        _SESSIONS[key] = SiteSession(site, model_cfg=model_cfg, data_cfg=data_cfg, weak_cfg=weak_cfg)
    return _SESSIONS[key]
