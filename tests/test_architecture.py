"""Static architecture checks on ``nla_space`` and ``eval_harness``, read with :mod:`ast` (nothing is imported).

The graph has one node per module and one edge per intra-project import, wherever it is written:
at module level, inside a function (a deferred import still makes the importer depend on the
imported module; it only hides a cycle), under ``if TYPE_CHECKING``, or as
``importlib.import_module("<literal>")``. Importing ``a.b.c`` is also an edge to the packages ``a``
and ``a.b`` (their ``__init__`` runs first), except to the importer's own enclosing packages, which
are initialised before the importer runs. Imports of third-party packages are not edges. The
checks: the graph has no cycle, and no module is over :data:`MAX_LINES` lines.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("nla_space", "eval_harness")
MAX_LINES = 500


@dataclass(frozen=True)
class Module:
    name: str
    path: Path

    @property
    def is_package(self) -> bool:
        return self.path.name == "__init__.py"


def project_modules() -> dict[str, Module]:
    """Every ``.py`` module of the project packages, by dotted name."""
    out: dict[str, Module] = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = Module(".".join(parts), path)
    return out


def _resolve(base: str, modules: dict[str, Module]) -> str | None:
    """``base`` or its nearest ancestor that is a project module (``a.b.c`` where ``c`` is a name in ``a.b``)."""
    parts = base.split(".")
    while parts:
        name = ".".join(parts)
        if name in modules:
            return name
        parts.pop()
    return None


def imported_modules(mod: Module, modules: dict[str, Module]) -> set[str]:
    """The project modules ``mod`` imports anywhere in its body."""
    tree = ast.parse(mod.path.read_text(encoding="utf-8"), filename=str(mod.path))
    package = mod.name if mod.is_package else mod.name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:  # `from pkg import submodule` depends on the submodule itself
                sub = f"{base}.{alias.name}"
                targets.add(sub if sub in modules else base)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            targets.add(node.args[0].value)
    resolved = {r for t in targets if t.split(".")[0] in PACKAGES and (r := _resolve(t, modules)) is not None}
    # Importing `a.b.c` runs `a/__init__` and `a/b/__init__` first: those are edges too, except the
    # importer's own packages, which are initialised before the importer runs.
    own = {".".join(mod.name.split(".")[:i]) for i in range(1, mod.name.count(".") + 2)}
    parents = {".".join(t.split(".")[:i]) for t in resolved for i in range(1, t.count(".") + 1)}
    return (resolved | (parents & modules.keys())) - own


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imported_modules(mod, modules) for name, mod in modules.items()}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """The components of more than one module (Tarjan), each sorted: every such component holds a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return components


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle per strongly connected component, each as ``[a, b, …, a]``."""
    return [_shortest_cycle(comp[0], set(comp), graph) for comp in strongly_connected(graph)]


def _shortest_cycle(start: str, members: set[str], graph: dict[str, set[str]]) -> list[str]:
    """Breadth-first from ``start`` back to itself inside one component."""
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    back = [v]
                    while back[-1] != start:
                        back.append(parent[back[-1]])
                    return [*reversed(back), start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{start} is in a component but on no cycle")


def test_the_checker_sees_deferred_and_relative_imports(tmp_path: Path) -> None:
    """The checker itself, on a made-up two-module package: a function-level relative import closes a cycle."""
    pkg = tmp_path / "nla_space"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n    import torch\n")
    (pkg / "sub").mkdir()
    (pkg / "sub" / "__init__.py").write_text("from .c import g\n")
    (pkg / "sub" / "c.py").write_text("from ..a import f\n")
    (pkg / "d.py").write_text("import importlib\nimportlib.import_module('nla_space.sub.c')\n")
    names = {"nla_space": "__init__.py", "nla_space.a": "a.py", "nla_space.b": "b.py", "nla_space.sub": "sub/__init__.py",
             "nla_space.sub.c": "sub/c.py", "nla_space.d": "d.py"}
    modules = {name: Module(name, pkg / rel) for name, rel in names.items()}
    graph = {name: imported_modules(mod, modules) for name, mod in modules.items()}
    assert graph == {"nla_space": set(), "nla_space.a": {"nla_space.b"}, "nla_space.b": {"nla_space.a"},
                     "nla_space.sub": {"nla_space.sub.c"}, "nla_space.sub.c": {"nla_space.a"},
                     "nla_space.d": {"nla_space.sub", "nla_space.sub.c"}}
    assert find_cycles(graph) == [["nla_space.a", "nla_space.b", "nla_space.a"]]


def test_no_import_cycles() -> None:
    graph = import_graph()
    report = [f"{' -> '.join(_shortest_cycle(c[0], set(c), graph))}   (component: {', '.join(c)})" for c in strongly_connected(graph)]
    assert not report, "import cycles (function-level imports count):\n" + "\n".join(report)


def test_no_module_over_the_line_limit() -> None:
    sizes = {m.name: len(m.path.read_text(encoding="utf-8").splitlines()) for m in project_modules().values()}
    over = sorted((n, name) for name, n in sizes.items() if n > MAX_LINES)
    assert not over, f"modules over {MAX_LINES} lines: " + ", ".join(f"{name} ({n})" for n, name in over)
