"""Multiple-instance learning: segmenters from bag-level labels.

A bag is a patient-level unit whose label is positive if any member is: a
volume as a bag of slices, or a set of 2D images. The privacy unit is the
bag: a bag is one DP-SGD sample, so it is clipped once as a whole.

Per-bag gradients under Opacus. The network sees a batch of ``B`` bags of
``K`` instances as ``B * K`` rows, and Opacus' hooks produce one gradient per
row. The gradient of a bag's loss is the sum of its rows' gradients (each row
belongs to one bag and the loss is a sum over bags), so
:func:`fold_bag_grad_samples` sums each bag's rows before Opacus clips:
clipping and noise then act per bag, as the accountant assumes. (Opacus
scales row gradients by the batch size it sees at each layer, ``B * K``
rather than ``B`` for the instance layers; the fold divides by ``K`` to undo
that. A test checks the folded gradients against per-bag gradients computed
one bag at a time.)

Loss per bag (:class:`MilLoss`), mean over bags:

* bag classification: binary cross-entropy of the MIL head's bag logit
  (:class:`medseg_core.models.heads.MilHead`, gated attention or max); with
  ``train.weak.mil_head_detach`` the head reads the encoder's features
  detached, so this term trains the head alone;
* a **negative** bag: every member is lesion-free, so its pixels are exact
  background (cross-entropy) and every member's CAM image logit is 0;
* a **positive** bag: the smooth-max (log-sum-exp) of the decoder's
  foreground-vs-background logit over all the bag's pixels must say "lesion
  somewhere"; and its key instances (attention at least uniform ``1/K``)
  get the refined CAM pseudo-mask of :func:`medseg_core.weak.pseudo.pseudo_masks`;
  with ``train.weak.size_prior`` the bag as a whole also gets the size
  constraint of :func:`medseg_core.weak.pseudo.size_prior_loss` (its most
  lesion-like pixels over all members, if it predicts too few).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medseg_core.data.datalist import Case
from medseg_core.data.slices import SliceSet
from medseg_core.errors import DataIntegrityError
from medseg_core.models.heads import cam_segmenter
from medseg_core.weak.pseudo import pseudo_mask_ce, size_prior_loss
from medseg_core.weak.settings import WeakSettings, cam_image_logit, image_label_loss

__all__ = ["BagSet", "MilLoss", "bags_from_slices", "check_bags", "fold_bag_grad_samples",
           "instance_embeddings"]


@dataclass(frozen=True)
class BagSet:
    """Bags as padded tensors.

    Attributes
    ----------
    images
        ``(N, K, C, S, S)`` float32; ``K`` is the largest bag, smaller bags
        are zero-padded.
    valid
        ``(N, K)`` bool: real instances.
    labels
        ``(N,)`` int64 bag labels (0/1).
    bag_ids
        The bags, in order.
    """

    images: Tensor
    valid: Tensor
    labels: Tensor
    bag_ids: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.images.shape[0])


def check_bags(cases: Sequence[Case], site_id: str) -> dict[str, int]:
    """Bag labels of a site's training cases, after checking them.

    Raises
    ------
    DataIntegrityError
        Cases without a bag among bagged ones, a bag member without a
        ``class``, members of one bag with conflicting labels, or no positive
        bag at all; every offending case or bag is named.
    """
    loose = [c.case_id for c in cases if c.bag is None]
    if loose:
        raise DataIntegrityError(
            f"site {site_id!r} trains on MIL bags but {len(loose)} training case(s) have no "
            f"'bag': {loose[:10]}. Fix: give every training case a \"bag\" id (a case of its "
            "own is a bag of one), or move them to another site"
        )
    unlabeled = [c.case_id for c in cases if c.cls is None]
    if unlabeled:
        raise DataIntegrityError(
            f"site {site_id!r}: {len(unlabeled)} bag member(s) have no 'class': {unlabeled[:10]}. "
            "Fix: give every member of a bag the bag's label (\"class\": 1 if any member is "
            "positive, else 0)"
        )
    labels: dict[str, set[int]] = {}
    for c in cases:
        labels.setdefault(str(c.bag), set()).add(int(c.cls))  # type: ignore[arg-type]
    conflicting = {b: sorted(v) for b, v in labels.items() if len(v) > 1}
    if conflicting:
        shown = ", ".join(f"{b!r}: {v}" for b, v in list(conflicting.items())[:5])
        raise DataIntegrityError(
            f"site {site_id!r}: {len(conflicting)} bag(s) whose members carry conflicting labels "
            f"({shown}); a bag has one label. Fix: set every member's \"class\" to the bag's "
            "label (1 if any member is positive)"
        )
    out = {b: next(iter(v)) for b, v in labels.items()}
    if not any(out.values()):
        raise DataIntegrityError(
            f"site {site_id!r}: all {len(out)} bags are negative; MIL learns where the lesion is "
            "from positive bags. Fix: include positive bags, or train this site's negatives as "
            "image-level cases (model.weak_head: cam)"
        )
    return out


def instance_embeddings(features: Tensor) -> Tensor:
    """MIL instance embeddings ``(N, C)`` from bottleneck features ``(N, C, h, w)``:
    their global maximum, L2-normalised and scaled by 4 (bounded inputs keep
    the attention/classifier head stable at the segmenter's learning rate;
    unnormalised, SGD with momentum diverged). Max, not average: a lesion of
    2.5 % of a slice covers about one bottleneck cell of 64, and the average
    diluted it; the MIL site of the mixed-regime scenario trained alone
    (8 rounds, DP off) gave a bag AUC of 0.37-0.60 with the average and
    0.61-0.71 with the maximum."""
    return F.normalize(features.amax(dim=(2, 3)), dim=1) * 4.0


def bags_from_slices(slices: SliceSet, labels: dict[str, int]) -> BagSet:
    """Group slices by their bag id (slice order kept within a bag)."""
    order: dict[str, list[int]] = {}
    for i, b in enumerate(slices.bags):
        order.setdefault(str(b), []).append(i)
    ids = tuple(order)
    k = max(len(v) for v in order.values())
    n, shape = len(ids), slices.images.shape[1:]
    images = torch.zeros((n, k, *shape), dtype=slices.images.dtype)
    valid = torch.zeros((n, k), dtype=torch.bool)
    for j, b in enumerate(ids):
        idx = torch.tensor(order[b])
        images[j, : len(idx)] = slices.images[idx]
        valid[j, : len(idx)] = True
    return BagSet(images=images, valid=valid,
                  labels=torch.tensor([labels[b] for b in ids], dtype=torch.int64), bag_ids=ids)


def fold_bag_grad_samples(model: nn.Module, n_bags: int, k: int) -> None:
    """Turn Opacus' per-row gradients into per-bag gradients, in place."""
    if k <= 1:
        return
    for p in model.parameters():
        gs = getattr(p, "grad_sample", None)
        if gs is None:
            continue
        if isinstance(gs, list):
            raise RuntimeError("one forward pass per step is expected; got several grad samples")
        if gs.shape[0] == n_bags * k and n_bags > 0:
            p.grad_sample = gs.view(n_bags, k, *gs.shape[1:]).sum(dim=1) / k


class MilLoss(nn.Module):
    """Mean over bags of the per-bag terms in the module docstring.

    ``forward(logits, (valid, labels))`` with ``logits`` ``(B * K, 2, H, W)``
    (the segmenter's output for the flattened bags), ``valid`` ``(B, K)``
    bool and ``labels`` ``(B,)`` int64.
    """

    def __init__(self, model: nn.Module, settings: WeakSettings | None = None) -> None:
        super().__init__()
        self.model = [model]
        self.s = settings or WeakSettings()

    def forward(self, logits: Tensor, target: tuple[Tensor, Tensor]) -> Tensor:  # noqa: D102
        valid, labels = target
        seg = cam_segmenter(self.model[0])
        if seg is None or seg.mil_head is None or seg.last_features is None:
            raise ValueError("MilLoss needs a model with a MIL head (model.mil_pooling)")
        b, k = valid.shape
        feats = seg.last_features.detach() if self.s.mil_head_detach else seg.last_features
        bag_logit, att = seg.mil_head(instance_embeddings(feats), valid)
        y = labels.to(logits.dtype)
        bag_loss = image_label_loss(bag_logit, y, self.s)
        if b == 0:
            return self.s.bag_weight * bag_loss.sum() + logits.sum() * 0.0 + seg.last_cam.sum() * 0.0
        vf = valid.to(logits.dtype)  # (B, K)
        n_valid = vf.sum(dim=1).clamp_min(1.0)
        neg = (1.0 - y)[:, None] * vf  # instance weights of negative bags

        bg_ce = F.cross_entropy(logits, torch.zeros_like(logits[:, 0], dtype=torch.int64),
                                reduction="none").flatten(1).mean(dim=1).view(b, k)
        cam_img = cam_image_logit(seg.last_cam, self.s).view(b, k)
        cam_neg = F.binary_cross_entropy_with_logits(cam_img, torch.zeros_like(cam_img),
                                                     reduction="none")
        negative_terms = ((self.s.neg_weight * bg_ce + self.s.cam_weight * cam_neg) * neg
                          ).sum(dim=1) / n_valid

        mil = logits.new_zeros(b)
        if self.s.mil_weight > 0:
            margin = (logits[:, 1:].logsumexp(dim=1) - logits[:, 0]).view(b, k, -1)
            margin = margin.masked_fill(~valid[:, :, None], -1e4)  # padding never wins the max
            r = self.s.lse_r
            n_pix = (vf.sum(dim=1) * margin.shape[-1]).clamp_min(1.0)
            lse = (torch.logsumexp(r * margin.flatten(1), dim=1) - n_pix.log()) / r
            mil = image_label_loss(lse, y, self.s)

        # warm-up rounds: positives train the MIL/CAM heads only
        positive_terms = (self._positive_terms(logits, seg, att, valid, y, n_valid)
                          if self.s.positives else logits.new_zeros(b))
        total = (self.s.bag_weight * bag_loss + self.s.weak_weight * (negative_terms + positive_terms)
                 + self.s.mil_weight * mil * y)
        return total.sum() / b

    def _positive_terms(self, logits: Tensor, seg: nn.Module, att: Tensor, valid: Tensor,
                        y: Tensor, n_valid: Tensor) -> Tensor:
        """Per bag: the refined CAM pseudo-mask on a positive bag's key
        instances, plus the size prior over the whole bag (if set)."""
        b, k = valid.shape
        pos = y[:, None] * valid.to(logits.dtype)
        key = pos * (att.detach() * n_valid[:, None] >= 1.0 - 1e-6).to(logits.dtype)
        pce = pseudo_mask_ce(seg.last_cam, logits, self.s, seg.last_input).view(b, k)
        out = (pce * key).sum(dim=1) / key.sum(dim=1).clamp_min(1.0)
        if self.s.size_prior is not None:
            out = out + self.s.size_weight * y * size_prior_loss(
                logits, b, self.s.size_prior, self.s, valid)
        return out
