"""The layout shows the layers: no import circle, and no import from a lower layer to a higher one.

Imports inside functions count too (a deferred import that dodges a circle is still a circle). The
package `__init__` (the lazy public API) and `__main__` are the only exemptions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "tuneserve"

# Lowest first. A module may import modules of its own rank or below, never above.
LAYERS: list[set[str]] = [
    {"log", "errors", "faults", "config", "sampling_params", "outputs", "resources"},
    {"core", "overflow"},  # torch-free bookkeeping and policies
    {"dtypes", "weights", "corpus", "tokenizer", "chat_template", "kernels", "sample", "structured", "tool_calls"},
    {"models", "quant", "engine_args"},
    {"calibration"},
    {"loading"},
    {"worker"},
    {"parallel"},
    {"speculative"},
    {"engine"},
    {"llm"},
    {"server", "bench"},
    {"deploy"},  # replicas on Ray Serve: wraps the server's app
    {"cli"},
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}
EXEMPT = {"tuneserve", "tuneserve.__main__"}


def _modules() -> dict[str, Path]:
    mods = {}
    for p in ROOT.rglob("*.py"):
        parts = p.relative_to(ROOT.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return mods


def _imports(mod: str, path: Path, mods: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(tuneserve modules, top-level third-party packages) that `mod` imports anywhere in its file."""
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    ours, theirs = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods]
            names = subs if len(subs) == len(node.names) else [*subs, base]
        else:
            continue
        for name in names:
            if not name.startswith("tuneserve"):
                theirs.add(name.split(".")[0])
                continue
            while name and name not in mods:
                name = name.rpartition(".")[0]
            if name and name != mod:
                ours.add(name)
    return ours, theirs


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, p, mods)[0] for m, p in mods.items()}


def _top(mod: str) -> str:
    return mod.split(".")[1] if "." in mod else ""


def test_every_top_level_name_has_a_layer():
    tops = {_top(m) for m in _modules()} - {"", "__main__"}
    assert tops <= set(RANK), f"place these in LAYERS: {sorted(tops - set(RANK))}"


def test_no_import_circle():
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

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
            while (w := stack.pop()) != v:
                comp.append(w)
            if comp:
                circles.append(sorted([v, *comp]))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_no_import_from_a_lower_layer_to_a_higher_one():
    bad = [f"{m} -> {d}" for m, deps in _graph().items() if m not in EXEMPT
           for d in deps if d not in EXEMPT and RANK[_top(d)] > RANK[_top(m)]]
    assert not bad, "lower layers import higher ones:\n" + "\n".join(sorted(bad))


@pytest.mark.parametrize("package,forbidden", [
    ("bench.records", {"tuneserve.bench"}),  # the lab's shared helpers: every bench module may use them
    ("core", {"torch", "numpy", "tuneserve.models", "tuneserve.engine", "tuneserve.worker", "tuneserve.kernels"}),
    ("overflow", {"torch", "tuneserve.engine", "tuneserve.models"}),
    ("quant", {"tuneserve.models", "tuneserve.calibration", "tuneserve.loading", "tuneserve.engine"}),
    ("kernels", {"tuneserve.models", "tuneserve.engine", "tuneserve.quant"}),
    ("engine", {"tuneserve.server", "tuneserve.bench", "tuneserve.cli"}),
    # Ray is an optional extra: only the deploy package (and the CLI verbs that start it) may import it
    *[(pkg, {"ray"}) for pkg in ("core", "engine", "server", "bench", "worker", "models", "llm")],
])
def test_package_keeps_to_its_side(package, forbidden):
    mods = _modules()
    hits = []
    for m, p in mods.items():
        if not (m == f"tuneserve.{package}" or m.startswith(f"tuneserve.{package}.")):
            continue
        ours, theirs = _imports(m, p, mods)
        for name in ours | theirs:
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                hits.append(f"{m} imports {name}")
    assert not hits, "\n".join(hits)
