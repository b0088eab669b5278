"""Opacus glue: make a model/optimizer/loader private, and unwrap for export.

DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy",
arXiv:1607.00133): every step samples a Poisson batch, clips each sample's
gradient to L2 norm ``max_grad_norm`` and adds Gaussian noise of std
``noise_multiplier * max_grad_norm`` to the sum. Opacus (Yousefpour et al.
2021, arXiv:2109.12298) implements the three pieces as a wrapped model
(per-sample gradients), a ``DPOptimizer`` (clip + noise + accounting hook)
and a ``DPDataLoader`` (Poisson sampling).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal, cast

import torch
from opacus import PrivacyEngine
from opacus.accountants import IAccountant
from opacus.grad_sample import AbstractGradSampleModule
from torch import Tensor, nn
from torch.utils.data import DataLoader

from medseg_core.errors import ConfigError
from medseg_core.models.registry import validate_dp_compatible

__all__ = [
    "GRAD_SAMPLE_MODES",
    "PrivateTraining",
    "exported_state",
    "make_private",
    "poisson_sample_rate",
    "unwrap",
]

logger = logging.getLogger(__name__)

GRAD_SAMPLE_MODES: tuple[str, ...] = ("hooks", "functorch")
"""Supported Opacus per-sample gradient modes.

``ghost`` clipping is not offered: it only has norm samplers for ``Linear``
and ``Embedding``, which the segmenters do not use, so it is slower here
(see ``benchmarks/dp_step.py``), and it changes the loss API.
"""


@dataclass
class PrivateTraining:
    """The private counterparts of a model, optimizer and loader for one round.

    Attributes
    ----------
    model
        Opacus ``GradSampleModule`` wrapping the plain model (parameters and
        ``state_dict`` keys under ``_module.``); train this one, export with
        :func:`exported_state` or :func:`unwrap`.
    optimizer
        ``opacus.optimizers.DPOptimizer`` around the given optimizer.
    loader
        Poisson-sampled ``DPDataLoader`` (batches of random size, possibly 0).
    accountant
        The very accountant object passed in; each optimizer step appends to
        its history. Save it with
        :func:`medseg_core.privacy.accountant.accountant_to_dict` after the
        round.
    sample_rate
        Poisson sample rate recorded per step (``1 / len(original loader)``).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    accountant: IAccountant
    sample_rate: float = 0.0


def poisson_sample_rate(loader: DataLoader) -> float:
    """The sample rate Opacus will use and record for ``loader``: ``1 / len(loader)``.

    Plan rounds (:func:`medseg_core.privacy.budget.plan_round`) with this
    value, and ``epochs * len(loader)`` steps, so the plan matches what the
    accountant will record.
    """
    n = len(loader)
    if n < 1:
        raise ConfigError("the data loader is empty; a site needs at least one training batch")
    return 1.0 / n


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    *,
    accountant: IAccountant,
    noise_multiplier: float,
    max_grad_norm: float,
    secure_mode: bool = False,
    grad_sample_mode: Literal["hooks", "functorch"] | str = "hooks",
) -> PrivateTraining:
    """Wrap ``model``, ``optimizer`` and ``loader`` for DP-SGD, recording into ``accountant``.

    Parameters
    ----------
    model
        A plain DP-compatible module (see
        :func:`medseg_core.models.validate_dp_compatible`), or the ``model``
        of a previous :class:`PrivateTraining` (it is unwrapped first).
    optimizer
        Optimizer over ``model``'s parameters (e.g. from
        :func:`medseg_core.training.make_optimizer`).
    loader
        Training loader over a map-style dataset yielding ``(image, label)``;
        its ``len`` fixes the sample rate ``1 / len(loader)``.
    accountant
        The site's restored accountant (see
        :func:`medseg_core.privacy.accountant.load_accountant`).
    noise_multiplier
        Sigma >= 0 (0 only for tests: no privacy).
    max_grad_norm
        Per-sample clipping bound ``C`` > 0.
    secure_mode
        Use a cryptographically secure RNG for noise and sampling (needs
        ``torchcsprng``).
    grad_sample_mode
        One of :data:`GRAD_SAMPLE_MODES`.

    Returns
    -------
    PrivateTraining

    Raises
    ------
    ConfigError
        Model not DP-compatible, argument out of range, unknown mode, optimizer
        not over the model's parameters, or ``secure_mode`` without
        ``torchcsprng``.
    """
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ConfigError(
            f"unsupported grad_sample_mode {grad_sample_mode!r}; valid: {list(GRAD_SAMPLE_MODES)}"
        )
    if not (isinstance(noise_multiplier, int | float) and math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ConfigError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier!r}")
    if not (isinstance(max_grad_norm, int | float) and math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise ConfigError(f"max_grad_norm must be finite and > 0, got {max_grad_norm!r}")
    if noise_multiplier == 0:
        logger.warning("noise_multiplier=0: gradients are clipped but not noised (no privacy)")
    if isinstance(model, AbstractGradSampleModule):
        model = unwrap(model)
    if hasattr(model, "autograd_grad_sample_hooks"):
        raise ConfigError(
            "the model still carries Opacus hooks from an earlier make_private; pass the "
            "previous PrivateTraining.model (it is unwrapped automatically) or unwrap() it first"
        )
    validate_dp_compatible(model)
    own = {id(p) for p in model.parameters()}
    foreign = sum(1 for g in optimizer.param_groups for p in g["params"] if id(p) not in own)
    if foreign:
        raise ConfigError(
            f"the optimizer holds {foreign} parameter(s) that are not the model's; build the "
            "optimizer from this model's parameters (make_optimizer(model, ...))"
        )
    model.train()
    try:
        engine = PrivacyEngine(accountant=accountant.mechanism(), secure_mode=secure_mode)
    except ImportError as exc:
        raise ConfigError(
            f"secure_mode=True needs the torchcsprng package ({exc}); install it or set "
            "secure_mode: false in the site config"
        ) from None
    # WARNING: privacy invariant. Epsilon composes across rounds and restarts
    # only if every round's optimizer records into the site's restored
    # accountant. The engine's own fresh accountant must be replaced BEFORE
    # make_private: make_private binds the optimizer's step hook to
    # engine.accountant. A fresh accountant per round would under-report
    # epsilon.
    engine.accountant = accountant
    # Without ghost clipping Opacus returns (module, optimizer, loader).
    private_model, private_optimizer, private_loader = cast(
        tuple[nn.Module, torch.optim.Optimizer, DataLoader],
        engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=float(noise_multiplier),
            max_grad_norm=float(max_grad_norm),
            poisson_sampling=True,
            grad_sample_mode=grad_sample_mode,
            wrap_model=True,
        ),
    )
    sample_rate = poisson_sample_rate(loader)
    logger.info(
        "DP-SGD: sigma=%.4f C=%.3g q=%.4g (%d batches/epoch), mode=%s, accountant=%s with %d prior entries",
        noise_multiplier,
        max_grad_norm,
        sample_rate,
        len(loader),
        grad_sample_mode,
        accountant.mechanism(),
        len(accountant.history),
    )
    return PrivateTraining(
        model=private_model,
        optimizer=private_optimizer,
        loader=private_loader,
        accountant=accountant,
        sample_rate=sample_rate,
    )


def _inner(model: nn.Module) -> nn.Module:
    while isinstance(model, AbstractGradSampleModule):
        model = cast(nn.Module, model._module)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside an Opacus wrapper, with hooks and per-sample state removed.

    Uses Opacus' public ``to_standard_module()``. After this the wrapper must
    not be trained any more (its hooks are gone); build a new
    :class:`PrivateTraining` for the next round. A plain module is returned
    unchanged.

    Returns
    -------
    nn.Module
        Its ``state_dict`` keys are those of the original model (no
        ``_module.`` prefix) and its parameters carry no ``grad_sample``.
    """
    # WARNING: privacy invariant. Per-sample gradients (grad_sample) must
    # never leave the site; to_standard_module() deletes them with the hooks.
    while isinstance(model, AbstractGradSampleModule):
        model = model.to_standard_module()
    return model


def exported_state(model: nn.Module) -> dict[str, Tensor]:
    """Detached CPU copies of the plain model's ``state_dict``.

    Works on a plain module or an Opacus wrapper, without tearing down the
    wrapper's hooks (so it can be called between epochs). Keys are the plain
    model's keys.

    Returns
    -------
    dict[str, Tensor]
        Key -> tensor with the parameter's shape and dtype, on CPU, sharing
        no memory with the model.
    """
    return {k: v.detach().to("cpu", copy=True) for k, v in _inner(model).state_dict().items()}
