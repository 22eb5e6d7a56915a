"""The import structure, read with ``ast`` (nothing is imported or spawned): no import cycle between the
toolkit's modules, no import below a definition, and no module of a package importing its own package's
``__init__`` (the rule that keeps cycles from coming back)."""
from __future__ import annotations

import ast
import os

from helpers import ROOT

PACKAGES = ("util", "models")
SCRIPTS = ("main_finetune.py", "engine_finetune.py", "predict.py", "export.py", "serve.py")


def _modules() -> dict[str, str]:
    """dotted module name -> file path, for every module of the toolkit."""
    out = {name[:-3]: os.path.join(ROOT, name) for name in SCRIPTS}
    for pkg in PACKAGES:
        for dirpath, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
                    out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(dirpath, f)
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].endswith("__init__.py")


def _targets(node: ast.AST, module: str) -> list[str]:
    """The toolkit modules an import statement loads (``from a.b import c`` loads a.b, and a.b.c if that is a
    module)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative import
            parts = module.split(".")
            keep = len(parts) - node.level + (1 if _is_package(module) else 0)
            base = ".".join(parts[:keep] + ([node.module] if node.module else []))
        names = [base] + [f"{base}.{a.name}" for a in node.names]
    return [n for n in names if n in MODULES]


def _imports(module: str, top_level_only: bool) -> set[str]:
    tree = ast.parse(open(MODULES[module], encoding="utf8").read())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.update(t for t in _targets(node, module) if t != module)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_the_module_graph_is_found():
    assert {"util.datasets.base", "util.datasets.csv_formats", "util.metrics.regression",
            "models.checkpoint_io.readers", "util.outputs.checkpoint", "main_finetune"} <= set(MODULES)
    assert "util.datasets.base" in _imports("util.datasets.folder", top_level_only=True)


def test_no_import_cycle_at_import_time():
    graph = {m: _imports(m, top_level_only=True) for m in MODULES}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_no_import_cycle_even_counting_imports_inside_functions():
    graph = {m: _imports(m, top_level_only=False) for m in MODULES}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_modules_inside_a_package_never_import_its_init():
    bad = []
    for m in MODULES:
        if _is_package(m):
            continue
        pkg = m.rsplit(".", 1)[0]
        tree = ast.parse(open(MODULES[m], encoding="utf8").read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == pkg and pkg not in PACKAGES:
                bad.append(f"{m}: from {pkg} import ...")
            if isinstance(node, ast.Import) and any(a.name == pkg for a in node.names) and pkg not in PACKAGES:
                bad.append(f"{m}: import {pkg}")
    assert not bad, bad


def test_no_import_below_a_definition():
    bad = []
    for m, path in MODULES.items():
        if m in ("main_finetune", "predict", "engine_finetune"):
            continue  # scripts set OMP_NUM_THREADS before importing paddle (flagged noqa: E402 there)
        seen_def = False
        for node in ast.parse(open(path, encoding="utf8").read()).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                seen_def = True
            elif isinstance(node, (ast.Import, ast.ImportFrom)) and seen_def:
                bad.append(f"{m}:{node.lineno}")
    assert not bad, bad
