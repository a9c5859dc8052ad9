"""Loading ``params.yaml`` with an optional profile deep-merged on top."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml


class ParamsError(ValueError):
    """``params.yaml`` is missing, malformed, or names an unknown profile."""


def deep_merge(base: dict, override: dict) -> dict:
    """A copy of ``base`` with ``override`` merged in (dicts recursively, the rest replaced)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_params(path: str | Path = "params.yaml", profile: str | None = None) -> dict:
    """Read ``params.yaml``; with ``profile`` (e.g. ``"tiny"``) merge ``profiles[profile]``.

    Raises:
        ParamsError: file missing, not a YAML mapping, or unknown profile.
    """
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file not found: {path}")
    try:
        params = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(params, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level")
    profiles = params.pop("profiles", {}) or {}
    if profile:
        if profile not in profiles:
            raise ParamsError(f"{path}: unknown profile {profile!r}; known: {', '.join(profiles) or 'none'}")
        params = deep_merge(params, profiles[profile])
    return params
