"""cancel_and_wait stops a task whose first cancellation was lost."""

from __future__ import annotations

import asyncio

from server.tasks import cancel_and_wait


def test_a_swallowed_cancellation_is_repeated() -> None:
    async def run() -> tuple[bool, float]:
        started = asyncio.Event()

        async def stubborn() -> None:
            # What Python 3.11's wait_for can do to a cancellation that meets
            # a completing statement: it is lost, and the loop goes on to sleep.
            try:
                started.set()
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                pass
            await asyncio.sleep(3600)

        task = asyncio.get_running_loop().create_task(stubborn())
        await started.wait()
        t0 = asyncio.get_running_loop().time()
        await asyncio.wait_for(cancel_and_wait(task, retry_s=0.05), 5)
        return task.cancelled(), asyncio.get_running_loop().time() - t0

    cancelled, waited = asyncio.run(run())
    assert cancelled and waited < 1.0


def test_finished_failed_and_missing_tasks() -> None:
    async def run() -> None:
        async def boom() -> None:
            raise RuntimeError("x")

        failed = asyncio.get_running_loop().create_task(boom())
        await asyncio.sleep(0)
        await cancel_and_wait(failed)  # its exception is consumed, not raised
        await cancel_and_wait(None)

    asyncio.run(run())
