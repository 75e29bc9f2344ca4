"""What `pip install -e .` and its `executor` extra declare: every package a module imports is declared where that
module is installed (sim/ in the core, the executor and the calibrations in the core plus the extra), none only
pulled in by another package, and the core has no torch."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parent.parent
LOCAL = {"sim", "executor", "calibrate"}


def declared() -> tuple[set[str], set[str]]:
    """(core + the plots extra, executor extra) distribution names, normalised. sim/ imports matplotlib only when
    it is installed (`sim.runner.plots_available`; tests/test_cli.py runs the simulator without it)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]

    def names(requirements: list[str]) -> set[str]:
        return {normalise(re.match(r"[A-Za-z0-9_.-]+", r).group(0)) for r in requirements}

    extras = project["optional-dependencies"]
    return names(project["dependencies"] + extras["plots"]), names(extras["executor"])


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported(package: str) -> set[str]:
    """Top-level modules the package's files import (at any depth in a file), outside the standard library."""
    found = set()
    for path in (ROOT / package).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {alias.name.partition(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.partition(".")[0])
    return found - LOCAL - set(sys.stdlib_module_names)


def distributions(module: str) -> set[str]:
    return {normalise(d) for d in importlib.metadata.packages_distributions().get(module, [module])}


def test_the_core_install_has_no_torch_and_the_extra_has_it() -> None:
    core, executor = declared()
    assert not core & {"torch", "transformers", "accelerate", "safetensors", "gguf"}
    bare = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    assert not any(normalise(r).startswith("matplotlib") for r in bare), "plots are an extra: the core stays small"
    assert {"torch", "transformers", "safetensors"} <= executor


@pytest.mark.parametrize(("package", "extra"), [("sim", False), ("executor", True), ("calibrate", True)])
def test_every_imported_package_is_declared(package: str, extra: bool) -> None:
    core, executor = declared()
    allowed = core | (executor if extra else set())
    missing = {module for module in imported(package) if not distributions(module) & allowed}
    assert not missing, f"{package}/ imports {sorted(missing)}, not declared in pyproject.toml"


def test_torch_is_a_range_not_a_build() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    (torch,) = [r for r in project["optional-dependencies"]["executor"] if normalise(r).startswith("torch")]
    assert ">=" in torch and "+" not in torch and "==" not in torch
