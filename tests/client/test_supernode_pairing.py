"""The SuperNode loop's push stage, paired with the message just pulled.

Flower's own state, object store, messages and ``_push_messages`` run here;
only the network calls (``send`` / ``push_object``) are the test's, with the
SuperLink's answer to a dead run's reply (``RunNotRunningException``).
"""

from __future__ import annotations

import threading
import time

import pytest
from flwr.app import Message, Metadata, RecordDict
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import RunNotRunningException
from flwr.supernode import start_client_internal as sci
from flwr.supernode.nodestate import NodeStateFactory

from client.supernode import ReplyPairing, install

DEAD_RUN, LIVE_RUN = 11, 22


def _instruction(run_id: int, mid: str) -> Message:
    md = Metadata(run_id=run_id, message_id=mid, src_node_id=1, dst_node_id=7,
                  reply_to_message_id="", group_id="", created_at=time.time(), ttl=600.0,
                  message_type="train")
    return Message(RecordDict(), metadata=md)


class _Node:
    """A SuperNode's state with the SuperLink's send: a dead run's reply is refused."""

    def __init__(self) -> None:
        stores = ObjectStoreFactory()
        self.store = stores.store()
        self.state = NodeStateFactory(stores).state()
        self.sent: list[tuple[int, str]] = []

    def reply(self, instruction: Message) -> None:
        """What a finished task leaves in the state: the reply to ``instruction``."""
        mid = instruction.metadata.message_id
        self.state.record_message_processing_start(mid)
        self.state.record_message_processing_end(mid)
        sci._insert_message(Message(RecordDict(), reply_to=instruction), self.state, self.store)

    def send(self, message: Message, _tree: object, _runtime: float) -> tuple[set[str], str]:
        self.sent.append((message.metadata.run_id, message.metadata.reply_to_message_id))
        if message.metadata.run_id == DEAD_RUN:
            raise RunNotRunningException
        return set(), "session"

    def push(self, push_messages) -> None:
        push_messages(state=self.state, object_store=self.store, send=self.send,
                      push_object=lambda *a: None)


def _orphan_then_live(node: _Node) -> Message:
    """The kill -9 / --resume case: a dead run's task left a reply; the loop has just
    pulled the live run's message, whose task replies a moment later."""
    node.reply(_instruction(DEAD_RUN, "dead-train"))
    live = _instruction(LIVE_RUN, "live-train")
    threading.Timer(1.0, node.reply, args=(live,)).start()
    return live


def test_flower_loop_alone_sends_the_orphan_and_leaves_the_live_reply_behind() -> None:
    """The fault the pairing fixes, on Flower's own push stage."""
    node = _Node()
    _orphan_then_live(node)
    node.push(_flower_push())
    assert node.sent == [(DEAD_RUN, "dead-train")]  # the live reply waits for the next pull
    time.sleep(1.5)
    assert node.state.get_messages_legacy(is_reply=True)  # ...and is still unsent


def test_paired_push_sends_the_reply_to_the_message_just_pulled() -> None:
    node, pairing = _Node(), ReplyPairing()
    live = _orphan_then_live(node)
    pairing.pulled = live.metadata.message_id
    push = pairing.wrap_push(_flower_push())
    node.push(push)
    assert node.sent == [(DEAD_RUN, "dead-train"), (LIVE_RUN, "live-train")]
    assert not node.state.get_messages_legacy(is_reply=True)
    # the next stage, with nothing orphaned, returns on its own reply
    nxt = _instruction(LIVE_RUN, "live-evaluate")
    pairing.pulled = nxt.metadata.message_id
    node.reply(nxt)
    node.push(push)
    assert node.sent[-1] == (LIVE_RUN, "live-evaluate")


def test_paired_pull_records_only_a_message_the_loop_will_push_for() -> None:
    pairing = ReplyPairing()
    msg = _instruction(LIVE_RUN, "m1")

    def flower_pull(*, receive, **_kw):  # Flower's contract: run id, or None if dropped
        recv = receive()
        return None if recv is None or recv[0].metadata.run_id == DEAD_RUN else LIVE_RUN

    pull = pairing.wrap_pull(flower_pull)
    assert pull(receive=lambda: None, state=None) is None and pairing.pulled is None
    assert pull(receive=lambda: (_instruction(DEAD_RUN, "d"), None), state=None) is None
    assert pairing.pulled is None  # dropped: no push stage follows
    assert pull(receive=lambda: (msg, None), state=None) == LIVE_RUN
    assert pairing.pulled == "m1"


def test_install_patches_flowers_loop_once() -> None:
    before = (sci._pull_and_store_message, sci._push_messages)
    try:
        install()
        paired = (sci._pull_and_store_message, sci._push_messages)
        assert paired != before and sci._push_messages._medseg_paired
        install()  # idempotent
        assert (sci._pull_and_store_message, sci._push_messages) == paired
    finally:
        sci._pull_and_store_message, sci._push_messages = before


def _flower_push():
    push = sci._push_messages
    assert not getattr(push, "_medseg_paired", False), "Flower's loop is patched in this process"
    return push


@pytest.fixture(autouse=True)
def _flowers_own_loop():
    before = (sci._pull_and_store_message, sci._push_messages)
    yield
    sci._pull_and_store_message, sci._push_messages = before
