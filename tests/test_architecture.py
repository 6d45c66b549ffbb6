"""The package's import graph: no cycles, and no layer imports a higher one (docs/design.md §1).

The graph is read with `ast` from the source, imports inside functions included, so a lazy import cannot hide a
cycle. Negative controls: the same checks fail on a copy of the package with one bad import added.
"""
from __future__ import annotations

import ast
import shutil
from pathlib import Path

import kd_fracture

PACKAGE = Path(kd_fracture.__file__).parent
CORE = {"kd_fracture", "kd_fracture.errors", "kd_fracture.io", "kd_fracture.extras", "kd_fracture.distributed",
        "kd_fracture.config", "kd_fracture.metrics"}
LAYERS = ["core", "data", "models", "train", "runs", "search", "report", "pipelines", "app", "cli", "command"]
COMMANDS = {"cv", "distill", "dashboard", "predict", "evaluate", "explain", "compare", "pretrain", "phantom", "folds",
            "manifest", "tensorboard"}


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """module → the package modules it imports (anywhere in the file)."""
    files = {module_name(root, p): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        deps = set()
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                for alias in node.names:
                    if f"{base}.{alias.name}" in files:
                        deps.add(f"{base}.{alias.name}")
                    elif base in files:
                        deps.add(base)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in files}
        deps.discard(mod)
        deps.discard("kd_fracture")  # the package's __init__ (version only)
        graph[mod] = deps
    return graph


def layer(mod: str) -> int:
    if mod in CORE:
        return 0
    parts = mod.split(".")
    if len(parts) == 2 and parts[1] in COMMANDS or parts[-1] == "__main__":  # kd_fracture.app.__main__ → cli.app
        return LAYERS.index("command")
    return LAYERS.index(parts[1])


def violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for mod, deps in graph.items():
        for dep in deps:
            if layer(dep) > layer(mod):
                out.append(f"{mod} ({LAYERS[layer(mod)]}) imports {dep} ({LAYERS[layer(dep)]})")
            if layer(mod) == LAYERS.index("command") and dep != f"kd_fracture.cli.{mod.split('.')[1]}":
                out.append(f"command alias {mod} imports {dep} (only its kd_fracture.cli module)")
    return sorted(out)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by a depth-first search (one per back edge)."""
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                found.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_every_module_belongs_to_a_layer():
    graph = import_graph()
    assert len(graph) > 30
    for mod in graph:
        assert layer(mod) >= 0, mod


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_no_layer_imports_a_higher_one():
    assert violations(import_graph()) == []


def test_nothing_outside_the_cli_imports_it():
    graph = import_graph()
    users = {mod for mod, deps in graph.items() if any(d.startswith("kd_fracture.cli") for d in deps)}
    assert all(u.startswith("kd_fracture.cli") or layer(u) == LAYERS.index("command") for u in users), users


def test_negative_control_a_lazy_upward_import_is_caught(tmp_path):
    """A function-level import of the cv pipeline from the data layer — the kind of import that hid cycles before —
    is reported as a layer violation and as a cycle."""
    copy = tmp_path / "kd_fracture"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    folds = copy / "data" / "folds.py"
    folds.write_text(folds.read_text() + "\n\ndef _late():\n    from kd_fracture.pipelines import cv  # noqa\n")
    graph = import_graph(copy)
    assert "kd_fracture.data.folds (data) imports kd_fracture.pipelines.cv (pipelines)" in violations(graph)
    assert any(c[0] == c[-1] and "kd_fracture.data.folds" in c for c in cycles(graph))
    assert cycles(import_graph(PACKAGE)) == []  # the real package stays clean: the control changed only the copy
