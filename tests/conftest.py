"""Shared fixtures.

``pg_server`` is one real PostgreSQL for the whole run: the one named by
``DATABASE_URL`` when set (CI may point at an external server), otherwise an
embedded one started in a temporary directory. Each test that needs a
database gets a fresh database on it (``db_url``).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))


@pytest.fixture
def lib():  # type: ignore[no-untyped-def]
    """The system libsrt through the project's binding (skips, and fails in
    CI, when no libsrt can be loaded)."""
    from media.errors import SrtUnavailable
    from media.srt.binding import SrtLibrary

    try:
        library = SrtLibrary.open()
    except SrtUnavailable as exc:
        pytest.skip(f"libsrt not installed: {exc}")
    yield library
    library.close()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    from server.embedded_pg import EmbeddedPostgres

    tmp = Path(tempfile.mkdtemp(prefix="rf-pg-"))
    pg = EmbeddedPostgres(tmp)
    url = pg.start()
    try:
        yield url
    finally:
        pg.stop()


def _with_db(base_url: str, dbname: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(base_url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + dbname, parts.query, parts.fragment))


def _in_thread(fn: Any) -> Any:
    """Run ``fn`` in a fresh thread: Playwright's sync API (the browser
    tests) keeps an event loop running in the main thread, where
    ``asyncio.run`` is refused."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # re-raised in the caller
            out["error"] = exc

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out.get("value")


def _fresh_database(pg_server: str) -> Iterator[str]:
    import asyncpg

    name = "rf_test_" + secrets.token_hex(6)

    async def run(sql: str) -> None:
        conn = await asyncpg.connect(pg_server)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    _in_thread(lambda: asyncio.run(run(f'CREATE DATABASE "{name}"')))
    try:
        yield _with_db(pg_server, name)
    finally:
        _in_thread(lambda: asyncio.run(run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')))


@pytest.fixture
def db_url(pg_server: str) -> Iterator[str]:
    """A fresh, empty database for one test."""
    yield from _fresh_database(pg_server)


@pytest.fixture(scope="module")
def module_db_url(pg_server: str) -> Iterator[str]:
    """A fresh, empty database shared by one test module."""
    yield from _fresh_database(pg_server)


@pytest.fixture(scope="module")
def api_server(module_db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator["ServerProcess"]:
    """One real server on an external database, admin password known."""
    from helpers import ServerProcess

    srv = ServerProcess(tmp_path_factory.mktemp("srv"),
                        env={"DATABASE_URL": module_db_url, "RETURNFEED_ADMIN_PASSWORD": "admin-password-1"})
    srv.admin_password = "admin-password-1"
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
    # Issue 9 item 4: a whole module's worth of requests, SRT handshakes and
    # sessions, and not one token in the server's log (JWTs start "eyJ").
    leaked = [line for line in srv.output if "eyJ" in line]
    assert not leaked, f"token in the server log: {leaked[0][:200]}"


# In CI every external peer (ffmpeg, libsrt, srt-live-transmit, PostgreSQL,
# Chromium) is installed by the test command itself, so a test that skips
# for lack of one means the setup is broken: fail it there instead.
_MISSING_DEPENDENCY = ("not installed", "needs ffmpeg", "needs libsrt", "needs srt-live-transmit",
                       "unavailable", "no system Chromium")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") and report.skipped:
        reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr)
        if any(s in reason for s in _MISSING_DEPENDENCY):
            report.outcome = "failed"
            report.longrepr = f"skipped in CI for a missing dependency the setup should install: {reason}"
