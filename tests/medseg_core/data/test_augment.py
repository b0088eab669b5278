"""Intensity augmentation (nnU-Net's defaults, MONAI transforms): seeded,
per sample, and switched on from the scenario's ``data`` block."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medseg_core.config import ScenarioConfig, parse_model
from medseg_core.data.augment import intensity_augmentation
from medseg_core.sites import materialise_site
from medseg_core.training.session import build_segmenter
from medseg_core.training.site import RoundRequest, SiteSession


def test_intensity_augmentation_is_seeded_and_keeps_the_sample_shape() -> None:
    x = torch.randn(1, 32, 32)
    a, b, c = intensity_augmentation(0), intensity_augmentation(0), intensity_augmentation(1)
    ra, rb, rc = ([t(x) for _ in range(30)] for t in (a, b, c))
    assert all(torch.equal(p, q) for p, q in zip(ra, rb))  # same seed, same draws
    assert any(not torch.equal(p, q) for p, q in zip(ra, rc))
    changed = sum(not torch.equal(p, x) for p in ra)
    assert 5 <= changed < 30  # each transform fires with its own probability
    assert all(p.shape == x.shape and p.dtype == torch.float32 and type(p) is torch.Tensor for p in ra)
    assert intensity_augmentation(0)(torch.randn(8, 32, 32)).shape == (8, 32, 32)  # a bag's slices
    with pytest.raises(ValueError, match=r"one \(C, H, W\) sample.*\(2, 1, 32, 32\)"):
        intensity_augmentation(0)(torch.randn(2, 1, 32, 32))


def _train_once(root: Path, *, intensity: bool, **spec) -> dict[str, np.ndarray]:
    scenario = parse_model(ScenarioConfig, {
        "sites": [{"id": "s", "n_train": 8, "n_test": 2, **spec}],
        "model": {"channels": [8, 16], "strides": [2], "norm_groups": 4, "mil_pooling": "attention"},
        "data": {"image_size": 32, "val_fraction": 0.25, "intensity_augment": intensity},
        "privacy": {"enabled": False}})
    site = materialise_site(scenario.sites[0], scenario, root)
    sess = SiteSession(site, model_cfg=scenario.model, data_cfg=scenario.data)
    torch.manual_seed(0)
    glob = {k: v.detach().numpy() for k, v in build_segmenter(scenario.model, scenario.data)
            .state_dict().items()}
    out = sess.train_round(glob, RoundRequest(server_round=1, total_rounds=1, local_epochs=1,
                                              lr=0.05, batch_size=4, optimizer="sgd"))
    return out.shared


@pytest.mark.parametrize("spec", [{}, {"dims": 3, "depth": 4, "label_regime": "bag",
                                       "lesion_prevalence": 0.5}], ids=["masks", "bags"])
def test_intensity_augment_in_the_data_config_changes_training_reproducibly(
        tmp_path: Path, spec: dict) -> None:
    plain = _train_once(tmp_path / "a", intensity=False, **spec)
    aug = _train_once(tmp_path / "b", intensity=True, **spec)
    again = _train_once(tmp_path / "c", intensity=True, **spec)
    assert any(not np.array_equal(plain[k], aug[k]) for k in aug)  # it reached training
    assert all(np.array_equal(aug[k], again[k]) for k in aug)  # seeded: the same round twice
