"""Which parameters are site-private, and the split every outgoing state takes.

FedBN (Li et al. 2021, ICLR, "FedBN: Federated Learning on Non-IID Features
via Local Batch Normalization") and SiloBN (Andreux et al. 2020, MICCAI DCL)
keep normalisation layers local so each site's feature statistics stay its
own. Our models use GroupNorm (DP-compatible, no running statistics), so what
stays local is each norm layer's affine scale and shift; with the input
adapter (:mod:`.layers`), its weights stay local too.

WARNING: privacy invariant. Site-private parameters are never sent: every
state that leaves a site goes through :func:`split_state` and then
:func:`check_shared_only`, which raises before a message can be built.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypeVar

from torch import nn

from medseg_core.adaptation.layers import ADAPTER_PREFIX
from medseg_core.config import AdaptationMode
from medseg_core.errors import AdaptationLeakError

__all__ = ["check_shared_only", "local_keys", "merge_state", "split_state"]

V = TypeVar("V")

_NORMS = (nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm)


def local_keys(model: nn.Module, mode: AdaptationMode) -> frozenset[str]:
    """State-dict keys of ``model`` that stay at the site under ``mode``.

    Parameters
    ----------
    model
        The site's model as built by
        :func:`medseg_core.training.session.build_segmenter` (not wrapped by
        Opacus).
    mode
        ``none``: nothing is local; ``norm``: every normalisation layer's
        affine parameters; ``adapter``: the input adapter; ``norm+adapter``:
        both.

    Raises
    ------
    ValueError
        ``mode`` asks for an adapter the model does not have.
    """
    mode = AdaptationMode(mode)
    keys: set[str] = set()
    if mode in (AdaptationMode.NORM, AdaptationMode.NORM_ADAPTER):
        for name, sub in model.named_modules():
            if isinstance(sub, _NORMS):
                keys.update(f"{name}.{p}" if name else p for p, _ in sub.named_parameters(recurse=False))
    if mode in (AdaptationMode.ADAPTER, AdaptationMode.NORM_ADAPTER):
        adapter = [k for k in model.state_dict() if k.startswith(ADAPTER_PREFIX)]
        if not adapter:
            raise ValueError(
                f"adaptation mode {mode.value!r} needs an input adapter but the model has no "
                f"'{ADAPTER_PREFIX}*' parameters; build it with build_segmenter()"
            )
        keys.update(adapter)
    return frozenset(keys)


def split_state(
    state: Mapping[str, V], local: Iterable[str]
) -> tuple[dict[str, V], dict[str, V]]:
    """``(shared, private)`` parts of a full state dict."""
    local = frozenset(local)
    shared = {k: v for k, v in state.items() if k not in local}
    private = {k: v for k, v in state.items() if k in local}
    return shared, private


def merge_state(shared: Mapping[str, V], private: Mapping[str, V]) -> dict[str, V]:
    """The full state: the global shared weights plus this site's private ones.

    Raises
    ------
    AdaptationLeakError
        The global state contains a key the site keeps private (the server
        must never hold one; a mismatched server and site configuration).
    """
    check_shared_only(shared, private.keys(), what="global model from the server")
    return {**shared, **private}


def check_shared_only(state: Mapping[str, object], local: Iterable[str], *, what: str) -> None:
    """Raise if ``state`` holds any site-private key.

    Raises
    ------
    AdaptationLeakError
        Naming the offending keys; nothing is sent.
    """
    leaked = sorted(set(state) & frozenset(local))
    if leaked:
        shown = ", ".join(leaked[:5]) + (f" (+{len(leaked) - 5} more)" if len(leaked) > 5 else "")
        raise AdaptationLeakError(
            f"{what} holds {len(leaked)} site-private adaptation parameter(s): {shown}; "
            "adaptation layers never leave a site. Refused before sending. Fix: export "
            "the state through medseg_core.adaptation.split_state and send only the shared part"
        )
