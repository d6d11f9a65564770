"""The stage registry and the stage DAG."""

from __future__ import annotations

from ...errors import ShnetError
from .base import Stage
from .grid import GridStage
from .probe import ProbeStage
from .regions import RegionsStage
from .saliency import SaliencyStage

STAGES: dict[str, Stage] = {stage.name: stage for stage in (ProbeStage(), GridStage(), SaliencyStage(), RegionsStage())}


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise ShnetError(f"unknown stage '{name}'; available stages: {', '.join(user_stages())}")
    return STAGES[name]


def user_stages() -> list[str]:
    """Stages a user picks with --stages (probe is implicit)."""
    return [name for name in STAGES if name != "probe"]


def with_dependencies(names: list[str]) -> list[str]:
    """The requested stages plus everything they need, in an order where needs come first."""
    ordered: list[str] = []

    def visit(name: str, trail: tuple) -> None:
        if name in trail:
            raise ShnetError(f"stage dependency cycle: {' -> '.join(trail + (name,))}")
        stage = get_stage(name)
        for need in stage.requires:
            visit(need, trail + (name,))
        if name not in ordered:
            ordered.append(name)

    for name in names:
        visit(name, ())
    return ordered
