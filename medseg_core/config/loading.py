"""YAML file -> validated model, and pydantic errors as one line per key with the fix."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from medseg_core.config.base import M
from medseg_core.config.schema import ScenarioConfig, SiteConfig
from medseg_core.config.site_specs import PathSiteSpec
from medseg_core.errors import ConfigError

__all__ = [
    "format_validation_error",
    "load_scenario",
    "load_site_config",
    "load_yaml_model",
    "parse_model",
]


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names valid at ``loc`` (used to suggest a fix for an unknown key)."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int) or current is None:
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        nxt = None
        for cand in candidates:
            for sub in (cand, *getattr(cand, "__args__", ())):
                if isinstance(sub, type) and issubclass(sub, BaseModel):
                    nxt = sub
                    break
            if nxt:
                break
        current = nxt
    return sorted(getattr(current, "model_fields", {}))


def format_validation_error(
    exc: ValidationError, model: type[BaseModel], source: str
) -> str:
    """Turn a pydantic error into one line per problem: key, value, expected."""
    lines = [f"invalid configuration in {source}:"]
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        key = ".".join(str(p) for p in loc) or "<root>"
        value = err.get("input")
        if err.get("type") == "extra_forbidden":
            valid = _fields_at(model, loc)
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            lines.append(
                f"  - {key}: unknown key (value {value!r}); valid keys here: {valid}{hint}"
            )
        else:
            msg = err.get("msg", "invalid value")
            lines.append(f"  - {key}: {msg} (got {value!r})")
    lines.append("Fix the listed keys and run again.")
    return "\n".join(lines)


def parse_model(model: type[M], data: Any, source: str = "<config>") -> M:
    """Validate ``data`` into ``model``; raise :class:`ConfigError` on failure."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, model, source)) from None


def load_yaml_model(model: type[M], path: str | Path) -> M:
    """Read a YAML file and validate it into ``model``.

    Raises
    ------
    ConfigError
        The file is missing, is not YAML, is not a mapping, or fails
        validation (every problem is listed).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"config file {str(path)!r} does not exist; pass the path of a YAML file "
            "(see simulations/configs/ for examples)"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(path)!r} must hold a mapping of keys, got "
            f"{type(data).__name__}"
        )
    obj = parse_model(model, data, source=str(path))
    return _resolve_relative_paths(obj, path.parent)


def _resolve_relative_paths(obj: M, base: Path) -> M:
    """Make relative site paths relative to the config file's directory."""
    if isinstance(obj, ScenarioConfig):
        sites = tuple(
            s.model_copy(update={"path": (base / s.path).resolve()})
            if isinstance(s, PathSiteSpec) and not s.path.is_absolute()
            else s
            for s in obj.sites
        )
        return obj.model_copy(update={"sites": sites})  # type: ignore[return-value]
    if isinstance(obj, SiteConfig):
        upd = {}
        for key in ("data_dir", "state_dir"):
            p = getattr(obj, key)
            if not p.is_absolute():
                upd[key] = (base / p).resolve()
        return obj.model_copy(update=upd) if upd else obj  # type: ignore[return-value]
    return obj


def load_scenario(path: str | Path) -> ScenarioConfig:
    """Load and validate a scenario YAML file."""
    return load_yaml_model(ScenarioConfig, path)


def load_site_config(path: str | Path) -> SiteConfig:
    """Load and validate a site YAML file (read on the site only)."""
    return load_yaml_model(SiteConfig, path)
