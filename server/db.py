"""Database access: connection pool, embedded server, migrations, supervision.

The database is the control plane, never the live path (DESIGN.md invariant
1). :class:`Database` therefore:

* hands out a :class:`GuardedPool` whose every call fails within a short
  budget (``database.acquire_timeout_s`` + ``database.statement_timeout_s``)
  with :class:`~server.errors.DatabaseUnavailable` (503 + ``Retry-After``)
  instead of hanging on a frozen server or surfacing a driver error as 500;
* runs a supervisor task that probes the server every
  ``database.probe_interval_s`` on its own connection, which also carries
  every ``LISTEN`` channel. The probe's verdict is cached (``/healthz`` reads
  it, and routes fail at once while it says "down"); when the database comes
  back the channels are re-subscribed and the ``on_reconnect`` callbacks run
  (directory reload, tally resync, queued writes flushed);
* restarts the embedded PostgreSQL when its postmaster has died, with
  backoff, and keeps trying (logging why) while media and tally carry on.

Migrations are the ``NNNN_name.sql`` files in ``server/migrations``. Each is
applied in its own transaction and recorded in ``schema_migrations`` with a
checksum. The whole run holds a PostgreSQL advisory lock, so two server
processes starting at once against one database apply each migration exactly
once (the second waits, then finds nothing left to do). A recorded migration
whose file changed is refused: schemas are append-only.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

import asyncpg

from .embedded_pg import EmbeddedPostgres, EmbeddedPostgresError
from .errors import DatabaseUnavailable
from .log import event
from .tasks import cancel_and_wait

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


#: Errors that mean "the server is not answering", not "the query is wrong".
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    asyncio.TimeoutError, OSError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError, asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.OperatorInterventionError,
    # The protocol's state machine tripping over a connection that broke
    # mid-operation ("another operation is in progress").
    asyncpg.exceptions.InternalClientError,
)


async def set_codecs(conn: asyncpg.Connection) -> None:
    """Decode ``jsonb`` to Python objects and encode Python objects to it, on
    every connection we open (the pool's ``init`` and :meth:`Database.direct`),
    so no caller ``json.loads`` a column or ``json.dumps`` a parameter."""
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


def is_connection_error(exc: BaseException) -> bool:
    return isinstance(exc, CONNECTION_ERRORS)


def refused_by_database(exc: BaseException) -> bool:
    """The database answered and refused the statement for what it carried
    (a constraint, a type): retrying the same write cannot succeed, unlike
    a lost connection or an unavailable database."""
    return (isinstance(exc, asyncpg.PostgresError) and not is_connection_error(exc)
            and not isinstance(exc, DatabaseUnavailable))


class GuardedConnection(asyncpg.Connection):  # type: ignore[misc]
    """A pool connection that terminates itself when a statement times out.

    asyncpg answers a client-side timeout by sending a cancel request and
    making the *next* statement on the connection wait for it. On a frozen
    server the cancel is never answered, so a transaction's ROLLBACK would
    wait a second full budget. Dropping the connection at once makes that
    ROLLBACK (and anything else queued on it) fail immediately; the pool
    opens a fresh connection later.
    """

    async def _guard(self, coro: Awaitable[Any]) -> Any:
        try:
            return await coro
        except asyncio.TimeoutError:
            self.terminate()
            raise

    async def execute(self, *args: Any, **kw: Any) -> Any:
        return await self._guard(super().execute(*args, **kw))

    async def executemany(self, *args: Any, **kw: Any) -> Any:
        return await self._guard(super().executemany(*args, **kw))

    async def fetch(self, *args: Any, **kw: Any) -> Any:
        return await self._guard(super().fetch(*args, **kw))

    async def fetchrow(self, *args: Any, **kw: Any) -> Any:
        return await self._guard(super().fetchrow(*args, **kw))

    async def fetchval(self, *args: Any, **kw: Any) -> Any:
        return await self._guard(super().fetchval(*args, **kw))


def _terminate(conn: asyncpg.Connection) -> None:
    try:
        conn.terminate()
    except asyncpg.InterfaceError:
        pass  # closed under us: the pool already took it back


class _Acquire:
    """``async with pool.acquire() as conn``: fail fast, never hang on release."""

    __slots__ = ("_db", "_conn")

    def __init__(self, db: "Database") -> None:
        self._db = db
        self._conn: asyncpg.Connection | None = None

    async def __aenter__(self) -> asyncpg.Connection:
        db = self._db
        db.check()
        raw = db.raw_pool
        if raw is None:
            raise db.unavailable("the database pool is closed")
        try:
            self._conn = await raw.acquire(timeout=db.acquire_timeout)
        except CONNECTION_ERRORS as exc:
            db.note_failure(exc, where="acquire")
            raise db.unavailable() from None
        return self._conn

    async def __aexit__(self, et: Any, exc: BaseException | None, tb: Any) -> bool:
        db, conn = self._db, self._conn
        assert conn is not None
        self._conn = None
        failed = exc is not None and is_connection_error(exc)
        if failed:
            _terminate(conn)  # a half-done statement must not wait for its cancel
        try:
            # release() resets the session (a round trip): bounded, and a
            # connection that cannot be reset is dropped rather than waited on.
            await asyncio.wait_for(db.raw_pool.release(conn), db.statement_timeout)
        except Exception:
            _terminate(conn)
        if failed:
            assert exc is not None
            db.note_failure(exc, where="query")
            raise db.unavailable() from exc
        return False


class GuardedPool:
    """The subset of :class:`asyncpg.Pool` the server uses, with a budget.

    While the supervisor's cached verdict says the database is down, every
    call raises :class:`DatabaseUnavailable` without touching the network.
    """

    def __init__(self, db: "Database", raw: asyncpg.Pool) -> None:
        self._db = db
        self._raw = raw

    def acquire(self) -> _Acquire:
        return _Acquire(self._db)

    async def execute(self, query: str, *args: Any) -> Any:
        async with self.acquire() as conn:
            return await conn.execute(query, *args)

    async def executemany(self, query: str, args: Any) -> Any:
        async with self.acquire() as conn:
            return await conn.executemany(query, args)

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        async with self.acquire() as conn:
            return await conn.fetch(query, *args)

    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        async with self.acquire() as conn:
            return await conn.fetchrow(query, *args)

    async def fetchval(self, query: str, *args: Any) -> Any:
        async with self.acquire() as conn:
            return await conn.fetchval(query, *args)

    def get_size(self) -> int:
        return self._raw.get_size()

    def get_idle_size(self) -> int:
        return self._raw.get_idle_size()

    def get_max_size(self) -> int:
        return self._raw.get_max_size()


class WriteQueue:
    """Writes the live path owes the database (audit rows of live actions),
    kept in memory, in order, while it is away.

    Bounded: beyond ``maxlen`` the oldest write is dropped, counted and
    logged. One task writes them one by one, each on its own pooled
    connection, retrying the head of the queue until the database takes it;
    a write the database refuses for its content is logged and skipped, so
    one bad row never blocks the rest.
    """

    def __init__(self, db: "Database", maxlen: int) -> None:
        self._db = db
        self.maxlen = maxlen
        self._items: deque[tuple[str, Callable[[asyncpg.Connection], Awaitable[Any]]]] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.written = 0
        self.dropped = 0
        self.failed = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, label: str, write: Callable[[asyncpg.Connection], Awaitable[Any]]) -> None:
        self._items.append((label, write))
        if len(self._items) > self.maxlen:
            dropped_label, _ = self._items.popleft()
            self.dropped += 1
            event(log, logging.ERROR, "db.deferred_dropped", write=dropped_label, total_dropped=self.dropped,
                  queue_max=self.maxlen)
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="db-deferred-writes")

    async def stop(self, timeout: float = 5.0) -> None:
        """Give what is queued a last chance (while the database answers),
        then stop; anything left is logged as lost."""
        if self._task is None:
            return
        deadline = time.monotonic() + timeout
        while self._items and self._db.available and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await cancel_and_wait(self._task)
        self._task = None
        if self._items:
            event(log, logging.ERROR, "db.deferred_lost_at_shutdown", writes=len(self._items))

    async def _run(self) -> None:
        db = self._db
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._items:
                if not db.available:
                    try:
                        await asyncio.wait_for(db.wait_available(), 1.0)
                    except asyncio.TimeoutError:
                        pass
                    continue
                label, write = self._items[0]
                try:
                    assert db.pool is not None
                    async with db.pool.acquire() as conn:
                        await write(conn)
                except Exception as exc:
                    if isinstance(exc, DatabaseUnavailable) or is_connection_error(exc):
                        await asyncio.sleep(0.25)  # the probe will tell; retry the same write
                        continue
                    self.failed += 1
                    event(log, logging.ERROR, "db.deferred_failed", write=label, error=f"{type(exc).__name__}: {exc}")
                    self._items.popleft()
                    continue
                self._items.popleft()
                self.written += 1


Listener = Callable[[Any, int, str, str], None]
Callback = Callable[[], Awaitable[None]]


class Database:
    """The pool plus, when no URL is configured, the embedded server."""

    def __init__(self, url: str, data_dir: Path, *, pool_min: int = 1, pool_max: int = 10,
                 connect_timeout: float = 10.0, acquire_timeout: float = 0.25,
                 statement_timeout: float = 0.6, probe_interval: float = 0.5, probe_timeout: float = 0.5,
                 retry_after: int = 2, restart_backoff_max: float = 10.0, write_queue_max: int = 10_000,
                 supervise: bool = True) -> None:
        self.configured_url = url
        self.data_dir = data_dir
        self.pool_min = pool_min
        self.pool_max = pool_max
        self.connect_timeout = connect_timeout
        self.acquire_timeout = acquire_timeout
        self.statement_timeout = statement_timeout
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.retry_after = retry_after
        self.restart_backoff_max = restart_backoff_max
        self.supervise = supervise
        self.embedded: EmbeddedPostgres | None = None
        self.raw_pool: asyncpg.Pool | None = None
        self.pool: GuardedPool | None = None
        self.url = url
        #: The supervisor's cached verdict (read by /healthz and every call).
        self.available = False
        self.problem: str | None = "not started"
        self.down_since: float | None = None
        self.outages = 0
        self.restarts = 0
        self.restart_failures = 0
        self.last_restart_error: str | None = None
        self.on_reconnect: list[Callback] = []
        #: Audit rows and other writes of live actions, written when possible.
        self.deferred = WriteQueue(self, write_queue_max)
        self._listeners: list[tuple[str, Listener]] = []
        self._listen_conn: asyncpg.Connection | None = None
        self._supervisor: asyncio.Task | None = None
        self._up = asyncio.Event()
        self._conn_lock = asyncio.Lock()
        self._probe_failures = 0
        self._next_restart = 0.0
        self._restart_backoff = 0.5
        self._restarting = False

    @property
    def kind(self) -> str:
        return "embedded" if self.embedded is not None else "external"

    # -- lifecycle ---------------------------------------------------------------

    async def start(self, *, run_migrations: bool = True) -> None:
        if not self.configured_url:
            self.embedded = EmbeddedPostgres(self.data_dir)
            self.url = await asyncio.get_running_loop().run_in_executor(None, self.embedded.start)
        try:
            self.raw_pool = await asyncpg.create_pool(
                self.url, min_size=self.pool_min, max_size=self.pool_max,
                timeout=self.connect_timeout, command_timeout=self.statement_timeout,
                connection_class=GuardedConnection, init=set_codecs,
            )
            self.pool = GuardedPool(self, self.raw_pool)
            if run_migrations:
                async with self.direct() as conn:
                    await migrate(conn)
            self._set_up()
            self.deferred.start()
            if self.supervise:
                self._listen_conn = await self._open_listen_conn()
                self._supervisor = asyncio.get_running_loop().create_task(self._supervise(), name="db-supervisor")
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        await self.deferred.stop()
        if self._supervisor is not None:
            await cancel_and_wait(self._supervisor)
            self._supervisor = None
        await self._drop_listen_conn()
        if self.raw_pool is not None:
            try:
                await asyncio.wait_for(self.raw_pool.close(), timeout=10)
            except (asyncio.TimeoutError, Exception):
                self.raw_pool.terminate()
            self.raw_pool = None
            self.pool = None
        if self.embedded is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.embedded.stop)
            self.embedded = None
        self.available = False
        self.problem = "closed"

    def direct(self) -> "_Direct":
        """A connection outside the pool with no statement budget, for work
        that may legitimately wait (migrations, first-start locks)."""
        return _Direct(self)

    async def ping(self) -> bool:
        """The supervisor's cached verdict (never a round trip)."""
        return self.available

    # -- the verdict ----------------------------------------------------------------

    def unavailable(self, detail: str | None = None) -> DatabaseUnavailable:
        why = detail or f"the database is unavailable ({self.problem or 'not answering'}); try again shortly"
        return DatabaseUnavailable(why, retry_after=self.retry_after)

    def check(self) -> None:
        if not self.available:
            raise self.unavailable()

    async def wait_available(self) -> None:
        await self._up.wait()

    def note_failure(self, exc: BaseException, *, where: str) -> None:
        """A call failed for want of a server. A timed-out statement alone is
        not proof (a slow query on a busy machine); a lost or refused
        connection is, so only that trips the cached verdict here. The probe
        decides about freezes."""
        reason = f"{where}: {type(exc).__name__}: {exc}".rstrip(": ")
        if isinstance(exc, asyncio.TimeoutError):
            event(log, logging.WARNING, "db.timeout", where=where)
            return
        self._set_down(reason)

    def _set_up(self) -> None:
        if not self.available and self.down_since is not None:
            event(log, logging.WARNING, "db.available", outage_s=round(time.monotonic() - self.down_since, 2))
        self.available = True
        self.problem = None
        self.down_since = None
        self._probe_failures = 0
        self._restart_backoff = 0.5
        self._up.set()

    def _set_down(self, reason: str) -> None:
        if self.available:
            self.outages += 1
            self.down_since = time.monotonic()
            event(log, logging.ERROR, "db.unavailable", reason=reason[:300], kind=self.kind)
        self.available = False
        self.problem = reason[:300]
        self._up.clear()

    # -- LISTEN ------------------------------------------------------------------

    async def listen(self, channel: str, callback: Listener) -> None:
        """Subscribe ``callback`` to ``channel`` now (if connected) and again
        after every reconnect."""
        self._listeners.append((channel, callback))
        async with self._conn_lock:  # one operation at a time on a connection
            conn = self._listen_conn
            if conn is not None and not conn.is_closed():
                try:
                    await asyncio.wait_for(conn.add_listener(channel, callback), self.probe_timeout * 2)
                except Exception:
                    await self._drop_listen_conn()  # the next probe reconnects and subscribes

    async def _open_listen_conn(self) -> asyncpg.Connection:
        conn = await asyncpg.connect(self.url, timeout=max(self.probe_timeout, 0.5))
        try:
            for channel, cb in self._listeners:
                await asyncio.wait_for(conn.add_listener(channel, cb), self.probe_timeout * 2)
        except BaseException:
            conn.terminate()
            raise
        return conn

    async def _drop_listen_conn(self) -> None:
        conn, self._listen_conn = self._listen_conn, None
        if conn is not None:
            conn.terminate()

    # -- supervision -------------------------------------------------------------

    async def _supervise(self) -> None:
        while True:
            await asyncio.sleep(self.probe_interval)
            try:
                await self._probe_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # the supervisor must outlive any surprise
                log.exception("db.supervisor_error")

    async def _probe_once(self) -> None:
        async with self._conn_lock:
            await self._probe_locked()

    async def _probe_locked(self) -> None:
        was_up = self.available
        conn = self._listen_conn
        try:
            if conn is None or conn.is_closed():
                await self._drop_listen_conn()
                conn = self._listen_conn = await asyncio.wait_for(self._open_listen_conn(),
                                                                  self.probe_timeout * 3)
                fresh = True
            else:
                fresh = False
            await asyncio.wait_for(conn.fetchval("SELECT 1"), self.probe_timeout)
        except Exception as exc:
            self._probe_failures += 1
            timed_out = isinstance(exc, asyncio.TimeoutError)
            if timed_out:
                # A frozen server: the connection is useless until it thaws.
                await self._drop_listen_conn()
            # One slow probe on a loaded machine is not an outage; a refused
            # or lost connection, or two slow probes in a row, is.
            if not timed_out or self._probe_failures >= 2:
                self._set_down(f"probe: {type(exc).__name__}: {exc}".rstrip(": "))
            await self._maybe_restart_embedded()
            return
        self._probe_failures = 0
        if not was_up or fresh:
            if not was_up:
                # Connections opened before the outage may point at a dead
                # backend: replace them rather than find out per request.
                if self.raw_pool is not None:
                    await self.raw_pool.expire_connections()
            self._set_up()
            await self._run_reconnect_callbacks()

    async def _run_reconnect_callbacks(self) -> None:
        """Re-subscribed already (fresh listen connection); now catch up on
        what the missed notifications said, in registration order."""
        for cb in list(self.on_reconnect):
            try:
                await cb()
            except Exception as exc:
                event(log, logging.ERROR, "db.resync_failed", callback=getattr(cb, "__qualname__", str(cb)),
                      error=f"{type(exc).__name__}: {exc}")

    async def _maybe_restart_embedded(self) -> None:
        emb = self.embedded
        if emb is None or not emb.owner or self._restarting:
            return
        loop = asyncio.get_running_loop()
        if emb.postmaster_alive():
            return  # frozen or busy, not dead: restarting would fight it
        now = time.monotonic()
        if now < self._next_restart:
            return
        self._restarting = True
        try:
            event(log, logging.ERROR, "db.embedded.dead", action="restarting", attempt=self.restart_failures + 1)
            await loop.run_in_executor(None, emb.restart)
            self.restarts += 1
            self.restart_failures = 0
            self.last_restart_error = None
            self._restart_backoff = 0.5
            self._next_restart = 0.0
            event(log, logging.WARNING, "db.embedded.restarted", restarts=self.restarts)
        except (EmbeddedPostgresError, OSError) as exc:
            self.restart_failures += 1
            self.last_restart_error = str(exc)[-500:]
            self._next_restart = time.monotonic() + self._restart_backoff
            event(log, logging.ERROR, "db.embedded.restart_failed", error=self.last_restart_error,
                  retry_in_s=self._restart_backoff)
            self._restart_backoff = min(self._restart_backoff * 2, self.restart_backoff_max)
        finally:
            self._restarting = False


class _Direct:
    __slots__ = ("_db", "_conn")

    def __init__(self, db: Database) -> None:
        self._db = db
        self._conn: asyncpg.Connection | None = None

    async def __aenter__(self) -> asyncpg.Connection:
        self._conn = await asyncpg.connect(self._db.url, timeout=self._db.connect_timeout)
        try:
            await set_codecs(self._conn)
        except BaseException:
            self._conn.terminate()
            raise
        return self._conn

    async def __aexit__(self, *exc: Any) -> None:
        if self._conn is not None:
            try:
                await asyncio.wait_for(self._conn.close(), 5)
            except Exception:
                self._conn.terminate()
