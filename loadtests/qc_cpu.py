"""QC CPU per stream: a live tap's decoding + detectors on generated clips.

Issue 12 budgets: ≤ 10 % of one core per 720p30 stream at default
thresholds, ≤ 4 % for a 360p30 low layer.

Each clip is what the SRT/WHIP path hands the tap: H.264 constrained
baseline (no B-frames, IDR every 2 s) with Opus or AAC (ADTS) stereo, in
MPEG-TS; the video is FFmpeg's moving ``testsrc2`` pattern, the audio
programme-like stereo (partly correlated pink noise at about −23 LUFS,
modulated at a syllable rate), so no detector fires and none is idle. The
clip is demuxed once into (kind, codec, t, keyframe, bytes) packets — the
tap's input, as :class:`server.qc_service.QcService` forwards it — and fed
through a :class:`live_qc.tap.StreamTap` as fast as it will go.

CPU is this thread's CPU time (``time.thread_time``, as the worker accounts
it: the tap's decoders run single-threaded), so other load on the machine
changes the figure far less than wall time would. The result is CPU
seconds per second of media = fraction of one core at real time, split into
video decode, video detectors, audio decode and audio detectors (decode =
the tap's time outside the engine). ``--worker`` also feeds the same
packets through a real worker process (pickling, the bounded queue, the
result pipe) and reads that process's whole CPU time from ``/proc``.

Usage::

    .venv/bin/python loadtests/qc_cpu.py                      # 720p30 + 360p30, Opus + AAC, 3 rounds
    .venv/bin/python loadtests/qc_cpu.py --only 360p30/opus --rounds 5 --json
    .venv/bin/python loadtests/qc_cpu.py --clips-dir clips --profile 25   # keep clips, cProfile top 25
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import wave
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import av  # noqa: E402
import numpy as np  # noqa: E402

from live_qc.tap import StreamTap, TapWorker  # noqa: E402

RATE = 48000
#: name → (width, height, video bitrate): a 720p30 programme feed and its 360p30 low layer.
VIDEO = {"720p30": (1280, 720, "3M"), "360p30": (640, 360, "800k")}
AUDIO = {"opus": ["-c:a", "libopus", "-b:a", "128k"], "aac": ["-c:a", "aac", "-b:a", "160k"]}
#: Issue 12 "Benchmarks": % of one core per stream.
BUDGET = {"720p30": 10.0, "360p30": 4.0}


def programme(seconds: float, seed: int = 7) -> np.ndarray:
    """Programme-like stereo at about −23 LUFS: pink-ish noise above 40 Hz,
    L/R partly correlated, gently modulated (3.7 Hz)."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * RATE))
    spec = np.fft.rfft(rng.standard_normal((3, n)), axis=1)
    f = np.fft.rfftfreq(n, 1 / RATE)
    shape = 1 / np.sqrt(np.maximum(f, 40.0))
    shape[f > 15000] = 0
    pink = np.fft.irfft(spec * shape, n=n, axis=1)
    pink /= pink.std(axis=1, keepdims=True)
    common, l_own, r_own = pink
    env = 1.0 + 0.15 * np.sin(2 * np.pi * 3.7 * np.arange(n) / RATE)
    x = np.stack([(0.7 * common + 0.5 * l_own) * env, (0.7 * common + 0.5 * r_own) * env])
    return x * (10 ** (-26.2 / 20) / np.sqrt(np.mean(x ** 2)))


def make_clip(out: Path, video: str, audio: str, seconds: float) -> Path:
    target = out / f"qc_{video}_{audio}_{seconds:g}s.ts"
    if target.exists():
        return target
    w, h, rate = VIDEO[video]
    wav = out / f"programme_{seconds:g}s.wav"
    if not wav.exists():
        pcm = (np.clip(programme(seconds), -1, 1) * 32767).round().astype("<i2").T.copy()
        with wave.open(str(wav), "wb") as fh:
            fh.setnchannels(2)
            fh.setsampwidth(2)
            fh.setframerate(RATE)
            fh.writeframes(pcm.tobytes())
    cmd = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
           "-f", "lavfi", "-i", f"testsrc2=s={w}x{h}:r=30:d={seconds}", "-i", str(wav),
           "-map", "0:v", "-map", "1:a", "-t", f"{seconds}",
           "-c:v", "libx264", "-profile:v", "baseline", "-preset", "veryfast", "-tune", "zerolatency",
           "-bf", "0", "-g", "60", "-b:v", rate, "-maxrate", rate, "-bufsize", rate, "-pix_fmt", "yuv420p",
           *AUDIO[audio], "-ac", "2", "-ar", str(RATE), "-f", "mpegts", str(target)]
    subprocess.run(cmd, check=True, timeout=600)
    return target


def packets(path: Path) -> tuple[list[tuple], float]:
    """The tap's input: (kind, codec, t, keyframe, data) in file order, and the media duration."""
    out: list[tuple] = []
    first, last = None, 0.0
    with av.open(str(path)) as c:
        for p in c.demux():
            if p.size == 0 or p.pts is None:
                continue
            t = float(p.pts * p.time_base)
            first = t if first is None else min(first, t)
            last = max(last, t)
            out.append((p.stream.type, p.stream.codec_context.name, t, bool(p.is_keyframe), bytes(p)))
    return out, last - (first or 0.0)


@dataclass(slots=True)
class Round:
    total: float  # % of one core
    video_decode: float
    video_detect: float
    audio_decode: float
    audio_detect: float
    markers: int


@dataclass(slots=True)
class Result:
    clip: str
    media_s: float
    rounds: list[Round] = field(default_factory=list)
    worker: list[float] = field(default_factory=list)  # % of a core, the worker process's own CPU

    def median(self, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in self.rounds)

    def span(self, attr: str) -> tuple[float, float]:
        vals = [getattr(r, attr) for r in self.rounds]
        return min(vals), max(vals)


def one_round(pkts: list[tuple], media_s: float, profile: cProfile.Profile | None = None) -> Round:
    tap = StreamTap("bench")
    engine = tap.engine
    spent = {"video": 0.0, "audio": 0.0}

    def timed(kind: str, fn):
        def call(*args):
            began = time.thread_time()
            try:
                return fn(*args)
            finally:
                spent[kind] += time.thread_time() - began
        return call

    # Instance attributes shadow the methods: the engine's own time, per kind.
    engine.video = timed("video", engine.video)
    engine.audio = timed("audio", engine.audio)
    tap_s = {"video": 0.0, "audio": 0.0}
    events = 0
    if profile is not None:
        profile.enable()
    for kind, codec, t, key, data in pkts:
        began = time.thread_time()
        if kind == "video":
            events += len(tap.video(codec, t, key, data))
        else:
            events += len(tap.audio(codec, t, data))
        tap_s[kind] += time.thread_time() - began
    events += len(tap.flush())
    if profile is not None:
        profile.disable()

    def pct(s: float) -> float:
        return 100.0 * s / media_s
    return Round(pct(tap_s["video"] + tap_s["audio"]), pct(tap_s["video"] - spent["video"]), pct(spent["video"]),
                 pct(tap_s["audio"] - spent["audio"]), pct(spent["audio"]), events)


def _proc_cpu(pid: int) -> float:
    fields_ = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields_[11]) + int(fields_[12])) / os.sysconf("SC_CLK_TCK")


def worker_round(pkts: list[tuple], media_s: float) -> float:
    """The same packets through a real worker process; its CPU (utime + stime,
    idle polling included) per second of media, in % of one core."""
    w = TapWorker(capacity=256)
    w.start()
    try:
        assert w.channel is not None and w._queue is not None
        w.channel.control(("attach", "bench", {}))
        pid = w.pid
        assert pid is not None
        # Not the interpreter's start and imports: from the attach's answer on.
        deadline = time.monotonic() + 60
        running = False
        while not running and time.monotonic() < deadline:
            if w.results.poll(0.2):
                running = any(m[0] == "state" and m[2] == "running" for m in w.receive())
        if not running:
            raise RuntimeError("the worker did not attach the stream within 60 s")
        before = _proc_cpu(pid)
        for kind, codec, t, key, data in pkts:
            # Blocking put (the server's put never blocks; here nothing may be dropped).
            if kind == "video":
                w._queue.put(("video", "bench", codec, t, key, data), timeout=30)
            else:
                w._queue.put(("audio", "bench", codec, t, data), timeout=30)
        w._queue.put(("detach", "bench"), timeout=30)
        deadline = time.monotonic() + 60
        done = False
        while not done and time.monotonic() < deadline:
            if w.results.poll(0.2):
                done = any(m[0] == "state" and m[2] == "stopped" for m in w.receive())
        after = _proc_cpu(pid)
        return 100.0 * (after - before) / media_s
    finally:
        w.request_stop()
        w.close()


def run(args: argparse.Namespace, clips_dir: Path) -> list[Result]:
    results: list[Result] = []
    for video in args.video:
        for audio in args.audio:
            name = f"{video}/{audio}"
            if args.only and name not in args.only:
                continue
            clip = make_clip(clips_dir, video, audio, args.seconds)
            pkts, media_s = packets(clip)
            res = Result(name, media_s)
            one_round(pkts[: len(pkts) // 10], media_s)  # warm-up: imports, FFT plans, allocator
            prof = cProfile.Profile() if args.profile else None
            for _ in range(args.rounds):
                res.rounds.append(one_round(pkts, media_s, prof if _ == 0 else None))
                if args.worker:
                    res.worker.append(worker_round(pkts, media_s))
            if prof is not None:
                buf = io.StringIO()
                pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(args.profile)
                print(f"--- cProfile, {name}, first round (tottime) ---\n{buf.getvalue()}", file=sys.stderr)
            results.append(res)
    return results


def table(results: list[Result]) -> str:
    head = (f"{'clip':<13} {'% core median (range)':>24} {'budget':>7}  {'v.dec':>6} {'v.det':>6} "
            f"{'a.dec':>6} {'a.det':>6}  {'worker proc':>12}  markers")
    lines = [head, "-" * len(head)]
    for r in results:
        lo, hi = r.span("total")
        budget = BUDGET[r.clip.split("/")[0]]
        ok = "ok" if r.median("total") <= budget else "OVER"
        worker = f"{statistics.median(r.worker):5.2f} %" if r.worker else "-"
        lines.append(f"{r.clip:<13} {r.median('total'):6.2f} % ({lo:5.2f}–{hi:5.2f})  "
                     f"{budget:4.0f} % {ok:<4} {r.median('video_decode'):6.2f} {r.median('video_detect'):6.2f} "
                     f"{r.median('audio_decode'):6.2f} {r.median('audio_detect'):6.2f}  {worker:>12}  "
                     f"{r.rounds[0].markers}")
    lines.append("% of one core = thread CPU s per media s × 100; columns: video/audio decode and detectors "
                 "(medians over rounds)")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--video", nargs="+", default=list(VIDEO), choices=list(VIDEO))
    ap.add_argument("--audio", nargs="+", default=list(AUDIO), choices=list(AUDIO))
    ap.add_argument("--only", nargs="+", help="clip names, e.g. 360p30/opus")
    ap.add_argument("--seconds", type=float, default=20.0, help="clip length (default 20 s)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--worker", action="store_true", help="also run each round through a real worker process")
    ap.add_argument("--clips-dir", type=Path, help="keep (and reuse) the generated clips here")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="cProfile the first round, top N")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args()
    if shutil.which("ffmpeg") is None:
        print("ffmpeg is needed to generate the clips", file=sys.stderr)
        return 2
    tmp = None
    if args.clips_dir is not None:
        args.clips_dir.mkdir(parents=True, exist_ok=True)
        clips_dir = args.clips_dir
    else:
        tmp = tempfile.TemporaryDirectory(prefix="qc_cpu_")
        clips_dir = Path(tmp.name)
    try:
        results = run(args, clips_dir)
    finally:
        if tmp is not None:
            tmp.cleanup()
    if args.json:
        print(json.dumps([{**asdict(r), "budget_pct": BUDGET[r.clip.split("/")[0]],
                           "median_pct": r.median("total")} for r in results], indent=2))
    else:
        print(table(results))
    over = [r for r in results if r.median("total") > BUDGET[r.clip.split("/")[0]]]
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
