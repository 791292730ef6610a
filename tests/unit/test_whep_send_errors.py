"""A WHEP session survives transient send errors and ends, with a reason,
only when every send fails for ``send_failure_timeout`` (media/webrtc/whep.py)."""

from __future__ import annotations

import asyncio
import errno

from media.layer import order_layers
from media.rtp.packet import LayerPacket
from media.rtp.rewrite import Rewriter, TrackParams
from media.webrtc import whep
from media.webrtc.aiortc_adapter import DatagramSender


class _Fanout:
    layers = ["high"]

    def detach(self, sink) -> None:
        pass


class _Sock:
    def __init__(self) -> None:
        self.failing = lambda n: False
        self.n = 0
        self.delivered = 0

    def _send(self, count: int) -> None:
        self.n += 1
        if self.failing(self.n):
            raise OSError(errno.EPERM, "Operation not permitted")
        self.delivered += count

    def sendto(self, data, addr):
        self._send(1)

    def sendmsg(self, buffers, anc, flags, addr):
        self._send(1)


class _Fast:
    """FastPath's interface over a DatagramSender, without DTLS/SRTP."""

    def __init__(self, sock) -> None:
        self.sender = DatagramSender(sock, ("127.0.0.1", 9))
        self.sender.gso = False

    @property
    def backlogged(self) -> int:
        return self.sender.backlogged

    def send_batch(self, packets, now=0.0):
        return self.sender.send_batch(packets, now)

    def send_frame(self, packets, now=0.0):  # the fan-out's path (FastPath.send_frame)
        return self.sender.send_batch(packets, now)

    def rewrite_send(self, rewriter, layer, packets, now):  # FastPath without the C extension
        return 0, 0

    def close(self) -> None:
        pass


def _session(service: whep.WhepService, sock: _Sock) -> whep.WhepSession:
    session = whep.WhepSession(service, "cam1", _Fanout(), owner="t")
    session._fast = _Fast(sock)
    session.core.layers = order_layers(["high"])
    rw = Rewriter(TrackParams(ssrc=1234, payload_type=102, clock_rate=90000), initial_layer=0)
    session.core.set_track("video", rw, 1234)
    service.sessions[session.id] = session
    return session


def _frame(seq: int) -> list[LayerPacket]:
    return [LayerPacket(seq=(seq * 4 + i) & 0xFFFF, timestamp=seq * 3000, marker=i == 3, payload=b"x" * 1000,
                        keyframe_start=seq == 0 and i == 0) for i in range(4)]


def test_transient_errors_are_survived_and_persistent_failure_ends_the_session() -> None:
    async def run() -> None:
        service = whep.WhepService(send_failure_timeout=5.0)
        sock = _Sock()
        session = _session(service, sock)
        # A firewall dropping 1 packet in 50 for 20 s: nothing ends.
        sock.failing = lambda n: n % 50 == 0
        t = 0.0
        for i in range(500):
            session.on_packets(0, _frame(i), t)
            t += 0.04
        await asyncio.sleep(0)
        assert not session.closed and session._closing is None
        counters = session.counters()
        assert counters["send_errors"] == 40 and sock.delivered == 2000 - 40
        # Then every send fails: the session ends after 5 s, with its reason.
        sock.failing = lambda n: True
        start, frames = t, 0
        while session._closing is None and t - start < 10:
            session.on_packets(0, _frame(500 + frames), t)
            frames += 1
            t += 0.04
        assert 5.0 <= t - start <= 5.2
        await session._closing
        assert session.closed and session.close_reason == "send_failed"
        assert service.closed_by_reason == {"send_failed": 1}
        total, errors = service.totals()
        assert errors == {"EPERM": counters["send_errors"] + frames * 4}
        assert total.packets_sent >= 2000

    asyncio.run(run())
