"""Simulated misbehaving sites, for robustness tests and scenarios only.

A site whose config sets ``attack`` corrupts the update it sends, after
training, exactly as a faulty or malicious participant would. Real sites
leave it at ``"none"``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from medseg_core.config import Attack

__all__ = ["apply_attack"]


def apply_attack(
    attack: Attack, local: Mapping[str, np.ndarray], global_: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The update a site with ``attack`` would send instead of ``local``.

    Parameters
    ----------
    attack
        ``none`` returns ``local``; ``nan`` fills floating arrays with NaN;
        ``sign_flip`` sends ``g - (l - g)``; ``scale`` sends ``g + 10 (l - g)``
        (a boosted honest update: harmless or even helpful to an under-trained
        model, a model-replacement lever otherwise); ``flip_scale`` sends
        ``g - 10 (l - g)``, the reversed update boosted (Blanchard et al. 2017 /
        Fang et al. 2020 style model poisoning).
    """
    out: dict[str, np.ndarray] = {}
    for k, v in local.items():
        g = global_[k]
        if attack is Attack.NONE or not np.issubdtype(v.dtype, np.floating):
            out[k] = v
        elif attack is Attack.NAN:
            out[k] = np.full_like(v, np.nan)
        elif attack is Attack.SIGN_FLIP:
            out[k] = (g - (v - g)).astype(v.dtype)
        elif attack is Attack.SCALE:
            out[k] = (g + 10.0 * (v - g)).astype(v.dtype)
        elif attack is Attack.FLIP_SCALE:
            out[k] = (g - 10.0 * (v - g)).astype(v.dtype)
        else:  # pragma: no cover - exhaustive over the enum
            raise ValueError(f"unknown attack {attack!r}")
    return out
