"""One bad tally configuration must not brick a production (issue 9, item 16).

A PUT is validated completely (and checked against the production's
streams) before anything is stored; a configuration that is stored anyway
(from before these checks, or by hand) is loaded as far as it can be: the
unusable adapter is reported as failed and every tally route keeps working,
so it can be repaired through the API.
"""

from __future__ import annotations

import asyncio
import json

import asyncpg
import pytest
import websockets

from helpers import http, login

pytestmark = pytest.mark.integration

GOOD = {"sources": {"vt": {"label": "VT"}},
        "adapters": [{"type": "tsl_out", "version": 5, "transport": "udp", "host": "127.0.0.1", "port": 9,
                      "addresses": {"cam1": 1}}]}
BAD_PUTS = [
    {"adapters": [{"type": "vmix", "host": "127.0.0.1", "port": None}]},
    {"adapters": [{"type": "vmix", "host": "127.0.0.1", "port": 99999}]},
    {"adapters": [{"type": "tsl_in", "port": 9800, "addresses": []}]},
    {"adapters": [{"type": "tsl_out", "host": "127.0.0.1", "port": 9801, "addresses": [1, 2]}]},
    {"adapters": [{"type": "tsl_out", "host": "127.0.0.1", "port": 9801, "addresses": {"nosuch": 1}}]},
    {"adapters": [{"type": "tsl_out", "version": 3, "host": "127.0.0.1", "port": 9801, "addresses": {"cam1": 500}}]},
    {"adapters": [{"type": "tsl_in", "port": 9800, "addresses": {"1": "cam1"}}]},  # cam1 is the director's
    {"adapters": [{"type": "tsl_in", "port": 0}]},
    {"adapters": [{"type": "obs", "url": "http://x", "password": 5}]},
    {"adapters": [{"type": "vmix", "host": "127.0.0.1", "prot": 8099}]},
]


def _setup(base: str, admin: str, name: str) -> int:
    r = http("POST", f"{base}/api/v1/productions", {"name": name}, token=admin)
    assert r.status == 201, r.body
    pid = r.json()["id"]
    assert http("POST", f"{base}/api/v1/streams", {"name": f"cam1-{pid}", "production": pid},
                token=admin).status == 201
    return pid


def test_unusable_config_is_refused_and_not_stored(api_server) -> None:
    base = api_server.url
    admin = login(base, "admin", api_server.admin_password)["access_token"]
    pid = _setup(base, admin, "Guarded show")
    url = f"{base}/api/v1/productions/{pid}/tally/config"
    good = json.loads(json.dumps(GOOD).replace('"cam1"', f'"cam1-{pid}"'))
    r = http("PUT", url, good, token=admin)
    assert r.status == 200, r.body
    for bad in BAD_PUTS:
        bad = json.loads(json.dumps(bad).replace('"cam1"', f'"cam1-{pid}"'))
        r = http("PUT", url, bad, token=admin)
        assert r.status == 400 and r.json()["error"] == "bad_request", (bad, r.status, r.body)
        stored = http("GET", url, token=admin)
        assert stored.status == 200 and stored.json()["adapters"] == good["adapters"], bad
        assert http("GET", f"{base}/api/v1/productions/{pid}/tally", token=admin).status == 200


def test_stored_unusable_config_does_not_brick_tally(api_server, module_db_url) -> None:
    base = api_server.url
    admin = login(base, "admin", api_server.admin_password)["access_token"]
    pid = _setup(base, admin, "Bricked show")
    stream = f"cam1-{pid}"
    stored = {"sources": {"vt": {"label": "VT"}, "bad src": {"label": 5}},
              "adapters": [{"type": "vmix", "host": "127.0.0.1", "port": None},
                           {"type": "tsl_in", "port": 9800, "addresses": []},
                           {"type": "tsl_out", "host": "127.0.0.1", "port": 9801, "addresses": [1, 2]},
                           {"type": "tsl_out", "host": "127.0.0.1", "port": 9, "addresses": {stream: 1}}]}

    async def store() -> None:
        conn = await asyncpg.connect(module_db_url)
        try:
            await conn.execute("UPDATE productions SET settings = jsonb_set(settings, '{tally}', $2::jsonb) "
                               "WHERE id = $1", pid, json.dumps(stored))
        finally:
            await conn.close()

    asyncio.run(store())
    r = http("GET", f"{base}/api/v1/productions/{pid}/tally", token=admin)
    assert r.status == 200, r.body
    snap = r.json()
    assert {"vt", stream} <= set(snap["sources"]) and "bad src" not in snap["sources"]
    failed = [a for a in snap["adapters"] if a.get("error")]
    assert [a["type"] for a in failed] == ["vmix", "tsl_in", "tsl_out"]
    assert [a["type"] for a in snap["adapters"] if not a.get("error")] == ["tsl_out"]
    assert any("bad src" in e.get("source", "") for e in snap["config_errors"])

    r = http("POST", f"{base}/api/v1/productions/{pid}/tally", {"type": "cut", "source": stream}, token=admin)
    assert r.status == 200 and r.json()["program"] == stream
    assert http("GET", f"{base}/api/v1/productions/{pid}/tally/config", token=admin).status == 200
    assert http("GET", f"{base}/api/v1/productions/{pid}/tally/events", token=admin).status == 200

    async def ws() -> dict:
        url = base.replace("http://", "ws://") + f"/ws/tally?production={pid}"
        async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {admin}"}) as conn:
            return json.loads(await asyncio.wait_for(conn.recv(), 5))

    assert asyncio.run(ws())["type"] == "snapshot"
    # Repaired through the API: the failures are gone.
    r = http("PUT", f"{base}/api/v1/productions/{pid}/tally/config", {"sources": {"vt": {"label": "VT"}}},
             token=admin)
    assert r.status == 200, r.body
    assert not any(a.get("error") for a in r.json()["adapters"]) and "config_errors" not in r.json()
