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
callable, and owns its writer task (:meth:`start`, :meth:`close`). The
queue and the writer are :class:`server.batch_writer.BatchWriter`, the one
the captions and QC markers use too.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from tally.state import TallyChange

from .batch_writer import BatchWriter

log = logging.getLogger("returnfeed.tally")

#: Tries of one batch while the database answers the probe but the write
#: keeps failing for a reason that is not the row itself.
PERSIST_ATTEMPTS = 20
#: Seconds ``close`` waits for the writer to drain before cancelling it.
CLOSE_TIMEOUT = 5.0
#: Changes handed to ``write`` in one call.
BATCH_MAX = 500

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
    queue: BatchWriter = field(init=False)

    def __post_init__(self) -> None:
        # Log events keep their names: tally.writes_dropped, tally.persist_failed, …
        self.queue = BatchWriter(self.db, self.write, name="tally", queue_max=self.queue_max, logger=log,
                                 batch_max=BATCH_MAX, attempts=PERSIST_ATTEMPTS,
                                 log_fields={"production": self.production_id},
                                 task_name=f"tally-writer-{self.production_id}")

    def on_change(self, change: TallyChange) -> None:
        """State listener: queue for the writer, never await (hub runs first)."""
        if change.origin == "peer":
            return  # another node wrote it already
        self.queue.put((change, self.snapshot()))

    @property
    def pending(self) -> deque:
        return self.queue.pending

    @property
    def dropped(self) -> int:
        return self.queue.dropped

    @property
    def deferred(self) -> int:
        return self.queue.deferred

    @property
    def failed(self) -> int:
        return self.queue.failed

    @property
    def writer(self) -> Any:
        """The writer task while started."""
        return self.queue.task

    def start(self) -> None:
        self.queue.start()

    async def close(self) -> None:
        """Let the writer store what is queued (for at most ``CLOSE_TIMEOUT``
        seconds), then cancel it; returns once the task has ended."""
        await self.queue.close(CLOSE_TIMEOUT)
