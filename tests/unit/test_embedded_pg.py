"""Issue 9 item 7: the embedded PostgreSQL's socket directory and
authentication cannot be hijacked by another local user."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
from pathlib import Path

import asyncpg
import pytest

from server.embedded_pg import EmbeddedPostgres, EmbeddedPostgresError


def _long_data_dir(tmp_path: Path) -> Path:
    # Long enough that the socket cannot live in <data_dir>/pg.
    return tmp_path / ("d" * 60) / ("e" * 60)


def _short_socket_dir(data_dir: Path) -> Path:
    pgdata = data_dir.resolve() / "pg"
    return Path("/tmp") / ("rfpg-" + hashlib.sha1(str(pgdata).encode()).hexdigest()[:12])


@pytest.fixture
def planted(tmp_path: Path):  # type: ignore[no-untyped-def]
    data = _long_data_dir(tmp_path)
    short = _short_socket_dir(data)
    yield data, short
    if short.is_symlink() or short.is_file():
        short.unlink()
    else:
        shutil.rmtree(short, ignore_errors=True)


def _refused(data: Path, reason: str) -> None:
    pg = EmbeddedPostgres(data)
    try:
        with pytest.raises(EmbeddedPostgresError, match=reason):
            pg.start()
    finally:
        pg.stop()  # a server that started anyway (the bug) must not outlive the test


def test_world_writable_socket_dir_is_refused(planted) -> None:
    data, short = planted
    short.mkdir()
    os.chmod(short, 0o777)  # what another user would pre-create
    _refused(data, "not private")
    assert not (data / "pg" / "PG_VERSION").exists()  # refused before anything ran


def test_socket_dir_of_another_owner_is_refused(planted) -> None:
    data, short = planted
    short.mkdir(mode=0o700)
    os.chmod(short, 0o700)
    if os.geteuid() == 0:
        os.chown(short, 65534, 65534)  # nobody
    else:
        pytest.skip("needs root to create a directory owned by another user")
    _refused(data, "not private")


def test_symlinked_socket_dir_is_refused(planted, tmp_path: Path) -> None:
    data, short = planted
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    short.symlink_to(target)
    _refused(data, "not a directory")


def test_long_data_dir_gets_a_private_socket_dir_and_password_auth(planted) -> None:
    data, short = planted
    pg = EmbeddedPostgres(data)
    url = pg.start()
    try:
        st = short.lstat()
        assert pg.socket_dir == short and (st.st_mode & 0o777) == 0o700
        assert oct((data / "pg.password").stat().st_mode & 0o777) == "0o600"

        async def probe() -> None:
            conn = await asyncpg.connect(url)
            assert await conn.fetchval("SELECT 1") == 1
            await conn.close()
            # The socket alone is not enough: no password, no connection.
            bare = url.split("@", 1)[1]
            with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
                await asyncpg.connect("postgresql://postgres@" + bare)

        asyncio.run(probe())
    finally:
        pg.stop()
    assert not short.exists()


def test_trust_cluster_of_an_earlier_version_is_switched_to_passwords(tmp_path: Path) -> None:
    from server.embedded_pg import _ensure_system_user

    pg = EmbeddedPostgres(tmp_path)
    pg.pgdata.mkdir(mode=0o700)
    pg._run_as = _ensure_system_user()  # as start() would: PostgreSQL never runs as root
    pg._grant_access()
    if pg._run_as.uid is not None:
        os.chown(pg.pgdata, pg._run_as.uid, pg._run_as.gid or 0)
    pg._run([str(pg.bin / "initdb"), "-D", str(pg.pgdata), "-U", "postgres", "--auth=trust",
             "--encoding=UTF8", "--locale=C", "--no-instructions"])
    url = pg.start()
    try:
        assert "trust" not in (pg.pgdata / "pg_hba.conf").read_text()

        async def probe() -> None:
            conn = await asyncpg.connect(url)
            await conn.close()
            with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
                await asyncpg.connect("postgresql://postgres@" + url.split("@", 1)[1])

        asyncio.run(probe())
    finally:
        pg.stop()
