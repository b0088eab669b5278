"""Messages between the aggregator and its sites: sending one phase of a
round and collecting its replies, which site a reply is from, the order
replies are aggregated in, and the settings every message to a site carries.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from medseg_core import keys
from medseg_core.config import ScenarioConfig

__all__ = ["REPLY_POLL_S", "in_site_order", "send", "site_of", "site_settings"]


def site_settings(scenario: ScenarioConfig) -> dict[str, Any]:
    """What every message to a site carries: how to build the model and read
    the data, the weak-label settings and how predictions are post-processed."""
    return {
        keys.MIN_COMPONENT_VOXELS: scenario.evaluation.min_component_voxels,
        keys.EVAL_REFINE: scenario.evaluation.refine,
        keys.EVAL_THRESHOLD: scenario.evaluation.threshold,
        keys.EVAL_CALIBRATION_CASES: scenario.evaluation.calibration_cases or 0,
        keys.EVAL_MIL_HEAD: scenario.evaluation.mil_head,
        "model": scenario.model.model_dump_json(),
        "data": scenario.data.model_dump_json(),
        "weak": scenario.train.weak.model_dump_json(),
    }


def site_of(msg: Message, node_sites: dict[int, str], node: int) -> str:
    """The site a reply is from: the id it reports (remembered per node, since an
    error reply carries none), else ``node-<id>``."""
    if not msg.has_error():
        rec = msg.content.config_records.get(keys.SITE)
        if rec is not None and isinstance(rec.get(keys.SITE_ID), str):
            node_sites[node] = str(rec[keys.SITE_ID])
    return node_sites.get(node, f"node-{node}")


def in_site_order(replies: list[tuple[int, Message]],
                  node_sites: dict[int, str]) -> list[tuple[int, Message]]:
    """``(node, reply)`` pairs sorted by site id (then node).

    Replies arrive in the order the sites finish, which changes from run to
    run; the strategies sum updates in list order, and a float32 sum depends
    on its order. Sorted, a run's aggregate is the same whatever order the
    sites finished in, so a seeded run reproduces (the weak-label path,
    whose pseudo-mask thresholds amplify a last-bit difference, did not).
    """
    return sorted(replies, key=lambda nr: (site_of(nr[1], node_sites, nr[0]), nr[0]))


#: Seconds between two pulls for replies. Flower's HTTP grid sleeps 3 s between
#: pulls in ``send_and_receive``; the SuperLink is local to the ServerApp, so a
#: short interval costs nothing and takes up to 3 s off every round phase.
REPLY_POLL_S = 0.2


def send(grid: Grid, messages: Iterable[Message], timeout: float) -> list[tuple[int, Message]]:
    """Send one phase of a round and collect the replies that arrive within ``timeout``.

    Each message lives only as long as the round waits for it (Flower's
    default TTL is 12 h): a site that was down during the round never
    receives it later, so a rejoining site does not spend privacy budget on a
    round the server has already closed.

    Returns ``(node, reply)`` pairs, ``node`` being the node the message was
    sent to: an error reply made by the SuperLink (e.g. the message expired
    while the site was down) carries the SuperLink's id, not the site's.
    """
    msgs = list(messages)
    for m in msgs:
        m.metadata.ttl = float(timeout)
    if not msgs:
        return []
    ids = list(grid.push_messages(msgs))
    dst = {mid: m.metadata.dst_node_id for mid, m in zip(ids, msgs, strict=True)}
    pending, replies = set(ids), []
    end = time.monotonic() + timeout
    while True:
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending.difference_update(r.metadata.reply_to_message_id for r in got)
        if not pending or time.monotonic() >= end:
            break
        time.sleep(REPLY_POLL_S)
    return [(dst.get(r.metadata.reply_to_message_id, r.metadata.src_node_id), r) for r in replies]
