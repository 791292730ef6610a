"""live_qc imports downward only (DESIGN: it never imports server or tally) and
its detector modules are sans-I/O: no asyncio, so the same code runs in the
live tap's worker process and in ``returnfeed qc FILE``."""

from __future__ import annotations

import pathlib

import pytest

from layering import imported_modules

LIVE_QC = pathlib.Path(__file__).resolve().parents[2] / "live_qc"
MODULES = sorted(LIVE_QC.rglob("*.py"))
DETECTORS = ("markers.py", "thresholds.py", "loudness.py", "audio.py", "video.py", "engine.py", "stream.py")


def test_there_are_modules_to_check():
    assert {p.name for p in MODULES} >= set(DETECTORS)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(LIVE_QC)))
def test_live_qc_imports_point_downward(path):
    roots = {name.split(".")[0] for name in imported_modules(path)}
    assert not roots & {"server", "tally"}, f"{path.name} imports {roots}"


@pytest.mark.parametrize("name", DETECTORS)
def test_detector_modules_do_not_import_asyncio_or_decoders(name):
    roots = {n.split(".")[0] for n in imported_modules(LIVE_QC / name)}
    assert "asyncio" not in roots, name
    # Decoding belongs to the caller (file scan or tap); detectors see arrays.
    assert "av" not in roots, name
