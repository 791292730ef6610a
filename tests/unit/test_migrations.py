import asyncio
from pathlib import Path

import asyncpg
import pytest

from server.db import Migration, MigrationError, load_migrations, migrate


def test_migration_files_numbered_and_loadable() -> None:
    ms = load_migrations()
    assert ms and [m.version for m in ms] == list(range(1, len(ms) + 1))


def test_gap_in_numbering_refused(tmp_path: Path) -> None:
    (tmp_path / "0001_a.sql").write_text("SELECT 1;")
    (tmp_path / "0003_c.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match="without gaps"):
        load_migrations(tmp_path)


async def test_migrate_applies_once_and_records(db_url: str) -> None:
    conn = await asyncpg.connect(db_url)
    try:
        first = await migrate(conn)
        assert first == [m.version for m in load_migrations()]
        assert await migrate(conn) == []
        tables = {r["tablename"] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname='public'")}
        for t in ("users", "productions", "production_members", "streams", "tally_state", "tally_events",
                  "markers", "captions", "audit_log", "refresh_tokens", "schema_migrations"):
            assert t in tables
    finally:
        await conn.close()


async def test_concurrent_migrations_apply_each_once(db_url: str) -> None:
    conns = [await asyncpg.connect(db_url) for _ in range(4)]
    try:
        results = await asyncio.gather(*(migrate(c) for c in conns))
        applied = sorted(v for r in results for v in r)
        assert applied == [m.version for m in load_migrations()]
        assert await conns[0].fetchval("SELECT count(*) FROM schema_migrations") == len(applied)
    finally:
        for c in conns:
            await c.close()


async def test_failed_migration_rolls_back_and_changed_one_refused(db_url: str) -> None:
    conn = await asyncpg.connect(db_url)
    try:
        good = Migration(1, "good", "CREATE TABLE t1 (id int);")
        bad = Migration(2, "bad", "CREATE TABLE t2 (id int); SELECT no_such_function();")
        with pytest.raises(MigrationError, match="0002_bad failed"):
            await migrate(conn, [good, bad])
        assert await conn.fetchval("SELECT to_regclass('t2')") is None  # rolled back whole
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == 1
        with pytest.raises(MigrationError, match="changed after it was applied"):
            await migrate(conn, [Migration(1, "good", "CREATE TABLE t1 (id bigint);")])
        with pytest.raises(MigrationError, match="newer release"):
            await migrate(conn, [])
    finally:
        await conn.close()
