"""Reply validation before aggregation, with real Flower messages."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from medseg_core import keys
from server.validation import validate_train_reply

REF = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}


def _reply(arrays: dict[str, np.ndarray], *, n: float = 10, extra: dict | None = None) -> Message:
    ins = Message(RecordDict({keys.ARRAYS: ArrayRecord()}), dst_node_id=7, message_type=MessageType.TRAIN)
    content = RecordDict({
        keys.ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
        keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: n, keys.TRAIN_LOSS: 0.3}),
        **(extra or {}),
    })
    return Message(content, reply_to=ins)


def test_good_reply_accepted_with_norm() -> None:
    upd = {"w": np.ones((2, 3), np.float32), "b": np.zeros(3, np.float32)}
    verdict = validate_train_reply(_reply(upd), REF)
    assert verdict.accepted
    assert verdict.norm == pytest.approx(np.sqrt(6))


def test_nan_weights_rejected() -> None:
    upd = {"w": np.full((2, 3), np.nan, np.float32), "b": np.zeros(3, np.float32)}
    verdict = validate_train_reply(_reply(upd), REF)
    assert not verdict.accepted
    assert "'w' has 6 non-finite" in verdict.reason


def test_wrong_key_set_rejected() -> None:
    verdict = validate_train_reply(_reply({"w": REF["w"], "adapter.x": REF["b"]}), REF)
    assert not verdict.accepted
    assert "missing ['b']" in verdict.reason and "unexpected ['adapter.x']" in verdict.reason


def test_wrong_shape_rejected() -> None:
    verdict = validate_train_reply(_reply({"w": np.zeros((3, 2), np.float32), "b": REF["b"]}), REF)
    assert not verdict.accepted and "shape (3, 2)" in verdict.reason


def test_norm_bound() -> None:
    upd = {"w": np.full((2, 3), 10, np.float32), "b": REF["b"]}
    verdict = validate_train_reply(_reply(upd), REF, max_update_norm=1.0)
    assert not verdict.accepted and "exceeds the bound" in verdict.reason


def test_bad_num_examples_and_privacy_record() -> None:
    assert "positive finite" in validate_train_reply(_reply(dict(REF), n=0), REF).reason
    bad_priv = {"privacy": ConfigRecord({keys.EPSILON: float("nan")})}
    assert "epsilon" in validate_train_reply(_reply(dict(REF), extra=bad_priv), REF).reason
