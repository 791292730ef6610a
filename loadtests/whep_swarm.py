"""WHEP viewer swarm: N light viewers (loadtests/whep_client.py) against one stream.

Usage::

    # against a running server, stream "cam1" live, 300 viewers over 4 processes
    python loadtests/whep_swarm.py --url http://127.0.0.1:8080/whep/cam1 \\
        --token VIEWER_TOKEN --viewers 300 --procs 4 --rate 50 --hold 30

    # no server needed: a reference sender (stock aiortc, pre-encoded
    # 1 Mbit/s H.264 + Opus, started in its own process) — measures the
    # swarm's own cost and checks the whole tool end to end
    python loadtests/whep_swarm.py --reference-sender --viewers 40 --hold 15

Phases:

1. **ramp** — viewers start at ``--rate`` per second in total (each of the
   ``--procs`` worker processes runs its share on its own uvloop); each does
   offer → POST → answer → ICE → DTLS and then only counts packets;
2. **settle** — ``--settle`` seconds after the last one connected (RTCP and
   the server's layer selection settle);
3. **hold** — a measurement window of ``--hold`` seconds, identical in every
   process (CLOCK_MONOTONIC is system-wide): per viewer counters are
   snapshotted at both ends, the server's ``/metrics`` is scraped and its CPU
   read at both ends;
4. **teardown** — every viewer DELETEs its session resource and closes.

Report (text, or ``--json``):

* viewers requested / connected (DTLS up) / receiving (packets in the
  window), failures by reason;
* setup times p50/p99/max: offer (candidate gathering), POST round trip,
  ICE+DTLS (answer applied → DTLS connected), start → connected, start →
  first RTP packet;
* per viewer in the window: packets/s, kbit/s, video frames/s (min/p50/max);
* sequence accounting as the viewers saw it: skipped (holes at arrival),
  lost (still missing), late, recovered (RTX), duplicates and backwards
  jumps — the last two must be 0 (DESIGN.md invariant 2), SRTP auth
  failures likewise;
* the swarm's own CPU: seconds, % of a core per process, and **µs per
  received packet** — it must stay well below the server's per-packet cost;
* the server: CPU seconds in the window from
  ``returnfeed_process_cpu_seconds_total`` when exported, else from
  ``/proc/<pid>/stat`` (``--server-pid``, or found from the listening port),
  as % of one core, µs per delivered packet, and the implied viewers per
  core at the measured per-viewer bitrate (budget: ≥ 300 at 1 Mbit/s), plus
  every ``returnfeed_*`` series that changed (``--metrics-filter``).

Load traffic stays on 127.0.0.1: the viewers gather only a loopback host
candidate and use no STUN server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import re
import sys
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from whep_client import BROWSER_RTCP, WhepError, WhepViewer, percentile  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
MESSAGE_TIMEOUT = 30.0  # seconds a phase message may be late beyond its schedule


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------


@dataclass
class SwarmConfig:
    url: str
    viewers: int = 10
    procs: int = 1
    rate: float = 20.0  # viewers started per second, all processes together
    hold: float = 20.0
    settle: float = 2.0
    token: str | None = None
    layer: str | None = None
    connect_timeout: float = 20.0
    retry_not_live: float = 0.0
    nack: bool = False
    remb_bps: int = 10_000_000
    rtcp_interval: float = 1.0
    srtp_verify_every: int = 1
    browser_rtcp: bool = False

    def per_process(self) -> list[int]:
        k = max(1, min(self.procs, self.viewers))
        base, extra = divmod(self.viewers, k)
        return [base + (1 if i < extra else 0) for i in range(k)]


# --------------------------------------------------------------------------
# /proc and /metrics
# --------------------------------------------------------------------------


def proc_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (all threads), seconds; None if unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    fields = raw[raw.rindex(b")") + 2:].split()
    # fields[0] is field 3 (state); utime/stime are fields 14/15 (proc(5)).
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def find_listener_pid(port: int) -> int | None:
    """PID of a process of ours listening on TCP *port* (via /proc/net/tcp*), or None."""
    inodes = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(f"socket:[{parts[9]}]")
        except OSError:
            continue
    if not inodes:
        return None
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fd_dir = f"/proc/{entry}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"{fd_dir}/{fd}") in inodes:
                    return int(entry)
            except OSError:
                continue
    return None


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{.*\})?)\s+(\S+)")


def scrape_metrics(url: str, timeout: float = 5.0) -> dict[str, float] | None:
    """Prometheus text exposition → {series: value}; None when unreachable."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            text = resp.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError, ValueError):
        return None
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        m = _SAMPLE.match(line)
        if m:
            try:
                out[m.group(1)] = float(m.group(2))
            except ValueError:
                continue
    return out


def metric_changes(before: dict[str, float], after: dict[str, float], pattern: str) -> list[dict[str, Any]]:
    rx = re.compile(pattern)
    rows = []
    for key in sorted(set(before) | set(after)):
        if not rx.search(key):
            continue
        a, b = before.get(key), after.get(key)
        if a != b:
            rows.append({"series": key, "before": a, "after": b,
                         "delta": (b - a) if a is not None and b is not None else None})
    return rows


def metrics_url_for(whep_url: str) -> str:
    """The server's metrics listener (``metrics.port``, 9998 by default) on
    the WHEP URL's host; metrics are not served on the public port."""
    p = urllib.parse.urlsplit(whep_url)
    return urllib.parse.urlunsplit((p.scheme, f"{p.hostname}:9998", "/metrics", "", ""))


# --------------------------------------------------------------------------
# Worker process
# --------------------------------------------------------------------------


def _viewer_row(v: WhepViewer) -> dict[str, Any]:
    s = v.stats
    return {"connected": s.connected, "dropped": s.dropped, "status": s.status, "error": s.error,
            "offer_ms": s.offer_ms, "answer_ms": s.answer_ms, "ice_dtls_ms": s.ice_dtls_ms,
            "setup_ms": s.setup_ms, "first_packet_ms": s.first_packet_ms}


def _delta(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: b[k] - a.get(k, 0) for k in b}


async def _sleep_until(t: float) -> None:
    d = t - time.monotonic()
    if d > 0:
        await asyncio.sleep(d)


async def _recv(conn: Any, timeout: float) -> Any:
    """Wait for the parent's next message without blocking the event loop."""
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    loop.add_reader(conn.fileno(), ready.set)
    try:
        await asyncio.wait_for(ready.wait(), timeout)
    finally:
        loop.remove_reader(conn.fileno())
    return conn.recv()


async def worker_main(index: int, cfg: SwarmConfig, count: int, start_at: float, conn: Any) -> None:
    import aiohttp

    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=False))
    viewers: list[WhepViewer] = []
    rate = max(cfg.rate / max(1, len(cfg.per_process())), 1e-3)

    async def one(i: int) -> None:
        v = WhepViewer(cfg.url, token=cfg.token, layer=cfg.layer, session=session,
                       connect_timeout=cfg.connect_timeout, retry_not_live=cfg.retry_not_live,
                       rtcp_interval=cfg.rtcp_interval, remb_bps=cfg.remb_bps, nack=cfg.nack,
                       srtp_verify_every=cfg.srtp_verify_every, browser_rtcp=cfg.browser_rtcp)
        viewers.append(v)
        await _sleep_until(start_at + i / rate)
        try:
            await v.connect()
        except WhepError as exc:
            v.stats.error = str(exc)
        except Exception as exc:  # an unexpected failure of one viewer must not stop the swarm
            v.stats.error = f"{type(exc).__name__}: {exc}"

    try:
        await asyncio.gather(*(one(i) for i in range(count)))
        conn.send(("ramped", index, sum(v.connected for v in viewers)))
        msg = await _recv(conn, cfg.connect_timeout + count / rate + MESSAGE_TIMEOUT * 4)
        _, t0, hold = msg
        await _sleep_until(t0)
        snap0 = [v.stats.totals() for v in viewers]
        cpu0 = time.process_time()
        await _sleep_until(t0 + hold)
        snap1 = [v.stats.totals() for v in viewers]
        cpu1 = time.process_time()
        rows = []
        for v, a, b in zip(viewers, snap0, snap1):
            row = _viewer_row(v)
            row["window"] = _delta(a, b)
            row["total"] = b
            row["rtcp_sent"] = {"rr": v.stats.rr_sent, "remb": v.stats.remb_sent, "nack": v.stats.nack_sent,
                                "pli": v.stats.pli_sent}
            row["queued_packets"] = v.stats.queued_packets
            row["codecs"] = dict(v.stats.codecs)
            video = v.stats.video
            row["video_first_gap_packet"] = video.first_gap_packet if video is not None else -1
            rows.append(row)
        conn.send(("window", index, {"cpu_s": cpu1 - cpu0, "viewers": rows}))
    finally:
        results = await asyncio.gather(*(v.close() for v in viewers), return_exceptions=True)
        deletes: dict[str, int] = {}
        for v, r in zip(viewers, results):
            if isinstance(r, BaseException):
                key = f"exception {type(r).__name__}"
            elif v.stats.delete_status == 0:
                key = f"0 ({(v.stats.error or '')[:100]})"
            else:
                key = str(v.stats.delete_status)
            deletes[key] = deletes.get(key, 0) + 1
        await session.close()
        try:
            conn.send(("closed", index, deletes))
        except (BrokenPipeError, OSError):
            pass


def worker_entry(index: int, cfg: SwarmConfig, count: int, start_at: float, conn: Any) -> None:
    """Process entry: own uvloop, own aiohttp session, its share of the viewers."""
    import uvloop

    try:
        uvloop.run(worker_main(index, cfg, count, start_at, conn))
    except BaseException as exc:  # report and exit: the parent decides
        try:
            conn.send(("error", index, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        except (BrokenPipeError, OSError):
            pass


# --------------------------------------------------------------------------
# Reference sender (no server needed)
# --------------------------------------------------------------------------


def encode_h264_loop(width: int, height: int, fps: int, kbps: int, seconds: int) -> list[bytes]:
    """Pre-encode a loop of Annex-B H.264 access units with libx264 (PyAV).

    Constrained Baseline, no B-frames, an IDR every 2 s with SPS/PPS in band,
    CBR-ish; the loop length is a whole number of GOPs so that repeating it
    is a valid stream. A moving, noisy pattern keeps P-frames realistic.
    """
    import fractions

    import av
    import numpy as np

    cc = av.CodecContext.create("libx264", "w")
    cc.width, cc.height, cc.pix_fmt = width, height, "yuv420p"
    cc.time_base = fractions.Fraction(1, fps)
    cc.framerate = fractions.Fraction(fps, 1)
    cc.bit_rate = kbps * 1000
    gop = 2 * fps
    cc.options = {"preset": "ultrafast", "tune": "zerolatency",
                  "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes=0:repeat-headers=1:"
                                 f"vbv-maxrate={kbps}:vbv-bufsize={max(1, kbps // 2)}"}
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:height, 0:width]
    frames = max(gop, (seconds * fps) // gop * gop)
    video = []
    for i in range(frames):
        rgb = np.stack([((xx + 8 * i) % 256), ((yy + 3 * i) % 256), ((xx + yy + 5 * i) % 256)], -1).astype(np.uint8)
        rgb ^= rng.integers(0, 32, rgb.shape, dtype=np.uint8)
        f = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
        f.pts, f.time_base = i, cc.time_base
        video += [bytes(p) for p in cc.encode(f)]
    video += [bytes(p) for p in cc.encode(None)]
    return video


def encode_opus_loop(seconds: int) -> list[bytes]:
    """Pre-encode 20 ms Opus packets (48 kHz stereo, a 440 Hz tone)."""
    import av
    import numpy as np

    ac = av.CodecContext.create("libopus", "w")
    ac.sample_rate, ac.layout, ac.format, ac.bit_rate = 48000, "stereo", "s16", 48000
    audio = []
    t = np.arange(960)
    for i in range(50 * seconds):
        s = (np.sin(2 * np.pi * 440 * (t + 960 * i) / 48000) * 6000).astype(np.int16)
        fr = av.AudioFrame.from_ndarray(np.repeat(s[None, :], 2, 0).T.reshape(1, -1), format="s16", layout="stereo")
        fr.sample_rate, fr.pts = 48000, 960 * i
        audio += [bytes(p) for p in ac.encode(fr)]
    return audio


class _FastFanout:
    """Packetize once (media.rtp.h264 / opus), then per viewer: a 12-byte
    header (+ abs-send-time) in front of the shared payload, SRTP protect,
    sendto — the forwarding shape DESIGN.md asks of the server, minus NACK,
    RTX, SR and layer selection."""

    def __init__(self, video: list[bytes], audio: list[bytes], fps: int) -> None:
        from media.rtp.h264 import H264Packetizer

        pk = H264Packetizer()
        self.video = [[(p.payload, p.marker) for p in pk.packetize(au, 0)] for au in video]
        self.audio = audio
        self.fps = fps
        self.viewers: list[list] = []  # [path, v_ssrc, v_pt, a_ssrc, a_pt, v_seq, a_seq, ts_off, ast_id, alive]
        self.sent = 0

    def add(self, path: Any, v: tuple[int, int] | None, a: tuple[int, int] | None, ast_id: int | None) -> list:
        import random

        row = [path, v[0] if v else None, v[1] if v else 0, a[0] if a else None, a[1] if a else 0,
               random.getrandbits(16), random.getrandbits(16), random.getrandbits(32), ast_id, True]
        self.viewers.append(row)
        return row

    async def run(self) -> None:
        import struct

        hdr = struct.Struct("!BBHII")
        ext = struct.Struct("!HHB3s")
        frame = 0
        chunk = 0
        t0 = time.monotonic()
        while True:
            t_video = t0 + frame / self.fps
            t_audio = t0 + chunk * 0.02
            now = time.monotonic()
            wait = min(t_video, t_audio) - now
            if wait > 0:
                await asyncio.sleep(wait)
            self.viewers = [r for r in self.viewers if r[9]]
            if t_video <= time.monotonic():
                payloads = self.video[frame % len(self.video)]
                ts = frame * (90000 // self.fps)
                ast = (int(time.time() * 262144) & 0xFFFFFF).to_bytes(3, "big")
                for r in self.viewers:
                    if r[1] is None:
                        continue
                    send, ssrc, pt, seq, tsv, ast_id = r[0].send_rtp, r[1], r[2], r[5], (ts + r[7]) & 0xFFFFFFFF, r[8]
                    for payload, marker in payloads:
                        if ast_id:
                            h = hdr.pack(0x90, (0x80 if marker else 0) | pt, seq, tsv, ssrc) + ext.pack(
                                0xBEDE, 1, ast_id << 4 | 2, ast)
                        else:
                            h = hdr.pack(0x80, (0x80 if marker else 0) | pt, seq, tsv, ssrc)
                        try:
                            send(h + payload)
                        except Exception:  # a closed viewer: drop it
                            r[9] = False
                            break
                        seq = (seq + 1) & 0xFFFF
                        self.sent += 1
                    r[5] = seq
                frame += 1
            if t_audio <= time.monotonic():
                payload = self.audio[chunk % len(self.audio)]
                ts = chunk * 960
                for r in self.viewers:
                    if r[3] is None or not r[9]:
                        continue
                    try:
                        r[0].send_rtp(hdr.pack(0x80, r[4], r[6], (ts + r[7]) & 0xFFFFFFFF, r[3]) + payload)
                    except Exception:
                        r[9] = False
                        continue
                    r[6] = (r[6] + 1) & 0xFFFF
                    self.sent += 1
                chunk += 1


async def reference_sender_main(port_conn: Any, mode: str, width: int, height: int, fps: int, kbps: int) -> None:
    """A WHEP endpoint on 127.0.0.1 (``POST /whep/{any}``, ``DELETE`` its Location).

    ``mode="aiortc"``: stock aiortc senders fed pre-encoded packets
    (``av.Packet`` → the encoder only packetizes; RTX/NACK, SR as aiortc does
    them; ≈60 µs per packet per viewer). ``mode="fast"``: aiortc only for
    ICE/DTLS/SRTP, RTP packetized once and fanned out by :class:`_FastFanout`
    (a few µs per packet per viewer), so one core can feed a few hundred
    viewers.
    """
    import fractions

    import av
    from aiohttp import web
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import MediaStreamTrack
    from aiortc.sdp import SessionDescription

    from media.rtp.packet import HeaderExtensionUri
    from whep_client import SrtpPath, prepare_aiortc, sender_ssrc, use_loopback_candidates

    prepare_aiortc()
    use_loopback_candidates(True)
    video, audio = encode_h264_loop(width, height, fps, kbps, 4), encode_opus_loop(4)
    fanout = _FastFanout(video, audio, fps) if mode == "fast" else None

    class PacketTrack(MediaStreamTrack):
        def __init__(self, kind: str, packets: list[bytes], step: int, clock: int) -> None:
            super().__init__()
            self.kind = kind
            self._packets, self._step, self._tb = packets, step, fractions.Fraction(1, clock)
            self._period = step / clock
            self._i = -1
            self._t0 = 0.0

        async def recv(self) -> av.Packet:
            if fanout is not None:  # fast mode: aiortc's sender never gets a frame
                await asyncio.Event().wait()
            self._i += 1
            if self._i == 0:
                self._t0 = time.monotonic()
            else:
                wait = self._t0 + self._i * self._period - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
            pkt = av.Packet(self._packets[self._i % len(self._packets)])
            pkt.pts, pkt.time_base = self._i * self._step, self._tb
            return pkt

    pcs: dict[str, Any] = {}
    rows: dict[str, list] = {}
    closing: set[asyncio.Future] = set()
    ids = iter(range(1, 1 << 30))

    def attach(sid: str, pc: Any) -> None:
        """fast mode: once DTLS is up, hand the viewer to the fan-out."""
        if pc.connectionState != "connected" or sid in rows:
            return
        desc = SessionDescription.parse(pc.localDescription.sdp)
        found: dict[str, tuple[int, int]] = {}
        ast_id = None
        for t, m in zip(pc.getTransceivers(), desc.media):
            if m.direction not in ("sendonly", "sendrecv") or not m.rtp.codecs:
                continue
            found[m.kind] = (sender_ssrc(t.sender), m.rtp.codecs[0].payloadType)
            if m.kind == "video":
                for e in m.rtp.headerExtensions:
                    if e.uri == HeaderExtensionUri.ABS_SEND_TIME.value:
                        ast_id = e.id
        dtls = pc.getTransceivers()[0].sender.transport
        rows[sid] = fanout.add(SrtpPath(dtls), found.get("video"), found.get("audio"), ast_id)

    async def post(request: web.Request) -> web.Response:
        if request.content_type != "application/sdp":
            return web.json_response({"error": "unsupported_media_type"}, status=415)
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTrack(PacketTrack("video", video, 90000 // fps, 90000))
        pc.addTrack(PacketTrack("audio", audio, 960, 48000))
        await pc.setRemoteDescription(RTCSessionDescription(sdp=await request.text(), type="offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        sid = str(next(ids))
        pcs[sid] = pc
        if fanout is not None:
            pc.on("connectionstatechange", lambda: attach(sid, pc))
        return web.Response(status=201, text=pc.localDescription.sdp, content_type="application/sdp",
                            headers={"Location": f"/whep/{request.match_info['stream']}/{sid}"})

    async def delete(request: web.Request) -> web.Response:
        sid = request.match_info["sid"]
        pc = pcs.pop(sid, None)
        if pc is None:
            return web.json_response({"error": "not_found"}, status=404)
        row = rows.pop(sid, None)
        if row is not None:
            row[9] = False
        task = asyncio.ensure_future(pc.close())  # answer now; closing takes a while under load
        closing.add(task)
        task.add_done_callback(closing.discard)
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/whep/{stream}", post)
    app.router.add_delete("/whep/{stream}/{sid}", delete)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    pump = asyncio.ensure_future(fanout.run()) if fanout is not None else None
    port_conn.send(site._server.sockets[0].getsockname()[1])
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_reader(port_conn.fileno(), stop.set)  # any message or EOF from the parent: stop
    try:
        await stop.wait()
    finally:
        if pump is not None:
            pump.cancel()
        for row in rows.values():
            row[9] = False
        for pc in list(pcs.values()):
            await pc.close()
        if closing:
            await asyncio.wait(closing, timeout=10)
        await runner.cleanup()


def reference_sender_entry(port_conn: Any, mode: str, width: int, height: int, fps: int, kbps: int) -> None:
    import uvloop

    uvloop.run(reference_sender_main(port_conn, mode, width, height, fps, kbps))


class ReferenceSender:
    """Start/stop :func:`reference_sender_main` in a child process."""

    def __init__(self, mode: str = "fast", width: int = 640, height: int = 360, fps: int = 30,
                 kbps: int = 1000) -> None:
        if mode not in ("fast", "aiortc"):
            raise ValueError("mode is 'fast' or 'aiortc'")
        ctx = mp.get_context("spawn")
        self._parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=reference_sender_entry, args=(child, mode, width, height, fps, kbps),
                                name="whep-reference-sender", daemon=True)
        self.port = 0

    def start(self, timeout: float = 60.0) -> str:
        self.proc.start()
        if not self._parent.poll(timeout):
            self.stop()
            raise RuntimeError("reference sender did not start")
        self.port = self._parent.recv()
        return f"http://127.0.0.1:{self.port}/whep/reference"

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    def stop(self, timeout: float = 15.0) -> None:
        try:
            self._parent.send("stop")
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)


# --------------------------------------------------------------------------
# Parent: run, aggregate, report
# --------------------------------------------------------------------------


def _dist(values: list[float]) -> dict[str, float | None]:
    return {"n": len(values), "min": min(values) if values else None, "p50": percentile(values, 50),
            "p99": percentile(values, 99), "max": max(values) if values else None}


def run_swarm(cfg: SwarmConfig, *, metrics_url: str | None = None, server_pid: int | None = None,
              metrics_filter: str = r"^returnfeed_(?!http_)", log: Any = None,
              on_hold: Any = None) -> dict[str, Any]:
    """Run the whole swarm (blocking) and return the report as a dict.

    ``on_hold(t0, hold)`` is called (from this thread) once the measurement
    window [t0, t0 + hold] (``time.monotonic`` seconds) is fixed — for a
    caller measuring something else during the same window.
    """
    say = log or (lambda *a: None)
    ctx = mp.get_context("spawn")
    shares = cfg.per_process()
    start_at = time.monotonic() + 1.5 + 0.3 * len(shares)  # after the workers have imported
    procs, conns = [], []
    for i, n in enumerate(shares):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=worker_entry, args=(i, cfg, n, start_at, child), name=f"whep-swarm-{i}", daemon=True)
        p.start()
        procs.append(p)
        conns.append(parent)
    report: dict[str, Any] = {"config": asdict(cfg), "errors": []}
    try:
        ramp_deadline = start_at + cfg.viewers / cfg.rate + cfg.connect_timeout + MESSAGE_TIMEOUT
        connected = 0
        for c in conns:
            msg = _expect(c, "ramped", ramp_deadline, report)
            if msg is not None:
                connected += msg[2]
        say(f"ramp done: {connected}/{cfg.viewers} connected")
        t0 = time.monotonic() + cfg.settle
        for c in conns:
            c.send(("hold", t0, cfg.hold))
        if on_hold is not None:
            on_hold(t0, cfg.hold)
        time.sleep(max(0.0, t0 - time.monotonic()))
        m0 = scrape_metrics(metrics_url) if metrics_url else None
        s0 = proc_cpu_seconds(server_pid) if server_pid else None
        say(f"holding {cfg.hold:g} s")
        time.sleep(max(0.0, t0 + cfg.hold - time.monotonic()))
        m1 = scrape_metrics(metrics_url) if metrics_url else None
        s1 = proc_cpu_seconds(server_pid) if server_pid else None
        windows = [_expect(c, "window", time.monotonic() + MESSAGE_TIMEOUT, report) for c in conns]
        closed = [_expect(c, "closed", time.monotonic() + MESSAGE_TIMEOUT + 10, report) for c in conns]
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.terminate()
                p.join(5)
    report.update(_aggregate(cfg, windows, closed, m0, m1, s0, s1, metrics_url, server_pid, metrics_filter))
    return report


def _expect(conn: Any, kind: str, deadline: float, report: dict[str, Any]) -> tuple | None:
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not conn.poll(left):
            report["errors"].append(f"no '{kind}' message from a worker in time")
            return None
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            report["errors"].append(f"a worker died before '{kind}'")
            return None
        if msg[0] == kind:
            return msg
        if msg[0] == "error":
            report["errors"].append(f"worker {msg[1]}: {msg[2]}")
            return None


def _aggregate(cfg, windows, closed, m0, m1, s0, s1, metrics_url, server_pid, metrics_filter) -> dict[str, Any]:
    rows = [r for w in windows if w for r in w[2]["viewers"]]
    worker_cpu = [w[2]["cpu_s"] for w in windows if w]
    hold = cfg.hold
    connected = [r for r in rows if r["connected"]]
    receiving = [r for r in connected if r["window"]["packets"] > 0]
    failures: dict[str, int] = {}
    for r in rows:
        if not r["connected"]:
            key = (r["error"] or "not connected").split("\n")[0][:120]
            failures[key] = failures.get(key, 0) + 1
    win_packets = sum(r["window"]["packets"] for r in rows)
    win_bytes = sum(r["window"]["bytes"] for r in rows)
    seq = {k: sum(r["window"][k] for r in rows) for k in
           ("skipped", "lost", "late", "recovered", "duplicates", "backwards", "srtp_auth", "rtx_packets")}
    seq_total = {k: sum(r["total"][k] for r in rows) for k in
                 ("skipped", "lost", "recovered", "duplicates", "backwards", "srtp_auth")}
    seq["viewers_with_loss"] = sum(1 for r in rows if r["window"]["lost"] > 0)
    seq_total["viewers_with_gaps"] = sum(1 for r in rows if r["total"]["skipped"] > 0)
    seq_total["video_first_gap_packet"] = _dist([r["video_first_gap_packet"] for r in rows
                                                 if r.get("video_first_gap_packet", -1) >= 0])
    swarm_cpu = sum(worker_cpu)
    out: dict[str, Any] = {
        "viewers": {"requested": cfg.viewers, "connected": len(connected), "receiving": len(receiving),
                    "dropped": sum(1 for r in rows if r.get("dropped")), "failures": failures},
        "setup_ms": {k: _dist([r[k] for r in connected if r[k] is not None])
                     for k in ("offer_ms", "answer_ms", "ice_dtls_ms", "setup_ms", "first_packet_ms")},
        "per_viewer": {
            "packets_per_s": _dist([r["window"]["packets"] / hold for r in connected]),
            "kbit_per_s": _dist([r["window"]["bytes"] * 8 / hold / 1000 for r in connected]),
            "video_fps": _dist([r["window"]["frames"] / hold for r in connected]),
        },
        "codecs": sorted({json.dumps(r["codecs"], sort_keys=True) for r in connected}),
        "sequence_window": seq,
        "sequence_since_connect": seq_total,
        "rtcp_sent": {k: sum(r["rtcp_sent"][k] for r in rows) for k in ("rr", "remb", "nack", "pli")},
        "queued_packets": sum(r["queued_packets"] for r in rows),
        "swarm": {
            "processes": len(worker_cpu), "cpu_s": swarm_cpu,
            "core_pct_per_process": [100.0 * c / hold for c in worker_cpu],
            "packets": win_packets, "mbit_per_s": win_bytes * 8 / hold / 1e6,
            "us_per_packet": (swarm_cpu / win_packets * 1e6) if win_packets else None,
        },
        "deletes": _merge_counts([c[2] for c in closed if c]),
    }
    server: dict[str, Any] = {"metrics_url": metrics_url, "pid": server_pid}
    cpu = None
    if m0 is not None and m1 is not None:
        key = "returnfeed_process_cpu_seconds_total"
        if key in m0 and key in m1:
            cpu = m1[key] - m0[key]
            server["cpu_source"] = key
        server["metrics"] = metric_changes(m0, m1, metrics_filter)
    elif metrics_url:
        server["metrics"] = None
        server["metrics_error"] = "unreachable"
    if cpu is None and s0 is not None and s1 is not None:
        cpu = s1 - s0
        server["cpu_source"] = f"/proc/{server_pid}/stat"
    if cpu is not None:
        per_viewer_mbps = (win_bytes * 8 / hold / 1e6 / len(receiving)) if receiving else 0.0
        core = cpu / hold
        server.update({
            "cpu_s": cpu, "core_pct": 100.0 * core,
            "us_per_packet": (cpu / win_packets * 1e6) if win_packets else None,
            "viewers_per_core": (len(receiving) / core) if core > 0 else None,
            "viewer_mbit_per_s": per_viewer_mbps,
        })
    out["server"] = server
    return out


def _merge_counts(dicts: list[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def _fmt(d: dict[str, Any], unit: str = "", digits: int = 1) -> str:
    if not d.get("n"):
        return "n/a"
    f = f"{{:.{digits}f}}"
    return (f"min {f.format(d['min'])} p50 {f.format(d['p50'])} p99 {f.format(d['p99'])} "
            f"max {f.format(d['max'])}{unit} (n={d['n']})")


def print_report(r: dict[str, Any]) -> None:
    v = r["viewers"]
    print(f"viewers: {v['connected']}/{v['requested']} connected, {v['receiving']} receiving in the window, "
          f"{v['dropped']} dropped while watching")
    for k, n in v["failures"].items():
        print(f"  failed x{n}: {k}")
    print("setup:")
    for k, label in (("offer_ms", "offer (gathering)"), ("answer_ms", "POST → 201"),
                     ("ice_dtls_ms", "ICE+DTLS"), ("setup_ms", "start → connected"),
                     ("first_packet_ms", "start → first RTP")):
        print(f"  {label:<20} {_fmt(r['setup_ms'][k], ' ms')}")
    pv = r["per_viewer"]
    print(f"per viewer ({r['config']['hold']:g} s window):")
    print(f"  packets/s            {_fmt(pv['packets_per_s'])}")
    print(f"  kbit/s               {_fmt(pv['kbit_per_s'])}")
    print(f"  video frames/s       {_fmt(pv['video_fps'])}")
    print(f"  codecs               {', '.join(r['codecs']) or 'n/a'}")
    s = r["sequence_window"]
    print(f"sequence (window): skipped {s['skipped']}  lost {s['lost']} (viewers with loss: "
          f"{s['viewers_with_loss']})  late {s['late']}  recovered {s['recovered']}  rtx {s['rtx_packets']}")
    bad = s["duplicates"] + s["backwards"] + s["srtp_auth"]
    print(f"  duplicates {s['duplicates']}  backwards {s['backwards']}  srtp auth failures {s['srtp_auth']}"
          f"  -> {'OK' if bad == 0 else 'VIOLATION (must be 0)'}")
    st = r["sequence_since_connect"]
    print(f"sequence (since connect): skipped {st['skipped']} lost {st['lost']} duplicates {st['duplicates']} "
          f"backwards {st['backwards']}; viewers with gaps {st['viewers_with_gaps']}, first video gap after "
          f"packet {_fmt(st['video_first_gap_packet'], digits=0)}")
    print(f"rtcp sent: {r['rtcp_sent']}  queued-path packets: {r['queued_packets']}  deletes: {r['deletes']}")
    w = r["swarm"]
    us = f"{w['us_per_packet']:.1f}" if w["us_per_packet"] is not None else "n/a"
    print(f"swarm: {w['processes']} process(es), {w['cpu_s']:.2f} CPU s, "
          f"{', '.join(f'{p:.0f}%' for p in w['core_pct_per_process'])} of a core each; "
          f"{w['packets']} packets, {w['mbit_per_s']:.1f} Mbit/s received; {us} µs CPU per packet")
    sv = r["server"]
    if "cpu_s" in sv:
        vpc = f"{sv['viewers_per_core']:.0f}" if sv.get("viewers_per_core") else "n/a"
        upp = f"{sv['us_per_packet']:.1f}" if sv.get("us_per_packet") else "n/a"
        print(f"server: {sv['cpu_s']:.2f} CPU s ({sv['core_pct']:.0f}% of a core, from {sv['cpu_source']}); "
              f"{upp} µs per delivered packet; ≈{vpc} viewers per core at "
              f"{sv['viewer_mbit_per_s']:.2f} Mbit/s each (budget ≥ 300 at 1 Mbit/s)")
    else:
        print("server: CPU unknown (no returnfeed_process_cpu_seconds_total; pass --server-pid)")
    if sv.get("metrics"):
        print("server metrics that changed in the window:")
        for row in sv["metrics"][:60]:
            d = row["delta"]
            print(f"  {row['series']}: {row['before']} -> {row['after']}" + (f" (Δ {d:g})" if d is not None else ""))
    elif sv.get("metrics_error"):
        print(f"server metrics: {sv['metrics_url']} {sv['metrics_error']}")
    for e in r["errors"]:
        print(f"ERROR: {e}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="WHEP endpoint, http://127.0.0.1:PORT/whep/STREAM[?token=…]")
    ap.add_argument("--reference-sender", nargs="?", const="fast", choices=("fast", "aiortc"),
                    help="start a local WHEP sender (pre-encoded 1 Mbit/s H.264 + Opus) in its own process "
                         "and use it as --url: 'fast' (default) packetizes once and fans out; 'aiortc' "
                         "uses stock aiortc senders (RTX/NACK/SR, ≈4× the CPU)")
    ap.add_argument("--ref-kbps", type=int, default=1000, help="reference sender video bitrate")
    ap.add_argument("--token", help="bearer token (or put ?token= in --url)")
    ap.add_argument("--layer", help="?layer= to pin a simulcast layer")
    ap.add_argument("--viewers", type=int, default=10)
    ap.add_argument("--procs", type=int, default=1, help="worker processes (each its own uvloop)")
    ap.add_argument("--rate", type=float, default=20.0, help="viewers started per second (total)")
    ap.add_argument("--hold", type=float, default=20.0, help="measurement window, seconds")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds between ramp end and window")
    ap.add_argument("--connect-timeout", type=float, default=20.0)
    ap.add_argument("--retry-not-live", type=float, default=0.0,
                    help="keep retrying 409/503 for this many seconds per viewer")
    ap.add_argument("--nack", action="store_true", help="viewers NACK sequence gaps")
    ap.add_argument("--remb-bps", type=int, default=10_000_000, help="REMB announced by viewers (0: none)")
    ap.add_argument("--rtcp-interval", type=float, default=1.0)
    ap.add_argument("--browser-rtcp", action="store_true",
                    help="viewers report like Chromium (whep_client.BROWSER_RTCP): video RR+REMB every "
                         f"{BROWSER_RTCP.video_interval} s, audio RR every {BROWSER_RTCP.audio_interval} s, REMB at "
                         "the received rate, NACK per gap (repeated), PLI for a hole older than "
                         f"{BROWSER_RTCP.pli_after} s; implies --nack and sets --rtcp-interval")
    ap.add_argument("--srtp-verify-every", type=int, default=1,
                    help="authenticate every Nth SRTP packet (1: all, like a browser; 0: none — "
                         "headers are read in the clear, RFC 3711 §3.1)")
    ap.add_argument("--metrics-url", help="server /metrics (default: port 9998 on --url's host)")
    ap.add_argument("--no-metrics", action="store_true")
    ap.add_argument("--metrics-filter", default=r"^returnfeed_(?!http_)", help="regex of series to report")
    ap.add_argument("--server-pid", type=int, help="server PID for CPU from /proc (default: found from the port)")
    ap.add_argument("--json", metavar="PATH", help="also write the report as JSON ('-' = stdout only)")
    args = ap.parse_args(argv)
    if not args.url and not args.reference_sender:
        ap.error("--url or --reference-sender is required")
    if args.viewers < 1 or args.procs < 1 or args.rate <= 0 or args.hold <= 0:
        ap.error("--viewers, --procs ≥ 1; --rate, --hold > 0")

    ref = None
    url = args.url
    server_pid = args.server_pid
    metrics_url = None
    log = (lambda *a: print(*a, file=sys.stderr, flush=True))
    try:
        if args.reference_sender:
            ref = ReferenceSender(args.reference_sender, kbps=args.ref_kbps)
            url = ref.start()
            server_pid = ref.pid
            log(f"reference sender at {url} (pid {server_pid})")
        else:
            host = urllib.parse.urlsplit(url).hostname
            if host not in ("127.0.0.1", "localhost", "::1"):
                ap.error("load traffic goes to 127.0.0.1 only")
            if not args.no_metrics:
                metrics_url = args.metrics_url or metrics_url_for(url)
            if server_pid is None:
                port = urllib.parse.urlsplit(url).port or 80
                server_pid = find_listener_pid(port)
                if server_pid:
                    log(f"server pid {server_pid} (listening on {port})")
        cfg = SwarmConfig(url=url, viewers=args.viewers, procs=args.procs, rate=args.rate, hold=args.hold,
                          settle=args.settle, token=args.token, layer=args.layer,
                          connect_timeout=args.connect_timeout, retry_not_live=args.retry_not_live,
                          nack=args.nack or args.browser_rtcp, remb_bps=args.remb_bps,
                          rtcp_interval=BROWSER_RTCP.video_interval if args.browser_rtcp else args.rtcp_interval,
                          srtp_verify_every=args.srtp_verify_every, browser_rtcp=args.browser_rtcp)
        report = run_swarm(cfg, metrics_url=metrics_url, server_pid=server_pid,
                           metrics_filter=args.metrics_filter, log=log)
    finally:
        if ref is not None:
            ref.stop()
    if args.json == "-":
        print(json.dumps(report, indent=1, default=str))
    else:
        print_report(report)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    ok = (report["viewers"]["connected"] == args.viewers and not report["errors"]
          and report["sequence_window"]["duplicates"] + report["sequence_window"]["backwards"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
