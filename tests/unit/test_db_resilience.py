"""Database-outage logic without a database (issue 16): the guarded pool's
fail-fast rules, the directory's lookups, the deferred-write and tally write
queues' order and bound."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from server.db import Database, GuardedPool, WriteQueue
from server.directory import Directory, ProductionEntry, Snapshot, StreamEntry
from server.errors import DatabaseUnavailable
from server.tally_persist import TallyPersister
from tally.hub import TallyHub
from tally.state import SourceConfig, TallyState


class FakeConn:
    def __init__(self, behaviour: Any = None) -> None:
        self.behaviour = behaviour
        self.terminated = False

    async def fetch(self, *args: Any) -> Any:
        if isinstance(self.behaviour, BaseException):
            raise self.behaviour
        return self.behaviour

    def terminate(self) -> None:
        self.terminated = True


class FakeRawPool:
    def __init__(self, conn: FakeConn | None = None, acquire_error: BaseException | None = None) -> None:
        self.conn = conn or FakeConn([])
        self.acquire_error = acquire_error
        self.acquired = 0
        self.released = 0

    async def acquire(self, timeout: float | None = None) -> FakeConn:
        self.acquired += 1
        if self.acquire_error is not None:
            raise self.acquire_error
        return self.conn

    async def release(self, conn: FakeConn) -> None:
        self.released += 1


def _db(raw: FakeRawPool, *, available: bool = True) -> Database:
    db = Database("postgresql://unused", Path("."), retry_after=3)
    db.raw_pool = raw  # type: ignore[assignment]
    db.pool = GuardedPool(db, raw)  # type: ignore[arg-type]
    db.available = available
    db.problem = None if available else "probe: TimeoutError"
    return db


async def test_down_verdict_fails_without_touching_the_pool() -> None:
    raw = FakeRawPool()
    db = _db(raw, available=False)
    with pytest.raises(DatabaseUnavailable) as exc:
        await db.pool.fetch("SELECT 1")
    assert raw.acquired == 0
    resp = exc.value.response()
    assert resp.status == 503 and resp.headers["Retry-After"] == "3"
    body = json.loads(resp.text)
    assert body["error"] == "database_unavailable" and "probe: TimeoutError" in body["detail"]


async def test_timed_out_statement_drops_the_connection_and_answers_503() -> None:
    conn = FakeConn(asyncio.TimeoutError())
    raw = FakeRawPool(conn)
    db = _db(raw)
    with pytest.raises(DatabaseUnavailable):
        await db.pool.fetch("SELECT pg_sleep(60)")
    assert conn.terminated and raw.released == 1
    # One slow statement is not an outage: the probe decides that.
    assert db.available


async def test_lost_connection_marks_the_database_down() -> None:
    raw = FakeRawPool(acquire_error=ConnectionRefusedError(111, "Connection refused"))
    db = _db(raw)
    with pytest.raises(DatabaseUnavailable):
        await db.pool.fetch("SELECT 1")
    assert not db.available and "ConnectionRefusedError" in (db.problem or "")


async def test_query_errors_are_not_outages() -> None:
    conn = FakeConn(ValueError("bad input"))
    raw = FakeRawPool(conn)
    db = _db(raw)
    with pytest.raises(ValueError):
        await db.pool.fetch("SELECT 1")
    assert not conn.terminated and raw.released == 1 and db.available


def test_directory_lookups() -> None:
    d = Directory(db=None)
    d.snap = Snapshot(
        streams={"cam1": StreamEntry(1, "cam1", 7, "Show", "p" * 20, 16, "")},
        productions={7: ProductionEntry(7, "Show"), 12: ProductionEntry(12, "42")},
        production_names={"Show": 7, "42": 12},
        members={(7, 3): "director"},
        revoked=frozenset({"jti-1"}),
    )
    seen: list[Snapshot] = []
    d.on_change.append(seen.append)
    assert d.stream("cam1").production_id == 7 and d.stream("nope") is None
    assert d.production(7).name == "Show" and d.production("7").name == "Show"
    assert d.production("Show").id == 7 and d.production(99) is None
    assert d.production("42").id == 12  # a numeric name, no production with id 42
    assert d.member_role(7, 3) == "director" and d.member_role(7, 4) is None
    assert d.is_revoked("jti-1") and not d.is_revoked("jti-2")
    d.note_revoked("jti-2")
    assert d.is_revoked("jti-2") and seen and seen[-1].revoked == {"jti-1", "jti-2"}


class FakeDb:
    def __init__(self) -> None:
        self.available = True
        self._up = asyncio.Event()
        self._up.set()

    def set(self, up: bool) -> None:
        self.available = up
        (self._up.set if up else self._up.clear)()

    async def wait_available(self) -> None:
        await self._up.wait()


class FakeService:
    def __init__(self, queue_max: int) -> None:
        self.db = FakeDb()
        self.queue_max = queue_max
        self.stored: list[int] = []

    async def persist(self, p: TallyPersister, batch: list) -> None:
        if not self.db.available:
            raise DatabaseUnavailable()
        self.stored.extend(c.seq for c, _ in batch)


def _production(service: FakeService) -> tuple[TallyState, TallyPersister]:
    state = TallyState("Show", [SourceConfig("a"), SourceConfig("b")])
    TallyHub(state)
    p = TallyPersister(service.db, 1, service.queue_max, write=lambda batch: service.persist(p, batch),
                       snapshot=state.to_dict)
    state.add_listener(p.on_change)
    return state, p


async def _until(pred: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        assert asyncio.get_running_loop().time() < deadline, "condition not met"
        await asyncio.sleep(0.01)


async def test_tally_writes_wait_for_the_database_and_keep_their_order() -> None:
    service = FakeService(queue_max=100)
    state, p = _production(service)
    p.start()
    state.cut("a", now=0.0, who="d")
    await _until(lambda: len(service.stored) == 1)
    service.db.set(False)
    for i in range(6):
        state.cut("b" if i % 2 == 0 else "a", now=float(i + 1), who="d")
    await asyncio.sleep(0.1)
    assert len(service.stored) == 1 and len(p.pending) == 6  # held, not lost
    service.db.set(True)
    await _until(lambda: len(service.stored) == 7)
    assert service.stored == sorted(service.stored) and len(set(service.stored)) == 7
    assert p.dropped == 0 and not p.pending
    await asyncio.wait_for(p.close(), 2)


async def test_tally_queue_bound_drops_the_oldest_and_counts() -> None:
    service = FakeService(queue_max=10)
    service.db.set(False)
    state, p = _production(service)
    p.start()
    for i in range(25):
        state.cut("b" if i % 2 == 0 else "a", now=float(i), who="d")
    await asyncio.sleep(0.05)
    assert len(p.pending) == 10 and p.dropped == 15
    kept = [c.seq for c, _ in p.pending]
    service.db.set(True)
    await _until(lambda: len(service.stored) == 10)
    assert service.stored == kept == sorted(kept)  # the newest ten, in order
    await asyncio.wait_for(p.close(), 2)


class RecordingConn:
    def __init__(self, log: list[str]) -> None:
        self.log = log


class QueueDb(FakeDb):
    """What WriteQueue needs: the verdict and a pool whose acquire fails
    while the database is down."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[str] = []
        self.pool = self

    def acquire(self) -> "QueueDb":
        return self

    async def __aenter__(self) -> RecordingConn:
        if not self.available:
            raise DatabaseUnavailable()
        return RecordingConn(self.rows)

    async def __aexit__(self, *exc: Any) -> None:
        return None


def _row(value: str) -> Any:
    async def write(conn: RecordingConn) -> None:
        if value == "refused":
            raise ValueError("the database refuses this row")
        conn.log.append(value)

    return write


async def test_deferred_writes_wait_keep_order_and_skip_a_refused_row() -> None:
    db = QueueDb()
    db.set(False)
    q = WriteQueue(db, maxlen=100)  # type: ignore[arg-type]
    q.start()
    for v in ("a", "b", "refused", "c"):
        q.put(v, _row(v))
    await asyncio.sleep(0.1)
    assert db.rows == [] and len(q) == 4
    db.set(True)
    await _until(lambda: len(q) == 0)
    assert db.rows == ["a", "b", "c"] and q.failed == 1 and q.written == 3
    await q.stop()


async def test_deferred_writes_bound_drops_the_oldest() -> None:
    db = QueueDb()
    db.set(False)
    q = WriteQueue(db, maxlen=3)  # type: ignore[arg-type]
    q.start()
    for i in range(5):
        q.put(str(i), _row(str(i)))
    assert len(q) == 3 and q.dropped == 2
    db.set(True)
    await _until(lambda: len(q) == 0)
    assert db.rows == ["2", "3", "4"]
    await q.stop()
