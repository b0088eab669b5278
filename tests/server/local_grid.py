"""A Grid that hands each message to a real ClientApp in this process: the
server's phases and round loop against real sites, without Ray."""

from __future__ import annotations

from pathlib import Path
from uuid import uuid4

from flwr.app import Context, Message, RecordDict

from client.app import build_client_app
from medseg_core.config import ScenarioConfig
from medseg_core.sites import materialise_site


def site_yamls(scenario: ScenarioConfig, root: Path) -> dict[int, Path]:
    """Materialise the scenario's sites under ``root``; node id (1, 2, ...) ->
    that site's ``site.yaml``, as :class:`LocalGrid` takes them."""
    paths = {}
    for node, spec in enumerate(scenario.sites, start=1):
        materialise_site(spec, scenario, root)
        paths[node] = root / "sites" / spec.id / "site.yaml"
    return paths


def shift_pair(*, seed: int, rounds: int, adaptation: str, train: dict, dp: bool) -> dict:
    """A raw scenario of two small 2D sites, the second gamma-shifted: the
    federation the adaptation-layer tests run (``train`` is merged into the
    training section)."""
    return {
        "rounds": rounds, "seed": seed,
        "sites": [{"id": "ref", "n_train": 12, "n_test": 3, "lesion_prevalence": 1.0},
                  {"id": "dark", "n_train": 12, "n_test": 3, "lesion_prevalence": 1.0,
                   "shift": {"gamma": 2.0}}],
        "model": {"channels": [8, 16], "strides": [2], "norm_groups": 4,
                  "adaptation": adaptation},
        "data": {"image_size": 32, "val_fraction": 0.25},
        "train": {"batch_size": 4, **train},
        "strategy": {"name": "fedavg"},
        "privacy": {"enabled": dp, "epsilon": 50.0},
    }


class LocalGrid:
    """A Grid that hands each message to a real ClientApp in this process
    (node id -> that site's ``site.yaml``); ``pushed`` keeps every message sent."""

    def __init__(self, sites: dict[int, Path]) -> None:
        self.app, self.sites = build_client_app(), sites
        self.replies: list[Message] = []
        self.pushed: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.sites)

    def push_messages(self, messages) -> list[str]:
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = str(uuid4())
            node = m.metadata.dst_node_id
            ctx = Context(run_id=1, node_id=node, node_config={"site-config": str(self.sites[node])},
                          state=RecordDict(), run_config={})
            self.replies.append(self.app(m, ctx))
            self.pushed.append(m)
            ids.append(m.metadata.message_id)
        return ids

    def pull_messages(self, ids) -> list[Message]:
        want = set(ids)
        got = [r for r in self.replies if r.metadata.reply_to_message_id in want]
        self.replies = [r for r in self.replies if r not in got]
        return got
