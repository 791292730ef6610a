"""The media package imports downward only (DESIGN: media never imports
server, tally or live_qc) and its modules form no import cycle."""

from __future__ import annotations

import pathlib

import pytest

from layering import find_cycle, imported_modules, imports_in, module_name

ROOT = pathlib.Path(__file__).resolve().parents[2]
MEDIA = ROOT / "media"
MODULES = sorted(MEDIA.rglob("*.py"))


MEDIA_MODULES = {module_name(p): p for p in MODULES}


def media_graph() -> dict[str, set[str]]:
    return {name: {m for m in imported_modules(path) if m in MEDIA_MODULES and m != name}
            for name, path in MEDIA_MODULES.items()}


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
