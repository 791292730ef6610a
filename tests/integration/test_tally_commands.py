"""One tally command path: the REST route and the WebSocket parse a command
with ``tally.protocol`` and apply it through ``TallyHub.command``, so a
command is refused the same way on both, and a REST cut reaches WebSocket
clients with the hub's own flush. Also: jsonb columns hold JSON objects
(the pool's codec encodes them once, never a JSON string inside jsonb)."""

from __future__ import annotations

import asyncio
import json
import time

import asyncpg
import pytest
import websockets

from helpers import http, login, recv_json

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def env(api_server):
    base = api_server.url
    admin = login(base, "admin", api_server.admin_password)["access_token"]
    prod = http("POST", f"{base}/api/v1/productions", {"name": "Command show"}, token=admin).json()
    for n in ("cmd1", "cmd2"):
        r = http("POST", f"{base}/api/v1/streams", {"name": n, "production": prod["id"], "settings": {"k": n}},
                 token=admin)
        assert r.status == 201
    ws_url = base.replace("http://", "ws://") + f"/ws/tally?production={prod['id']}&token={admin}"
    return {"base": base, "admin": admin, "pid": prod["id"], "ws": ws_url}


#: Malformed commands (the protocol's 400s) and refused ones (the state's 409s).
BAD_COMMANDS = [
    ({"type": "explode"}, 400, "unknown_type"),
    ({"type": "cut"}, 400, "bad_field"),
    ({"type": "cut", "source": 7}, 400, "bad_field"),
    ({"type": "preview", "source": ""}, 400, "bad_field"),
    ({"type": "take", "duration": "soon"}, 400, "bad_field"),
    ({"type": "take", "duration": True}, 400, "bad_field"),
    ({"type": "cut", "source": "cmd1", "extra": 1}, 400, "bad_field"),
    ({"type": "cut", "source": "nope"}, 409, "unknown_source"),
    ({"type": "take"}, 409, "no_preview"),  # a fresh production has nothing on preview
]


def test_rest_refuses_a_command_as_the_websocket_does(env) -> None:
    async def ws_errors() -> list[dict]:
        out = []
        async with websockets.connect(env["ws"]) as ws:
            await recv_json(ws, ("snapshot",))
            for i, (cmd, _, _) in enumerate(BAD_COMMANDS):
                await ws.send(json.dumps({**cmd, "id": i}))
                out.append(await recv_json(ws, ("error",)))
        return out

    over_ws = asyncio.run(ws_errors())
    for (cmd, status, code), ws_error in zip(BAD_COMMANDS, over_ws, strict=True):
        r = http("POST", f"{env['base']}/api/v1/productions/{env['pid']}/tally", cmd, token=env["admin"])
        body = r.json()
        assert (r.status, body["code"]) == (status, code), (cmd, r.status, body)
        assert body["error"] == ("bad_request" if status == 400 else "conflict")
        # The very same refusal: code and sentence.
        assert (ws_error["code"], ws_error["detail"]) == (body["code"], body["detail"]), cmd


def test_rest_refuses_heartbeats_as_commands(env) -> None:
    for kind in ("ping", "pong"):
        r = http("POST", f"{env['base']}/api/v1/productions/{env['pid']}/tally", {"type": kind}, token=env["admin"])
        assert r.status == 400 and r.json()["code"] == "unknown_type", kind


def test_rest_cut_reaches_websocket_clients(env) -> None:
    async def run() -> None:
        async with websockets.connect(env["ws"]) as ws:
            snap = await recv_json(ws, ("snapshot",))
            target = "cmd2" if snap["sources"]["cmd2"]["state"] != "program" else "cmd1"
            r = await asyncio.to_thread(http, "POST", f"{env['base']}/api/v1/productions/{env['pid']}/tally",
                                        {"type": "cut", "source": target}, token=env["admin"])
            assert r.status == 200
            rest = r.json()
            assert rest["sources"][target]["state"] == "program" and rest["program"] == target
            delta = await recv_json(ws, ("tally",))
            assert delta["seq"] == rest["seq"] and delta["sources"][target]["state"] == "program"

    asyncio.run(run())


def test_jsonb_columns_hold_objects(env, module_db_url) -> None:
    base, pid, admin = env["base"], env["pid"], env["admin"]
    cfg = {"transition_s": 0.5, "sources": {"vt": {"label": "VT"}}, "adapters": []}
    assert http("PUT", f"{base}/api/v1/productions/{pid}/tally/config", cfg, token=admin).status == 200
    assert http("POST", f"{base}/api/v1/productions/{pid}/tally", {"type": "cut", "source": "vt"},
                token=admin).status == 200
    deadline = time.monotonic() + 10
    while True:  # the writer stores the change shortly after the answer
        events = http("GET", f"{base}/api/v1/productions/{pid}/tally/events?limit=1", token=admin).json()["events"]
        if events and "vt" in events[0]["changes"]:
            break
        assert time.monotonic() < deadline, events
        time.sleep(0.05)
    assert isinstance(events[0]["changes"], dict)
    assert http("GET", f"{base}/api/v1/productions/{pid}/tally/config", token=admin).json()["transition_s"] == 0.5

    async def types() -> dict[str, set[str]]:
        conn = await asyncpg.connect(module_db_url)
        try:
            out = {}
            for name, sql in {
                "productions.settings": "SELECT jsonb_typeof(settings) FROM productions",
                "productions.settings.tally": "SELECT jsonb_typeof(settings -> 'tally') FROM productions "
                                              "WHERE settings ? 'tally'",
                "streams.settings": "SELECT jsonb_typeof(settings) FROM streams",
                "tally_events.changes": "SELECT jsonb_typeof(changes) FROM tally_events",
                "tally_state.state": "SELECT jsonb_typeof(state) FROM tally_state",
                "audit_log.detail": "SELECT jsonb_typeof(detail) FROM audit_log",
            }.items():
                out[name] = {r[0] for r in await conn.fetch(sql)}
            return out
        finally:
            await conn.close()

    found = asyncio.run(types())
    assert found == {name: {"object"} for name in found}, found
