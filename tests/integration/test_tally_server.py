"""Tally through real server processes: WebSocket contract, REST, persistence,
switcher adapters wired from the API, and two nodes on one database."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest
import websockets

from helpers import ServerProcess, http, login, metrics_url, recv_json, tally_ws_url

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def env(api_server):
    base = api_server.url
    admin = login(base, "admin", api_server.admin_password)["access_token"]
    r = http("POST", f"{base}/api/v1/productions", {"name": "Tally show"}, token=admin)
    prod = r.json()
    for n in ("cam1", "cam2", "cam3"):
        assert http("POST", f"{base}/api/v1/streams", {"name": n, "production": prod["id"]}, token=admin).status == 201
    http("POST", f"{base}/api/v1/users", {"username": "camop", "password": "camop-password", "role": "camera"}, token=admin)
    http("PUT", f"{base}/api/v1/productions/{prod['id']}/members/camop", {"role": "camera", "camera_stream": "cam1"},
         token=admin)
    camop = login(base, "camop", "camop-password")["access_token"]
    link = http("POST", f"{base}/api/v1/streams/cam2/links", {"action": "publish"}, token=admin).json()["token"]
    return {"base": base, "admin": admin, "prod": prod, "camop": camop, "link": link}


def test_ws_refusals(env) -> None:
    base = env["base"]

    async def status(url: str, headers=None) -> int:
        try:
            async with websockets.connect(url, additional_headers=headers or {}):
                return 101
        except websockets.InvalidStatus as exc:
            return exc.response.status_code

    async def run():
        assert await status(tally_ws_url(base, f"production={env['prod']['id']}")) == 401
        assert await status(tally_ws_url(base, "token=garbage")) == 401
        assert await status(tally_ws_url(base, f"token={env['admin']}")) == 400  # which production?
        assert await status(tally_ws_url(base, f"token={env['admin']}&production=99999")) == 404

    asyncio.run(run())
    r = http("POST", f"{base}/api/v1/users", {"username": "stranger", "password": "stranger-password", "role": "viewer"},
             token=env["admin"])
    assert r.status == 201
    stranger = login(base, "stranger", "stranger-password")["access_token"]
    assert asyncio.run(status(tally_ws_url(base, f"token={stranger}&production={env['prod']['id']}"))) == 403


def test_snapshot_then_ordered_deltas_and_camera_cannot_cut(env) -> None:
    base, pid = env["base"], env["prod"]["id"]

    async def run():
        async with websockets.connect(tally_ws_url(base, f"token={env['link']}")) as cam, \
                websockets.connect(tally_ws_url(base, f"production={pid}"),
                                   additional_headers={"Authorization": f"Bearer {env['admin']}"}) as director:
            snap = await recv_json(cam)
            # a camera link sees its own camera only
            assert snap["type"] == "snapshot" and set(snap["sources"]) == {"cam2"}
            seq0 = (await recv_json(director))["seq"]
            # a camera link cannot switch: error, nothing changes
            await cam.send(json.dumps({"type": "cut", "source": "cam2", "id": 7}))
            err = await recv_json(cam, ("error",))
            assert err["code"] == "forbidden" and err["id"] == 7
            seqs = []
            cam_states = []
            for cmd, cam2_changes in (({"type": "preview", "source": "cam2"}, True),
                                      ({"type": "cut", "source": "cam1"}, False),
                                      ({"type": "cut", "source": "cam2"}, True)):
                t0 = time.perf_counter()
                await director.send(json.dumps(cmd))
                d = await recv_json(director, ("tally",))
                seqs.append(d["seq"])
                if cam2_changes:
                    c = await recv_json(cam, ("tally",))
                    assert set(c["sources"]) == {"cam2"} and c["seq"] == d["seq"]
                    cam_states.append(c["sources"]["cam2"]["state"])
                assert time.perf_counter() - t0 < 2.0
            assert seqs == sorted(seqs) and seqs[0] > seq0
            assert cam_states == ["preview", "program"]
            state = http("GET", f"{base}/api/v1/productions/{pid}/tally", token=env["camop"]).json()
            assert state["sources"]["cam2"]["state"] == "program"
            assert state["seq"] == seqs[-1]

    asyncio.run(run())


def test_rest_control_and_audit(env) -> None:
    base, pid = env["base"], env["prod"]["id"]
    r = http("POST", f"{base}/api/v1/productions/{pid}/tally", {"type": "cut", "source": "cam3"}, token=env["camop"])
    assert r.status == 403
    r = http("POST", f"{base}/api/v1/productions/{pid}/tally", {"type": "cut", "source": "nope"}, token=env["admin"])
    assert r.status == 409 and r.json()["code"] == "unknown_source"
    r = http("POST", f"{base}/api/v1/productions/{pid}/tally", {"type": "explode"}, token=env["admin"])
    assert r.status == 400
    r = http("POST", f"{base}/api/v1/productions/{pid}/tally", {"type": "cut", "source": "cam3"}, token=env["admin"])
    assert r.status == 200 and r.json()["sources"]["cam3"]["state"] == "program"
    time.sleep(0.5)
    events = http("GET", f"{base}/api/v1/productions/{pid}/tally/events?limit=5", token=env["admin"]).json()["events"]
    assert events[0]["origin"] == "cut" and events[0]["actor"] == "admin" and "cam3" in events[0]["changes"]
    assert http("GET", f"{base}/api/v1/productions/{pid}/tally/events", token=env["camop"]).status == 403


def test_missing_heartbeat_closes_4001(env) -> None:
    """A client that sends no frame at all — not even the Pong every
    standard client answers the server's RFC 6455 Ping with — is closed."""
    import base64
    import os
    import struct

    async def run():
        port = int(env["base"].rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write((f"GET /ws/tally?token={env['link']} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                      f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                      "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101")
        t0 = time.monotonic()
        pings = 0
        while True:  # read server frames (unmasked), answer nothing
            b0, b1 = await asyncio.wait_for(reader.readexactly(2), 10)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", await reader.readexactly(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", await reader.readexactly(8))[0]
            payload = await reader.readexactly(n)
            if b0 & 0x0F == 0x9:
                pings += 1
            if b0 & 0x0F == 0x8:
                writer.close()
                return struct.unpack("!H", payload[:2])[0], time.monotonic() - t0, pings

    code, elapsed, pings = asyncio.run(run())
    assert code == 4001 and 2.5 < elapsed < 6 and pings >= 2


def test_vmix_and_tsl_adapters_configured_through_the_api(env) -> None:
    base, pid = env["base"], env["prod"]["id"]

    async def run():
        lines: asyncio.Queue = asyncio.Queue()
        writers = []

        async def vmix(reader, writer):
            writers.append(writer)
            while True:
                line = await reader.readline()
                if not line:
                    return
                text = line.decode().strip()
                if text == "SUBSCRIBE TALLY":
                    writer.write(b"SUBSCRIBE OK TALLY\r\n")
                elif text == "TALLY":
                    writer.write(b"TALLY OK 20\r\n")
                await lines.put(text)
                await writer.drain()

        server = await asyncio.start_server(vmix, "127.0.0.1", 0)
        vport = server.sockets[0].getsockname()[1]
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.bind(("127.0.0.1", 0))
        tsl_port = probe.getsockname()[1]
        probe.close()
        cfg = {"sources": {"vt1": {"authority": "vmix", "vmix_input": 1},
                           "gfx": {"authority": "vmix", "vmix_input": 2},
                           "ext1": {"authority": "tsl:desk", "tsl_address": 5}},
               "adapters": [{"type": "vmix", "host": "127.0.0.1", "port": vport},
                            {"type": "tsl_in", "version": 3, "transport": "udp", "host": "127.0.0.1",
                             "port": tsl_port, "authority": "tsl:desk"}]}
        r = await asyncio.to_thread(http, "PUT", f"{base}/api/v1/productions/{pid}/tally/config", cfg,
                                    token=env["admin"])
        assert r.status == 200, r.body
        async with websockets.connect(tally_ws_url(base, f"production={pid}"),
                                      additional_headers={"Authorization": f"Bearer {env['admin']}"}) as ws:
            snap = await recv_json(ws)
            state = dict((k, v["state"]) for k, v in snap["sources"].items())
            # vMix reported "20": input 1 preview, input 2 off — or still unknown if not yet synced
            got = dict(state)
            while got.get("vt1") != "preview":
                d = await recv_json(ws, ("tally",))
                got.update({k: v["state"] for k, v in d["sources"].items()})
            assert got["gfx"] == "off"
            assert got["ext1"] == "unknown"  # TSL has not spoken yet
            for w in writers:
                w.write(b"TALLY OK 12\r\n")
                await w.drain()
            while got.get("vt1") != "program":
                d = await recv_json(ws, ("tally",))
                got.update({k: v["state"] for k, v in d["sources"].items()})
            assert got["gfx"] == "preview"
            # TSL 3.1 in: address 5, tally 1 on → program (UDP → WebSocket)
            from tally.tsl import TslV31Message

            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            t0 = time.perf_counter()
            sock.sendto(TslV31Message(5, (True, False, False, False), 3, "EXT1").serialize(), ("127.0.0.1", tsl_port))
            while got.get("ext1") != "program":
                d = await recv_json(ws, ("tally",))
                got.update({k: v["state"] for k, v in d["sources"].items()})
            print(f"TSL UDP in -> WebSocket out: {(time.perf_counter() - t0) * 1000:.2f} ms")
            sock.close()
            # the vision mixer goes away: its sources become unknown, never a stale red
            for w in writers:
                w.close()
            server.close()
            while got.get("vt1") != "unknown":
                d = await recv_json(ws, ("tally",), timeout=10)
                got.update({k: v["state"] for k, v in d["sources"].items()})
            assert got["gfx"] == "unknown" and got["ext1"] == "program"
        m = (await asyncio.to_thread(http, "GET", metrics_url(base))).body.decode()
        assert "returnfeed_tally_adapter_connected" in m and "returnfeed_tally_clients" in m
        assert "returnfeed_tally_delivery_seconds_count" in m
        r = await asyncio.to_thread(http, "PUT", f"{base}/api/v1/productions/{pid}/tally/config",
                                    {"adapters": [{"type": "warp-drive"}]}, token=env["admin"])
        assert r.status == 400
        await asyncio.to_thread(http, "PUT", f"{base}/api/v1/productions/{pid}/tally/config", {}, token=env["admin"])

    asyncio.run(run())


def test_state_survives_restart_and_two_nodes_share_sequence(db_url, tmp_path) -> None:
    env = {"DATABASE_URL": db_url, "RETURNFEED_ADMIN_PASSWORD": "two-node-pass"}
    a = ServerProcess(tmp_path / "a", env=env).start()
    b = ServerProcess(tmp_path / "b", env=env).start()
    try:
        admin = login(a.url, "admin", "two-node-pass")["access_token"]
        pid = http("POST", f"{a.url}/api/v1/productions", {"name": "Cluster"}, token=admin).json()["id"]
        for n in ("c1", "c2"):
            http("POST", f"{a.url}/api/v1/streams", {"name": n, "production": pid}, token=admin)

        async def run():
            hdr = {"Authorization": f"Bearer {admin}"}
            async with websockets.connect(tally_ws_url(a.url, f"production={pid}"), additional_headers=hdr) as wa, \
                    websockets.connect(tally_ws_url(b.url, f"production={pid}"), additional_headers=hdr) as wb:
                await recv_json(wa)
                await recv_json(wb)
                seen_a, seen_b = [], []
                for cmd in ({"type": "cut", "source": "c1"}, {"type": "preview", "source": "c2"},
                            {"type": "take", "duration": 0}):
                    await wa.send(json.dumps(cmd))
                    da = await recv_json(wa, ("tally",))
                    db_ = await recv_json(wb, ("tally",))
                    seen_a.append((da["seq"], {k: v["state"] for k, v in da["sources"].items()}))
                    seen_b.append((db_["seq"], {k: v["state"] for k, v in db_["sources"].items()}))
                return seen_a, seen_b

        seen_a, seen_b = asyncio.run(run())
        assert [s for s, _ in seen_a] == [s for s, _ in seen_b]
        final_a = http("GET", f"{a.url}/api/v1/productions/{pid}/tally", token=admin).json()
        final_b = http("GET", f"{b.url}/api/v1/productions/{pid}/tally", token=admin).json()
        assert final_a["seq"] == final_b["seq"] and final_a["sources"] == final_b["sources"]
        assert final_a["program"] == "c2"
    finally:
        a.stop()
        b.stop()
    # restart: the state comes back from the database
    c = ServerProcess(tmp_path / "c", env=env).start()
    try:
        admin = login(c.url, "admin", "two-node-pass")["access_token"]
        snap = http("GET", f"{c.url}/api/v1/productions/{pid}/tally", token=admin).json()
        assert snap["program"] == "c2" and snap["seq"] == final_a["seq"]
    finally:
        c.stop()


def test_ws_caps_per_link_ip_and_production(db_url, tmp_path) -> None:
    """Issue 9 item 11: sockets per link, per IP and per production are
    capped; one over a cap is closed with 4029 and a reason naming it, and a
    closed socket frees its place."""
    srv = ServerProcess(tmp_path / "srv", env={
        "DATABASE_URL": db_url, "RETURNFEED_ADMIN_PASSWORD": "caps-admin-pw",
        "RETURNFEED_HTTP__WS_MAX_PER_LINK": "2", "RETURNFEED_HTTP__WS_MAX_PER_IP": "3",
        "RETURNFEED_HTTP__WS_MAX_PER_PRODUCTION": "4"}).start()
    try:
        base = srv.url
        admin = login(base, "admin", "caps-admin-pw")["access_token"]
        pid = http("POST", f"{base}/api/v1/productions", {"name": "Caps"}, token=admin).json()["id"]
        links = []
        for n in ("k1", "k2", "k3"):
            assert http("POST", f"{base}/api/v1/streams", {"name": n, "production": pid}, token=admin).status == 201
            links.append(http("POST", f"{base}/api/v1/streams/{n}/links", {"action": "read"},
                              token=admin).json()["token"])

        async def open_ws(query: str, ip: str):
            ws = await websockets.connect(tally_ws_url(base, query), local_addr=(ip, 0))
            try:
                msg = json.loads(await asyncio.wait_for(ws.recv(), 5))
            except websockets.ConnectionClosed as exc:
                return None, (exc.rcvd.code, exc.rcvd.reason)
            assert msg["type"] == "snapshot"
            return ws, None

        async def run():
            a1, _ = await open_ws(f"token={links[0]}", "127.0.0.1")
            a2, _ = await open_ws(f"token={links[0]}", "127.0.0.1")
            assert a1 and a2
            _, refused = await open_ws(f"token={links[0]}", "127.0.0.2")
            assert refused == (4029, "too many tally connections for this link (at most 2)")
            b1, _ = await open_ws(f"token={links[1]}", "127.0.0.1")
            assert b1
            _, refused = await open_ws(f"token={links[2]}", "127.0.0.1")
            assert refused == (4029, "too many tally connections for this ip (at most 3)")
            c1, _ = await open_ws(f"token={links[2]}", "127.0.0.2")
            assert c1
            _, refused = await open_ws(f"token={admin}&production={pid}", "127.0.0.3")
            assert refused == (4029, "too many tally connections for this production (at most 4)")
            await a1.close()
            await asyncio.sleep(0.3)
            a3, _ = await open_ws(f"token={links[0]}", "127.0.0.1")
            assert a3  # the closed socket's place is free again
            for ws in (a2, a3, b1, c1):
                await ws.close()

        asyncio.run(run())
    finally:
        srv.stop()
