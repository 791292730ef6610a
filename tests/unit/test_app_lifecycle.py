"""Services start in order and stop in reverse, each once, through the app
(server.app.Lifecycle on cleanup_ctx); a service whose handlers only end
when it closes them (tally's WebSockets) stops at on_shutdown, before
aiohttp waits for handlers."""

from __future__ import annotations

import pytest
from aiohttp import web

from server.app import Lifecycle, Service


def recording(calls: list[str], name: str, *, holds_handlers: bool = False, fail_start: bool = False) -> Service:
    async def start() -> None:
        calls.append(f"start {name}")
        if fail_start:
            raise RuntimeError(f"{name} cannot start")

    async def stop() -> None:
        calls.append(f"stop {name}")

    return Service(name, start, stop, holds_handlers=holds_handlers)


def app_with(calls: list[str], *services: Service) -> web.Application:
    app = web.Application()
    Lifecycle(services).install(app)

    async def shutdown_mark(app: web.Application) -> None:
        calls.append("on_shutdown done")

    app.on_shutdown.append(shutdown_mark)
    return app


async def test_start_in_order_stop_in_reverse_once():
    calls: list[str] = []
    app = app_with(calls, recording(calls, "purge"), recording(calls, "media"),
                   recording(calls, "tally", holds_handlers=True))
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    assert calls == ["start purge", "start media", "start tally"]
    await runner.cleanup()
    assert calls[3:] == ["stop tally", "on_shutdown done", "stop media", "stop purge"]
    await runner.cleanup()  # a second cleanup stops nothing again
    assert len(calls) == 7


async def test_a_failed_start_stops_what_started():
    calls: list[str] = []
    app = app_with(calls, recording(calls, "purge"), recording(calls, "media", fail_start=True),
                   recording(calls, "tally", holds_handlers=True))
    runner = web.AppRunner(app, handle_signals=False)
    with pytest.raises(RuntimeError, match="media cannot start"):
        await runner.setup()
    await runner.cleanup()
    assert calls == ["start purge", "start media", "stop purge"]


async def test_a_handler_holder_below_a_plain_service_waits_for_cleanup():
    # Reverse order wins: nothing stops before the service started after it.
    calls: list[str] = []
    app = app_with(calls, recording(calls, "tally", holds_handlers=True), recording(calls, "media"))
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    await runner.cleanup()
    assert calls == ["start tally", "start media", "on_shutdown done", "stop media", "stop tally"]
