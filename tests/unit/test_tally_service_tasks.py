"""Every task of the tally service has an owner that ends it: notification
adopt tasks are cancelled and awaited by ``stop``, and a writer stuck in a
write is cancelled and awaited by the persister's ``close``."""

from __future__ import annotations

import asyncio
import json

import pytest

from server import tally_persist
from server.tally_persist import TallyPersister
from server.tally_service import CHANNEL, ProductionTally, TallyService
from tally.hub import TallyHub
from tally.state import SourceConfig, TallyState


class HangingPool:
    """``fetchrow`` never answers (a frozen database); records what happened."""

    def __init__(self) -> None:
        self.started = 0
        self.cancelled = 0

    async def fetchrow(self, query: str, *args: object) -> None:
        self.started += 1
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


class FakeDb:
    def __init__(self) -> None:
        self.available = True
        self.pool = HangingPool()
        self.on_reconnect: list = []

    async def wait_available(self) -> None:
        return None


def _production(db: FakeDb, write) -> ProductionTally:
    state = TallyState("Show", [SourceConfig("a")])
    persister = TallyPersister(db, 1, 10, write=write, snapshot=state.to_dict)
    state.add_listener(persister.on_change)
    return ProductionTally(1, "Show", state, TallyHub(state), persister)


async def _never(batch) -> None:
    await asyncio.Event().wait()


async def test_stop_cancels_and_awaits_the_adopt_tasks() -> None:
    db = FakeDb()
    service = TallyService(db)
    service.productions[1] = _production(db, _never)
    notification = json.dumps({"production": 1, "seq": 5, "node": "another-node"})
    service._on_notify(None, 0, CHANNEL, notification)
    await asyncio.sleep(0.01)
    assert db.pool.started == 1  # the adopt task is waiting on the database
    await service.stop()
    assert db.pool.cancelled == 1  # ended by stop, not left running
    service._on_notify(None, 0, CHANNEL, notification)
    await asyncio.sleep(0.01)
    assert db.pool.started == 1  # nothing new after stop


async def test_close_cancels_and_awaits_a_writer_stuck_in_a_write(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tally_persist, "CLOSE_TIMEOUT", 0.05)
    db = FakeDb()
    p = _production(db, _never)
    p.persister.start()
    writer = p.persister.writer
    assert writer is not None
    p.state.cut("a", now=1.0, who="d")
    await asyncio.sleep(0.01)
    await p.close()
    assert writer.done() and writer.cancelled() and p.persister.writer is None
