"""MIL training: a site whose labels are on bags (a volume as a bag of slices).

A bag is one DP-SGD sample: Opacus' per-row gradients are folded into
per-bag gradients before clipping, so the accountant's sample is the unit
the label belongs to. The slice-level loop is :func:`medseg_core.training.session.fit`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from medseg_core.data.augment import intensity_augmentation
from medseg_core.privacy.budget import RoundPrivacyPlan
from medseg_core.privacy.engine import exported_state
from medseg_core.training.loop import make_optimizer
from medseg_core.training.session import FitResult, FitSettings, privatise, set_trainable
from medseg_core.weak import BagSet, MilLoss, WeakSettings, fold_bag_grad_samples

__all__ = ["bag_batch_size", "fit_bags"]


class _IntensityBags(Dataset[tuple[torch.Tensor, ...]]):
    """Bags ``(K, C, H, W)`` with one intensity-augmentation draw per bag (a
    volume comes from one scanner: its slices share the draw)."""

    def __init__(self, bags: Dataset, intensity: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.bags, self.intensity = bags, intensity

    def __len__(self) -> int:
        return len(self.bags)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        x, *rest = self.bags[i]
        return (self.intensity(x.reshape(-1, *x.shape[2:])).reshape(x.shape), *rest)


def bag_batch_size(batch_size: int, bag_len: int, bags: int | None = None) -> int:
    """Bags per step: ``bags`` if given (``train.bag_batch_size``), else about
    ``batch_size`` instances (at least one bag)."""
    if bags is not None:
        return bags
    return max(1, round(batch_size / max(1, bag_len)))


def fit_bags(
    model: nn.Module,
    bags: BagSet,
    settings: FitSettings,
    *,
    privacy: RoundPrivacyPlan | None,
    accountant: object | None = None,
    secure_mode: bool = False,
    weak: WeakSettings | None = None,
    only: frozenset[str] | None = None,
) -> FitResult:
    """Train ``model`` (with a MIL head) on bag-labelled data for
    ``settings.epochs`` epochs; a bag is one DP-SGD sample.

    Each step draws :func:`bag_batch_size` bags. Under DP, per-row
    gradients are folded into per-bag gradients before clipping
    (:func:`medseg_core.weak.mil.fold_bag_grad_samples`). ``only``: as in
    :func:`fit`.
    """
    torch.manual_seed(settings.seed)
    set_trainable(model, cam_used=True, mil_used=True, only=only)
    k = int(bags.images.shape[1])
    bag_data: Dataset = TensorDataset(bags.images, bags.valid, bags.labels)
    if settings.intensity:
        bag_data = _IntensityBags(bag_data, intensity_augmentation(settings.seed))
    loader: DataLoader = DataLoader(
        bag_data, batch_size=bag_batch_size(settings.batch_size, k, settings.bag_batch_size),
        shuffle=True)
    optimizer = make_optimizer(
        model, settings.optimizer, settings.lr, momentum=settings.momentum  # type: ignore[arg-type]
    )
    loss_fn = MilLoss(model, weak)
    trained: nn.Module = model
    t0 = time.perf_counter()
    if privacy is not None:
        trained, optimizer, loader = privatise(model, optimizer, loader, privacy, accountant,
                                               secure_mode)
    trained.train()
    losses, steps, examples = [], 0, 0
    for _ in range(settings.epochs):
        for x, valid, y in loader:
            b = int(x.shape[0])
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(trained(x.reshape(b * k, *x.shape[2:])), (valid, y))
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"MIL training loss became {loss.item()} at step {steps + 1}; lower train.lr"
                )
            loss.backward()
            if privacy is not None:
                fold_bag_grad_samples(trained, b, k)
            optimizer.step()
            steps += 1
            if b:
                losses.append(float(loss.detach()))
                examples += b
    state = {k_: v.numpy() for k_, v in exported_state(trained).items()}
    return FitResult(
        state=state, loss=float(np.mean(losses)) if losses else float("nan"), steps=steps,
        num_examples=examples, seconds=time.perf_counter() - t0,
    )
