"""The stage registry and the stage DAG."""

from __future__ import annotations

from ...errors import ShnetError
from .base import Stage
from .grid import GridStage
from .layout import LayoutStage
from .panoptic import PanopticStage
from .probe import ProbeStage
from .regions import RegionsStage
from .saliency import SaliencyStage

STAGES: dict[str, Stage] = {stage.name: stage for stage in (ProbeStage(), GridStage(), SaliencyStage(), RegionsStage(), PanopticStage(), LayoutStage())}


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise ShnetError(f"unknown stage '{name}'; available stages: {', '.join(user_stages())}")
    return STAGES[name]


def user_stages() -> list[str]:
    """Stages a user picks with --stages (probe is implicit)."""
    return [name for name in STAGES if name != "probe"]


def with_dependencies(names: list[str]) -> list[str]:
    """The requested stages plus everything they need, in an order where needs come first (and the
    stages a stage ``uses``, when they are in the run, come before it too)."""
    running = set(_ordered(names, lambda stage: stage.requires))
    return _ordered(names, lambda stage: stage.requires + tuple(u for u in stage.uses if u in running))


def _ordered(names: list[str], before) -> list[str]:
    ordered: list[str] = []

    def visit(name: str, trail: tuple) -> None:
        if name in trail:
            raise ShnetError(f"stage dependency cycle: {' -> '.join(trail + (name,))}")
        for need in before(get_stage(name)):
            visit(need, trail + (name,))
        if name not in ordered:
            ordered.append(name)

    for name in names:
        visit(name, ())
    return ordered
