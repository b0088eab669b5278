"""Privacy accountants: creation, JSON persistence, epsilon spent.

Projection of planned steps and noise calibration: :mod:`medseg_core.privacy.noise`.

A site's accountant is the only record of the privacy it has spent. It must
survive rounds (a fresh ``PrivacyEngine`` per round) and restarts (a fresh
process), so it is stored as JSON next to the site's state and restored
before every round.

Mechanisms (Opacus names):

* ``"rdp"`` -- Renyi DP of the sampled Gaussian mechanism (Mironov 2017,
  arXiv:1702.07476; Mironov, Talwar & Zhang 2019, arXiv:1908.10530);
* ``"prv"`` -- numerical composition of privacy loss random variables (Gopi,
  Lee & Wutschitz 2021, arXiv:2106.02848), tighter than RDP;
* ``"gdp"`` -- Gaussian DP central-limit approximation (Dong, Roth & Su 2019,
  arXiv:1905.02383); experimental, can under-estimate epsilon, and requires
  a constant noise multiplier and sample rate for the whole history.
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
from opacus.accountants import IAccountant, RDPAccountant, create_accountant
from opacus.accountants.analysis import rdp as rdp_analysis

from medseg_core.errors import ConfigError

__all__ = [
    "ACCOUNTANTS",
    "IAccountant",
    "accountant_from_dict",
    "accountant_to_dict",
    "epsilon_of",
    "load_accountant",
    "new_accountant",
    "save_accountant",
]

logger = logging.getLogger(__name__)

ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv", "gdp")
FORMAT = "medseg-fl/accountant"
FORMAT_VERSION = 1

History = list[tuple[float, float, int]]


def _check_name(name: object) -> str:
    if not isinstance(name, str) or name not in ACCOUNTANTS:
        close = difflib.get_close_matches(str(name), list(ACCOUNTANTS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"unknown privacy accountant {name!r}; valid names: {list(ACCOUNTANTS)}{hint}. "
            "Set accountant in the site (or scenario privacy) config."
        )
    return name


def new_accountant(name: Literal["rdp", "prv", "gdp"]) -> IAccountant:
    """A fresh Opacus accountant with an empty history.

    Raises
    ------
    ConfigError
        ``name`` is not one of :data:`ACCOUNTANTS` (did-you-mean included).
    """
    return create_accountant(mechanism=_check_name(name))


def _positive_finite(value: object, what: str, *, upper: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{what} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v <= 0 or (upper is not None and v > upper):
        bound = f" and <= {upper}" if upper is not None else ""
        raise ConfigError(f"{what} must be finite and > 0{bound}, got {value!r}")
    return v


def _check_delta(delta: object) -> float:
    d = _positive_finite(delta, "delta", upper=1.0)
    if d >= 1.0:
        raise ConfigError(f"delta must be in (0, 1), got {delta!r}; typical: 1e-5 or 1/n_train")
    return d


def _check_steps(steps: object, *, allow_zero: bool) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < (0 if allow_zero else 1):
        lo = 0 if allow_zero else 1
        raise ConfigError(f"steps must be an int >= {lo}, got {steps!r}")
    return steps


def _history(acc: IAccountant) -> History:
    return [(float(s), float(q), int(n)) for s, q, n in acc.history]


def accountant_to_dict(acc: IAccountant) -> dict[str, Any]:
    """JSON-serialisable state of ``acc``.

    Returns
    -------
    dict
        ``{"format", "version", "mechanism", "history"}`` where ``history`` is
        a list of ``[noise_multiplier, sample_rate, steps]`` lists (float,
        float, int), in the order the steps were taken. Python's JSON float
        encoding round-trips exactly, so a restored accountant reports the
        same epsilon.
    """
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "mechanism": acc.mechanism(),
        "history": [[s, q, n] for s, q, n in _history(acc)],
    }


def accountant_from_dict(d: Mapping[str, Any]) -> IAccountant:
    """Rebuild an accountant from :func:`accountant_to_dict` output.

    Raises
    ------
    ConfigError
        ``d`` is not such a mapping: wrong format or version, unknown
        mechanism, or a history entry that is not ``[sigma > 0, 0 < q <= 1,
        steps >= 1]``. Every bad entry is listed.
    """
    if not isinstance(d, Mapping):
        raise ConfigError(
            f"accountant state must be a mapping, got {type(d).__name__}; expected the output "
            "of accountant_to_dict()"
        )
    if d.get("format") != FORMAT or d.get("version") != FORMAT_VERSION:
        raise ConfigError(
            f"accountant state has format {d.get('format')!r} version {d.get('version')!r}; "
            f"expected {FORMAT!r} version {FORMAT_VERSION}. Restore the site's accountant file "
            "from a backup; do not delete it (that would reset the spent epsilon to 0)."
        )
    mechanism = _check_name(d.get("mechanism"))
    raw = d.get("history")
    if not isinstance(raw, list):
        raise ConfigError(f"accountant history must be a list, got {type(raw).__name__}")
    history: History = []
    problems: list[str] = []
    for i, entry in enumerate(raw):
        try:
            if not isinstance(entry, list | tuple) or len(entry) != 3:
                raise ConfigError("expected [noise_multiplier, sample_rate, steps]")
            sigma = _positive_finite(entry[0], "noise_multiplier")
            q = _positive_finite(entry[1], "sample_rate", upper=1.0)
            n = _check_steps(entry[2], allow_zero=False)
            history.append((sigma, q, n))
        except ConfigError as exc:
            problems.append(f"  - history[{i}] = {entry!r}: {exc}")
    if problems:
        raise ConfigError(
            "invalid accountant history:\n" + "\n".join(problems) + "\n"
            "Restore the site's accountant file from a backup; do not delete it "
            "(that would reset the spent epsilon to 0)."
        )
    if mechanism == "gdp" and len(history) > 1:
        raise ConfigError(
            f"gdp accountant history must have at most one entry, got {len(history)}; "
            "GDP requires a constant noise multiplier and sample rate"
        )
    acc = new_accountant(mechanism)  # type: ignore[arg-type]
    acc.load_state_dict({"history": history, "mechanism": mechanism})
    return acc


def save_accountant(acc: IAccountant, path: Path) -> None:
    """Write ``acc`` to ``path`` as JSON, atomically.

    The state is written to a temporary file in the same directory, flushed
    to disk and moved over ``path`` with :func:`os.replace`, so a crash leaves
    either the old or the new file, never a truncated one. Parent
    directories are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = json.dumps(accountant_to_dict(acc), allow_nan=False, indent=1)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    logger.debug("saved %s accountant (%d history entries)", acc.mechanism(), len(acc.history))


def load_accountant(path: Path, name: str) -> IAccountant:
    """Restore the accountant stored at ``path``, or a fresh one if absent.

    Parameters
    ----------
    path
        JSON file written by :func:`save_accountant`.
    name
        The mechanism the site is configured with.

    Raises
    ------
    ConfigError
        ``name`` is unknown; the file is not valid JSON or not an accountant
        state; or the stored mechanism differs from ``name`` (epsilon cannot be
        converted between accountants).
    """
    _check_name(name)
    path = Path(path)
    if not path.exists():
        logger.info("no accountant state yet; starting a fresh %s accountant", name)
        return new_accountant(name)  # type: ignore[arg-type]
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(
            f"accountant state {str(path)!r} cannot be read as JSON ({exc}); restore it from a "
            "backup; do not delete it (that would reset the spent epsilon to 0)"
        ) from None
    stored = data.get("mechanism") if isinstance(data, dict) else None
    if stored != name and stored in ACCOUNTANTS:
        raise ConfigError(
            f"accountant state {str(path)!r} was recorded with mechanism {stored!r} but the "
            f"site config asks for {name!r}; epsilon cannot be converted between accountants. "
            f"Set accountant: {stored} in the site config."
        )
    return accountant_from_dict(data)


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    """RDP of one sampled-Gaussian step at Opacus' default orders (read-only)."""
    vec = rdp_analysis.compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS
    )
    vec.setflags(write=False)
    return vec


def epsilon_of(acc: IAccountant, delta: float) -> float:
    """Epsilon spent by ``acc`` at ``delta`` (0.0 for an empty history).

    Equals ``acc.get_epsilon(delta)``. For the RDP accountant the per-step
    RDP curve of each ``(sigma, q)`` is cached (RDP is linear in the number
    of steps, and Opacus computes ``curve * steps`` the same way), so
    repeated queries -- calibration bisects over sigma with the same
    history prefix -- do not recompute the prefix.
    """
    delta = _check_delta(delta)
    if not acc.history:
        return 0.0
    if type(acc) is RDPAccountant:
        rdp = sum([_rdp_per_step(float(q), float(s)) * n for s, q, n in acc.history])
        eps, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
        return float(eps)
    return float(acc.get_epsilon(delta=delta))
