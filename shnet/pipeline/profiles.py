"""Extraction profiles: named, versioned YAML recipes of stage options, plus ``--set`` overrides."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Iterable

import yaml

from ..errors import ShnetError


def profile_names() -> list[str]:
    folder = resources.files("shnet.manifests").joinpath("profiles")
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_profile(name_or_file: str) -> dict:
    """A profile by name (shipped in shnet/manifests/profiles) or from a YAML file path."""
    path = Path(name_or_file).expanduser()
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ShnetError(f"profile file not found: {path}")
        text = path.read_text()
        source = str(path)
    else:
        shipped = resources.files("shnet.manifests").joinpath("profiles", f"{name_or_file}.yaml")
        if not shipped.is_file():
            raise ShnetError(f"unknown profile '{name_or_file}'; shipped profiles: {', '.join(profile_names())}, or give a YAML file path")
        text = shipped.read_text()
        source = f"profile '{name_or_file}'"
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ShnetError(f"{source} is not valid YAML: {exc}") from exc
    stages = data.get("stages")
    if not isinstance(stages, dict) or not all(isinstance(v, dict) for v in stages.values()):
        raise ShnetError(f"{source} needs a 'stages:' mapping of stage name -> options")
    return {"name": data.get("name", str(name_or_file)), "version": data.get("version", 1), "stages": stages}


def apply_overrides(stages: dict, assignments: Iterable[str]) -> dict:
    """Apply ``STAGE.KEY=VALUE`` assignments (VALUE parsed as YAML: numbers, null, true...)."""
    merged = {name: dict(options) for name, options in stages.items()}
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        stage, dot, option = key.strip().partition(".")
        if not sep or not dot or not stage or not option:
            raise ShnetError(f"--set takes STAGE.KEY=VALUE (e.g. grid.weights=/path/resnet152.pth); got {assignment!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        merged.setdefault(stage, {})[option] = value
    return merged
