"""One bounded, batched, retrying writer: what the live path owes PostgreSQL.

Producers on the event loop call :meth:`BatchWriter.put` (never awaits,
never blocks); one task hands batches, oldest first, to the owner's
``write`` coroutine (one transaction). While the database is away the queue
holds the items in order — an outage only delays storage — and the writer
retries the same batch once the database supervisor sees it again. Beyond
``queue_max`` the oldest item is dropped, counted and logged::

    producer ──put()──▶ pending (bounded deque) ──wake──▶ writer task
                                                             │ write(batch)
                                   on_written(batch, result) ◀┘ PostgreSQL

A batch the database refuses for its content (:func:`server.db.refused_by_database`)
or that keeps failing while the database answers (``attempts`` tries) is
logged and skipped, so one bad row never blocks what comes after it.

The writer knows nothing of what it stores: captions, QC markers and tally
changes differ only in ``write`` and in what happens after a commit.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any, Awaitable, Callable, Generic, TypeVar

from .db import refused_by_database
from .log import event
from .tasks import cancel_and_wait

T = TypeVar("T")

#: Items handed to ``write`` in one call (one transaction).
BATCH_MAX = 200
#: Tries of one batch while the database answers but the write keeps failing.
ATTEMPTS = 20
#: Seconds :meth:`BatchWriter.close` lets the writer drain before cancelling it.
CLOSE_TIMEOUT = 5.0


class BatchWriter(Generic[T]):
    """See the module docstring. ``db`` is anything with ``available`` and
    ``wait_available()`` (:class:`server.db.Database`); ``name`` prefixes the
    log events (``{name}.writes_dropped`` …, or ``log_prefix``) and names the
    task (``{name}-writer``, or ``task_name``)."""

    def __init__(self, db: Any, write: Callable[[list[T]], Awaitable[Any]], *, name: str, queue_max: int,
                 logger: logging.Logger, batch_max: int = BATCH_MAX, attempts: int = ATTEMPTS,
                 on_written: Callable[[list[T], Any], None] | None = None,
                 log_fields: dict[str, Any] | None = None, task_name: str | None = None,
                 log_prefix: str | None = None) -> None:
        if queue_max < 1 or batch_max < 1:
            raise ValueError("queue_max and batch_max must be at least 1")
        self.db = db
        self.write = write
        self.name = name
        self.queue_max = queue_max
        self.log = logger
        self.batch_max = batch_max
        self.attempts = attempts
        self.on_written = on_written
        #: Added to every log event (which production's queue, …).
        self.log_fields = dict(log_fields or {})
        self.task_name = task_name or f"{name}-writer"
        #: Log event names: ``{prefix}writes_dropped``, ``{prefix}persist_failed`` …
        self.prefix = f"{name}." if log_prefix is None else log_prefix
        self.pending: deque[T] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closing = False
        # Totals for /metrics and the tests (only ever go up).
        self.stored = 0
        self.dropped = 0
        self.failed = 0
        self.deferred = 0

    def __len__(self) -> int:
        return len(self.pending)

    @property
    def task(self) -> asyncio.Task | None:
        """The writer task while started (None before start and after close)."""
        return self._task

    def put(self, item: T) -> None:
        self.pending.append(item)
        self._trim()
        self._wake.set()

    def _trim(self) -> None:
        n = len(self.pending) - self.queue_max
        if n > 0:
            for _ in range(n):
                self.pending.popleft()
            self.dropped += n
            event(self.log, logging.ERROR, f"{self.prefix}writes_dropped", **self.log_fields, dropped=n,
                  total_dropped=self.dropped, queue_max=self.queue_max)

    def start(self) -> None:
        self._closing = False
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self.task_name)

    async def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Let the writer store what is queued for at most ``timeout``
        seconds, then end it; what is left is logged as lost."""
        self._closing = True
        self._wake.set()
        task, self._task = self._task, None
        if task is None:
            return
        if not task.done():
            await asyncio.wait({task}, timeout=timeout)
        await cancel_and_wait(task)
        if self.pending:
            event(self.log, logging.ERROR, f"{self.prefix}writes_lost_at_shutdown", **self.log_fields,
                  writes=len(self.pending))

    async def _run(self) -> None:
        db = self.db
        attempts = 0  # of the batch at the head of the queue, while the database seems up
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.pending:
                batch = [self.pending.popleft() for _ in range(min(self.batch_max, len(self.pending)))]
                try:
                    result = await self.write(batch)
                except Exception as exc:
                    attempts += 1
                    if refused_by_database(exc) or attempts > self.attempts:
                        event(self.log, logging.ERROR, f"{self.prefix}persist_failed", **self.log_fields,
                              error=f"{type(exc).__name__}: {exc}", writes=len(batch), attempts=attempts)
                        self.failed += len(batch)
                        attempts = 0
                        continue
                    # Back in front, in order (newer items may have pushed
                    # the oldest out meanwhile); wait for the database.
                    self.pending.extendleft(reversed(batch))
                    self._trim()
                    self.deferred += 1
                    if self._closing:
                        return
                    if db.available:
                        await asyncio.sleep(min(0.25 * attempts, 2.0))  # lost a race with the probe
                    while not db.available and not self._closing:
                        try:
                            await asyncio.wait_for(db.wait_available(), 1.0)
                        except asyncio.TimeoutError:
                            pass
                    continue
                attempts = 0
                self.stored += len(batch)
                if self.on_written is not None:
                    try:
                        self.on_written(batch, result)
                    except Exception:  # the owner's bug must not stop storage
                        event(self.log, logging.ERROR, f"{self.prefix}on_written_failed", exc_info=True,
                              **self.log_fields)
            if self._closing and not self.pending:
                return
