"""The package's import graph, built from its sources with ``ast``, has no cycle.

Modules: every ``.py`` under expface_kernels/, and under triton_kernels/ as
``expface_kernels.triton_kernels`` (how it is installed). An edge A -> B for every
``import`` / ``from ... import`` statement in A that names B, resolved against the package
(``from . import x`` names the submodule x when there is one, else the package's
``__init__``), wherever the statement stands: at module level, inside a function (the
registry's and the prologue's deferred imports of the optional backends), or under
``if TYPE_CHECKING``. Counting the function-local imports is stricter than Python needs
(a cycle through a deferred import does not fail at import time), but such a cycle still
ties two modules together, which is what this test keeps out. The parent-package import
that every ``import a.b`` implies is not an edge (else every submodule would depend on
``__init__``, which imports them all).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"expface_kernels": ROOT / "expface_kernels",
            "expface_kernels.triton_kernels": ROOT / "triton_kernels"}


def package_modules() -> dict[str, Path]:
    """Dotted module name -> source file, for both source trees."""
    mods = {}
    for pkg, folder in PACKAGES.items():
        for f in sorted(folder.glob("*.py")):
            mods[pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"] = f
    return mods


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules that ``name`` (at ``path``) imports anywhere in its source."""
    is_pkg = path.stem == "__init__"
    here = name if is_pkg else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.rsplit(".", node.level - 1)[0] if node.level > 1 else here
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            # "import a.b.c" or "from a.b import name": the deepest package module named
            while t and t not in known:
                t = t.rsplit(".", 1)[0] if "." in t else ""
            if t and t != name and not name.startswith(t + "."):  # not an ancestor package
                found.add(t)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = package_modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None (iterative DFS)."""
    state = {}  # 1: on the stack, 2: done
    for root in sorted(graph):
        if root in state:
            continue
        stack = [(root, iter(sorted(graph[root])))]
        path = [root]
        state[root] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                stack.append((nxt, iter(sorted(graph.get(nxt, ())))))
                path.append(nxt)
    return None


def test_graph_is_built_from_the_sources():
    """The graph sees the edges this test is about (a parser that saw none would pass)."""
    g = import_graph()
    assert "expface_kernels.triton_kernels.backend" in g
    assert "expface_kernels.contract" in g["expface_kernels.chunked"]
    assert "expface_kernels.contract" in g["expface_kernels.triton_kernels.backend"]
    # function-local imports count: the registry's deferred imports of the backends
    assert {"expface_kernels.reference", "expface_kernels.chunked", "expface_kernels.extension",
            "expface_kernels.triton_kernels.backend"} <= g["expface_kernels.backends"]


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_backend_record_imports_nothing_of_the_package():
    assert import_graph()["expface_kernels.contract"] == set()
