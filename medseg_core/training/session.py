"""One local training session: data tensors + model + (optional) DP-SGD.

Framework-free: the Flower client, the pooled baseline and the local-only
baseline all train through :func:`fit`, so the three arms of a comparison
differ only in which data they see and how their privacy is planned.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from medseg_core.config import DataConfig, ModelConfig
from medseg_core.data.slices import IGNORE_LABEL, SliceSet
from medseg_core.losses import build_loss
from medseg_core.metrics import SegMetrics, evaluate_segmentation
from medseg_core.models.registry import build_model
from medseg_core.privacy.budget import RoundPrivacyPlan
from medseg_core.privacy.engine import exported_state, make_private
from medseg_core.training.loop import make_optimizer, train_epochs
from medseg_core.weak import WeakSegLoss, WeakSettings

__all__ = [
    "FitResult",
    "FitSettings",
    "build_segmenter",
    "concat_slicesets",
    "evaluate_state",
    "fit",
    "load_state",
    "steps_per_epoch",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitSettings:
    """Local optimisation settings for one session."""

    epochs: int
    lr: float
    batch_size: int
    optimizer: str = "adam"
    momentum: float = 0.0
    proximal_mu: float = 0.0
    augment: bool = True
    seed: int = 0


@dataclass(frozen=True)
class FitResult:
    """What a session produced: new weights and how it got them."""

    state: dict[str, np.ndarray]
    loss: float
    steps: int
    num_examples: int
    seconds: float


class _FlipDataset(Dataset[tuple[torch.Tensor, ...]]):
    """Tensor pairs (or triples with image-level classes) with random flips
    (image and mask flipped together)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, augment: bool,
                 classes: torch.Tensor | None = None) -> None:
        self.images, self.labels, self.augment = images, labels, augment
        self.classes = classes

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        x, y = self.images[i], self.labels[i]
        if self.augment:
            if torch.rand(()) < 0.5:
                x, y = x.flip(-1), y.flip(-1)
            if torch.rand(()) < 0.5:
                x, y = x.flip(-2), y.flip(-2)
        return (x, y) if self.classes is None else (x, y, self.classes[i])


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Optimizer steps in one epoch; Opacus' sample rate is its inverse."""
    return max(1, -(-n // batch_size))


def build_segmenter(model_cfg: ModelConfig, data_cfg: DataConfig) -> nn.Module:
    """The federation's model for this data configuration."""
    return build_model(
        model_cfg,
        in_channels=1 + 2 * data_cfg.context_slices,
        out_channels=data_cfg.num_classes,
    )


def load_state(model: nn.Module, state: Mapping[str, np.ndarray]) -> None:
    """Load numpy weights into ``model`` (strict: same keys and shapes)."""
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True)


def concat_slicesets(sets: list[SliceSet]) -> SliceSet:
    """Union of several slice sets (e.g. the pooled baseline's training data)."""
    if not sets:
        raise ValueError("concat_slicesets needs at least one SliceSet")
    offsets = np.cumsum([0] + [len(s.case_ids) for s in sets[:-1]])
    labels = (
        torch.cat([s.labels for s in sets]) if all(s.labels is not None for s in sets) else None
    )
    return SliceSet(
        images=torch.cat([s.images for s in sets]),
        labels=labels,
        case_index=torch.cat([s.case_index + int(o) for s, o in zip(sets, offsets, strict=True)]),
        case_ids=tuple(f"{i}:{c}" for i, s in enumerate(sets) for c in s.case_ids),
        classes=torch.cat([s.classes for s in sets]),
        bags=tuple(b for s in sets for b in s.bags),
    )


def fit(
    model: nn.Module,
    train: SliceSet,
    settings: FitSettings,
    *,
    num_classes: int,
    privacy: RoundPrivacyPlan | None,
    accountant: object | None = None,
    secure_mode: bool = False,
    weak: WeakSettings | None = None,
) -> FitResult:
    """Train ``model`` on ``train`` for ``settings.epochs`` epochs.

    Parameters
    ----------
    model
        Plain segmenter already holding the starting weights.
    train
        Training slices; ``train.labels`` must be present.
    privacy
        The round's DP plan, or None to train without DP.
    accountant
        The site's restored Opacus accountant (required with ``privacy``);
        it records this session's steps, so epsilon composes across rounds.
    weak
        Joint mask + image-level training (:mod:`medseg_core.weak`); the
        model needs a CAM head. Slices without masks use their ``classes``.

    Returns
    -------
    FitResult
        Exported (unwrapped) weights as numpy arrays and training statistics.
    """
    if train.labels is None and weak is None:
        raise ValueError("fit() needs labelled slices; this SliceSet has no masks")
    torch.manual_seed(settings.seed)
    anchor = (
        {k: v.detach().clone() for k, v in model.state_dict().items()}
        if settings.proximal_mu > 0
        else None
    )
    labels = train.labels if train.labels is not None else torch.full(
        (len(train), 1, *train.images.shape[-2:]), IGNORE_LABEL, dtype=torch.int64)
    dataset = _FlipDataset(train.images, labels, augment=settings.augment,
                           classes=train.classes if weak is not None else None)
    loader: DataLoader = DataLoader(dataset, batch_size=settings.batch_size, shuffle=True)
    optimizer = make_optimizer(
        model, settings.optimizer, settings.lr, momentum=settings.momentum  # type: ignore[arg-type]
    )
    loss_fn = build_loss(num_classes) if weak is None else WeakSegLoss(model, weak)
    trained: nn.Module = model
    t0 = time.perf_counter()
    if privacy is not None:
        if accountant is None:
            raise ValueError("fit() with a privacy plan needs the site's accountant")
        # WARNING: epsilon composes across rounds only because the restored
        # accountant is the one Opacus records into.
        pt = make_private(
            model, optimizer, loader,
            accountant=accountant,  # type: ignore[arg-type]
            noise_multiplier=privacy.noise_multiplier,
            max_grad_norm=privacy.max_grad_norm,
            secure_mode=secure_mode,
        )
        trained, optimizer, loader = pt.model, pt.optimizer, pt.loader
    res = train_epochs(
        trained, loader, optimizer, loss_fn,
        epochs=settings.epochs, proximal_mu=settings.proximal_mu, anchor=anchor,
    )
    state = {k: v.numpy() for k, v in exported_state(trained).items()}
    return FitResult(
        state=state, loss=res.loss, steps=res.steps, num_examples=res.num_examples,
        seconds=time.perf_counter() - t0,
    )


def evaluate_state(
    model: nn.Module,
    state: Mapping[str, np.ndarray] | None,
    data: SliceSet,
    *,
    num_classes: int,
    min_component_voxels: int = 0,
) -> SegMetrics:
    """Segmentation metrics of ``state`` (or the model's current weights) on ``data``."""
    if data.labels is None:
        raise ValueError("evaluation needs masks; this SliceSet has none")
    if state is not None:
        load_state(model, state)
    return evaluate_segmentation(
        model, data.images, data.labels, data.case_index, num_classes=num_classes,
        min_component_voxels=min_component_voxels,
    )
