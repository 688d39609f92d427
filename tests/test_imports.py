"""The package's import graph has no cycles, and its layers point down (docs/CONTRACTS.md).

Edges are the module-level imports of every module under ``evomerge/`` (parsed with ``ast``, not
executed), resolved to evomerge modules: ``from evomerge.x import y`` is an edge to
``evomerge.x.y`` when that is a module, else to ``evomerge.x``. A package's ``__init__`` counts as
the module ``evomerge.pkg``; importing ``evomerge.pkg.mod`` is an edge to that module only.
Imports under ``if TYPE_CHECKING:`` are not edges. Two graphs are checked: module-level imports
(a cycle there can break ``import``), and all imports including those inside functions (a cycle
there is a layering error even when deferring the import hides it).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "evomerge"


def _modules() -> dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = list(f.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _module_level(tree: ast.Module):
    """Import statements executed when the module is imported (not in functions or TYPE_CHECKING)."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                for child in getattr(node, field, []):
                    todo.extend(child.body if isinstance(child, ast.ExceptHandler) else [child])
        elif isinstance(node, ast.ClassDef):
            todo.extend(node.body)


def _everywhere(tree: ast.Module):
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node


def import_graph(deferred: bool = False) -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), str(path))
        for node in (_everywhere(tree) if deferred else _module_level(tree)):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (node.level - 1)]
                    base = ".".join(pkg + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                while t and t not in mods:  # `import evomerge.x.y` of an attribute path: its module
                    t = t.rpartition(".")[0]
                if t and t != name:
                    graph[name].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle (as a closed path) or None: iterative DFS with colours."""
    colour: dict[str, int] = {}
    for start in sorted(graph):
        if colour.get(start):
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        colour[start] = 1
        while stack:
            node, children = stack[-1]
            nxt = next(children, None)
            if nxt is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not colour.get(nxt):
                colour[nxt] = 1
                stack.append((nxt, iter(sorted(graph[nxt]))))
                path.append(nxt)
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_graph_sees_module_level_imports_only():
    g = import_graph()
    assert "evomerge.search.loop" in g["evomerge.search.run"]
    assert "evomerge.optimizers.base" in g["evomerge.optimizers.cmaes_opt"]
    assert "evomerge.zoo" not in g["evomerge.search.setup"]  # imported inside resolve_models only
    assert "evomerge.zoo" in import_graph(deferred=True)["evomerge.search.setup"]


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# Cycles through deferred imports that another change removes; each entry names where.
KNOWN_DEFERRED: list[set[str]] = []


def test_no_import_cycles_through_deferred_imports():
    graph = import_graph(deferred=True)
    for known in KNOWN_DEFERRED:  # cut the known cycles' edges only
        for a in known:
            graph[a] -= known
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle (counting imports inside functions): " + " -> ".join(cycle)


@pytest.mark.parametrize("low", ["evomerge.optimizers", "evomerge.surrogate", "evomerge.executors", "evomerge.spaces",
                                 "evomerge.evaluation", "evomerge.merge", "evomerge.store", "evomerge.lineage",
                                 "evomerge.checkpoint", "evomerge.config"])
def test_nothing_below_search_imports_it(low):
    """Also deferred (function-level) imports: a layer below ``search/`` never reaches up into it."""
    mods = _modules()
    for name, path in mods.items():
        if name != low and not name.startswith(low + "."):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("evomerge.search"):
                pytest.fail(f"{name} imports {node.module}")
            if isinstance(node, ast.Import) and any(a.name.startswith("evomerge.search") for a in node.names):
                pytest.fail(f"{name} imports evomerge.search")


def test_surrogate_is_pure_numerics():
    """``evomerge.surrogate`` imports no torch, models, store, optimizers or search (anywhere in it)."""
    banned = ("torch", "evomerge.models", "evomerge.store", "evomerge.optimizers", "evomerge.search",
              "evomerge.merge", "evomerge.executors", "evomerge.evaluation")
    for f in (ROOT / "surrogate").glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad = [n for n in names if any(n == b or n.startswith(b + ".") for b in banned)]
            assert not bad, f"surrogate/{f.name} imports {bad[0]}"
