"""MIL: per-bag gradients under Opacus, bag rules, a bag site training under DP."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator

from medseg_core.config import DataConfig, ModelConfig, ScenarioConfig, parse_model
from medseg_core.data.datalist import Case
from medseg_core.errors import DataIntegrityError
from medseg_core.models.heads import MilHead
from medseg_core.sites import materialise_site
from medseg_core.training.bags import bag_batch_size
from medseg_core.training.session import build_segmenter
from medseg_core.training.site import RoundRequest, SiteSession
from medseg_core.weak import MilLoss, WeakSettings, check_bags, fold_bag_grad_samples


def _mil_model(pooling: str) -> torch.nn.Module:
    cfg = parse_model(ModelConfig, {"channels": [8, 16], "strides": [2], "norm_groups": 4,
                                    "mil_pooling": pooling})
    return build_segmenter(cfg, DataConfig(image_size=16))


@pytest.mark.parametrize(("pooling", "size_prior", "detach"), [
    ("attention", None, False), ("max", None, False), ("attention", (0.05, 0.3), False),
    ("attention", None, True)])
def test_folded_grad_samples_are_per_bag_gradients(pooling: str, size_prior, detach: bool) -> None:
    """What Opacus clips must be each bag's own gradient (the privacy unit)."""
    torch.manual_seed(0)
    settings = WeakSettings(size_prior=size_prior, mil_head_detach=detach)
    model = _mil_model(pooling)
    ModuleValidator.validate(model, strict=True)
    b, k = 3, 4
    x = torch.randn(b, k, 1, 16, 16)
    valid = torch.ones(b, k, dtype=torch.bool)
    valid[2, 3] = False  # a padded instance
    y = torch.tensor([1, 0, 1])
    ref = copy.deepcopy(model)
    per_bag = []
    for i in range(b):  # brute force: one bag at a time
        ref.zero_grad()
        MilLoss(ref, settings)(ref(x[i].reshape(k, 1, 16, 16)), (valid[i:i + 1], y[i:i + 1])).backward()
        per_bag.append({n: p.grad.clone() for n, p in ref.named_parameters()})
    gsm = GradSampleModule(model, loss_reduction="mean")
    MilLoss(model, settings)(gsm(x.reshape(b * k, 1, 16, 16)), (valid, y)).backward()
    fold_bag_grad_samples(gsm, b, k)
    for name, p in gsm.named_parameters():
        plain = name.removeprefix("_module.")
        assert p.grad_sample.shape[0] == b, name
        for i in range(b):
            assert torch.allclose(p.grad_sample[i], per_bag[i][plain], atol=1e-6, rtol=1e-3), (name, i)


def test_mil_head_ignores_padding() -> None:
    torch.manual_seed(0)
    head = MilHead(4, pooling="attention")
    h = torch.randn(2 * 3, 4)
    valid = torch.tensor([[True, True, False], [True, True, True]])
    logit, att = head(h, valid)
    assert att[0, 2] == 0 and torch.allclose(att.sum(dim=1), torch.ones(2))
    h2 = h.clone()
    h2[2] = 100.0  # change only the padded instance
    assert torch.allclose(head(h2, valid)[0], logit)


def _case(i: int, bag: str | None, cls: int | None) -> Case:
    return Case(case_id=f"c{i}", image=Path(f"/x/{i}.nii.gz"), label=None, cls=cls, bag=bag,
                split="training")


def test_bag_rules_name_every_offender() -> None:
    assert check_bags([_case(0, "a", 1), _case(1, "a", 1), _case(2, "b", 0)], "s") == {"a": 1, "b": 0}
    with pytest.raises(DataIntegrityError, match=r"conflicting labels \('a': \[0, 1\]\)"):
        check_bags([_case(0, "a", 1), _case(1, "a", 0)], "s")
    with pytest.raises(DataIntegrityError, match="all 2 bags are negative"):
        check_bags([_case(0, "a", 0), _case(1, "b", 0)], "s")
    with pytest.raises(DataIntegrityError, match=r"have no 'class': \['c1'\]"):
        check_bags([_case(0, "a", 1), _case(1, "a", None)], "s")
    with pytest.raises(DataIntegrityError, match=r"have no 'bag': \['c1'\]"):
        check_bags([_case(0, "a", 1), _case(1, None, 1)], "s")


def _bag_site(tmp_path: Path, pooling: str = "attention") -> SiteSession:
    scenario = parse_model(ScenarioConfig, {
        "sites": [{"id": "mil", "dims": 3, "depth": 4, "n_train": 8, "n_test": 3,
                   "label_regime": "bag", "lesion_prevalence": 0.5}],
        "model": {"channels": [8, 16], "strides": [2], "norm_groups": 4, "mil_pooling": pooling},
        "data": {"image_size": 32}, "privacy": {"epsilon": 8.0}})
    site = materialise_site(scenario.sites[0], scenario, tmp_path)
    return SiteSession(site, model_cfg=scenario.model, data_cfg=scenario.data)


def test_volume_bags_train_under_dp_one_sample_per_bag(tmp_path: Path) -> None:
    sess = _bag_site(tmp_path)
    bags = sess.train_bags
    assert len(bags) == 8 and bags.images.shape[1] == 4  # a volume = a bag of its 4 slices
    assert set(bags.labels.tolist()) == {0, 1}
    assert sess.val_set is None
    glob = {k: v.detach().numpy() for k, v in
            build_segmenter(sess.model_cfg, sess.data_cfg).state_dict().items()}
    req = RoundRequest(server_round=1, total_rounds=2, local_epochs=1, lr=0.05, batch_size=8,
                       optimizer="sgd")
    plan = sess.plan(req, accountant=sess.load_accountant())
    assert plan.sample_rate == pytest.approx(1 / 4)  # 2 bags (8 slices) per step over 8 bags
    out = sess.train_round(glob, req)
    assert np.isfinite(out.fit.loss) and 0 < out.epsilon <= 8.0
    assert {"mil_head.att_v.weight", "cam_head.weight"} <= set(out.shared)
    res = sess.evaluate(out.shared, "test")
    assert res.dice is not None and res.n_dice > 0
    assert res.auc is None or 0.0 <= res.auc <= 1.0


def test_bag_batch_size_sets_the_bags_per_dp_step(tmp_path: Path) -> None:
    """``train.bag_batch_size`` counts bags (the privacy unit): 4 of the 8
    bags per step is a sample rate of 1/2, where the default (about
    ``batch_size`` slices' worth) takes 2 bags of 4 slices."""
    assert bag_batch_size(8, 4) == 2 and bag_batch_size(8, 4, 4) == 4 and bag_batch_size(2, 4) == 1
    sess = _bag_site(tmp_path)
    glob = {k: v.detach().numpy() for k, v in
            build_segmenter(sess.model_cfg, sess.data_cfg).state_dict().items()}
    req = RoundRequest(server_round=1, total_rounds=2, local_epochs=1, lr=0.05, batch_size=8,
                       bag_batch_size=4, optimizer="sgd")
    assert sess.dp_steps_per_epoch(8) == 4 and sess.dp_steps_per_epoch(8, 4) == 2
    plan = sess.plan(req, accountant=sess.load_accountant())
    assert plan.sample_rate == pytest.approx(1 / 2) and plan.steps == 2
    out = sess.train_round(glob, req)
    assert np.isfinite(out.fit.loss) and out.fit.steps == 2 and 0 < out.epsilon <= 8.0


def test_2d_bag_members_carry_the_bag_label(tmp_path: Path) -> None:
    scenario = parse_model(ScenarioConfig, {
        "sites": [{"id": "mil2d", "n_train": 12, "n_test": 2, "label_regime": "bag",
                   "bag_size": 4, "lesion_prevalence": 0.3}],
        "model": {"channels": [8, 16], "strides": [2], "norm_groups": 4}, "data": {"image_size": 32}})
    site = materialise_site(scenario.sites[0], scenario, tmp_path)
    entries = json.loads((site.data_dir / "dataset.json").read_text())["training"]
    by_bag: dict[str, set[int]] = {}
    for e in entries:
        by_bag.setdefault(e["bag"], set()).add(e["class"])
    assert len(by_bag) == 3 and all(len(v) == 1 for v in by_bag.values())


def test_non_bag_site_trains_with_a_mil_head_present(tmp_path: Path) -> None:
    """In a mixed federation the model has a MIL head that only bag sites use."""
    scenario = parse_model(ScenarioConfig, {
        "sites": [{"id": "m", "n_train": 8, "n_test": 2}],
        "model": {"channels": [8, 16], "strides": [2], "norm_groups": 4,
                  "mil_pooling": "attention"},
        "data": {"image_size": 32}, "privacy": {"epsilon": 8.0}})
    site = materialise_site(scenario.sites[0], scenario, tmp_path)
    sess = SiteSession(site, model_cfg=scenario.model, data_cfg=scenario.data)
    model = build_segmenter(scenario.model, scenario.data)
    glob = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    out = sess.train_round(glob, RoundRequest(server_round=1, total_rounds=1, local_epochs=1,
                                              lr=0.05, batch_size=4, optimizer="sgd"))
    assert 0 < out.epsilon <= 8.0
    k = "mil_head.att_v.weight"
    assert np.array_equal(out.shared[k], glob[k])  # unused head: exported unchanged
    assert not np.array_equal(out.shared["cam_head.weight"], glob["cam_head.weight"])


def _two_bag_loss(labels: list[int]):  # noqa: ANN202
    """MilLoss of two fixed 3-instance bags with ``labels``, as a function of the settings."""
    torch.manual_seed(0)
    model = _mil_model("attention")
    x = torch.randn(6, 1, 16, 16)
    valid = torch.ones(2, 3, dtype=torch.bool)
    y = torch.tensor(labels)

    def loss(settings: WeakSettings) -> float:
        with torch.no_grad():
            return float(MilLoss(model, settings)(model(x), (valid, y)))

    return loss


def test_bag_weight_scales_only_the_bag_classification_term() -> None:
    loss = _two_bag_loss([1, 0])
    bag_only = loss(WeakSettings(weak_weight=0.0))
    assert loss(WeakSettings(weak_weight=0.0, bag_weight=0.2)) == pytest.approx(0.2 * bag_only, rel=1e-5)
    assert loss(WeakSettings(bag_weight=0.0)) == pytest.approx(loss(WeakSettings()) - bag_only, rel=1e-5)


@pytest.mark.parametrize("detach", [False, True])
def test_detached_mil_head_keeps_the_bag_loss_out_of_the_encoder(detach: bool) -> None:
    """train.weak.mil_head_detach: the bag classification loss trains the MIL
    head alone; joint, it also reaches the encoder."""
    torch.manual_seed(0)
    model = _mil_model("attention")
    x = torch.randn(6, 1, 16, 16)
    valid = torch.ones(2, 3, dtype=torch.bool)
    s = WeakSettings(weak_weight=0.0, mil_head_detach=detach)  # the bag loss alone
    MilLoss(model, s)(model(x), (valid, torch.tensor([1, 0]))).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    head = {n: g for n, g in grads.items() if n.startswith("mil_head.")}
    encoder = {n: g for n, g in grads.items() if not n.startswith(("mil_head.", "cam_head."))
               and g is not None and bool(g.abs().sum() > 0)}
    assert head and all(g is not None and bool(g.abs().sum() > 0) for g in head.values())
    assert bool(encoder) is not detach, sorted(encoder)[:3]


def test_warm_up_round_trains_positive_bags_by_their_bag_label_only() -> None:
    loss = _two_bag_loss([1, 1])
    s = WeakSettings(positives_from_round=4, size_prior=(0.05, 0.3))
    bag_only = loss(WeakSettings(weak_weight=0.0))
    assert loss(s.for_round(3)) == pytest.approx(bag_only, rel=1e-5)
    assert loss(s.for_round(4)) > bag_only


def test_bag_site_reports_the_mil_heads_auc_and_gates_segmentation_by_it(tmp_path: Path) -> None:
    """The MIL head's bag-level prediction: its AUC is reported at a bag site,
    and with ``bag_gate`` a bag it calls negative is segmented as empty."""
    from medseg_core.models.heads import cam_segmenter
    from medseg_core.training.evaluation import evaluate_split
    from medseg_core.weak.bag_scores import bag_probabilities
    from medseg_core.weak.mil import instance_embeddings

    sess = _bag_site(tmp_path)
    torch.manual_seed(0)
    model = build_segmenter(sess.model_cfg, sess.data_cfg)
    test = sess.test_set
    probs = bag_probabilities(model, test.images, test.case_index)
    head = cam_segmenter(model).mil_head
    for case in range(len(probs)):  # one bag at a time, by hand
        rows = torch.nonzero(test.case_index == case).squeeze(1)
        with torch.no_grad():
            model(test.images[rows])
            h = instance_embeddings(cam_segmenter(model).last_features)
            logit, _ = head(h, torch.ones(1, len(rows), dtype=torch.bool))
        assert float(probs[case]) == pytest.approx(float(torch.sigmoid(logit)), rel=1e-5)

    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    res = sess.evaluate(state, "test")
    assert res.mil_auc is not None and 0.0 <= res.mil_auc <= 1.0
    assert sess.evaluate(state, "test", bag_gate=True).mil_auc == pytest.approx(res.mil_auc)
    with torch.no_grad():
        head.classifier.bias.fill_(-100.0)  # every bag called negative: all gated to empty
    gated = evaluate_split(model, test, num_classes=2, bags=True, bag_gate=True)
    assert gated.dice == pytest.approx(gated.empty_dice)
    with torch.no_grad():
        head.classifier.bias.fill_(100.0)  # every bag called positive: the gate changes nothing
    assert (evaluate_split(model, test, num_classes=2, bags=True, bag_gate=True).dice
            == pytest.approx(evaluate_split(model, test, num_classes=2).dice))
    with pytest.raises(ValueError, match="bag_gate needs bags"):
        evaluate_split(model, test, num_classes=2, bag_gate=True)
