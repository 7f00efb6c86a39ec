"""The package's structure: no import cycles among its modules.

`import_graph` walks every module of ``xarray_zcache`` statically (no import runs) and
`cycles` finds the strongly connected components of the graph. Run as a script,
this file reports the cycles at each of three depths::

    python tests/test_structure.py

``top``
    the imports Python runs when a module is imported: statements at module level
    (also inside ``try`` and ``if`` blocks), not under ``if TYPE_CHECKING:`` and not
    in functions or classes. A cycle here is an import-order hazard.
``functions``
    ``top`` and the imports inside functions (deferred imports: run at call time).
``typing``
    all of them, ``TYPE_CHECKING`` imports too.

An edge goes to the module an import names: ``from a.b import c`` to ``a.b.c`` when
``c`` is a module of the package, else to ``a.b``; the parent packages Python
initialises on the way (``a``, ``a.b`` for ``import a.b.c``) are not edges.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

ROOT = Path(__file__).resolve().parents[1] / "xarray_zcache"
PACKAGE = ROOT.name
Depth = Literal["top", "functions", "typing"]
DEPTHS: tuple[Depth, ...] = ("top", "functions", "typing")


def _module_names(root: Path = ROOT) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in root.rglob("*.py"):
        parts = p.relative_to(root.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(body: list[ast.stmt], depth: Depth) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements of ``body`` that count at ``depth``."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node):
            if depth == "typing":
                yield from _imports(node.body, depth)
            yield from _imports(node.orelse, depth)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            if depth != "top" or isinstance(node, ast.ClassDef):  # a class body runs at once
                yield from _imports(node.body, depth)
        else:  # try/except/else/finally, if/else, with, for, while: their blocks run
            for field in ("body", "orelse", "finalbody", "handlers"):
                block = getattr(node, field, None)
                if isinstance(block, list):
                    stmts = [s for s in block if isinstance(s, ast.stmt)]
                    for handler in block:
                        if isinstance(handler, ast.ExceptHandler):
                            stmts += handler.body
                    yield from _imports(stmts, depth)


def _targets(
    node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]
) -> set[str]:
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in known}
    if node.level:  # relative: from its package (a package's __init__ is its own package)
        base = module.split(".")
        base = base[: len(base) - node.level + (1 if is_package else 0)]
        source = ".".join([*base, *([node.module] if node.module else [])])
    else:
        source = node.module or ""
    out = set()
    for alias in node.names:
        sub = f"{source}.{alias.name}"
        if sub in known:
            out.add(sub)
        elif source in known:
            out.add(source)
    return out


def import_graph(depth: Depth = "top", root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the package modules it imports (at ``depth``), itself left out."""
    modules = _module_names(root)
    known = set(modules)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        deps: set[str] = set()
        for node in _imports(tree.body, depth):
            deps |= _targets(node, name, path.name == "__init__.py", known)
        graph[name] = deps - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph``: its strongly connected components of two or more
    modules (Tarjan), each sorted, the list sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph) + 100))
    try:
        for v in sorted(graph):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return sorted(found)


# -- the checker itself --------------------------------------------------------------------


def test_cycles_finds_a_circle_and_only_it() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_import_graph_depths(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import leaf\n")
    (pkg / "sub" / "leaf.py").write_text("from ..top import X\n")
    (pkg / "top.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "try:\n    import pkg.sub.leaf\nexcept ImportError:\n    pass\n"
        "if TYPE_CHECKING:\n    from pkg.other import Y\n"
        "def f():\n    from pkg import other\n"
        "X = 1\n"
    )
    (pkg / "other.py").write_text("Y = 2\n")
    top = import_graph("top", pkg)
    assert top == {
        "pkg": set(),
        "pkg.sub": {"pkg.sub.leaf"},
        "pkg.sub.leaf": {"pkg.top"},
        "pkg.top": {"pkg.sub.leaf"},
        "pkg.other": set(),
    }
    assert cycles(top) == [["pkg.sub.leaf", "pkg.top"]]
    assert import_graph("functions", pkg)["pkg.top"] == {"pkg.sub.leaf", "pkg.other"}
    assert import_graph("typing", pkg)["pkg.top"] == {"pkg.sub.leaf", "pkg.other"}


# -- the package ---------------------------------------------------------------------------


def test_no_import_cycles_at_import_time() -> None:
    """No module of the package imports itself again through others at import time."""
    assert cycles(import_graph("top")) == []


def test_no_import_cycles_even_through_deferred_and_type_checking_imports() -> None:
    """Modules that need each other only in functions or for the type checker are one
    module's job spread over two: none may do that."""
    assert cycles(import_graph("typing")) == []


if __name__ == "__main__":
    for depth in DEPTHS:
        found = cycles(import_graph(depth))
        print(f"{depth}: {len(found)} cycle(s)")
        for component in found:
            print("   ", " <-> ".join(component))
