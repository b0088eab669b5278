"""Tests for medseg_core.privacy.budget.plan_round."""

from __future__ import annotations

import pytest

from medseg_core.errors import ConfigError, PrivacyBudgetExceeded
from medseg_core.privacy import RoundPrivacyPlan, epsilon_of, new_accountant, plan_round
from medseg_core.privacy.noise import EPSILON_TOLERANCE

DELTA = 1e-5
Q, STEPS = 0.1, 20


def _plan(acc, cap: float = 4.0, rounds_remaining: int = 3) -> RoundPrivacyPlan:
    return plan_round(
        acc, epsilon_cap=cap, delta=DELTA, max_grad_norm=1.0, sample_rate=Q,
        steps_this_round=STEPS, rounds_remaining=rounds_remaining,
    )


def _run(acc, plan: RoundPrivacyPlan) -> None:
    for _ in range(plan.steps):
        acc.step(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate)


def test_planned_rounds_spend_the_cap_evenly_and_stay_under_it() -> None:
    # Arrange
    acc = new_accountant("rdp")
    plans = []

    # Act: a site plans and runs 3 rounds, re-planning each time.
    for remaining in (3, 2, 1):
        plan = _plan(acc, rounds_remaining=remaining)
        _run(acc, plan)
        plans.append(plan)

    # Assert
    spent = epsilon_of(acc, DELTA)
    assert 4.0 - 3 * EPSILON_TOLERANCE <= spent <= 4.0
    assert plans[0].epsilon_before == 0.0
    for before, after in zip(plans, plans[1:], strict=False):
        assert after.epsilon_before == pytest.approx(before.epsilon_after)
        # Even spending: the same sigma every round (epsilon itself composes sublinearly).
        assert after.noise_multiplier == pytest.approx(before.noise_multiplier, rel=0.02)
    assert plans[0].epsilon_after < plans[1].epsilon_after < plans[2].epsilon_after
    assert plans[-1].epsilon_after == pytest.approx(spent)


def test_plan_reports_its_inputs() -> None:
    plan = _plan(new_accountant("rdp"))

    assert (plan.max_grad_norm, plan.sample_rate, plan.steps, plan.delta, plan.accountant) == (1.0, Q, STEPS, DELTA, "rdp")
    assert plan.noise_multiplier > 0
    assert 0 < plan.epsilon_after < 4.0


def test_plan_round_raises_when_the_cap_is_spent() -> None:
    acc = new_accountant("rdp")
    for _ in range(200):
        acc.step(noise_multiplier=0.7, sample_rate=0.5)
    spent = epsilon_of(acc, DELTA)

    with pytest.raises(PrivacyBudgetExceeded, match=rf"epsilon spent {spent:.4f} >= cap 4.0000.*raise the site's epsilon cap in its site config, or stop training this site"):
        _plan(acc)


def test_plan_round_raises_when_the_remaining_rounds_cannot_fit() -> None:
    acc = new_accountant("rdp")
    for _ in range(10):
        acc.step(noise_multiplier=1.0, sample_rate=Q)
    spent = epsilon_of(acc, DELTA)

    with pytest.raises(
        PrivacyBudgetExceeded,
        match=rf"epsilon spent {spent:.4f}, cap {spent + 0.001:.4f}.*would reach epsilon [\d.]+ > target.*Fix: raise the site's epsilon cap",
    ):
        _plan(acc, cap=spent + 0.001, rounds_remaining=50)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"rounds_remaining": 0}, r"rounds_remaining must be an int >= 1 \(this round included\), got 0"),
    ({"steps_this_round": 0}, r"steps_this_round must be an int >= 1, got 0"),
    ({"max_grad_norm": -1.0}, r"max_grad_norm must be finite and > 0, got -1.0"),
    ({"epsilon_cap": 0.0}, r"epsilon_cap must be > 0, got 0.0; set epsilon in the site config"),
    ({"delta": 0.0}, r"delta must be finite and > 0"),
])
def test_plan_round_validates_arguments(kwargs: dict, match: str) -> None:
    args = {
        "epsilon_cap": 4.0, "delta": DELTA, "max_grad_norm": 1.0, "sample_rate": Q,
        "steps_this_round": STEPS, "rounds_remaining": 2, **kwargs,
    }
    with pytest.raises(ConfigError, match=match):
        plan_round(new_accountant("rdp"), **args)


def test_reserved_steps_leave_their_share_of_the_cap() -> None:
    """Rounds planned with ``reserve_steps`` (post-federation personalisation)
    take more noise, and the reserved steps then fit at the same noise."""
    plain = _plan(new_accountant("rdp"))
    acc = new_accountant("rdp")
    reserved = plan_round(acc, epsilon_cap=4.0, delta=DELTA, max_grad_norm=1.0, sample_rate=Q,
                          steps_this_round=STEPS, rounds_remaining=3, reserve_steps=STEPS)
    assert reserved.noise_multiplier > plain.noise_multiplier
    for _ in range(3):
        _run(acc, reserved)
    assert epsilon_of(acc, DELTA) < 4.0 - 0.1  # the reserve is still free
    last = plan_round(acc, epsilon_cap=4.0, delta=DELTA, max_grad_norm=1.0, sample_rate=Q,
                      steps_this_round=STEPS, rounds_remaining=1)
    assert last.noise_multiplier == pytest.approx(reserved.noise_multiplier, rel=0.05)


def test_reserve_steps_must_be_a_non_negative_int() -> None:
    with pytest.raises(ConfigError, match="reserve_steps must be an int >= 0, got -1"):
        plan_round(new_accountant("rdp"), epsilon_cap=4.0, delta=DELTA, max_grad_norm=1.0,
                   sample_rate=Q, steps_this_round=STEPS, rounds_remaining=3, reserve_steps=-1)
