"""The bench package's import graph: records depends on no other bench module, and nothing imports in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import tuneserve.bench

ROOT = Path(tuneserve.bench.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _bench_imports(path: Path, modules: set[str]) -> set[str]:
    """Bench modules that path imports, at any depth of the file (deferred imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        found |= {n for n in names if n in modules}
    return found - {_module_name(path)}


def _graph() -> dict[str, set[str]]:
    files = list(ROOT.rglob("*.py"))
    modules = {_module_name(p) for p in files}
    return {_module_name(p): _bench_imports(p, modules) for p in files}


def test_records_imports_no_other_bench_module():
    assert _graph()["tuneserve.bench.records"] == set()


def test_bench_modules_import_without_circles():
    graph = _graph()
    done: set[str] = set()

    def visit(mod: str, path: tuple[str, ...]) -> None:
        assert mod not in path, " -> ".join(path + (mod,))
        if mod not in done:
            for dep in graph[mod]:
                visit(dep, path + (mod,))
            done.add(mod)

    for mod in graph:
        visit(mod, ())
