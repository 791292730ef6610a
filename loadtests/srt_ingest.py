"""SRT ingest benchmark: N ffmpeg callers × M Mbit/s into one in-process listener.

    python loadtests/srt_ingest.py [--callers 16] [--mbps 6] [--duration 20]
                                   [--latency 120] [--encrypt] [--json]
                                   [--pipeline [--transcode]]

What it does:

1. pre-encodes ONE MPEG-TS file once (1280x720 testsrc, H.264 CBR at
   ``--mbps`` with x264 filler, cached in the temp directory), so the callers
   cost almost nothing: each is ``ffmpeg -re -stream_loop -1 -i file -c copy
   -f mpegts srt://…`` (a remux, no encode);
2. starts :class:`media.srt.listener.SrtListener` in this process on uvloop,
   with a consumer that only counts bytes (the cost measured is the ingest
   path: libsrt + epoll thread + hand-off to the loop); with ``--pipeline``
   each connection is wired to the server's own ingest session
   (:class:`media.srt.ingest.SrtIngestSession`: demuxer, QUIET timer, RAP
   scan, stream hub), as server/media_service.py wires it; ``--transcode``
   adds the server's AAC → Opus worker (off: AAC is published as AAC, the
   work the benchmark measured before issue 11);
3. after a warm-up, measures for ``--duration`` seconds: CPU of this process
   from ``/proc/self/stat`` and per thread from ``/proc/self/task/*/stat``
   grouped by role (our epoll thread, the event-loop thread, libsrt's
   receive/send queue threads, its per-socket TSBPD threads, the rest), bytes
   per second per caller, and per connection SRT loss / retransmissions /
   drops from ``srt_bistats``.

Budget (DESIGN.md): 16 cameras × 6 Mbit/s on 2 cores: no loss, ingest
≤ 25 % of one core.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from media.ingest.ts import IngestCounters  # noqa: E402
from media.mpegts.events import AccessUnit  # noqa: E402
from media.srt.ingest import SrtIngestSession  # noqa: E402
from media.srt.listener import Decision, SrtConnection, SrtListener  # noqa: E402
from media.srt.streamid import StreamIdRequest  # noqa: E402
from media.stream import SourceInfo, StreamHub  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
PASSPHRASE = "loadtest-passphrase"


def make_media(mbps: float, seconds: int) -> Path:
    """Encode (once) a 720p25 H.264 CBR MPEG-TS at ``mbps``."""
    cache = Path(tempfile.gettempdir()) / "returnfeed-loadtest"
    cache.mkdir(exist_ok=True)
    out = cache / f"srt_ingest_720p_{mbps:g}M_{seconds}s.ts"
    if out.exists() and out.stat().st_size > 0:
        return out
    kbps = int(mbps * 1000)
    tmp = out.with_suffix(".part.ts")
    subprocess.run(
        [
            "ffmpeg", "-hide_banner", "-loglevel", "error", "-y",
            "-f", "lavfi", "-i", "testsrc=size=1280x720:rate=25",
            "-f", "lavfi", "-i", "sine=frequency=1000:sample_rate=48000",
            "-t", str(seconds),
            "-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency", "-pix_fmt", "yuv420p",
            "-g", "50", "-b:v", f"{kbps - 128}k", "-minrate", f"{kbps - 128}k", "-maxrate", f"{kbps - 128}k",
            "-bufsize", "1M", "-x264-params", "nal-hrd=cbr",
            "-c:a", "aac", "-b:a", "128k", "-muxrate", f"{kbps}k", "-f", "mpegts", str(tmp),
        ],
        check=True,
    )  # fmt: skip
    tmp.rename(out)
    return out


def _read_stat(path: str) -> tuple[int, int] | None:
    try:
        with open(path) as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2 :].split()
    return int(fields[11]), int(fields[12])  # utime, stime (fields 14 and 15)


def _comm(tid: str) -> str:
    try:
        with open(f"/proc/self/task/{tid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def thread_ticks() -> dict[str, tuple[str, int]]:
    out: dict[str, tuple[str, int]] = {}
    for tid in os.listdir("/proc/self/task"):
        st = _read_stat(f"/proc/self/task/{tid}/stat")
        if st is not None:
            out[tid] = (_comm(tid), st[0] + st[1])
    return out


def process_ticks() -> int:
    st = _read_stat("/proc/self/stat")
    assert st is not None
    return st[0] + st[1]


def role(tid: str, comm: str, epoll_tid: int | None, loop_tid: int) -> str:
    if epoll_tid is not None and int(tid) == epoll_tid:
        return "epoll thread (bridge)"
    if int(tid) == loop_tid:
        return "event loop thread"
    if comm.startswith("SRT:RcvQ"):
        return "libsrt receive queue"
    if comm.startswith("SRT:SndQ"):
        return "libsrt send queue"
    if comm.startswith("SRT:TsbPd"):
        return "libsrt TSBPD (per socket)"
    if comm.startswith("SRT:GC"):
        return "libsrt GC"
    return f"other ({comm})"


async def run(args: argparse.Namespace) -> dict[str, object]:
    media = make_media(args.mbps, args.media_seconds)
    counts: dict[int, int] = defaultdict(int)
    conns: list[SrtConnection] = []

    def authorize(req: StreamIdRequest | None, peer: str, raw: str) -> Decision:
        if req is None or req.action != "publish":
            return Decision.deny(1400, "bad stream id")
        return Decision.allow(passphrase=PASSPHRASE if args.encrypt else None)

    hub = StreamHub()
    latencies: list[float] = []  # frame complete (bridge wake-up or QUIET timer) → handed to publish (s)
    completions: dict[str, int] = defaultdict(int)
    measuring = [False]
    ingest_counters = IngestCounters()
    sessions: list[SrtIngestSession] = []
    # The server's executor for the AAC → Opus worker (server/media_service.py).
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="media-cpu")
    clock = time.monotonic

    def observe(unit: AccessUnit) -> None:
        # Called by the ingest just before the unit is published.
        if measuring[0]:
            latencies.append(clock() - unit.arrival)
            completions[unit.completion.name] += 1

    def on_connection(conn: SrtConnection) -> None:
        conns.append(conn)
        sid = conn.socket_id
        if not args.pipeline:
            def on_data(messages: list[bytes], now: float) -> None:
                n = 0
                for m in messages:
                    n += len(m)
                counts[sid] += n

            conn.on_data = on_data
            return
        # The server's ingest path, the server's code (server/media_service.py
        # SrtIngest wires the same session): demux every message, publish
        # access units and the original TS, release held frames on the QUIET
        # timer.
        stream = hub.get_or_create(conn.stream or f"s{sid}")
        pub = stream.attach_publisher(SourceInfo("srt"), now=time.monotonic())
        session = SrtIngestSession(conn, pub, ingest_counters, executor=executor, transcode=args.transcode,
                                   on_video=observe)
        sessions.append(session)
        ingest_data = session.on_data

        def on_data_pipeline(messages: list[bytes], now: float) -> None:
            ingest_data(messages, now)
            n = 0
            for m in messages:
                n += len(m)
            counts[sid] += n

        conn.on_data = on_data_pipeline

    listener = SrtListener(
        "127.0.0.1", 0, authorize=authorize, on_connection=on_connection, latency_ms=args.latency,
        max_connections=args.callers + 4,
    )  # fmt: skip
    await listener.start()
    procs: list[asyncio.subprocess.Process] = []
    try:
        for i in range(args.callers):
            url = f"srt://127.0.0.1:{listener.port}?streamid=publish:cam{i}&latency={args.latency * 1000}"
            if args.encrypt:
                url += f"&passphrase={PASSPHRASE}&pbkeylen=16"
            procs.append(
                await asyncio.create_subprocess_exec(
                    "ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-re", "-stream_loop", "-1",
                    "-i", str(media), "-c", "copy", "-f", "mpegts", url,
                    stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
                )  # fmt: skip
            )
        deadline = time.monotonic() + 15
        while len(conns) < args.callers and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if len(conns) < args.callers:
            raise SystemExit(f"only {len(conns)} of {args.callers} callers connected")
        await asyncio.sleep(args.warmup)

        loop_tid = threading.get_native_id()
        epoll_tid = listener.bridge.thread_native_id
        stats0 = {c.socket_id: c.stats() for c in conns}
        bytes0 = dict(counts)
        bridge0 = listener.bridge.stats.as_dict()
        ingest0 = dataclasses.asdict(ingest_counters)
        t0, p0, th0 = time.monotonic(), process_ticks(), thread_ticks()
        measuring[0] = True
        await asyncio.sleep(args.duration)
        measuring[0] = False
        t1, p1, th1 = time.monotonic(), process_ticks(), thread_ticks()
        bridge1 = listener.bridge.stats.as_dict()
        ingest1 = dataclasses.asdict(ingest_counters)
        stats1 = {c.socket_id: c.stats() for c in conns}
        bytes1 = dict(counts)
        wall = t1 - t0

        by_role: dict[str, float] = defaultdict(float)
        for tid, (comm, ticks) in th1.items():
            before = th0.get(tid, (comm, 0))[1]
            by_role[role(tid, comm, epoll_tid, loop_tid)] += (ticks - before) / CLK_TCK / wall * 100
        per_caller = []
        for c in conns:
            a, b = stats0[c.socket_id], stats1[c.socket_id]
            per_caller.append(
                {
                    "stream": c.stream,
                    "mbps_received": round((bytes1.get(c.socket_id, 0) - bytes0.get(c.socket_id, 0)) * 8 / wall / 1e6, 3),
                    "pktRecv": int(b["pktRecv"] - a["pktRecv"]),
                    "pktRcvLoss": int(b["pktRcvLoss"] - a["pktRcvLoss"]),
                    "pktRcvRetrans": int(b["pktRcvRetrans"] - a["pktRcvRetrans"]),
                    "pktRcvDrop": int(b["pktRcvDrop"] - a["pktRcvDrop"]),
                    "pktRcvBelated": int(b["pktRcvBelated"] - a["pktRcvBelated"]),
                    "pktRcvUndecrypt": int(b["pktRcvUndecrypt"] - a["pktRcvUndecrypt"]),
                    "msRTT": round(float(b["msRTT"]), 3),
                    "msRcvBuf": int(b["msRcvBuf"]),
                }
            )
        wakeups = bridge1["wakeups"] - bridge0["wakeups"]
        messages = bridge1["messages"] - bridge0["messages"]
        lat = sorted(latencies)

        def pct(q: float) -> float:
            return round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1e3, 3) if lat else 0.0

        return {
            "pipeline": bool(args.pipeline),
            "transcode": bool(args.pipeline and args.transcode),
            "ingest": {k: ingest1[k] - ingest0[k] for k in ("access_units", "demux_errors", "discontinuities")},
            # Whole run: a QUIET release the sender then proved wrong
            # (more of the frame came) is an early_overrun.
            "demux_totals": {k: sum(getattr(s.ts_counters, k) for s in sessions)
                             for k in ("completed_quiet", "early_overrun", "cc_error")},
            "demux_latency_ms": {"p50": pct(0.5), "p99": pct(0.99), "max": round(lat[-1] * 1e3, 3) if lat else 0.0,
                                 "frames": len(lat), "completion": dict(completions)},
            "callers": args.callers,
            "target_mbps_per_caller": args.mbps,
            "encrypted": args.encrypt,
            "latency_ms": args.latency,
            "duration_s": round(wall, 2),
            "cpu_percent_of_one_core": {
                "process_total": round((p1 - p0) / CLK_TCK / wall * 100, 1),
                **{k: round(v, 1) for k, v in sorted(by_role.items(), key=lambda kv: -kv[1])},
            },
            "bridge": {
                "wakeups_per_s": round(wakeups / wall, 1),
                "messages_per_s": round(messages / wall, 1),
                "messages_per_wakeup": round(messages / wakeups, 2) if wakeups else 0,
                "dropped_lag_messages": bridge1["dropped_lag_messages"] - bridge0["dropped_lag_messages"],
            },
            "received_mbps_total": round(sum(p["mbps_received"] for p in per_caller), 2),
            "totals": {
                k: sum(p[k] for p in per_caller)  # type: ignore[misc]
                for k in ("pktRecv", "pktRcvLoss", "pktRcvRetrans", "pktRcvDrop", "pktRcvBelated", "pktRcvUndecrypt")
            },
            "per_caller": per_caller,
        }
    finally:
        for p in procs:
            if p.returncode is None:
                p.terminate()
        for p in procs:
            try:
                await asyncio.wait_for(p.wait(), 5)
            except asyncio.TimeoutError:
                p.kill()
        await listener.close()
        for session in sessions:
            if session.transcoder is not None:
                await session.transcoder.stop()
        executor.shutdown(wait=False, cancel_futures=True)


def print_report(r: dict[str, object]) -> None:
    print(
        f"SRT ingest: {r['callers']} callers x {r['target_mbps_per_caller']} Mbit/s, "
        f"encrypted={r['encrypted']}, latency={r['latency_ms']} ms, measured {r['duration_s']} s"
    )
    if r.get("pipeline"):
        d = r["demux_latency_ms"]
        print(f"full ingest pipeline (demux + hub): video access units {d['frames']}, "  # type: ignore[index]
              f"complete -> publish p50 {d['p50']} ms, p99 {d['p99']} ms, max {d['max']} ms; "  # type: ignore[index]
              f"completed by {d['completion']}")  # type: ignore[index]
        print(f"ingest (window): {r['ingest']}, demuxers (run): {r['demux_totals']}, AAC -> Opus: {r['transcode']}")
    print("CPU (% of one core):")
    for k, v in r["cpu_percent_of_one_core"].items():  # type: ignore[union-attr]
        print(f"  {k:32s} {v:6.1f}")
    b = r["bridge"]
    print(
        f"bridge: {b['wakeups_per_s']} wakeups/s, {b['messages_per_s']} msg/s, "  # type: ignore[index]
        f"{b['messages_per_wakeup']} msg/wakeup, lag drops {b['dropped_lag_messages']}"  # type: ignore[index]
    )
    print(f"received total: {r['received_mbps_total']} Mbit/s; SRT totals: {r['totals']}")
    print(f"{'stream':8s} {'Mbit/s':>7s} {'pktRecv':>8s} {'loss':>5s} {'retr':>5s} {'drop':>5s} {'belated':>7s} {'RTT ms':>7s}")
    for p in r["per_caller"]:  # type: ignore[union-attr]
        print(
            f"{p['stream']:8s} {p['mbps_received']:7.3f} {p['pktRecv']:8d} {p['pktRcvLoss']:5d} "
            f"{p['pktRcvRetrans']:5d} {p['pktRcvDrop']:5d} {p['pktRcvBelated']:7d} {p['msRTT']:7.3f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--callers", type=int, default=16)
    ap.add_argument("--mbps", type=float, default=6.0)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--latency", type=int, default=120)
    ap.add_argument("--media-seconds", type=int, default=10)
    ap.add_argument("--encrypt", action="store_true", help="AES-128 on every caller")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--pipeline", action="store_true",
                    help="run the server's whole ingest path (demux, hub, RAP scan), not only SRT receive")
    ap.add_argument("--transcode", action="store_true",
                    help="with --pipeline: AAC to Opus as the server does (off: AAC published as AAC)")
    args = ap.parse_args()
    if shutil.which("ffmpeg") is None:
        raise SystemExit("ffmpeg (with libsrt) is required")
    try:
        import uvloop
    except ImportError:
        uvloop = None
    report = uvloop.run(run(args)) if uvloop is not None else asyncio.run(run(args))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)


if __name__ == "__main__":
    main()
