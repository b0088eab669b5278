"""``evaluation.mil_head: site``: a bag site's MIL head refit for the scored
model on its own training bags, from the fit itself to the server's
per-site results (real ClientApps, no Ray)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from client import site_runtime
from medseg_core import keys
from medseg_core.config import DataConfig, ModelConfig, ScenarioConfig, parse_model
from medseg_core.errors import ConfigError
from medseg_core.metrics import roc_auc
from medseg_core.sites import materialise_site
from medseg_core.training.session import build_segmenter
from medseg_core.training import site as site_module
from medseg_core.training.site import SiteSession
from medseg_core.weak.bag_scores import (
    DECODER_FEATURES,
    bag_probabilities,
    decoder_instance_features,
    refit_mil_head,
)
from server.federation import initial_state, run_federation

from local_grid import LocalGrid, site_yamls


def _bags(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` bags of ``k`` noise slices; every other bag is positive, with a
    bright square in one slice. Returns (images, case_index, labels)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, 1, 16, 16, generator=g) * 0.3
    y = torch.tensor([1, 0] * (n // 2))
    for b in range(n):
        if y[b]:
            s = int(torch.randint(k, (1,), generator=g))
            x[b, s, 0, 4:9, 6:11] += 3.0
    return x.reshape(n * k, 1, 16, 16), torch.arange(n).repeat_interleave(k), y


@pytest.mark.parametrize(("pooling", "embedding"),
                         [("attention", "bottleneck"), ("max", "bottleneck"),
                          ("attention", "decoder"), ("max", "decoder")])
def test_a_refit_head_separates_held_out_bags_and_leaves_the_model_alone(
        pooling: str, embedding: str) -> None:
    torch.manual_seed(0)
    cfg = parse_model(ModelConfig, {"channels": [8, 16], "strides": [2], "norm_groups": 4,
                                    "mil_pooling": pooling})
    model = build_segmenter(cfg, DataConfig(image_size=16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, ci, y = _bags(16, 4, seed=1)
    y_known = y.clone()
    y_known[0] = -1  # an unknown label is left out, not guessed
    head = refit_mil_head(model, images, ci, y_known, seed=3, embedding=embedding)
    assert head is not None and head.head.pooling == pooling and head.embedding == embedding
    test_images, test_ci, test_y = _bags(16, 4, seed=2)
    assert roc_auc(bag_probabilities(model, test_images, test_ci, head=head), test_y) >= 0.9
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    again = refit_mil_head(model, images, ci, y_known, seed=3, embedding=embedding)  # seeded
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(),
                                                 again.state_dict().values(), strict=True))
    assert refit_mil_head(model, images, ci, torch.ones_like(y)) is None  # one class: no fit


def test_decoder_instance_features_read_the_lesion_map() -> None:
    logits = torch.zeros(2, 2, 10, 10)
    logits[:, 0] = 3.0  # background everywhere ...
    logits[1, 1, 2:4, 2:7] = 6.0  # ... but a 10-pixel lesion (logit 3) in instance 1
    f = decoder_instance_features(logits)
    assert DECODER_FEATURES == ("smooth_max_logit", "max_logit", "mean_p", "area_pct")
    assert f.shape == (2, 4)
    assert f[0, 1] == pytest.approx(-3.0, abs=1e-4) and f[1, 1] == pytest.approx(3.0, abs=1e-4)
    assert f[0, 3] == 0.0 and f[1, 3] == pytest.approx(10.0)  # percent of the instance
    p_in, p_out = torch.sigmoid(torch.tensor(3.0)), torch.sigmoid(torch.tensor(-3.0))
    assert f[1, 2] == pytest.approx(float(0.1 * p_in + 0.9 * p_out), abs=1e-5)
    assert f[0, 0] == pytest.approx(-3.0, abs=1e-4)  # a uniform map's smooth max is its value
    assert -3.0 < f[1, 0] < 3.0  # a smooth max: between the map's mean and its maximum


def _scenario(mil_head: str = "site", mil_pooling: str = "attention") -> ScenarioConfig:
    return parse_model(ScenarioConfig, {
        "rounds": 1, "seed": 2,
        "sites": [{"id": "masks", "n_train": 12, "n_test": 4, "label_regime": "mask",
                   "lesion_prevalence": 0.5},
                  {"id": "volumes", "dims": 3, "depth": 4, "n_train": 12, "n_test": 6,
                   "label_regime": "bag", "lesion_prevalence": 0.5}],
        "model": {"channels": [8, 16], "strides": [2], "norm_groups": 4,
                  "mil_pooling": mil_pooling},
        "data": {"image_size": 32, "val_fraction": 0.25},
        "train": {"batch_size": 8, "lr": 0.01},
        "evaluation": {"mil_head": mil_head},
        "privacy": {"enabled": False},
    })


@pytest.mark.parametrize(("mode", "embedding"),
                         [("site", "bottleneck"), ("site-decoder", "decoder")])
def test_a_bag_site_scores_its_bags_with_the_head_its_own_training_bags_give(
        tmp_path: Path, mode: str, embedding: str) -> None:
    scenario = _scenario()
    g = initial_state(scenario)
    sess = SiteSession(materialise_site(scenario.sites[1], scenario, tmp_path),
                       model_cfg=scenario.model, data_cfg=scenario.data)
    assert sess.is_bag_site and set(sess.train_case_labels.tolist()) == {0, 1}
    model = build_segmenter(scenario.model, scenario.data)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in g.items()})
    model.eval()
    tr, te = sess.train_set, sess.test_set
    y = torch.full((len(te.case_ids),), -1, dtype=torch.int64).scatter_reduce(
        0, te.case_index, te.classes, reduce="amax", include_self=False)
    head = refit_mil_head(model, tr.images, tr.case_index, sess.train_case_labels,
                          seed=sess.round_seed(0), embedding=embedding)
    site = sess.evaluate(g, "test", mil_head=mode).mil_auc
    federated = sess.evaluate(g, "test").mil_auc
    assert site == pytest.approx(roc_auc(bag_probabilities(model, te.images, te.case_index,
                                                           head=head), y))
    assert federated == pytest.approx(roc_auc(bag_probabilities(model, te.images, te.case_index), y))
    with pytest.raises(ValueError, match=r"unknown evaluation mil_head 'refit'.*'federated', "
                                         r"'site', 'site-decoder'"):
        sess.evaluate(g, "test", mil_head="refit")


@pytest.mark.parametrize("mode", ["site", "site-decoder", "federated"])
def test_the_server_asks_for_it_and_records_the_sites_mil_auc(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    site_runtime._SESSIONS.clear()
    refits: list[int] = []
    real = site_module.refit_mil_head

    def spy(*args: object, **kw: object) -> object:
        refits.append(1)
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(site_module, "refit_mil_head", spy)
    scenario = _scenario(mil_head=mode)
    grid = LocalGrid(site_yamls(scenario, tmp_path))
    outcome = run_federation(grid, scenario, tmp_path / "run", run_id="milhead")
    evals = [m for m in grid.pushed if m.metadata.message_type == "evaluate"]
    assert evals and all(m.content.config_records[keys.CONFIG][keys.EVAL_MIL_HEAD] == mode
                         for m in evals)
    # the bag site refits where it scores bags (its test evaluation), and only with a site head
    assert bool(refits) is (mode != "federated")
    auc = outcome.sites["volumes"].mil_auc
    assert auc is not None and math.isfinite(auc) and 0.0 <= auc <= 1.0
    assert outcome.sites["masks"].mil_auc is None  # not a bag site


@pytest.mark.parametrize("mode", ["site", "site-decoder"])
def test_a_site_mil_head_without_a_mil_head_is_refused(mode: str) -> None:
    with pytest.raises(ConfigError, match=rf"evaluation.mil_head is '{mode}' but model.mil_pooling "
                                          r"is 'none'.*Fix: model.mil_pooling: attention"):
        _scenario(mil_head=mode, mil_pooling="none")
