"""Scenario site specs -> site directories and private site configs.

A scenario names its sites either as a synthetic spec (generated here,
deterministically from the scenario seed) or as ``{id, path}`` pointing at a
directory in the dataset.json format. Either way each site ends up with a
:class:`~medseg_core.config.SiteConfig` of its own, written as ``site.yaml``
next to its state directory, exactly what a real hospital would hold.
"""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

from medseg_core.config import (
    AnatomySiteSpec,
    PathSiteSpec,
    ScenarioConfig,
    SiteConfig,
    SiteSpec,
    SyntheticSiteSpec,
)
from medseg_core.data.synthetic import generate_site

__all__ = ["materialise_site", "materialise_sites", "write_site_config"]

logger = logging.getLogger(__name__)


def write_site_config(site: SiteConfig, path: Path) -> Path:
    """Write a site config as YAML (paths absolute)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = site.model_dump(mode="json")
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def materialise_site(
    spec: SiteSpec, scenario: ScenarioConfig, workdir: str | Path, *, dp_enabled: bool | None = None
) -> SiteConfig:
    """Generate (if synthetic) one site's data and return its site config.

    Parameters
    ----------
    spec
        The scenario's entry for this site.
    scenario
        The whole scenario (seed, privacy defaults, data settings).
    workdir
        Run directory: synthetic data goes to ``workdir/data/<id>`` and site
        state to ``workdir/sites/<id>/state``.
    dp_enabled
        Override the scenario's ``privacy.enabled`` (used by the no-DP arm).
    """
    workdir = Path(workdir).resolve()
    if isinstance(spec, SyntheticSiteSpec):
        data_dir = generate_site(
            spec, workdir / "data" / spec.id, seed=scenario.seed,
            image_size=scenario.data.image_size,
        )
    elif isinstance(spec, AnatomySiteSpec):
        from medseg_core.data.anatomy import generate_anatomy_site

        data_dir = generate_anatomy_site(
            spec.source, workdir / "data" / spec.id, seed=scenario.seed,
            n_train=spec.n_train, n_test=spec.n_test, image_size=scenario.data.image_size,
        )
    elif isinstance(spec, PathSiteSpec):
        data_dir = spec.path
    else:  # pragma: no cover - pydantic guarantees the union
        raise TypeError(f"unknown site spec {type(spec).__name__}")
    priv = scenario.privacy
    site = SiteConfig(
        id=spec.id,
        data_dir=Path(data_dir).resolve(),
        state_dir=workdir / "sites" / spec.id / "state",
        label_regime=spec.label_regime,
        epsilon=spec.epsilon if spec.epsilon is not None else priv.epsilon,
        delta=priv.delta,
        dp_enabled=priv.enabled if dp_enabled is None else dp_enabled,
        max_grad_norm=priv.max_grad_norm,
        accountant=priv.accountant,
        secure_mode=priv.secure_mode,
        val_fraction=scenario.data.val_fraction,
        seed=scenario.seed,
        torch_threads=scenario.simulation.torch_threads,
        attack=spec.attack,
        drop_rounds=spec.drop_rounds,
        drop_seconds=spec.drop_seconds,
    )
    write_site_config(site, workdir / "sites" / spec.id / "site.yaml")
    return site


def materialise_sites(
    scenario: ScenarioConfig, workdir: str | Path, *, dp_enabled: bool | None = None
) -> list[SiteConfig]:
    """Materialise every site of a scenario, in scenario order."""
    return [materialise_site(s, scenario, workdir, dp_enabled=dp_enabled) for s in scenario.sites]
