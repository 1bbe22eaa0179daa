"""Package hygiene: the public surface, the version, and the dependency rule of the style guide."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import lorsum

SRC = Path(lorsum.__file__).parent
FORBIDDEN_TOP_LEVEL = {"peft", "transformers", "accelerate", "benchmarks", "numpy", "matplotlib"}


def _modules():
    for info in pkgutil.walk_packages([str(SRC)], prefix="lorsum."):
        yield info.name


def test_version_is_a_string():
    assert isinstance(lorsum.__version__, str)
    assert lorsum.__version__


@pytest.mark.parametrize("name", sorted(_modules()))
def test_every_public_module_declares_all_and_exports_existing_names(name):
    module = importlib.import_module(name)
    if name.rsplit(".", 1)[-1].startswith("_"):
        return
    assert hasattr(module, "__all__"), f"{name} has no __all__"
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names missing attributes: {missing}"


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_src_imports_nothing_heavy_at_module_level(path):
    tree = ast.parse(path.read_text())
    for node in tree.body:  # module level only: integrations may import inside functions
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        for name in names:
            assert name.split(".")[0] not in FORBIDDEN_TOP_LEVEL, f"{path.name} imports {name}"


def test_functional_imports_only_torch_and_itself():
    for path in (SRC / "functional").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.startswith("lorsum")
            ):
                assert node.module.startswith("lorsum.functional"), f"{path.name}: {node.module}"


def test_the_package_ships_its_type_marker():
    assert (SRC / "py.typed").exists()
