"""The tree keeps the shape docs/architecture.md describes: no import cycle between modules or
packages, small modules, and every module on the page."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "llmswap"
ARCHITECTURE = PACKAGE.parent / "docs" / "architecture.md"
MAX_LINES = 400


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """llmswap module -> the llmswap modules it imports anywhere (for types only, too: a
    cycle of types is a cycle of concepts)."""
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        found: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                base = node.module
                found |= {f"{base}.{a.name}" for a in node.names} | {base}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def _acyclic(graph: dict[str, set[str]]) -> None:
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join([*path, module]))
        if module in done:
            return
        for dependency in sorted(graph[module]):
            visit(dependency, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def _unit(module: str) -> str:
    """The package a module belongs to (``llmswap.swap``), or the module itself at the top."""
    parts = module.split(".")
    return ".".join(parts[:2]) if (PACKAGE / parts[1]).is_dir() else module


def test_no_import_cycle_between_modules() -> None:
    graph = _imports()
    _acyclic(graph)
    assert "llmswap.swap.manager" in graph["llmswap.proxy"]  # the walk saw real edges


def test_no_import_cycle_between_packages() -> None:
    """A package is one concept: a cycle between two (events importing swap, swap importing
    events) is one concept split in two, even when no two modules import each other."""
    units: dict[str, set[str]] = {}
    for module, imported in _imports().items():
        if module == "llmswap":
            continue
        edges = units.setdefault(_unit(module), set())
        edges |= {_unit(m) for m in imported if m != "llmswap"} - {_unit(module)}
    _acyclic(units)
    assert "llmswap.config" in units["llmswap.swap"]  # the walk saw packages


def test_no_module_is_a_grab_bag() -> None:
    sizes = {_module(p): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {m: n for m, n in sizes.items() if n > MAX_LINES} == {}


def test_the_architecture_page_lists_every_module_and_no_ghost() -> None:
    """A module the page does not name is one a newcomer cannot place; a name the page keeps
    after its module moved sends them to nothing."""
    rows = [line for line in ARCHITECTURE.read_text().splitlines() if line.startswith("| `")]
    named = {n for row in rows for n in re.findall(r"`([a-z_/]+\.py)`", row.split(" | ")[0])}
    modules = {
        str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"
    }
    assert modules - named == set(), "add them to docs/architecture.md's table"
    assert {n for n in named if "/" not in n or n.split("/")[0] != "twisted"} - modules == set()
