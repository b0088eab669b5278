"""Per-round privacy planning against a site's epsilon cap.

A site owns an (epsilon, delta) cap for the whole federation. Before each
round it asks :func:`plan_round` for a noise multiplier that spreads the
remaining budget evenly over the rounds still planned: sigma is calibrated
so that the accountant's history plus ``rounds_remaining`` rounds of
``steps_this_round`` steps lands at (just under) the cap. If the federation
stops early, the site simply spent less.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from opacus.accountants import IAccountant

from medseg_core.errors import ConfigError, PrivacyBudgetExceeded
from medseg_core.privacy.accountant import epsilon_of
from medseg_core.privacy.noise import calibrate_noise, projected_epsilon

__all__ = ["RoundPrivacyPlan", "plan_round"]

logger = logging.getLogger(__name__)

FIX_HINT = "raise the site's epsilon cap in its site config, or stop training this site"


@dataclass(frozen=True)
class RoundPrivacyPlan:
    """DP-SGD parameters for one local round, and their privacy cost.

    Attributes
    ----------
    noise_multiplier
        Gaussian noise std / ``max_grad_norm`` (sigma).
    max_grad_norm
        Per-sample L2 clipping bound ``C``.
    sample_rate
        Poisson sampling probability ``q`` per step.
    steps
        Optimizer steps planned this round.
    epsilon_before
        Epsilon spent before this round (at ``delta``).
    epsilon_after
        Projected epsilon after this round's ``steps``.
    delta
        The delta all epsilons refer to.
    accountant
        Accountant mechanism (``"rdp"``, ``"prv"``, ``"gdp"``).
    """

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    epsilon_before: float
    epsilon_after: float
    delta: float
    accountant: str


def plan_round(
    acc: IAccountant,
    *,
    epsilon_cap: float,
    delta: float,
    max_grad_norm: float,
    sample_rate: float,
    steps_this_round: int,
    rounds_remaining: int,
    reserve_steps: int = 0,
) -> RoundPrivacyPlan:
    """Plan this round's noise so the cap is spent evenly over the remaining rounds.

    Parameters
    ----------
    acc
        The site's restored accountant (not modified).
    epsilon_cap
        The site's total epsilon budget at ``delta``.
    delta
        Target delta in (0, 1).
    max_grad_norm
        Per-sample clipping bound ``C`` (> 0).
    sample_rate
        Poisson sample rate the DP loader will use (see
        :func:`medseg_core.privacy.engine.poisson_sample_rate`).
    steps_this_round
        Optimizer steps this round (epochs x batches per epoch).
    rounds_remaining
        Rounds still planned for this site, this one included (>= 1).
    reserve_steps
        DP steps at the same sample rate planned after the rounds
        (post-federation personalisation, ``train.personalize``): the noise
        is calibrated so the rounds and these steps together fit the cap.

    Returns
    -------
    RoundPrivacyPlan

    Raises
    ------
    PrivacyBudgetExceeded
        The cap is already spent, or the remaining rounds cannot fit under
        the cap even at the largest noise; the message names the cap, the
        epsilon spent, the projected epsilon and the fix.
    ConfigError
        An argument out of range.
    """
    if isinstance(rounds_remaining, bool) or not isinstance(rounds_remaining, int) or rounds_remaining < 1:
        raise ConfigError(f"rounds_remaining must be an int >= 1 (this round included), got {rounds_remaining!r}")
    if isinstance(steps_this_round, bool) or not isinstance(steps_this_round, int) or steps_this_round < 1:
        raise ConfigError(f"steps_this_round must be an int >= 1, got {steps_this_round!r}")
    if not (isinstance(max_grad_norm, int | float) and max_grad_norm > 0 and max_grad_norm < float("inf")):
        raise ConfigError(f"max_grad_norm must be finite and > 0, got {max_grad_norm!r}")
    if isinstance(epsilon_cap, bool) or not isinstance(epsilon_cap, int | float) or not epsilon_cap > 0:
        raise ConfigError(f"epsilon_cap must be > 0, got {epsilon_cap!r}; set epsilon in the site config")
    spent = epsilon_of(acc, delta)
    mechanism = acc.mechanism()
    if spent >= epsilon_cap:
        raise PrivacyBudgetExceeded(
            f"privacy budget exhausted: epsilon spent {spent:.4f} >= cap {epsilon_cap:.4f} "
            f"(delta={delta:g}, accountant={mechanism}); no round can be trained. "
            f"Fix: {FIX_HINT}."
        )
    if isinstance(reserve_steps, bool) or not isinstance(reserve_steps, int) or reserve_steps < 0:
        raise ConfigError(f"reserve_steps must be an int >= 0, got {reserve_steps!r}")
    total_steps = rounds_remaining * steps_this_round + reserve_steps
    try:
        sigma = calibrate_noise(
            acc,
            target_epsilon=epsilon_cap,
            delta=delta,
            sample_rate=sample_rate,
            steps=total_steps,
        )
    except PrivacyBudgetExceeded as exc:
        raise PrivacyBudgetExceeded(
            f"privacy budget too small: epsilon spent {spent:.4f}, cap {epsilon_cap:.4f} "
            f"(delta={delta:g}, accountant={mechanism}); {rounds_remaining} round(s) x "
            f"{steps_this_round} steps (+ {reserve_steps} reserved) do not fit: {exc}. Fix: {FIX_HINT} "
            "(or plan fewer rounds, steps or a smaller sample rate)."
        ) from None
    after = projected_epsilon(
        acc, noise_multiplier=sigma, sample_rate=sample_rate, steps=steps_this_round, delta=delta
    )
    plan = RoundPrivacyPlan(
        noise_multiplier=sigma,
        max_grad_norm=float(max_grad_norm),
        sample_rate=float(sample_rate),
        steps=steps_this_round,
        epsilon_before=spent,
        epsilon_after=after,
        delta=float(delta),
        accountant=mechanism,
    )
    logger.info(
        "round privacy plan: sigma=%.4f q=%.4g steps=%d epsilon %.4f -> %.4f (cap %.4f, %d rounds left)",
        sigma,
        sample_rate,
        steps_this_round,
        spent,
        after,
        epsilon_cap,
        rounds_remaining,
    )
    return plan
