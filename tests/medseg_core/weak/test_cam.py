"""Weak (image-level) supervision: CAM head, pseudo-masks, joint loss, site data rules."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.validators import ModuleValidator

from medseg_core.config import DataConfig, ModelConfig, ScenarioConfig, parse_model
from medseg_core.data.slices import IGNORE_LABEL
from medseg_core.errors import DataIntegrityError
from medseg_core.sites import materialise_site
from medseg_core.training.session import build_segmenter
from medseg_core.training.site import RoundRequest, SiteSession
from medseg_core.weak import WeakSegLoss, WeakSettings, pseudo_masks
from medseg_core.weak.pseudo import size_prior_loss


def _model(weak_head: str = "cam", name: str = "unet") -> torch.nn.Module:
    cfg = parse_model(ModelConfig, {"name": name, "channels": [8, 16, 32], "strides": [2, 2],
                                    "norm_groups": 4, "weak_head": weak_head})
    return build_segmenter(cfg, DataConfig(image_size=32))


@pytest.mark.parametrize("name", ["unet", "basicunet"])
def test_cam_head_models_are_dp_compatible(name: str) -> None:
    model = _model(name=name)
    ModuleValidator.validate(model, strict=True)
    assert {"cam_head.weight", "cam_head.bias"} <= set(model.state_dict())


def test_weak_loss_is_a_mean_of_per_sample_terms() -> None:
    """DP-SGD clips per sample: the batch loss must not couple samples."""
    torch.manual_seed(0)
    model = _model()
    loss_fn = WeakSegLoss(model, WeakSettings())
    x = torch.randn(4, 1, 32, 32)
    labels = torch.full((4, 1, 32, 32), IGNORE_LABEL, dtype=torch.int64)
    labels[0] = 0
    labels[0, 0, 10:20, 10:20] = 1  # one case with a mask
    classes = torch.tensor([1, 1, 0, -1])  # mask case, positive, negative, unlabeled
    batch = loss_fn(model(x), (labels, classes))
    singles = [loss_fn(model(x[i:i + 1]), (labels[i:i + 1], classes[i:i + 1])) for i in range(4)]
    assert float(batch) == pytest.approx(float(torch.stack(singles).mean()), rel=1e-5)
    assert float(singles[3]) == 0.0  # an unlabeled case contributes nothing (FixMatch is off)
    assert all(float(s) > 0 for s in singles[:3])


def test_weak_loss_needs_a_cam_head() -> None:
    model = _model("none")
    with pytest.raises(ValueError, match="weak_head: cam"):
        WeakSegLoss(model)(model(torch.randn(1, 1, 32, 32)),
                           (torch.zeros(1, 1, 32, 32, dtype=torch.int64), torch.tensor([1])))


def test_pseudo_mask_keeps_only_pixels_both_heads_agree_on() -> None:
    cam = torch.zeros(1, 1, 4, 4)
    cam[0, 0, 1:3, 1:3] = 4.0  # CAM fires in the centre
    seg = torch.zeros(1, 2, 8, 8)
    seg[0, 0] = 2.0  # decoder says background by default
    seg[0, 1, 2:6, 2:4] = 5.0  # decoder fires on the centre-left only
    seg[0, 1, 0, 0] = 5.0  # ... and on a corner the CAM does not support
    pm = pseudo_masks(cam, seg, WeakSettings())
    assert pm.shape == (1, 1, 8, 8)
    assert int(pm[0, 0, 3, 3]) == 1  # both agree
    assert int(pm[0, 0, 0, 0]) == 0  # CAM clearly low: background despite the decoder
    assert int(pm[0, 0, 3, 5]) == IGNORE_LABEL  # CAM high, decoder unsure: ignored
    flipped = pseudo_masks(cam, seg, WeakSettings(), cam_flipped=cam.flip(-1))
    assert torch.equal(flipped, pm)  # a flip-symmetric CAM is unchanged by the consistency step
    # the decoder fires somewhere: bootstrapping changes nothing
    assert torch.equal(pseudo_masks(cam, seg, WeakSettings(cam_bootstrap=True)), pm)


def test_pseudo_mask_bootstraps_from_the_cam_where_the_decoder_finds_nothing() -> None:
    cam = torch.zeros(2, 1, 4, 4)
    cam[:, 0, 1:3, 1:3] = 4.0
    seg = torch.zeros(2, 2, 8, 8)
    seg[:, 0] = 2.0  # the decoder predicts background everywhere ...
    seg[1, 1, 0, 0] = 5.0  # ... except one corner pixel of image 1
    plain = pseudo_masks(cam, seg, WeakSettings())
    boot = pseudo_masks(cam, seg, WeakSettings(cam_bootstrap=True))
    assert not bool((plain == 1).any())  # without bootstrap: no foreground to learn from
    assert int(boot[0, 0, 3, 3]) == 1 and int(boot[0, 0, 0, 0]) == 0  # CAM region / CAM low
    assert torch.equal(boot[1], plain[1])  # image 1's decoder fires: agreement rule as before
    # the scenario option reaches the loss
    from medseg_core.config import WeakConfig

    assert WeakSettings.from_config(WeakConfig(cam_bootstrap=True)).cam_bootstrap is True
    assert WeakSettings.from_config(WeakConfig()).cam_bootstrap is False


def test_pseudo_mask_from_the_decoder_takes_its_top_region_wherever_the_cam_is() -> None:
    from medseg_core.config import WeakConfig

    cam = torch.zeros(2, 1, 4, 4)
    cam[:, 0, 0, 3] = 4.0  # the CAM fires in a corner, away from the lesion
    seg = torch.zeros(2, 2, 8, 8)
    seg[:, 0] = 2.0
    seg[0, 1, 4:6, 1:3] = 2.4  # a timid decoder: p = 0.6 on its lesion, nowhere > 0.5 else
    seg[0, 1, 4, 3] = 1.0  # p = 0.27: under half the image's maximum
    seg[1, 1] = -1.0  # image 1: p = 0.05 everywhere, under the floor
    pm = pseudo_masks(cam, seg, WeakSettings(pseudo_fg="decoder", fg_floor=0.2))
    assert bool((pm[0, 0, 4:6, 1:3] == 1).all())  # the decoder's region, although the CAM is low
    assert int(pm[0, 0, 4, 3]) == 0 and int(pm[0, 0, 0, 0]) == 0  # CAM-low background
    assert not bool((pm[1] == 1).any())  # nothing above the floor: no foreground
    agree = pseudo_masks(cam, seg, WeakSettings())
    assert not bool((agree == 1).any())  # the agreement rule finds nothing here
    with pytest.raises(ValueError, match="pseudo-foreground source 'cam'.*'decoder'"):
        pseudo_masks(cam, seg, WeakSettings(pseudo_fg="cam"))
    s = WeakSettings.from_config(WeakConfig(pseudo_fg="decoder", fg_floor=0.3, pseudo_bg=False))
    assert (s.pseudo_fg, s.fg_floor, s.pseudo_bg) == ("decoder", 0.3, False)
    # without CAM background, a positive is scored on its pseudo-foreground only
    from medseg_core.weak.pseudo import pseudo_mask_ce

    logits = seg.clone().requires_grad_(True)
    ce = pseudo_mask_ce(cam, logits, s)
    fg_only = torch.nn.functional.cross_entropy(seg[0:1, :, 4:6, 1:3], torch.ones(1, 2, 2,
                                                dtype=torch.int64))
    assert float(ce[0].detach()) == pytest.approx(float(fg_only)) and float(ce[1].detach()) == 0.0


def test_pseudo_mask_grows_from_its_seed_into_connected_likely_pixels_only() -> None:
    from medseg_core.config import WeakConfig

    cam = torch.zeros(2, 1, 4, 4)
    cam[:, 0, :, 0:2] = 4.0  # CAM high on the left half, clearly low on the right
    rel = torch.nn.functional.interpolate(cam, size=(8, 8), mode="bilinear", align_corners=False)
    rel = (rel / rel.amax())[0, 0, 3]
    seg = torch.zeros(2, 2, 8, 8)
    seg[:, 0] = 2.0
    seg[:, 1, 3, 1] = 5.0  # the seed: decoder sure (p > 0.5) where the CAM is high
    seg[:, 1, 3, 2:8] = 1.5  # p = 0.38: under 0.5, above the growing threshold 0.3
    seg[:, 1, 6, 0] = 1.5  # likely but not connected to the seed
    seg[1, 1, 3, 1] = 0.0  # image 1: no seed at all
    plain = pseudo_masks(cam, seg, WeakSettings())
    grown = pseudo_masks(cam, seg, WeakSettings(grow=0.3))
    assert int((plain[0] == 1).sum()) == 1 and int(plain[0, 0, 3, 1]) == 1
    # the seed and its connected likely pixels, up to where the CAM is clearly low
    reach = [c for c in range(1, 8) if bool((rel[1:c + 1] >= 0.2).all())]
    assert 3 <= len(reach) < 7  # the row runs into CAM-low pixels before its end
    assert [c for c in range(8) if int(grown[0, 0, 3, c]) == 1] == reach
    assert int(grown[0, 0, 6, 0]) != 1 and int((grown[0] == 1).sum()) == len(reach)
    assert not bool((grown[1] == 1).any())  # nothing to grow from
    # each image is grown on its own: image 0 alone gives the same pseudo-mask
    assert torch.equal(pseudo_masks(cam[:1], seg[:1], WeakSettings(grow=0.3)), grown[:1])
    assert WeakSettings.from_config(WeakConfig(grow=0.3)).grow == 0.3
    assert WeakSettings.from_config(WeakConfig()).grow is None


def _per_case_loss(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor,
                   classes: torch.Tensor, settings: WeakSettings) -> list[float]:
    """WeakSegLoss of each case alone (the loss reads the model's last CAM)."""
    loss_fn = WeakSegLoss(model, settings)
    with torch.no_grad():
        return [float(loss_fn(model(x[i:i + 1]), (labels[i:i + 1], classes[i:i + 1])))
                for i in range(len(x))]


def test_size_prior_targets_the_most_lesion_like_pixels_of_a_silent_positive() -> None:
    s = WeakSettings()
    logits = torch.zeros(3, 2, 8, 8)
    logits[:, 0] = 8.0  # saturated background everywhere ...
    logits[0, 1, 2, 3], logits[0, 1, 5, 5] = 7.0, 6.0  # ... two lesion-like pixels in image 0
    logits[1, 1, :4] = 9.0  # image 1 predicts half the image as lesion (32 px)
    logits[2, 1, 1:3, 1:3] = 9.0  # image 2: 4 px, inside the bounds
    logits.requires_grad_(True)
    loss = size_prior_loss(logits, 3, (2 / 64, 10 / 64), s)
    loss.sum().backward()
    pushed_up = (logits.grad[0, 1] < 0).nonzero().tolist()
    assert pushed_up == [[2, 3], [5, 5]]  # the top-2 pixels become foreground targets
    assert float(loss[0].detach()) > 1.0  # a hard target keeps a gradient where softmax saturates
    pushed_down = int((logits.grad[1, 1] > 0).sum())
    assert pushed_down == 32 - 10  # foreground beyond the top 10 pixels becomes background
    assert float(loss[2]) == 0.0 and float(logits.grad[2].abs().sum()) == 0.0


def test_size_prior_never_picks_bag_padding_and_is_per_bag() -> None:
    s = WeakSettings()
    logits = torch.zeros(4, 2, 8, 8)  # 2 bags x 2 instances
    logits[:, 0] = 3.0
    logits[3, 1] = 2.5  # the padded instance of bag 1 looks most lesion-like
    valid = torch.tensor([[True, True], [True, False]])
    logits.requires_grad_(True)
    loss = size_prior_loss(logits, 2, (2 / 64, 10 / 64), s, valid)
    loss.sum().backward()
    assert float(logits.grad[3].abs().sum()) == 0.0
    assert int((logits.grad[2, 1] < 0).sum()) == 2  # bag 1's targets lie in its real member
    alone = size_prior_loss(logits.detach()[2:], 1, (2 / 64, 10 / 64), s, valid[1:])
    assert float(alone[0]) == pytest.approx(float(loss[1]))


def test_size_prior_reaches_the_weak_loss_only_on_positives() -> None:
    from medseg_core.config import WeakConfig

    torch.manual_seed(0)
    model = _model()
    x = torch.randn(3, 1, 32, 32)
    labels = torch.full((3, 1, 32, 32), IGNORE_LABEL, dtype=torch.int64)
    classes = torch.tensor([1, 0, -1])  # positive, negative, unlabeled
    with_prior = WeakSettings.from_config(WeakConfig(size_prior=(0.01, 0.2), size_weight=2.0))
    assert with_prior.size_prior == (0.01, 0.2) and with_prior.size_weight == 2.0
    assert WeakSettings.from_config(WeakConfig(weak_weight=0.1)).weak_weight == 0.1
    plain = _per_case_loss(model, x, labels, classes, WeakSettings())
    prior = _per_case_loss(model, x, labels, classes, with_prior)
    assert prior[0] > plain[0]  # an untrained decoder's positive is outside the bounds
    assert prior[1:] == pytest.approx(plain[1:])


def test_pixel_mil_constraint_and_cam_weight_reach_the_loss_from_the_config() -> None:
    import math

    import torch.nn.functional as F

    from medseg_core.config import WeakConfig

    torch.manual_seed(0)
    model = _model()
    x = torch.randn(3, 1, 32, 32)
    labels = torch.full((3, 1, 32, 32), IGNORE_LABEL, dtype=torch.int64)
    labels[2] = 0  # a mask case: the constraint is for image-level cases only
    classes = torch.tensor([1, 0, 0])
    s = WeakSettings.from_config(WeakConfig(mil_weight=0.5, cam_weight=0.0))
    assert (s.mil_weight, s.cam_weight) == (0.5, 0.0)
    with_mil = _per_case_loss(model, x, labels, classes, s)
    without = _per_case_loss(model, x, labels, classes, WeakSettings(cam_weight=0.0))
    with torch.no_grad():
        logits = model(x)
    margin = (logits[:, 1:].logsumexp(dim=1) - logits[:, 0]).flatten(1)
    lse = (torch.logsumexp(5.0 * margin, dim=1) - math.log(margin.shape[1])) / 5.0
    expected = F.binary_cross_entropy_with_logits(lse, torch.tensor([1.0, 0.0, 0.0]), reduction="none")
    for i in (0, 1):  # the smooth-max term, weighted, on both image-level cases
        assert with_mil[i] - without[i] == pytest.approx(0.5 * float(expected[i]), rel=1e-4)
    assert with_mil[2] == pytest.approx(without[2])
    cam_only = _per_case_loss(model, x, labels, classes, WeakSettings(cam_weight=1.0))
    assert all(c > w for c, w in zip(cam_only, without))  # the CAM loss, on every case with a class


def test_neg_weight_scales_the_negatives_background_term_from_the_config() -> None:
    from medseg_core.config import WeakConfig

    torch.manual_seed(0)
    model = _model()
    x = torch.randn(3, 1, 32, 32)
    labels = torch.full((3, 1, 32, 32), IGNORE_LABEL, dtype=torch.int64)
    labels[2] = 0  # a mask case
    classes = torch.tensor([0, 1, 0])  # a negative, a positive, the mask case
    s = WeakSettings.from_config(WeakConfig(neg_weight=0.3, cam_weight=0.0))
    assert s.neg_weight == 0.3
    low = _per_case_loss(model, x, labels, classes, s)
    full = _per_case_loss(model, x, labels, classes, WeakSettings(cam_weight=0.0))
    assert low[0] == pytest.approx(0.3 * full[0], rel=1e-5) and full[0] > 0
    assert low[1] == pytest.approx(full[1]) and low[2] == pytest.approx(full[2])
    with pytest.raises(ValueError, match="neg_weight"):
        WeakConfig(neg_weight=-0.1)


def _positive_and_negative() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fresh CAM model and two image-level cases (a positive, a negative), no masks."""
    torch.manual_seed(0)
    labels = torch.full((2, 1, 32, 32), IGNORE_LABEL, dtype=torch.int64)
    return _model(), torch.randn(2, 1, 32, 32), labels, torch.tensor([1, 0])


def test_cam_smooth_max_pooling_is_decided_by_the_lesion_cells() -> None:
    """One lesion cell of 64: the average says "no lesion", the smooth max says "lesion"."""
    from medseg_core.weak.settings import cam_image_logit

    cam = torch.full((1, 1, 8, 8), -1.0)
    cam[0, 0, 3, 4] = 4.0
    mean = float(cam_image_logit(cam, WeakSettings()))
    lse = float(cam_image_logit(cam, WeakSettings(cam_pooling="lse")))
    sharper = float(cam_image_logit(cam, WeakSettings(cam_pooling="lse", lse_r=20.0)))
    assert mean == pytest.approx((4.0 - 63.0) / 64.0)
    assert mean < 0.0 < lse < sharper < 4.0
    flat = torch.zeros(1, 1, 8, 8)  # a constant map: every pooling gives the constant
    assert float(cam_image_logit(flat, WeakSettings(cam_pooling="lse"))) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match=r"unknown CAM pooling 'max'.*\['mean', 'lse'\]"):
        cam_image_logit(cam, WeakSettings(cam_pooling="max"))


def test_cam_pooling_reaches_the_image_loss_from_the_config() -> None:
    import torch.nn.functional as F
    from pydantic import ValidationError

    from medseg_core.config import WeakConfig
    from medseg_core.models.heads import last_cam
    from medseg_core.weak.settings import smooth_max

    model, x, labels, classes = _positive_and_negative()
    s = WeakSettings.from_config(WeakConfig(cam_pooling="lse", cam_weight=1.0, weak_weight=0.0))
    assert s.cam_pooling == "lse"
    got = _per_case_loss(model, x, labels, classes, s)
    with torch.no_grad():
        model(x)
        cam = last_cam(model)
    expected = F.binary_cross_entropy_with_logits(smooth_max(cam, 5.0), classes.float(), reduction="none")
    assert got == pytest.approx(expected.tolist(), rel=1e-5)
    mean = _per_case_loss(model, x, labels, classes, WeakSettings(cam_weight=1.0, weak_weight=0.0))
    assert got != pytest.approx(mean)
    with pytest.raises(ValidationError, match="cam_pooling"):
        WeakConfig(cam_pooling="max")


def test_positives_warm_up_keeps_only_the_image_loss_and_negatives_before_its_round() -> None:
    from medseg_core.config import WeakConfig

    model, x, labels, classes = _positive_and_negative()
    s = WeakSettings.from_config(WeakConfig(size_prior=(0.01, 0.2), positives_from_round=3))
    assert [s.for_round(r).positives for r in (1, 2, 3, 4)] == [False, False, True, True]
    def per_case(settings: WeakSettings) -> list[float]:
        return _per_case_loss(model, x, labels, classes, settings)

    warm, full = per_case(s.for_round(2)), per_case(s.for_round(3))
    only_cam = per_case(WeakSettings(cam_weight=0.2, weak_weight=0.0))
    assert warm[0] == pytest.approx(only_cam[0])  # a positive: image-level loss only
    assert full[0] > warm[0]
    assert warm[1] == pytest.approx(full[1])  # a negative: the same in both


@pytest.mark.parametrize("bad", [[0.2, 0.1], [0.0, 0.1], [0.1, 1.5]])
def test_size_prior_bounds_are_checked(bad: list[float]) -> None:
    from medseg_core.config import TrainConfig
    from medseg_core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"train\.weak\.size_prior.*0 < min < max <= 1.*Fix"):
        parse_model(TrainConfig, {"weak": {"size_prior": bad}})


def _site(tmp_path: Path, *, weak_head: str = "cam", **spec) -> SiteSession:
    scenario = parse_model(ScenarioConfig, {
        "sites": [{"id": "s", "n_train": 10, "n_test": 4, **spec}],
        "model": {"channels": [8, 16], "strides": [2], "norm_groups": 4, "weak_head": weak_head},
        "data": {"image_size": 32, "val_fraction": 0.3}, "privacy": {"epsilon": 8.0}})
    site = materialise_site(scenario.sites[0], scenario, tmp_path)
    return SiteSession(site, model_cfg=scenario.model, data_cfg=scenario.data)


def test_image_level_site_trains_under_dp_and_reports_auc(tmp_path: Path) -> None:
    from server.federation import initial_state

    sess = _site(tmp_path, label_regime="image", lesion_prevalence=0.5)
    assert sess.train_set.labels is None  # no mask reached training
    assert sess.val_set is None  # no validation case has a mask to score
    assert set(sess.train_set.classes.tolist()) == {0, 1}
    scenario_model = sess.model_cfg
    glob = {k: v.detach().numpy() for k, v in build_segmenter(scenario_model, sess.data_cfg)
            .state_dict().items()}
    out = sess.train_round(glob, RoundRequest(server_round=1, total_rounds=2, local_epochs=1,
                                              lr=0.05, batch_size=4, optimizer="sgd"))
    assert np.isfinite(out.fit.loss) and out.epsilon is not None and 0 < out.epsilon <= 8.0
    res = sess.evaluate(out.shared, "test")
    assert res.dice is not None and res.n_dice > 0  # synthetic test cases keep masks
    assert res.auc is not None and 0.0 <= res.auc <= 1.0
    val = sess.evaluate(out.shared, "val")  # falls back to training cases: none has a mask
    assert val.dice is None and val.n_dice == 0
    del initial_state


def test_image_level_site_without_cam_head_says_how_to_fix(tmp_path: Path) -> None:
    sess = _site(tmp_path, weak_head="none", label_regime="image")
    with pytest.raises(DataIntegrityError, match="weak_head: cam"):
        _ = sess.train_set


def _rewrite(sess: SiteSession, edit) -> SiteSession:
    path = sess.site.data_dir / "dataset.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return SiteSession(sess.site, model_cfg=sess.model_cfg, data_cfg=sess.data_cfg)


def test_image_regime_cases_lacking_class_are_named(tmp_path: Path) -> None:
    sess = _site(tmp_path, label_regime="image")

    def drop(data: dict) -> None:
        for e in data["training"][:2]:
            e.pop("class")

    sess = _rewrite(sess, drop)
    with pytest.raises(DataIntegrityError, match=r"declares label_regime 'image'.*case_000.*case_001"):
        _ = sess.train_set


def test_class_outside_declared_labels_is_refused(tmp_path: Path) -> None:
    sess = _site(tmp_path, label_regime="image")

    def bad(data: dict) -> None:
        data["training"][3]["class"] = 7

    with pytest.raises(DataIntegrityError, match=r"training\[3\].*\"class\" 7 is not a declared label"):
        _rewrite(sess, bad)


def test_site_with_only_unlabeled_data_is_refused(tmp_path: Path) -> None:
    sess = _site(tmp_path, label_regime="image")

    def strip(data: dict) -> None:
        data["label_regime"] = "mixed"
        for e in data["training"]:
            e.pop("class", None)
            e.pop("label", None)

    sess = _rewrite(sess, strip)
    sess.site = sess.site.model_copy(update={"label_regime": "mixed"})
    with pytest.raises(DataIntegrityError, match="no training case with a mask or an image-level"):
        _ = sess.train_set


def test_positive_volume_with_only_a_class_is_a_bag_not_an_image(tmp_path: Path) -> None:
    sess = _site(tmp_path, label_regime="image", dims=3, depth=4, n_train=4)
    with pytest.raises(DataIntegrityError, match="MIL bag of slices"):
        _ = sess.train_set


def test_bags_without_a_mil_head_say_how_to_fix(tmp_path: Path) -> None:
    sess = _site(tmp_path, label_regime="bag")
    with pytest.raises(DataIntegrityError, match="mil_pooling: attention"):
        _ = sess.train_set


def test_fixmatch_trains_unlabeled_cases_only_when_on(tmp_path: Path) -> None:
    from medseg_core.config import WeakConfig

    sess = _site(tmp_path, label_regime="image", unlabeled_fraction=0.3)
    n_labelled = len(sess.train_set)  # no masks: every labelled case trains
    on = SiteSession(sess.site, model_cfg=sess.model_cfg, data_cfg=sess.data_cfg,
                     weak_cfg=WeakConfig(fixmatch=True, fixmatch_threshold=0.6))
    assert int((on.train_set.classes < 0).sum()) == 3  # the 3 unlabeled cases join training
    assert int((sess.train_set.classes < 0).sum()) == 0 and n_labelled == 7
    glob = {k: v.detach().numpy() for k, v in
            build_segmenter(on.model_cfg, on.data_cfg).state_dict().items()}
    out = on.train_round(glob, RoundRequest(server_round=1, total_rounds=1, local_epochs=1,
                                            lr=0.05, batch_size=4, optimizer="sgd"))
    assert np.isfinite(out.fit.loss) and 0 < out.epsilon <= 8.0


def test_fixmatch_term_is_per_sample_and_only_on_unlabeled() -> None:
    torch.manual_seed(0)
    model = _model()
    s = WeakSettings(fixmatch=True, fixmatch_threshold=0.51)
    loss_fn = WeakSegLoss(model, s)
    x = torch.randn(3, 1, 32, 32)
    weak_view = x + 0.01 * torch.randn_like(x)
    labels = torch.full((3, 1, 32, 32), IGNORE_LABEL, dtype=torch.int64)
    classes = torch.tensor([-1, -1, 0])
    both = loss_fn(model(x), (labels, classes, weak_view))
    singles = torch.stack([loss_fn(model(x[i:i + 1]), (labels[i:i + 1], classes[i:i + 1],
                                                       weak_view[i:i + 1])) for i in range(3)])
    assert float(both) == pytest.approx(float(singles.mean()), rel=1e-5)
    off = WeakSegLoss(model, WeakSettings())
    assert float(off(model(x[:1]), (labels[:1], classes[:1], weak_view[:1]))) == 0.0
    assert float(singles[0]) > 0.0  # confident pixels of the weak view become targets


@pytest.mark.parametrize("option", ["gce", "focal"])
def test_noisy_label_and_imbalance_options_bound_the_image_loss(option: str) -> None:
    from medseg_core.weak.settings import image_label_loss

    s = WeakSettings(noisy_labels="gce") if option == "gce" else WeakSettings(imbalance="focal")
    logit = torch.tensor([8.0, -8.0, 0.0])  # confidently wrong, confidently right, unsure
    target = torch.tensor([0.0, 0.0, 1.0])
    plain = image_label_loss(logit, target, WeakSettings())
    robust = image_label_loss(logit, target, s)
    if option == "gce":  # a confidently wrong (possibly mislabelled) case costs at most 1/q
        assert float(robust[0]) <= 1 / s.gce_q + 1e-6 < float(plain[0])
    else:  # easy cases are down-weighted far more than hard ones
        assert float(robust[1] / plain[1]) < 1e-3 < float(robust[2] / plain[2])


def test_generator_writes_unlabeled_cases_and_noisy_labels(tmp_path: Path) -> None:
    sess = _site(tmp_path, label_regime="image", unlabeled_fraction=0.2, class_noise=0.2)
    entries = json.loads((sess.site.data_dir / "dataset.json").read_text())["training"]
    assert sum(e.get("class", 0) is None and "label" not in e for e in entries) == 2
    assert sum(e.get("class") is not None for e in entries) == 8


def test_site_with_class_only_test_cases_is_scored_by_auc_alone(tmp_path: Path) -> None:
    sess = _site(tmp_path, label_regime="image", lesion_prevalence=0.5, n_test=6)

    def class_only_test(data: dict) -> None:
        for e in data["test"]:
            e.pop("label")

    sess = _rewrite(sess, class_only_test)
    glob = {k: v.detach().numpy() for k, v in
            build_segmenter(sess.model_cfg, sess.data_cfg).state_dict().items()}
    res = sess.evaluate(glob, "test")
    assert res.dice is None and res.hd95 is None and res.n_dice == 0
    assert res.auc is not None and 0.0 <= res.auc <= 1.0


def test_evaluation_reports_what_an_empty_prediction_would_score(tmp_path: Path) -> None:
    sess = _site(tmp_path, label_regime="image", lesion_prevalence=0.5, n_test=6)
    glob = {k: v.detach().numpy() for k, v in
            build_segmenter(sess.model_cfg, sess.data_cfg).state_dict().items()}
    res = sess.evaluate(glob, "test")
    assert res.empty_dice == pytest.approx(0.5)  # 3 of 6 test cases have no lesion


def test_pseudo_background_keeps_its_margin_from_the_decoders_lesion() -> None:
    from medseg_core.config import WeakConfig

    cam = torch.zeros(1, 1, 4, 4)
    cam[0, 0, 0, 0] = 4.0  # the CAM fires in a corner only: CAM-low everywhere else
    seg = torch.zeros(1, 2, 16, 16)
    seg[0, 0] = 2.0
    seg[0, 1, 8:10, 8:10] = 5.0  # the decoder finds a lesion the CAM misses
    plain = pseudo_masks(cam, seg, WeakSettings())[0, 0]
    assert int(plain[8, 8]) == 0 and int(plain[6, 6]) == 0  # CAM-low: background, lesion included
    s = WeakSettings.from_config(WeakConfig(bg_margin=2))
    assert s.bg_margin == 2
    pm = pseudo_masks(cam, seg, WeakSettings(bg_margin=s.bg_margin))[0, 0]
    band = torch.zeros(16, 16, dtype=torch.bool)
    band[6:12, 6:12] = True  # the lesion and 2 px around it
    assert bool((pm[band] == IGNORE_LABEL).all())
    assert bool((pm[~band] == plain[~band]).all())  # farther away: as without the margin
