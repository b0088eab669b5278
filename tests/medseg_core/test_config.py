"""Scenario and site configuration: validated once at the edge."""

from pathlib import Path

import pytest

from medseg_core.config import (
    PathSiteSpec,
    ScenarioConfig,
    SyntheticSiteSpec,
    load_scenario,
    load_site_config,
    parse_model,
)
from medseg_core.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "simulations" / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_scenarios_validate(path: Path) -> None:
    scenario = load_scenario(path)
    assert len(scenario.sites) >= 2


def test_default_scenario_is_dp_with_three_shifted_sites() -> None:
    scenario = load_scenario(CONFIGS / "default.yaml")
    assert scenario.privacy.enabled and scenario.privacy.epsilon == 8.0
    assert scenario.privacy.delta == 1e-5
    assert len(scenario.sites) >= 3
    shifts = {s.shift.model_dump_json() for s in scenario.sites if isinstance(s, SyntheticSiteSpec)}
    assert len(shifts) == len(scenario.sites)


def test_unknown_key_names_key_and_suggests(tmp_path: Path) -> None:
    f = tmp_path / "s.yaml"
    f.write_text("rounds: 2\nsites: [{id: a}]\ntrain: {local_epoch: 3}\n")
    with pytest.raises(ConfigError, match=r"train\.local_epoch: unknown key.*did you mean 'local_epochs'"):
        load_scenario(f)


def test_wrong_type_names_key_and_value(tmp_path: Path) -> None:
    f = tmp_path / "s.yaml"
    f.write_text("rounds: many\nsites: [{id: a}]\n")
    with pytest.raises(ConfigError, match=r"rounds: .*'many'"):
        load_scenario(f)


def test_bad_strategy_lists_choices() -> None:
    with pytest.raises(ConfigError, match=r"strategy\.name.*fedavg.*fedprox"):
        parse_model(ScenarioConfig, {"sites": [{"id": "a"}], "strategy": {"name": "fedsgd"}})


def test_bad_model_name_suggests() -> None:
    with pytest.raises(ConfigError, match=r"did you mean 'unet'"):
        parse_model(ScenarioConfig, {"sites": [{"id": "a"}], "model": {"name": "unte"}})


def test_every_problem_is_listed() -> None:
    with pytest.raises(ConfigError) as exc:
        parse_model(ScenarioConfig, {"sites": [{"id": "a"}], "rounds": 0, "bogus": 1})
    assert "rounds" in str(exc.value) and "bogus" in str(exc.value)


def test_bag_batch_size_must_be_a_positive_count() -> None:
    with pytest.raises(ConfigError, match=r"train\.bag_batch_size.*0"):
        parse_model(ScenarioConfig, {"sites": [{"id": "a"}], "train": {"bag_batch_size": 0}})
    ok = parse_model(ScenarioConfig, {"sites": [{"id": "a"}], "train": {"bag_batch_size": 32}})
    assert ok.train.bag_batch_size == 32
    assert parse_model(ScenarioConfig, {"sites": [{"id": "a"}]}).train.bag_batch_size is None


def test_duplicate_site_ids_rejected() -> None:
    with pytest.raises(ConfigError, match="duplicated: \\['a'\\]"):
        parse_model(ScenarioConfig, {"sites": [{"id": "a"}, {"id": "a"}]})


def test_path_site_relative_to_config(tmp_path: Path) -> None:
    f = tmp_path / "s.yaml"
    f.write_text("sites: [{id: a, path: data/a}, {id: b}]\n")
    scenario = load_scenario(f)
    assert isinstance(scenario.sites[0], PathSiteSpec)
    assert scenario.sites[0].path == (tmp_path / "data" / "a").resolve()
    assert isinstance(scenario.sites[1], SyntheticSiteSpec)


def test_missing_and_non_mapping_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_scenario(tmp_path / "nope.yaml")
    f = tmp_path / "list.yaml"
    f.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_scenario(f)


def test_site_config_paths_resolved(tmp_path: Path) -> None:
    f = tmp_path / "site.yaml"
    f.write_text("id: h1\ndata_dir: data\nstate_dir: state\nepsilon: 3\n")
    site = load_site_config(f)
    assert site.data_dir == (tmp_path / "data").resolve()
    assert site.epsilon == 3.0


def test_config_is_frozen() -> None:
    scenario = parse_model(ScenarioConfig, {"sites": [{"id": "a"}]})
    with pytest.raises(Exception, match="frozen"):
        scenario.rounds = 3  # type: ignore[misc]


def test_calibration_cases_are_a_count_of_two_or_more_for_site_thresholds() -> None:
    site = {"sites": [{"id": "a"}]}
    with pytest.raises(ConfigError, match=r"evaluation\.calibration_cases.*1"):
        parse_model(ScenarioConfig, {**site, "evaluation": {"threshold": "site",
                                                            "calibration_cases": 1}})
    with pytest.raises(ConfigError, match=r"calibration_cases is 64 but evaluation.threshold is "
                                          r"'argmax'.*Fix: evaluation.threshold: site"):
        parse_model(ScenarioConfig, {**site, "evaluation": {"calibration_cases": 64}})
    ok = parse_model(ScenarioConfig, {**site, "evaluation": {"threshold": "site",
                                                             "calibration_cases": 64}})
    assert ok.evaluation.calibration_cases == 64
    assert parse_model(ScenarioConfig, site).evaluation.calibration_cases is None


def test_without_dp_settings_apply_only_when_dp_is_off() -> None:
    mixed = load_scenario(CONFIGS / "mixed_regime.yaml")
    assert mixed.privacy.enabled and mixed.without_dp
    dp, no_dp = mixed.for_privacy(), mixed.for_privacy(False)
    assert {k.value: v for k, v in dp.strategy.regime_weights.items()} == {"bag": 0.1}
    assert {k.value: v for k, v in no_dp.strategy.regime_weights.items()} == {
        "bag": 0.1, "image": 0.25}
    assert dp.privacy.enabled and not no_dp.privacy.enabled
    assert dp.without_dp is None and no_dp.without_dp is None  # what ran, nothing pending
    # everything the block does not name is the scenario's own
    assert no_dp.train == mixed.train and no_dp.sites == mixed.sites
    assert no_dp.strategy.server_momentum == mixed.strategy.server_momentum

    shift = load_scenario(CONFIGS / "strong_shift.yaml")
    assert shift.for_privacy().train.adaptation_from_round == 6
    assert shift.for_privacy(False).train.adaptation_from_round == 1
    # a scenario whose file has DP off runs its without_dp settings by itself
    off = shift.model_copy(update={"privacy": shift.privacy.model_copy(update={"enabled": False})})
    assert off.for_privacy().train.adaptation_from_round == 1
    assert off.for_privacy(True).train.adaptation_from_round == 6


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        ({"privacy": {"enabled": True}}, "without_dp sets ['privacy']"),
        ({"sites": []}, "without_dp sets ['sites']"),
        ({"strategy": {"regime_weight": {"image": 0.25}}},
         "without_dp.strategy.regime_weight: Extra inputs"),
        ({"rounds": 0}, "without_dp.rounds: Input should be greater than or equal to 1 (got 0)"),
        ({"train": {"adaptation_from_round": 2}},
         "train.adaptation_from_round is 2 but model.adaptation is 'none'"),
    ],
)
def test_bad_without_dp_block_is_refused_at_load(block: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_model(ScenarioConfig, {"sites": [{"id": "a"}], "rounds": 3, "without_dp": block})
    assert expected in str(exc.value) and "Fix" in str(exc.value)
