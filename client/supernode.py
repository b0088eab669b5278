"""``flower-supernode`` with its replies paired to the messages they answer.

``medseg client`` starts the site's SuperNode as ``python -m client.supernode
ARGS`` (the same arguments as ``flower-supernode``). It is Flower's own
SuperNode with one fix to its main loop (Flower 1.41):

The loop pulls one message, then waits for *any* one reply and sends it.
If a message is stored but its run stops before receipt is confirmed (the
restarted SuperLink of a ``kill -9``-ed aggregator hands out the dead run's
queued instruction and then marks that run finished), the pull returns
nothing, yet the message's task still runs and leaves a reply behind. From
then on every push sends the reply *before* the one just asked for: each
answer waits for the next instruction, the aggregator's rounds time out, and
the site is lost to the federation until its SuperNode restarts (the
kill -9 / ``--resume`` deployment test failed so 1 time in 4 at stop 20 with
a ``--cold`` site, and once in CI with both sites on the warm executor).

The fix keeps Flower's loop and pairs it: after pulling message M, the push
stage sends every reply that is ready and returns only once the reply to M
has gone (a dead run's reply is sent, refused by the SuperLink, and
dropped, as Flower already does).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("medseg.client.supernode")


class ReplyPairing:
    """Pair each push stage of the SuperNode loop with the message just pulled."""

    def __init__(self) -> None:
        self.pulled: str | None = None  # id of the last message the loop pulled

    def wrap_pull(self, pull: Callable[..., Any]) -> Callable[..., Any]:
        """``_pull_and_store_message`` that records the id of the message it pulls."""

        def paired_pull(**kwargs: Any) -> Any:
            receive = kwargs["receive"]
            got: list[str] = []

            def recording_receive() -> Any:
                recv = receive()
                if recv is not None:
                    got.append(recv[0].metadata.message_id)
                return recv

            run_id = pull(**{**kwargs, "receive": recording_receive})
            if run_id is not None and got:
                self.pulled = got[-1]
            return run_id

        return paired_pull

    def wrap_push(self, push: Callable[..., Any]) -> Callable[..., Any]:
        """``_push_messages`` that returns only once the pulled message's reply is sent."""

        def paired_push(**kwargs: Any) -> None:
            send = kwargs["send"]
            answered: list[str] = []

            def recording_send(message: Any, *args: Any) -> Any:
                answered.append(message.metadata.reply_to_message_id)
                return send(message, *args)

            target, self.pulled = self.pulled, None
            while True:
                push(**{**kwargs, "send": recording_send})
                if target is None or target in answered:
                    return
                logger.warning("sent a reply to an earlier message (%s) before the reply to "
                               "message %s; waiting for that one", answered[-1], target)

        return paired_push


def install() -> None:
    """Patch Flower's SuperNode loop (``flwr.supernode.start_client_internal``).

    Raises
    ------
    RuntimeError
        The installed Flower has no such loop functions (a Flower other than
        the pinned 1.41, whose loop may differ): pin ``flwr==1.41.0``.
    """
    from flwr.supernode import start_client_internal as sci

    missing = [n for n in ("_pull_and_store_message", "_push_messages") if not hasattr(sci, n)]
    if missing:
        import flwr

        raise RuntimeError(
            f"flwr {getattr(flwr, '__version__', '?')} has no SuperNode loop function(s) "
            f"{missing} to pair replies in; medseg pins flwr==1.41.0 (pip install -c "
            "constraints.txt -e .)")
    if not getattr(sci._push_messages, "_medseg_paired", False):
        pairing = ReplyPairing()
        sci._pull_and_store_message = pairing.wrap_pull(sci._pull_and_store_message)
        sci._push_messages = pairing.wrap_push(sci._push_messages)
        sci._push_messages._medseg_paired = True  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> None:
    """``flower-supernode ARGV`` with paired replies."""
    from flwr.supernode.cli import flower_supernode

    install()
    print("[medseg supernode] Flower SuperNode, replies paired with the messages they answer",
          flush=True)
    sys.argv = ["flower-supernode", *(sys.argv[1:] if argv is None else argv)]
    flower_supernode()


if __name__ == "__main__":
    main()
