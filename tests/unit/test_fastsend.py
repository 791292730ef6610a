"""The C fan-out send (``media/webrtc/_fastsend.c``) against the pure-Python
path it replaces (``_protect_with`` then ``send_runs``): the same datagrams
on the wire, the same byte counts, the same counters and the same errors —
for every frame shape, with and without GSO, IPv4 and IPv6, with the shared
ICE socket's source-address ancillary data, on a full buffer and on send
errors. The README's test command builds the extension, so it must be here."""

from __future__ import annotations

import errno
import os
import socket
import struct
from types import SimpleNamespace
from typing import Any

import pylibsrtp
import pytest

from media.webrtc import aiortc_adapter as adapter

fastsend = adapter._fastsend

IP_PKTINFO = 8  # linux/in.h (Python's socket module lacks it)


def test_the_extension_is_built_and_used() -> None:
    # setup.py marks it optional so that a machine without a compiler still
    # installs; the README's commands install gcc, so here it must exist.
    assert fastsend is not None, "media/webrtc/_fastsend.c was not built"
    assert fastsend.GSO_MAX_SEGMENTS == adapter.GSO_MAX_SEGMENTS
    assert fastsend.GSO_MAX_BYTES == adapter.GSO_MAX_BYTES
    assert fastsend.SRTP_TRAILER == pylibsrtp.SRTP_MAX_TRAILER_LEN


def _rtp(seq: int, size: int) -> bytes:
    return b"\x80\x60" + (seq & 0xFFFF).to_bytes(2, "big") + bytes(4) + b"\x00\x00\x73\x00" + os.urandom(size - 12)


def _session(key: bytes) -> pylibsrtp.Session:
    return pylibsrtp.Session(pylibsrtp.Policy(key=key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND))


def _fast_path(tx: socket.socket, addr: Any, srtp: pylibsrtp.Session, native: bool,
               ancillary: list | None = None) -> adapter.FastPath:
    transport = SimpleNamespace(get_extra_info=lambda name: tx)
    pair = SimpleNamespace(protocol=SimpleNamespace(transport=transport), remote_addr=addr)
    fast = adapter.FastPath(SimpleNamespace(_tx_srtp=srtp, transport=SimpleNamespace(
        _connection=SimpleNamespace(_nominated={1: pair}))), native=native)
    assert (fast._native is not None) == native
    if ancillary is not None:
        fast._current().ancillary = ancillary
    return fast


@pytest.fixture
def udp():
    """``udp(family)`` → (tx, rx): a non-blocking sender and a bound
    receiver with room for a keyframe, on loopback; closed afterwards."""
    made: list[socket.socket] = []

    def pair(family: int = socket.AF_INET) -> tuple[socket.socket, socket.socket]:
        rx = socket.socket(family, socket.SOCK_DGRAM)
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        rx.bind(("127.0.0.1" if family == socket.AF_INET else "::1", 0))
        tx = socket.socket(family, socket.SOCK_DGRAM)
        tx.setblocking(False)
        made.extend((tx, rx))
        return tx, rx

    yield pair
    for sock in made:
        sock.close()


def _drain(rx: socket.socket) -> list[bytes]:
    """What the receiver has queued. On loopback (UDP and Unix) a datagram
    is in the receiver's queue when the send returns, so no waiting."""
    out = []
    rx.setblocking(False)
    while True:
        try:
            out.append(rx.recv(70_000))
        except BlockingIOError:
            return out


#: Frame shapes: audio; a P frame whose shorter last fragment rides in the
#: run; a keyframe past GSO_MAX_SEGMENTS; a shorter packet first; runs of
#: three sizes; a keyframe past GSO_MAX_BYTES in fewer segments.
SHAPES = {
    "audio": [160],
    "p_frame": [1200] * 4 + [700],
    "keyframe_130": [600] * 129 + [300],
    "short_first": [300, 1200, 1200],
    "three_runs": [1000, 1000, 900, 900, 900, 1200],
    "big_segments": [1300] * 55,
}


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("gso", [True, False], ids=["gso", "no_gso"])
def test_same_datagrams_and_counts_as_the_python_path(udp, family, gso) -> None:
    tx, rx = udp(family)
    key = os.urandom(30)
    native = _fast_path(tx, rx.getsockname(), _session(key), native=True)
    python = _fast_path(tx, rx.getsockname(), _session(key), native=False)
    for fast in (native, python):
        fast._current().gso = gso
    seq = 0
    try:
        for name, sizes in SHAPES.items():
            frame = [_rtp(seq + i, size) for i, size in enumerate(sizes)]
            seq += len(sizes)
            got_native = native.send_frame(frame)
            wire_native = _drain(rx)
            got_python = python.send_frame(frame)
            wire_python = _drain(rx)
            assert len(wire_native) == len(sizes), name
            assert wire_native == wire_python, name
            assert got_native == got_python == sum(map(len, wire_native)), name
        for fast in (native, python):
            sender = fast.sender
            assert (sender.backlogged, sender.errors, sender.failing_since) == (0, 0, None)
    finally:
        native.close()
        python.close()


def test_the_shared_ice_sockets_source_address_rides_along(udp) -> None:
    tx, rx = udp()
    # struct in_pktinfo: ifindex, spec_dst (the source), addr
    pktinfo = [(socket.IPPROTO_IP, IP_PKTINFO, struct.pack("=I4s4s", 0, socket.inet_aton("127.0.0.1"), bytes(4)))]
    key = os.urandom(30)
    native = _fast_path(tx, rx.getsockname(), _session(key), True, pktinfo)
    twin = _session(key)
    frame = [_rtp(1, 1200), _rtp(2, 1200), _rtp(3, 500)]
    assert native.send_frame(frame) == sum(len(twin.protect(p)) for p in frame)
    assert len(_drain(rx)) == 3
    native.close()


def test_a_full_buffer_drops_for_this_viewer_and_counts_like_the_python_path(tmp_path) -> None:
    # A Unix datagram receiver that never reads: its queue fills and the
    # sender gets EAGAIN, which a loopback UDP socket never gives.
    path = str(tmp_path / "viewer")
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(path)
    key = os.urandom(30)
    for native in (True, False):
        tx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        tx.setblocking(False)
        fast = _fast_path(tx, ("127.0.0.1", 9), _session(key), native)
        sender = fast._current()
        sender.gso = False
        # struct sockaddr_un; the Python path's sendto takes the path itself.
        sender.addr = path
        fast._wire_of, fast._wire = path, struct.pack("=H", socket.AF_UNIX) + path.encode() + b"\0"
        frames = 2000
        sent = sum(fast.send_frame([_rtp(i * 2, 1200), _rtp(i * 2 + 1, 900)]) for i in range(frames))
        queued = _drain(rx)  # nobody read while sending: what was not dropped is queued
        assert sender.backlogged > 0, native
        assert len(queued) == 2 * frames - sender.backlogged, native
        assert sent == sum(map(len, queued)), native
        assert (sender.errors, sender.failing_since) == (0, None), native
        fast.close()


@pytest.mark.parametrize("addr, code", [(("127.0.0.1", 0), errno.EINVAL), (("255.255.255.255", 9), errno.EACCES)],
                         ids=["port_0", "broadcast"])
def test_a_send_error_is_raised_as_the_python_path_raises_it(addr, code) -> None:
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.setblocking(False)
    key = os.urandom(30)
    for native in (True, False):
        fast = _fast_path(tx, addr, _session(key), native)
        with pytest.raises(OSError) as raised:
            fast.send_frame([_rtp(1, 1200), _rtp(2, 1200), _rtp(3, 500)])
        assert raised.value.errno == code
        fast.close()
    tx.close()


def test_a_transient_error_is_counted_as_the_python_path_counts_it(monkeypatch) -> None:
    # EACCES (broadcast without SO_BROADCAST) counted as transient for this
    # test: the C path hands the failed run to send_runs, which counts it.
    monkeypatch.setattr(adapter, "TRANSIENT_SEND_ERRNOS", adapter.TRANSIENT_SEND_ERRNOS | {errno.EACCES})
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.setblocking(False)
    key = os.urandom(30)
    counters = []
    for native in (True, False):
        fast = _fast_path(tx, ("255.255.255.255", 9), _session(key), native)
        assert fast.send_frame([_rtp(1, 1200), _rtp(2, 1200), _rtp(3, 500)], now=5.0) == 0
        sender = fast.sender
        counters.append((sender.errors, dict(sender.errors_by_errno), sender.failing_since, sender.gso_fallbacks))
        fast.close()
    assert counters[0] == counters[1]
    assert counters[0][:3] == (3, {errno.EACCES: 3}, 5.0)
    tx.close()


def test_what_the_c_path_does_not_take_goes_to_the_python_path(udp, monkeypatch) -> None:
    tx, rx = udp()
    key = os.urandom(30)
    native = _fast_path(tx, rx.getsockname(), _session(key), native=True)
    twin = _session(key)
    # more packets than its buffers hold: the C path declines (None) and
    # the Python path sends the frame
    answers = []
    c_send = fastsend.send_frame
    monkeypatch.setattr(fastsend, "send_frame", lambda *args: answers.append(c_send(*args)) or answers[-1])
    frame = [_rtp(i, 40) for i in range(fastsend.MAX_PACKETS + 1)]
    assert native.send_frame(frame) == sum(len(twin.protect(p)) for p in frame)
    assert answers == [None]
    assert _drain(rx)[0] == twin_first(key, frame[0])
    # a packet longer than pylibsrtp's buffer: declined, and protect's error
    with pytest.raises(ValueError, match="too long"):
        native.send_frame([_rtp(len(frame), 1400)])
    assert answers[-1] is None
    native.close()


def twin_first(key: bytes, packet: bytes) -> bytes:
    return _session(key).protect(packet)


def test_an_srtp_failure_raises_pylibsrtps_error_and_sends_nothing(udp) -> None:
    tx, rx = udp()
    native = _fast_path(tx, rx.getsockname(), _session(os.urandom(30)), native=True)
    frame = [_rtp(7, 1200), _rtp(8, 400)]
    native.send_frame(frame)
    assert len(_drain(rx)) == 2
    with pytest.raises(pylibsrtp.Error, match="replay"):
        native.send_frame(frame)  # the same packet indexes again: libsrtp refuses
    assert _drain(rx) == []
    native.close()


@pytest.mark.parametrize("family, host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_sockaddr_bytes_is_the_kernels_struct_sockaddr(family, host) -> None:
    import ctypes

    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    raw = ctypes.create_string_buffer(128)
    size = ctypes.c_uint32(128)
    assert ctypes.CDLL(None, use_errno=True).getsockname(sock.fileno(), raw, ctypes.byref(size)) == 0
    assert adapter.sockaddr_bytes(family, sock.getsockname()) == raw.raw[:size.value]
    sock.close()


def test_sockaddr_bytes_leaves_anything_else_to_the_python_path() -> None:
    assert adapter.sockaddr_bytes(socket.AF_INET, ("not an address", 1)) is None
    assert adapter.sockaddr_bytes(socket.AF_INET, ("::1", 1)) is None
    assert adapter.sockaddr_bytes(socket.AF_INET6, ("fe80::1%eth0", 1)) is None
    assert adapter.sockaddr_bytes(socket.AF_UNIX, "/a/path") is None


# -- rewrite_send: Rewriter.rewrite_frame's in-order path, fused with the send --

from media.rtp.packet import LayerPacket  # noqa: E402
from media.rtp.rewrite import Rewriter, TrackParams, TransportSeq  # noqa: E402

_REWRITER_STATE = ("_layer", "_target", "_lseq", "_vseq", "_ts_off", "_last_vts", "_last_now", "packets_sent",
                   "octets_sent", "rebases", "switches", "dropped_late")


def _rewriter(params: TrackParams) -> tuple[Rewriter, TransportSeq]:
    twcc = TransportSeq(65530)  # wraps within the test
    return Rewriter(params, 0, transport_seq=twcc, initial_seq=65000, initial_ts=4_000_000_000,
                    initial_rtx_seq=7, map_size=64, max_gap=8), twcc


VIDEO = TrackParams(ssrc=0x1234, payload_type=102, clock_rate=90000, mid="1", mid_id=4, abs_send_time_id=2,
                    transport_cc_id=3, rtx_ssrc=0x5678, rtx_payload_type=103)
AUDIO_PLAIN = TrackParams(ssrc=0x9ABC, payload_type=111, clock_rate=48000)


def _frames(layer_seq: int = 100) -> list[tuple[int, list[LayerPacket], float]]:
    """(layer, frame, now): a keyframe, P frames, a gap within max_gap, a
    duplicate, a frame whose middle packet follows a restart, a jump beyond
    max_gap, another layer's frame, and packets of the layer again."""
    seq, ts, now = layer_seq, 3_000_000_000, 10.0

    def frame(n: int, *, key: bool = False, disc_at: int | None = None, skip: int = 0, layer: int = 0,
              size: int = 1000) -> tuple[int, list[LayerPacket], float]:
        nonlocal seq, ts, now
        seq = (seq + skip) & 0xFFFF
        ts = (ts + 3000) & 0xFFFFFFFF
        now += 1 / 30
        packets = []
        for i in range(n):
            packets.append(LayerPacket(seq, ts, i == n - 1, os.urandom(size if i < n - 1 else size // 3),
                                       keyframe_start=key and i == 0, discontinuity=disc_at == i))
            seq = (seq + 1) & 0xFFFF
        return layer, packets, now

    out = [frame(6, key=True), frame(3), frame(1), frame(4, skip=3), frame(2)]
    dup_layer, dup, dup_now = out[-1]
    out.append((dup_layer, dup[-1:], dup_now + 0.001))  # a duplicate: dropped by both
    out += [frame(3, disc_at=1), frame(2, key=True), frame(3, skip=500), frame(2, key=True),
            frame(3, layer=1, key=True), frame(3), frame(200, size=300)]
    return out


@pytest.mark.parametrize("params", [VIDEO, AUDIO_PLAIN], ids=["video_all_extensions", "audio_no_extensions"])
def test_rewrite_send_matches_rewrite_frame_then_send_frame(udp, params) -> None:
    tx, rx = udp()
    key = os.urandom(30)
    native = _fast_path(tx, rx.getsockname(), _session(key), native=True)
    python = _fast_path(tx, rx.getsockname(), _session(key), native=False)
    rw_native, twcc_native = _rewriter(params)
    rw_python, twcc_python = _rewriter(params)
    handled_any = handled_partly = 0
    for layer, packets, now in _frames():
        # the shell's steps (WhepSession.on_packets)
        handled, sent = native.rewrite_send(rw_native, layer, packets, now)
        rest = rw_native.rewrite_frame(layer, packets[handled:], now) if handled < len(packets) else []
        if rest:
            sent += native.send_frame(rest, now)
        wire_native = _drain(rx)
        out = rw_python.rewrite_frame(layer, packets, now)
        sent_python = python.send_frame(out, now) if out else 0
        wire_python = _drain(rx)
        assert wire_native == wire_python
        assert sent == sent_python == sum(map(len, wire_native))
        assert [getattr(rw_native, k) for k in _REWRITER_STATE] == [getattr(rw_python, k) for k in _REWRITER_STATE]
        assert rw_native._map == rw_python._map
        assert twcc_native.value == twcc_python.value
        handled_any += handled > 0
        handled_partly += 0 < handled < len(packets)
    # the fused path carried most frames, and handed a tail to rewrite_frame
    assert handled_any >= 7 and handled_partly >= 1
    # and NACKs find the same packets through either map
    lost = [vseq & 0xFFFF for vseq in range(rw_python._vseq - 40, rw_python._vseq + 1)]
    assert rw_native.translate_nack(lost) == rw_python.translate_nack(lost)
    assert rw_python.translate_nack(lost)
    native.close()
    python.close()


def test_rewrite_send_takes_nothing_off_its_layer_or_without_the_extension(udp) -> None:
    tx, rx = udp()
    key = os.urandom(30)
    rw, _ = _rewriter(VIDEO)
    layer, packets, now = _frames()[0]
    native = _fast_path(tx, rx.getsockname(), _session(key), native=True)
    assert native.rewrite_send(rw, layer, packets, now) == (0, 0)  # before its first keyframe: no layer yet
    rw.rewrite_frame(layer, packets, now)
    python = _fast_path(tx, rx.getsockname(), _session(key), native=False)
    _, more, now = _frames()[1]
    assert python.rewrite_send(rw, 0, more, now) == (0, 0)
    assert native.rewrite_send(rw, 1, more, now) == (0, 0)
    assert native.rewrite_send(rw, 0, more, now)[0] == len(more)
    native.close()
    python.close()


def test_rewrite_send_hands_what_its_buffers_cannot_hold_to_rewrite_frame() -> None:
    # A frame of more packets than MAX_PACKETS, to a port nobody reads (the
    # kernel drops them; no error): the same bytes counted, the same state.
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.setblocking(False)
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    key = os.urandom(30)
    native = _fast_path(tx, sink.getsockname(), _session(key), native=True)
    python = _fast_path(tx, sink.getsockname(), _session(key), native=False)
    rw_native, _ = _rewriter(VIDEO)
    rw_python, _ = _rewriter(VIDEO)
    keyframe = [LayerPacket(i, 90_000, i == fastsend.MAX_PACKETS + 7, os.urandom(200), keyframe_start=i == 0)
                for i in range(fastsend.MAX_PACKETS + 8)]
    rw_native.rewrite_frame(0, keyframe[:1], 1.0)
    rw_python.rewrite_frame(0, keyframe[:1], 1.0)
    handled, sent = native.rewrite_send(rw_native, 0, keyframe[1:], 1.0)
    assert handled == fastsend.MAX_PACKETS
    sent += native.send_frame(rw_native.rewrite_frame(0, keyframe[1 + handled:], 1.0), 1.0)
    assert sent == python.send_frame(rw_python.rewrite_frame(0, keyframe[1:], 1.0), 1.0)
    assert [getattr(rw_native, k) for k in _REWRITER_STATE] == [getattr(rw_python, k) for k in _REWRITER_STATE]
    assert rw_native._map == rw_python._map
    native.close()
    python.close()
    tx.close()
    sink.close()


# -- fanout: one C call per frame for every viewer's lane ------------------------

from media.layer import AUDIO  # noqa: E402
from media.rtp.layers import LayerPolicy  # noqa: E402
from media.webrtc.fanout import AUDIO_LAYER, PacketFanout, PacketsEvent  # noqa: E402
from media.webrtc.viewer import ViewerEgress  # noqa: E402
from media.webrtc.whep import FrameLane, WhepSession  # noqa: E402


class _Viewer(WhepSession):
    """A WhepSession's fan-out side — its own ``on_packets`` and
    ``on_lane_result`` — without aiortc: the core, the FastPath, the lane;
    what it would do on the loop (``_after``, ``close_soon``) is recorded."""

    def __init__(self, fanout: PacketFanout, fast: adapter.FastPath, lane: bool, n: int) -> None:
        self.id = f"viewer-{n}"
        self.closed = False
        self._closing = None
        self._timer = None
        self._timer_at = None
        self._fast = fast
        self.core = ViewerEgress(fanout, self, cname=b"test", policy=LayerPolicy())
        self.core.set_track("video", Rewriter(VIDEO, 0, transport_seq=TransportSeq(100 * n), initial_seq=1000 * n,
                                              initial_ts=77 * n, initial_rtx_seq=n, map_size=64, max_gap=8),
                            VIDEO.ssrc)
        self.core.set_track("audio", Rewriter(AUDIO_PLAIN, AUDIO, initial_seq=500 * n, initial_ts=11 * n),
                            AUDIO_PLAIN.ssrc)
        self.lane = FrameLane(fast, self.core) if lane else None
        self.calls = 0  # frames that took the per-viewer path
        self.called: list = []
        self.afters: list[tuple[list, bool]] = []
        self.closing: list[str] = []

    def on_packets(self, index: int, packets: list[LayerPacket], now: float) -> None:
        self.calls += 1
        self.called.append((index, packets[0].seq))
        super().on_packets(index, packets, now)

    def _after(self, now: float | None = None) -> None:
        core = self.core
        self.afters.append(([type(e).__name__ for e in core.events], core.timer_changed))
        core.events, core.timer_changed = [], False

    def close_soon(self, reason: str, detail: str = "") -> None:
        self.closing.append(reason)

    def state(self) -> tuple:
        fast, core = self._fast, self.core
        s = fast.sender
        return ([[getattr(rw, k) for k in _REWRITER_STATE] + [bytes(rw._map)] for rw in (core.video, core.audio)],
                core.stats, (s.backlogged, s.errors, s.failing_since) if s is not None else None,
                self.afters, self.closing)


def _feed(seed: int) -> list[tuple[str, list[LayerPacket]]]:
    """A stream's events: a keyframe, P frames, Opus packets between them,
    a gap within max_gap, a restart, a keyframe after it."""
    import random
    rng = random.Random(seed)
    vseq, aseq, ts, ats = 4000, 9000, 1_000_000, 5_000
    out: list[tuple[str, list[LayerPacket]]] = []
    for f in range(40):
        key = f in (0, 20, 31)
        n = 9 if key else rng.choice((1, 2, 4, 5))
        if f == 12:
            vseq += 3  # lost on the way in: a gap the rewriter bridges
        restart = f == 30
        if restart:
            vseq, ts = 100, 7_000
        ts += 3000
        out.append(("main", [LayerPacket(vseq + i & 0xFFFF, ts, i == n - 1,
                                         os.urandom(1100 if i < n - 1 else rng.randrange(200, 1100)),
                                         keyframe_start=key and i == 0, discontinuity=restart and i == 0)
                             for i in range(n)]))
        vseq += n
        for _ in range(2):
            ats += 960
            out.append((AUDIO_LAYER, [LayerPacket(aseq & 0xFFFF, ats, True, os.urandom(rng.randrange(60, 200)),
                                                  keyframe_start=True)]))  # as OpusPacketizer makes them
            aseq += 1
    return out


@pytest.mark.parametrize("join_at", [0, 7], ids=["before_the_first_frame", "mid_gop_with_join_replay"])
def test_fanout_lanes_send_what_each_viewers_own_call_sends(udp, tmp_path, join_at) -> None:
    """Six viewers served by the one C call per frame, and their twins —
    same keys, same rewriter state — each served by its own
    ``on_packets``: the same datagrams on every viewer's wire, the same
    rewriter state and NACK map, the same counters and core events, through
    a keyframe, P frames, Opus, a gap, a restart, a sender whose sends have
    been failing, a freeze ending on a keyframe, a closed viewer and a
    viewer whose socket buffer is full (EAGAIN: the C call hands the rest to
    the session); joined before the stream's first frame, or mid-GOP (a
    join replay, paced by hand here, while the live frames are queued
    behind it). Only what is not the common case takes a viewer's own
    call."""
    clock = [100.0]  # both fan-outs' now: abs-send-time and the NACK map carry it
    fanouts = {"lane": PacketFanout("cam", clock=lambda: clock[0]), "own": PacketFanout("cam", clock=lambda: clock[0])}
    viewers: dict[str, list[_Viewer]] = {"lane": [], "own": []}
    wires: dict[str, list[socket.socket]] = {"lane": [], "own": []}
    keys = [os.urandom(30) for _ in range(6)]
    for kind, fo in fanouts.items():
        for n, key in enumerate(keys):
            if n == 5:  # a Unix datagram receiver nobody reads: its queue fills, then EAGAIN
                path = str(tmp_path / f"{kind}-{n}")
                rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                rx.bind(path)
                tx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                tx.setblocking(False)
                fast = _fast_path(tx, ("127.0.0.1", 9), _session(key), True)
                sender = fast._current()
                sender.addr = path
                fast._wire_of, fast._wire = path, struct.pack("=H", socket.AF_UNIX) + path.encode() + b"\0"
            else:
                tx, rx = udp()
                fast = _fast_path(tx, rx.getsockname(), _session(key), True)
            wires[kind].append(rx)
            viewers[kind].append(_Viewer(fo, fast, kind == "lane", n))
    now = 100.0
    events = _feed(7)
    for step, (layer, packets) in enumerate(events):
        now = clock[0] = now + 0.01
        if step == join_at:
            for kind, fo in fanouts.items():
                for v in viewers[kind]:
                    fo.attach(v, 0, now)
                    v.core.start(now)
        for kind in fanouts:
            vs = viewers[kind]
            if step == 20:
                vs[1]._fast.sender.failing_since = now - 1.0  # sends failed until now
            if layer == "main" and packets[0].keyframe_start and step > 30:
                vs[2].core._frozen_since = now - 0.5  # a PLI before this keyframe
            if step == 50:
                vs[3].closed, vs[3].lane and setattr(vs[3].lane, "fast", None)
        for kind, fo in fanouts.items():
            fo.handle(PacketsEvent("cam", layer, tuple(packets), None, now, None))
            fo.pump_replays(now)
        for n in range(6):
            if n != 5:
                assert _drain(wires["lane"][n]) == _drain(wires["own"][n]), (step, n)
            assert viewers["lane"][n].state() == viewers["own"][n].state(), (step, n)
    for n in range(5):
        assert viewers["lane"][n].core.stats.packets_sent > 0
    queued = [_drain(wires[kind][5]) for kind in ("lane", "own")]
    assert queued[0] == queued[1] and queued[0]
    assert viewers["lane"][5]._fast.sender.backlogged > 0
    for kind in fanouts:
        for v in viewers[kind]:
            v._fast.close()
    # the viewers' own calls: each track's first frame (the rewriter starts
    # on it), the restart and the keyframe the rewriter re-bases on, and
    # what the common case is not; never every frame
    frames = len(events) - join_at
    own = [v.calls for v in viewers["lane"]]
    if join_at:  # + the replay's packets, and the live frames it let through
        assert fanouts["lane"].stats.joins_replayed == 6
        assert max(own[:3]) < frames // 4, own
        return
    assert [v.calls for v in viewers["own"]] == [frames] * 6
    assert own[0] == own[4] == 4, viewers["lane"][0].called
    assert own[1] == own[2] == 5, own  # + the failed sends' end; + the freeze's end
    assert own[3] == 2 + frames - 50, own  # closed at step 50: its own (empty) call each frame
    assert own[5] < frames // 2, own  # a full buffer hands the rest of a frame over, not the frame


def test_an_error_for_one_lane_is_raised_for_it_after_every_other_viewer_got_the_frame(udp) -> None:
    fo = PacketFanout("cam")
    vs, rxs = [], []
    for n in range(4):
        tx, rx = udp()
        rxs.append(rx)
        vs.append(_Viewer(fo, _fast_path(tx, rx.getsockname(), _session(os.urandom(30)), True), True, n))
    events = _feed(3)
    now = 10.0
    for v in vs:
        fo.attach(v, 0, now)
    for layer, packets in events[:4]:
        fo.handle(PacketsEvent("cam", layer, tuple(packets), None, now, None))
    for rx in rxs:
        _drain(rx)
    # viewer 2's next packet gets the index of its last one: libsrtp
    # refuses (replay) for it alone
    vs[2].core.video._vseq -= 1
    layer, packets = next(e for e in events[4:] if e[0] == "main")
    with pytest.raises(pylibsrtp.Error, match="replay"):
        fo.handle(PacketsEvent("cam", layer, tuple(packets), None, now, None))
    for n, rx in enumerate(rxs):
        assert len(_drain(rx)) == (0 if n == 2 else len(packets)), n
    # what the C call itself raises for one lane (here a rewriter it cannot
    # read) is raised for that viewer, after the others got the frame
    vs[1].core.video._map = bytes(vs[1].core.video._map)
    layer, packets = next(e for e in events[5:] if e[0] == "main" and e[1][0].seq > packets[-1].seq)
    with pytest.raises(TypeError, match="unexpected Rewriter layout"):
        fo.handle(PacketsEvent("cam", layer, tuple(packets), None, now, None))
    for n, rx in enumerate(rxs):
        assert len(_drain(rx)) == (0 if n == 1 else len(packets)), n
    for v in vs:
        v._fast.close()
