"""Tests for medseg_core.losses."""

from __future__ import annotations

import pytest
import torch
from monai.losses import DiceCELoss

from medseg_core.errors import ConfigError
from medseg_core.losses import build_loss

torch.set_num_threads(1)


def _logits_for(labels: torch.Tensor, num_classes: int, scale: float = 20.0) -> torch.Tensor:
    onehot = torch.nn.functional.one_hot(labels[:, 0], num_classes).movedim(-1, 1).float()
    return scale * (2 * onehot - 1)


def test_build_loss_is_monai_dicece_on_logits_and_int_targets() -> None:
    loss_fn = build_loss(3)
    labels = torch.randint(0, 3, (2, 1, 8, 8))

    loss = loss_fn(torch.randn(2, 3, 8, 8), labels)

    assert isinstance(loss_fn, DiceCELoss)
    assert loss.shape == ()
    assert torch.isfinite(loss)


def test_correct_logits_score_lower_than_wrong_ones() -> None:
    loss_fn = build_loss(2)
    labels = torch.zeros(2, 1, 8, 8, dtype=torch.int64)
    labels[:, :, 2:6, 2:6] = 1

    good = loss_fn(_logits_for(labels, 2), labels)
    bad = loss_fn(_logits_for(1 - labels, 2), labels)

    assert good.item() < 0.01
    assert bad.item() > 1.0


def test_batch_loss_is_the_mean_of_per_sample_losses() -> None:
    # DP-SGD with loss_reduction="mean" needs a mean of per-sample terms;
    # a batch-pooled Dice (batch=True) would fail this.
    torch.manual_seed(0)
    loss_fn = build_loss(2)
    logits = torch.randn(4, 2, 8, 8)
    labels = torch.randint(0, 2, (4, 1, 8, 8))
    labels[0] = 0  # one sample without foreground makes pooling visible

    batch = loss_fn(logits, labels)
    per_sample = torch.stack([loss_fn(logits[i : i + 1], labels[i : i + 1]) for i in range(4)])

    torch.testing.assert_close(batch, per_sample.mean())


@pytest.mark.parametrize("bad", [1, 0, 2.0, True])
def test_build_loss_rejects_fewer_than_two_classes(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"num_classes must be an int >= 2"):
        build_loss(bad)  # type: ignore[arg-type]
