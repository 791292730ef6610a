"""Tally swarm: N WebSocket tally clients in one process, measuring how long
a cut takes to reach every one of them.

Usage::

    # against a running server (the /ws/tally endpoint wired in server/)
    python loadtests/tally_swarm.py --url ws://127.0.0.1:8080/ws/tally \\
        --token VIEWER_TOKEN --director-token DIRECTOR_TOKEN \\
        --source cam1 --source cam2 --clients 200
    # (start that server with RETURNFEED_HTTP__WS_MAX_PER_LINK=0,
    # RETURNFEED_HTTP__WS_MAX_PER_IP=0 and RETURNFEED_HTTP__MAX_CONNECTIONS_PER_IP=0:
    # every client here shares one token and one address)

    # self-contained: a minimal aiohttp app around tally.hub.TallyHub,
    # started in a separate process (multiprocessing), then the swarm
    python loadtests/tally_swarm.py --clients 1000 --rounds 200

One extra *director* connection sends ``cut`` commands, alternating between
two sources; before each cut it reads the monotonic clock (CLOCK_MONOTONIC
is shared by all processes of a machine). Every viewer connection records the
monotonic time at which the next ``tally`` message reached it. Per cut the
script waits until all viewers have it (or ``--round-timeout``), then pauses
``--gap`` seconds. It prints percentiles of (receipt − send) over all
(client, cut) pairs, and of the per-cut "until all have it" latency — the
figure the performance budget is about.

The clients must cost less per message than the server, so there is no
WebSocket library on the receive path: each connection is a bare
``asyncio.Protocol`` that does the RFC 6455 opening handshake itself, reads
the receipt time first thing in ``data_received``, parses unmasked server
frames by hand and looks only at the prefix of the payload (the server
encodes ``type`` first). It answers the server's heartbeat ``ping`` with a
pre-built masked ``pong`` frame (one mask key for the whole run: a valid
mask, just not a fresh one per frame — acceptable for a load generator).
Authentication: ``Authorization: Bearer <token>`` (and ``?token=`` with
``--token-in-query``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import gc
import hashlib
import json
import multiprocessing as mp
import os
import resource
import ssl
import statistics
import struct
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3
_TALLY_PREFIX = b'{"type":"tally"'
_PING_PREFIX = b'{"type":"ping"'
_SNAPSHOT_PREFIX = b'{"type":"snapshot"'


def raise_fd_limit(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(wanted, soft)
    target = max(soft, min(target, max(wanted, soft)))
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def masked_frame(text: str | bytes, key: bytes | None = None) -> bytes:
    """A client→server text frame; clients must mask (RFC 6455 §5.3)."""
    payload = text.encode() if isinstance(text, str) else text
    key = os.urandom(4) if key is None else key
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x81, 0x80 | n)
    elif n < 65536:
        header = struct.pack("!BBH", 0x81, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", 0x81, 0x80 | 127, n)
    masked = bytes(b ^ key[i & 3] for i, b in enumerate(payload))
    return header + key + masked


@dataclass
class Target:
    host: str
    port: int
    path: str
    ssl: ssl.SSLContext | None


def parse_url(url: str, insecure: bool) -> Target:
    u = urllib.parse.urlsplit(url)
    if u.scheme not in ("ws", "wss"):
        raise SystemExit(f"URL must be ws:// or wss://: {url}")
    ctx = None
    if u.scheme == "wss":
        ctx = ssl.create_default_context()
        if insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
    path = u.path or "/"
    if u.query:
        path += "?" + u.query
    return Target(u.hostname or "127.0.0.1", u.port or (443 if ctx else 80), path, ctx)


class SwarmClient(asyncio.Protocol):
    """One bare WebSocket connection (see the module docstring)."""

    __slots__ = ("swarm", "index", "transport", "key", "buf", "upgraded", "ready", "closed", "rx")

    def __init__(self, swarm: Swarm, index: int, key: str) -> None:
        self.swarm = swarm
        self.index = index
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.upgraded = False
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        buf = self.buf + data if self.buf else data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            self._check_handshake(buf[:end])
            buf = buf[end + 4 :]
            self.upgraded = True
        pos = 0
        n = len(buf)
        while n - pos >= 2:
            b1 = buf[pos + 1] & 0x7F
            if b1 < 126:
                head = 2
            elif b1 == 126:
                if n - pos < 4:
                    break
                b1 = (buf[pos + 2] << 8) | buf[pos + 3]
                head = 4
            else:
                if n - pos < 10:
                    break
                b1 = struct.unpack_from("!Q", buf, pos + 2)[0]
                head = 10
            end = pos + head + b1
            if end > n:
                break
            opcode = buf[pos] & 0x0F
            start = pos + head
            pos = end
            if opcode == 0x1:
                if buf.startswith(_TALLY_PREFIX, start):
                    self.swarm.on_tally(self, now)
                elif buf.startswith(_PING_PREFIX, start):
                    self.transport.write(self.swarm.pong_frame)  # type: ignore[union-attr]
                elif buf.startswith(_SNAPSHOT_PREFIX, start) and not self.ready.done():
                    self.ready.set_result(None)
                elif self.swarm.on_other is not None:
                    self.swarm.on_other(self, bytes(buf[start:end]))
            elif opcode == 0x8:
                self.swarm.closes.append(struct.unpack_from("!H", buf, start)[0] if b1 >= 2 else 1005)
        self.buf = buf[pos:] if pos < n else b""

    def _check_handshake(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        if not lines[0].startswith("HTTP/1.1 101"):
            raise ConnectionError(f"handshake refused: {lines[0]}")
        expected = base64.b64encode(hashlib.sha1(self.key.encode() + _GUID).digest()).decode()
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        if headers.get("sec-websocket-accept") != expected:
            raise ConnectionError("bad Sec-WebSocket-Accept")

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed before the snapshot: {exc}"))
        if not self.closed.done():
            self.closed.set_result(None)
        self.swarm.lost += 1


@dataclass
class Swarm:
    target: Target
    token: str | None
    token_in_query: bool
    pong_frame: bytes = field(default_factory=lambda: masked_frame('{"type":"pong"}'))
    clients: list[SwarmClient] = field(default_factory=list)
    closes: list[int] = field(default_factory=list)
    lost: int = 0
    on_other: Any = None
    # current round
    _t0: float = 0.0
    _got: set[int] = field(default_factory=set)
    _lat: list[float] = field(default_factory=list)
    _need: int = 0
    _done: asyncio.Future[None] | None = None

    def on_tally(self, client: SwarmClient, now: float) -> None:
        if client.index < 0 or client.index in self._got or self._done is None:
            return  # the director's own copy is not counted
        self._got.add(client.index)
        self._lat.append(now - self._t0)
        if len(self._got) >= self._need and not self._done.done():
            self._done.set_result(None)

    async def open(self, index: int, token: str | None, query: dict[str, str] | None = None) -> SwarmClient:
        loop = asyncio.get_running_loop()
        key = base64.b64encode(os.urandom(16)).decode()
        client = SwarmClient(self, index, key)
        t = self.target
        path = t.path
        params = dict(query or {})
        if token and self.token_in_query:
            params["token"] = token
        if params:
            path += ("&" if "?" in path else "?") + urllib.parse.urlencode(params)
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: {t.host}:{t.port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
        ]
        if token:
            lines.append(f"Authorization: Bearer {token}")
        await loop.create_connection(lambda: client, t.host, t.port, ssl=t.ssl)
        client.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode())  # type: ignore[union-attr]
        await asyncio.wait_for(client.ready, 10)
        return client

    async def round(self, director: SwarmClient, cut: bytes, timeout: float) -> tuple[list[float], int]:
        loop = asyncio.get_running_loop()
        self._got = set()
        self._lat = []
        self._need = len(self.clients)
        self._done = loop.create_future()
        self._t0 = time.monotonic()
        director.transport.write(cut)  # type: ignore[union-attr]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._done), timeout)
        missing = self._need - len(self._got)
        self._done = None
        return self._lat, missing


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


async def run_swarm(args: argparse.Namespace, url: str) -> dict[str, Any]:
    target = parse_url(url, args.insecure)
    swarm = Swarm(target, args.token, args.token_in_query)
    director_errors: list[bytes] = []
    director_query = {"role": "director"} if args.director_query else None
    director = await swarm.open(-1, args.director_token or args.token, director_query)

    def on_other(client: SwarmClient, payload: bytes) -> None:
        if client is director and payload.startswith(b'{"type":"error"'):
            director_errors.append(payload)

    swarm.on_other = on_other
    t_conn = time.monotonic()
    sem = asyncio.Semaphore(args.connect_concurrency)

    async def one(i: int) -> SwarmClient:
        async with sem:
            return await swarm.open(i, args.token)

    swarm.clients = list(await asyncio.gather(*(one(i) for i in range(args.clients))))
    connect_s = time.monotonic() - t_conn
    await asyncio.sleep(args.settle)

    sources = args.source or ["cam1", "cam2"]
    # The load generator's own pauses must not show up as latency: no
    # collector runs while measuring (the connections are long-lived).
    gc.collect()
    gc.freeze()
    gc.disable()
    per_client: list[float] = []
    per_round: list[float] = []
    missing_total = 0
    cpu0 = time.process_time()
    for r in range(args.warmup + args.rounds):
        cut = masked_frame(json.dumps({"type": "cut", "source": sources[r % len(sources)]}))
        lat, missing = await swarm.round(director, cut, args.round_timeout)
        if director_errors:
            raise SystemExit(f"director command refused: {director_errors[0].decode()}")
        if r >= args.warmup:
            per_client += lat
            missing_total += missing
            if lat and not missing:
                per_round.append(max(lat))
        await asyncio.sleep(args.gap)
    swarm_cpu = time.process_time() - cpu0
    gc.enable()
    gc.unfreeze()
    received = (args.warmup + args.rounds) * (args.clients + 1)
    for c in [director, *swarm.clients]:
        c.transport.close()  # type: ignore[union-attr]
    ms = 1000.0
    return {
        "clients": args.clients,
        "rounds": args.rounds,
        "connect_s": round(connect_s, 3),
        "per_client_ms": {
            "p50": pct(per_client, 50) * ms,
            "p99": pct(per_client, 99) * ms,
            "max": max(per_client) * ms if per_client else float("nan"),
            "mean": statistics.fmean(per_client) * ms if per_client else float("nan"),
        },
        "all_clients_ms": {
            "p50": pct(per_round, 50) * ms,
            "p99": pct(per_round, 99) * ms,
            "max": max(per_round) * ms if per_round else float("nan"),
        },
        "missing": missing_total,
        "swarm_cpu_us_per_message": swarm_cpu / received * 1e6,
        "server_closes": swarm.closes,
        "lost_connections": swarm.lost,
    }


# ------------------------------------------------------- in-process server


def _serve(conn: Any, sources: list[str], max_backlog: int, cpus: set[int] | None = None) -> None:
    """Server process: minimal aiohttp app around TallyHub (uvloop)."""
    import uvloop
    from aiohttp import WSMsgType, web

    from tally.hub import TallyHub, aiohttp_sink
    from tally.state import SourceConfig, TallyState

    raise_fd_limit(65536)
    if cpus:
        os.sched_setaffinity(0, cpus)

    async def main() -> None:
        state = TallyState("swarm", [SourceConfig(s, f"Camera {s}") for s in sources])
        hub = TallyHub(state, max_backlog=max_backlog)
        flush = hub.flush
        flush_times: list[float] = []
        flush_cpu = [0.0]

        def timed_flush() -> int:
            t = time.perf_counter()
            c = time.thread_time()
            n = flush()
            if n:
                flush_times.append(time.perf_counter() - t)
                flush_cpu[0] += time.thread_time() - c
            return n

        hub.flush = timed_flush  # type: ignore[method-assign]

        async def handler(request: web.Request) -> web.WebSocketResponse:
            ws = web.WebSocketResponse(compress=False, max_msg_size=64 * 1024)
            await ws.prepare(request)
            client = hub.connect(aiohttp_sink(ws), director=request.query.get("role") == "director")
            try:
                async for msg in ws:
                    if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                        hub.receive(client, msg.data)
            finally:
                hub.disconnect(client)
            return ws

        app = web.Application()
        app.router.add_get("/ws/tally", handler)
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        hub.start()
        conn.send(port)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, conn.recv)  # until told to stop
        stats: dict[str, Any] = dataclasses.asdict(hub.stats)
        stats["flush_ms_p50"] = pct(flush_times, 50) * 1000
        stats["flush_ms_p99"] = pct(flush_times, 99) * 1000
        stats["cpu_us_per_frame"] = flush_cpu[0] / max(1, stats["frames"]) * 1e6
        hub.close()
        await runner.cleanup()
        conn.send(stats)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
        r.run(main())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="ws(s)://host:port/ws/tally; without it an in-process server is started")
    p.add_argument("--token", help="viewer bearer token")
    p.add_argument("--director-token", help="bearer token of the director connection (default: --token)")
    p.add_argument("--token-in-query", action="store_true", help="also send tokens as ?token=")
    p.add_argument("--director-query", action="store_true", help="add ?role=director to the director (in-process default)")
    p.add_argument("--source", action="append", help="sources to cut between (default cam1, cam2)")
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--gap", type=float, default=0.02, help="pause between cuts, seconds")
    p.add_argument("--settle", type=float, default=0.5, help="pause after connecting, seconds")
    p.add_argument("--round-timeout", type=float, default=2.0)
    p.add_argument("--connect-concurrency", type=int, default=64)
    p.add_argument("--max-backlog", type=int, default=256 * 1024, help="in-process server: hub backlog limit")
    p.add_argument("--insecure", action="store_true", help="wss: do not verify the certificate")
    p.add_argument("--pin", action="store_true",
                   help="in-process mode: pin the server to the first CPU and the swarm to the others")
    p.add_argument("--json", action="store_true", help="print the result as JSON only")
    args = p.parse_args(argv)

    raise_fd_limit(args.clients + 256)
    import uvloop

    server_proc = None
    parent = None
    url = args.url
    if url is None:
        args.director_query = True
        sources = args.source or ["cam1", "cam2", "cam3", "cam4"]
        args.source = sources[:2]
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        server_cpus = swarm_cpus = None
        if args.pin:
            avail = sorted(os.sched_getaffinity(0))
            if len(avail) < 2:
                raise SystemExit("--pin needs at least two CPUs")
            server_cpus, swarm_cpus = {avail[0]}, set(avail[1:])
            os.sched_setaffinity(0, swarm_cpus)
        server_proc = ctx.Process(target=_serve, args=(child, sources, args.max_backlog, server_cpus), daemon=True)
        server_proc.start()
        if not parent.poll(30):
            raise SystemExit("in-process server did not start")
        url = f"ws://127.0.0.1:{parent.recv()}/ws/tally"
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
            result = r.run(run_swarm(args, url))
    finally:
        if parent is not None and server_proc is not None:
            parent.send("stop")
            if parent.poll(10):
                server_stats = parent.recv()
            else:
                server_stats = None
            server_proc.join(10)
            if server_proc.is_alive():
                server_proc.terminate()
    if parent is not None:
        result["server"] = server_stats
        result["mode"] = "in-process hub (server in a separate process)"
    else:
        result["mode"] = url
    result["cpus"] = os.cpu_count()
    if args.json:
        print(json.dumps(result))
    else:
        pc, ac = result["per_client_ms"], result["all_clients_ms"]
        print(f"tally swarm: {result['clients']} clients, {result['rounds']} cuts, {result['mode']}")
        print(f"  connect: {result['connect_s']:.2f} s; missing receipts: {result['missing']}; "
              f"server closes: {result['server_closes'] or 'none'}")
        print(f"  per client  (receipt - cut sent): p50 {pc['p50']:.2f} ms  p99 {pc['p99']:.2f} ms  max {pc['max']:.2f} ms")
        print(f"  all clients (last receipt per cut): p50 {ac['p50']:.2f} ms  p99 {ac['p99']:.2f} ms  max {ac['max']:.2f} ms")
        if result.get("server"):
            s = result["server"]
            print(f"  server: deltas {s['deltas']}, frames {s['frames']}, slow closed {s['slow_closed']}, "
                  f"flush p50 {s['flush_ms_p50']:.2f} ms p99 {s['flush_ms_p99']:.2f} ms, "
                  f"fan-out CPU {s['cpu_us_per_frame']:.1f} us/frame")
        print(f"  swarm CPU: {result['swarm_cpu_us_per_message']:.1f} us/message (all work during the cuts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
