"""What every switcher client (vMix, OBS) shares: the reconnecting session shell.

A client owns one task that keeps a session to the switcher, reconnecting
with capped exponential backoff (``backoff_initial`` doubling up to
``backoff_max``). ``synced`` is true while connected and the state has been
reported; whenever the link goes, ``_lost()`` declares the client's
authority lost, so its sources turn ``unknown`` (never a stale red). The
subclass supplies ``_run()`` (the reconnect loop with its own error
handling) and ``_task_name``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from tally.errors import ConfigError
from tally.state import TallyState


class ReconnectingClient:
    _task_name = "switcher"

    def __init__(self, state: TallyState, authority: str, *, backoff_initial: float, backoff_max: float,
                 clock: Callable[[], float]) -> None:
        if backoff_initial <= 0 or backoff_max < backoff_initial:
            raise ConfigError("need 0 < backoff_initial <= backoff_max")
        self.state = state
        self.authority = authority
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._synced = asyncio.Event()
        self._closing = False

    @property
    def synced(self) -> bool:
        """True while connected and the state has been reported."""
        return self._synced.is_set()

    async def wait_synced(self) -> None:
        await self._synced.wait()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self._task_name)

    async def close(self) -> None:
        self._closing = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._lost()

    def _lost(self) -> None:
        self._synced.clear()
        self.state.authority_lost(self.authority, now=self._clock())

    async def _run(self) -> None:  # pragma: no cover - every subclass defines it
        raise TypeError(f"{type(self).__name__} must define _run()")
