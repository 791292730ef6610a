"""Tally hub: frame builder, fan-out rules, and a real aiohttp server with clients."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
import time

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer

from tally.errors import TallyError
from tally.hub import (
    TallyHub,
    TransportSink,
    aiohttp_sink,
    aiohttp_transport,
    build_close_frame,
    build_frame,
    build_text_frame,
    serve_aiohttp,
)
from tally.state import SourceConfig, TallyState

# ------------------------------------------------------------ frame builder


def parse_server_frames(data: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """Minimal RFC 6455 parser for unmasked server frames (test helper)."""
    frames = []
    pos = 0
    while len(data) - pos >= 2:
        b0, b1 = data[pos], data[pos + 1]
        assert b0 & 0x80 and not b0 & 0x70, "FIN set, RSV clear"
        assert not b1 & 0x80, "server frames are unmasked"
        n = b1 & 0x7F
        head = 2
        if n == 126:
            if len(data) - pos < 4:
                break
            n = struct.unpack_from("!H", data, pos + 2)[0]
            head = 4
        elif n == 127:
            if len(data) - pos < 10:
                break
            n = struct.unpack_from("!Q", data, pos + 2)[0]
            head = 10
        if len(data) - pos < head + n:
            break
        frames.append((b0 & 0x0F, data[pos + head : pos + head + n]))
        pos += head + n
    return frames, data[pos:]


@pytest.mark.parametrize("size, header", [(0, b"\x81\x00"), (125, b"\x81\x7d"), (126, b"\x81\x7e\x00\x7e"),
                                          (65535, b"\x81\x7e\xff\xff"), (65536, b"\x81\x7f" + (65536).to_bytes(8, "big"))])
def test_text_frame_lengths(size, header):
    payload = b"x" * size
    frame = build_text_frame(payload)
    assert frame[: len(header)] == header
    assert frame[len(header) :] == payload
    assert parse_server_frames(frame) == ([(1, payload)], b"")


def test_text_frame_utf8_and_close_frame():
    assert build_text_frame("ä") == b"\x81\x02\xc3\xa4"
    close = build_close_frame(4000, "too slow")
    assert close == b"\x88\x0a\x0f\xa0too slow"
    long = build_close_frame(1001, "é" * 100)  # truncated on a character boundary
    assert len(long) <= 2 + 125
    long[4:].decode("utf-8")
    with pytest.raises(ValueError):
        build_close_frame(999)
    with pytest.raises(ValueError):
        build_frame(0x9, b"x" * 126)
    with pytest.raises(ValueError):
        build_frame(0x10, b"")


# ------------------------------------------------------------ sans-I/O hub


class FakeSink:
    def __init__(self, backlog: int = 0, fail: bool = False) -> None:
        self.frames: list[bytes] = []
        self.backlog = backlog
        self.fail = fail
        self.closed: tuple[int, str] | None = None

    def write(self, frame: bytes) -> None:
        if self.fail:
            raise RuntimeError("transport closed")
        self.frames.append(frame)

    def get_write_buffer_size(self) -> int:
        return self.backlog

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    def all_frames(self) -> list[tuple[int, bytes]]:
        out = []
        for f in self.frames:
            frames, rest = parse_server_frames(f)
            assert frames and rest == b""
            out += frames
        return out

    def messages(self) -> list[dict]:
        """The JSON text messages (RFC 6455 Ping frames left out)."""
        out = []
        for op, payload in self.all_frames():
            assert op in (1, 9)
            if op == 1:
                out.append(json.loads(payload))
        return out


def make_state() -> TallyState:
    return TallyState("show", [SourceConfig("cam1"), SourceConfig("cam2"), SourceConfig("cam3"),
                               SourceConfig("vm", authority="vmix", vmix_input=1)])


def test_snapshot_then_deltas_without_loop():
    state = make_state()
    state.cut("cam1", now=0)
    hub = TallyHub(state, clock=lambda: 0.0)
    a = FakeSink()
    ca = hub.connect(a, now=0)
    snap = a.messages()[0]
    assert snap["type"] == "snapshot" and snap["seq"] == 1 and snap["production"] == "show"
    assert snap["sources"]["cam1"]["state"] == "program"
    assert snap["sources"]["vm"]["state"] == "unknown"
    state.cut("cam2", now=1)
    state.set_preview("cam3", now=1)
    b = FakeSink()
    hub.connect(b, now=1)  # connects while a delta is pending
    assert b.messages()[0]["seq"] == 3
    assert hub.flush() == 1  # only a: b's snapshot already had seq 3
    delta = a.messages()[1]
    assert delta == {
        "type": "tally",
        "seq": 3,
        "sources": {
            "cam1": {"state": "off", "buses": [], "aux": False, "label": "cam1", "authority": "director"},
            "cam2": {"state": "program", "buses": ["program"], "aux": False, "label": "cam2", "authority": "director"},
            "cam3": {"state": "preview", "buses": ["preview"], "aux": False, "label": "cam3", "authority": "director"},
        },
    }
    assert len(b.frames) == 1
    state.cut("cam1", now=2)
    assert hub.flush() == 2
    assert a.messages()[-1]["seq"] == b.messages()[-1]["seq"] == 4
    assert hub.flush() == 0
    assert ca.seq == 4


def test_commands_roles_errors_and_pong():
    state = make_state()
    hub = TallyHub(state, clock=lambda: 0.0)
    viewer_sink, director_sink = FakeSink(), FakeSink()
    viewer = hub.connect(viewer_sink, now=0)
    director = hub.connect(director_sink, director=True, who="alice", now=0)
    assert hub.receive(viewer, '{"type":"cut","source":"cam1","id":"c1"}', now=1) is None
    assert viewer_sink.messages()[-1] == {"type": "error", "code": "forbidden", "detail": "only directors can switch", "id": "c1"}
    ch = hub.receive(director, '{"type":"cut","source":"cam1"}', now=1)
    assert ch.who == "alice" and ch.seq == 1
    hub.receive(director, '{"type":"cut","source":"nope","id":9}', now=1)
    err = director_sink.messages()[-1]
    assert err["type"] == "error" and err["code"] == "unknown_source" and err["id"] == 9
    hub.receive(director, '{"type":"cut","source":"vm"}', now=1)
    assert director_sink.messages()[-1]["code"] == "external_authority"
    hub.receive(director, '{"type":"take"}', now=1)
    assert director_sink.messages()[-1]["code"] == "no_preview"
    hub.receive(director, "{bad", now=1)
    assert director_sink.messages()[-1]["code"] == "bad_json"
    hub.receive(director, '{"type":"nuke"}', now=1)
    assert director_sink.messages()[-1]["code"] == "unknown_type"
    hub.receive(director, "x" * 5000, now=1)
    assert director_sink.messages()[-1]["code"] == "too_large"
    hub.receive(viewer, '{"type":"ping"}', now=2)
    assert viewer_sink.messages()[-1] == {"type": "pong"}
    hub.receive(viewer, '{"type":"ping","id":"p"}', now=2)
    assert viewer_sink.messages()[-1] == {"type": "pong", "id": "p"}
    n = len(viewer_sink.frames)
    hub.receive(viewer, '{"type":"pong"}', now=2)
    assert len(viewer_sink.frames) == n
    assert state.seq == 1  # refused commands changed nothing
    assert hub.stats.errors_sent == 7


def test_slow_and_dead_clients_are_dropped_others_served():
    state = make_state()
    hub = TallyHub(state, max_backlog=1000, clock=lambda: 0.0)
    fast, slow, dead = FakeSink(), FakeSink(), FakeSink()
    hub.connect(fast, now=0)
    hub.connect(slow, now=0)
    hub.connect(dead, now=0)
    slow.backlog = 5000
    dead.fail = True
    state.cut("cam1", now=0)
    hub.flush()
    assert slow.closed == (4000, "too slow")
    assert dead.closed is not None and dead.closed[0] == 1011
    assert len(hub.clients) == 1 and hub.stats.slow_closed == 1 and hub.stats.write_failures == 1
    state.cut("cam2", now=0)
    hub.flush()
    assert [m["seq"] for m in fast.messages()] == [0, 1, 2]
    assert len(slow.frames) == 2  # nothing more after the close


def test_tick_heartbeat_and_missing_detection():
    state = make_state()
    hub = TallyHub(state, heartbeat_interval=1.0, missing_after=3.0, clock=lambda: 0.0)
    quiet_sink, alive_sink = FakeSink(), FakeSink()
    quiet = hub.connect(quiet_sink, now=100.0)
    alive = hub.connect(alive_sink, now=100.0)
    assert hub.tick(100.0) == []
    assert alive_sink.messages()[-1] == {"type": "ping"}
    # the RFC 6455 Ping goes with it, for standard clients (empty payload)
    assert alive_sink.all_frames()[-1] == (0x9, b"")
    n = len(alive_sink.frames)
    hub.tick(100.5)
    assert len(alive_sink.frames) == n  # at most one ping per interval
    for t in (101.0, 102.0, 103.0):
        hub.receive(alive, '{"type":"pong"}', now=t)
        assert hub.tick(t) == []
    missing = hub.tick(103.2)
    assert missing == [quiet]
    assert quiet_sink.closed == (4001, "heartbeat timeout")
    assert hub.clients == [alive] and hub.stats.missing_closed == 1
    hub.touch(alive, now=110.0)
    assert hub.tick(112.0) == []


def test_tick_completes_transition_and_close():
    state = make_state()
    hub = TallyHub(state, missing_after=60, clock=lambda: 0.0)
    sink = FakeSink()
    hub.connect(sink, director=True, now=0)
    state.cut("cam1", now=0)
    state.set_preview("cam2", now=0)
    state.take(1.0, now=10.0)
    hub.tick(11.0)
    assert state.program == "cam2" and state.transition is None
    hub.close()
    assert sink.closed == (1001, "server shutting down")
    state.cut("cam3", now=12)
    assert hub.flush() == 0  # detached
    with pytest.raises(TallyError):
        hub.connect(FakeSink())


async def test_flush_is_scheduled_on_the_loop_and_coalesces():
    state = make_state()
    hub = TallyHub(state)
    sink = FakeSink()
    hub.connect(sink)
    for i in range(30):  # a flood within one loop iteration
        state.cut("cam1" if i % 2 else "cam2", now=i)
    assert len(sink.frames) == 1  # nothing written synchronously
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    msgs = sink.messages()
    assert len(msgs) == 2 and msgs[1]["seq"] == 30
    assert msgs[1]["sources"]["cam1"]["state"] == "program" and msgs[1]["sources"]["cam2"]["state"] == "off"
    assert hub.stats.changes == 30 and hub.stats.deltas == 1
    hub.close()


async def test_hub_timer_finishes_take_on_time():
    state = make_state()
    hub = TallyHub(state)
    sink = FakeSink()
    hub.connect(sink, director=True)
    hub.receive(hub.clients[0], '{"type":"cut","source":"cam1"}')
    hub.receive(hub.clients[0], '{"type":"preview","source":"cam2"}')
    t0 = time.monotonic()
    hub.receive(hub.clients[0], '{"type":"take","duration":0.05}')
    await asyncio.sleep(0.01)
    both = sink.messages()[-1]
    assert both["sources"]["cam2"]["state"] == "program"
    while state.transition is not None:
        await asyncio.sleep(0.005)
        assert time.monotonic() - t0 < 1
    await asyncio.sleep(0.01)
    last = sink.messages()[-1]
    assert last["sources"]["cam1"]["state"] == "preview" and last["sources"]["cam2"]["state"] == "program"
    hub.close()


async def test_start_runs_heartbeats():
    state = make_state()
    hub = TallyHub(state, heartbeat_interval=0.02, missing_after=10)
    sink = FakeSink()
    hub.connect(sink)
    began = time.monotonic()
    hub.start()
    # Three heartbeats come (waited for: a loaded machine delays timers) ...
    pings: list = []
    while len(pings) < 3 and time.monotonic() - began < 5.0:
        await asyncio.sleep(0.01)
        pings = [m for m in sink.messages() if m["type"] == "ping"]
    elapsed = time.monotonic() - began
    assert len(pings) >= 3
    # ... at the interval, not faster: no more than the time allowed for.
    assert len(pings) <= elapsed / 0.02 + 1
    hub.close()


# ------------------------------------------------------------ real aiohttp

CLIENTS = web.AppKey("clients", list)
HUB = web.AppKey("hub", TallyHub)


def make_app(hub: TallyHub, abort_after: float = 5.0) -> web.Application:
    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(compress=False, max_msg_size=64 * 1024, autoping=False)
        await ws.prepare(request)
        # The isolated aiohttp internal must be the connection's transport.
        assert aiohttp_transport(ws) is request.transport
        client = hub.connect(aiohttp_sink(ws, abort_after=abort_after), director=request.query.get("role") == "director")
        request.app[CLIENTS].append(client)
        await serve_aiohttp(hub, client, ws)
        return ws

    app = web.Application()
    app[CLIENTS] = []
    app[HUB] = hub
    app.router.add_get("/ws/tally", handler)
    return app


def test_aiohttp_transport_breaks_loudly_when_missing():
    class Unprepared:
        _writer = None

    with pytest.raises(TallyError):
        aiohttp_transport(Unprepared())

    class Writer:
        transport = object()

    class Odd:
        _writer = Writer()

    with pytest.raises(TallyError):
        aiohttp_transport(Odd())


async def test_real_server_snapshot_then_ordered_deltas():
    state = make_state()
    hub = TallyHub(state)
    async with TestServer(make_app(hub)) as server, aiohttp.ClientSession() as http:
        url = server.make_url("/ws/tally")
        viewers = [await http.ws_connect(url) for _ in range(5)]
        director = await http.ws_connect(url.with_query(role="director"))
        for ws in viewers + [director]:
            snap = await ws.receive_json(timeout=2)
            assert snap["type"] == "snapshot" and snap["seq"] == 0
        order = ["cam1", "cam2", "cam3", "cam1", "cam2"]
        for name in order:
            await director.send_json({"type": "cut", "source": name})
            await asyncio.sleep(0.01)
        for ws in viewers:
            seqs, programs = [], []
            while len(programs) < len(order):
                m = await ws.receive_json(timeout=2)
                if m["type"] != "tally":
                    continue
                seqs.append(m["seq"])
                programs += [n for n, s in m["sources"].items() if s["state"] == "program"]
            assert programs == order
            assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        # error goes only to the sender
        await director.send_str('{"type":"cut","source":"ghost"}')
        m = await director.receive_json(timeout=2)
        while m["type"] != "error":
            m = await director.receive_json(timeout=2)
        assert m["code"] == "unknown_source"
        await viewers[0].send_str('{"type":"ping"}')
        m = await viewers[0].receive_json(timeout=2)
        assert m == {"type": "pong"}
        for ws in viewers + [director]:
            await ws.close()
    hub.close()


async def test_real_server_missing_heartbeat_closes_with_4001():
    state = make_state()
    hub = TallyHub(state)
    async with TestServer(make_app(hub)) as server, aiohttp.ClientSession() as http:
        ws = await http.ws_connect(server.make_url("/ws/tally"))
        await ws.receive_json(timeout=2)
        missing = hub.tick(time.monotonic() + 3.5)
        assert len(missing) == 1
        msg = await ws.receive(timeout=2)
        while msg.type is WSMsgType.TEXT:
            msg = await ws.receive(timeout=2)
        assert msg.type is WSMsgType.CLOSE and msg.data == 4001 and msg.extra == "heartbeat timeout"
        await ws.close()
    hub.close()


async def raw_ws_client(port: int, rcvbuf: int) -> socket.socket:
    """A WebSocket client that completes the handshake and then never reads."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    await loop.sock_sendall(
        sock,
        (
            f"GET /ws/tally HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode(),
    )
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += await loop.sock_recv(sock, 1)
    assert buf.startswith(b"HTTP/1.1 101")
    return sock


async def test_real_server_slow_client_dropped_without_delaying_others():
    labels = {f"cam{i}": "L" * 60 for i in range(1, 4)}
    state = TallyState("show", [SourceConfig(n, lbl) for n, lbl in labels.items()])
    hub = TallyHub(state, max_backlog=32 * 1024)
    async with TestServer(make_app(hub)) as server, aiohttp.ClientSession() as http:
        port = server.port
        fast = [await http.ws_connect(server.make_url("/ws/tally")) for _ in range(3)]
        for ws in fast:
            await ws.receive_json(timeout=2)
        slow = await raw_ws_client(port, rcvbuf=4096)
        try:
            await _slow_client_scenario(server, hub, state, labels, fast, slow)
        finally:
            slow.close()
        for ws in fast:
            await ws.close()
    hub.close()


async def _slow_client_scenario(server, hub, state, labels, fast, slow) -> None:
    await asyncio.sleep(0.05)
    app_clients = server.app[CLIENTS]
    # shrink the server's send buffer for the slow one so its backlog grows
    slow_client = app_clients[-1]
    slow_client.sink.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

    received = [0] * len(fast)

    async def drain(i: int, ws) -> None:
        while True:
            m = await ws.receive(timeout=5)
            if m.type is not WSMsgType.TEXT:
                return
            if json.loads(m.data)["type"] == "tally":
                received[i] += 1
                if received[i] == 1500:
                    return

    readers = [asyncio.create_task(drain(i, ws)) for i, ws in enumerate(fast)]
    t0 = time.monotonic()
    names = list(labels)
    for i in range(1500):
        state.cut(names[i % 3], now=i)
        hub.flush()  # one delta per change: worst case for the backlog
        if i % 50 == 0:
            await asyncio.sleep(0)
    await asyncio.wait_for(asyncio.gather(*readers), 10)
    elapsed = time.monotonic() - t0
    assert received == [1500] * 3
    assert slow_client.closed == "too slow" and hub.stats.slow_closed == 1
    assert slow_client not in hub.clients
    assert elapsed < 8  # generous: CI machines are loaded; typical < 1 s
    # The slow client eventually sees the deltas it had, then close 4000.
    loop = asyncio.get_running_loop()
    data = b""
    frames: list[tuple[int, bytes]] = []
    deadline = time.monotonic() + 5
    while not any(op == 8 for op, _ in frames) and time.monotonic() < deadline:
        chunk = await asyncio.wait_for(loop.sock_recv(slow, 65536), 5)
        if not chunk:
            break
        data += chunk
        got, data = parse_server_frames(data)
        frames += got
    close = [p for op, p in frames if op == 8]
    assert close and struct.unpack("!H", close[0][:2])[0] == 4000 and close[0][2:] == b"too slow"


async def test_transport_sink_close_aborts_after_grace():
    loop = asyncio.get_running_loop()
    server_side: list[asyncio.Transport] = []

    class P(asyncio.Protocol):
        def connection_made(self, transport):
            server_side.append(transport)

    srv = await loop.create_server(P, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    while not server_side:
        await asyncio.sleep(0.001)
    t = server_side[0]
    t.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    try:
        sink = TransportSink(t, abort_after=0.05)
        sink.write(b"\x00" * 1_000_000)  # the peer never reads
        assert sink.get_write_buffer_size() > 0
        sink.close(4000, "too slow")
        sink.close(4000, "again")  # idempotent
        assert t.is_closing()
        await asyncio.sleep(0.15)
        assert t.get_write_buffer_size() == 0  # aborted, buffer dropped
    finally:
        sock.close()
        srv.close()
        await srv.wait_closed()


def test_real_server_scenarios_under_uvloop():
    """The server runs on uvloop: its transports must behave the same."""
    uvloop = pytest.importorskip("uvloop", reason="uvloop is a declared dependency")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(test_real_server_snapshot_then_ordered_deltas())
        runner.run(test_real_server_missing_heartbeat_closes_with_4001())
        runner.run(test_real_server_slow_client_dropped_without_delaying_others())
        runner.run(test_transport_sink_close_aborts_after_grace())
        runner.run(test_hub_timer_finishes_take_on_time())


def test_scoped_clients_see_only_their_sources() -> None:
    from tally.hub import TallyHub
    from tally.state import SourceConfig, TallyState

    class Sink:
        def __init__(self) -> None:
            self.frames: list[bytes] = []

        def write(self, frame: bytes) -> None:
            self.frames.append(frame)

        def get_write_buffer_size(self) -> int:
            return 0

        def close(self, code: int, reason: str) -> None:
            pass

    import json as _json

    def texts(sink: Sink) -> list[dict]:
        out = []
        for f in sink.frames:
            n = f[1] & 0x7F
            off = 2 if n < 126 else 4
            out.append(_json.loads(f[off:]))
        return out

    state = TallyState("p", [SourceConfig("cam1"), SourceConfig("cam2")])
    hub = TallyHub(state)
    full, cam2, cam2b = Sink(), Sink(), Sink()
    hub.connect(full)
    hub.connect(cam2, only=frozenset({"cam2"}))
    hub.connect(cam2b, only=frozenset({"cam2"}))
    assert set(texts(cam2)[0]["sources"]) == {"cam2"} and set(texts(full)[0]["sources"]) == {"cam1", "cam2"}
    state.cut("cam1", now=0.0)
    hub.flush()
    assert len(texts(cam2)) == 1 and texts(full)[-1]["sources"].keys() == {"cam1"}  # nothing for cam2
    state.set_preview("cam2", now=0.0)
    hub.flush()
    assert texts(cam2)[-1]["sources"] == {"cam2": texts(full)[-1]["sources"]["cam2"]}
    assert cam2.frames[-1] is cam2b.frames[-1]  # encoded once per scope, not per client
    hub.close()


def test_aiohttp_message_types_are_the_rfc6455_opcodes():
    """serve_aiohttp compares message types as integers (tally never
    imports aiohttp)."""
    assert (WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.PING, WSMsgType.PONG) == (0x1, 0x2, 0x9, 0xA)
    assert WSMsgType.ERROR == 0x102


async def test_real_server_protocol_pong_alone_keeps_a_client():
    """Issue 10 item 1: a client that only answers RFC 6455 pings (a passive
    standard client) stays connected for many missing_after windows; one
    that answers nothing is closed with 4001."""
    state = make_state()
    hub = TallyHub(state, heartbeat_interval=0.1, missing_after=0.4)
    hub.start()
    async with TestServer(make_app(hub)) as server, aiohttp.ClientSession() as http:
        url = server.make_url("/ws/tally")
        passive = await http.ws_connect(url, autoping=True)  # answers Ping with Pong, sends nothing else
        deaf = await http.ws_connect(url, autoping=False)    # answers nothing
        for ws in (passive, deaf):
            assert (await ws.receive_json(timeout=2))["type"] == "snapshot"
        got: list[dict] = []
        pings = 0

        async def read_passive() -> None:
            while True:
                msg = await passive.receive()
                if msg.type is not WSMsgType.TEXT:
                    return
                got.append(json.loads(msg.data))

        reader = asyncio.create_task(read_passive())
        deaf_close = None
        t_end = time.monotonic() + 2.0  # 5 × missing_after
        i = 0
        while time.monotonic() < t_end:
            msg = await deaf.receive(timeout=2)
            if msg.type is WSMsgType.PING:
                pings += 1  # seen, deliberately not answered
            elif msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING):
                deaf_close = (msg.data, msg.extra)
                break
        while time.monotonic() < t_end:
            state.cut(("cam1", "cam2", "cam3")[i % 3], now=time.monotonic())
            i += 1
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.1)
        assert deaf_close == (4001, "heartbeat timeout") and pings >= 2
        assert not reader.done(), "the passive client was closed"
        assert len(hub.clients) == 1
        seqs = [m["seq"] for m in got if m["type"] == "tally"]
        assert seqs == list(range(1, i + 1))  # every change, in order
        assert sum(1 for m in got if m["type"] == "ping") >= 10
        await passive.close()
        reader.cancel()
    hub.close()


async def test_real_server_client_ping_frame_is_answered_and_counts():
    state = make_state()
    hub = TallyHub(state, heartbeat_interval=10, missing_after=0.3)
    async with TestServer(make_app(hub)) as server, aiohttp.ClientSession() as http:
        ws = await http.ws_connect(server.make_url("/ws/tally"), autoping=False)
        await ws.receive_json(timeout=2)
        client = hub.clients[0]
        before = client.last_seen
        await asyncio.sleep(0.05)
        await ws.ping(b"rf")
        msg = await ws.receive(timeout=2)
        assert msg.type is WSMsgType.PONG and msg.data == b"rf"
        assert client.last_seen > before
        await ws.pong(b"")
        await asyncio.sleep(0.05)
        t = client.last_seen
        assert t > before
        assert hub.tick(t + 0.29) == [] and hub.tick(t + 0.31) == [client]
        await ws.close()
    hub.close()
