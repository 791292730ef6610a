"""The media package imports downward only (DESIGN: media never imports
server, tally or live_qc) and its modules form no import cycle."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
MEDIA = ROOT / "media"
MODULES = sorted(MEDIA.rglob("*.py"))


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: pathlib.Path) -> set[str]:
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    return imports_in(path.read_text(encoding="utf-8"), package)


def imports_in(source: str, package: str) -> set[str]:
    """Every module ``source`` (a module of ``package``) imports, wherever
    the statement is (a function-level import is still a dependency),
    relative imports resolved; ``from a import b`` also names ``a.b``, which
    the graph keeps when it is a module."""
    tree = ast.parse(source)
    names: set[str] = set()
    for node in ast.walk(tree):
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


MEDIA_MODULES = {module_name(p): p for p in MODULES}


def media_graph() -> dict[str, set[str]]:
    return {name: {m for m in imported_modules(path) if m in MEDIA_MODULES and m != name}
            for name, path in MEDIA_MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path (first node repeated at the end), or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = GREY
        stack.append(node)
        for nxt in sorted(graph[node]):
            if colour[nxt] == GREY:
                return stack[stack.index(nxt):] + [nxt]
            if colour[nxt] == WHITE and (cycle := visit(nxt)) is not None:
                return cycle
        stack.pop()
        colour[node] = BLACK
        return None

    for node in sorted(graph):
        if colour[node] == WHITE and (cycle := visit(node)) is not None:
            return cycle
    return None


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(MEDIA)))
def test_media_imports_point_downward(path: pathlib.Path) -> None:
    roots = {name.split(".")[0] for name in imported_modules(path)}
    assert not roots & {"server", "tally", "live_qc"}, f"{path.relative_to(ROOT)} imports {sorted(roots)}"


def test_no_import_cycle_inside_media() -> None:
    assert find_cycle(media_graph()) is None, " -> ".join(find_cycle(media_graph()) or [])


def test_the_checks_see_what_they_check() -> None:
    """The parser resolves the import forms media uses, and the cycle finder
    finds a cycle (so a pass above means something)."""
    assert imports_in("from media import h264\nimport media.aac as a\n", "media") >= {"media.h264", "media.aac"}
    assert imports_in("def f():\n    from ..stream import Frame\n", "media.srt") >= {"media.stream",
                                                                                    "media.stream.Frame"}
    assert imports_in("from . import listener\n", "media.srt") >= {"media.srt.listener"}
    graph = media_graph()
    assert "media.mpegts.demux" in graph["media.ingest.ts"]
    assert len(graph) == len(MODULES) > 30
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
