"""Import-graph tools for the layering tests (tests/unit/test_*_layering.py).

Parsed with ``ast``, never imported: a module's imports wherever they stand
(a function-level import is still a dependency), relative imports resolved;
``from pkg import sub`` also names ``pkg.sub`` (kept by a graph when it is a
module of the graph).
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]

__all__ = ["ROOT", "module_name", "is_module", "imports_in", "imported_modules", "import_graph", "find_cycle"]


def module_name(path: pathlib.Path) -> str:
    """``media/srt/ingest.py`` → ``media.srt.ingest``; a package's
    ``__init__.py`` is the package."""
    parts = list(path.resolve().relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(name: str) -> bool:
    """``name`` is a module or package of this tree (not a name inside one)."""
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports_in(source: str, package: str) -> set[str]:
    """Every module ``source`` (a module of ``package``) imports."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def imported_modules(path: pathlib.Path) -> set[str]:
    """What the module at ``path`` imports (absolute names)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    return imports_in(path.read_text(encoding="utf-8"), package)


def import_graph(paths: list[pathlib.Path]) -> dict[str, set[str]]:
    """Module → the modules among ``paths`` it imports."""
    modules = {module_name(p): p for p in paths}
    return {name: {m for m in imported_modules(path) if m in modules and m != name}
            for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path (first node repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the DFS stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None
