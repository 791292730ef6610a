"""Smoke test of the tally load generator's bare WebSocket client against a
real aiohttp server around TallyHub (same process, few clients)."""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys

from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer

from tally.hub import TallyHub, aiohttp_sink
from tally.state import SourceConfig, TallyState

SWARM_PATH = pathlib.Path(__file__).resolve().parents[2] / "loadtests" / "tally_swarm.py"
_spec = importlib.util.spec_from_file_location("loadtests_tally_swarm", SWARM_PATH)
assert _spec is not None and _spec.loader is not None
tally_swarm = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = tally_swarm  # dataclasses resolve annotations through it
_spec.loader.exec_module(tally_swarm)


def make_app(hub: TallyHub, seen_auth: list[str]) -> web.Application:
    async def handler(request: web.Request) -> web.WebSocketResponse:
        seen_auth.append(request.headers.get("Authorization", ""))
        ws = web.WebSocketResponse(compress=False)
        await ws.prepare(request)
        client = hub.connect(aiohttp_sink(ws), director=request.query.get("role") == "director")
        try:
            async for msg in ws:
                if msg.type is WSMsgType.TEXT:
                    hub.receive(client, msg.data)
        finally:
            hub.disconnect(client)
        return ws

    app = web.Application()
    app.router.add_get("/ws/tally", handler)
    return app


def test_masked_frame_round_trip():
    frame = tally_swarm.masked_frame('{"type":"ping"}', key=b"\x01\x02\x03\x04")
    assert frame[0] == 0x81 and frame[1] == 0x80 | 15 and frame[2:6] == b"\x01\x02\x03\x04"
    payload = bytes(b ^ frame[2 + (i & 3)] for i, b in enumerate(frame[6:]))
    assert payload == b'{"type":"ping"}'
    assert tally_swarm.pct([3.0, 1.0, 2.0], 50) == 2.0


async def test_swarm_measures_every_client():
    state = TallyState("p", [SourceConfig("cam1"), SourceConfig("cam2")])
    hub = TallyHub(state)
    hub.start()
    seen: list[str] = []
    async with TestServer(make_app(hub, seen)) as server:
        args = argparse.Namespace(
            token="viewer-token", director_token="director-token", token_in_query=False,
            director_query=True, source=["cam1", "cam2"], clients=20, rounds=5, warmup=1,
            gap=0.005, settle=0.01, round_timeout=2.0, connect_concurrency=8, insecure=False,
        )
        url = str(server.make_url("/ws/tally")).replace("http://", "ws://")
        result = await tally_swarm.run_swarm(args, url)
    hub.close()
    assert result["missing"] == 0 and result["server_closes"] == []
    assert result["per_client_ms"]["p50"] > 0
    assert result["all_clients_ms"]["max"] >= result["per_client_ms"]["p50"]
    assert seen.count("Bearer director-token") == 1 and seen.count("Bearer viewer-token") == 20
    assert state.seq == 6  # warmup + rounds cuts, each applied
