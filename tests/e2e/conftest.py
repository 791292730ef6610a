"""Browser fixtures: the system Chromium driven by Playwright (sync API), and
a scripted peer for the pages' client-side protocol logic.

``browser``: one Chromium per test module (fake camera/microphone, autoplay
allowed, real host candidates for WebRTC on loopback).

``scripted``: an aiohttp app in a thread that serves the real pages
(``server.pages.setup`` + ``web/`` under ``/static/``) next to a scripted
``/ws/tally`` that speaks tally/protocol.py and can be told to go silent
(heartbeat stopped, socket left open), a ``/whep/{stream}`` that always
answers 409 + ``Retry-After``, a ``/whip/{stream}`` that keeps the offer,
a ``/ws/events`` that sends a snapshot and pings and can go silent on its
own, and the few API reads the camera and watch pages make. It tests what the browser does with the protocol — timing of
"tally lost", sequence numbers, reconnects, Retry-After — independently of
the server's implementation; the real server is exercised in test_pages.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from helpers import LoopThread

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
    "--autoplay-policy=no-user-gesture-required", "--disable-features=WebRtcHideLocalIpsWithMdns",
]


@pytest.fixture(scope="module")
def e2e_db_url(module_db_url: str) -> str:
    """A fresh database for one test module: tests/conftest.py's, which
    creates and drops it off the main thread (the browser's loop runs there)."""
    return module_db_url


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Chromium for one test module. Module scope on purpose: while the sync
    API is open it keeps an event loop running in the main thread, which
    would break ``asyncio.run`` in other modules' tests and fixtures."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


class ScriptedBackend(LoopThread):
    """Pages + a scripted tally/WHEP peer on one origin (see module docstring)."""

    PRODUCTION = 7
    start_timeout = 15.0

    def __init__(self) -> None:
        super().__init__()
        self.sockets: list[Any] = []
        self.received: list[tuple[float, dict[str, Any]]] = []
        self.connections: list[dict[str, str]] = []
        self.whep_posts: list[tuple[float, str]] = []
        self.whep_queries: list[tuple[str, dict[str, str]]] = []  # (stream, query) per POST
        self.whip_offers: list[tuple[str, str, str]] = []  # (stream, bearer, sdp)
        self.silent = False
        self.snapshot_sources: dict[str, Any] = {}
        self.seq = 1
        self.retry_after = 1
        self._runner: Any = None
        self.event_sockets: list[Any] = []
        self.events_connections: list[dict[str, str]] = []
        self.events_received: list[tuple[float, dict[str, Any]]] = []
        self.events_silent = False

    # -- lifecycle ---------------------------------------------------------
    async def _stop(self) -> None:
        for ws in list(self.sockets) + list(self.event_sockets):
            await ws.close()
        await self._runner.cleanup()

    async def _start(self) -> None:
        from aiohttp import web

        from server import pages

        app = web.Application()
        pages.setup(app)
        app.router.add_static("/static/", ROOT / "web")
        app.router.add_get("/api/v1/auth/me", self._me)
        app.router.add_get("/api/v1/streams", self._streams)
        app.router.add_get("/api/v1/streams/{name}", self._stream)
        app.router.add_post("/whep/{stream}", self._whep)
        app.router.add_post("/whip/{stream}", self._whip)
        app.router.add_get("/ws/tally", self._tally)
        app.router.add_get("/ws/events", self._events)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self.loop.create_task(self._heartbeat())

    # -- handlers ----------------------------------------------------------
    @staticmethod
    def _token(request: Any) -> str:
        auth = request.headers.get("Authorization", "")
        return auth.removeprefix("Bearer ").strip() or request.query.get("token", "")

    async def _me(self, request: Any) -> Any:
        from aiohttp import web

        token = self._token(request)
        if not token.startswith("link-"):
            return web.json_response({"error": "unauthorized", "detail": "bad token"}, status=401)
        return web.json_response({"kind": "link", "role": "camera", "stream": token.removeprefix("link-"),
                                  "action": "publish", "production_id": self.PRODUCTION, "expires_at": 2**31})

    async def _streams(self, request: Any) -> Any:
        from aiohttp import web

        name = self._token(request).removeprefix("link-")
        return web.json_response({"streams": [self._stream_json(name)]})

    async def _stream(self, request: Any) -> Any:
        from aiohttp import web

        return web.json_response(self._stream_json(request.match_info["name"]))

    def _stream_json(self, name: str) -> dict[str, Any]:
        return {"name": name, "label": f"{name.upper()} scripted", "live": False, "state": "offline",
                "production": {"id": self.PRODUCTION, "name": "Scripted"}, "tracks": [], "layers": []}

    async def _whep(self, request: Any) -> Any:
        from aiohttp import web

        self.whep_posts.append((time.monotonic(), request.match_info["stream"]))
        self.whep_queries.append((request.match_info["stream"], dict(request.query)))
        return web.json_response({"error": "conflict", "detail": "stream is not live"}, status=409,
                                 headers={"Retry-After": str(self.retry_after)})

    async def _whip(self, request: Any) -> Any:
        from aiohttp import web

        self.whip_offers.append((request.match_info["stream"], self._token(request), await request.text()))
        return web.json_response({"error": "conflict", "detail": "try later"}, status=409,
                                 headers={"Retry-After": "30"})

    async def _tally(self, request: Any) -> Any:
        from aiohttp import WSMsgType, web

        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.connections.append(dict(request.query))
        self.sockets.append(ws)
        if not self.silent:
            await ws.send_str(json.dumps({"type": "snapshot", "seq": self.seq, "production": "Scripted",
                                          "sources": self.snapshot_sources}))
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                data = json.loads(msg.data)
                self.received.append((time.monotonic(), data))
                if data.get("type") == "ping" and not self.silent:
                    await ws.send_str('{"type":"pong"}')
        finally:
            if ws in self.sockets:
                self.sockets.remove(ws)
        return ws

    async def _events(self, request: Any) -> Any:
        from aiohttp import WSMsgType, web

        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.events_connections.append(dict(request.query))
        self.event_sockets.append(ws)
        await ws.send_str(json.dumps({"type": "snapshot", "markers": [], "taps": {}}))
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    self.events_received.append((time.monotonic(), json.loads(msg.data)))
        finally:
            if ws in self.event_sockets:
                self.event_sockets.remove(ws)
        return ws

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(1)
            for sockets, silent in ((self.sockets, self.silent), (self.event_sockets, self.events_silent)):
                if silent:
                    continue
                for ws in list(sockets):
                    if not ws.closed:
                        await ws.send_str('{"type":"ping"}')

    # -- test controls (call from the test thread) ----------------------------
    def set_source(self, name: str, state: str, seq: int | None = None) -> None:
        """Change a source and send the delta (with ``seq``, default next)."""
        src = {"state": state, "buses": [state] if state in ("program", "preview") else [], "aux": False,
               "label": name, "authority": "director"}
        if seq is None:
            self.seq += 1
            seq = self.seq
            self.snapshot_sources[name] = src
        self.call(self._broadcast, json.dumps({"type": "tally", "seq": seq, "sources": {name: src}}))

    async def _broadcast(self, text: str) -> None:
        for ws in list(self.sockets):
            if not ws.closed:
                await ws.send_str(text)

    def set_silent(self, silent: bool) -> None:
        self.silent = silent


@pytest.fixture
def scripted() -> Iterator[ScriptedBackend]:
    backend = ScriptedBackend().start()
    try:
        yield backend
    finally:
        backend.stop()
