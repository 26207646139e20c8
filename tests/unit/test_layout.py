"""The architecture, pinned: arrows point down, and the library holds no module-level asserts.

apps (server/, client/, simulations/) -> library (fedmer/) -> nothing above it. A library module
that imports an app or Hydra would tie every node (a car, a hospital) to the simulation stack.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = sorted((ROOT / "fedmer").rglob("*.py"))
FORBIDDEN = ("server", "client", "simulations", "hydra", "omegaconf")


def _imports(path: Path) -> list[str]:
    """Every module a file imports, at any depth (lazy imports inside functions included)."""
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(ROOT)))
def test_library_imports_no_app_and_no_hydra(path: Path) -> None:
    up = [m for m in _imports(path) if m.split(".")[0] in FORBIDDEN]
    assert not up, f"{path.relative_to(ROOT)} imports {up}: the library must not reach up into an app"


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(ROOT)))
def test_library_has_no_module_level_assert(path: Path) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    asserts = [n.lineno for n in tree.body if isinstance(n, ast.Assert)]
    assert not asserts, (
        f"{path.relative_to(ROOT)}: module-level assert at line(s) {asserts} (vanishes under -O)"
    )


def test_the_checker_sees_a_lazy_upward_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from simulations.run import run\n    import hydra\n")
    assert _imports(bad) == ["simulations.run", "hydra"]
