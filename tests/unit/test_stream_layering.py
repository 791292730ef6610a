"""Guards for the layout of media/stream/ and media/webrtc/whip/.

- media/stream/: imports inside the package point one way (no cycle), and
  no module reaches into another object's private attributes (``x._y``
  where ``x`` is not ``self``): Stream, Publisher and the readers talk
  through their public methods.
- The WHIP RTP ingest core and the SDP plan are sans-I/O: neither they nor
  any project module they import (followed file by file) imports asyncio,
  aiortc or socket, and the core reads no clock.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

from layering import find_cycle, module_name

ROOT = pathlib.Path(__file__).resolve().parents[2]
STREAM = ROOT / "media" / "stream"
WHIP = ROOT / "media" / "webrtc" / "whip"


def module_path(name: str) -> pathlib.Path | None:
    base = ROOT.joinpath(*name.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def imports(path: pathlib.Path) -> set[str]:
    """Absolute names of the modules ``path`` imports; ``from pkg import sub``
    counts as ``pkg.sub`` when ``sub`` is a module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package.pop()
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = [f"{target}.{alias.name}" for alias in node.names if module_path(f"{target}.{alias.name}")]
            out.update(subs or [target])
    return out


def test_find_cycle_sees_a_cycle_and_a_dag():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_stream_package_has_no_import_cycle():
    modules = {module_name(p): p for p in STREAM.glob("*.py") if p.name != "__init__.py"}
    assert {"media.stream.stream", "media.stream.reader", "media.stream.publisher", "media.stream.hub"} <= set(modules)
    graph = {name: imports(path) & set(modules) for name, path in modules.items()}
    assert find_cycle(graph) is None
    # The vocabulary is the leaf every other module builds on.
    assert graph["media.stream.types"] == set()


@pytest.mark.parametrize("path", sorted(STREAM.glob("*.py")), ids=lambda p: p.name)
def test_stream_modules_import_downward(path):
    roots = {name.split(".")[0] for name in imports(path)}
    assert not roots & {"server", "live_qc", "tally", "aiohttp", "aiortc"}, roots


@pytest.mark.parametrize("path", sorted(STREAM.glob("*.py")), ids=lambda p: p.name)
def test_stream_modules_touch_only_their_own_private_fields(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    foreign = [
        f"{path.name}:{node.lineno} {ast.unparse(node)}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
        and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
    ]
    assert foreign == []


def closure(start: pathlib.Path) -> dict[str, set[str]]:
    """Project module → its imports, for ``start`` and every project module
    it reaches (packages' ``__init__`` re-exports are not followed: a module
    names the submodule it needs)."""
    seen: dict[str, set[str]] = {}
    todo = [start]
    while todo:
        path = todo.pop()
        name = module_name(path)
        if name in seen:
            continue
        seen[name] = imports(path)
        for dep in seen[name]:
            dep_path = module_path(dep)
            if dep_path is not None and dep_path.name != "__init__.py":
                todo.append(dep_path)
    return seen


@pytest.mark.parametrize("name", ["rtp_ingest.py", "plan.py"])
def test_whip_core_is_sans_io(name):
    reached = closure(WHIP / name)
    assert f"media.webrtc.whip.{name[:-3]}" in reached
    for module, deps in reached.items():
        roots = {dep.split(".")[0] for dep in deps}
        assert not roots & {"asyncio", "aiortc", "socket"}, f"{module} imports {roots & {'asyncio', 'aiortc', 'socket'}}"


def test_rtp_ingest_reads_no_clock_and_never_reaches_the_session():
    reached = closure(WHIP / "rtp_ingest.py")
    assert "time" not in reached["media.webrtc.whip.rtp_ingest"]
    assert "media.webrtc.whip.session" not in reached
    assert "media.stream.stream" not in reached  # only the hub's layer names
