"""The package's import graph: no cycle, and imports only go down the three layers.

Every ``import`` statement is read from the source (AST), lazy imports inside functions
included, so a cycle or a wrong-way import cannot hide behind a function-level import.

Layers (bottom to top), as ``docs/design.md`` draws them:

* foundation: ``core/`` (pattern, masks, compress, pack, layers, plan, checks), ``utils/``,
  ``ops/``, ``backends/``, the Triton/C kernels (``knsparse.kernels``) and ``_compat`` (old
  module paths);
* stages: ``pruning/`` (score, budget, methods, permutation, calibration, spectral, repair,
  finetune, prune), ``sparse/``, ``deploy/`` and ``integrations/``;
* app: ``knsparse.app``, ``knsparse.cli`` and ``knsparse.__main__``.

``knsparse.models`` (the built-in architectures) is used by the app, the benchmarks and the
tests only: no library module imports it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"knsparse": ROOT / "python" / "knsparse", "knsparse.kernels": ROOT / "kernels"}
FOUNDATION = ("core", "utils", "ops", "backends", "kernels", "_compat")
STAGES = ("pruning", "sparse", "deploy", "integrations")
APP = ("app", "cli", "__main__")


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _resolve(target: str) -> str | None:
    """The knsparse module that ``import target`` executes, or None outside the package."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


def imports_of(name: str) -> set[str]:
    """Every knsparse module ``name`` imports, anywhere in its source, with the subpackage
    ``__init__`` files that importing them runs."""
    path = MODULES[name]
    package = _package_of(name, path)
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [
                f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in MODULES else stem for alias in node.names
            ]
        for target in targets:
            resolved = _resolve(target)
            if resolved is None or not resolved.startswith("knsparse"):
                continue
            out.add(resolved)
            parent = resolved.rpartition(".")[0]
            # Importing a.b.c from outside a.b runs a.b's __init__ first (inside a.b it is already
            # running); the top-level facade always is.
            while parent and parent != "knsparse" and not (name == parent or name.startswith(parent + ".")):
                out.add(parent)
                parent = parent.rpartition(".")[0]
    out.discard(name)
    return out


GRAPH = {name: imports_of(name) for name in MODULES}


def _layer(name: str) -> str:
    rest = name.removeprefix("knsparse").lstrip(".")
    head = rest.split(".")[0]
    if not rest:
        return "facade"
    if head in APP:
        return "app"
    if head == "models":
        return "models"
    if head in FOUNDATION:
        return "foundation"
    if head in STAGES:
        return "stage"
    raise AssertionError(f"{name} is in no layer: put it in a subpackage (or name it here)")


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return found


def test_the_walker_sees_lazy_and_relative_imports() -> None:
    assert "knsparse.core.pattern" in GRAPH["knsparse.core.masks"]
    assert "knsparse.models" in GRAPH["knsparse.app.trainer"]
    assert "knsparse.kernels.nmf" in GRAPH["knsparse.pruning.score.yopo"]
    assert len(MODULES) > 60


def test_no_import_cycle() -> None:
    assert _cycles() == []


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        ("foundation", {"stage", "app", "models", "facade"}),
        ("stage", {"app", "models", "facade"}),
        ("facade", {"app", "models"}),
        ("models", {"app", "facade"}),
    ],
)
def test_imports_only_go_down(layer: str, forbidden: set[str]) -> None:
    wrong = sorted(
        f"{name} -> {target}"
        for name, targets in GRAPH.items()
        if _layer(name) == layer
        for target in targets
        if _layer(target) in forbidden
    )
    assert wrong == []
