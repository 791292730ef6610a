"""Added forwarding latency, SRT in → WHEP out, measured from outside the server.

Usage::

    # stream already created; SRT URL as the API returns it (streamid +
    # passphrase), WHEP URL of a read link (?token=) or --token
    python loadtests/latency_probe.py \\
        --srt-url 'srt://127.0.0.1:8890?streamid=publish:cam1&passphrase=…&pbkeylen=16' \\
        --whep-url 'http://127.0.0.1:8080/whep/cam1?token=…' --viewers 1,100

    # let the probe create a production + stream + read link through the API
    # (and delete them afterwards)
    python loadtests/latency_probe.py --api http://127.0.0.1:8080 \\
        --username admin --password "$RETURNFEED_ADMIN_PASSWORD" --viewers 1,100

    # self-check without a server: SRT to a libsrt listener in this process,
    # "arrival" = our own TS demuxer completing the access unit
    python loadtests/latency_probe.py --srt-only

    # the viewers in N egress worker processes (issue 15): an own server
    # with webrtc.egress_workers = N, then the usual runs
    python loadtests/latency_probe.py --workers 2 --viewers 1,100

    # live QC's cost on forwarding (issue 12): own servers, alternating QC
    # off / on ([qc] enabled), 3 more SRT streams published beside the
    # probe's, so that QC analyses 4 streams; 100 viewers on the probe stream
    python loadtests/latency_probe.py --qc-ab 3 --viewers 100

What is measured (DESIGN.md budget: last byte of a frame in → last RTP
packet of it out, no loss, 100 viewers: p50 ≤ 1 ms, p99 ≤ 5 ms, SRT receive
latency excluded):

* the probe **sends SRT itself** (caller, libsrt through
  ``media/srt/binding.py``, live mode): H.264 pre-encoded once with libx264
  (no B-frames, IDR every 2 s), muxed to MPEG-TS here (PAT/PMT, PES with PTS
  and ``PES_packet_length`` 0 like FFmpeg, PCR, AUD) and sent in 1316-byte
  messages, the frame's last message shorter — the shape FFmpeg's SRT output
  has. Right after ``srt_sendmsg2`` of a frame's **last** TS packet returns
  it records ``time.monotonic_ns()`` keyed by the frame's PTS;
* a WHEP viewer (``whep_client.WhepViewer``) records the arrival time of
  every **marker-bit** RTP packet (the last packet of a frame, RFC 6184
  §5.1) with its RTP timestamp, stamped first thing in the datagram
  callback;
* frames are matched by timestamp. Our server's video RTP timestamp is the
  PTS mod 2^32 (checked: the report says whether that held); if it is not,
  the constant offset is found as the most frequent (rtp_ts − pts) — PTS
  steps carry a few ticks of deterministic jitter (``--pts-jitter``) so only
  the true offset lines up across many frames;
* added latency = arrival − send − SRT latency, where the SRT latency is
  the TSBPD delay agreed in the handshake (``SRTO_PEERLATENCY`` read after
  connecting: max of ours, ``--srt-latency-ms``, and the server's), because
  libsrt hands each packet to the server at its send time + that delay.

Runs: ``--viewers 1,100`` measures with the probe viewer alone, then with
99 more viewers (``whep_swarm`` worker processes, ``--load-procs``) during
the same window. Each run prints frames sent/matched, p50/p99/max of the
added latency, and what ``--srt-only`` gives as the probe's own floor (SRT
delivery past its latency + our demux + clocks) for comparison.

Everything goes to 127.0.0.1. Both clocks are this process's
CLOCK_MONOTONIC (the sender is a thread here, the viewer our event loop).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import secrets
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from media.mpegts.pes import PesHeader, packetize_pes  # noqa: E402
from media.mpegts.psi import Pat, Pmt, PmtTrack, StreamType, packetize_section  # noqa: E402
from whep_client import WhepError, WhepViewer, percentile  # noqa: E402

TS_PACKET = 188
MESSAGE = 7 * TS_PACKET  # SRT live payload (srt.h SRT_LIVE_DEF_PLSIZE)
VIDEO_PID = 0x100
PMT_PID = 0x1000
PTS_MASK = (1 << 33) - 1
AUD = b"\x00\x00\x00\x01\x09\xf0"  # access unit delimiter, primary_pic_type 7 (as FFmpeg writes it)


# --------------------------------------------------------------------------
# MPEG-TS muxing (ISO/IEC 13818-1) with media.mpegts' builders
# --------------------------------------------------------------------------


class TsMuxer:
    """One H.264 program: PAT/PMT every ``table_interval`` s and before each
    IDR (§2.4.4), one PES per access unit (PTS only, PES_packet_length 0 —
    allowed for video, §2.4.3.7 — data_alignment set), a PCR in the first
    packet of each frame, random_access_indicator on IDRs (§2.4.3.5)."""

    def __init__(self, table_interval: float = 0.1, pcr_lead: int = 9000) -> None:
        self._cc: dict[int, int] = collections.defaultdict(int)
        self._pat = Pat(transport_stream_id=1, version=0, programs=((1, PMT_PID),)).serialize()
        self._pmt = Pmt(program_number=1, version=0, pcr_pid=VIDEO_PID,
                        tracks=(PmtTrack(VIDEO_PID, StreamType.H264, "h264"),)).serialize()
        self._interval = table_interval
        self._last_tables = float("-inf")
        self._pcr_lead = pcr_lead  # PCR this many 90 kHz ticks before the PTS

    def _section(self, pid: int, section: bytes) -> list[bytes]:
        packets = packetize_section(pid, section, self._cc[pid])
        self._cc[pid] = (self._cc[pid] + len(packets)) & 15
        return packets

    def frame(self, au: bytes, pts: int, keyframe: bool, now: float) -> bytes:
        out: list[bytes] = []
        if keyframe or now - self._last_tables >= self._interval:
            out += self._section(0, self._pat) + self._section(PMT_PID, self._pmt)
            self._last_tables = now
        pes = PesHeader(0xE0, pts=pts & PTS_MASK, data_alignment=True).serialize(None) + AUD + au
        pcr = ((pts - self._pcr_lead) & PTS_MASK) * 300
        packets, self._cc[VIDEO_PID] = packetize_pes(VIDEO_PID, pes, self._cc[VIDEO_PID], pcr=pcr,
                                                     random_access=keyframe)
        out += packets
        return b"".join(out)


def is_idr(au: bytes) -> bool:
    """True when an Annex-B access unit holds an IDR slice (nal_unit_type 5)."""
    i = au.find(b"\x00\x00\x01")
    while i >= 0:
        if i + 3 < len(au) and au[i + 3] & 0x1F == 5:
            return True
        i = au.find(b"\x00\x00\x01", i + 3)
    return False


# --------------------------------------------------------------------------
# SRT sender (a thread: libsrt calls release the GIL)
# --------------------------------------------------------------------------


@dataclass
class SrtTarget:
    host: str
    port: int
    streamid: str | None = None
    passphrase: str | None = None
    pbkeylen: int | None = None

    @classmethod
    def parse(cls, url: str) -> SrtTarget:
        p = urllib.parse.urlsplit(url)
        if p.scheme != "srt" or not p.hostname or not p.port:
            raise ValueError(f"not an srt://host:port URL: {url}")
        # keep '#', ':' and ',' of an access-control stream ID ('#!::r=cam1,m=publish')
        q = dict(urllib.parse.parse_qsl(p.query, keep_blank_values=True))
        return cls(p.hostname, p.port, q.get("streamid"), q.get("passphrase"),
                   int(q["pbkeylen"]) if q.get("pbkeylen") else None)


class SrtSender(threading.Thread):
    """Send the access-unit loop in real time and log each frame's last-byte time.

    ``sent`` maps PTS (33 bits) → monotonic ns right after the frame's last
    ``srt_sendmsg2`` returned. The first PTS is random; steps are
    ``90000 / fps`` plus deterministic jitter of ±``pts_jitter`` ticks.
    """

    def __init__(self, target: SrtTarget, aus: list[bytes], fps: int, latency_ms: int, duration: float,
                 pts_jitter: int = 3) -> None:
        super().__init__(name="srt-probe-sender", daemon=True)
        self.target = target
        self.aus = aus
        self.keyframes = [is_idr(a) for a in aus]
        self.fps = fps
        self.latency_ms = latency_ms
        self.duration = duration
        self.pts_jitter = pts_jitter
        self.sent: dict[int, int] = {}
        self.peer_latency_ms: int | None = None
        self.error: str | None = None
        self.connected = threading.Event()
        self.stop_event = threading.Event()
        self.frames = 0
        self.messages = 0
        self.late_frames = 0  # frames sent more than one frame interval behind schedule

    def run(self) -> None:
        from media.srt.binding import SockOpt, SrtLibrary

        try:
            lib = SrtLibrary.open()
        except Exception as exc:  # SrtUnavailable and friends: report, do not hang the probe
            self.error = f"libsrt: {exc}"
            self.connected.set()
            return
        sock = lib.create_socket()
        try:
            t = self.target
            lib.setsockflag(sock, SockOpt.LATENCY, self.latency_ms)
            if t.streamid:
                lib.setsockflag(sock, SockOpt.STREAMID, t.streamid)
            if t.passphrase:
                lib.setsockflag(sock, SockOpt.PASSPHRASE, t.passphrase)
                if t.pbkeylen:
                    lib.setsockflag(sock, SockOpt.PBKEYLEN, t.pbkeylen)
            lib.connect(sock, t.host, t.port)
            self.peer_latency_ms = int(lib.getsockflag(sock, SockOpt.PEERLATENCY))
            self.connected.set()
            self._send_loop(lib, sock)
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            self.connected.set()
        finally:
            try:
                lib.close_socket(sock)
            finally:
                lib.close()

    def _send_loop(self, lib: Any, sock: int) -> None:
        mux = TsMuxer()
        rng = random.Random(7)
        step = 90000 // self.fps
        pts = rng.randrange(1 << 20, 1 << 32)
        period = 1.0 / self.fps
        t0 = time.monotonic()
        i = 0
        n = len(self.aus)
        sendmsg = lib.sendmsg
        mono = time.monotonic_ns
        while not self.stop_event.is_set() and i < self.duration * self.fps:
            due = t0 + i * period
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            elif wait < -period:
                self.late_frames += 1
            data = mux.frame(self.aus[i % n], pts, self.keyframes[i % n], time.monotonic())
            for off in range(0, len(data), MESSAGE):
                sendmsg(sock, data[off:off + MESSAGE])
                self.messages += 1
            self.sent[pts & PTS_MASK] = mono()
            self.frames += 1
            i += 1
            pts = (pts + step + (rng.randint(-self.pts_jitter, self.pts_jitter) if self.pts_jitter else 0)) & PTS_MASK


class SrtOnlyReceiver(threading.Thread):
    """--srt-only: libsrt listener on 127.0.0.1 + media.mpegts.TsDemuxer.

    ``arrivals`` maps PTS → monotonic ns when the demuxer completed the AU.
    """

    def __init__(self, latency_ms: int) -> None:
        super().__init__(name="srt-probe-receiver", daemon=True)
        from media.srt.binding import SockOpt, SrtLibrary

        self.lib = SrtLibrary.open()
        self.listener = self.lib.create_socket()
        self.lib.setsockflag(self.listener, SockOpt.RCVLATENCY, latency_ms)
        self.lib.bind(self.listener, "127.0.0.1", 0)
        self.lib.listen(self.listener, 1)
        self.port = self.lib.getsockname(self.listener)[1]
        self.arrivals: dict[int, int] = {}
        self.completions: collections.Counter = collections.Counter()
        self.stop_event = threading.Event()

    def run(self) -> None:
        from media.errors import SrtApiError
        from media.mpegts.demux import TsDemuxer
        from media.mpegts.events import AccessUnit
        from media.srt.binding import SockOpt

        lib = self.lib
        try:
            sock, _ = lib.accept(self.listener)
            lib.setsockflag(sock, SockOpt.RCVTIMEO, 200)
            demux = TsDemuxer()
            mono = time.monotonic_ns
            while not self.stop_event.is_set():
                try:
                    msg = lib.recvmsg(sock, 1500)
                except SrtApiError:
                    if lib.getsockstate(sock).name in ("BROKEN", "CLOSED", "NONEXIST"):
                        break
                    continue
                now = mono()
                for ev in demux.feed(msg, now / 1e9, end_of_message=True):
                    if isinstance(ev, AccessUnit) and ev.pts is not None:
                        self.arrivals[ev.pts] = now
                        self.completions[ev.completion.name] += 1
            lib.close_socket(sock)
        finally:
            lib.close_socket(self.listener)
            lib.close()


# --------------------------------------------------------------------------
# Matching and statistics
# --------------------------------------------------------------------------


def find_offset(sent_pts: list[int], recv_ts: list[int], sample: int = 40) -> tuple[int | None, int]:
    """Most frequent (rtp_ts − pts) mod 2^32 over the first *sample* received
    timestamps × all sent PTS; returns (offset, votes) — None if < 5 votes."""
    votes: collections.Counter = collections.Counter()
    for ts in recv_ts[:sample]:
        for p in sent_pts:
            votes[(ts - p) & 0xFFFFFFFF] += 1
    if not votes:
        return None, 0
    off, n = votes.most_common(1)[0]
    return (off, n) if n >= min(5, len(recv_ts[:sample])) else (None, n)


def latency_stats(sent: dict[int, int], arrivals: dict[int, int], window: tuple[int, int], srt_latency_ns: int,
                  offset: int = 0, rtp: bool = True) -> dict[str, Any]:
    """Match frames sent inside *window* (ns) to arrivals (keyed by RTP ts or PTS)."""
    lo, hi = window
    values = []
    missing = 0
    in_window = 0
    for pts, t_send in sent.items():
        if not lo <= t_send <= hi:
            continue
        in_window += 1
        key = ((pts + offset) & 0xFFFFFFFF) if rtp else pts
        t_arr = arrivals.get(key)
        if t_arr is None:
            missing += 1
            continue
        values.append((t_arr - t_send - srt_latency_ns) / 1e6)
    return {
        "frames_sent": in_window, "frames_matched": len(values), "frames_missing": missing,
        "added_ms": {"min": min(values) if values else None, "p50": percentile(values, 50),
                     "p90": percentile(values, 90), "p99": percentile(values, 99),
                     "max": max(values) if values else None},
    }


def histogram_window(before: dict[str, float] | None, after: dict[str, float] | None,
                     name: str = "returnfeed_forwarding_latency_seconds") -> dict[str, Any] | None:
    """Quantiles of a Prometheus histogram over a window, from bucket deltas.

    Each quantile is reported as the upper bound of the bucket it falls in
    (``"> 0.1"`` for the +Inf bucket): the server's own view of the same
    frames (last byte in → last RTP packet out to every viewer).
    """
    if not before or not after:
        return None
    buckets = []
    prefix = name + '_bucket{le="'
    for key, value in after.items():
        if key.startswith(prefix):
            le = key[len(prefix):].split('"', 1)[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), value - before.get(key, 0.0)))
    if not buckets:
        return None
    buckets.sort()
    total = buckets[-1][1]
    out: dict[str, Any] = {"frames": int(total)}
    if total <= 0:
        return out
    for q in (50, 90, 99):
        need = total * q / 100.0
        for le, cum in buckets:
            if cum >= need:
                out[f"p{q}_le_ms"] = "> %g" % (buckets[-2][0] * 1000) if le == float("inf") else le * 1000
                break
    return out


# --------------------------------------------------------------------------
# Provisioning through the API (optional)
# --------------------------------------------------------------------------


def _api(method: str, url: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:
            raw = resp.read()
            return resp.status, (json.loads(raw) if raw else None)
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except ValueError:
            return exc.code, raw.decode("utf-8", "replace")


@dataclass
class Provisioned:
    base: str
    token: str
    production_id: int
    stream: str
    srt_url: str
    whep_url: str
    cleanup: list[str] = field(default_factory=list)

    def delete(self) -> None:
        _api("DELETE", f"{self.base}/api/v1/streams/{urllib.parse.quote(self.stream)}", token=self.token)
        _api("DELETE", f"{self.base}/api/v1/productions/{self.production_id}", token=self.token)


def provision(base: str, username: str, password: str) -> Provisioned:
    """login → production → stream → read link; SRT/WHEP URLs forced to 127.0.0.1."""
    status, body = _api("POST", f"{base}/api/v1/auth/login", {"username": username, "password": password})
    if status != 200:
        raise RuntimeError(f"login failed: {status} {body}")
    token = body["access_token"]
    tag = secrets.token_hex(3)
    status, prod = _api("POST", f"{base}/api/v1/productions", {"name": f"latency-probe-{tag}"}, token)
    if status != 201:
        raise RuntimeError(f"create production failed: {status} {prod}")
    name = f"probe-{tag}"
    status, stream = _api("POST", f"{base}/api/v1/streams", {"name": name, "production": prod["id"]}, token)
    if status != 201:
        _api("DELETE", f"{base}/api/v1/productions/{prod['id']}", token=token)
        raise RuntimeError(f"create stream failed: {status} {stream}")
    status, link = _api("POST", f"{base}/api/v1/streams/{urllib.parse.quote(name)}/links", {"action": "read"}, token)
    whep = link["whep_url"] if status in (200, 201) and isinstance(link, dict) else stream["whep_url"]
    srt = urllib.parse.urlsplit(stream["srt_url"])
    srt_url = urllib.parse.urlunsplit(srt._replace(netloc=f"127.0.0.1:{srt.port}"))
    w = urllib.parse.urlsplit(whep)
    whep_url = urllib.parse.urlunsplit(w._replace(netloc=f"127.0.0.1:{w.port or urllib.parse.urlsplit(base).port}"))
    return Provisioned(base, token, prod["id"], name, srt_url, whep_url)


# --------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------


async def run_whep(args: argparse.Namespace, target: SrtTarget, whep_url: str, token: str | None,
                   aus: list[bytes], log: Any, metrics_url: str | None = None) -> dict[str, Any]:
    from whep_client import BROWSER_RTCP
    from whep_swarm import SwarmConfig, metrics_url_for, scrape_metrics, run_swarm

    counts = [int(x) for x in args.viewers.split(",")]
    per_run = args.duration + args.settle
    total = sum(per_run + (args.ramp_allowance if n > 1 else 0) for n in counts) + 30
    sender = SrtSender(target, aus, args.fps, args.srt_latency_ms, total, args.pts_jitter)
    sender.start()
    if not await asyncio.to_thread(sender.connected.wait, 30):
        raise RuntimeError("SRT connect did not finish in 30 s")
    if sender.error:
        raise RuntimeError(f"SRT sender: {sender.error}")
    log(f"SRT connected, agreed latency {sender.peer_latency_ms} ms (asked {args.srt_latency_ms} ms)")
    srt_latency_ns = (sender.peer_latency_ms or args.srt_latency_ms) * 1_000_000
    out: dict[str, Any] = {"srt_latency_ms": sender.peer_latency_ms, "runs": []}
    try:
        async with WhepViewer(whep_url, token=token, frame_log=1_000_000, retry_not_live=20,
                              connect_timeout=40, nack=False) as viewer:
            log(f"probe viewer connected ({viewer.stats.codecs})")
            metrics_url = metrics_url or metrics_url_for(whep_url)
            for n in counts:
                window: list[float] = []
                swarm_report = None
                m0 = await asyncio.to_thread(scrape_metrics, metrics_url)
                if n > 1:
                    cfg = SwarmConfig(url=whep_url, token=token, viewers=n - 1, procs=args.load_procs,
                                      rate=args.load_rate, hold=args.duration, settle=args.settle,
                                      connect_timeout=30, srtp_verify_every=args.srtp_verify_every,
                                      # the load viewers report like Chromium: the server's RTCP work
                                      # is in the fan-out the probe waits behind
                                      browser_rtcp=not args.plain_rtcp, nack=not args.plain_rtcp,
                                      rtcp_interval=1.0 if args.plain_rtcp else BROWSER_RTCP.video_interval)
                    swarm_report = await asyncio.to_thread(
                        run_swarm, cfg, log=log, on_hold=lambda t0, hold: window.extend((t0, t0 + hold)))
                    if not window:
                        raise RuntimeError(f"load swarm for {n} viewers never reached its window: "
                                           f"{swarm_report.get('errors')}")
                else:
                    t0 = time.monotonic() + args.settle
                    window = [t0, t0 + args.duration]
                    await asyncio.sleep(max(0.0, window[1] - time.monotonic()) + 1.0)
                await asyncio.sleep(1.0)  # frames sent at the window's end are still on their way
                m1 = await asyncio.to_thread(scrape_metrics, metrics_url)
                out["runs"].append(_evaluate(n, viewer, sender, window, srt_latency_ns, swarm_report))
                # includes the ramp for loaded runs (the scrape brackets the whole run)
                out["runs"][-1]["server_histogram"] = histogram_window(m0, m1)
                out["runs"][-1]["server_histogram_first_byte"] = histogram_window(
                    m0, m1, "returnfeed_forwarding_latency_from_first_byte_seconds")
                log(_line(out["runs"][-1]))
    finally:
        sender.stop_event.set()
        await asyncio.to_thread(sender.join, 10)
    out["sender"] = {"frames": sender.frames, "messages": sender.messages, "late_frames": sender.late_frames}
    return out


def _evaluate(n: int, viewer: WhepViewer, sender: SrtSender, window: list[float], srt_latency_ns: int,
              swarm_report: dict[str, Any] | None) -> dict[str, Any]:
    arrivals: dict[int, int] = {}
    order: list[int] = []
    for s in viewer.stats.counter.media("video"):
        if s.frame_log:
            for ts, t_arr, _ast, _seq in s.frame_log:
                if ts not in arrivals:
                    arrivals[ts] = t_arr
                    order.append(ts)
    sent = dict(sender.sent)
    pts_sorted = [p for p, _ in sorted(sent.items(), key=lambda kv: kv[1])]
    direct = sum(1 for ts in order[:200] if ts in {p & 0xFFFFFFFF for p in pts_sorted})
    rtp_is_pts = bool(order) and direct >= 0.9 * min(200, len(order))
    offset, votes = (0, direct) if rtp_is_pts else find_offset(pts_sorted, order)
    lo, hi = int(window[0] * 1e9), int(window[1] * 1e9)
    row: dict[str, Any] = {"viewers": n, "rtp_ts_is_pts": rtp_is_pts, "offset": offset, "offset_votes": votes}
    if offset is None:
        row["error"] = "could not match RTP timestamps to PTS"
        return row
    row.update(latency_stats(sent, arrivals, (lo, hi), srt_latency_ns, offset))
    v = viewer.stats.video
    row["probe_viewer"] = {"lost": v.lost if v else None, "duplicates": v.duplicates if v else None,
                           "backwards": v.backwards if v else None}
    if swarm_report is not None:
        row["load"] = {"connected": swarm_report["viewers"]["connected"],
                       "requested": swarm_report["viewers"]["requested"],
                       "lost": swarm_report["sequence_window"]["lost"],
                       "swarm_us_per_packet": swarm_report["swarm"]["us_per_packet"],
                       "errors": swarm_report["errors"]}
    return row


def _line(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{r['viewers']:>4} viewers: {r['error']}"
    a = r["added_ms"]
    f = (lambda x: "n/a" if x is None else f"{x:.2f}")
    load = ""
    if "load" in r:
        load = f"; load {r['load']['connected']}/{r['load']['requested']} connected, lost {r['load']['lost']}"
    server = ""
    for key, what in (("server_histogram", "server's own histogram"),
                      ("server_histogram_first_byte", "from the frame's first byte")):
        h = r.get(key)
        if h and h.get("frames"):
            server += (f"\n      {what} (whole run, bucket bounds): p50 ≤ {h.get('p50_le_ms')} ms, "
                       f"p90 ≤ {h.get('p90_le_ms')} ms, p99 ≤ {h.get('p99_le_ms')} ms over {h['frames']} frames")
    return (f"{r['viewers']:>4} viewers: frames {r['frames_matched']}/{r['frames_sent']} matched; added latency "
            f"ms p50 {f(a['p50'])} p90 {f(a['p90'])} p99 {f(a['p99'])} max {f(a['max'])} min {f(a['min'])}"
            f" (rtp ts {'= PTS' if r['rtp_ts_is_pts'] else 'offset ' + str(r['offset'])}){load}{server}")


async def run_srt_only(args: argparse.Namespace, aus: list[bytes], log: Any) -> dict[str, Any]:
    rx = SrtOnlyReceiver(args.srt_latency_ms)
    rx.start()
    sender = SrtSender(SrtTarget("127.0.0.1", rx.port, "publish:probe"), aus, args.fps, args.srt_latency_ms,
                       args.duration + args.settle + 2, args.pts_jitter)
    sender.start()
    await asyncio.to_thread(sender.connected.wait, 30)
    if sender.error:
        raise RuntimeError(f"SRT sender: {sender.error}")
    t0 = time.monotonic() + args.settle
    window = (int(t0 * 1e9), int((t0 + args.duration) * 1e9))
    await asyncio.to_thread(sender.join, args.duration + args.settle + 30)
    await asyncio.sleep(0.5 + args.srt_latency_ms / 1000)
    rx.stop_event.set()
    await asyncio.to_thread(rx.join, 5)
    srt_latency_ns = (sender.peer_latency_ms or args.srt_latency_ms) * 1_000_000
    row = {"viewers": 0, "rtp_ts_is_pts": True, "offset": 0, "offset_votes": None,
           "demux_completion": dict(rx.completions)}
    row.update(latency_stats(sender.sent, rx.arrivals, window, srt_latency_ns, rtp=False))
    log("srt-only: " + _line(row).split(":", 1)[1])
    return {"srt_latency_ms": sender.peer_latency_ms, "runs": [row],
            "sender": {"frames": sender.frames, "messages": sender.messages, "late_frames": sender.late_frames}}


# --------------------------------------------------------------------------
# Live QC on / off (issue 12: p99 at 100 viewers worse by ≤ 1 ms with QC on 4 streams)
# --------------------------------------------------------------------------


def make_qc_clip(path: Path, size: str, seconds: int = 12) -> None:
    """What the extra publishers loop with ``-c copy``: 30 fps H.264 constrained
    baseline without B-frames (IDR every 2 s) and Opus stereo, in MPEG-TS."""
    import subprocess

    subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i", f"testsrc2=size={size}:rate=30",
         "-f", "lavfi", "-i", "anoisesrc=color=pink:sample_rate=48000:amplitude=0.05", "-t", str(seconds),
         "-c:v", "libx264", "-profile:v", "baseline", "-preset", "veryfast", "-tune", "zerolatency", "-bf", "0",
         "-g", "60", "-b:v", "2M", "-maxrate", "2M", "-bufsize", "2M", "-pix_fmt", "yuv420p",
         "-c:a", "libopus", "-b:a", "96k", "-ac", "2", "-f", "mpegts", str(path)], check=True, timeout=300)


def qc_run(args: argparse.Namespace, aus: list[bytes], clip: Path, qc: bool, log: Any) -> dict[str, Any]:
    """One server (QC on or off), the probe's stream + ``--qc-streams`` − 1
    streams published by ffmpeg, then the usual runs on the probe stream."""
    import os
    import re
    import signal
    import subprocess
    import tempfile

    from server_process import ServerProcess
    from whep_swarm import scrape_metrics

    password = "probe-" + secrets.token_hex(8)
    env = {"RETURNFEED_QC__ENABLED": "true" if qc else "false", "RETURNFEED_LOG__LEVEL": "warning",
           "RETURNFEED_HTTP__MAX_CONNECTIONS_PER_IP": "0"}  # every viewer comes from 127.0.0.1
    publishers: list[subprocess.Popen] = []
    names: list[str] = []  # the probe's stream first
    with tempfile.TemporaryDirectory(prefix="rf-qc-ab-") as tmp:
        server = ServerProcess(Path(tmp) / "data", password=password, env=env, cpus=args.server_cpus)
        prov = None
        try:
            base = server.url
            prov = provision(base, "admin", password)
            srt = urllib.parse.urlsplit(prov.srt_url)
            srt_url = urllib.parse.urlunsplit(srt._replace(netloc=f"127.0.0.1:{server.srt_port}"))
            names.append(prov.stream)
            for i in range(args.qc_streams - 1):
                name = f"{prov.stream}-qc{i + 1}"
                status, stream = _api("POST", f"{base}/api/v1/streams",
                                      {"name": name, "production": prov.production_id}, prov.token)
                if status != 201:
                    raise RuntimeError(f"create stream failed: {status} {stream}")
                names.append(name)
                url = re.sub(r"srt://[^/?]+", f"srt://127.0.0.1:{server.srt_port}", stream["srt_url"])
                publishers.append(subprocess.Popen(
                    ["ffmpeg", "-nostdin", "-loglevel", "error", "-re", "-stream_loop", "-1", "-i", str(clip),
                     "-c", "copy", "-f", "mpegts", url], start_new_session=True))
            result = asyncio.run(run_whep(args, SrtTarget.parse(srt_url), prov.whep_url, args.token, aus, log,
                                          metrics_url=server.metrics))
            metrics = scrape_metrics(server.metrics) or {}
            cpu = {n: metrics.get(f'returnfeed_qc_cpu_seconds_total{{stream="{n}"}}') for n in names}
            result["qc"] = qc
            result["qc_cpu_s"] = cpu
            result["qc_drops"] = sum(v for k, v in metrics.items() if k.startswith("returnfeed_qc_") and "drop" in k)
            result["server_errors"] = list(server.errors)
            return result
        finally:
            for proc in publishers:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(10)
            if prov is not None:
                for name in names[1:]:
                    _api("DELETE", f"{prov.base}/api/v1/streams/{urllib.parse.quote(name)}", token=prov.token)
                prov.delete()
            server.stop()


def workers_run(args: argparse.Namespace, aus: list[bytes], log: Any) -> dict[str, Any]:
    """An own server whose viewers live in ``--workers`` egress worker
    processes (``webrtc.egress_workers``), the probe's stream provisioned on
    it, then the usual runs."""
    import tempfile

    import uvloop

    from server_process import ServerProcess

    password = "probe-" + secrets.token_hex(8)
    env = {"RETURNFEED_WEBRTC__EGRESS_WORKERS": str(args.workers), "RETURNFEED_LOG__LEVEL": "warning",
           "RETURNFEED_HTTP__MAX_CONNECTIONS_PER_IP": "0"}  # every viewer comes from 127.0.0.1
    with tempfile.TemporaryDirectory(prefix="rf-probe-") as tmp:
        server = ServerProcess(Path(tmp) / "data", password=password, env=env, cpus=args.server_cpus)
        prov = None
        try:
            prov = provision(server.url, "admin", password)
            srt = urllib.parse.urlsplit(prov.srt_url)
            srt_url = urllib.parse.urlunsplit(srt._replace(netloc=f"127.0.0.1:{server.srt_port}"))
            result = uvloop.run(run_whep(args, SrtTarget.parse(srt_url), prov.whep_url, args.token, aus, log,
                                         metrics_url=server.metrics))
            result["workers"] = args.workers
            result["server_errors"] = list(server.errors)
            return result
        finally:
            if prov is not None:
                prov.delete()
            server.stop()


def run_qc_ab(args: argparse.Namespace, aus: list[bytes], log: Any) -> list[dict[str, Any]]:
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory(prefix="rf-qc-clip-") as tmp:
        clip = Path(tmp) / "qc.ts"
        make_qc_clip(clip, args.qc_size)
        order = [False, True] * args.qc_ab
        for i, qc in enumerate(order):
            log(f"--- round {i // 2 + 1}, QC {'on' if qc else 'off'} ({args.qc_streams} streams)")
            res = qc_run(args, aus, clip, qc, log)
            for r in res["runs"]:
                rows.append({"round": i // 2 + 1, "qc": qc, "viewers": r.get("viewers"),
                             "added_ms": r.get("added_ms"), "frames_matched": r.get("frames_matched"),
                             "frames_sent": r.get("frames_sent"), "error": r.get("error"),
                             "load": r.get("load"), "qc_cpu_s": res["qc_cpu_s"], "qc_drops": res["qc_drops"],
                             "srt_latency_ms": res["srt_latency_ms"], "server_errors": res["server_errors"]})
                log(_qc_line(rows[-1]))
    return rows


def _qc_line(r: dict[str, Any]) -> str:
    if r.get("error") or not r.get("added_ms"):
        return f"round {r['round']} QC {'on ' if r['qc'] else 'off'} {r['viewers']:>4} viewers: {r.get('error')}"
    a = r["added_ms"]
    cpu = [v for v in r["qc_cpu_s"].values() if v is not None]
    qc = f"; QC CPU {sum(cpu):.1f} s over {len(cpu)} streams, drops {r['qc_drops']:.0f}" if r["qc"] else ""
    return (f"round {r['round']} QC {'on ' if r['qc'] else 'off'} {r['viewers']:>4} viewers: frames "
            f"{r['frames_matched']}/{r['frames_sent']}; added ms p50 {a['p50']:.2f} p99 {a['p99']:.2f} "
            f"max {a['max']:.2f}{qc}")


def qc_summary(rows: list[dict[str, Any]]) -> tuple[str, bool]:
    """Per viewer count: the off and on runs' p50/p99/max (medians over rounds)
    and the p99 difference against the budget (≤ 1 ms)."""
    import statistics

    lines = []
    ok = True
    for n in sorted({r["viewers"] for r in rows if r.get("added_ms")}):
        by = {qc: [r["added_ms"] for r in rows if r["viewers"] == n and r["qc"] == qc and r.get("added_ms")
                   and r["added_ms"].get("p99") is not None] for qc in (False, True)}
        if not by[False] or not by[True]:
            continue
        med = {qc: {k: statistics.median(a[k] for a in by[qc]) for k in ("p50", "p99", "max")} for qc in by}
        spread = {qc: (min(a["p99"] for a in by[qc]), max(a["p99"] for a in by[qc])) for qc in by}
        diff = med[True]["p99"] - med[False]["p99"]
        within = diff <= 1.0
        if n >= 100:
            ok &= within
        for qc in (False, True):
            m = med[qc]
            lines.append(f"{n:>4} viewers, QC {'on ' if qc else 'off'} ({len(by[qc])} runs, medians): "
                         f"p50 {m['p50']:.2f} p99 {m['p99']:.2f} (runs {spread[qc][0]:.2f}–{spread[qc][1]:.2f}) "
                         f"max {m['max']:.2f} ms")
        lines.append(f"{n:>4} viewers: p99 with QC on − off = {diff:+.2f} ms (budget ≤ +1 ms: "
                     f"{'met' if within else 'NOT met'})")
    return "\n".join(lines), ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--srt-url", help="srt://127.0.0.1:PORT?streamid=…&passphrase=…[&pbkeylen=…]")
    src.add_argument("--api", help="server base URL: create a stream + read link, delete them afterwards")
    src.add_argument("--srt-only", action="store_true", help="self-check against an in-process SRT listener")
    src.add_argument("--qc-ab", type=int, metavar="ROUNDS",
                     help="own servers, QC off then on, ROUNDS times (issue 12's forwarding budget)")
    ap.add_argument("--qc-streams", type=int, default=4,
                    help="with --qc-ab: streams QC analyses, the probe's included")
    ap.add_argument("--qc-size", default="1280x720", help="with --qc-ab: picture size of the extra streams")
    ap.add_argument("--server-cpus", help="with --qc-ab or --workers: taskset CPU list for the servers (their "
                    "worker processes too)")
    src.add_argument("--workers", type=int, metavar="N",
                     help="an own server with N egress worker processes (webrtc.egress_workers)")
    ap.add_argument("--whep-url", help="WHEP endpoint of the stream (with --srt-url)")
    ap.add_argument("--token", help="bearer token for WHEP (or ?token= in --whep-url)")
    ap.add_argument("--username", default="admin")
    ap.add_argument("--password")
    ap.add_argument("--viewers", default="1,100", help="comma-separated viewer counts, one run each")
    ap.add_argument("--duration", type=float, default=20.0, help="measurement window per run, s")
    ap.add_argument("--settle", type=float, default=3.0)
    ap.add_argument("--ramp-allowance", type=float, default=30.0, help="extra SRT send time per loaded run, s")
    ap.add_argument("--load-procs", type=int, default=2)
    ap.add_argument("--load-rate", type=float, default=25.0)
    ap.add_argument("--srtp-verify-every", type=int, default=1, help="for the load viewers (see whep_swarm)")
    ap.add_argument("--plain-rtcp", action="store_true",
                    help="load viewers send one RR+REMB a second instead of whep_swarm --browser-rtcp")
    ap.add_argument("--srt-latency-ms", type=int, default=20)
    ap.add_argument("--fps", type=int, default=30)
    ap.add_argument("--kbps", type=int, default=1000)
    ap.add_argument("--size", default="640x360")
    ap.add_argument("--pts-jitter", type=int, default=3, help="± ticks added to PTS steps (0: exact)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args(argv)
    if args.srt_url and not args.whep_url:
        ap.error("--whep-url is required with --srt-url")
    if args.api and not args.password:
        ap.error("--password is required with --api")
    log = (lambda *a: print(*a, file=sys.stderr, flush=True))

    from whep_swarm import encode_h264_loop

    w, h = (int(x) for x in args.size.split("x"))
    aus = encode_h264_loop(w, h, args.fps, args.kbps, 4)
    log(f"encoded {len(aus)} access units ({sum(map(len, aus)) * 8 * args.fps / len(aus) / 1000:.0f} kbit/s)")

    if args.qc_ab:
        try:
            rows = run_qc_ab(args, aus, log)
        except (WhepError, RuntimeError, ValueError) as exc:
            print(f"latency probe failed: {exc}", file=sys.stderr)
            return 2
        for r in rows:
            print(_qc_line(r))
        text, ok = qc_summary(rows)
        print(text)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
        return 0 if ok else 1

    prov = None
    try:
        if args.srt_only:
            result = asyncio.run(run_srt_only(args, aus, log))
        elif args.workers is not None:
            result = workers_run(args, aus, log)
        else:
            if args.api:
                prov = provision(args.api.rstrip("/"), args.username, args.password)
                srt_url, whep_url = prov.srt_url, prov.whep_url
                log(f"provisioned stream {prov.stream}")
            else:
                srt_url, whep_url = args.srt_url, args.whep_url
            target = SrtTarget.parse(srt_url)
            for host in (target.host, urllib.parse.urlsplit(whep_url).hostname):
                if host not in ("127.0.0.1", "localhost", "::1"):
                    ap.error("load traffic goes to 127.0.0.1 only")
            import uvloop

            result = uvloop.run(run_whep(args, target, whep_url, args.token, aus, log))
    except (WhepError, RuntimeError, ValueError) as exc:
        print(f"latency probe failed: {exc}", file=sys.stderr)
        return 2
    finally:
        if prov is not None:
            prov.delete()
    print(f"SRT latency (agreed): {result['srt_latency_ms']} ms — subtracted; sender: {result['sender']}")
    ok = True
    for r in result["runs"]:
        print(_line(r))
        if r.get("viewers") == 100 and r.get("added_ms", {}).get("p50") is not None:
            a = r["added_ms"]
            within = a["p50"] <= 1.0 and a["p99"] <= 5.0
            ok &= within
            print(f"  budget at 100 viewers (p50 ≤ 1 ms, p99 ≤ 5 ms): {'met' if within else 'NOT met'}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
