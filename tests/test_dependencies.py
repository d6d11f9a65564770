"""Every third-party module the package imports is a declared requirement of the installed shnet.

The package's source is walked (every ``import`` statement, at any depth: lazy imports inside
functions count, because a user reaches them) and each top-level module is traced to the
distributions that provide it. A module must come from a requirement of ``install_requires``
(its own extras included: ``dask[distributed]`` declares ``distributed``), or be one of the optional
modules below, each of which is an extra of shnet or never a dependency at all, imported where a
failure turns into a message naming what to install.
"""

from __future__ import annotations

import ast
import functools
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import shnet

PACKAGE_ROOT = Path(shnet.__file__).parent

# module -> the shnet extra that declares it (None: never a dependency, a backend used where importable)
OPTIONAL_MODULES = {"faiss": "faiss", "detectron2": None}


@functools.cache
def parsed_sources() -> tuple[tuple[Path, ast.Module], ...]:
    """Every module of the package, parsed once for all the tests."""
    return tuple((path, ast.parse(path.read_text(encoding="utf-8"), str(path))) for path in sorted(PACKAGE_ROOT.rglob("*.py")))


def imported_top_level_modules() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path, tree in parsed_sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(PACKAGE_ROOT.parent)))
    return found


def third_party(modules: dict[str, set[str]]) -> dict[str, set[str]]:
    return {m: where for m, where in modules.items() if m not in sys.stdlib_module_names and m != "shnet"}


def declared_distributions(extra: str | None = None) -> set[str]:
    """Distributions shnet declares (with ``extra``: that extra's), followed through the extras each
    requirement names (``dask[distributed]`` -> dask and distributed)."""
    wanted = set()
    for text in metadata.requires("shnet") or []:
        requirement = Requirement(text)
        marker_env = {"extra": extra or ""}
        if requirement.marker is not None and not requirement.marker.evaluate(marker_env):
            continue
        if requirement.marker is None and extra is not None:
            continue
        wanted.add(canonicalize_name(requirement.name))
        for sub_extra in requirement.extras:
            for sub_text in metadata.requires(requirement.name) or []:
                sub = Requirement(sub_text)
                if sub.marker is not None and sub.marker.evaluate({"extra": sub_extra}) and not sub.marker.evaluate({"extra": ""}):
                    wanted.add(canonicalize_name(sub.name))
    return wanted


@functools.cache
def installed_modules() -> dict[str, list[str]]:
    """Top-level module -> the installed distributions that provide it (one scan of site-packages)."""
    return metadata.packages_distributions()


def providers(module: str) -> set[str]:
    return {canonicalize_name(d) for d in installed_modules().get(module, [])}


def test_walker_sees_lazy_imports_and_skips_the_standard_library():
    modules = imported_top_level_modules()
    assert "transformers" in modules  # imported only inside functions
    assert "faiss" in modules and "json" in modules
    assert "json" not in third_party(modules) and "shnet" not in third_party(modules)


def test_every_imported_module_is_declared():
    core = declared_distributions()
    undeclared = {}
    for module, where in sorted(third_party(imported_top_level_modules()).items()):
        if module in OPTIONAL_MODULES:
            continue
        found = providers(module)
        assert found, f"{module} (imported in {sorted(where)}) is not installed: declare it in setup.cfg install_requires"
        if not found & core:
            undeclared[module] = (sorted(found), sorted(where))
    assert not undeclared, f"imported but not in install_requires: {undeclared}"


@pytest.mark.parametrize("module,extra", [(m, e) for m, e in OPTIONAL_MODULES.items() if e])
def test_optional_modules_are_extras(module, extra):
    assert extra in (metadata.metadata("shnet").get_all("Provides-Extra") or [])
    if providers(module):
        assert providers(module) & declared_distributions(extra), f"{module} is not what extra [{extra}] installs"


def test_optional_imports_are_guarded():
    """An optional module is imported only inside a function (where its absence becomes a message),
    never at module level, so a missing one never breaks a command that does not need it."""
    for path, tree in parsed_sources():
        for node in tree.body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            for name in names:
                assert name.split(".")[0] not in OPTIONAL_MODULES, f"{path}: optional module {name} imported at module level"
