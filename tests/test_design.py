"""DESIGN.md against the package: its module table lists every module, its import table is the
folders' real module-level imports, evaluation never imports training nor analysis datasets or
models, and no modules import each other around a circle."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "csp_utils"
DESIGN = (REPO / "DESIGN.md").read_text()


def _modules() -> dict[str, Path]:
    """``folder/module.py`` (or ``module.py`` at the top) -> path, for every module but ``__init__``."""
    return {str(p.relative_to(PACKAGE)): p for p in sorted(PACKAGE.rglob("*.py")) if p.name != "__init__.py"}


def _section(title: str) -> str:
    start = DESIGN.index(f"## {title}")
    end = DESIGN.find("\n## ", start + 1)
    return DESIGN[start:end if end != -1 else None]


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported csp_utils module, inside a function) for each import of the file."""
    out = []

    def walk(node, in_function):
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("csp_utils"):
                for alias in child.names:
                    full = f"{child.module}.{alias.name}"
                    target = full if (REPO / (full.replace(".", "/") + ".py")).exists() else child.module
                    out.append((target, inside))
            walk(child, inside)

    walk(ast.parse(path.read_text()), False)
    return out


def _name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def _folder(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else parts[-1]


def test_the_module_table_lists_every_module_and_no_other():
    rows = re.findall(r"^\| `([^`]+)` \|", _section("Modules"), re.M)
    listed = set(rows)
    folders = {r for r in rows if r.endswith("/")}  # a folder row names its files in its text
    table = _section("Modules")
    missing = [m for m in _modules() if m not in listed
               and not any(m.startswith(f) and f"`{m[len(f):]}`" in table for f in folders)]
    stale = [r for r in rows if not r.endswith("/") and r not in _modules()]
    assert not missing and not stale, f"not in DESIGN.md: {missing}; no such module: {stale}"


def test_the_import_table_is_the_folders_module_level_imports():
    table = dict(re.findall(r"^\| `(\w+)` \| ([^|]*)\|", _section("Imports"), re.M))
    said = {folder: set(re.findall(r"`(\w+)`", text)) for folder, text in table.items()}
    real = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        if path.parent == PACKAGE:
            continue  # the two commands
        me = _folder(_name(path))
        for target, inside in _imports(path):
            if not inside and _folder(target) != me:
                real[me].add(_folder(target))
    assert {f: said.get(f, set()) for f in real} == dict(real)
    order = re.search(r"```\n(core <- .*)\n```", _section("Imports")).group(1).split(" <- ")
    for folder, targets in real.items():  # layers: only folders below
        assert all(order.index(t) < order.index(folder) for t in targets), (folder, targets)


# Folders below these that they still never import, not even inside a function: the evaluation
# needs no training code, and the analysis reads saved results, never datasets or models.
NEVER = {"evaluate": {"train"}, "analysis": {"dataset", "vlm"}}


def test_evaluation_imports_no_training_and_analysis_no_dataset_or_model():
    found = [f"{_name(path)} imports {target}" for path in PACKAGE.rglob("*.py")
             for target, _ in _imports(path) if _folder(target) in NEVER.get(_folder(_name(path)), ())]
    assert not found, found


def test_no_modules_import_each_other_around_a_circle():
    graph = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        for target, _ in _imports(path):
            if target != _name(path) and target != "csp_utils":
                graph[_name(path)].add(target)
    index, low, stack, on, circles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                circles.append(sorted(part))

    for v in list(graph):
        if v not in index:
            visit(v)
    assert not circles, circles
