"""The package's shape: no import cycle between modules and no oversized module in ``shn``.

The import graph is read from the source (``ast``), so function-local imports — the usual way a
cycle is hidden — count like top-level ones. An edge goes to the module named: ``from shn.a import
b`` points at ``shn.a.b`` when that is a module, else at ``shn.a``. The parent packages Python
initialises on the way are not edges: a package's ``__init__`` re-exporting its submodules is not
a cycle, while a submodule importing names back from its own package's ``__init__`` is one.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGE = "shn"
# cycles are looked for across every package the project ships: shn -> baselines -> shn counts too
SHIPPED = ("shn", "baselines", "tasks")
MAX_LINES = 600


def module_files(root: Path = REPO, *packages: str) -> dict[str, Path]:
    """Dotted module name → file, for every ``.py`` file under ``root/<package>``."""
    out = {}
    for package in packages or (PACKAGE,):
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The ``modules`` that ``name`` (at ``path``) imports anywhere in its source."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing module's package
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            subs = [f"{base}.{alias.name}" for alias in node.names]
            targets = [s for s in subs if s in modules] or [base]
            if len(targets) < len(subs):  # some names are attributes of `base` itself
                targets.append(base)
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import shn.a.b` of a name inside shn.a
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: Path = REPO, *packages: str) -> dict[str, set[str]]:
    """Module → the modules it imports, over ``packages`` (default: ``shn``)."""
    modules = module_files(root, *packages)
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The non-trivial strongly connected components (Tarjan), each a sorted module list, sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(cycles)


def test_finder_sees_local_and_relative_imports_and_cycles(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pkg.sub import thing\n")
    (pkg / "sub" / "__init__.py").write_text("from .leaf import thing\n")
    (pkg / "sub" / "leaf.py").write_text("thing = 1\n")
    (pkg / "a.py").write_text("def f():\n    from pkg import b\n")
    (pkg / "b.py").write_text("import pkg.a\n")
    (pkg / "c.py").write_text("from pkg.sub import leaf\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.sub"] == {"pkg.sub.leaf"}
    assert graph["pkg.a"] == {"pkg.b"}
    assert graph["pkg.c"] == {"pkg.sub.leaf"}
    assert find_cycles(graph) == [["pkg.a", "pkg.b"]]
    (pkg / "sub" / "leaf.py").write_text("from pkg.sub import other\nthing = 1\n")  # back into its __init__
    assert find_cycles(import_graph(tmp_path, "pkg")) == [["pkg.a", "pkg.b"], ["pkg.sub", "pkg.sub.leaf"]]


def test_no_import_cycle():
    cycles = find_cycles(import_graph(REPO, *SHIPPED))
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_oversized_module_in_shn():
    long = {str(p.relative_to(REPO)): n for p in module_files().values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by concept): {long}"
