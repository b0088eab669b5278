"""PAMR refinement of pseudo-masks by the image's own affinities."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from medseg_core.config import DataConfig, ModelConfig, ScenarioConfig, WeakConfig, parse_model
from medseg_core.data.slices import IGNORE_LABEL
from medseg_core.sites import materialise_site
from medseg_core.training.session import build_segmenter
from medseg_core.training.site import RoundRequest, SiteSession
from medseg_core.weak import WeakSegLoss, WeakSettings, pseudo_masks
from medseg_core.refine import pamr


def _square_image() -> torch.Tensor:
    torch.manual_seed(0)
    x = 0.3 + 0.01 * torch.randn(1, 1, 24, 24)
    x[..., 8:16, 8:16] += 0.4  # a bright 8 x 8 "lesion"
    return x


def test_pamr_fills_a_region_of_like_intensity_and_stops_at_its_edge() -> None:
    x = _square_image()
    p = torch.zeros(1, 1, 24, 24)
    p[..., 9:15, 9:15] = 1.0  # the decoder misses the lesion's 1-px rim
    q = pamr(x, p, dilations=(1, 2), iterations=10)
    assert q.shape == p.shape
    assert float(q[..., 8:16, 8:16].min()) >= 0.5  # the whole lesion, edges included
    outside = torch.ones(24, 24, dtype=torch.bool)
    outside[8:16, 8:16] = False
    assert float(q[0, 0][outside].max()) < 0.05  # nothing leaks across the edge
    assert float(q.min()) >= 0.0 and float(q.max()) <= 1.0  # convex combinations


def test_pamr_averages_isolated_speckle_away() -> None:
    x = 0.3 + 0.01 * torch.randn(1, 1, 24, 24, generator=torch.Generator().manual_seed(1))
    p = torch.zeros(1, 1, 24, 24)
    p[..., 5, 5] = 1.0  # one false-positive pixel in flat tissue
    assert float(pamr(x, p).max()) < 0.5  # it no longer reaches the foreground threshold


@pytest.mark.parametrize(("image", "prob", "match"), [
    ((1, 1, 24, 24), (1, 1, 12, 12), "share batch size and H, W"),
    ((2, 1, 24, 24), (1, 1, 24, 24), "share batch size and H, W"),
])
def test_pamr_refuses_mismatched_shapes(image: tuple, prob: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        pamr(torch.zeros(image), torch.zeros(prob))


def test_pamr_dilations_are_checked_in_the_config() -> None:
    with pytest.raises(ValidationError, match=r"pamr_dilations must be 1-32 px.*got \[0, 2\].*Fix"):
        WeakConfig(pamr_dilations=[0, 2])
    with pytest.raises(ValueError, match="positive pixel distances"):
        pamr(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), dilations=(0,))


def test_refined_pseudo_mask_reaches_the_lesion_edge_and_background_needs_both_views() -> None:
    x = _square_image()
    seg = torch.zeros(1, 2, 24, 24)
    seg[0, 0] = 3.0
    seg[0, 1, 9:15, 9:15] = 6.0  # decoder: all but the 1-px rim
    cam = torch.zeros(1, 1, 3, 3)
    cam[0, 0, 0, 0] = 4.0  # the CAM's maximum sits elsewhere: CAM-low over the lesion
    plain = pseudo_masks(cam, seg, WeakSettings(pseudo_fg="decoder", fg_floor=0.5))
    assert int((plain[0, 0, 8:16, 8:16] == 1).sum()) == 36  # the core only
    assert int((plain[0, 0, 8:16, 8:16] == 0).sum()) == 64 - 36  # its rim trained as background
    s = WeakSettings.from_config(WeakConfig(refine="pamr", bg_max_p=0.2, pseudo_fg="decoder",
                                            fg_floor=0.5))
    ref = pseudo_masks(cam, seg, s, image=x)[0, 0]
    assert bool((ref[8:16, 8:16] == 1).all())  # the whole lesion is foreground
    assert int((ref == 1).sum()) == 64
    assert int((ref == 0).sum()) > 0.5 * (24 * 24 - 64)  # far tissue is still background
    with pytest.raises(ValueError, match="needs the input images"):
        pseudo_masks(cam, seg, WeakSettings(refine="pamr"))


def test_weak_loss_with_refinement_is_per_sample_and_differs_from_without() -> None:
    """The loss reads the model's own input (``last_input``), per sample."""
    torch.manual_seed(0)
    cfg = parse_model(ModelConfig, {"channels": [8, 16, 32], "strides": [2, 2], "norm_groups": 4,
                                    "weak_head": "cam"})
    model = build_segmenter(cfg, DataConfig(image_size=32))
    x = torch.randn(3, 1, 32, 32)
    labels = torch.full((3, 1, 32, 32), IGNORE_LABEL, dtype=torch.int64)
    classes = torch.tensor([1, 1, 0])
    s = WeakSettings(refine="pamr", bg_max_p=0.5, pseudo_fg="decoder", fg_floor=0.2, tau_fg=0.0)
    loss_fn = WeakSegLoss(model, s)
    batch = loss_fn(model(x), (labels, classes))
    singles = [loss_fn(model(x[i:i + 1]), (labels[i:i + 1], classes[i:i + 1])) for i in range(3)]
    assert float(batch) == pytest.approx(float(torch.stack(singles).mean()), rel=1e-5)
    plain = WeakSegLoss(model, WeakSettings(pseudo_fg="decoder", fg_floor=0.2, tau_fg=0.0))
    assert float(plain(model(x), (labels, classes))) != pytest.approx(float(batch), rel=1e-6)


@pytest.mark.parametrize("weak", [
    # refinement, and the CAM's smooth-max pooling (image loss and MIL negatives)
    WeakConfig(refine="pamr", bg_max_p=0.2, pseudo_fg="decoder", fg_floor=0.5, cam_pooling="lse"),
    # the blob prior on positives' background (reads the model's input, per sample)
    WeakConfig(bg_blob=0.5, mil_weight=0.2),
], ids=["refine+lse", "blob"])
def test_image_and_bag_sites_train_under_dp_with_pseudo_mask_options(tmp_path: Path,
                                                                     weak: WeakConfig) -> None:
    for regime, extra, model in (
        ("image", {}, {"weak_head": "cam"}),
        ("bag", {"dims": 3, "depth": 4}, {"weak_head": "cam", "mil_pooling": "attention"}),
    ):
        scenario = parse_model(ScenarioConfig, {
            "sites": [{"id": regime, "n_train": 10, "n_test": 4, "label_regime": regime,
                       "lesion_prevalence": 0.5, **extra}],
            "model": {"channels": [8, 16], "strides": [2], "norm_groups": 4, **model},
            "data": {"image_size": 32, "val_fraction": 0.3}, "privacy": {"epsilon": 8.0}})
        site = materialise_site(scenario.sites[0], scenario, tmp_path / regime)
        sess = SiteSession(site, model_cfg=scenario.model, data_cfg=scenario.data, weak_cfg=weak)
        glob = {k: v.detach().numpy() for k, v in
                build_segmenter(sess.model_cfg, sess.data_cfg).state_dict().items()}
        out = sess.train_round(glob, RoundRequest(server_round=1, total_rounds=2, local_epochs=1,
                                                  lr=0.05, batch_size=4, optimizer="sgd"))
        assert np.isfinite(out.fit.loss) and out.epsilon is not None and 0 < out.epsilon <= 8.0
        assert any(not np.array_equal(out.shared[k], glob[k]) for k in out.shared)


def test_implausibly_large_pseudo_foreground_is_ignored_not_taught() -> None:
    cam = torch.zeros(2, 1, 3, 3)
    cam[:, 0, 1, 1] = 4.0
    seg = torch.zeros(2, 2, 24, 24)
    seg[0, 1] = 0.1  # an untrained decoder: p ~ 0.52 everywhere
    seg[1, 0] = 3.0
    seg[1, 1, 10:14, 10:14] = 6.0  # a lesion-sized region
    s = WeakSettings.from_config(WeakConfig(pseudo_fg="decoder", fg_floor=0.5, fg_max_fraction=0.15))
    base = WeakSettings(pseudo_fg="decoder", fg_floor=0.5, bg_max_p=0.2)
    free = pseudo_masks(cam, seg, base)[:, 0]
    assert bool((free[0] == 1).all())  # without the limit: the whole image is "lesion"
    pm = pseudo_masks(cam, seg, replace(base, fg_max_fraction=s.fg_max_fraction))[:, 0]
    assert int((pm[0] == 1).sum()) == 0
    assert bool((pm[0] == IGNORE_LABEL).all())  # ignored, not turned into background
    assert bool((pm[1] == free[1]).all())  # a plausible region is kept as is


def test_decoder_background_needs_a_found_lesion_and_ignores_the_cam() -> None:
    from medseg_core.config import WeakConfig

    cam = torch.zeros(2, 1, 3, 3)
    cam[:, 0, 0, 0] = 4.0  # the CAM points at a corner, far from any lesion
    seg = torch.zeros(2, 2, 24, 24)
    seg[:, 0] = 3.0  # background everywhere (p ~ 0.05) ...
    seg[0, 1, 10:14, 10:14] = 6.0  # ... except a lesion the decoder found in image 0
    seg[0, 1, 16:20, 2:6] = 2.15  # and an unsure patch (p ~ 0.3: neither lesion nor < 0.2)
    s = WeakSettings.from_config(WeakConfig(bg_source="decoder", pseudo_fg="decoder", fg_floor=0.5))
    pm = pseudo_masks(cam, seg, s)[:, 0]
    assert bool((pm[0, 10:14, 10:14] == 1).all())
    assert bool((pm[0, 16:20, 2:6] == IGNORE_LABEL).all())
    bg = pm[0] == 0
    assert int(bg.sum()) == 24 * 24 - 16 - 16  # every confident-background pixel, whatever the CAM says
    assert bool((pm[1] == IGNORE_LABEL).all())  # nothing found: no pixel is known background
    cam_rule = pseudo_masks(cam, seg, WeakSettings(pseudo_fg="decoder", fg_floor=0.5))[:, 0]
    assert int((cam_rule[1] == 0).sum()) > 0  # the CAM rule teaches background there
    with pytest.raises(ValueError, match=r"pseudo-background source 'x'.*\['cam', 'decoder'\]"):
        pseudo_masks(cam, seg, WeakSettings(bg_source="x"))
