"""Cases -> 2D training tensors.

Every case becomes one or more 2D slices of a fixed size: a 2D image is one
slice, a 3D volume ``(H, W, D)`` gives ``D`` slices along its last axis. With
``context_slices = k`` each slice carries its ``k`` neighbours on each side as
extra channels (2.5D input), edge-replicated at the volume's ends.

Intensities are z-scored per case on the native image (before resizing), so
sites with different scanners meet the model on one scale.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from medseg_core.data.datalist import Case
from medseg_core.data.io import read_image
from medseg_core.errors import DataIntegrityError

__all__ = ["IGNORE_LABEL", "STD_FLOOR", "SliceSet", "load_slices", "split_cases"]

logger = logging.getLogger(__name__)

#: Mask value of slices whose case has no mask, in a set where other cases do.
IGNORE_LABEL = -1
STD_FLOOR = 1e-6


@dataclass(frozen=True)
class SliceSet:
    """2D slices of a set of cases, ready for a 2D segmenter.

    Attributes
    ----------
    images
        ``(N, C, S, S)`` float32, ``C = 1 + 2 * context_slices``, ``S = image_size``;
        per-case z-scored intensities.
    labels
        ``(N, 1, S, S)`` int64 mask values, or ``None`` when no case in the set
        has a mask. Slices of mask-less cases in a set where others have masks
        are filled with :data:`IGNORE_LABEL` (-1); see :attr:`has_mask`.
    case_index
        ``(N,)`` int64 position in :attr:`case_ids` of each slice's case.
    case_ids
        The cases, in input order.
    classes
        ``(N,)`` int64 slice-level image label: 1 if the slice's native mask has
        any foreground, else 0; for mask-less cases the case's ``"class"``; else -1.
    bags
        Per slice, the case's bag id (or ``None``).
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    case_index: torch.Tensor
    case_ids: tuple[str, ...]
    classes: torch.Tensor
    bags: tuple[str | None, ...]

    def __post_init__(self) -> None:
        n = self.images.shape[0]
        lengths = {
            "labels": None if self.labels is None else self.labels.shape[0],
            "case_index": self.case_index.shape[0],
            "classes": self.classes.shape[0],
            "bags": len(self.bags),
        }
        wrong = {k: v for k, v in lengths.items() if v is not None and v != n}
        if wrong:
            raise ValueError(
                f"SliceSet fields disagree in length: images has {n} slices but {wrong}; "
                "build SliceSets with load_slices or subset"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def has_mask(self) -> torch.Tensor:
        """``(N,)`` bool: whether each slice has a real mask (not ignore-filled)."""
        if self.labels is None:
            return torch.zeros(len(self), dtype=torch.bool)
        return self.labels[:, 0, 0, 0] != IGNORE_LABEL

    def subset(self, case_positions: Sequence[int]) -> SliceSet:
        """The slices of some cases, in the given case order.

        Parameters
        ----------
        case_positions
            Positions into :attr:`case_ids` (e.g. from :func:`split_cases`).

        Raises
        ------
        ValueError
            A position is out of range or repeated.
        """
        positions = [int(p) for p in case_positions]
        bad = [p for p in positions if not 0 <= p < len(self.case_ids)]
        if bad or len(set(positions)) != len(positions):
            raise ValueError(
                f"case positions {positions} must be distinct and within "
                f"[0, {len(self.case_ids)}); offending: {bad or 'repeated entries'}"
            )
        order = [torch.nonzero(self.case_index == p, as_tuple=True)[0] for p in positions]
        idx = torch.cat(order) if order else torch.zeros(0, dtype=torch.int64)
        new_index = torch.cat(
            [torch.full((len(o),), i, dtype=torch.int64) for i, o in enumerate(order)]
        ) if order else torch.zeros(0, dtype=torch.int64)
        labels = self.labels[idx] if self.labels is not None else None
        if labels is not None and bool((labels[:, 0, 0, 0] == IGNORE_LABEL).all()):
            labels = None  # no case of the subset has a mask
        return SliceSet(
            images=self.images[idx],
            labels=labels,
            case_index=new_index,
            case_ids=tuple(self.case_ids[p] for p in positions),
            classes=self.classes[idx],
            bags=tuple(self.bags[int(i)] for i in idx),
        )


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _as_slices(volume: np.ndarray) -> torch.Tensor:
    """``(H, W)`` or ``(H, W, D)`` -> ``(D, 1, H, W)`` float32 (D = 1 for 2D)."""
    stack = volume[None] if volume.ndim == 2 else np.moveaxis(volume, 2, 0)
    return torch.from_numpy(np.ascontiguousarray(stack, dtype=np.float32))[:, None]


def _with_context(slices: torch.Tensor, context: int) -> torch.Tensor:
    """``(D, 1, S, S)`` -> ``(D, 1 + 2*context, S, S)``: neighbours, edge-replicated.

    A single slice (a 2D image) is replicated into every channel.
    """
    if context == 0:
        return slices
    depth = slices.shape[0]
    offsets = torch.arange(-context, context + 1)
    idx = (torch.arange(depth)[:, None] + offsets[None, :]).clamp(0, depth - 1)  # (D, C)
    return slices[:, 0][idx]


def _resize(x: torch.Tensor, size: int, *, nearest: bool) -> torch.Tensor:
    if tuple(x.shape[-2:]) == (size, size):
        return x
    if nearest:
        return F.interpolate(x, size=(size, size), mode="nearest-exact")
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True)


def load_slices(
    cases: Sequence[Case],
    *,
    image_size: int,
    context_slices: int = 0,
    require_labels: bool = True,
) -> SliceSet:
    """Read cases and turn them into resized, normalised 2D slices.

    Parameters
    ----------
    cases
        Cases to load (e.g. ``datalist.split("training")``), each read once.
    image_size
        Side ``S`` of the square output slices; bilinear (antialiased)
        resizing for images, nearest for masks.
    context_slices
        Neighbouring slices on each side added as channels (3D volumes;
        edge-replicated). 2D images are replicated into every channel.
    require_labels
        Raise if a case has no mask (segmentation training). With ``False``,
        mask-less cases keep only their ``"class"`` / ``"bag"``.

    Returns
    -------
    SliceSet

    Raises
    ------
    DataIntegrityError
        ``require_labels`` and some cases have no mask (all are named); an
        image cannot be read; an image and its mask differ in shape.
    ValueError
        ``image_size < 1`` or ``context_slices < 0``.
    """
    if image_size < 1 or context_slices < 0:
        raise ValueError(
            f"image_size={image_size} must be >= 1 and context_slices={context_slices} >= 0"
        )
    if require_labels:
        missing = [c.case_id for c in cases if c.label is None]
        if missing:
            raise DataIntegrityError(
                f"{len(missing)} case(s) have no \"label\" mask but labels are required: "
                f"{missing[:20]}{' ...' if len(missing) > 20 else ''}; add the masks to "
                "dataset.json, or load with require_labels=False for weak supervision"
            )
    channels = 1 + 2 * context_slices
    any_mask = any(c.label is not None for c in cases)
    images: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    classes: list[torch.Tensor] = []
    index: list[torch.Tensor] = []
    bags: list[str | None] = []
    with _torch_threads(1):
        for pos, case in enumerate(cases):
            image, _ = read_image(case.image)
            mean = float(image.mean(dtype=np.float64))
            std = max(float(image.std(dtype=np.float64)), STD_FLOOR)
            norm = (image - mean) / std
            # resize slice by slice first, then gather context: memory stays O(D*S*S*C)
            resized = _resize(_as_slices(norm), image_size, nearest=False)
            images.append(_with_context(resized, context_slices))
            n = resized.shape[0]
            if case.label is not None:
                mask, _ = read_image(case.label)
                if mask.shape != image.shape:
                    raise DataIntegrityError(
                        f"case {case.case_id}: image shape {image.shape} != label shape "
                        f"{mask.shape}; run check_site on the site for a full report"
                    )
                mask_t = _as_slices(np.rint(mask))  # (n, 1, H, W)
                labels.append(_resize(mask_t, image_size, nearest=True).to(torch.int64))
                classes.append((mask_t.flatten(1) > 0).any(dim=1).to(torch.int64))
            else:
                if any_mask:
                    labels.append(
                        torch.full((n, 1, image_size, image_size), IGNORE_LABEL,
                                   dtype=torch.int64)
                    )
                value = case.cls if case.cls is not None else -1
                classes.append(torch.full((n,), value, dtype=torch.int64))
            index.append(torch.full((n,), pos, dtype=torch.int64))
            bags.extend([case.bag] * n)
    empty = torch.zeros(0, dtype=torch.int64)
    result = SliceSet(
        images=torch.cat(images) if images else torch.zeros(0, channels, image_size, image_size),
        labels=torch.cat(labels) if any_mask else None,
        case_index=torch.cat(index) if index else empty,
        case_ids=tuple(c.case_id for c in cases),
        classes=torch.cat(classes) if classes else empty,
        bags=tuple(bags),
    )
    logger.debug("loaded %d slices from %d cases", len(result), len(cases))
    return result


def split_cases(n_cases: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split case positions into train and validation, by case.

    Splitting by case (never by slice) keeps the slices of one volume on one
    side. ``n_val = round(n_cases * val_fraction)``, at least 1 when
    ``val_fraction > 0`` and ``n_cases >= 2``, and at most ``n_cases - 1``
    (train is never empty).

    Parameters
    ----------
    n_cases
        Number of cases (>= 1).
    val_fraction
        In ``[0, 1)``; 0 gives an empty validation list.
    seed
        Seed of the permutation: same arguments, same split.

    Returns
    -------
    train, val : list[int]
        Sorted, disjoint case positions covering ``range(n_cases)``.

    Raises
    ------
    ValueError
        ``n_cases < 1`` or ``val_fraction`` outside ``[0, 1)``.
    """
    if n_cases < 1:
        raise ValueError(f"n_cases={n_cases}; a site needs at least 1 case to train on")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction}; expected a value in [0, 1)")
    n_val = round(n_cases * val_fraction)
    if val_fraction > 0 and n_cases >= 2:
        n_val = max(n_val, 1)
    n_val = min(n_val, n_cases - 1)
    perm = np.random.default_rng(seed).permutation(n_cases)
    return sorted(int(i) for i in perm[n_val:]), sorted(int(i) for i in perm[:n_val])
