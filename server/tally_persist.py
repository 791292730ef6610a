"""Persistence of one production's tally changes: a bounded queue and its writer.

Every change is queued (never awaited by the hub: the listener only appends)
and the writer task hands batches to ``write`` (the service's transaction:
``tally_events`` rows, the ``tally_state`` upsert and the cluster
``NOTIFY``). While the database is away the queue holds the changes, in
order, up to ``queue_max`` (``database.write_queue_max``; beyond it the
oldest is dropped, counted in ``returnfeed_tally_writes_dropped`` and
logged), and the writer retries the same batch once the database is back.

    TallyState ──listener──▶ on_change ──▶ pending (bounded deque)
                                              │ wake
                                              ▼
                              writer task: write(batch) ──▶ PostgreSQL

The persister knows nothing of the service that made it: it is given the
database (for its availability), the ``write`` coroutine and a ``snapshot``
callable, and owns its writer task (:meth:`start`, :meth:`close`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable


from tally.state import TallyChange

from .db import refused_by_database
from .log import event
from .tasks import cancel_and_wait

log = logging.getLogger("returnfeed.tally")

#: Tries of one batch while the database answers the probe but the write
#: keeps failing for a reason that is not the row itself.
PERSIST_ATTEMPTS = 20
#: Seconds ``close`` waits for the writer to drain before cancelling it.
CLOSE_TIMEOUT = 5.0

Batch = list[tuple[TallyChange, dict[str, Any]]]


@dataclass(slots=True)
class TallyPersister:
    """The write queue of one production (see the module docstring)."""

    #: Anything with ``available`` and ``wait_available()`` (:class:`server.db.Database`).
    db: Any
    production_id: int
    queue_max: int
    #: Stores one batch of (change, state snapshot after it), oldest first.
    write: Callable[[Batch], Awaitable[None]]
    #: The production's complete state now (stored with each change).
    snapshot: Callable[[], dict[str, Any]]
    pending: deque = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    writer: asyncio.Task | None = None
    dropped: int = 0
    deferred: int = 0
    failed: int = 0
    closed: bool = False

    def on_change(self, change: TallyChange) -> None:
        """State listener: queue for the writer, never await (hub runs first)."""
        if change.origin == "peer":
            return  # another node wrote it already
        self.pending.append((change, self.snapshot()))
        self._trim()
        self.wake.set()

    def _trim(self) -> None:
        limit = self.queue_max
        if len(self.pending) > limit:
            n = len(self.pending) - limit
            for _ in range(n):
                self.pending.popleft()
            self.dropped += n
            event(log, logging.ERROR, "tally.writes_dropped", production=self.production_id, dropped=n,
                  total_dropped=self.dropped, queue_max=limit)

    def start(self) -> None:
        if self.writer is None:
            self.writer = asyncio.get_running_loop().create_task(
                self.write_loop(), name=f"tally-writer-{self.production_id}")

    async def write_loop(self) -> None:
        db = self.db
        attempts = 0  # of the batch at the head of the queue, while the database seems up
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.pending:
                batch = list(self.pending)[:500]
                for _ in batch:
                    self.pending.popleft()
                try:
                    await self.write(batch)
                    attempts = 0
                except Exception as exc:
                    attempts += 1
                    if refused_by_database(exc) or attempts > PERSIST_ATTEMPTS:
                        # A row the database refuses would block the queue
                        # forever; later writes carry the latest state.
                        event(log, logging.ERROR, "tally.persist_failed", production=self.production_id,
                              error=f"{type(exc).__name__}: {exc}", changes=len(batch), attempts=attempts)
                        self.failed += len(batch)
                        attempts = 0
                        continue
                    # Put the batch back in front, in order, and retry once
                    # the supervisor sees the database again.
                    self.pending.extendleft(reversed(batch))
                    self._trim()
                    self.deferred += 1
                    if self.closed:
                        event(log, logging.ERROR, "tally.writes_lost_at_shutdown", production=self.production_id,
                              changes=len(self.pending))
                        return
                    if db.available:
                        await asyncio.sleep(min(0.25 * attempts, 2.0))  # lost a race with the probe
                    while not db.available and not self.closed:
                        try:
                            await asyncio.wait_for(db.wait_available(), 1.0)
                        except asyncio.TimeoutError:
                            pass
            if self.closed and not self.pending:
                return

    async def close(self) -> None:
        """Let the writer store what is queued (for at most ``CLOSE_TIMEOUT``
        seconds), then cancel it; returns once the task has ended."""
        self.closed = True
        self.wake.set()
        writer, self.writer = self.writer, None
        if writer is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(writer), CLOSE_TIMEOUT)
        except (asyncio.TimeoutError, Exception):
            pass
        await cancel_and_wait(writer)
