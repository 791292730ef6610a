"""server/ imports point one way (DESIGN: route modules expose routes and
import nothing above them; the factory imports them).

The graph is built from the source with ``ast`` (imports inside functions
count: a cycle hidden in a function body is still a cycle), so the test
needs no database and imports nothing it checks.

    main ─▶ app ─▶ route modules ─▶ leaves / services ─▶ media, tally
                   (api.*, whep, whip, health, pages, tally_routes)
"""

from __future__ import annotations

import ast
import pathlib

import pytest

from layering import find_cycle

ROOT = pathlib.Path(__file__).resolve().parents[2]
SERVER = ROOT / "server"

#: Leaves: the toolbox every route uses; they import no route module and
#: nothing that imports route modules.
LEAVES = ("keys", "access", "errors", "log", "config", "redact", "auth", "limits")
#: Above every route module: the factory and the process around it.
FACTORY = ("app", "main", "cli")
#: Route modules that must exist (more are found by their ``setup``/``routes``).
KNOWN_ROUTES = ("api.auth", "api.users", "api.productions", "api.streams", "api.links",
                "whep", "whip", "health", "pages", "tally_routes")
#: A package ``__init__`` that lists its own route modules' setups.
AGGREGATORS = ("api",)


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(SERVER).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(SERVER.rglob("*.py")) if module_name(p)}


def _package_of(name: str) -> list[str]:
    path = MODULES[name]
    parts = name.split(".")
    return parts if path.name == "__init__.py" else parts[:-1]


def _resolve(base: list[str], tail: str | None, names: list[str]) -> set[str]:
    """Server modules named by ``from <base>.<tail> import <names>``."""
    prefix = base + (tail.split(".") if tail else [])
    out: set[str] = set()
    for alias in names:
        sub = ".".join(prefix + [alias])
        if sub in MODULES:
            out.add(sub)
        elif prefix and ".".join(prefix) in MODULES:
            out.add(".".join(prefix))
    return out


def server_imports(name: str) -> set[str]:
    """Other server modules ``name`` imports (absolute or relative)."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "server":
                    found.add(".".join(parts[1:]) or "")
        elif isinstance(node, ast.ImportFrom):
            names = [a.name for a in node.names]
            if node.level:
                package = _package_of(name)
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                found |= _resolve(base, node.module, names)
            elif node.module and node.module.split(".")[0] == "server":
                found |= _resolve([], ".".join(node.module.split(".")[1:]) or None, names)
    found.discard("")
    found.discard(name)
    return found


GRAPH = {name: server_imports(name) for name in MODULES}


def _defines_routes(name: str) -> bool:
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "setup":
            return True
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "routes" for t in targets):
                return True
    return False


ROUTES = {name for name in MODULES if _defines_routes(name) and name not in AGGREGATORS}


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_known_route_modules_are_found():
    assert set(KNOWN_ROUTES) <= ROUTES, sorted(set(KNOWN_ROUTES) - ROUTES)


def test_server_import_graph_has_no_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " → ".join(cycle or [])


@pytest.mark.parametrize("leaf", LEAVES)
def test_leaves_import_no_route_module(leaf):
    assert leaf in MODULES, f"server/{leaf}.py is missing"
    above = GRAPH[leaf] & (ROUTES | set(FACTORY) | set(AGGREGATORS))
    assert not above, f"server/{leaf} imports {sorted(above)}"


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_route_modules_import_no_factory_and_no_other_route(route):
    above = GRAPH[route] & (ROUTES | set(FACTORY) | set(AGGREGATORS))
    assert not above, f"server/{route.replace('.', '/')} imports {sorted(above)}"


def test_aggregators_import_only_their_own_modules_and_leaves():
    for package in AGGREGATORS:
        above = {m for m in GRAPH[package] & (ROUTES | set(FACTORY)) if not m.startswith(package + ".")}
        assert not above, f"server/{package} imports {sorted(above)}"


@pytest.mark.parametrize("package", ("media", "tally", "live_qc"))
def test_lower_packages_never_import_server(package):
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots = {node.module.split(".")[0]}
            else:
                continue
            if "server" in roots:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders
