"""Tests for medseg_core.training.loop."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from medseg_core.config import ModelConfig
from medseg_core.errors import ConfigError
from medseg_core.losses import build_loss
from medseg_core.models import build_model
from medseg_core.privacy import exported_state, make_private, new_accountant
from medseg_core.training import TrainResult, make_optimizer, train_epochs

torch.set_num_threads(1)

TINY = ModelConfig(channels=(8, 16), strides=(2,), norm_groups=4, num_res_units=1)


def _task(n: int = 24, size: int = 16, seed: int = 0) -> TensorDataset:
    """Bright squares on noise; the label is the square."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.zeros(n, 1, size, size, dtype=torch.int64)
    for i in range(n):
        r, c = torch.randint(0, size - 6, (2,), generator=g).tolist()
        labels[i, 0, r : r + 6, c : c + 6] = 1
    images = labels.float() + 0.3 * torch.randn(n, 1, size, size, generator=g)
    return TensorDataset(images, labels)


def _losses_per_epoch(model: nn.Module, loader, optimizer, epochs: int) -> list[float]:
    loss_fn = build_loss(2)
    return [train_epochs(model, loader, optimizer, loss_fn, epochs=1).loss for _ in range(epochs)]


def test_make_optimizer_builds_adam_and_sgd_over_trainable_parameters() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    model[1].weight.requires_grad_(False)

    adam = make_optimizer(model, "adam", 1e-3)
    sgd = make_optimizer(model, "sgd", 0.1)

    assert isinstance(adam, torch.optim.Adam)
    assert isinstance(sgd, torch.optim.SGD)
    assert sum(len(g["params"]) for g in sgd.param_groups) == 3
    assert sgd.param_groups[0]["lr"] == 0.1


def test_make_optimizer_rejects_unknown_name_with_did_you_mean() -> None:
    with pytest.raises(ConfigError, match=r"unknown optimizer 'adamw'; valid names: \['adam', 'sgd'\]; did you mean 'adam'\?"):
        make_optimizer(nn.Linear(1, 1), "adamw", 1e-3)  # type: ignore[arg-type]


@pytest.mark.parametrize("lr", [0.0, -1.0, float("nan")])
def test_make_optimizer_rejects_bad_learning_rate(lr: float) -> None:
    with pytest.raises(ConfigError, match=r"learning rate must be finite and > 0"):
        make_optimizer(nn.Linear(1, 1), "sgd", lr)


def test_plain_training_decreases_the_loss() -> None:
    torch.manual_seed(0)
    model = build_model(TINY, in_channels=1, out_channels=2)
    loader = DataLoader(_task(), batch_size=8, shuffle=True)

    losses = _losses_per_epoch(model, loader, make_optimizer(model, "adam", 1e-2), epochs=4)

    assert losses[-1] < 0.75 * losses[0]


def test_dp_training_decreases_the_loss() -> None:
    torch.manual_seed(0)
    model = build_model(TINY, in_channels=1, out_channels=2)
    loader = DataLoader(_task(n=48), batch_size=12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus' secure-RNG notice
        pt = make_private(
            model, make_optimizer(model, "adam", 1e-2), loader,
            accountant=new_accountant("rdp"), noise_multiplier=0.3, max_grad_norm=1.0,
        )

    losses = _losses_per_epoch(pt.model, pt.loader, pt.optimizer, epochs=4)

    assert losses[-1] < 0.8 * losses[0]
    assert len(pt.accountant.history) == 1 and pt.accountant.history[0][2] == 4 * len(loader)


def test_train_result_counts_steps_and_examples() -> None:
    model = build_model(TINY, in_channels=1, out_channels=2)
    loader = DataLoader(_task(n=10), batch_size=4)  # batches of 4, 4, 2

    result = train_epochs(model, loader, make_optimizer(model, "sgd", 1e-3), build_loss(2), epochs=2)

    assert isinstance(result, TrainResult)
    assert (result.steps, result.num_examples) == (6, 20)
    assert math.isfinite(result.loss) and result.seconds > 0


def test_empty_batches_are_skipped_by_a_plain_optimizer() -> None:
    model = build_model(TINY, in_channels=1, out_channels=2)
    ds = _task(n=4)
    empty = (torch.zeros(0, 1, 16, 16), torch.zeros(0, 1, 16, 16, dtype=torch.int64))
    batches = [empty, (ds.tensors[0], ds.tensors[1]), empty]

    result = train_epochs(model, batches, make_optimizer(model, "adam", 1e-3), build_loss(2), epochs=1)

    assert (result.steps, result.num_examples) == (1, 4)


def test_empty_batch_under_dp_takes_a_recorded_noise_only_step() -> None:
    torch.manual_seed(0)
    model = build_model(TINY, in_channels=1, out_channels=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pt = make_private(
            model, make_optimizer(model, "sgd", 0.1), DataLoader(_task(n=8), batch_size=4),
            accountant=new_accountant("rdp"), noise_multiplier=1.0, max_grad_norm=1.0,
        )
    before = exported_state(pt.model)
    empty = (torch.zeros(0, 1, 16, 16), torch.zeros(0, 1, 16, 16, dtype=torch.int64))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: full backward hook without input grads
        result = train_epochs(pt.model, [empty], pt.optimizer, build_loss(2), epochs=1)

    after = exported_state(pt.model)
    assert (result.steps, result.num_examples) == (1, 0)
    assert math.isnan(result.loss)
    assert pt.accountant.history == [(1.0, 0.5, 1)]
    assert any(not torch.equal(before[k], after[k]) for k in before)  # noise moved weights


def _zero_grad_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logits * 0.0).sum()


def test_proximal_step_pulls_weights_toward_the_anchor_by_lr_mu() -> None:
    # Arrange: a data term with zero gradient, so only the proximal step moves w.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1))
    anchor = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [(torch.randn(2, 1, 4, 4), torch.zeros(2, 1, 4, 4, dtype=torch.int64))]
    lr, mu = 0.1, 0.5

    # Act
    train_epochs(model, batches, make_optimizer(model, "sgd", lr), _zero_grad_loss, epochs=1, proximal_mu=mu, anchor=anchor)

    # Assert: w <- w - lr*mu*(w - 0) = 0.95 w
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, (1 - lr * mu) * w0[k])


def test_zero_mu_ignores_the_anchor() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1))
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [(torch.randn(2, 1, 4, 4), torch.zeros(2, 1, 4, 4, dtype=torch.int64))]

    train_epochs(model, batches, make_optimizer(model, "sgd", 0.1), _zero_grad_loss, epochs=1, anchor={})

    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, w0[k])


def test_proximal_step_with_an_opacus_wrapped_model_uses_plain_keys() -> None:
    torch.manual_seed(0)
    model = build_model(TINY, in_channels=1, out_channels=2)
    anchor = {k: v + 1.0 for k, v in exported_state(model).items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pt = make_private(
            model, make_optimizer(model, "sgd", 1e-3), DataLoader(_task(n=8), batch_size=4),
            accountant=new_accountant("rdp"), noise_multiplier=0.0, max_grad_norm=1e-9,
        )
        dist0 = sum((v - anchor[k]).norm() for k, v in exported_state(pt.model).items() if k in anchor)

        train_epochs(pt.model, pt.loader, pt.optimizer, build_loss(2), epochs=1, proximal_mu=50.0, anchor=anchor)

    dist1 = sum((v - anchor[k]).norm() for k, v in exported_state(pt.model).items() if k in anchor)
    assert dist1 < 0.95 * dist0


def test_proximal_mu_without_anchor_raises() -> None:
    model = nn.Linear(1, 1)
    with pytest.raises(ConfigError, match=r"proximal_mu=0.1 needs the round's global weights as anchor"):
        train_epochs(model, [], make_optimizer(model, "sgd", 0.1), _zero_grad_loss, epochs=1, proximal_mu=0.1)


def test_anchor_with_missing_or_misshapen_keys_raises() -> None:
    model = nn.Sequential(nn.Linear(2, 3))
    anchor = {"0.weight": torch.zeros(2, 2)}

    with pytest.raises(ConfigError, match=r"1 missing key\(s\) \['0.bias'\], 1 shape mismatch\(es\) \['0.weight: anchor \(2, 2\) vs parameter \(3, 2\)'\]"):
        train_epochs(model, [], make_optimizer(model, "sgd", 0.1), _zero_grad_loss, epochs=1, proximal_mu=0.1, anchor=anchor)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"epochs": 0}, r"epochs must be an int >= 1, got 0"),
    ({"epochs": 1, "proximal_mu": -0.1}, r"proximal_mu must be finite and >= 0, got -0.1"),
])
def test_bad_loop_arguments_raise(kwargs: dict, match: str) -> None:
    model = nn.Linear(1, 1)
    with pytest.raises(ConfigError, match=match):
        train_epochs(model, [], make_optimizer(model, "sgd", 0.1), _zero_grad_loss, **kwargs)


def test_loader_yielding_non_pairs_raises() -> None:
    model = nn.Linear(1, 1)
    with pytest.raises(ConfigError, match=r"must yield \(images, labels\) or \(images, labels, classes\), got tuple"):
        train_epochs(model, [(1, 2, 3, 4, 5)], make_optimizer(model, "sgd", 0.1), _zero_grad_loss, epochs=1)


def test_non_finite_loss_raises_floating_point_error() -> None:
    model = nn.Sequential(nn.Conv2d(1, 1, 1))
    batches = [(torch.randn(1, 1, 2, 2), torch.zeros(1, 1, 2, 2, dtype=torch.int64))]

    def nan_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return logits.sum() * float("nan")

    with pytest.raises(FloatingPointError, match=r"training loss became nan at step 1; lower the learning rate"):
        train_epochs(model, batches, make_optimizer(model, "sgd", 0.1), nan_loss, epochs=1)


def test_model_mode_is_restored_after_training() -> None:
    model = nn.Sequential(nn.Conv2d(1, 1, 1)).eval()
    batches = [(torch.randn(1, 1, 2, 2), torch.zeros(1, 1, 2, 2, dtype=torch.int64))]

    train_epochs(model, batches, make_optimizer(model, "sgd", 0.1), _zero_grad_loss, epochs=1)

    assert model.training is False
