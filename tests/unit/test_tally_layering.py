"""The tally package imports downward only (DESIGN: tally imports neither
server, media nor live_qc) and keeps aiohttp out of its modules."""

from __future__ import annotations

import ast
import pathlib

import pytest

TALLY = pathlib.Path(__file__).resolve().parents[2] / "tally"
MODULES = sorted(TALLY.glob("*.py"))


def imported_modules(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_tally_imports_point_downward(path):
    roots = {name.split(".")[0] for name in imported_modules(path)}
    assert not roots & {"server", "media", "live_qc"}, f"{path.name} imports {roots}"
    # The hub talks to aiohttp by duck typing; nothing in tally imports it.
    assert "aiohttp" not in roots


def test_sans_io_modules_do_not_import_asyncio():
    for name in ("state.py", "protocol.py", "errors.py"):
        assert "asyncio" not in {n.split(".")[0] for n in imported_modules(TALLY / name)}, name
