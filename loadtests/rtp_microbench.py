"""Microbenchmark of the per-packet forwarding work (media/rtp).

Reports µs per packet for:

* packetizing access units (H.264, amortized per RTP packet; Opus),
* the per-viewer header rewrite (``Rewriter.rewrite``), with and without
  header extensions,
* rewrite + SRTP protect through a real ``pylibsrtp.Session``,
* rewrite + protect + ``sendto`` on a loopback UDP socket (the whole
  per-viewer budget: ≤ 16 µs),
* fan-out of one packet to N viewers (each viewer has its own SRTP key, so
  protect cannot be shared), and the fixed per-call cost of
  ``Session.protect`` compared with a call straight into libsrtp through
  pylibsrtp's cffi binding with preallocated buffers,
* one viewer's share of a frame (a 4-packet P frame: three 1200 B FU-A
  fragments and a shorter last one) through the old per-packet path
  (``Rewriter.rewrite`` per packet, ``Session.protect``,
  ``DatagramSender.send_batch``) and the fan-out's per-frame path
  (``Rewriter.rewrite_frame``, ``protect_all``, ``send_runs``: the short
  last packet in the GSO run), each step alone and the whole chain,
* ``--only send``: one datagram to each of 200 viewers by ``sendto``,
  ``sendmsg`` and one ctypes ``sendmmsg``, and what a reader process's
  wake-ups add (issue 15's "consider sendmmsg"),
* ``--only fanout``: a frame to 100 and 200 viewers through the fan-out,
  each viewer's own call chain against one C call for all of them
  (``webrtc.c_fanout``).

Usage: ``python loadtests/rtp_microbench.py [--quick] [--json]``.
Numbers are the median of several timed rounds, single thread.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pylibsrtp  # noqa: E402

from media.rtp.h264 import H264Packetizer  # noqa: E402
from media.rtp.history import PacketHistory  # noqa: E402
from media.rtp.opus import OpusPacketizer  # noqa: E402
from media.rtp.packet import LayerPacket  # noqa: E402
from media.rtp.rewrite import Rewriter, TrackParams, TransportSeq  # noqa: E402


def _nal(rng: random.Random, nal_header: int, size: int) -> bytes:
    # Bytes 1..255 only: no accidental start codes inside the NAL unit.
    return bytes((nal_header,)) + bytes(rng.randrange(1, 256) for _ in range(size - 1))


def synthetic_gop(rng: random.Random, gop: int = 60) -> list[bytes]:
    """One GOP of Annex-B AUs shaped like 1 Mbit/s 30 fps: 30 kB IDR, ~3.7 kB P."""
    sc = b"\x00\x00\x00\x01"
    aus = [
        sc + b"\x09\xf0"  # AUD (stripped)
        + sc + _nal(rng, 0x67, 24) + sc + _nal(rng, 0x68, 5) + sc + _nal(rng, 0x06, 40)
        + sc + _nal(rng, 0x65, 30000)
    ]
    for _ in range(gop - 1):
        aus.append(sc + b"\x09\xf0" + sc + _nal(rng, 0x41, rng.randrange(2500, 5000)))
    return aus


Stat = tuple[float, float]  # (min, median) µs per item over the rounds


def summarize(samples_ns: list[float]) -> Stat:
    return min(samples_ns) / 1000.0, statistics.median(samples_ns) / 1000.0


def timeit(fn: Callable[[], int], rounds: int) -> Stat:
    """µs per item over *rounds*; *fn* runs a batch and returns its item count.

    The minimum is the figure to compare (the machine is shared: other
    processes only ever add time); the median shows the spread.
    """
    fn()  # warm up
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        n = fn()
        samples.append((time.perf_counter_ns() - t0) / n)
    return summarize(samples)


#: key + salt lengths (RFC 3711 §8.2, RFC 7714 §12)
PROFILES = {
    "AES128_CM_SHA1_80": (pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80, 30),
    "AEAD_AES_128_GCM": (pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_128_GCM, 28),
    "AEAD_AES_256_GCM": (pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_256_GCM, 44),
}


def srtp_session(profile: str = "AES128_CM_SHA1_80") -> pylibsrtp.Session:
    srtp_profile, key_len = PROFILES[profile]
    policy = pylibsrtp.Policy(
        key=os.urandom(key_len),
        ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND,
        srtp_profile=srtp_profile,
    )
    policy.allow_repeat_tx = True
    policy.window_size = 1024
    return pylibsrtp.Session(policy)


def layer_packets(count: int, size: int) -> list[LayerPacket]:
    payload = os.urandom(size)
    return [
        LayerPacket(seq=i & 0xFFFF, timestamp=(i // 4) * 3000, marker=(i % 4 == 3), payload=payload)
        for i in range(count)
    ]


def make_rewriter(ssrc: int, extensions: bool, tseq: TransportSeq | None = None) -> Rewriter:
    if extensions:
        params = TrackParams(
            ssrc=ssrc, payload_type=102, clock_rate=90000, mid="0", mid_id=4,
            abs_send_time_id=2, transport_cc_id=3, rtx_ssrc=ssrc + 1, rtx_payload_type=103,
        )
        return Rewriter(params, transport_seq=tseq or TransportSeq(), initial_seq=1000, initial_ts=0)
    params = TrackParams(ssrc=ssrc, payload_type=102, clock_rate=90000)
    return Rewriter(params, initial_seq=1000, initial_ts=0)


def prime(rw: Rewriter, first: LayerPacket) -> None:
    rw.rewrite(0, LayerPacket((first.seq - 1) & 0xFFFF, first.timestamp, False, b"x", True, True), 0.0)


def loopback_pair(rcvbuf: int, *, sndbuf: int | None = None,
                  connect: bool = False) -> tuple[socket.socket, socket.socket, Callable[[], None]]:
    """Non-blocking (tx, rx) UDP sockets on loopback (tx connected to rx
    when ``connect``), and ``drain()``, which empties rx between timed
    rounds so the sender never measures a full receive buffer."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    rx.setblocking(False)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if sndbuf is not None:
        tx.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    tx.setblocking(False)
    if connect:
        tx.connect(rx.getsockname())

    def drain() -> None:
        try:
            while True:
                rx.recv(2048)
        except BlockingIOError:
            pass

    return tx, rx, drain


def run(quick: bool) -> dict[str, Stat]:
    rounds = 5 if quick else 25
    n = 2000 if quick else 4000
    rng = random.Random(7)
    results: dict[str, Stat] = {}

    # -- packetize --------------------------------------------------------
    gop = synthetic_gop(rng)
    pk = H264Packetizer()

    def pack_gop() -> int:
        count = 0
        for i, au in enumerate(gop):
            count += len(pk.packetize(au, i * 3000))
        return count

    results["h264_packetize_per_packet"] = timeit(pack_gop, rounds)
    n_packets = pack_gop()
    results["h264_packets_per_gop"] = (float(n_packets), float(n_packets))

    opus = OpusPacketizer()
    opus_frame = os.urandom(120)

    def pack_opus() -> int:
        p = opus.packetize
        for i in range(n):
            p(opus_frame, i * 960)
        return n

    results["opus_packetize_per_packet"] = timeit(pack_opus, rounds)

    history = PacketHistory()
    hist_pkts = layer_packets(n, 1100)

    def put_history() -> int:
        put = history.put
        for p in hist_pkts:
            put(p, 1.0)
        return n

    results["history_put_per_packet"] = timeit(put_history, rounds)

    # -- rewrite ----------------------------------------------------------
    pkts = layer_packets(n, 1100)
    base = [0]

    def bench_rewrite(extensions: bool) -> Callable[[], int]:
        def fn() -> int:
            rw = make_rewriter(0x1234, extensions)
            prime(rw, pkts[0])
            rewrite = rw.rewrite
            now = 1.0
            for p in pkts:
                rewrite(0, p, now)
            base[0] += 1
            return n

        return fn

    results["rewrite_no_ext"] = timeit(bench_rewrite(False), rounds)
    results["rewrite_mid_abs_twcc"] = timeit(bench_rewrite(True), rounds)

    # -- protect ----------------------------------------------------------
    for size in (100, 1100):
        rw = make_rewriter(0x2000 + size, True)
        sized = layer_packets(n, size)
        prime(rw, sized[0])
        wire = [rw.rewrite(0, p, 1.0) for p in sized]

        for profile in PROFILES:

            def protect_only(wire: list = wire, profile: str = profile) -> int:
                protect = srtp_session(profile).protect
                for w in wire:
                    protect(w)
                return len(wire)

            results[f"protect_{size}B_{profile}"] = timeit(protect_only, rounds)

    # Fixed per-call cost: pylibsrtp.Session.protect vs. libsrtp called
    # through the same cffi binding with a preallocated length pointer.
    from pylibsrtp._binding import ffi, lib

    small = [w[:40] for w in wire]
    cbuf = ffi.new("char[]", 1500)
    mbuf = ffi.buffer(cbuf)
    lenp = ffi.new("int *")

    def protect_small() -> int:
        protect = srtp_session().protect
        for w in small:
            protect(w)
        return len(small)

    def protect_raw_small() -> int:
        sess = srtp_session()
        srtp_ctx = sess._srtp[0]  # the session's srtp_t
        fn = lib.srtp_protect
        for w in small:
            k = len(w)
            mbuf[0:k] = w
            lenp[0] = k
            if fn(srtp_ctx, cbuf, lenp):
                raise RuntimeError("srtp_protect failed")
            mbuf[0 : lenp[0]]
        return len(small)

    results["protect_40B_session_call"] = timeit(protect_small, rounds)
    results["protect_40B_raw_cffi"] = timeit(protect_raw_small, rounds)

    # -- rewrite + protect (+ sendto) --------------------------------------
    def bench_chain(send: bool) -> Callable[[], int]:
        tx, _rx, drain = loopback_pair(1 << 20, connect=True)

        def fn() -> int:
            sess = srtp_session()
            rw = make_rewriter(0x3000, True)
            prime(rw, pkts[0])
            rewrite = rw.rewrite
            protect = sess.protect
            out = tx.send
            count = 0
            for k in range(0, n, 200):
                for p in pkts[k : k + 200]:
                    data = protect(rewrite(0, p, 1.0))
                    if send:
                        try:
                            out(data)
                        except BlockingIOError:
                            pass
                    count += 1
                if send:
                    t0 = time.perf_counter_ns()
                    drain()
                    # do not charge the receiver's work to the sender
                    fn.drained += time.perf_counter_ns() - t0  # type: ignore[attr-defined]
            return count

        fn.drained = 0  # type: ignore[attr-defined]
        return fn

    results["rewrite_protect"] = timeit(bench_chain(False), rounds)
    chain = bench_chain(True)
    samples = []
    chain()
    for _ in range(rounds):
        chain.drained = 0  # type: ignore[attr-defined]
        t0 = time.perf_counter_ns()
        c = chain()
        samples.append((time.perf_counter_ns() - t0 - chain.drained) / c)  # type: ignore[attr-defined]
    results["rewrite_protect_sendto"] = summarize(samples)

    results["rewrite_protect_uvloop_sendto"] = bench_uvloop(pkts, n, rounds)

    # -- fan-out: one layer packet to V viewers ----------------------------
    for viewers in (1, 10, 100):
        tseq = [TransportSeq() for _ in range(viewers)]
        rws = [make_rewriter(0x4000 + v, True, tseq[v]) for v in range(viewers)]
        sessions = [srtp_session() for _ in range(viewers)]
        for rw in rws:
            prime(rw, pkts[0])
        pairs = list(zip([rw.rewrite for rw in rws], [s.protect for s in sessions]))
        per = max(20, n // viewers)
        stream = layer_packets((rounds + 2) * per, 1100)
        cursor = [0]

        def fan(pairs: list = pairs, per: int = per, stream: list = stream, cursor: list = cursor) -> int:
            k = cursor[0]
            cursor[0] = k + per
            for p in stream[k : k + per]:
                for rewrite, protect in pairs:
                    protect(rewrite(0, p, 1.0))
            return per * len(pairs)

        results[f"fanout_{viewers}_viewers_rewrite_protect"] = timeit(fan, rounds)
    results.update(bench_frame_path(rounds))
    results.update(bench_keyframe_interleave(rounds))
    results.update(bench_fastpath(rounds))
    results.update(bench_session_path(rounds))
    results.update(bench_rtcp_receive(rounds))
    return results


def bench_fastpath(rounds: int) -> dict[str, Stat]:
    """The whole per-viewer path of P frames through a real ``FastPath``
    (its ICE pair and DTLS transport stood in by plain objects holding a
    loopback socket and a pylibsrtp session): rewrite per packet +
    ``send_batch`` (before) vs. ``rewrite_frame`` + ``send_frame`` (the
    fan-out's path now), alternated three times, µs per packet."""
    from types import SimpleNamespace

    from media.webrtc.aiortc_adapter import FastPath

    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    rx.setblocking(False)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.setblocking(False)

    class Transport:
        def get_extra_info(self, key: str) -> socket.socket:
            return tx

    def fast_path() -> FastPath:
        pair = SimpleNamespace(protocol=SimpleNamespace(transport=Transport()), remote_addr=rx.getsockname())
        dtls = SimpleNamespace(_tx_srtp=srtp_session(),
                               transport=SimpleNamespace(_connection=SimpleNamespace(_nominated={1: pair})))
        return FastPath(dtls, sndbuf=8 << 20)

    sizes = (1200, 1200, 1200, 457)
    per_round = 150
    frames = [[LayerPacket((f * 4 + k) & 0xFFFF, f * 3000, k == 3, os.urandom(sizes[k])) for k in range(4)]
              for f in range(per_round * (rounds + 1))]
    samples: dict[str, list[float]] = {"fastpath_send_batch": [], "fastpath_send_frame": []}
    for _ in range(3):
        for key in samples:
            fp = fast_path()
            rw = make_rewriter(0x7100, True)
            prime(rw, frames[0][0])
            for r in range(rounds + 1):
                chunk = frames[r * per_round:(r + 1) * per_round]
                t0 = time.perf_counter_ns()
                if key == "fastpath_send_frame":
                    for f in chunk:
                        fp.send_frame(rw.rewrite_frame(0, f, 1.0), 1.0)
                else:
                    for f in chunk:
                        fp.send_batch([d for p in f if (d := rw.rewrite(0, p, 1.0)) is not None], 1.0)
                spent = time.perf_counter_ns() - t0
                try:
                    while True:
                        rx.recv(2048)
                except BlockingIOError:
                    pass
                if r:
                    samples[key].append(spent / (per_round * len(sizes)))
            fp.close()
    return {key: summarize(v) for key, v in samples.items()}


def bench_keyframe_interleave(rounds: int, viewers: int = 100) -> dict[str, Stat]:
    """When does each of ``viewers`` viewers have a 30 kB keyframe (26
    packets) complete — its last packet sent — if the fan-out serves viewer
    after viewer (``k=all``) or hands out chunks of k packets round-robin
    (everyone's first k, then everyone's next k …)? Per-frame path (rewrite,
    protect, GSO send) to a loopback socket; ms after the frame's start,
    p50/p99/max over the viewers, median over the rounds. A viewer can decode
    a frame only once all of it is there: this is the number that counts."""
    from media.webrtc.aiortc_adapter import DatagramSender, protect_all, send_runs

    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 20)
    rx.setblocking(False)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 << 20)
    tx.setblocking(False)
    size, total = 1200, 30_000
    sizes = [size] * (total // size) + ([total % size] if total % size else [])
    out: dict[str, Stat] = {}
    for k in (0, 8, 4):
        label = "all" if k == 0 else str(k)
        rws = [make_rewriter(0x7000 + v, True) for v in range(viewers)]
        sessions = [srtp_session() for _ in range(viewers)]
        senders = [DatagramSender(tx, rx.getsockname()) for _ in range(viewers)]
        p50s, p99s, maxes, frame = [], [], [], 0
        for r in range(rounds + 1):
            base = frame * len(sizes)
            packets = [LayerPacket((base + i) & 0xFFFF, frame * 3000, i == len(sizes) - 1, os.urandom(n),
                                   keyframe_start=i == 0, discontinuity=frame == 0 and i == 0)
                       for i, n in enumerate(sizes)]
            frame += 1
            chunks = [packets] if k == 0 else [packets[i:i + k] for i in range(0, len(packets), k)]
            done = [0] * viewers
            t0 = time.perf_counter_ns()
            for chunk in chunks:
                for v in range(viewers):
                    send_runs(senders[v], protect_all(sessions[v], rws[v].rewrite_frame(0, chunk, 1.0)))
                    done[v] = time.perf_counter_ns()
            try:
                while True:
                    rx.recv(2048)
            except BlockingIOError:
                pass
            if r:  # the first round primes every viewer's rewriter (a keyframe start)
                ms = sorted((d - t0) / 1e6 for d in done)
                p50s.append(ms[len(ms) // 2])
                p99s.append(ms[min(len(ms) - 1, int(len(ms) * 0.99))])
                maxes.append(ms[-1])
        out[f"keyframe_{viewers}v_k{label}_p50_ms"] = (min(p50s), statistics.median(p50s))
        out[f"keyframe_{viewers}v_k{label}_p99_ms"] = (min(p99s), statistics.median(p99s))
        out[f"keyframe_{viewers}v_k{label}_max_ms"] = (min(maxes), statistics.median(maxes))
    return out


def bench_frame_path(rounds: int) -> dict[str, Stat]:
    """One viewer's share of P frames, per packet: old per-packet calls vs.
    the per-frame path, each step and the chain (rewrite → protect → send)."""
    from media.webrtc.aiortc_adapter import DatagramSender, protect_all, send_runs

    frames = 300
    sizes = (1200, 1200, 1200, 457)
    stream = []
    for f in range(frames * (rounds + 2)):
        base = f * len(sizes)
        stream.append([LayerPacket((base + k) & 0xFFFF, f * 3000, k == len(sizes) - 1, os.urandom(sizes[k]))
                       for k in range(len(sizes))])
    per_round = frames * len(sizes)
    out: dict[str, Stat] = {}
    tx, rx, drain = loopback_pair(8 << 20, sndbuf=8 << 20)

    def chain(per_frame: bool, steps: str) -> Callable[[], int]:
        cursor = [0]
        rw = make_rewriter(0x6000, True)
        prime(rw, stream[0][0])
        sess = srtp_session()
        sender = DatagramSender(tx, rx.getsockname())
        # Chosen once, not per frame: both paths pay the same one call.
        send = functools.partial(send_runs, sender) if per_frame else sender.send_batch

        def fn() -> int:
            k = cursor[0]
            cursor[0] = k + frames
            batch = stream[k:k + frames]
            if steps == "send":  # protected datagrams prepared outside the timing
                prepared = [[sess.protect(w) for w in rw.rewrite_frame(0, f, 1.0)] for f in batch]
                t0 = time.perf_counter_ns()
                for datas in prepared:
                    send(datas)
                fn.spent += time.perf_counter_ns() - t0  # type: ignore[attr-defined]
                drain()
                return per_round
            t0 = time.perf_counter_ns()
            for f in batch:
                if per_frame:
                    wire = rw.rewrite_frame(0, f, 1.0)
                else:
                    wire = [d for p in f if (d := rw.rewrite(0, p, 1.0)) is not None]
                if steps == "rewrite":
                    continue
                datas = protect_all(sess, wire) if per_frame else [sess.protect(w) for w in wire]
                if steps == "all":
                    send(datas)
            fn.spent += time.perf_counter_ns() - t0  # type: ignore[attr-defined]
            drain()
            return per_round

        fn.spent = 0  # type: ignore[attr-defined]
        return fn

    for steps in ("rewrite", "protect", "send", "all"):
        for per_frame in (False, True):
            fn = chain(per_frame, steps)
            fn()
            samples = []
            for _ in range(rounds):
                fn.spent = 0  # type: ignore[attr-defined]
                c = fn()
                samples.append(fn.spent / c)  # type: ignore[attr-defined]
            out[f"frame_{steps}_{'per_frame' if per_frame else 'per_packet'}"] = summarize(samples)
    return out


def _viewer_core(ssrc: int = 0x7300) -> tuple[Any, Rewriter, Rewriter]:
    """A ``ViewerEgress`` with a primed video (layer 0) and audio rewriter,
    on a stand-in source with empty histories (what ``WhepSession`` holds)."""
    from media.layer import AUDIO
    from media.rtp.layers import LayerPolicy
    from media.webrtc.viewer import ViewerEgress

    class Source:
        ordered_layers = ()

        def histories(self, sink: Any = None) -> dict:
            return {}

        def anchors(self) -> dict:
            return {}

    core = ViewerEgress(Source(), None, cname=b"bench", policy=LayerPolicy())
    video = make_rewriter(ssrc, True)
    audio = Rewriter(TrackParams(ssrc=ssrc + 2, payload_type=111, clock_rate=48000, mid="1", mid_id=4,
                                 abs_send_time_id=2), initial_layer=AUDIO, initial_seq=10, initial_ts=0)
    core.set_track("video", video, ssrc)
    core.set_track("audio", audio, ssrc + 2)
    return core, video, audio


def bench_session_path(rounds: int) -> dict[str, Stat]:
    """One viewer's share of a frame as ``WhepSession.on_packets`` runs it
    (``whep.forward_frame``: with the C extension one ``rewrite_send`` call,
    else the core's ``on_packets`` and ``FastPath.send_frame``; then the
    core's ``on_sent``); P frames of 4 packets and Opus packets (one per
    call), µs per packet. Each row twice, rounds alternating: through the C
    extension and through the pure-Python path (``_python``;
    ``webrtc.c_fastpath = false``)."""
    from types import SimpleNamespace

    from media.layer import AUDIO
    from media.webrtc.aiortc_adapter import FastPath
    from media.webrtc.whep import forward_frame

    tx, rx, drain = loopback_pair(8 << 20, sndbuf=8 << 20)

    class Transport:
        def get_extra_info(self, key: str) -> socket.socket:
            return tx

    out: dict[str, Stat] = {}
    per_round = 300
    for key, sizes, index in (("session_p_frame", (1200, 1200, 1200, 457), 0), ("session_audio", (160,), AUDIO)):
        frames = [[LayerPacket((f * len(sizes) + k) & 0xFFFF, f * 3000, k == len(sizes) - 1, os.urandom(sizes[k]))
                   for k in range(len(sizes))] for f in range(per_round * (rounds + 1))]
        first = frames[0][0]
        paths = []
        for native in (True, False):
            core, video, audio = _viewer_core()
            (video if index == 0 else audio).rewrite(
                index, LayerPacket((first.seq - 1) & 0xFFFF, first.timestamp, False, b"x", True, True), 0.0)
            pair = SimpleNamespace(protocol=SimpleNamespace(transport=Transport()), remote_addr=rx.getsockname())
            fast = FastPath(SimpleNamespace(_tx_srtp=srtp_session(), transport=SimpleNamespace(
                _connection=SimpleNamespace(_nominated={1: pair}))), sndbuf=8 << 20, native=native)
            paths.append((key if native else key + "_python", core, fast, []))
        for r in range(rounds + 1):
            chunk = frames[r * per_round:(r + 1) * per_round]
            for _, core, fast, samples in paths:
                t0 = time.perf_counter_ns()
                for f in chunk:  # WhepSession.on_packets, less its closed check
                    forward_frame(core, fast, index, f, 1.0)
                spent = time.perf_counter_ns() - t0
                drain()
                if r:
                    samples.append(spent / (per_round * len(sizes)))
        for name, _, fast, samples in paths:
            fast.close()
            out[name] = summarize(samples)
    tx.close()
    rx.close()
    return out


def bench_fanout_lanes(rounds: int, viewers: tuple[int, ...] = (100, 200)) -> dict[str, Stat]:
    """A frame to N viewers through ``PacketFanout`` (issue 15): each
    viewer's own call chain (``WhepSession.on_packets``: ``forward_frame``,
    ``FastPath.rewrite_send``, the C call, the core's ``on_sent``;
    ``webrtc.c_fanout = false``) against one ``_fastsend.fanout`` call for
    all of them (``lane``: the default). P frames of 4 packets (three 1200 B
    FU-A fragments and a shorter last one) and Opus packets, each viewer
    with its own SRTP session and rewriters, sending on one loopback socket
    to one receiver (drained outside the timing); µs per packet-viewer,
    and ``…_last_ms``: when the last viewer's P frame had gone, ms after
    the frame reached the fan-out. Rounds alternate the two paths."""
    from types import SimpleNamespace

    from media.layer import AUDIO
    from media.rtp.layers import LayerPolicy
    from media.webrtc.aiortc_adapter import FastPath
    from media.webrtc.fanout import AUDIO_LAYER, PacketFanout, PacketsEvent
    from media.webrtc.viewer import ViewerEgress
    from media.webrtc.whep import FrameLane, WhepSession

    tx, rx, drain = loopback_pair(8 << 20, sndbuf=8 << 20)

    class Transport:
        def get_extra_info(self, key: str) -> socket.socket:
            return tx

    class Viewer(WhepSession):  # the session's fan-out side, without aiortc
        def __init__(self, fanout: PacketFanout, n: int, lane: bool) -> None:
            self.id, self.closed, self._closing, self._timer, self._timer_at = str(n), False, None, None, None
            pair = SimpleNamespace(protocol=SimpleNamespace(transport=Transport()), remote_addr=rx.getsockname())
            self._fast = FastPath(SimpleNamespace(_tx_srtp=srtp_session(), transport=SimpleNamespace(
                _connection=SimpleNamespace(_nominated={1: pair}))), sndbuf=8 << 20)
            self.core = ViewerEgress(fanout, self, cname=b"bench", policy=LayerPolicy())
            self.core.set_track("video", make_rewriter(0x7300 + n, True), 0x7300 + n)
            self.core.set_track("audio", Rewriter(TrackParams(
                ssrc=0x9300 + n, payload_type=111, clock_rate=48000, mid="1", mid_id=4, abs_send_time_id=2),
                initial_layer=AUDIO), 0x9300 + n)
            self.lane = FrameLane(self._fast, self.core) if lane else None

        def _after(self, now: float | None = None) -> None:
            self.core.events, self.core.timer_changed = [], False

    rng = random.Random(5)
    out: dict[str, list[float]] = {}
    per_round = 60
    for n in viewers:
        setups = {}
        for path in ("own", "lane"):
            fo = PacketFanout("bench")
            vs = [Viewer(fo, i, path == "lane") for i in range(n)]
            for v in vs:
                fo.attach(v, 0, 0.0)
            seq, aseq = 100, 100
            key = [LayerPacket(seq + i, 0, i == 9, os.urandom(1200 if i < 9 else 500), keyframe_start=i == 0)
                   for i in range(10)]
            fo.handle(PacketsEvent("bench", "main", tuple(key), None, 0.0, None))
            fo.handle(PacketsEvent("bench", AUDIO_LAYER, (LayerPacket(aseq, 0, True, os.urandom(120),
                                                                      keyframe_start=True),), None, 0.0, None))
            drain()
            setups[path] = [fo, vs, seq + 10, aseq + 1, 3000, 960]
        for r in range(rounds + 1):
            for path, st in setups.items():
                fo, vs, seq, aseq, ts, ats = st
                spent_v = spent_a = 0
                for _ in range(per_round):
                    frame = tuple(LayerPacket(seq + i, ts, i == 3, os.urandom(1200 if i < 3 else 457))
                                  for i in range(4))
                    t0 = time.perf_counter_ns()
                    fo.handle(PacketsEvent("bench", "main", frame, None, 0.0, None))
                    t1 = time.perf_counter_ns()
                    opus = (LayerPacket(aseq & 0xFFFF, ats, True, os.urandom(rng.randrange(80, 160)),
                                        keyframe_start=True),)
                    fo.handle(PacketsEvent("bench", AUDIO_LAYER, opus, None, 0.0, None))
                    t2 = time.perf_counter_ns()
                    drain()
                    spent_v += t1 - t0
                    spent_a += t2 - t1
                    seq, aseq, ts, ats = (seq + 4) & 0xFFFF, aseq + 1, ts + 3000, ats + 960
                st[2:] = [seq, aseq, ts, ats]
                if r:
                    out.setdefault(f"fanout_{n}v_p_frame_{path}", []).append(spent_v / (per_round * 4 * n))
                    out.setdefault(f"fanout_{n}v_audio_{path}", []).append(spent_a / (per_round * n))
                    out.setdefault(f"fanout_{n}v_p_frame_{path}_last_ms", []).append(spent_v / per_round / 1e3)
        for path, (fo, vs, *_rest) in setups.items():
            sent = sum(v.core.stats.packets_sent for v in vs)
            assert sent >= n * (rounds + 1) * per_round * 5, (path, sent)  # every viewer got every frame
            for v in vs:
                v._fast.close()
    tx.close()
    rx.close()
    return {k: summarize(v) for k, v in out.items()}


def bench_rtcp_receive(rounds: int) -> dict[str, Stat]:
    """A viewer's compound RR + REMB (what Chromium sends 3–4 times a
    second) from SRTCP to the viewer core, µs per datagram: through aiortc
    (aioice's queue and a task wake-up, ``RtcpPacket.parse``, its router,
    the packets re-serialized for ``parse_rtcp``, ``on_rtcp``) against
    ``capture_rtcp`` (unprotect, ``on_rtcp_datagram``), on uvloop."""
    import asyncio

    import uvloop
    from aiortc.rtcdtlstransport import RtpRouter
    from aiortc.rtp import RtcpPacket

    from media.rtp.rtcp import Remb, ReportBlock, ReceiverReport, parse_rtcp, serialize_rtcp

    key = os.urandom(30)
    per_round = 2000
    compound = serialize_rtcp((
        ReceiverReport(9, (ReportBlock(0x7300, 0, 0, 1000, 0, 0, 0),)), Remb(9, 1_200_000, (0x7300,))))
    out: dict[str, list[float]] = {"rtcp_receive_aiortc": [], "rtcp_receive_captured": []}

    async def one(kind: str) -> float:
        tx = pylibsrtp.Session(pylibsrtp.Policy(key=key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND))
        rx = pylibsrtp.Session(pylibsrtp.Policy(key=key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND))
        wire = [tx.protect_rtcp(compound) for _ in range(per_round)]
        core, _video, _audio = _viewer_core()
        ntp = 0
        if kind == "rtcp_receive_captured":
            t0 = time.perf_counter_ns()
            for d in wire:
                core.on_rtcp_datagram(rx.unprotect_rtcp(d), 1.0, ntp)
            return (time.perf_counter_ns() - t0) / per_round
        router = RtpRouter()
        router.register_sender(object(), ssrc=0x7300)
        queue: asyncio.Queue = asyncio.Queue()

        async def dtls_task() -> None:  # RTCDtlsTransport.__run → _recv_next → _handle_rtcp_data
            for _ in range(per_round):
                data = rx.unprotect_rtcp(await queue.get())
                for packet in RtcpPacket.parse(data):
                    for _recipient in router.route_rtcp(packet):
                        for p in parse_rtcp(bytes(packet)):  # ForwardingSender._handle_rtcp_packet
                            core.on_rtcp("video", p, 1.0, ntp)

        task = asyncio.ensure_future(dtls_task())
        await asyncio.sleep(0)
        t0 = time.perf_counter_ns()
        for d in wire:  # one datagram per loop turn, as they arrive
            queue.put_nowait(d)
            await asyncio.sleep(0)
        await task
        return (time.perf_counter_ns() - t0) / per_round

    loop = uvloop.new_event_loop()
    try:
        for _ in range(rounds):
            for kind in out:
                out[kind].append(loop.run_until_complete(one(kind)))
    finally:
        loop.close()
    return {k: summarize(v) for k, v in out.items()}


def bench_relay_read(rounds: int, viewers: int = 200) -> dict[str, Stat]:
    """The worker's end of the ICE relay (media/webrtc/icerelay.py): µs per
    relayed datagram (a viewer's 52-byte SRTCP from its verified address,
    one of ``viewers`` sessions) from the relay socket to the session's
    protocol, one message per read as RTCP arrives. ``relay_read`` is
    ``RelayedIceMux._relay_readable`` (one buffer read into, each header
    decoded once); ``relay_read_decode`` is the read it replaced, kept here
    to compare: ``recvmsg`` of a fresh 64 KiB buffer, ``decode``,
    ``relayed``, and the read that finds the socket empty."""
    import asyncio

    import uvloop
    from aioice import Connection

    from media.webrtc.icemux import IceMux, IceMuxConfig
    from media.webrtc.icerelay import (
        DATA, MAX_MESSAGE, VERIFIED, IceRelayHub, RelayedIceMux, _FD_SPACE, decode, encode, relay_socketpair,
    )

    per_round = 2000
    out: dict[str, list[float]] = {"relay_read": [], "relay_read_decode": []}

    async def main() -> None:
        mux = IceMux(IceMuxConfig(port=0, bind_address="127.0.0.1", host_addresses=["127.0.0.1"]))
        await mux.start()
        hub = IceRelayHub(mux)
        main_end, worker_end = relay_socketpair()
        worker = RelayedIceMux(hub.worker_handoff(), worker_end, socket.socket(fileno=os.dup(mux.sock.fileno())))
        await worker.start()
        asyncio.get_running_loop().remove_reader(worker_end.fileno())  # read by hand below
        conns = [Connection(ice_controlling=False) for _ in range(viewers)]
        got = [0]

        def received(data: bytes, addr: Any) -> None:
            got[0] += 1

        messages = []
        for i, conn in enumerate(conns):
            worker._hook(conn)
            await conn.gather_candidates()
            worker.sessions[conn.local_username].protocol.datagram_received = received
            messages.append(encode(DATA, conn.local_username, ("198.51.100.7", 40000 + i), "127.0.0.1",
                                   b"\x81\xc9\x00\x07" + os.urandom(48), VERIFIED))
        sock = worker_end

        def old_read() -> None:  # the read _relay_readable replaced
            while True:
                try:
                    data, _anc, _flags, _addr = sock.recvmsg(MAX_MESSAGE, _FD_SPACE)
                except BlockingIOError:
                    return
                worker.relayed(decode(data))

        reads = {"relay_read": worker._relay_readable, "relay_read_decode": old_read}
        for r in range(rounds + 1):
            for key, read in reads.items():
                spent = 0
                for k in range(per_round):
                    main_end.send(messages[k % viewers])
                    t0 = time.perf_counter_ns()
                    read()
                    spent += time.perf_counter_ns() - t0
                if r:
                    out[key].append(spent / per_round)
        assert got[0] == (rounds + 1) * per_round * len(reads), got
        for conn in conns:
            await conn.close()
        await worker.close()
        main_end.close()
        await mux.close()

    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    return {k: summarize(v) for k, v in out.items()}


def bench_timer_grid(rounds: int, viewers: int = 200, seconds: float = 4.0) -> dict[str, Stat]:
    """``viewers`` viewers' once-a-second sender-report timers on uvloop,
    nothing else running: each at its own phase (before) against on the
    process's grid (media/webrtc/viewer.py ``on_timer_grid``). ``…_cpu_us``:
    process CPU per timer fired; ``…_wakeups_per_s``: the loop's sleeps that
    ended (voluntary context switches) per second."""
    import asyncio
    import resource

    import uvloop

    from media.webrtc.viewer import REPORT_INTERVAL_S, on_timer_grid

    out: dict[str, list[float]] = {}
    rounds = max(2, rounds // 5)
    for _ in range(rounds):
        for mode in ("own_phase", "grid"):
            loop = uvloop.new_event_loop()
            fired = [0]
            place = (lambda at: at) if mode == "own_phase" else on_timer_grid

            def fire(loop: Any = loop, place: Any = place, fired: list = fired) -> None:
                fired[0] += 1
                loop.call_at(place(loop.time() + REPORT_INTERVAL_S), fire)

            start = loop.time()
            rng = random.Random(7)
            for _v in range(viewers):
                loop.call_at(place(start + rng.random() * REPORT_INTERVAL_S), fire)
            ru0, cpu0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time()
            loop.run_until_complete(asyncio.sleep(seconds))
            ru1, cpu1 = resource.getrusage(resource.RUSAGE_SELF), time.process_time()
            loop.close()
            out.setdefault(f"timers_{viewers}v_{mode}_cpu_us", []).append((cpu1 - cpu0) * 1e6 / max(fired[0], 1))
            out.setdefault(f"timers_{viewers}v_{mode}_wakeups_per_s", []).append((ru1.ru_nvcsw - ru0.ru_nvcsw) / seconds)
    return {k: (min(v), statistics.median(v)) for k, v in out.items()}


def bench_send_across_viewers(rounds: int, viewers: int = 200, size: int = 1100) -> dict[str, Stat]:
    """Issue 15's "consider sendmmsg": one datagram to each of ``viewers``
    loopback destinations (a distinct payload each, as SRTP makes them),
    µs of this process's CPU per datagram: ``sendto`` per viewer,
    ``sendmsg`` per viewer (what the fan-out calls), and one ``sendmmsg``
    for all of them through ctypes (Python's ``socket`` has no sendmmsg),
    where each call points the message vector at that frame's datagrams.
    Then ``sendto`` and ``sendmsg`` again with a second process blocked in
    ``epoll`` on every destination socket (what a swarm of viewers on the
    same machine does): its wake-ups are charged to the sender."""
    import ctypes
    import ctypes.util
    import multiprocessing
    import select

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)

    class IoVec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

    class SockaddrIn(ctypes.Structure):
        _fields_ = [("family", ctypes.c_ushort), ("port", ctypes.c_uint16), ("addr", ctypes.c_uint32),
                    ("zero", ctypes.c_char * 8)]

    class MsgHdr(ctypes.Structure):
        _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32), ("iov", ctypes.POINTER(IoVec)),
                    ("iovlen", ctypes.c_size_t), ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                    ("flags", ctypes.c_int)]

    class MMsgHdr(ctypes.Structure):
        _fields_ = [("hdr", MsgHdr), ("len", ctypes.c_uint)]

    libc.sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
    rx = []
    for _ in range(viewers):
        r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        r.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        r.bind(("127.0.0.1", 0))
        r.setblocking(False)
        rx.append(r)
    addrs = [r.getsockname() for r in rx]
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
    payloads = [os.urandom(size) for _ in range(viewers)]
    msgs, iovs, names = (MMsgHdr * viewers)(), (IoVec * viewers)(), (SockaddrIn * viewers)()
    for i, (host, port) in enumerate(addrs):
        names[i].family, names[i].port = socket.AF_INET, socket.htons(port)
        names[i].addr = int.from_bytes(socket.inet_aton(host), "little")
        msgs[i].hdr.name, msgs[i].hdr.namelen = ctypes.addressof(names[i]), ctypes.sizeof(SockaddrIn)
        msgs[i].hdr.iov, msgs[i].hdr.iovlen = ctypes.pointer(iovs[i]), 1

    def drain() -> None:
        for r in rx:
            try:
                while True:
                    r.recv(2048)
            except BlockingIOError:
                pass

    def per_sendto() -> None:
        for d, a in zip(payloads, addrs):
            tx.sendto(d, a)

    def per_sendmsg() -> None:
        for d, a in zip(payloads, addrs):
            tx.sendmsg([d], (), 0, a)

    def one_sendmmsg() -> None:
        for i, d in enumerate(payloads):
            iovs[i].base = ctypes.cast(ctypes.c_char_p(d), ctypes.c_void_p).value
            iovs[i].len = len(d)
        done = 0
        while done < viewers:
            n = libc.sendmmsg(tx.fileno(), ctypes.addressof(msgs) + done * ctypes.sizeof(MMsgHdr), viewers - done, 0)
            if n < 0:
                raise OSError(ctypes.get_errno(), "sendmmsg")
            done += n

    def measure(fns: dict[str, Callable[[], None]], *, pause: float = 0.0) -> dict[str, list[float]]:
        got: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(rounds):
            for key, fn in fns.items():
                drain()
                t0 = time.process_time_ns()
                for _ in range(10):
                    fn()
                    if pause:
                        time.sleep(pause)  # frames apart: the reader sleeps again in between
                got[key].append((time.process_time_ns() - t0) / (10 * viewers))
        return got

    out = measure({"send_sendto": per_sendto, "send_sendmsg": per_sendmsg, "send_sendmmsg_ctypes": one_sendmmsg})
    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()

    def reader() -> None:
        ep = select.epoll()
        for r in rx:
            ep.register(r.fileno(), select.EPOLLIN)
        by_fd = {r.fileno(): r for r in rx}
        while not stop.is_set():
            for fd, _ in ep.poll(0.1):
                try:
                    while True:
                        by_fd[fd].recv(2048)
                except BlockingIOError:
                    pass

    proc = ctx.Process(target=reader, daemon=True)
    proc.start()
    try:
        time.sleep(0.3)
        woken = measure({"send_sendto_reader": per_sendto, "send_sendmsg_reader": per_sendmsg}, pause=0.002)
    finally:
        stop.set()
        proc.join(5)
    out.update(woken)
    for r in rx:
        r.close()
    tx.close()
    return {k: summarize(v) for k, v in out.items()}


def bench_uvloop(pkts: list[LayerPacket], n: int, rounds: int) -> Stat:
    """rewrite + protect + ``DatagramTransport.sendto`` on a uvloop loop (the
    transport kind aioice hands packets to), receiver drained between rounds."""
    import asyncio

    try:
        import uvloop
    except ImportError:
        return (float("nan"), float("nan"))

    class Sink(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: object) -> None:
            pass

    async def main() -> Stat:
        loop = asyncio.get_running_loop()
        rx, _ = await loop.create_datagram_endpoint(Sink, local_addr=("127.0.0.1", 0))
        addr = rx.get_extra_info("sockname")
        tx, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0))
        samples = []
        for r in range(rounds + 1):
            sess = srtp_session()
            rw = make_rewriter(0x5000, True)
            prime(rw, pkts[0])
            rewrite, protect, sendto = rw.rewrite, sess.protect, tx.sendto
            elapsed = 0
            for k in range(0, n, 200):
                t0 = time.perf_counter_ns()
                for p in pkts[k : k + 200]:
                    sendto(protect(rewrite(0, p, 1.0)), addr)
                elapsed += time.perf_counter_ns() - t0
                await asyncio.sleep(0)  # let the receiver drain (not timed)
                await asyncio.sleep(0)
            if r:
                samples.append(elapsed / n)
        tx.close()
        rx.close()
        return summarize(samples)

    return uvloop.run(main())


LABELS = {
    "h264_packetize_per_packet": "H.264 packetize, per RTP packet (1 Mbit/s GOP)",
    "h264_packets_per_gop": "  RTP packets per 60-frame GOP",
    "opus_packetize_per_packet": "Opus packetize, per packet",
    "history_put_per_packet": "history put, per packet",
    "rewrite_no_ext": "rewrite, no header extensions",
    "rewrite_mid_abs_twcc": "rewrite, mid + abs-send-time + transport-cc",
    "protect_100B_AES128_CM_SHA1_80": "pylibsrtp protect, 100 B payload, AES128_CM_SHA1_80",
    "send_sendto": "1100 B to each of 200 viewers: sendto per viewer",
    "send_sendmsg": "1100 B to each of 200 viewers: sendmsg per viewer",
    "send_sendmmsg_ctypes": "1100 B to each of 200 viewers: one sendmmsg (ctypes)",
    "send_sendto_reader": "  the same, a reader process in epoll: sendto",
    "send_sendmsg_reader": "  the same, a reader process in epoll: sendmsg",
    "protect_100B_AEAD_AES_128_GCM": "pylibsrtp protect, 100 B payload, AEAD_AES_128_GCM",
    "protect_100B_AEAD_AES_256_GCM": "pylibsrtp protect, 100 B payload, AEAD_AES_256_GCM",
    "protect_1100B_AES128_CM_SHA1_80": "pylibsrtp protect, 1100 B payload, AES128_CM_SHA1_80",
    "protect_1100B_AEAD_AES_128_GCM": "pylibsrtp protect, 1100 B payload, AEAD_AES_128_GCM",
    "protect_1100B_AEAD_AES_256_GCM": "pylibsrtp protect, 1100 B payload, AEAD_AES_256_GCM",
    "protect_40B_session_call": "protect 40 B via Session.protect",
    "protect_40B_raw_cffi": "protect 40 B via libsrtp (cffi, preallocated)",
    "rewrite_protect": "rewrite + protect (1100 B)",
    "rewrite_protect_sendto": "rewrite + protect + loopback sendto (1100 B)",
    "rewrite_protect_uvloop_sendto": "rewrite + protect + uvloop transport.sendto (1100 B)",
    "fanout_1_viewers_rewrite_protect": "fan-out 1 viewer, per viewer-packet",
    "fanout_10_viewers_rewrite_protect": "fan-out 10 viewers, per viewer-packet",
    "fanout_100_viewers_rewrite_protect": "fan-out 100 viewers, per viewer-packet",
    "frame_rewrite_per_packet": "P frame, rewrite per packet",
    "frame_rewrite_per_frame": "P frame, rewrite_frame",
    "frame_protect_per_packet": "P frame, rewrite + Session.protect per packet",
    "frame_protect_per_frame": "P frame, rewrite_frame + protect_all",
    "frame_send_per_packet": "P frame, send only: DatagramSender.send_batch (2 syscalls)",
    "frame_send_per_frame": "P frame, send only: send_runs (short tail in the GSO run)",
    "frame_all_per_packet": "P frame, whole chain, per-packet path",
    "frame_all_per_frame": "P frame, whole chain, per-frame path (FastPath.send_frame)",
    "fastpath_send_batch": "FastPath: rewrite per packet + send_batch (before)",
    "fastpath_send_frame": "FastPath: rewrite_frame + send_frame (the fan-out now)",
    "session_p_frame": "session path, 4-packet P frame (C extension)",
    "session_p_frame_python": "session path, 4-packet P frame (pure Python)",
    "session_audio": "session path, Opus packet (C extension)",
    "session_audio_python": "session path, Opus packet (pure Python)",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer packets and rounds")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--only", choices=("session", "rtcp", "send", "fanout", "relay", "timers"),
                    help="only one section: the session's per-frame path, the RTCP receive path, one "
                         "datagram to each of 200 viewers (sendto / sendmsg / sendmmsg), a frame to "
                         "100 and 200 viewers per viewer against one C call for all (webrtc.c_fanout), "
                         "the worker's relay read, or 200 viewers' report timers (own phase / grid)")
    args = ap.parse_args()
    rounds = 5 if args.quick else 25
    if args.only:
        section = {"session": bench_session_path, "rtcp": bench_rtcp_receive, "send": bench_send_across_viewers,
                   "fanout": bench_fanout_lanes, "relay": bench_relay_read, "timers": bench_timer_grid}
        results = section[args.only](rounds)
        for key, (lo, med) in results.items():
            print(f"{LABELS.get(key, key):<60} {lo:>7.2f} {med:>7.2f}")
        return
    results = run(args.quick)
    if args.json:
        print(json.dumps({k: {"min_us": lo, "median_us": med} for k, (lo, med) in results.items()}, indent=2))
        return
    print(f"{'µs per packet (keyframe_*: ms after the frame started)':<60} {'min':>7} {'median':>7}")
    for key, (lo, med) in results.items():
        print(f"{LABELS.get(key, key):<60} {lo:>7.2f} {med:>7.2f}")
    lo, med = results["rewrite_protect_sendto"]
    print(f"\nper-viewer budget 16 µs: rewrite+protect+sendto = {lo:.2f} µs min, {med:.2f} µs median "
          f"({'within' if med <= 16 else 'OVER'} budget)")


if __name__ == "__main__":
    main()
