"""Post-federation personalisation of a site's private layers (train.personalize)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medseg_core.adaptation import AdaptationStore, split_state
from medseg_core.config import ScenarioConfig, parse_model
from medseg_core.errors import ConfigError, PrivacyBudgetExceeded
from medseg_core.sites import materialise_site
from medseg_core.training import personalize as personalize_module
from medseg_core.training import site as site_module
from medseg_core.training.session import FitSettings, build_segmenter, fit
from medseg_core.training.site import RoundRequest, SiteSession


def _scenario(mode: str = "norm+adapter", *, dp: bool = False, val_fraction: float = 0.25,
              epochs: int = 0) -> ScenarioConfig:
    return parse_model(ScenarioConfig, {
        "rounds": 2,
        "sites": [{"id": "h1", "n_train": 12, "n_test": 2, "shift": {"intensity_scale": 1.5}}],
        "model": {"channels": [8, 16], "strides": [2], "norm_groups": 4, "adaptation": mode},
        "data": {"image_size": 32, "val_fraction": val_fraction},
        "train": {"batch_size": 4, "personalize": {"epochs": epochs}},
        "privacy": {"enabled": dp, "epsilon": 4.0},
    })


def _session(tmp_path: Path, scenario: ScenarioConfig) -> SiteSession:
    site = materialise_site(scenario.sites[0], scenario, tmp_path)
    return SiteSession(site, model_cfg=scenario.model, data_cfg=scenario.data)


def _global(scenario: ScenarioConfig) -> dict[str, np.ndarray]:
    from server.federation import initial_state

    return initial_state(scenario)


def test_fit_only_trains_the_named_parameters() -> None:
    scenario = _scenario()
    model = build_segmenter(scenario.model, scenario.data)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    only = frozenset(k for k in before if k.startswith("adapter."))
    from medseg_core.data.slices import SliceSet

    x = torch.rand(8, 1, 32, 32)
    data = SliceSet(images=x, labels=(x > 0.7).long(), case_index=torch.arange(8),
                    case_ids=tuple(f"c{i}" for i in range(8)), classes=torch.ones(8, dtype=torch.long),
                    bags=(None,) * 8)
    res = fit(model, data, FitSettings(epochs=1, lr=1e-2, batch_size=4), num_classes=2,
              privacy=None, only=only)
    changed = {k for k in before if not np.array_equal(res.state[k], before[k].numpy())}
    assert changed and changed <= only


def test_the_epoch_with_the_best_val_dice_is_kept(tmp_path: Path, monkeypatch) -> None:
    """Scripted validation Dice: before 0.5, epochs 0.4 / 0.7 / 0.6 -> epoch 2."""
    sess = _session(tmp_path, _scenario())
    glob = _global(_scenario())
    federated = sess.private_state("r", 2)
    scores = iter([0.5, 0.4, 0.7, 0.6])
    monkeypatch.setattr(personalize_module, "evaluate_state",
                        lambda *a, **k: type("M", (), {"dice": next(scores)})())
    out = sess.personalize(glob, "r", 2, epochs=3, lr=1e-2, batch_size=4)
    assert (out.val_dice_before, out.val_dice_after, out.epochs_kept) == (0.5, 0.7, 2)
    assert out.steps == 3 * 3 and out.epsilon is None  # 9 training slices / batch 4, no DP
    kept = AdaptationStore(sess.site.state_dir, "r#personalized").load_at(2)
    assert set(kept) == sess.local_keys
    assert any(not np.array_equal(kept[k], federated[k]) for k in kept)
    # the per-round private layers stay as federated; evaluation picks the kept ones
    assert AdaptationStore(sess.site.state_dir, "r").rounds() == []
    assert sess.has_personalized("r", 2) and not sess.has_personalized("r", 1)


def test_no_better_epoch_keeps_the_federated_layers(tmp_path: Path, monkeypatch) -> None:
    sess = _session(tmp_path, _scenario())
    scores = iter([0.5, 0.4, 0.5])  # a tie is not a gain
    monkeypatch.setattr(personalize_module, "evaluate_state",
                        lambda *a, **k: type("M", (), {"dice": next(scores)})())
    out = sess.personalize(_global(_scenario()), "r", 2, epochs=2, lr=1e-2, batch_size=4)
    assert out.epochs_kept == 0 and out.val_dice_after == 0.5
    kept = AdaptationStore(sess.site.state_dir, "r#personalized").load_at(2)
    federated = sess.private_state("r", 2)
    assert all(np.array_equal(kept[k], federated[k]) for k in federated)


def test_all_weights_fine_tunes_a_plain_fedavg_model(tmp_path: Path, monkeypatch) -> None:
    """layers="all", the FedAvg-FT baseline of benchmarks/personalize_run.py:
    every weight trains (SGD with momentum here) and the whole state is kept."""
    scenario = _scenario(mode="none")
    sess = _session(tmp_path, scenario)
    glob = _global(scenario)
    with pytest.raises(ConfigError, match=r"trains the site-private layers, and model.adaptation "
                                          r"is 'none'"):
        sess.personalize(glob, "r", 2, epochs=1, lr=1e-2, batch_size=4)
    with pytest.raises(ValueError, match=r"layers='bogus': expected 'private' or 'all'"):
        sess.personalize(glob, "r", 2, epochs=1, lr=1e-2, batch_size=4, layers="bogus")
    scores = iter([0.5, 0.6])
    monkeypatch.setattr(personalize_module, "evaluate_state",
                        lambda *a, **k: type("M", (), {"dice": next(scores)})())
    out = sess.personalize(glob, "r", 2, epochs=1, lr=1e-2, batch_size=4, optimizer="sgd",
                           momentum=0.9, layers="all")
    assert out.epochs_kept == 1
    kept = AdaptationStore(sess.site.state_dir, "r#personalized").load_at(2)
    assert set(kept) == set(glob)
    weights = {n for n, _ in build_segmenter(scenario.model, scenario.data).named_parameters()}
    changed = {k for k in glob if not np.array_equal(kept[k], glob[k])}
    # every weight moved (a conv bias just before a GroupNorm gets no gradient)
    assert {k for k in weights if k.endswith(".weight")} <= changed <= weights


def test_personalised_evaluation_uses_the_kept_layers(tmp_path: Path, monkeypatch) -> None:
    scenario = _scenario()
    sess = _session(tmp_path, scenario)
    glob = _global(scenario)
    with pytest.raises(ConfigError, match="holds no personalised layers for run 'r', round 2"):
        sess.evaluate(glob, "test", run_name="r", model_round=2, personalized=True)
    sess.personalize(glob, "r", 2, epochs=1, lr=5e-2, batch_size=4)
    kept = AdaptationStore(sess.site.state_dir, "r#personalized").load_at(2)
    loaded: list[dict] = []
    real = site_module.load_state
    monkeypatch.setattr(site_module, "load_state", lambda m, st: (loaded.append(dict(st)), real(m, st)))
    sess.evaluate(glob, "test", run_name="r", model_round=2, personalized=True)
    sess.evaluate(glob, "test", run_name="r", model_round=2)
    pers, fed = loaded
    federated = sess.private_state("r", 2)
    assert all(np.array_equal(pers[k], kept[k]) for k in kept)
    assert all(np.array_equal(fed[k], federated[k]) for k in federated)
    assert all(np.array_equal(pers[k], glob[k]) and np.array_equal(fed[k], glob[k]) for k in glob)


def test_under_dp_the_rounds_reserve_the_budget_and_a_repeat_spends_nothing(tmp_path: Path) -> None:
    scenario = _scenario(dp=True, epochs=1)
    sess = _session(tmp_path, scenario)
    state = _global(scenario)
    for rnd in (1, 2):
        req = RoundRequest(server_round=rnd, total_rounds=2, local_epochs=1, lr=1e-2,
                           batch_size=4, run_name="r", reserve_epochs=1)
        state = split_state(sess.train_round(state, req).fit.state, sess.local_keys)[0]
    after_rounds = sess.epsilon_spent()
    assert after_rounds < 4.0 - 0.1
    out = sess.personalize(state, "r", 2, epochs=1, lr=1e-2, batch_size=4)
    assert after_rounds < out.epsilon <= 4.0 + 1e-6
    assert out.privacy is not None and out.privacy["steps"] == out.steps == 3
    ledger = (sess.site.state_dir / "ledger.jsonl").read_text().splitlines()
    assert len(ledger) == 3 and '"phase": "personalize"' in ledger[-1]
    # a repeated request (server resumed) is answered from the record
    acc = sess.accountant_path.read_bytes()
    again = sess.personalize(state, "r", 2, epochs=1, lr=1e-2, batch_size=4)
    assert again == out and sess.accountant_path.read_bytes() == acc


def test_under_dp_without_a_reserve_personalisation_is_refused(tmp_path: Path) -> None:
    scenario = _scenario(dp=True)
    sess = _session(tmp_path, scenario)
    state = _global(scenario)
    for rnd in (1, 2):
        req = RoundRequest(server_round=rnd, total_rounds=2, local_epochs=1, lr=1e-2,
                           batch_size=4, run_name="r")
        state = split_state(sess.train_round(state, req).fit.state, sess.local_keys)[0]
    acc = sess.accountant_path.read_bytes()
    with pytest.raises(PrivacyBudgetExceeded, match=r"asks for 3 DP steps .* reserved 0 .*Fix: set "
                                                    r"train.personalize.epochs"):
        sess.personalize(state, "r", 2, epochs=1, lr=1e-2, batch_size=4)
    assert sess.accountant_path.read_bytes() == acc
    assert not sess.has_personalized("r", 2)


def test_no_private_layers_or_no_validation_split_say_how_to_fix(tmp_path: Path) -> None:
    plain = _scenario(mode="none")
    with pytest.raises(ConfigError, match="model.adaptation is 'none'"):
        _session(tmp_path / "a", plain).personalize(_global(plain), "r", 1, epochs=1, lr=1e-3,
                                                    batch_size=4)
    no_val = _scenario(val_fraction=0.0)
    with pytest.raises(ConfigError, match=r"no validation cases with masks .*val_fraction > 0"):
        _session(tmp_path / "b", no_val).personalize(_global(no_val), "r", 1, epochs=1, lr=1e-3,
                                                     batch_size=4)


def test_scenario_refuses_personalisation_without_private_layers() -> None:
    with pytest.raises(Exception, match=r"train.personalize.epochs is 3 with layers 'private' but "
                                        r"model.adaptation is 'none'.*Fix: set model.adaptation.*"
                                        r"train.personalize.layers: all"):
        _scenario(mode="none", epochs=3)
    # every weight fine-tuned (FedAvg-FT) needs no private layers
    ft = parse_model(ScenarioConfig, {
        **_scenario(mode="none").model_dump(mode="json", exclude={"without_dp"}),
        "train": {"batch_size": 4, "personalize": {"epochs": 3, "layers": "all"}}})
    assert (ft.train.personalize.epochs, ft.train.personalize.layers) == (3, "all")


def test_under_dp_every_weight_is_fine_tuned_from_the_reserved_budget(
        tmp_path: Path, monkeypatch) -> None:
    """train.personalize.layers: all on plain FedAvg (FedAvg-FT) under DP: the
    rounds reserve the epochs' steps, every weight then trains by DP-SGD
    through the site's accountant, and the cap holds."""
    scenario = parse_model(ScenarioConfig, {
        **_scenario(mode="none").model_dump(mode="json", exclude={"without_dp"}),
        "train": {"batch_size": 4, "personalize": {"epochs": 1, "layers": "all"}},
        "privacy": {"enabled": True, "epsilon": 4.0},
    })
    assert scenario.train.personalize.layers == "all"
    sess = _session(tmp_path, scenario)
    state = _global(scenario)
    for rnd in (1, 2):
        req = RoundRequest(server_round=rnd, total_rounds=2, local_epochs=1, lr=1e-2,
                           batch_size=4, run_name="r", reserve_epochs=1)
        state = sess.train_round(state, req).fit.state
    after_rounds = sess.epsilon_spent()
    scores = iter([0.5, 0.6])  # epoch 1 is kept, so its weights are what is stored
    monkeypatch.setattr(personalize_module, "evaluate_state",
                        lambda *a, **k: type("M", (), {"dice": next(scores)})())
    out = sess.personalize(state, "r", 2, epochs=1, lr=5e-2, batch_size=4, layers="all")
    assert out.epochs_kept == 1 and out.steps == 3
    assert after_rounds < out.epsilon <= 4.0 + 1e-6
    kept = AdaptationStore(sess.site.state_dir, "r#personalized").load_at(2)
    assert set(kept) == set(state)  # the whole model, with no Opacus "_module." prefix
    changed = {k for k in state if not np.array_equal(kept[k], state[k])}
    assert {k for k in state if k.endswith(".weight")} <= changed
    ledger = (sess.site.state_dir / "ledger.jsonl").read_text().splitlines()
    assert len(ledger) == 3 and '"phase": "personalize"' in ledger[-1]


def test_personalisation_momentum_is_an_sgd_setting() -> None:
    from medseg_core.config.sections import PersonalizeConfig

    with pytest.raises(Exception, match=r"train.personalize.momentum is 0.9 but "
                                        r"train.personalize.optimizer is 'adam'.*Fix: optimizer: sgd"):
        parse_model(PersonalizeConfig, {"epochs": 2, "momentum": 0.9})
    cfg = parse_model(PersonalizeConfig, {"epochs": 2, "optimizer": "sgd", "momentum": 0.9})
    assert (cfg.optimizer, cfg.momentum, cfg.lr) == ("sgd", 0.9, 1e-3)


@pytest.mark.parametrize("threshold", ["site", "argmax"])
def test_epochs_are_picked_at_the_operating_point_the_site_is_scored_at(
        tmp_path: Path, monkeypatch, threshold: str) -> None:
    """With evaluation.threshold: site every candidate (the federated layers and
    each epoch) is scored at the threshold calibrated for that candidate, as
    evaluation will score the kept one; with argmax no calibration runs."""
    sess = _session(tmp_path, _scenario())
    taus = iter([0.3, 0.6, 0.8])
    calibrated: list[float] = []

    def fake_threshold(model, **kw):
        calibrated.append(next(taus))
        return calibrated[-1]

    monkeypatch.setattr(sess, "site_threshold", fake_threshold)
    scored: list[float | None] = []
    real = personalize_module.evaluate_state
    monkeypatch.setattr(personalize_module, "evaluate_state",
                        lambda *a, **k: (scored.append(k["threshold"]), real(*a, **k))[1])
    sess.personalize(_global(_scenario()), "r", 2, epochs=2, lr=1e-2, batch_size=4,
                     threshold=threshold)
    assert scored == ([0.3, 0.6, 0.8] if threshold == "site" else [None, None, None])
    assert len(calibrated) == (3 if threshold == "site" else 0)
    with pytest.raises(ValueError, match="unknown evaluation threshold 'best'"):
        sess.personalize(_global(_scenario()), "r", 3, epochs=1, lr=1e-2, batch_size=4,
                         threshold="best")


def test_site_threshold_is_the_calibrated_one(tmp_path: Path) -> None:
    """The helper evaluation and personalisation share is calibrate_threshold
    on the site's own training labels."""
    from medseg_core.calibration import calibrate_threshold

    sess = _session(tmp_path, _scenario())
    model = build_segmenter(sess.model_cfg, sess.data_cfg)
    tr = sess.train_set
    found = calibrate_threshold(model, tr.images, tr.case_index, sess.train_case_labels,
                                min_component_voxels=3)
    expected = None if found is None else found[0]
    assert sess.site_threshold(model, min_component_voxels=3) == expected
