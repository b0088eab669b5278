"""The blob prior on positives' pseudo-background (``train.weak.bg_blob``; training
under DP with it: ``test_refine.py``)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from medseg_core.config import ScenarioConfig, WeakConfig, parse_model
from medseg_core.data.slices import IGNORE_LABEL
from medseg_core.training.session import build_segmenter
from medseg_core.weak import WeakSegLoss, WeakSettings, pseudo_masks
from medseg_core.weak.pseudo import blob_map, difference_of_gaussians


def _organ_with_two_lesions() -> torch.Tensor:
    """z-scored-like image: a smooth intensity ramp (a bias field), a bright and a
    dark disk of radius 4 px, mild noise."""
    torch.manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(48.0), torch.arange(48.0), indexing="ij")
    x = 0.02 * xx + 0.03 * torch.randn(48, 48)
    x = x + 1.5 * (((yy - 14) ** 2 + (xx - 14) ** 2) <= 16)
    x = x - 1.5 * (((yy - 32) ** 2 + (xx - 32) ** 2) <= 16)
    return x[None, None]


def test_blob_map_finds_bright_and_dark_lesions_not_a_smooth_ramp() -> None:
    x = _organ_with_two_lesions()
    dog = difference_of_gaussians(x, (1.0, 4.0))[0, 0]
    assert float(dog[14, 14]) > 0.5 and float(dog[32, 32]) < -0.5  # signed: bright +, dark -
    blobs = blob_map(x, 0.5, (1.0, 4.0), dilate=2)[0, 0]
    assert bool(blobs[10:19, 10:19].all()) and bool(blobs[28:37, 28:37].all())
    assert not bool(blobs[40:, :8].any())  # the ramp and the noise are no blob
    assert not bool(blob_map(x, 0.5, (1.0, 4.0), dilate=0)[0, 0, 40:, :8].any())
    with pytest.raises(ValueError, match=r"too small for blob_sigmas \[1.0, 4.0\].*fix"):
        blob_map(torch.zeros(1, 1, 10, 10), 0.5)


def test_blob_pixels_of_a_positive_are_never_pseudo_background() -> None:
    """The CAM points at the bright lesion only, so the CAM-low rule calls the
    dark lesion background; with the blob prior its pixels are left unsure while
    plain tissue far from both stays background."""
    x = _organ_with_two_lesions()
    cam = torch.full((1, 1, 6, 6), -1.0)
    cam[0, 0, 1, 1] = 4.0  # over the bright lesion (8 px cells)
    seg = torch.zeros(1, 2, 48, 48)
    seg[:, 0] = 3.0  # the decoder finds nothing
    plain = pseudo_masks(cam, seg, WeakSettings(), image=x)[0, 0]
    assert bool((plain[30:35, 30:35] == 0).all())  # the dark lesion taught as background
    s = WeakSettings.from_config(WeakConfig(bg_blob=0.5))
    pm = pseudo_masks(cam, seg, s, image=x)[0, 0]
    assert bool((pm[28:37, 28:37] == IGNORE_LABEL).all())
    assert bool((pm[40:, :8] == 0).all())
    assert int((pm == 0).sum()) < int((plain == 0).sum())
    with pytest.raises(ValueError, match="bg_blob.*needs the input images"):
        pseudo_masks(cam, seg, s)


def test_blob_prior_reaches_the_weak_loss_per_sample() -> None:
    torch.manual_seed(0)
    cfg = {"channels": [8, 16, 32], "strides": [2, 2], "norm_groups": 4, "weak_head": "cam"}
    scenario = parse_model(ScenarioConfig, {"sites": [{"id": "a"}], "model": cfg,
                                            "data": {"image_size": 48}})
    model = build_segmenter(scenario.model, scenario.data)
    x = torch.cat([_organ_with_two_lesions(), torch.randn(2, 1, 48, 48)])
    labels = torch.full((3, 1, 48, 48), IGNORE_LABEL, dtype=torch.int64)
    classes = torch.tensor([1, 1, 0])
    loss_fn = WeakSegLoss(model, WeakSettings(bg_blob=0.5))
    batch = loss_fn(model(x), (labels, classes))
    singles = [loss_fn(model(x[i:i + 1]), (labels[i:i + 1], classes[i:i + 1])) for i in range(3)]
    assert float(batch) == pytest.approx(float(torch.stack(singles).mean()), rel=1e-5)
    plain = WeakSegLoss(model, WeakSettings())
    assert float(plain(model(x), (labels, classes))) != pytest.approx(float(batch), rel=1e-6)


@pytest.mark.parametrize("bad", [{"blob_sigmas": [4.0, 1.0]}, {"blob_sigmas": [0.0, 2.0]},
                                 {"bg_blob": 0.0}, {"blob_dilate": -1}])
def test_blob_options_are_checked(bad: dict) -> None:
    with pytest.raises(ValidationError) as err:
        WeakConfig(**bad)
    if "blob_sigmas" in bad:
        assert "blob_sigmas must be [inner, outer]" in str(err.value) and "Fix" in str(err.value)
