"""SrtListener against real SRT peers: ffmpeg, srt-live-transmit, our binding.

Media: a 1.2 s, ~3 Mbit/s H.264+AAC MPEG-TS clip made once per module with
ffmpeg (testsrc, CBR filler so there are enough packets for loss tests).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from media.errors import SrtUnavailable
from media.srt.binding import RejectReason, SockOpt, SrtErrno, SrtLibrary
from media.srt.listener import Decision, RateLimit, SrtConnection, SrtListener, reject_unparsable
from media.srt.streamid import StreamIdRequest

from udp_relay import LossModel, LossyUdpRelay

def _libsrt_missing() -> str | None:
    try:
        SrtLibrary.open().close()
    except SrtUnavailable as exc:
        return str(exc)
    return None


_NO_LIBSRT = _libsrt_missing()

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg built with libsrt"),
    pytest.mark.skipif(_NO_LIBSRT is not None, reason=f"needs libsrt 1.5: {_NO_LIBSRT}"),
]

PASSPHRASES = {
    "cam1": "cam1-passphrase-0001",
    "cam2": "cam2-passphrase-0002",
    "cam3": "cam3-passphrase-0003",
    "cam4": "cam4-passphrase-0004",
}
TOKENS = {"cam4": "good-token"}


def authorize(req: StreamIdRequest | None, peer: str, raw: str) -> Decision:
    if req is None:
        return reject_unparsable(raw)
    if req.stream == "open":
        return Decision.allow()
    if req.stream not in PASSPHRASES:
        return Decision.deny(int(RejectReason.X_NOTFOUND), f"no stream {req.stream}")
    if req.stream in TOKENS and req.token != TOKENS[req.stream]:
        return Decision.deny(int(RejectReason.X_UNAUTHORIZED), "bad token")
    return Decision.allow(passphrase=PASSPHRASES[req.stream])


@dataclass
class Collector:
    """on_connection that keeps every connection's bytes and close reason."""

    connections: list[SrtConnection] = field(default_factory=list)
    data: dict[int, bytearray] = field(default_factory=dict)
    closed: dict[int, str] = field(default_factory=dict)
    stats_at_close: dict[int, dict[str, float | int]] = field(default_factory=dict)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def __call__(self, conn: SrtConnection) -> None:
        self.connections.append(conn)
        buf = self.data.setdefault(conn.socket_id, bytearray())

        def on_data(messages: list[bytes], now: float) -> None:
            for m in messages:
                buf.extend(m)

        def on_close(reason: str) -> None:
            self.closed[conn.socket_id] = reason

        conn.on_data = on_data
        conn.on_close = on_close
        self.arrived.set()

    def by_stream(self, stream: str) -> list[SrtConnection]:
        return [c for c in self.connections if c.request is not None and c.request.stream == stream]

    def bytes_of(self, stream: str) -> bytes:
        return b"".join(bytes(self.data[c.socket_id]) for c in self.by_stream(stream))


def ts_continuity_errors(data: bytes) -> tuple[int, int]:
    """(packets, errors): sync bytes and continuity_counter per PID
    (ISO/IEC 13818-1 2.4.3.3: +1 mod 16 per packet with payload; a single
    duplicate is allowed; discontinuity_indicator resets)."""
    assert len(data) % 188 == 0
    last: dict[int, int] = {}
    errors = 0
    for off in range(0, len(data), 188):
        if data[off] != 0x47:
            errors += 1
            continue
        b1, b2, b3 = data[off + 1], data[off + 2], data[off + 3]
        pid = ((b1 & 0x1F) << 8) | b2
        afc = (b3 >> 4) & 3
        cc = b3 & 0xF
        if pid == 0x1FFF or not afc & 1:
            continue
        discontinuity = bool(afc & 2 and data[off + 4] > 0 and data[off + 5] & 0x80)
        prev = last.get(pid)
        if prev is not None and not discontinuity and cc not in ((prev + 1) % 16, prev):
            errors += 1
        last[pid] = cc
    return len(data) // 188, errors


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("srt") / "clip.ts"
    subprocess.run(
        [
            "ffmpeg", "-hide_banner", "-loglevel", "error", "-y",
            "-f", "lavfi", "-i", "testsrc=size=320x240:rate=25",
            "-f", "lavfi", "-i", "sine=frequency=1000:sample_rate=48000",
            "-t", "1.2", "-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency", "-pix_fmt", "yuv420p",
            "-b:v", "3000k", "-minrate", "3000k", "-maxrate", "3000k", "-bufsize", "600k",
            "-x264-params", "nal-hrd=cbr", "-c:a", "aac", "-b:a", "64k", "-f", "mpegts", str(out),
        ],
        check=True,
        timeout=60,
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def clip_remux(clip: Path) -> bytes:
    """What `ffmpeg -c copy -f mpegts` makes of the clip: the bytes a
    lossless SRT publish must deliver (the muxer is deterministic)."""
    return subprocess.run(
        ["ffmpeg", "-hide_banner", "-loglevel", "error", "-i", str(clip), "-c", "copy", "-f", "mpegts", "-"],
        check=True,
        capture_output=True,
        timeout=60,
    ).stdout


def srt_url(port: int, streamid: str, **params: object) -> str:
    query = "&".join([f"streamid={streamid}"] + [f"{k}={v}" for k, v in params.items()])
    return f"srt://127.0.0.1:{port}?{query}"


async def ffmpeg_publish(clip: Path, url: str) -> asyncio.subprocess.Process:
    # linger=1: in live mode libsrt's default linger is 0, so without it the
    # caller's srt_close throws away whatever it had not sent yet; the byte
    # counts below would then depend on ffmpeg's last burst.
    return await asyncio.create_subprocess_exec(
        "ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-re", "-i", str(clip),
        "-c", "copy", "-f", "mpegts", url + "&linger=1",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def finish(proc: asyncio.subprocess.Process, timeout: float = 15) -> tuple[int, str]:
    _, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode or 0, (err or b"").decode(errors="replace")


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


async def wait_settled(size: Callable[[], int], done: Callable[[], bool], quiet_s: float = 1.0,
                       timeout: float = 15.0) -> None:
    """Until ``done()``, or ``size()`` has not grown for ``quiet_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last, since = size(), loop.time()
    while not done():
        now = loop.time()
        if size() != last:
            last, since = size(), now
        elif now - since >= quiet_s:
            return
        if now > deadline:
            raise AssertionError("data still arriving after the deadline")
        await asyncio.sleep(0.02)


def call(
    lib: SrtLibrary, port: int, streamid: str, passphrase: str | None = None, pbkeylen: int | None = None
) -> tuple[int | None, int]:
    """Connect as an SRT caller with our binding: (socket, 0) or (None, reject reason)."""
    sock = lib.create_socket()
    lib.setsockflag(sock, SockOpt.STREAMID, streamid)
    if passphrase:
        lib.setsockflag(sock, SockOpt.PASSPHRASE, passphrase)
    if pbkeylen:
        lib.setsockflag(sock, SockOpt.PBKEYLEN, pbkeylen)
    try:
        lib.connect(sock, "127.0.0.1", port)
    except Exception as exc:
        reason = lib.get_reject_reason(sock)
        lib.close_socket(sock)
        assert getattr(exc, "code", None) in (SrtErrno.ECONNREJ, SrtErrno.ESCLOSED), exc
        return None, reason
    return sock, 0


# ---------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("srt-live-transmit") is None, reason="needs srt-live-transmit (srt-tools)")
async def _concurrent_callers_aes128_aes256_and_srt_live_transmit(clip: Path, clip_remux: bytes) -> None:
    got = Collector()
    async with SrtListener("127.0.0.1", 0, authorize=authorize, on_connection=got) as listener:
        port = listener.port
        aes128 = await ffmpeg_publish(
            clip, srt_url(port, "publish:cam1", passphrase=PASSPHRASES["cam1"], pbkeylen=16, latency=120000)
        )
        aes256 = await ffmpeg_publish(
            clip, srt_url(port, "#!::r=cam2,m=publish,u=alice", passphrase=PASSPHRASES["cam2"], pbkeylen=32, latency=120000)
        )
        # srt-live-transmit as a caller, fed an MPEG-TS on stdin by ffmpeg (real time)
        slt = await asyncio.create_subprocess_shell(
            f"ffmpeg -hide_banner -loglevel error -nostdin -re -i {clip} -c copy -f mpegts - | "
            # -chunk:1316 = 7 TS packets per message; it does not exit at EOF, hence -t:2
            f"srt-live-transmit -q -t:2 -chunk:1316 file://con "
            f"'{srt_url(port, 'publish:cam3', passphrase=PASSPHRASES['cam3'])}'",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        await wait_for(lambda: len(got.connections) == 3)
        await asyncio.sleep(0.6)
        mid_stats = {c.request.stream: c.stats() for c in got.connections if c.request}
        assert listener.counters.active == 3
        results = [await finish(p) for p in (aes128, aes256, slt)]
        assert [rc for rc, _ in results] == [0, 0, 0], results
        await wait_for(lambda: len(got.closed) == 3)
        counters = listener.counters.as_dict()

    assert counters["accepted"] == 3 and counters["rejected"] == 0 and counters["handshake_failed"] == 0
    (c1,), (c2,), (c3,) = got.by_stream("cam1"), got.by_stream("cam2"), got.by_stream("cam3")
    assert (c1.encrypted, c1.pbkeylen) == (True, 16)
    assert (c2.encrypted, c2.pbkeylen) == (True, 32)
    assert c2.request is not None and c2.request.user == "alice"
    assert c3.encrypted
    assert c1.latency_ms == 120
    for name in ("cam1", "cam2", "cam3"):
        data = got.bytes_of(name)
        assert len(data) > 0 and len(data) % 188 == 0 and data[0] == 0x47, name
        packets, cc_errors = ts_continuity_errors(data)
        assert cc_errors == 0, name
        s = mid_stats[name]
        assert s["msRTT"] >= 0 and s["pktRecv"] > 0 and s["pktRcvDrop"] == 0 and s["pktRcvUndecrypt"] == 0
        assert s["mbpsRecvRate"] > 0 and s["latency_ms"] == 120 and s["msRcvTsbPdDelay"] == 120
    # ffmpeg's copy remux is deterministic: every byte arrived, in order
    assert got.bytes_of("cam1") == clip_remux
    assert got.bytes_of("cam2") == clip_remux
    # srt-live-transmit reads stdin in whole chunks: a short last chunk is never sent
    cam3 = got.bytes_of("cam3")
    assert clip_remux.startswith(cam3) and len(clip_remux) - len(cam3) < 1316
    assert set(got.closed.values()) <= {"broken", "closed"}


async def _latency_20ms_on_loopback(clip: Path, clip_remux: bytes) -> None:
    got = Collector()
    async with SrtListener("127.0.0.1", 0, latency_ms=20, authorize=authorize, on_connection=got) as listener:
        proc = await ffmpeg_publish(clip, srt_url(listener.port, "publish:cam1", passphrase=PASSPHRASES["cam1"], latency=20000))
        await wait_for(lambda: len(got.connections) == 1)
        conn = got.connections[0]
        assert conn.latency_ms == 20
        await asyncio.sleep(0.3)
        stats = conn.stats()
        assert stats["msRcvTsbPdDelay"] == 20
        rc, err = await finish(proc)
        assert rc == 0, err
        await wait_for(lambda: got.closed)
    assert got.bytes_of("cam1") == clip_remux
    assert ts_continuity_errors(got.bytes_of("cam1"))[1] == 0


# The media scenarios run two at a time (each on its own listener) to keep
# the suite short: most of their time is ffmpeg's real-time pacing and its
# 1 s linger at close, not CPU.


async def test_concurrent_publishers_and_a_20ms_listener(clip: Path, clip_remux: bytes) -> None:
    """Listener A (120 ms): ffmpeg AES-128 + ffmpeg AES-256 + srt-live-transmit
    at once; listener B (20 ms): ffmpeg at 20 ms latency."""
    async with asyncio.TaskGroup() as tg:
        tg.create_task(_concurrent_callers_aes128_aes256_and_srt_live_transmit(clip, clip_remux))
        tg.create_task(_latency_20ms_on_loopback(clip, clip_remux))


async def test_garbage_flood_and_lossy_relay(lib: SrtLibrary, clip: Path, clip_remux: bytes) -> None:
    """Listener A: garbage/aborted handshakes beside a real caller; listener
    B: a caller through a 5 %-loss relay."""
    async with asyncio.TaskGroup() as tg:
        tg.create_task(_garbage_flood_and_aborted_handshakes_do_not_hurt(lib, clip, clip_remux))
        tg.create_task(_lossy_relay_arq_recovers_everything(clip))


async def test_rejects_seen_by_callers(lib: SrtLibrary, clip: Path) -> None:
    calls: list[str] = []

    def counting_authorize(req: StreamIdRequest | None, peer: str, raw: str) -> Decision:
        calls.append(raw)
        return authorize(req, peer, raw)

    got = Collector()
    async with SrtListener(
        "127.0.0.1", 0, authorize=counting_authorize, on_connection=got, reject_rate_limit=None
    ) as listener:
        port = listener.port
        # application rejects: libsrt hands our srt_setrejectreason code to the caller unchanged
        assert await asyncio.to_thread(call, lib, port, "publish:nope") == (None, 1404)
        assert await asyncio.to_thread(call, lib, port, "#!::r=cam4,m=publish,s=bad", PASSPHRASES["cam4"]) == (None, 1401)
        assert await asyncio.to_thread(call, lib, port, "cam1") == (None, 1400)
        assert await asyncio.to_thread(call, lib, port, "#!::r=cam1,m=bidirectional") == (None, 1405)
        # passphrase problems are rejected by libsrt itself after our callback accepted
        assert await asyncio.to_thread(call, lib, port, "publish:cam1", "wrong-passphrase") == (None, RejectReason.BADSECRET)
        assert await asyncio.to_thread(call, lib, port, "publish:cam1") == (None, RejectReason.UNSECURE)
        assert await asyncio.to_thread(call, lib, port, "publish:open", "unexpected-pass") == (None, RejectReason.UNSECURE)
        # the right token and passphrase get in
        sock, reason = await asyncio.to_thread(call, lib, port, "#!::r=cam4,m=publish,s=good-token", PASSPHRASES["cam4"])
        assert sock is not None and reason == 0
        await wait_for(lambda: len(got.connections) == 1)
        lib.close_socket(sock)

        # ffmpeg: wrong passphrase and unknown stream both fail ("Input/output error")
        wrong = await ffmpeg_publish(clip, srt_url(port, "publish:cam1", passphrase="not-the-passphrase"))
        unknown = await ffmpeg_publish(clip, srt_url(port, "publish:ghost"))
        rc_wrong, err_wrong = await finish(wrong)
        rc_unknown, _ = await finish(unknown)
        assert rc_wrong != 0 and rc_unknown != 0
        assert "Input/output error" in err_wrong
        await wait_for(lambda: listener.counters.handshake_failed == 4)
        counters = listener.counters.as_dict()

    assert counters["rejected_by_reason"] == {1404: 2, 1401: 1, 1400: 1, 1405: 1}
    assert counters["parse_errors"] == 2
    assert counters["accepted"] == 1
    # bad passphrase x2 (ours + ffmpeg), missing passphrase, unexpected passphrase
    assert counters["handshake_failed"] == 4
    assert len(calls) == 10


async def test_reject_rate_limit_skips_authorize(lib: SrtLibrary) -> None:
    calls: list[str] = []

    def counting_authorize(req: StreamIdRequest | None, peer: str, raw: str) -> Decision:
        calls.append(raw)
        return authorize(req, peer, raw)

    async with SrtListener(
        "127.0.0.1",
        0,
        authorize=counting_authorize,
        on_connection=Collector(),
        reject_rate_limit=RateLimit(burst=3, per_second=0.1),
    ) as listener:
        codes = [(await asyncio.to_thread(call, lib, listener.port, "publish:nope"))[1] for _ in range(6)]
        # wrong passphrases are charged too (libsrt rejects them after our callback)
        counters = listener.counters.as_dict()
    assert codes == [1404, 1404, 1404, 1402, 1402, 1402]
    assert len(calls) == 3
    assert counters["rate_limited"] == 3
    assert counters["rejected_by_reason"] == {1404: 3, 1402: 3}


async def test_wrong_passphrases_trip_the_rate_limit(lib: SrtLibrary) -> None:
    async with SrtListener(
        "127.0.0.1", 0, authorize=authorize, on_connection=Collector(), reject_rate_limit=RateLimit(burst=2, per_second=0.1)
    ) as listener:
        for _ in range(2):
            assert (await asyncio.to_thread(call, lib, listener.port, "publish:cam1", "guess-passphrase"))[1] == 10
        await wait_for(lambda: listener.counters.handshake_failed == 2)
        # even the right passphrase is now refused until the bucket refills
        assert await asyncio.to_thread(call, lib, listener.port, "publish:cam1", PASSPHRASES["cam1"]) == (None, 1402)


async def test_read_consumer_gets_what_the_server_sends(clip: Path, tmp_path: Path) -> None:
    got = Collector()
    out = tmp_path / "read.ts"
    async with SrtListener("127.0.0.1", 0, authorize=authorize, on_connection=got) as listener:
        reader = await asyncio.create_subprocess_exec(
            "ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-y",
            "-i", srt_url(listener.port, "read:cam1", passphrase=PASSPHRASES["cam1"]),
            "-c", "copy", "-f", "mpegts", str(out),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        await wait_for(lambda: len(got.connections) == 1)
        conn = got.connections[0]
        assert conn.request is not None and conn.request.action == "read"
        payload = clip.read_bytes()
        step = 1316 * 10
        for off in range(0, len(payload), step):  # ~8 Mbit/s pacing, well within one send buffer
            assert conn.send(payload[off : off + step])
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.4)  # latency + delivery
        stats = conn.stats()
        assert stats["pktSent"] >= len(payload) // 1316 and stats["pktSndDrop"] == 0
        conn.close()
        assert not conn.send(b"\x47" + bytes(187))  # closed: refused
        rc, err = await finish(reader)
    assert got.closed[conn.socket_id] == "local"
    assert conn.send_drops == 0
    probe = subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0",
         "-show_entries", "stream=codec_name,nb_read_frames", "-of", "csv=p=0", str(out)],
        capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    codec, frames = probe.stdout.strip().splitlines()[0].split(",")[:2]
    assert codec == "h264" and int(frames) == 30
    assert out.read_bytes() == payload


def _induction_handshake(socket_id: int) -> bytes:
    """SRT control packet: HANDSHAKE, induction (draft-sharabayko-srt 3.2.1)."""
    header = struct.pack("!IIII", 0x80000000, 0, 0, 0)
    cif = struct.pack("!IHHIIIiII", 4, 0, 2, random.getrandbits(31), 1500, 8192, 1, socket_id, 0) + bytes(16)
    return header + cif


async def _garbage_flood_and_aborted_handshakes_do_not_hurt(lib: SrtLibrary, clip: Path, clip_remux: bytes) -> None:
    got = Collector()
    async with SrtListener("127.0.0.1", 0, authorize=authorize, on_connection=got) as listener:
        port = listener.port
        good = await ffmpeg_publish(clip, srt_url(port, "publish:cam1", passphrase=PASSPHRASES["cam1"]))
        await wait_for(lambda: len(got.connections) == 1)
        rng = random.Random(7)
        induction_answers = 0
        senders = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(8)]
        try:
            for s in senders:
                s.setblocking(False)
            for i in range(3000):
                s = senders[i % len(senders)]
                kind = i % 3
                if kind == 0:
                    s.sendto(rng.randbytes(rng.randint(0, 1500)), ("127.0.0.1", port))
                elif kind == 1:  # looks like SRT control/data with random body
                    s.sendto(bytes([rng.choice((0x80, 0x00))]) + rng.randbytes(rng.randint(15, 200)), ("127.0.0.1", port))
                else:  # a caller that starts a handshake and never finishes it
                    s.sendto(_induction_handshake(rng.getrandbits(30)), ("127.0.0.1", port))
                if i % 200 == 0:
                    await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
            for s in senders:
                while True:
                    try:
                        s.recv(2048)
                    except BlockingIOError:
                        break
                    induction_answers += 1
        finally:
            for s in senders:
                s.close()
        # a real caller killed in the middle of connecting
        quitter = await ffmpeg_publish(clip, srt_url(port, "publish:cam2", passphrase=PASSPHRASES["cam2"]))
        await asyncio.sleep(0.03)
        quitter.send_signal(signal.SIGKILL)
        await quitter.wait()
        # the first caller was not disturbed, and a new caller still gets in
        rc, err = await finish(good)
        assert rc == 0, err
        sock, reason = await asyncio.to_thread(call, lib, port, "publish:cam3", PASSPHRASES["cam3"])
        assert sock is not None, reason
        await wait_for(lambda: len(got.by_stream("cam3")) == 1)
        lib.close_socket(sock)
        assert listener.bridge.running
    assert induction_answers > 0  # libsrt did answer the inductions it parsed
    assert got.bytes_of("cam1") == clip_remux
    assert ts_continuity_errors(got.bytes_of("cam1"))[1] == 0


async def _lossy_relay_arq_recovers_everything(clip: Path) -> None:
    """5 % random loss plus 5-packet bursts, both directions, 120 ms latency.

    The publisher sends video only: with audio, ffmpeg's muxer interleaving
    makes it send in bursts up to ~260 ms apart, and a lost packet at the end
    of a burst is only noticed (and NAKed) when the next burst arrives — too
    late for 120 ms. SRT live mode does no blind retransmission while the
    receiver sends periodic NAK reports (libsrt checkRexmitTimer), so that is
    a property of the sender's pacing, not of ARQ. Video alone arrives at
    most ~45 ms apart, like a real encoder's paced output.
    """
    expected = subprocess.run(
        ["ffmpeg", "-hide_banner", "-loglevel", "error", "-i", str(clip), "-map", "0:v", "-c", "copy", "-f", "mpegts", "-"],
        check=True,
        capture_output=True,
        timeout=60,
    ).stdout
    got = Collector()
    async with SrtListener(
        "127.0.0.1", 0, latency_ms=120, authorize=authorize, on_connection=got, stats_interval_s=0.1
    ) as listener:
        relay = LossyUdpRelay(("127.0.0.1", listener.port), LossModel(loss=0.05, burst_gap=(60, 120), burst_len=5, seed=3))
        relay_port = await relay.start()
        try:
            proc = await asyncio.create_subprocess_exec(
                "ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-re", "-i", str(clip),
                "-map", "0:v", "-c", "copy", "-f", "mpegts",
                srt_url(relay_port, "publish:cam1", passphrase=PASSPHRASES["cam1"], latency=120000, linger=1),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            await wait_for(lambda: len(got.connections) == 1)
            conn = got.connections[0]
            rc, err = await finish(proc)
            assert rc == 0, err
            # the caller's shutdown message may itself be lost, and so may its
            # last packets (nothing after them reveals the gap): wait for the
            # data to be complete, the connection closed, or the byte count
            # to stop growing — never for the peer-idle timeout
            await wait_settled(lambda: len(got.bytes_of("cam1")), done=lambda: (
                len(got.bytes_of("cam1")) >= len(expected) or bool(got.closed)))
            await asyncio.sleep(0.15)
            stats = conn.stats()
        finally:
            relay_stats = relay.stats()
            await relay.close()
    data = got.bytes_of("cam1")
    brief = {k: stats[k] for k in ("pktRecv", "pktRcvLoss", "pktRcvRetrans", "pktRcvDrop", "pktRcvBelated", "msRTT")}
    assert relay_stats["to_target_dropped"] > 15 and relay_stats["burst_dropped"] > 0, relay_stats
    assert relay_stats["to_client_dropped"] > 0, relay_stats  # ACKs/NAKs were lost too
    # Every loss was repaired: what arrived is the sent stream, byte for byte.
    # Only the very end may be short: a lost *final* packet has no successor
    # to reveal the gap, so nobody NAKs it (at most one burst, 5 packets).
    assert expected.startswith(data), (len(data), len(expected), brief, relay_stats)
    assert len(expected) - len(data) <= 5 * 1316, (len(data), len(expected), brief, relay_stats)
    assert ts_continuity_errors(data)[1] == 0
    assert stats["pktRcvLoss"] > 15 and stats["pktRcvRetrans"] > 0, brief
    assert stats["pktRcvDrop"] == 0, brief


async def test_max_connections_and_authorize_errors(lib: SrtLibrary) -> None:
    def fragile(req: StreamIdRequest | None, peer: str, raw: str) -> Decision:
        if req is not None and req.stream == "boom":
            raise RuntimeError("database on fire")
        return authorize(req, peer, raw)

    got = Collector()
    async with SrtListener("127.0.0.1", 0, authorize=fragile, on_connection=got, max_connections=1) as listener:
        port = listener.port
        assert await asyncio.to_thread(call, lib, port, "publish:boom") == (None, 1500)
        first, _ = await asyncio.to_thread(call, lib, port, "publish:open")
        assert first is not None
        await wait_for(lambda: len(got.connections) == 1)
        assert await asyncio.to_thread(call, lib, port, "publish:open") == (None, 1503)
        lib.close_socket(first)
        await wait_for(lambda: listener.counters.active == 0)
        second, _ = await asyncio.to_thread(call, lib, port, "publish:open")
        assert second is not None
        await wait_for(lambda: len(got.connections) == 2)
        lib.close_socket(second)
        counters = listener.counters.as_dict()
    assert counters["authorize_errors"] == 1
    assert counters["rejected_by_reason"] == {1500: 1, 1503: 1}


async def test_key_length_policy_and_latency_override(lib: SrtLibrary) -> None:
    def strict(req: StreamIdRequest | None, peer: str, raw: str) -> Decision:
        return Decision.allow(passphrase="aes256-only-passphrase", pbkeylen=32, latency_ms=250)

    got = Collector()
    async with SrtListener("127.0.0.1", 0, authorize=strict, on_connection=got) as listener:
        weak, _ = await asyncio.to_thread(call, lib, listener.port, "publish:x", "aes256-only-passphrase", 16)
        strong, _ = await asyncio.to_thread(call, lib, listener.port, "publish:y", "aes256-only-passphrase", 32)
        assert strong is not None
        await wait_for(lambda: len(got.connections) == 1 and listener.counters.policy_closed == 1)
        conn = got.connections[0]
        assert conn.request is not None and conn.request.stream == "y"
        assert (conn.pbkeylen, conn.latency_ms) == (32, 250)
        for s in (weak, strong):
            if s is not None:
                lib.close_socket(s)


async def test_close_notifies_connections_and_logs(lib: SrtLibrary, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="returnfeed.srt")
    got = Collector()
    listener = SrtListener("127.0.0.1", 0, authorize=authorize, on_connection=got)
    await listener.start()
    sock, _ = await asyncio.to_thread(call, lib, listener.port, "publish:cam1/low", PASSPHRASES["cam1"])
    assert sock is not None
    assert (await asyncio.to_thread(call, lib, listener.port, "publish:nope"))[1] == 1404
    await wait_for(lambda: len(got.connections) == 1)
    conn = got.connections[0]
    assert conn.request == StreamIdRequest("cam1", "publish", layer="low")
    assert conn.peer.startswith("127.0.0.1:")
    # sending to a publisher's socket works too (bidirectional SRT)
    assert conn.send(b"\x47" + bytes(187))
    await listener.close()
    await listener.close()  # idempotent
    lib.close_socket(sock)
    assert got.closed[conn.socket_id] == "listener_closed"
    assert conn.closed and not conn.send(b"x")
    events = [(r.getMessage(), r.fields) for r in caplog.records if r.name == "returnfeed.srt"]
    assert any(name == "srt.accept" and f["stream"] == "cam1" and f["layer"] == "low" for name, f in events)
    assert any(name == "srt.reject" and f["code"] == 1404 for name, f in events)
    assert any(name == "srt.close" and f["reason"] == "listener_closed" for name, f in events)
    assert {name for name, _ in events} >= {"srt.listen", "srt.accept", "srt.reject", "srt.close",
                                             "srt.listener_closed"}


async def test_ipv6_dual_stack_listener(lib: SrtLibrary) -> None:
    if not socket.has_ipv6 or not os.path.exists("/proc/net/if_inet6"):
        pytest.skip("no IPv6 on this host")
    got = Collector()
    async with SrtListener("::", 0, authorize=authorize, on_connection=got) as listener:
        sock, reason = await asyncio.to_thread(call, lib, listener.port, "publish:open")
        assert sock is not None, reason
        await wait_for(lambda: len(got.connections) == 1)
        lib.close_socket(sock)
    assert got.connections[0].peer.startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:"))
