"""The layers stay layered: which package may import which, and no import cycles.

Only imports that run when a module is loaded count (module level, not under
``if TYPE_CHECKING:``); imports inside functions are the CLI's lazy loading.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

import runstream

ROOT = Path(runstream.__file__).parent

# Package -> runstream packages it must never import at load time.
FORBIDDEN: dict[str, set[str]] = {
    "core": {"backends", "runs", "server", "client", "cli", "ui", "runner", "protocol", "config"},
    "protocol": {"backends", "runs", "server", "client", "cli", "ui", "runner", "config"},
    "runner": {"backends", "runs", "server", "client", "cli", "ui"},
    "backends": {"server", "client", "cli", "ui"},
    "runs": {"server", "client", "cli", "ui"},
    "server": {"client", "cli"},
    "client": {"backends", "runs", "server", "cli", "ui", "runner"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def load_time_imports(path: Path) -> Iterator[str]:
    """Names of runstream modules imported when ``path`` is loaded."""
    tree = ast.parse(path.read_text())
    package = module_name(path) if path.name == "__init__.py" else module_name(path.parent)
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        nodes = [node] if not isinstance(node, ast.Try) else node.body
        for item in nodes:
            if isinstance(item, ast.Import):
                yield from (a.name for a in item.names if a.name.startswith("runstream"))
            elif isinstance(item, ast.ImportFrom):
                base = item.module or ""
                if item.level:
                    parent = package.rsplit(".", item.level - 1)[0] if item.level > 1 else package
                    base = f"{parent}.{base}" if base else parent
                if base.startswith("runstream"):
                    yield base
                    yield from (f"{base}.{a.name}" for a in item.names)


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges[name] = {m for m in load_time_imports(path) if m in modules and m != name}
    return edges


def test_no_layer_imports_a_layer_above_it() -> None:
    bad = []
    for module, targets in graph().items():
        parts = module.split(".")
        if len(parts) < 2:
            continue
        layer = parts[1]
        for target in targets:
            if target.split(".")[1] in FORBIDDEN.get(layer, set()):
                bad.append(f"{module} -> {target}")
    assert bad == []


def test_there_is_no_import_cycle() -> None:
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                item = stack.pop()
                on_stack.discard(item)
                component.append(item)
                if item == node:
                    break
            # A package and its own submodules importing each other is how Python packages
            # re-export names; anything wider is a cycle.
            roots = {c for c in component if not any(c.startswith(o + ".") for o in component)}
            if len(component) > 1 and len(roots) > 1:
                cycles.append(sorted(component))

    for node in edges:
        if node not in index:
            visit(node)
    assert cycles == []


@pytest.mark.parametrize("path", sorted(ROOT.rglob("*.py")), ids=lambda p: module_name(p))
def test_no_source_module_is_over_800_lines(path: Path) -> None:
    assert len(path.read_text().splitlines()) <= 800
