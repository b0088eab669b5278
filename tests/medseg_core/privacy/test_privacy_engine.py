"""Tests for medseg_core.privacy.engine: make_private, unwrap, exported_state."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from medseg_core.config import ModelConfig
from medseg_core.errors import ConfigError
from medseg_core.losses import build_loss
from medseg_core.models import build_model
from medseg_core.privacy import (
    exported_state,
    make_private,
    new_accountant,
    poisson_sample_rate,
    unwrap,
)
from medseg_core.training import make_optimizer, train_epochs

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Opacus RNG notice, torch hook notice

CFG = ModelConfig(channels=(4, 8), strides=(2,), norm_groups=2, num_res_units=1)


def _loader(n: int = 12, batch: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 2, (n, 1, 8, 8), generator=g))
    return DataLoader(data, batch_size=batch)


def _private(model: nn.Module | None = None, **kwargs):
    model = model if model is not None else build_model(CFG, in_channels=1, out_channels=2)
    args = {"accountant": new_accountant("rdp"), "noise_multiplier": 1.0, "max_grad_norm": 1.0, **kwargs}
    return make_private(model, make_optimizer(model, "adam", 1e-3), _loader(), **args)


def test_make_private_records_steps_into_the_given_accountant() -> None:
    acc = new_accountant("rdp")

    pt = _private(accountant=acc)
    result = train_epochs(pt.model, pt.loader, pt.optimizer, build_loss(2), epochs=2)

    assert pt.accountant is acc
    assert pt.sample_rate == poisson_sample_rate(_loader()) == 1 / 3
    assert acc.history == [(1.0, 1 / 3, result.steps)] and result.steps == 6


def test_exported_state_and_unwrap_keys_equal_the_plain_model_after_a_dp_step() -> None:
    # Arrange
    torch.manual_seed(0)
    model = build_model(CFG, in_channels=1, out_channels=2)
    plain_keys = list(model.state_dict())
    pt = _private(model)

    # Act
    train_epochs(pt.model, pt.loader, pt.optimizer, build_loss(2), epochs=1)
    exported = exported_state(pt.model)
    plain = unwrap(pt.model)

    # Assert
    assert any(k.startswith("_module.") for k in pt.model.state_dict())
    assert list(exported) == plain_keys == list(plain.state_dict())
    assert plain is model
    for k, v in plain.state_dict().items():
        assert exported[k].device.type == "cpu" and not exported[k].requires_grad
        torch.testing.assert_close(exported[k], v)
        assert exported[k].data_ptr() != v.data_ptr()
    assert not any(hasattr(p, "grad_sample") for p in plain.parameters())
    assert not hasattr(plain, "autograd_grad_sample_hooks")


def test_exported_state_between_epochs_keeps_the_hooks_working() -> None:
    pt = _private()

    train_epochs(pt.model, pt.loader, pt.optimizer, build_loss(2), epochs=1)
    first = exported_state(pt.model)
    train_epochs(pt.model, pt.loader, pt.optimizer, build_loss(2), epochs=1)

    assert pt.accountant.history[0][2] == 6
    assert any(not torch.equal(first[k], v) for k, v in exported_state(pt.model).items())


def test_next_round_can_rewrap_the_previous_private_model() -> None:
    acc = new_accountant("rdp")
    first = _private(accountant=acc)
    train_epochs(first.model, first.loader, first.optimizer, build_loss(2), epochs=1)

    second = _private(first.model, accountant=acc, noise_multiplier=2.0)
    train_epochs(second.model, second.loader, second.optimizer, build_loss(2), epochs=1)

    assert acc.history == [(1.0, 1 / 3, 3), (2.0, 1 / 3, 3)]
    assert list(exported_state(second.model)) == list(unwrap(second.model).state_dict())


def test_make_private_rejects_a_model_with_batchnorm() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2))

    with pytest.raises(ConfigError, match=r"1 \(BatchNorm2d\): BatchNorm cannot support"):
        _private(model)


def test_make_private_rejects_an_optimizer_over_other_parameters() -> None:
    model = build_model(CFG, in_channels=1, out_channels=2)
    other = make_optimizer(nn.Linear(1, 1), "sgd", 0.1)

    with pytest.raises(ConfigError, match=r"the optimizer holds 2 parameter\(s\) that are not the model's"):
        make_private(model, other, _loader(), accountant=new_accountant("rdp"), noise_multiplier=1.0, max_grad_norm=1.0)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"grad_sample_mode": "ghost"}, r"unsupported grad_sample_mode 'ghost'; valid: \['hooks', 'functorch'\]"),
    ({"noise_multiplier": -1.0}, r"noise_multiplier must be finite and >= 0, got -1.0"),
    ({"max_grad_norm": 0.0}, r"max_grad_norm must be finite and > 0, got 0.0"),
])
def test_make_private_validates_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _private(**kwargs)


@pytest.mark.skipif(importlib.util.find_spec("torchcsprng") is not None, reason="torchcsprng installed")
def test_secure_mode_without_torchcsprng_raises_config_error() -> None:
    with pytest.raises(ConfigError, match=r"secure_mode=True needs the torchcsprng package.*set secure_mode: false"):
        _private(secure_mode=True)


def test_functorch_mode_trains_too() -> None:
    pt = _private(grad_sample_mode="functorch")

    result = train_epochs(pt.model, pt.loader, pt.optimizer, build_loss(2), epochs=1)

    assert result.steps == 3 and pt.accountant.history[0][2] == 3


def test_poisson_sample_rate_rejects_an_empty_loader() -> None:
    with pytest.raises(ConfigError, match=r"the data loader is empty"):
        poisson_sample_rate(DataLoader(TensorDataset(torch.zeros(0, 1)), batch_size=4))
