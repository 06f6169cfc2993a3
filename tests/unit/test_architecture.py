"""The structure rules of docs/ARCHITECTURE.md that import-linter does not check (``lint-imports`` checks the
layers in ``make test``): no import cycle when function-level imports count too, project imports inside
functions only in the CLI, no module over 650 lines, one importer per outside library, and typed stage state."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("bot", "converters")
MAX_LINES = 650
# outside library -> the one module or subpackage that imports it
LIBRARY_HOMES = {
    "gguf": "converters/formats/gguf_meta.py",
    "transformers": "converters/formats/hfmodel.py",
    "huggingface_hub": "bot/hub/",
    "sqlalchemy": "bot/state/",
    "procrastinate": "bot/queue/",
    "starlette": "bot/web/",
    "prometheus_client": "bot/model/metrics.py",
}
CLI = ("bot.cli", "bot.commands")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in (REPO / pkg).rglob("*.py"):
            parts = p.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = p
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, bool]]:
    """(imported project module, inside a function?) for every import statement of one module."""
    tree = ast.parse(path.read_text())
    inner = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f) if n is not f}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name and t not in PACKAGES:
                found.append((t, id(node) in inner))
    return found


def test_no_import_cycle_counting_function_level_imports():
    modules = _modules()
    graph = {m: {t for t, _ in _imports(m, p, modules)} for m, p in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for m in sorted(graph):
        if m not in index:
            visit(m)
    assert cycles == []


def test_project_imports_inside_functions_only_in_the_cli():
    modules = _modules()
    hidden = sorted(f"{m} -> {t}" for m, p in modules.items() if not m.startswith(CLI)
                    for t, inner in _imports(m, p, modules) if inner)
    assert hidden == []


def test_no_module_over_the_line_limit():
    long = {str(p.relative_to(REPO)): n for p in _modules().values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_each_outside_library_has_one_importer():
    pattern = {lib: re.compile(rf"^\s*(import|from) {lib}\b", re.M) for lib in LIBRARY_HOMES}
    homes = defaultdict(set)
    for path in _modules().values():
        text = path.read_text()
        for lib, rx in pattern.items():
            if rx.search(text):
                homes[lib].add(str(path.relative_to(REPO)))
    strays = {lib: sorted(p for p in found if not p.startswith(LIBRARY_HOMES[lib]))
              for lib, found in homes.items()}
    assert {lib: s for lib, s in strays.items() if s} == {}


def test_stage_state_and_core_objects_are_typed():
    rx = re.compile(r"ctx\.state\b|\b(hub|store|rec|info|job|spec|ctx): Any\b")
    hits = [f"{p.relative_to(REPO)}:{i}" for p in _modules().values()
            for i, line in enumerate(p.read_text().splitlines(), 1) if rx.search(line)]
    assert hits == []
