"""Database access: connection pool, embedded server, migrations.

Migrations are the ``NNNN_name.sql`` files in ``server/migrations``. Each is
applied in its own transaction and recorded in ``schema_migrations`` with a
checksum. The whole run holds a PostgreSQL advisory lock, so two server
processes starting at once against one database apply each migration exactly
once (the second waits, then finds nothing left to do). A recorded migration
whose file changed is refused: schemas are append-only.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from .embedded_pg import EmbeddedPostgres
from .log import event

log = logging.getLogger("returnfeed.db")

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
#: Arbitrary constant key for pg_advisory_lock: "RFMIGRAT" as an int64.
MIGRATION_LOCK_KEY = 0x52464D4947524154
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class MigrationError(RuntimeError):
    """A migration failed or the recorded history does not match the files."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    out = []
    for path in sorted(directory.iterdir()):
        m = _NAME.match(path.name)
        if not m:
            continue
        out.append(Migration(int(m.group(1)), m.group(2), path.read_text()))
    versions = [m.version for m in out]
    if versions != list(range(1, len(out) + 1)):
        raise MigrationError(f"migrations must be numbered 1..n without gaps, found {versions}")
    return out


async def migrate(conn: asyncpg.Connection, migrations: list[Migration] | None = None) -> list[int]:
    """Apply pending migrations; return the versions applied by this call."""
    migrations = load_migrations() if migrations is None else migrations
    applied: list[int] = []
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version    integer PRIMARY KEY,
                   name       text NOT NULL,
                   checksum   text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = {r["version"]: r for r in await conn.fetch("SELECT version, name, checksum FROM schema_migrations")}
        known = {m.version for m in migrations}
        unknown = sorted(set(done) - known)
        if unknown:
            raise MigrationError(
                f"the database has migrations {unknown} this version of ReturnFeed does not know; "
                "it was created by a newer release"
            )
        for m in migrations:
            rec = done.get(m.version)
            if rec is not None:
                if rec["checksum"] != m.checksum:
                    raise MigrationError(
                        f"migration {m.version:04d}_{m.name} was changed after it was applied; "
                        "add a new migration instead"
                    )
                continue
            try:
                async with conn.transaction():
                    await conn.execute(m.sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                        m.version, m.name, m.checksum,
                    )
            except asyncpg.PostgresError as exc:
                raise MigrationError(f"migration {m.version:04d}_{m.name} failed: {exc}") from exc
            applied.append(m.version)
            event(log, logging.INFO, "db.migrate", version=m.version, name=m.name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    return applied


class Database:
    """The pool plus, when no URL is configured, the embedded server."""

    def __init__(self, url: str, data_dir: Path, *, pool_min: int = 1, pool_max: int = 10,
                 connect_timeout: float = 10.0) -> None:
        self.configured_url = url
        self.data_dir = data_dir
        self.pool_min = pool_min
        self.pool_max = pool_max
        self.connect_timeout = connect_timeout
        self.embedded: EmbeddedPostgres | None = None
        self.pool: asyncpg.Pool | None = None
        self.url = url

    @property
    def kind(self) -> str:
        return "embedded" if self.embedded is not None else "external"

    async def start(self, *, run_migrations: bool = True) -> None:
        import asyncio

        if not self.configured_url:
            self.embedded = EmbeddedPostgres(self.data_dir)
            self.url = await asyncio.get_running_loop().run_in_executor(None, self.embedded.start)
        try:
            self.pool = await asyncpg.create_pool(
                self.url, min_size=self.pool_min, max_size=self.pool_max,
                timeout=self.connect_timeout, command_timeout=30,
            )
            if run_migrations:
                async with self.pool.acquire() as conn:
                    await migrate(conn)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        import asyncio

        if self.pool is not None:
            try:
                await asyncio.wait_for(self.pool.close(), timeout=10)
            except (asyncio.TimeoutError, Exception):
                self.pool.terminate()
            self.pool = None
        if self.embedded is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.embedded.stop)
            self.embedded = None

    async def ping(self) -> bool:
        if self.pool is None:
            return False
        try:
            async with self.pool.acquire(timeout=2) as conn:
                return await conn.fetchval("SELECT 1", timeout=2) == 1
        except Exception:
            return False
