"""server.batch_writer.BatchWriter: bounded, in order, batched, retried
across an outage, a refused row skipped, drained on close."""

from __future__ import annotations

import asyncio
import logging
import time

import asyncpg
import pytest

from server.batch_writer import BatchWriter
from server.db import DatabaseUnavailable

log = logging.getLogger("test.batch_writer")


class FakeDb:
    """The supervisor's verdict (``available``) and its wake-up."""

    def __init__(self) -> None:
        self.available = True
        self._up = asyncio.Event()
        self._up.set()

    def down(self) -> None:
        self.available = False
        self._up.clear()

    def up(self) -> None:
        self.available = True
        self._up.set()

    async def wait_available(self) -> None:
        await self._up.wait()


class Table:
    def __init__(self, db: FakeDb) -> None:
        self.db = db
        self.rows: list[int] = []
        self.batches: list[list[int]] = []
        self.refuse: set[int] = set()

    async def write(self, batch: list[int]) -> int:
        await asyncio.sleep(0)
        if not self.db.available:
            raise DatabaseUnavailable("down")
        if self.refuse & set(batch):
            raise asyncpg.exceptions.CheckViolationError("bad row")
        self.batches.append(list(batch))
        self.rows += batch
        return len(batch)


async def until(pred, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def test_items_are_stored_in_order_in_batches_and_reported() -> None:
    db = FakeDb()
    table = Table(db)
    written: list[tuple[list[int], int]] = []
    w = BatchWriter(db, table.write, name="t", queue_max=1000, logger=log, batch_max=3,
                    on_written=lambda batch, result: written.append((batch, result)))
    w.start()
    for i in range(7):
        w.put(i)
    await until(lambda: w.stored == 7)
    assert table.rows == list(range(7))
    assert all(len(b) <= 3 for b in table.batches)
    assert [r for _, r in written] == [len(b) for b in table.batches]
    await w.close()


async def test_an_outage_only_delays_storage_and_the_oldest_overflow_is_dropped() -> None:
    db = FakeDb()
    table = Table(db)
    w = BatchWriter(db, table.write, name="t", queue_max=5, logger=log)
    w.start()
    db.down()
    for i in range(8):
        w.put(i)
    await asyncio.sleep(0.1)
    assert table.rows == [] and w.dropped == 3 and list(w.pending) == [3, 4, 5, 6, 7]
    assert w.deferred >= 1
    db.up()
    await until(lambda: w.stored == 5)
    assert table.rows == [3, 4, 5, 6, 7]
    await w.close()


async def test_a_batch_the_database_refuses_is_skipped_and_counted() -> None:
    db = FakeDb()
    table = Table(db)
    table.refuse = {1}
    w = BatchWriter(db, table.write, name="t", queue_max=100, logger=log, batch_max=2)
    w.start()
    for i in range(4):
        w.put(i)
    await until(lambda: w.stored + w.failed == 4)
    assert table.rows == [2, 3] and w.failed == 2
    await w.close()


async def test_close_drains_what_is_queued_then_ends() -> None:
    db = FakeDb()
    table = Table(db)
    w = BatchWriter(db, table.write, name="t", queue_max=100, logger=log)
    w.start()
    for i in range(5):
        w.put(i)
    await w.close()
    assert table.rows == list(range(5))
    # Down at shutdown: close gives up after its timeout, keeping the count.
    db.down()
    w.start()
    w.put(9)
    began = time.monotonic()
    await w.close(timeout=0.2)
    assert time.monotonic() - began < 2.0 and list(w.pending) == [9]


def test_bounds_are_checked() -> None:
    with pytest.raises(ValueError):
        BatchWriter(FakeDb(), Table(FakeDb()).write, name="t", queue_max=0, logger=log)
