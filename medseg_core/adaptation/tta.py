"""Test-time adaptation of a site's private parameters on unlabeled images.

A hospital that never trained in the federation receives the global model,
whose shared weights are tuned to the participating sites' adapted inputs and
normalisations. Its own scanner shift is absorbed by updating *only* its
private parameters (norm affine + input adapter) on its own unlabeled images
with Tent's entropy minimisation (Wang et al. 2021, ICLR, "Tent: Fully
Test-Time Adaptation by Entropy Minimization"). Entropy alone can collapse a
segmenter to all-background, so a second term keeps the batch's class
marginal close to the one the unadapted model predicted on the same images
(a prior-matching regulariser in the spirit of SHOT's diversity term, Liang
et al. 2020, ICML).

Nothing leaves the site, and no label is used, so this needs no DP budget.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["TTAResult", "adapt_unlabeled"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TTAResult:
    """Adapted private parameters and the objective before/after."""

    private: dict[str, np.ndarray]
    entropy_before: float
    entropy_after: float
    steps: int


def _objective(logits: Tensor, prior: Tensor, prior_weight: float) -> tuple[Tensor, Tensor]:
    prob = logits.softmax(dim=1)
    entropy = -(prob * logits.log_softmax(dim=1)).sum(dim=1).mean()
    marginal = prob.mean(dim=(0, 2, 3)).clamp_min(1e-8)
    kl = (marginal * (marginal.log() - prior.log())).sum()
    return entropy + prior_weight * kl, entropy


@torch.no_grad()
def _mean_entropy_and_marginal(model: nn.Module, images: Tensor, batch: int) -> tuple[float, Tensor]:
    ents, margs = [], []
    for i in range(0, len(images), batch):
        logits = model(images[i:i + batch])
        prob = logits.softmax(dim=1)
        ents.append(float(-(prob * logits.log_softmax(dim=1)).sum(dim=1).mean()) * len(prob))
        margs.append(prob.mean(dim=(2, 3)).sum(dim=0))
    n = len(images)
    return sum(ents) / n, (torch.stack(margs).sum(dim=0) / n).clamp_min(1e-8)


def adapt_unlabeled(
    model: nn.Module,
    images: Tensor,
    private_keys: Iterable[str],
    *,
    epochs: int = 2,
    lr: float = 1e-3,
    batch_size: int = 32,
    prior_weight: float = 1.0,
    seed: int = 0,
) -> TTAResult:
    """Adapt ``model``'s private parameters to unlabeled ``images``, in place.

    Parameters
    ----------
    model
        The site's full model: global shared weights + its (initial) private
        parameters. Only parameters named in ``private_keys`` change.
    images
        ``(N, C, H, W)`` float32 unlabeled slices of the site.
    private_keys
        State-dict names of the parameters to adapt
        (:func:`medseg_core.adaptation.local_keys`).
    epochs, lr, batch_size
        Adam over the private parameters only.
    prior_weight
        Weight of the class-marginal prior term (0 = plain Tent).

    Returns
    -------
    TTAResult

    Raises
    ------
    ValueError
        No private parameters to adapt (adaptation mode ``none``), or no images.
    """
    keys = frozenset(private_keys)
    params = [p for n, p in model.named_parameters() if n in keys]
    if not params:
        raise ValueError(
            "test-time adaptation needs site-private parameters; set model.adaptation to "
            "'norm', 'adapter' or 'norm+adapter'"
        )
    if len(images) == 0:
        raise ValueError("test-time adaptation needs at least one unlabeled image; the site has none")
    for n, p in model.named_parameters():
        p.requires_grad_(n in keys)
    model.eval()  # no dropout; GroupNorm has no running statistics to update
    before, prior = _mean_entropy_and_marginal(model, images, batch_size)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(params, lr=lr)
    steps = 0
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=gen)
        for i in range(0, len(images), batch_size):
            loss, _ = _objective(model(images[order[i:i + batch_size]]), prior, prior_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
    for p in model.parameters():
        p.requires_grad_(True)
    after, _ = _mean_entropy_and_marginal(model, images, batch_size)
    logger.info("test-time adaptation: %d steps, mean entropy %.4f -> %.4f", steps, before, after)
    private = {k: v.detach().numpy().copy() for k, v in model.state_dict().items() if k in keys}
    return TTAResult(private=private, entropy_before=before, entropy_after=after, steps=steps)
