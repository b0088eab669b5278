"""One local training session: data tensors + model + (optional) DP-SGD.

Framework-free: the Flower client, the pooled baseline and the local-only
baseline all train through :func:`fit`, so the three arms of a comparison
differ only in which data they see and how their privacy is planned.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from medseg_core.config import DataConfig, ModelConfig
from medseg_core.data.augment import intensity_augmentation
from medseg_core.data.slices import IGNORE_LABEL, SliceSet
from medseg_core.errors import ConfigError
from medseg_core.losses import build_loss
from medseg_core.metrics import SegMetrics, evaluate_segmentation
from medseg_core.models.heads import cam_segmenter, encoder_decoder_names
from medseg_core.models.registry import build_model
from medseg_core.privacy.budget import RoundPrivacyPlan
from medseg_core.privacy.engine import exported_state, make_private
from medseg_core.training.loop import make_optimizer, train_epochs
from medseg_core.weak.augment import strong_augment
from medseg_core.weak import WeakSegLoss, WeakSettings

__all__ = [
    "FitResult",
    "FitSettings",
    "build_segmenter",
    "concat_slicesets",
    "evaluate_state",
    "fit",
    "load_state",
    "privatise",
    "set_trainable",
    "steps_per_epoch",
    "weak_site_trainable",
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
    bag_batch_size: int | None = None  # MIL bags per step (bags.fit_bags); None: batch_size / K
    augment: bool = True
    # nnU-Net's intensity augmentations on top of the flips (medseg_core/data/augment.py)
    intensity: bool = False
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
    (image and mask flipped together) and, with ``intensity``, the
    intensity augmentation of :mod:`medseg_core.data.augment`."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, augment: bool,
                 classes: torch.Tensor | None = None, fixmatch: bool = False,
                 intensity: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.images, self.labels, self.augment = images, labels, augment
        self.classes = classes
        self.fixmatch = fixmatch and classes is not None
        self.intensity = intensity

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        x, y = self.images[i], self.labels[i]
        if self.augment:
            if torch.rand(()) < 0.5:
                x, y = x.flip(-1), y.flip(-1)
            if torch.rand(()) < 0.5:
                x, y = x.flip(-2), y.flip(-2)
        if self.intensity is not None:
            x = self.intensity(x)
        if self.classes is None:
            return x, y
        c = self.classes[i]
        if not self.fixmatch:
            return x, y, c
        # FixMatch: an unlabeled slice trains on a strong view of its weak
        # (flipped) view; the weak view rides along for the pseudo-label.
        unlabeled = int(c) < 0 and int(y.flatten()[0]) == IGNORE_LABEL
        return (strong_augment(x) if unlabeled else x), y, c, x


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


def _state_fix(keys: list[str], *, shapes: bool = False) -> str:
    """The setting that fixes a state whose ``keys`` are missing or unexpected
    in the model, or (``shapes``) differ from the model's in shape. The
    adapter's field grid adds or drops keys; its width changes shapes."""
    if not shapes and any(k.startswith("adapter.field") for k in keys):
        return ("set model.adapter_field_grid to the value the state was saved with: 0 for a "
                "state saved before the input adapter had its intensity field (stop 23), else "
                "its grid")
    if any(k.startswith("adapter.") for k in keys):
        return ("set model.adapter_hidden and model.adapter_depth to the values the state was "
                "saved with (8 and 1 before they were settings)")
    return "build the model from the config the state was saved with (the run's scenario.json)"


def load_state(model: nn.Module, state: Mapping[str, np.ndarray]) -> None:
    """Load numpy weights into ``model`` (strict: same keys and shapes).

    Raises
    ------
    ConfigError
        The keys or shapes differ (the model was built from another config
        than the state was saved with); the missing, unexpected and
        mis-shaped keys are named, with the setting that fixes them.
    """
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ConfigError(f"the state does not fit the model: missing {len(missing)} key(s) "
                          f"{missing[:6]}, unexpected {len(unexpected)} {unexpected[:6]}. "
                          f"Fix: {_state_fix(missing + unexpected)}")
    shapes = {k: (tuple(np.shape(v)), tuple(own[k].shape)) for k, v in state.items()
              if tuple(np.shape(v)) != tuple(own[k].shape)}
    if shapes:
        named = [f"{k}: {a} in the state, {b} in the model" for k, (a, b) in sorted(shapes.items())]
        raise ConfigError(f"the state does not fit the model: {len(shapes)} key(s) differ in "
                          f"shape ({'; '.join(named[:4])}). Fix: {_state_fix(sorted(shapes), shapes=True)}")
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


def privatise(
    model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader,
    privacy: RoundPrivacyPlan, accountant: object | None, secure_mode: bool,
) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader]:
    """Opacus DP-SGD wrappers for this round's plan, recording into ``accountant``."""
    if accountant is None:
        raise ValueError("training with a privacy plan needs the site's accountant")
    # WARNING: epsilon composes across rounds only because the restored
    # accountant is the one Opacus records into.
    pt = make_private(
        model, optimizer, loader,
        accountant=accountant,  # type: ignore[arg-type]
        noise_multiplier=privacy.noise_multiplier,
        max_grad_norm=privacy.max_grad_norm,
        secure_mode=secure_mode,
    )
    return pt.model, pt.optimizer, pt.loader


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
    only: frozenset[str] | None = None,
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
    only
        Train only these parameters (state-dict names); the others are
        frozen and exported unchanged (post-federation personalisation of
        the private adaptation layers). None: every parameter the loss uses.

    Returns
    -------
    FitResult
        Exported (unwrapped) weights as numpy arrays and training statistics.
    """
    if train.labels is None and weak is None:
        raise ValueError("fit() needs labelled slices; this SliceSet has no masks")
    torch.manual_seed(settings.seed)
    set_trainable(model, cam_used=weak is not None, mil_used=False, only=only)
    anchor = (
        {k: v.detach().clone() for k, v in model.state_dict().items()}
        if settings.proximal_mu > 0
        else None
    )
    labels = train.labels if train.labels is not None else torch.full(
        (len(train), 1, *train.images.shape[-2:]), IGNORE_LABEL, dtype=torch.int64)
    dataset = _FlipDataset(train.images, labels, augment=settings.augment,
                           classes=train.classes if weak is not None else None,
                           fixmatch=weak is not None and weak.fixmatch,
                           intensity=intensity_augmentation(settings.seed) if settings.intensity
                           else None)
    loader: DataLoader = DataLoader(dataset, batch_size=settings.batch_size, shuffle=True)
    optimizer = make_optimizer(
        model, settings.optimizer, settings.lr, momentum=settings.momentum  # type: ignore[arg-type]
    )
    loss_fn = build_loss(num_classes) if weak is None else WeakSegLoss(model, weak)
    trained: nn.Module = model
    t0 = time.perf_counter()
    if privacy is not None:
        trained, optimizer, loader = privatise(model, optimizer, loader, privacy, accountant,
                                               secure_mode)
    res = train_epochs(
        trained, loader, optimizer, loss_fn,
        epochs=settings.epochs, proximal_mu=settings.proximal_mu, anchor=anchor,
    )
    state = {k: v.numpy() for k, v in exported_state(trained).items()}
    return FitResult(
        state=state, loss=res.loss, steps=res.steps, num_examples=res.num_examples,
        seconds=time.perf_counter() - t0,
    )


def weak_site_trainable(model: nn.Module, freeze: str,
                        private: frozenset[str] = frozenset()) -> frozenset[str] | None:
    """What a site without masks trains under ``train.weak.weak_sites_freeze``:
    every parameter but the frozen part of the shared segmenter (its
    ``"decoder"`` or ``"encoder"``, :func:`medseg_core.models.heads.encoder_decoder_names`);
    the site's ``private`` adaptation layers always train. None for ``"none"``
    (everything trains), as :func:`fit`'s ``only`` takes it."""
    if freeze == "none":
        return None
    encoder, decoder = encoder_decoder_names(model)
    frozen = {"decoder": decoder, "encoder": encoder}[freeze] - private
    return frozenset(n for n, _ in model.named_parameters() if n not in frozen)


def set_trainable(model: nn.Module, *, cam_used: bool, mil_used: bool,
                  only: frozenset[str] | None) -> None:
    """Which parameters this kind of training updates. Heads it does not use
    get no gradient (Opacus needs a per-sample gradient for every trainable
    parameter); with ``only``, nothing outside it trains either. Frozen
    weights are still exported unchanged."""
    seg = cam_segmenter(model)
    if seg is not None:
        seg.cam_head.requires_grad_(cam_used)
        if seg.mil_head is not None:
            seg.mil_head.requires_grad_(mil_used)
    if only is not None:
        for name, p in model.named_parameters():
            p.requires_grad_(p.requires_grad and name in only)


def evaluate_state(
    model: nn.Module,
    state: Mapping[str, np.ndarray] | None,
    data: SliceSet,
    *,
    num_classes: int,
    min_component_voxels: int = 0,
    case_keep: torch.Tensor | None = None,
    refine: str = "none",
    threshold: float | None = None,
) -> SegMetrics:
    """Segmentation metrics of ``state`` (or the model's current weights) on
    ``data`` (``case_keep``, ``refine``, ``threshold``: see
    :func:`medseg_core.metrics.evaluate_segmentation`)."""
    if data.labels is None:
        raise ValueError("evaluation needs masks; this SliceSet has none")
    if state is not None:
        load_state(model, state)
    return evaluate_segmentation(
        model, data.images, data.labels, data.case_index, num_classes=num_classes,
        min_component_voxels=min_component_voxels, case_keep=case_keep, refine=refine,
        threshold=threshold,
    )
