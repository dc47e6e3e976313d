"""The layout is the architecture: imports point only downward, no import cycle anywhere in the project, and only
the worker's settings read its environment (docs/architecture.md, "Layers")."""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"stadi": ROOT / "stadi", "stadi_worker": ROOT / "worker" / "stadi_worker",
            "stadi_operator": ROOT / "operator" / "stadi_operator", "stadi_bench": ROOT / "bench" / "stadi_bench"}

# Who may import whom, by layer (a module's layer is the longest prefix listed). A layer imports itself and the
# layers it lists; everything else is an upward or sideways import.
ALLOWED: dict[str, set[str]] = {
    "stadi": set(),  # the core: pydantic and the standard library only
    "stadi_worker.models": {"stadi"},
    "stadi_worker.engine": {"stadi", "stadi_worker.models"},
    "stadi_worker.job": {"stadi", "stadi_worker.models", "stadi_worker.engine"},
    "stadi_worker.settings": {"stadi", "stadi_worker.engine", "stadi_worker.job"},
    "stadi_worker.cli": {"stadi", "stadi_worker.models", "stadi_worker.engine", "stadi_worker.job",
                         "stadi_worker.settings"},
    "stadi_worker": {"stadi"},  # the package's own docstring module
    "stadi_operator": {"stadi"},
    "stadi_bench": {"stadi", "stadi_worker"},
}


def modules() -> dict[str, Path]:
    """Every module of the project's packages by dotted name (a package by its ``__init__``)."""
    found = {}
    for package, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            parts = [package, *path.relative_to(root).with_suffix("").parts]
            found[".".join(p for p in parts if p != "__init__")] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> Iterator[str]:
    """The project modules ``name`` imports, at module level or inside functions alike."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def resolve(target: str) -> str | None:
        while target and target not in known:
            target = target.rpartition(".")[0]
        return target or None

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            found = resolve(target)
            if found and found != name:
                yield found


@functools.cache
def _graph() -> dict[str, frozenset[str]]:
    known = modules()
    return {name: frozenset(imports(name, path, known)) for name, path in known.items()}


def graph() -> dict[str, set[str]]:
    """Who imports whom among the project's modules (a fresh copy: tests may add edges)."""
    return {name: set(targets) for name, targets in _graph().items()}


def layer(name: str) -> str:
    return max((prefix for prefix in ALLOWED if name == prefix or name.startswith(prefix + ".")), key=len)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), a package's ``__init__`` importing
    its own submodules excepted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return [c for c in found if not all(m.startswith(min(c, key=len)) for m in c)]


def test_no_import_cycle_in_the_project() -> None:
    assert cycles(graph()) == []


def test_a_new_cycle_is_caught() -> None:
    edges = graph()
    edges["stadi_worker.engine.comm"].add("stadi_worker.engine.bands")  # bands imports comm: now both ways
    assert any({"stadi_worker.engine.bands", "stadi_worker.engine.comm"} <= set(c) for c in cycles(edges))


@pytest.mark.parametrize("name", sorted(modules()))
def test_imports_point_only_downward(name: str) -> None:
    mine = layer(name)
    wrong = sorted(t for t in graph()[name] if layer(t) != mine and layer(t) not in ALLOWED[mine]
                   and not any(layer(t).startswith(a + ".") for a in ALLOWED[mine]))
    assert not wrong, f"{name} ({mine}) imports {wrong}; allowed: {sorted(ALLOWED[mine])}"


def test_only_the_settings_read_the_workers_environment() -> None:
    """No ``STADI_*`` name below the settings: the engine, the models and the job take their knobs as
    arguments (the command that starts a rank reads them once, in ``stadi_worker.settings``)."""
    readers = []
    for name, path in modules().items():
        if name.startswith(("stadi_worker.engine", "stadi_worker.models", "stadi_worker.job")):
            tree = ast.parse(path.read_text())
            prose = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr)}  # docstrings
            readers += [f"{name}:{node.lineno}" for node in ast.walk(tree) if isinstance(node, ast.Constant)
                        and isinstance(node.value, str) and "STADI_" in node.value and id(node) not in prose]
    assert readers == []
