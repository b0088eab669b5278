"""Configuration models: YAML file -> pydantic model validated once at the edge.

This is the only package that knows configuration key names. Everything
downstream receives frozen pydantic objects.

Two kinds of file exist:

* a **scenario** (:class:`ScenarioConfig`): what the federation runs (rounds,
  model, strategy, privacy defaults) and, for simulations, which sites exist;
* a **site** (:class:`SiteConfig`): one hospital's private facts (data
  directory, epsilon cap, label regime). It is read by that site's client
  only and never sent anywhere.

The package is split by concern (``base``: strict base and enums; ``weak``:
the weak-label options; ``site_specs``: the sites a scenario lists;
``sections``: the scenario's sections, model to simulation; ``schema``:
scenario and site, and the rules across sections; ``loading``: files and
error messages); import from ``medseg_core.config``.
"""

from __future__ import annotations

from medseg_core.config.base import AdaptationMode, Attack, LabelRegime, StrategyName
from medseg_core.config.loading import (
    format_validation_error,
    load_scenario,
    load_site_config,
    load_yaml_model,
    parse_model,
)
from medseg_core.config.schema import ScenarioConfig, SiteConfig
from medseg_core.config.sections import (
    DataConfig,
    EvalConfig,
    ModelConfig,
    PersonalizeConfig,
    PrivacyConfig,
    SimulationConfig,
    StrategyConfig,
    TrainConfig,
)
from medseg_core.config.site_specs import (
    AnatomySiteSpec,
    PathSiteSpec,
    ShiftSpec,
    SiteSpec,
    SyntheticSiteSpec,
)
from medseg_core.config.weak import WeakConfig

__all__ = [
    "AdaptationMode",
    "AnatomySiteSpec",
    "Attack",
    "DataConfig",
    "EvalConfig",
    "LabelRegime",
    "ModelConfig",
    "PathSiteSpec",
    "PersonalizeConfig",
    "PrivacyConfig",
    "ScenarioConfig",
    "ShiftSpec",
    "SimulationConfig",
    "SiteConfig",
    "SiteSpec",
    "StrategyConfig",
    "StrategyName",
    "SyntheticSiteSpec",
    "TrainConfig",
    "WeakConfig",
    "format_validation_error",
    "load_scenario",
    "load_site_config",
    "load_yaml_model",
    "parse_model",
]
