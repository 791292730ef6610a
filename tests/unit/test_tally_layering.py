"""The tally package imports downward only (DESIGN: tally imports neither
server, media nor live_qc) and keeps aiohttp out of its modules."""

from __future__ import annotations

import pathlib

import pytest

from layering import imported_modules, is_module

TALLY = pathlib.Path(__file__).resolve().parents[2] / "tally"
MODULES = sorted(TALLY.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(TALLY)))
def test_tally_imports_point_downward(path):
    roots = {name.split(".")[0] for name in imported_modules(path)}
    assert not roots & {"server", "media", "live_qc"}, f"{path.name} imports {roots}"
    # The hub talks to aiohttp by duck typing; nothing in tally imports it.
    assert "aiohttp" not in roots


SANS_IO = ("state.py", "protocol.py", "errors.py", "log.py", "tsl/codec.py")


def test_sans_io_modules_do_not_import_asyncio():
    for name in SANS_IO:
        assert "asyncio" not in {n.split(".")[0] for n in imported_modules(TALLY / name)}, name


def test_sans_io_modules_import_only_sans_io_tally_modules():
    """A sans-I/O module that imported an adapter module (``tally.tsl.transports``,
    ``tally.hub``) would pull asyncio in through the back door."""
    allowed = {"tally." + name.removesuffix(".py").replace("/", ".") for name in SANS_IO}
    for name in SANS_IO:
        inner = {n for n in imported_modules(TALLY / name) if n.split(".")[0] == "tally" and is_module(n)}
        assert inner <= allowed, (name, inner - allowed)


def test_tsl_package_reexports_its_parts():
    """``from tally.tsl import X`` keeps working for every public name of the codec and transports."""
    import tally.tsl
    from tally.tsl import codec, transports

    for module in (codec, transports):
        public = {n for n, v in vars(module).items()
                  if not n.startswith("_") and getattr(v, "__module__", None) == module.__name__}
        assert public <= set(tally.tsl.__all__), (module.__name__, public - set(tally.tsl.__all__))
