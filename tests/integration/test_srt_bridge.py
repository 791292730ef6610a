"""SrtBridge with real libsrt peers (our binding as caller): batching, timing,
non-blocking sends, draining a broken socket, the lag bound, shutdown."""

from __future__ import annotations

import asyncio
import statistics
import struct
import threading
import time
from dataclasses import dataclass, field

import pytest

from media.srt.binding import SockOpt, SrtLibrary
from media.srt.bridge import SrtBridge

pytestmark = pytest.mark.integration


@dataclass
class Sink:
    accepted: list[int] = field(default_factory=list)
    messages: dict[int, list[tuple[bytes, float]]] = field(default_factory=dict)
    closed: dict[int, str] = field(default_factory=dict)
    data_calls: int = 0

    def bridge_accepted(self, sock: int, peer: tuple[str, int], listener: int) -> None:
        self.accepted.append(sock)

    def bridge_data(self, sock: int, messages: list[bytes], now: float) -> None:
        self.data_calls += 1
        self.messages.setdefault(sock, []).extend((m, now) for m in messages)

    def bridge_closed(self, sock: int, reason: str) -> None:
        self.closed[sock] = reason


class Rig:
    """A listening socket watched by a bridge, and a blocking caller."""

    def __init__(self, lib: SrtLibrary, sink: Sink, latency_ms: int, **bridge_kw: object) -> None:
        self.lib = lib
        self.sink = sink
        self.lsock = lib.create_socket()
        lib.setsockflag(self.lsock, SockOpt.RCVLATENCY, latency_ms)
        lib.setsockflag(self.lsock, SockOpt.PEERLATENCY, latency_ms)
        if "sndbuf" in bridge_kw:
            lib.setsockflag(self.lsock, SockOpt.SNDBUF, bridge_kw.pop("sndbuf"))
        lib.bind(self.lsock, "127.0.0.1", 0)
        lib.listen(self.lsock, 4)
        self.port = lib.getsockname(self.lsock)[1]
        self.bridge = SrtBridge(lib, asyncio.get_running_loop(), sink, **bridge_kw)  # type: ignore[arg-type]
        self.bridge.add_listener(self.lsock)
        self.bridge.start()
        self.callers: list[int] = []

    def connect(self, latency_ms: int) -> int:
        sock = self.lib.create_socket()
        self.lib.setsockflag(sock, SockOpt.LATENCY, latency_ms)
        self.lib.connect(sock, "127.0.0.1", self.port)
        self.callers.append(sock)
        return sock

    async def close(self) -> None:
        for s in self.callers:
            self.lib.c.srt_close(s)
        self.bridge.remove_listener(self.lsock)
        self.lib.c.srt_close(self.lsock)
        for s in self.sink.accepted:
            self.bridge.close_socket(s)
        await self.bridge.aclose()


async def wait_for(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_one_handoff_per_wakeup_and_latency(lib: SrtLibrary, monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    handoffs = 0
    original = loop.call_soon_threadsafe

    def counting(callback, *args, **kw):  # type: ignore[no-untyped-def]
        nonlocal handoffs
        if getattr(callback, "__name__", "") == "_deliver":
            handoffs += 1
        return original(callback, *args, **kw)

    monkeypatch.setattr(loop, "call_soon_threadsafe", counting)
    sink = Sink()
    rig = Rig(lib, sink, latency_ms=20)
    try:
        caller = await asyncio.to_thread(rig.connect, 20)

        def send_paced() -> None:
            # 100 messages 5 ms apart, then a burst of 200
            for i in range(100):
                lib.sendmsg(caller, struct.pack("!d", time.monotonic()) + bytes(180))
                time.sleep(0.005)
            for i in range(200):
                lib.sendmsg(caller, struct.pack("!d", time.monotonic()) + bytes(1308))

        await asyncio.to_thread(send_paced)
        await wait_for(lambda: sum(map(len, sink.messages.values())) == 300)
        (sock,) = sink.accepted
        got = sink.messages[sock]
        delays_ms = [(now - struct.unpack("!d", m[:8])[0]) * 1000 for m, now in got]
        stats = rig.bridge.stats
        # every hand-off was a single call_soon_threadsafe carrying a whole wakeup
        assert handoffs == stats.batches <= stats.wakeups
        assert stats.messages == 300 and stats.bytes == 100 * 188 + 200 * 1316
        # the burst was delivered in few batches, not per packet
        assert sink.data_calls < 150
        # TSBPD holds each message for the 20 ms latency; we add little on top
        assert 19.0 <= statistics.median(delays_ms) < 30.0, statistics.median(delays_ms)
        assert max(delays_ms) < 80.0
    finally:
        await rig.close()


async def test_send_never_blocks_and_counts_drops(lib: SrtLibrary) -> None:
    sink = Sink()
    # a small send buffer (32 packets' worth) so a burst overflows it
    rig = Rig(lib, sink, latency_ms=120, sndbuf=32 * 1500)
    try:
        reader = await asyncio.to_thread(rig.connect, 120)
        await wait_for(lambda: len(sink.accepted) == 1)
        (sock,) = sink.accepted
        payload = b"\x47" + bytes(1315)
        t0 = time.monotonic()
        sent = dropped = 0
        for _ in range(2000):
            s, d, broken = rig.bridge.send(sock, payload)
            assert not broken
            sent += s
            dropped += d
        elapsed = time.monotonic() - t0
        assert dropped > 0 and sent > 0 and sent + dropped == 2000
        assert elapsed < 0.5  # 2000 non-blocking calls
        # large buffers are split into 1316-byte messages
        s, d, broken = rig.bridge.send(sock, payload * 3)
        assert s + d == 3 and not broken
        lib.c.srt_close(reader)
        await wait_for(lambda: sock in sink.closed)
        # after the peer left, a send reports the connection broken
        assert rig.bridge.send(sock, payload)[2] is True
    finally:
        await rig.close()


async def test_broken_socket_is_drained_before_close(lib: SrtLibrary) -> None:
    """A caller that hangs up right after sending: the messages still inside
    the receiver's latency window are delivered, then the close."""
    sink = Sink()
    rig = Rig(lib, sink, latency_ms=300)
    try:
        caller = await asyncio.to_thread(rig.connect, 300)

        def send_and_hang_up() -> None:
            for i in range(30):
                lib.sendmsg(caller, bytes([i]) * 1316)
                time.sleep(0.002)
            time.sleep(0.03)  # sent and acknowledged, still held by TSBPD
            lib.c.srt_close(caller)
            rig.callers.remove(caller)

        await asyncio.to_thread(send_and_hang_up)
        await wait_for(lambda: len(sink.closed) == 1)
        (sock,) = sink.accepted
        got = [m for m, _ in sink.messages.get(sock, [])]
        assert got == [bytes([i]) * 1316 for i in range(30)]
        assert rig.bridge.stats.lingered_messages > 0
        assert sink.closed[sock] == "broken"
    finally:
        await rig.close()


async def test_lagging_loop_drops_instead_of_queueing(lib: SrtLibrary) -> None:
    sink = Sink()
    rig = Rig(lib, sink, latency_ms=20, max_pending_bytes=4000)
    try:
        caller = await asyncio.to_thread(rig.connect, 20)
        await wait_for(lambda: len(sink.accepted) == 1)

        def sender() -> None:
            for _ in range(100):
                lib.sendmsg(caller, bytes(1316))
                time.sleep(0.002)

        t = threading.Thread(target=sender)
        t.start()
        time.sleep(0.5)  # block the event loop: nothing is consumed meanwhile
        t.join()
        await wait_for(lambda: rig.bridge.stats.messages + rig.bridge.stats.dropped_lag_messages == 100)
        assert rig.bridge.stats.dropped_lag_messages > 0
        (sock,) = sink.accepted
        await wait_for(lambda: len(sink.messages.get(sock, [])) == rig.bridge.stats.messages)
        assert rig.bridge.stats.messages < 100
    finally:
        await rig.close()


async def test_stop_is_prompt(lib: SrtLibrary) -> None:
    sink = Sink()
    rig = Rig(lib, sink, latency_ms=20, wait_timeout_ms=50)
    assert rig.bridge.running
    t0 = time.monotonic()
    await rig.close()
    assert not rig.bridge.running
    assert time.monotonic() - t0 < 0.5
    rig.bridge.release()  # idempotent
    with pytest.raises(RuntimeError):
        rig.bridge.start()
