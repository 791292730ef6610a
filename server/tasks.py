"""Stopping a background task for certain.

``task.cancel(); await task`` waits forever when the cancellation is lost.
On Python 3.11 ``asyncio.wait_for`` — which asyncpg's statement timeouts use
— can swallow a cancellation that arrives just as the inner call completes
(CPython gh-86296, fixed in 3.12): the task then carries on into its next
step, often a long sleep, and whoever stops it (a shutdown) waits that long.
"""

from __future__ import annotations

import asyncio

__all__ = ["cancel_and_wait"]


async def cancel_and_wait(task: asyncio.Task | None, *, retry_s: float = 1.0) -> None:
    """Cancel ``task`` and return once it has ended, cancelling it again
    every ``retry_s`` while it runs on. Its result or exception is consumed
    (its owner logs failures where they happen)."""
    if task is None:
        return
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=retry_s)
    if not task.cancelled():
        task.exception()  # retrieved: no "exception was never retrieved" at exit
