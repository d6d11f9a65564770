"""The stage registry and the stage DAG.

Every module of this package that defines a :class:`~.base.Stage` subclass with a ``name`` is a
stage: adding one is adding its module. Nothing here (nor in the runner or the worker) knows any
stage by name; what differs between stages is what they say about themselves (``requires``,
``uses``, ``internal``, ``needs_accelerator``, their hooks).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

from ...errors import ShnetError
from .base import Stage


def _discover() -> dict[str, Stage]:
    found: dict[str, Stage] = {}
    for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, Stage) and cls.__module__ == module.__name__ and "name" in vars(cls):
                found[cls.name] = cls()
    return found


STAGES: dict[str, Stage] = _discover()


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise ShnetError(f"unknown stage '{name}'; available stages: {', '.join(user_stages())}")
    return STAGES[name]


def user_stages() -> list[str]:
    """Stages a user picks with --stages (internal ones run when another stage requires them)."""
    return [name for name, stage in STAGES.items() if not stage.internal]


def all_stages() -> list[Stage]:
    """Every registered stage, internal ones included (their options may be set too)."""
    return list(STAGES.values())


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
