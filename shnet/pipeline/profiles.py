"""Extraction profiles: named, versioned YAML recipes of stage options, plus ``--set`` overrides."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Iterable

import yaml

from ..errors import ShnetError

YAML_SUFFIXES = (".yaml", ".yml")


def profile_names() -> list[str]:
    folder = resources.files("shnet.manifests").joinpath("profiles")
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def is_profile_name(name_or_file: str) -> bool:
    """A bare name (no path separator, no YAML suffix) always means a shipped profile, whatever the
    working folder holds; anything else is a file path."""
    separators = {"/", os.sep, os.altsep} - {None}
    return not any(sep in name_or_file for sep in separators) and Path(name_or_file).suffix not in YAML_SUFFIXES


def load_profile(name_or_file: str) -> dict:
    """A shipped profile by bare name (``shnet/manifests/profiles/NAME.yaml``) or a YAML file by path."""
    if is_profile_name(name_or_file):
        shipped = resources.files("shnet.manifests").joinpath("profiles", f"{name_or_file}.yaml")
        if not shipped.is_file():
            raise ShnetError(
                f"unknown profile '{name_or_file}': no shipped profile has that name "
                f"(shipped: {', '.join(profile_names())}); for a file of your own give its path, e.g. ./{name_or_file}.yaml"
            )
        text = shipped.read_text()
        source = f"profile '{name_or_file}'"
    else:
        path = Path(name_or_file).expanduser()
        if not path.is_file():
            raise ShnetError(
                f"profile file not found: {path} (a path was given; shipped profiles are named without a path or suffix: "
                f"{', '.join(profile_names())})"
            )
        text = path.read_text()
        source = str(path)
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
