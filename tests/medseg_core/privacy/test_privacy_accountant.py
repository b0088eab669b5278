"""Tests for medseg_core.privacy.accountant: persistence, composition, calibration."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

from medseg_core.config import ModelConfig
from medseg_core.errors import ConfigError, PrivacyBudgetExceeded
from medseg_core.losses import build_loss
from medseg_core.models import build_model
from medseg_core.privacy import (
    accountant_from_dict,
    accountant_to_dict,
    calibrate_noise,
    epsilon_of,
    load_accountant,
    make_private,
    new_accountant,
    projected_epsilon,
    save_accountant,
)
from medseg_core.privacy.noise import EPSILON_TOLERANCE
from medseg_core.training import make_optimizer, train_epochs

torch.set_num_threads(1)
DELTA = 1e-5


def _stepped(name: str, rounds: list[tuple[float, float, int]]):
    acc = new_accountant(name)
    for sigma, q, steps in rounds:
        for _ in range(steps):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    return acc


def test_new_accountant_names_and_did_you_mean() -> None:
    assert new_accountant("rdp").mechanism() == "rdp"
    assert new_accountant("prv").mechanism() == "prv"
    with pytest.raises(ConfigError, match=r"unknown privacy accountant 'rpd'.*did you mean 'rdp'\?"):
        new_accountant("rpd")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["rdp", "prv"])
def test_empty_accountant_has_zero_epsilon(name: str) -> None:
    assert epsilon_of(new_accountant(name), DELTA) == 0.0  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["rdp", "prv"])
def test_json_file_round_trip_gives_the_same_epsilon(name: str, tmp_path: Path) -> None:
    # Arrange
    acc = _stepped(name, [(1.1, 0.05, 30), (0.9, 0.1, 20)])
    path = tmp_path / "state" / "accountant.json"

    # Act
    save_accountant(acc, path)
    restored = load_accountant(path, name)

    # Assert
    assert restored.history == acc.history
    assert epsilon_of(restored, DELTA) == epsilon_of(acc, DELTA) > 0
    assert json.loads(path.read_text())["mechanism"] == name
    assert [p.name for p in path.parent.iterdir()] == ["accountant.json"]  # no temp files left


def test_dict_is_json_serialisable_with_lists() -> None:
    d = accountant_to_dict(_stepped("rdp", [(1.0, 0.1, 3)]))

    assert json.loads(json.dumps(d)) == d
    assert d["history"] == [[1.0, 0.1, 3]] and d["mechanism"] == "rdp"


def _dp_round(acc, *, sigma: float, epochs: int) -> None:
    """One federated round: a fresh model/optimizer/make_private, as a client would."""
    torch.manual_seed(0)
    cfg = ModelConfig(channels=(4, 8), strides=(2,), norm_groups=2, num_res_units=0)
    model = build_model(cfg, in_channels=1, out_channels=2)
    data = TensorDataset(torch.randn(12, 1, 8, 8), torch.randint(0, 2, (12, 1, 8, 8)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pt = make_private(
            model, make_optimizer(model, "sgd", 0.01), DataLoader(data, batch_size=4),
            accountant=acc, noise_multiplier=sigma, max_grad_norm=1.0,
        )
        train_epochs(pt.model, pt.loader, pt.optimizer, build_loss(2), epochs=epochs)
    assert pt.accountant is acc


def test_rounds_with_restored_accountant_compose_like_one_accountant(tmp_path: Path) -> None:
    # Arrange: three rounds, each restoring the accountant from disk.
    path = tmp_path / "acc.json"
    plan = [(1.2, 2), (1.2, 1), (0.8, 2)]  # (sigma, epochs); 3 batches per epoch, q = 1/3

    # Act
    for sigma, epochs in plan:
        acc = load_accountant(path, "rdp")
        _dp_round(acc, sigma=sigma, epochs=epochs)
        save_accountant(acc, path)

    # Assert
    final = load_accountant(path, "rdp")
    single = _stepped("rdp", [(sigma, 1 / 3, 3 * epochs) for sigma, epochs in plan])
    assert final.history == single.history == [(1.2, 1 / 3, 9), (0.8, 1 / 3, 6)]
    assert epsilon_of(final, DELTA) == epsilon_of(single, DELTA)
    # The bug this guards against: a fresh accountant per round only sees its round.
    last_round_only = _stepped("rdp", [(0.8, 1 / 3, 6)])
    assert epsilon_of(last_round_only, DELTA) < epsilon_of(final, DELTA)


rounds_strategy = st.lists(
    st.tuples(
        st.floats(min_value=0.5, max_value=5.0),
        st.floats(min_value=1e-3, max_value=0.5),
        st.integers(min_value=1, max_value=200),
    ),
    min_size=1,
    max_size=5,
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rounds=rounds_strategy)
def test_epsilon_never_decreases_over_rounds(rounds: list[tuple[float, float, int]]) -> None:
    acc = new_accountant("rdp")
    previous = 0.0
    for sigma, q, steps in rounds:
        acc = accountant_from_dict(json.loads(json.dumps(accountant_to_dict(acc))))
        for _ in range(steps):
            acc.step(noise_multiplier=sigma, sample_rate=q)
        eps = epsilon_of(acc, DELTA)
        assert eps >= previous
        previous = eps


@pytest.mark.parametrize("name", ["rdp", "prv"])
def test_epsilon_of_equals_opacus_get_epsilon(name: str) -> None:
    acc = _stepped(name, [(1.3, 0.02, 40), (0.9, 0.1, 7), (1.3, 0.02, 5)])

    assert epsilon_of(acc, DELTA) == float(acc.get_epsilon(delta=DELTA))


def test_projected_epsilon_does_not_mutate_and_matches_stepping() -> None:
    acc = _stepped("rdp", [(1.0, 0.1, 10)])
    before = list(acc.history)

    projected = projected_epsilon(acc, noise_multiplier=1.0, sample_rate=0.1, steps=15, delta=DELTA)

    assert acc.history == before
    assert projected == epsilon_of(_stepped("rdp", [(1.0, 0.1, 25)]), DELTA)


@pytest.mark.parametrize("prefix", [[], [(1.5, 0.02, 100)]], ids=["fresh", "with-history"])
def test_calibrate_noise_hits_the_target_within_tolerance(prefix: list) -> None:
    acc = _stepped("rdp", prefix)

    sigma = calibrate_noise(acc, target_epsilon=3.0, delta=DELTA, sample_rate=0.05, steps=200)

    eps = projected_epsilon(acc, noise_multiplier=sigma, sample_rate=0.05, steps=200, delta=DELTA)
    assert 3.0 - EPSILON_TOLERANCE <= eps <= 3.0
    assert acc.history == _stepped("rdp", prefix).history  # not mutated


def test_calibrated_noise_grows_with_prior_spending() -> None:
    fresh = calibrate_noise(new_accountant("rdp"), target_epsilon=3.0, delta=DELTA, sample_rate=0.05, steps=200)
    spent = calibrate_noise(_stepped("rdp", [(2.0, 0.05, 100)]), target_epsilon=3.0, delta=DELTA, sample_rate=0.05, steps=200)

    assert spent > fresh


def test_calibrate_noise_raises_when_already_over_target() -> None:
    acc = _stepped("rdp", [(0.5, 0.5, 100)])

    with pytest.raises(PrivacyBudgetExceeded, match=r"epsilon already spent \([\d.]+ at delta=1e-05\) is at or over the target 1.0000"):
        calibrate_noise(acc, target_epsilon=1.0, delta=DELTA, sample_rate=0.1, steps=10)


def test_calibrate_noise_raises_when_even_max_noise_is_not_enough() -> None:
    with pytest.raises(PrivacyBudgetExceeded, match=r"even with noise multiplier 2"):
        calibrate_noise(new_accountant("rdp"), target_epsilon=0.05, delta=DELTA, sample_rate=1.0, steps=1000, max_noise=2.0)


def test_load_accountant_absent_file_gives_fresh_accountant(tmp_path: Path) -> None:
    acc = load_accountant(tmp_path / "missing.json", "prv")

    assert acc.mechanism() == "prv" and acc.history == []


def test_load_accountant_with_other_mechanism_raises(tmp_path: Path) -> None:
    path = tmp_path / "acc.json"
    save_accountant(_stepped("prv", [(1.0, 0.1, 2)]), path)

    with pytest.raises(ConfigError, match=r"recorded with mechanism 'prv' but the site config asks for 'rdp'.*Set accountant: prv"):
        load_accountant(path, "rdp")


def test_load_accountant_rejects_non_json(tmp_path: Path) -> None:
    path = tmp_path / "acc.json"
    path.write_bytes(b"\x80\x04garbage")

    with pytest.raises(ConfigError, match=r"cannot be read as JSON.*do not delete it"):
        load_accountant(path, "rdp")


@pytest.mark.parametrize(("payload", "match"), [
    ([1, 2], r"accountant state must be a mapping, got list"),
    ({"format": "x", "version": 1, "mechanism": "rdp", "history": []}, r"has format 'x' version 1"),
    ({"format": "medseg-fl/accountant", "version": 1, "mechanism": "rpd", "history": []}, r"did you mean 'rdp'"),
    (
        {"format": "medseg-fl/accountant", "version": 1, "mechanism": "rdp",
         "history": [[1.0, 0.1, 3], [-1.0, 0.1, 3], [1.0, 1.5, 3], [1.0, 0.1, 0], "x"]},
        r"history\[1\].*noise_multiplier must be finite and > 0(.|\n)*history\[2\].*sample_rate(.|\n)*"
        r"history\[3\].*steps must be an int >= 1(.|\n)*history\[4\]",
    ),
])
def test_accountant_from_dict_rejects_garbage(payload: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        accountant_from_dict(payload)  # type: ignore[arg-type]


def test_gdp_requires_a_constant_noise_multiplier() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus: GDP is experimental
        acc = _stepped("gdp", [(1.0, 0.1, 5)])

    with pytest.raises(ConfigError, match=r"gdp accountant needs a constant noise multiplier"):
        projected_epsilon(acc, noise_multiplier=2.0, sample_rate=0.1, steps=5, delta=DELTA)
    assert calibrate_noise(acc, target_epsilon=50.0, delta=DELTA, sample_rate=0.1, steps=5) == 1.0


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"noise_multiplier": 0.0}, r"noise_multiplier must be finite and > 0, got 0.0"),
    ({"sample_rate": 1.5}, r"sample_rate must be finite and > 0 and <= 1.0, got 1.5"),
    ({"steps": -1}, r"steps must be an int >= 0, got -1"),
    ({"delta": 1.0}, r"delta must be in \(0, 1\), got 1.0"),
])
def test_projected_epsilon_validates_arguments(kwargs: dict, match: str) -> None:
    args = {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 1, "delta": DELTA, **kwargs}
    with pytest.raises(ConfigError, match=match):
        projected_epsilon(new_accountant("rdp"), **args)
