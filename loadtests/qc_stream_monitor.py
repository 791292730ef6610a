"""Microbenchmark: what the live QC stream detectors cost on the event loop.

QcService (server/qc_service.py) runs ``live_qc.stream.StreamMonitor`` in the
server process, beside forwarding: ``on_frame`` for every frame of the
tapped layer and the audio, an SPS scan of every keyframe, and a counter
sample plus ``handle_timer`` every 0.2 s. This feeds a synthetic stream
(video at ``--fps`` with a keyframe every second, audio at 50 packets/s) of
``--seconds`` of media through one monitor and prints the cost of each
call kind, in µs, and the share of one core per stream::

    .venv/bin/python loadtests/qc_stream_monitor.py --seconds 600 --keyframe-kb 60
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from live_qc.stream import TR101290_P1, TR101290_P2, StreamMonitor  # noqa: E402

# The SPS and PPS x264 writes for 1280x720 High (level 3.1), from a real encode.
SPS_PPS = bytes.fromhex("000000016764001facb200a00b760220000003002000000791e306490000000168ebc3cb22c0")


def keyframe(size: int) -> bytes:
    body = os.urandom(size).replace(b"\x00\x00", b"\x01\x01")
    return SPS_PPS + b"\x00\x00\x01\x65" + body


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=600.0, help="media seconds fed")
    ap.add_argument("--fps", type=float, default=30.0)
    ap.add_argument("--keyframe-kb", type=int, default=60, help="keyframe size (SPS scan)")
    ap.add_argument("--json", help="write the figures here too")
    args = ap.parse_args()
    mon = StreamMonitor()
    key = keyframe(args.keyframe_kb * 1024)
    delta = b"\x00\x00\x00\x01\x41" + os.urandom(6000)
    schedule: list[tuple[float, str]] = [(i / args.fps, "video") for i in range(int(args.seconds * args.fps))]
    schedule += [(i / 50, "audio") for i in range(int(args.seconds * 50))]
    schedule.sort()
    cost = {"video": 0.0, "keyframe": 0.0, "audio": 0.0}
    count = {"video": 0, "keyframe": 0, "audio": 0}
    gop = int(args.fps)
    vi = 0
    clock = time.perf_counter
    for t, kind in schedule:
        now = 1000.0 + t
        ts = round(t * 90000)
        if kind == "video":
            is_key = vi % gop == 0
            vi += 1
            data = key if is_key else delta
            name = "keyframe" if is_key else "video"
            c0 = clock()
            mon.on_frame("video", now, t, len(data), is_key, ts, ts, data if is_key else None, "h264")
            cost[name] += clock() - c0
            count[name] += 1
        else:
            c0 = clock()
            mon.on_frame("audio", now, t, 300, True, ts, ts)
            cost["audio"] += clock() - c0
            count["audio"] += 1
    totals = dict.fromkeys(("packets", "pktRecv", "pktRcvLoss", "pktRcvDrop", *TR101290_P1, *TR101290_P2), 0)
    samples = int(args.seconds / 0.2)
    c0 = clock()
    for i in range(samples):
        totals = dict(totals, packets=totals["packets"] + 700, pktRecv=totals["pktRecv"] + 100)
        now = 1000.0 + i * 0.2
        mon.on_counters(now, {"srt": totals})
        mon.handle_timer(now)
    sample_cost = clock() - c0
    figures = {f"{k}_us": round(cost[k] / max(count[k], 1) * 1e6, 2) for k in cost}
    figures["sample_and_timer_us"] = round(sample_cost / samples * 1e6, 2)
    per_second = (sum(cost.values()) + sample_cost) / args.seconds
    figures["core_share_percent"] = round(per_second * 100, 4)
    figures["markers_on_a_healthy_stream"] = len(mon.flush(1000.0 + args.seconds))
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
