"""``evaluation.threshold: site``: a site's foreground threshold calibrated on
its own training labels, from the calibration itself to the server's
per-site results (real ClientApps, no Ray)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from client import site_runtime
from medseg_core import keys
from medseg_core.calibration import calibrate_threshold, calibration_cases
from medseg_core.config import ScenarioConfig, parse_model
from medseg_core.errors import ConfigError
from medseg_core.metrics import evaluate_segmentation
from medseg_core.sites import materialise_site
from medseg_core.training.session import build_segmenter
from medseg_core.training.site import SiteSession
from server.federation import initial_state, run_federation

from local_grid import LocalGrid, site_yamls


class _ProbabilityIsTheImage(nn.Module):
    """Binary logits whose foreground probability is the image itself."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))  # a model has parameters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = x[:, :1].clamp(1e-4, 1 - 1e-4)
        return torch.cat([torch.zeros_like(p), torch.log(p / (1 - p))], dim=1) + 0 * self.w


def _cases(lesion_p: float, background_p: float, n: int = 6) -> tuple[torch.Tensor, ...]:
    """n positives (a 6x6 lesion at ``lesion_p``) then n negatives; background ``background_p``."""
    images = torch.full((2 * n, 1, 32, 32), background_p)
    labels = torch.zeros((2 * n, 1, 32, 32), dtype=torch.int64)
    images[:n, :, 10:16, 10:16] = lesion_p
    labels[:n, :, 10:16, 10:16] = 1
    classes = torch.tensor([1] * n + [0] * n)
    return images, labels, torch.arange(2 * n), classes


@pytest.mark.parametrize(("lesion_p", "background_p", "expected"), [
    (0.3, 0.1, 0.3),  # timid: the argmax finds no lesion; nearest 0.5 of the perfect ones
    (0.9, 0.6, 0.65),  # flooded: the argmax marks the whole background
])
def test_the_site_threshold_recovers_lesions_the_argmax_misses(
        lesion_p: float, background_p: float, expected: float) -> None:
    model = _ProbabilityIsTheImage()
    images, labels, case_index, classes = _cases(lesion_p, background_p)
    tau, ba = calibrate_threshold(model, images, case_index, classes, min_component_voxels=10)
    assert (tau, ba) == (pytest.approx(expected), 1.0)
    argmax = evaluate_segmentation(model, images, labels, case_index, num_classes=2,
                                   min_component_voxels=10)
    site = evaluate_segmentation(model, images, labels, case_index, num_classes=2,
                                 min_component_voxels=10, threshold=tau)
    assert argmax.dice <= 0.5  # timid: the negatives only; flooded: not even those
    assert site.dice == pytest.approx(1.0)


def test_labels_of_one_class_leave_nothing_to_calibrate() -> None:
    images, _, case_index, classes = _cases(0.3, 0.1)
    assert calibrate_threshold(_ProbabilityIsTheImage(), images, case_index,
                               torch.where(classes == 0, -1, classes)) is None


def test_calibration_cases_are_a_fixed_draw_stratified_by_label() -> None:
    labels = torch.tensor([1] * 30 + [0] * 10 + [-1] * 5)
    keep = calibration_cases(labels, 8, seed=3)
    assert int(keep.sum()) == 8
    assert int(keep[labels == 1].sum()) == 6 and int(keep[labels == 0].sum()) == 2
    assert not bool(keep[labels == -1].any())
    assert torch.equal(keep, calibration_cases(labels, 8, seed=3))  # same cases every round
    assert not torch.equal(keep, calibration_cases(labels, 8, seed=4))
    # a rare class keeps one case rather than rounding to none
    rare = torch.tensor([1] * 99 + [0])
    assert int(calibration_cases(rare, 10, seed=0)[99]) == 1
    for everything in (None, 40, 100):
        assert torch.equal(calibration_cases(labels, everything, seed=0), labels >= 0)
    with pytest.raises(ValueError, match=r"max_cases=1.*evaluation.calibration_cases >= 2"):
        calibration_cases(labels, 1, seed=0)


class _CountingModel(_ProbabilityIsTheImage):
    def __init__(self) -> None:
        super().__init__()
        self.seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += len(x)
        return super().forward(x)


def test_calibrating_on_a_subset_predicts_only_its_cases() -> None:
    images, _, case_index, classes = _cases(0.3, 0.1, n=10)
    lesion_p = torch.linspace(0.2, 0.7, 10)  # positives' lesions at different strengths
    for i, p in enumerate(lesion_p):
        images[i, :, 10:16, 10:16] = p
    model = _CountingModel()
    sub = calibrate_threshold(model, images, case_index, classes, min_component_voxels=10,
                              max_cases=6, seed=1)
    assert model.seen == 6
    keep = calibration_cases(classes, 6, seed=1)
    only = calibrate_threshold(model, images, case_index, torch.where(keep, classes, -1),
                               min_component_voxels=10)
    assert sub == only
    assert sub != calibrate_threshold(model, images, case_index, classes, min_component_voxels=10)


def _scenario(threshold: str = "site", num_classes: int = 2,
              calibration_cases: int | None = None) -> ScenarioConfig:
    return parse_model(ScenarioConfig, {
        "rounds": 1, "seed": 2,
        "sites": [{"id": "masks", "n_train": 16, "n_test": 4, "label_regime": "mask",
                   "lesion_prevalence": 0.5},
                  {"id": "reports", "n_train": 16, "n_test": 4, "label_regime": "image",
                   "lesion_prevalence": 0.5}],
        "model": {"channels": [8, 16], "strides": [2], "norm_groups": 4, "weak_head": "cam"},
        "data": {"image_size": 32, "val_fraction": 0.25, "num_classes": num_classes},
        "train": {"batch_size": 4, "lr": 0.01},
        "evaluation": {"threshold": threshold, "min_component_voxels": 4,
                       "calibration_cases": calibration_cases},
        "privacy": {"enabled": False},
    })


def test_a_site_scores_at_the_threshold_its_own_training_labels_give(tmp_path: Path) -> None:
    scenario = _scenario()
    g = initial_state(scenario)
    site = materialise_site(scenario.sites[1], scenario, tmp_path)
    sess = SiteSession(site, model_cfg=scenario.model, data_cfg=scenario.data)
    labels = sess.train_case_labels
    assert set(labels.tolist()) == {0, 1}  # image-level classes of the training cases
    calibrated = sess.evaluate(g, "test", min_component_voxels=4, threshold="site")
    plain = sess.evaluate(g, "test", min_component_voxels=4)
    assert plain.threshold is None and calibrated.threshold is not None
    model = build_segmenter(scenario.model, scenario.data)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in g.items()})
    tau, _ = calibrate_threshold(model, sess.train_set.images, sess.train_set.case_index, labels,
                                 min_component_voxels=4)
    assert calibrated.threshold == tau
    with pytest.raises(ValueError, match=r"unknown evaluation threshold 'median'"):
        sess.evaluate(g, "test", threshold="median")


def test_a_site_calibrates_on_the_cases_evaluation_calibration_cases_draws(
        tmp_path: Path) -> None:
    scenario = _scenario(calibration_cases=4)
    g = initial_state(scenario)
    sess = SiteSession(materialise_site(scenario.sites[1], scenario, tmp_path),
                       model_cfg=scenario.model, data_cfg=scenario.data)
    tr = sess.train_set
    model = build_segmenter(scenario.model, scenario.data)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in g.items()})
    tau, _ = calibrate_threshold(model, tr.images, tr.case_index, sess.train_case_labels,
                                 min_component_voxels=4, max_cases=4, seed=sess.round_seed(0))
    got = sess.evaluate(g, "test", min_component_voxels=4, threshold="site", calibration_cases=4)
    assert got.threshold == tau


def test_a_mask_site_derives_its_case_labels_from_its_masks(tmp_path: Path) -> None:
    scenario = _scenario()
    sess = SiteSession(materialise_site(scenario.sites[0], scenario, tmp_path),
                       model_cfg=scenario.model, data_cfg=scenario.data)
    tr = sess.train_set
    has = torch.zeros(len(tr.case_ids), dtype=torch.bool)
    has[tr.case_index[(tr.labels.flatten(1) > 0).any(dim=1)]] = True
    assert sess.train_case_labels.tolist() == has.long().tolist()


def test_the_server_asks_for_it_and_records_each_sites_threshold(tmp_path: Path) -> None:
    site_runtime._SESSIONS.clear()
    scenario = _scenario()
    grid = LocalGrid(site_yamls(scenario, tmp_path))
    outcome = run_federation(grid, scenario, tmp_path / "run", run_id="tau")
    evals = [m for m in grid.pushed if m.metadata.message_type == "evaluate"]
    assert evals and all(m.content.config_records[keys.CONFIG][keys.EVAL_THRESHOLD] == "site"
                         for m in evals)
    assert all(m.content.config_records[keys.CONFIG][keys.EVAL_CALIBRATION_CASES] == 0
               for m in evals)  # 0: every case
    for site in ("masks", "reports"):
        tau = outcome.sites[site].threshold
        assert tau is not None and 0.0 < tau < 1.0 and math.isfinite(tau)


def test_the_server_sends_the_calibration_cases_and_sites_calibrate_on_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site_runtime._SESSIONS.clear()
    asked: list[int | None] = []
    real = SiteSession.site_threshold

    def spy(self: SiteSession, model: nn.Module, **kw: object) -> float | None:
        asked.append(kw.get("calibration_cases"))  # type: ignore[arg-type]
        return real(self, model, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(SiteSession, "site_threshold", spy)
    scenario = _scenario(calibration_cases=5)
    grid = LocalGrid(site_yamls(scenario, tmp_path))
    run_federation(grid, scenario, tmp_path / "run", run_id="tau5")
    evals = [m for m in grid.pushed if m.metadata.message_type == "evaluate"]
    assert evals and all(m.content.config_records[keys.CONFIG][keys.EVAL_CALIBRATION_CASES] == 5
                         for m in evals)
    assert asked and set(asked) == {5}


def test_a_site_threshold_for_more_than_one_foreground_class_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"evaluation.threshold is 'site' but data.num_classes "
                                          r"is 3.*Fix: evaluation.threshold: argmax"):
        _scenario(num_classes=3)
