"""Bag-level prediction at a MIL site: which bags hold a lesion.

A bag (e.g. a volume of slices) is scored by a MIL head over its instances'
embeddings: the model's own, federated head over the encoder's bottleneck
embeddings (:func:`medseg_core.weak.mil.instance_embeddings`, what
:class:`medseg_core.weak.mil.MilLoss` trains), or a head the site refits
for the scored model on its own training bags (``evaluation.mil_head``:
``site`` over the bottleneck, ``site-decoder`` over each instance's
statistics of the segmenter's lesion map). The bag-level prediction is
reported as ``mil_auc`` and gates volumes with ``evaluation.bag_gate``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medseg_core.models.heads import cam_segmenter
from medseg_core.weak.mil import instance_embeddings

__all__ = ["DECODER_FEATURES", "MIL_EMBEDDINGS", "MIL_HEAD_MODES", "MIL_REFIT_STEPS",
           "SITE_HEAD_EMBEDDINGS", "SiteMilHead", "bag_probabilities", "decoder_instance_features",
           "refit_mil_head"]


DECODER_FEATURES: tuple[str, ...] = ("smooth_max_logit", "max_logit", "mean_p", "area_pct")
"""The per-instance statistics of the segmenter's own lesion map that make a
``decoder`` instance embedding (:func:`decoder_instance_features`)."""


def decoder_instance_features(seg_logits: Tensor) -> Tensor:
    """MIL instance embeddings ``(N, 4)`` read off the segmenter's output
    ``(N, K, ...)``: the lesion logit's smooth maximum over the instance
    (log-sum-exp, r = 5, minus the uniform map's), its maximum, the mean
    lesion probability and the lesion area in percent (p > 0.5). The lesion
    probability is every foreground class's together. The instance is
    scored by the map that segments it. The bottleneck embedding classifies
    but does not localise: on the mixed-regime scenario's selected models a
    site head over it ranked the MIL site's test bags at a mean AUC of 0.585
    under DP (0.704 without), below the decoder's plain maximum (0.871 /
    0.939); one over these features: see docs/results-log.md, "Stop 32"."""
    p = seg_logits.float().softmax(dim=1)[:, 1:].sum(dim=1).flatten(1).clamp(1e-6, 1 - 1e-6)
    logit = torch.log(p) - torch.log1p(-p)
    r = 5.0
    smooth = (torch.logsumexp(r * logit, dim=1) - math.log(logit.shape[1])) / r
    return torch.stack([smooth, logit.amax(dim=1), p.mean(dim=1), (p > 0.5).float().mean(dim=1) * 100],
                       dim=1)


MIL_EMBEDDINGS: tuple[str, ...] = ("bottleneck", "decoder")
"""What a MIL instance embedding is made of: the encoder's bottleneck
(:func:`instance_embeddings`, what the federated MIL head is trained on) or
the segmenter's lesion map (:func:`decoder_instance_features`)."""


@torch.no_grad()
def _bag_embeddings(model: nn.Module, images: Tensor, case_index: Tensor,
                    batch_size: int = 64, embedding: str = "bottleneck") -> tuple[Tensor, Tensor]:
    """Each case's instance embeddings (``embedding``, one of
    :data:`MIL_EMBEDDINGS`) as padded bags: ``(n_cases, K, C)`` and the
    ``(n_cases, K)`` valid mask (a case is a bag of the slices sharing its
    ``case_index``)."""
    seg = cam_segmenter(model)
    if seg is None or seg.mil_head is None:
        raise ValueError("bag-level prediction needs a model with a MIL head (model.mil_pooling)")
    if embedding not in MIL_EMBEDDINGS:
        raise ValueError(f"unknown MIL embedding {embedding!r}; valid: {list(MIL_EMBEDDINGS)}")
    was = model.training
    model.eval()
    try:
        parts = []
        for i in range(0, len(images), batch_size):
            out = model(images[i:i + batch_size])
            parts.append(instance_embeddings(seg.last_features) if embedding == "bottleneck"
                         else decoder_instance_features(out))
    finally:
        model.train(was)
    h = torch.cat(parts)
    n = int(case_index.max()) + 1
    k = int(torch.bincount(case_index, minlength=n).max())
    padded = h.new_zeros((n, k, h.shape[1]))
    valid = torch.zeros((n, k), dtype=torch.bool)
    for j in range(n):
        rows = torch.nonzero(case_index == j).squeeze(1)
        padded[j, : len(rows)] = h[rows]
        valid[j, : len(rows)] = True
    return padded, valid


class SiteMilHead(nn.Module):
    """A site's own MIL head (:func:`refit_mil_head`): a :class:`MilHead`
    over instance embeddings of kind ``embedding``, standardised with the
    site's training instances' mean and standard deviation (bottleneck
    embeddings are already bounded and are used as they are)."""

    def __init__(self, embedding: str, head: nn.Module, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        self.embedding, self.head = embedding, head
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, h: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:  # noqa: D102
        return self.head((h - self.mean) / self.std, valid)


@torch.no_grad()
def bag_probabilities(model: nn.Module, images: Tensor, case_index: Tensor, *,
                      batch_size: int = 64, head: nn.Module | None = None) -> Tensor:
    """The MIL head's bag-level prediction: ``(n_cases,)`` probability that
    each case (a bag of the slices sharing its ``case_index``) holds a lesion.
    ``head``: score with this MIL head (e.g. :func:`refit_mil_head`'s) over
    ``model``'s embeddings instead of the model's own.

    Raises
    ------
    ValueError
        ``model`` has no MIL head (``model.mil_pooling: none``).
    """
    padded, valid = _bag_embeddings(model, images, case_index, batch_size,
                                    embedding=getattr(head, "embedding", "bottleneck"))
    n, k, c = padded.shape
    mil_head = head if head is not None else cam_segmenter(model).mil_head  # type: ignore[union-attr]
    logits, _ = mil_head(padded.view(n * k, c), valid)
    return torch.sigmoid(logits)


SITE_HEAD_EMBEDDINGS: dict[str, str] = {"site": "bottleneck", "site-decoder": "decoder"}
"""The ``evaluation.mil_head`` modes in which a site refits its own MIL head,
and the instance embeddings each refits it over."""

MIL_HEAD_MODES: tuple[str, ...] = ("federated", *SITE_HEAD_EMBEDDINGS)
"""Which MIL head makes a bag site's bag-level prediction
(``evaluation.mil_head``): the federated one, or the site's own refit over
bottleneck (``site``) or decoder (``site-decoder``) instance embeddings."""

MIL_REFIT_STEPS = 50
"""Full-batch SGD steps (learning rate 0.1, momentum 0.9, the scenarios'
training settings) of :func:`refit_mil_head`. One value, between the 30 and
300 of a single diagnostic run (one no-DP model's test bags: 0.92 and 0.88)
and set before the runs the figures come from; 200 Adam steps, tried after
on those runs, gave a lower mean (docs/results-log.md, "Stop 31")."""


def refit_mil_head(model: nn.Module, images: Tensor, case_index: Tensor, labels: Tensor, *,
                   steps: int = MIL_REFIT_STEPS, lr: float = 0.1, momentum: float = 0.9,
                   seed: int = 0, embedding: str = "bottleneck") -> SiteMilHead | None:
    """A MIL head fitted for ``model`` on one site's own labelled bags
    (``evaluation.mil_head``: ``site`` or ``site-decoder``).

    A fresh head of the model's kind (seeded ``seed``) is trained on the
    frozen instance embeddings (``embedding``: :data:`MIL_EMBEDDINGS`; the
    decoder's standardised over the site's training instances) of the bags,
    ``steps`` full-batch SGD steps
    of the bag cross-entropy; the model is not changed. It is the bag-level
    counterpart of a site's calibrated threshold
    (:mod:`medseg_core.calibration`): it reads only the site's own training
    labels and the scored model, and stays at the site. The federated head
    is trained against each round's local encoder and scored on the next
    average, which it has never seen.

    Parameters
    ----------
    labels
        ``(n_cases,)`` per case of ``case_index``: 1 / 0, or -1 unknown
        (left out).

    Returns
    -------
    SiteMilHead or None
        The fitted head; None where the known labels hold one class only
        (nothing to fit).
    """
    seg = cam_segmenter(model)
    if seg is None or seg.mil_head is None:
        raise ValueError("refitting a MIL head needs a model with a MIL head (model.mil_pooling)")
    known = labels >= 0
    if int(labels[known].unique().numel()) < 2:
        return None
    padded, valid = _bag_embeddings(model, images, case_index, embedding=embedding)
    padded, valid, y = padded[known], valid[known], labels[known].to(padded.dtype)
    n, k, c = padded.shape
    flat = padded.reshape(n * k, c)
    if embedding == "bottleneck":
        mean, std = flat.new_zeros(c), flat.new_ones(c)
    else:
        inst = flat[valid.reshape(-1)]
        mean, std = inst.mean(dim=0), inst.std(dim=0).clamp_min(1e-6)
    old = seg.mil_head
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        head = SiteMilHead(embedding, type(old)(c, pooling=old.pooling, hidden=old.hidden),
                           mean, std)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum)
    with torch.enable_grad():  # callers score under no_grad
        for _ in range(steps):
            logits, _ = head(flat, valid)
            loss = F.binary_cross_entropy_with_logits(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return head.eval()
