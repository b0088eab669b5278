"""What planned DP steps would cost, and the noise that fits a budget.

:func:`projected_epsilon` is the epsilon an accountant would report after
more steps (the accountant untouched); :func:`calibrate_noise` bisects for
the smallest noise multiplier whose projected epsilon stays within a target.
Both use the accountants of :mod:`medseg_core.privacy.accountant`.
"""

from __future__ import annotations

import copy
import logging
import warnings

from opacus.accountants import IAccountant

from medseg_core.errors import ConfigError, PrivacyBudgetExceeded
from medseg_core.privacy.accountant import (
    _check_steps,
    _history,
    _positive_finite,
    epsilon_of,
)

__all__ = ["EPSILON_TOLERANCE", "calibrate_noise", "projected_epsilon"]

logger = logging.getLogger(__name__)

EPSILON_TOLERANCE = 0.01
_MAX_BISECTIONS = 60


def _extended(acc: IAccountant, *, noise_multiplier: float, sample_rate: float, steps: int) -> IAccountant:
    """A copy of ``acc`` with ``steps`` more steps, as ``acc.step`` would record them."""
    history = _history(acc)
    if steps > 0:
        if history and history[-1][:2] == (noise_multiplier, sample_rate):
            s, q, n = history.pop()
            history.append((s, q, n + steps))
        elif history and acc.mechanism() == "gdp":
            s, q, _ = history[-1]
            raise ConfigError(
                f"the gdp accountant needs a constant noise multiplier and sample rate; its "
                f"history has (sigma={s}, q={q}) but (sigma={noise_multiplier}, "
                f"q={sample_rate}) was requested. Use accountant: rdp or prv for a varying plan."
            )
        else:
            history.append((noise_multiplier, sample_rate, steps))
    # A shallow copy of the same class, with its own history list: acc is
    # untouched and no constructor side effects (the gdp warning) repeat.
    projected = copy.copy(acc)
    projected.history = history
    return projected


def projected_epsilon(
    acc: IAccountant,
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
) -> float:
    """Epsilon ``acc`` would report after ``steps`` more steps; ``acc`` is not modified.

    Parameters
    ----------
    noise_multiplier
        Gaussian noise std divided by the clipping norm (sigma > 0).
    sample_rate
        Poisson sampling probability ``q`` in (0, 1].
    steps
        Number of further optimizer steps (>= 0).
    delta
        Target delta in (0, 1).

    Raises
    ------
    ConfigError
        An argument out of range, or a gdp accountant asked to change its
        noise multiplier or sample rate.
    """
    sigma = _positive_finite(noise_multiplier, "noise_multiplier")
    q = _positive_finite(sample_rate, "sample_rate", upper=1.0)
    steps = _check_steps(steps, allow_zero=True)
    return epsilon_of(_extended(acc, noise_multiplier=sigma, sample_rate=q, steps=steps), delta)


def calibrate_noise(
    acc: IAccountant,
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    max_noise: float = 50.0,
) -> float:
    """Smallest noise multiplier keeping ``acc`` + ``steps`` steps within ``target_epsilon``.

    Bisection on sigma (epsilon decreases monotonically in sigma), stopping
    once the projected epsilon is within :data:`EPSILON_TOLERANCE` below the
    target; the returned sigma always satisfies
    ``projected_epsilon(acc, ...) <= target_epsilon``. The history of ``acc``
    is the prefix of the projection, so earlier rounds count.

    For a ``gdp`` accountant with a non-empty history the only admissible
    sigma is the one already recorded (GDP needs a constant sigma); it is
    returned if it fits.

    Raises
    ------
    PrivacyBudgetExceeded
        ``acc`` is already at or over ``target_epsilon``, or even
        ``max_noise`` would exceed it.
    ConfigError
        An argument out of range.
    """
    target = _positive_finite(target_epsilon, "target_epsilon")
    q = _positive_finite(sample_rate, "sample_rate", upper=1.0)
    steps = _check_steps(steps, allow_zero=False)
    hi = _positive_finite(max_noise, "max_noise")
    spent = epsilon_of(acc, delta)
    if spent >= target:
        raise PrivacyBudgetExceeded(
            f"epsilon already spent ({spent:.4f} at delta={delta:g}) is at or over the target "
            f"{target:.4f}; no further steps are possible"
        )

    def eps(sigma: float) -> float:
        # Trial sigmas far below the answer make Opacus warn that the RDP
        # order range is too small; those candidates are discarded anyway.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            return projected_epsilon(acc, noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta)

    if acc.mechanism() == "gdp" and acc.history:
        sigma = float(acc.history[-1][0])
        projected = eps(sigma)
        if projected > target:
            raise PrivacyBudgetExceeded(
                f"{steps} more steps at the recorded sigma={sigma:.4f} would reach epsilon "
                f"{projected:.4f} > target {target:.4f} (gdp keeps sigma constant)"
            )
        return sigma

    eps_hi = eps(hi)
    if eps_hi > target:
        raise PrivacyBudgetExceeded(
            f"{steps} more steps at sample rate {q:g} would reach epsilon {eps_hi:.4f} > target "
            f"{target:.4f} (already spent {spent:.4f}) even with noise multiplier {hi:g}"
        )
    lo = 0.0
    for _ in range(_MAX_BISECTIONS):
        if target - eps_hi <= EPSILON_TOLERANCE:
            break
        mid = (lo + hi) / 2
        eps_mid = eps(mid)
        if eps_mid <= target:
            hi, eps_hi = mid, eps_mid
        else:
            lo = mid
    logger.debug("calibrated sigma=%.4f: epsilon %.4f -> %.4f (target %.4f)", hi, spent, eps_hi, target)
    return hi
