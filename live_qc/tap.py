"""The live QC tap: a worker process decoding compressed media for QcEngines.

DESIGN.md "Processes": QC runs in its own process so that decoding and the
detectors never hold the server's GIL or event loop. The server side is
:class:`TapWorker` (start, bounded input channel, result pipe) and
:class:`TapChannel` (the only call the forwarding path makes: ``put_*``, which
never waits: when the channel is full the frame is dropped and counted).
The process side is :func:`worker_main` around one :class:`StreamTap` per
stream (decoders + engine), which is sans-I/O apart from PyAV and is what the
unit tests drive directly.

Messages into the worker (tuples, cheap to pickle)::

    ("attach", stream, thresholds_dict)   ("detach", stream)   ("stop",)
    ("thresholds", stream, thresholds_dict)  # new thresholds for an attached stream
    ("video", stream, codec, t, keyframe, data)   ("audio", stream, codec, t, data)
    ("reset", stream, reason)             # a Discontinuity on the reader

``t`` is media time in seconds (pts / clock rate). Results come back on a
one-way pipe as lists of::

    ("marker", stream, MarkerEvent)   ("meters", stream, Meters)
    ("cpu", stream, seconds)          ("state", stream, state, detail)

``cpu`` is the thread CPU time spent on that stream since the previous
report (decoders run single-threaded, so thread time is all of it).
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import time
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any, Protocol

import av

from media.procs import join_or_kill

from .engine import Meters, QcEngine
from .filescan import _luma
from .loudness import RATE
from .markers import FaultTracker, MarkerEvent
from .thresholds import Thresholds

__all__ = ["QcSink", "QcWorkerEngine", "StreamTap", "TapChannel", "TapWorker", "WorkerEngine", "serve", "worker_main", "TAP_STATES"]

TAP_STATES = ("running", "stopped", "decode_error", "restarting")
#: Meter read-outs per stream at most this often (issue 12: meters ≤ 10 Hz).
METER_INTERVAL_S = 0.1
#: CPU seconds per stream are reported this often.
CPU_INTERVAL_S = 1.0
#: The worker's scheduling niceness: where it and the server compete for a
#: core, forwarding wins (a tap that then falls behind drops and counts
#: frames at its channel; a late marker is better than a late picture).
WORKER_NICE = 10


def lower_priority() -> None:
    """Make this (tap worker) process yield to forwarding.

    Linux ``SCHED_IDLE`` runs it only on a core nothing else wants: measured
    with 100 viewers and QC on 4 720p streams on 2 cores, niceness +10 alone
    still added ~5 ms to the forwarding p99 (CFS gives a nice-10 task about a
    tenth of a contended core, in slices that delay the sender). Niceness is
    set as well, for where SCHED_IDLE is not available; lowering one's own
    priority needs no privilege."""
    try:
        os.nice(WORKER_NICE)
    except OSError:
        pass  # not permitted here: the worker still runs, at the server's priority
    if hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except OSError:
            pass
# Media time is carried as seconds; PyAV packets get it back in this base.
_TB = Fraction(1, 90000)
# Audio decoders by the hub's codec names (the SRT path transcodes AAC to Opus;
# an AAC feed that reaches a tap directly is ADTS, which FFmpeg's decoder parses).
_AUDIO_DECODERS = {"opus": "opus", "aac": "aac", "mp2": "mp2", "mp3": "mp3"}
_VIDEO_DECODERS = {"h264": "h264", "hevc": "hevc", "vp8": "vp8", "vp9": "vp9", "av1": "av1"}


class QcSink(Protocol):
    """Where the server hands tap results (the control room's event service)."""

    def marker(self, stream: str, event: MarkerEvent, *, wall_start: float, wall_end: float | None) -> None: ...

    def meters(self, stream: str, meters: Meters) -> None: ...

    def tap_state(self, stream: str, state: str, detail: str = "") -> None: ...


# -- the server side ---------------------------------------------------------------

class TapChannel:
    """The bounded channel into one worker. ``put_*`` never blocks: a full
    channel drops the frame and counts it per (stream, kind). After a dropped
    video frame that stream's video waits for the next keyframe, so the
    worker's decoder never sees a GOP with a hole in it (the hub's Reader
    does the same)."""

    __slots__ = ("_q", "drops", "_need_keyframe")

    def __init__(self, q: Any) -> None:
        self._q = q
        self.drops: dict[tuple[str, str], int] = {}
        self._need_keyframe: set[str] = set()

    def _put(self, msg: tuple) -> bool:
        try:
            self._q.put_nowait(msg)
            return True
        except (queue.Full, ValueError, OSError, AssertionError):
            # Full, or the worker's queue already closed (worker restarting).
            return False

    def _drop(self, stream: str, kind: str) -> None:
        key = (stream, kind)
        self.drops[key] = self.drops.get(key, 0) + 1

    def put_video(self, stream: str, codec: str, t: float, keyframe: bool, data: bytes) -> bool:
        if stream in self._need_keyframe and not keyframe:
            self._drop(stream, "video")
            return False
        if self._put(("video", stream, codec, t, keyframe, data)):
            self._need_keyframe.discard(stream)
            return True
        self._drop(stream, "video")
        self._need_keyframe.add(stream)
        return False

    def put_audio(self, stream: str, codec: str, t: float, data: bytes) -> bool:
        if self._put(("audio", stream, codec, t, data)):
            return True
        self._drop(stream, "audio")
        return False

    def control(self, msg: tuple) -> bool:
        """attach/detach/reset; a full channel loses them like a frame (the
        service re-sends attach after a restart)."""
        ok = self._put(msg)
        if ok and msg[0] in ("attach", "reset"):
            # The worker's decoder restarts at a keyframe anyway.
            self._need_keyframe.discard(msg[1])
        return ok


class TapWorker:
    """One QC worker process (spawn context: no copy of the server's loop,
    sockets or threads) with its input channel and result pipe."""

    def __init__(self, capacity: int, index: int = 0, target: Any = None, label: str = "qc") -> None:
        self.capacity = capacity
        self.index = index
        #: The process entry point, ``(inq, results, parent_pid)``: the QC
        #: worker by default; the caption worker reuses the same plumbing.
        self.target = target if target is not None else worker_main
        self.label = label
        self.proc: multiprocessing.process.BaseProcess | None = None
        self.channel: TapChannel | None = None
        self.results: Any = None
        self._queue: Any = None
        self.started_at = 0.0
        self.eof = False

    def start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._queue = ctx.Queue(self.capacity)
        reader, writer = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=self.target, args=(self._queue, writer, os.getpid()),
                                name=f"returnfeed-{self.label}-{self.index}", daemon=True)
        self.proc.start()
        writer.close()
        self.results = reader
        self.channel = TapChannel(self._queue)
        self.started_at = time.monotonic()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def sentinel(self) -> int:
        assert self.proc is not None
        return self.proc.sentinel

    def alive(self) -> bool:
        return self.proc is not None and self.proc.is_alive()

    def receive(self) -> list[tuple]:
        """Every result batch already in the pipe, without waiting for more.
        Once the worker is gone (end of the pipe) ``eof`` is set and what came
        before the end is still returned."""
        out: list[tuple] = []
        try:
            while self.results.poll():
                out.extend(self.results.recv())
        except (EOFError, OSError):
            self.eof = True
        return out

    def request_stop(self) -> None:
        if self.channel is not None:
            try:
                self._queue.put(("stop",), timeout=0.5)
            except (queue.Full, ValueError, OSError, AssertionError):
                pass

    def close(self, timeout: float = 5.0) -> None:
        """Blocking: join (after request_stop), terminate, kill; run it off the loop."""
        if self.proc is not None:
            join_or_kill(self.proc, timeout)
        self.discard()

    def discard(self) -> None:
        """Release the pipe and queue of a worker that is gone."""
        if self.results is not None:
            self.results.close()
            self.results = None
        if self._queue is not None:
            self._queue.cancel_join_thread()  # never wait to flush frames to a dead worker
            self._queue.close()
            self._queue = None
        self.channel = None


# -- the worker side -----------------------------------------------------------------

@dataclass(slots=True)
class _Video:
    codec: str
    ctx: Any
    need_keyframe: bool = True


@dataclass(slots=True)
class _Audio:
    codec: str
    ctx: Any
    resampler: Any = None


@dataclass(slots=True)
class StreamTap:
    """One stream's decoders and engine. Fed compressed frames with media
    time; returns marker events. A frame that cannot be decoded opens a
    ``transport``/``decode_error`` marker, the decoder is restarted and waits
    for the next keyframe; the first frame decoded again closes the marker.
    A codec change restarts that kind's decoder."""

    name: str
    thresholds: Thresholds = field(default_factory=Thresholds)
    engine: QcEngine = field(init=False)
    cpu_s: float = 0.0
    _video: _Video | None = None
    _audio: _Audio | None = None
    _video_error: FaultTracker = field(init=False)
    _audio_error: FaultTracker = field(init=False)
    decode_errors: int = 0

    def __post_init__(self) -> None:
        self.engine = QcEngine(self.thresholds)
        self._video_error = FaultTracker("transport", "decode_error", 0.0, severity="error")
        self._audio_error = FaultTracker("transport", "decode_error", 0.0, severity="error")

    @property
    def decode_failing(self) -> bool:
        return self._video_error.is_open or self._audio_error.is_open

    # -- video
    def video(self, codec: str, t: float, keyframe: bool, data: bytes) -> list[MarkerEvent]:
        v = self._video
        if v is None or v.codec != codec:
            v = self._video = self._new_video(codec)
            if v is None:
                return self._failed(self._video_error, t, "video", f"unsupported video codec {codec!r}")
        if v.need_keyframe and not keyframe:
            return []
        v.need_keyframe = False
        packet = av.Packet(data)
        packet.pts = packet.dts = round(t / _TB)
        packet.time_base = _TB
        try:
            frames = v.ctx.decode(packet)
        except av.error.FFmpegError as exc:
            self._video = self._new_video(codec)
            return self._failed(self._video_error, t, "video", exc.strerror or str(exc))
        events: list[MarkerEvent] = []
        for frame in frames:
            ft = float(frame.pts * _TB) if frame.pts is not None else t
            events += self.engine.video(ft, _luma(frame))
        if frames and self._video_error.is_open:
            events += self._video_error.observe(t, t, False)
        return events

    def _new_video(self, codec: str) -> _Video | None:
        name = _VIDEO_DECODERS.get(codec)
        if name is None:
            return None
        ctx = av.CodecContext.create(name, "r")
        # One thread: frame threading would delay every picture by the thread
        # count, and thread_time() would miss the helpers' CPU.
        ctx.thread_count = 1
        return _Video(codec, ctx)

    # -- audio
    def audio(self, codec: str, t: float, data: bytes) -> list[MarkerEvent]:
        a = self._audio
        if a is None or a.codec != codec:
            a = self._audio = self._new_audio(codec, data)
            if a is None:
                return self._failed(self._audio_error, t, "audio", f"unsupported audio codec {codec!r}")
        packet = av.Packet(data)
        packet.pts = packet.dts = round(t / _TB)
        packet.time_base = _TB
        try:
            frames = a.ctx.decode(packet)
        except av.error.FFmpegError as exc:
            self._audio = self._new_audio(codec, data)
            return self._failed(self._audio_error, t, "audio", exc.strerror or str(exc))
        events: list[MarkerEvent] = []
        for frame in frames:
            ft = float(frame.pts * _TB) if frame.pts is not None else t
            if frame.format.name != "fltp" or frame.sample_rate != RATE:
                if a.resampler is None:
                    a.resampler = av.AudioResampler(format="fltp", layout=frame.layout.name, rate=RATE)
                outs = a.resampler.resample(frame)
            else:
                outs = [frame]
            for out in outs:
                x = out.to_ndarray()
                if x.shape[1]:
                    events += self.engine.audio(ft, x)
                    ft += x.shape[1] / RATE
        if frames and self._audio_error.is_open:
            events += self._audio_error.observe(t, t, False)
        return events

    def _new_audio(self, codec: str, first: bytes) -> _Audio | None:
        name = _AUDIO_DECODERS.get(codec)
        if name is None:
            return None
        ctx = av.CodecContext.create(name, "r")
        if codec == "opus":
            # RFC 6716 §3.1: the TOC byte's 's' bit says stereo; Opus in TS
            # carries no OpusHead, so the layout comes from the first packet.
            stereo = bool(first) and bool(first[0] & 0x04)
            ctx.layout = "stereo" if stereo else "mono"
            ctx.sample_rate = RATE
        ctx.thread_count = 1
        return _Audio(codec, ctx)

    # -- both
    def _failed(self, tracker: FaultTracker, t: float, kind: str, error: str) -> list[MarkerEvent]:
        self.decode_errors += 1
        return tracker.observe(t, t, True, metadata={"kind": kind, "error": error[:200]})

    def reset(self, reason: str) -> list[MarkerEvent]:
        """A Discontinuity: decoders restart at the next keyframe; a new
        publisher session (reconnect/takeover) also starts a new timeline, so
        the engine's markers are closed and analysis starts afresh."""
        if self._video is not None:
            self._video.need_keyframe = True
            self._video = self._new_video(self._video.codec)
        self._audio = None
        if reason in ("reconnect", "takeover"):
            events = self.flush()
            self.engine = QcEngine(self.thresholds)
            return events
        return []

    def flush(self) -> list[MarkerEvent]:
        end = self.engine.media_end
        return (self.engine.flush() + self._video_error.flush(end) + self._audio_error.flush(end))


def _last_cpu(name: str, tap: StreamTap, reported: dict[str, float]) -> list[tuple]:
    """A leaving stream's CPU not reported yet (the periodic report would miss it)."""
    delta = tap.cpu_s - reported.pop(name, 0.0)
    return [("cpu", name, delta)] if delta > 0 else []


class WorkerEngine(Protocol):
    """What a tap worker process runs (:func:`serve`): the QC taps
    (:class:`QcWorkerEngine`) or the caption engine."""

    def handle(self, msg: tuple) -> list[tuple]: ...

    def step(self, now: float) -> list[tuple]: ...

    def stop(self) -> list[tuple]: ...


def serve(engine: WorkerEngine, inq: Any, results: Any, parent_pid: int | None, *, max_batch: int = 64) -> None:
    """A tap worker process's loop: drain what the channel holds (up to
    ``max_batch`` messages, waiting at most 0.2 s for the first), hand each
    to the engine, let it step, send the results in one batch. Exits on
    ``stop`` (after the engine's last results), when the channel or the
    result pipe breaks, or when its parent is gone (a killed server leaves no
    orphan behind)."""
    running = True
    while running:
        out: list[tuple] = []
        batch: list[tuple] = []
        try:
            batch.append(inq.get(timeout=0.2))
            while len(batch) < max_batch:
                batch.append(inq.get_nowait())
        except queue.Empty:
            pass
        except (EOFError, OSError):
            return
        for msg in batch:
            if msg[0] == "stop":
                out += engine.stop()
                running = False
                break
            out += engine.handle(msg)
        if running:
            out += engine.step(time.monotonic())
        if parent_pid is not None and os.getppid() != parent_pid:
            return
        if out:
            try:
                results.send(out)
            except (BrokenPipeError, EOFError, OSError):
                return
    results.close()


class QcWorkerEngine:
    """The QC worker's streams: one :class:`StreamTap` each, meters at most
    every METER_INTERVAL_S, CPU reports every CPU_INTERVAL_S."""

    def __init__(self) -> None:
        self.taps: dict[str, StreamTap] = {}
        self._meter_due: dict[str, float] = {}
        self._cpu_due = time.monotonic() + CPU_INTERVAL_S
        self._reported: dict[str, float] = {}

    def stop(self) -> list[tuple]:
        out: list[tuple] = []
        for name, tap in self.taps.items():
            out += [("marker", name, e) for e in tap.flush()]
            out += _last_cpu(name, tap, self._reported)
            out.append(("state", name, "stopped", "worker stopping"))
        self.taps.clear()
        return out

    def handle(self, msg: tuple) -> list[tuple]:
        op, name = msg[0], msg[1]
        taps = self.taps
        out: list[tuple] = []
        if op == "attach":
            old = taps.pop(name, None)
            if old is not None:
                out += [("marker", name, e) for e in old.flush()]
            try:
                th = Thresholds.from_mapping(msg[2] or {})
            except (TypeError, ValueError) as exc:
                out.append(("state", name, "stopped", f"bad thresholds: {exc}"))
                return out
            taps[name] = StreamTap(name, th)
            self._reported[name] = 0.0
            out.append(("state", name, "running", ""))
            return out
        tap = taps.get(name)
        if tap is None:
            return out
        if op == "thresholds":
            # The open markers close at the change and detection starts over
            # with the new values; the decoders and the loudness meter carry
            # on (no keyframe wait, integrated loudness kept).
            try:
                th = Thresholds.from_mapping(msg[2] or {})
            except (TypeError, ValueError) as exc:
                out.append(("state", name, "running", f"bad thresholds kept the old ones: {exc}"[:200]))
                return out
            out += [("marker", name, e) for e in tap.engine.retune(th)]
            tap.thresholds = th
            return out
        if op == "detach":
            del taps[name]
            out += [("marker", name, e) for e in tap.flush()]
            out += _last_cpu(name, tap, self._reported)
            out.append(("state", name, "stopped", ""))
            return out
        began = time.thread_time()
        failing = tap.decode_failing
        try:
            if op == "video":
                events = tap.video(msg[2], msg[3], msg[4], msg[5])
            elif op == "audio":
                events = tap.audio(msg[2], msg[3], msg[4])
            elif op == "reset":
                events = tap.reset(msg[2])
            else:
                events = []
        except Exception as exc:  # a detector bug ends this stream's tap, not the others'
            taps.pop(name, None)
            out.append(("state", name, "stopped", f"{type(exc).__name__}: {exc}"[:200]))
            return out
        tap.cpu_s += time.thread_time() - began
        out += [("marker", name, e) for e in events]
        if tap.decode_failing != failing:
            out.append(("state", name, "decode_error" if tap.decode_failing else "running",
                        "cannot decode; waiting for the next keyframe" if tap.decode_failing else ""))
        return out

    def step(self, now: float) -> list[tuple]:
        out: list[tuple] = []
        for name, tap in self.taps.items():
            if now >= self._meter_due.get(name, 0.0) and tap.engine.meters.peaks_dbfs:
                self._meter_due[name] = now + METER_INTERVAL_S
                out.append(("meters", name, replace(tap.engine.meters,
                                                    peaks_dbfs=list(tap.engine.meters.peaks_dbfs))))
        if now >= self._cpu_due:
            self._cpu_due = now + CPU_INTERVAL_S
            for name, tap in self.taps.items():
                delta = tap.cpu_s - self._reported.get(name, 0.0)
                if delta > 0:
                    out.append(("cpu", name, delta))
                self._reported[name] = tap.cpu_s
            for name in list(self._reported):
                if name not in self.taps:
                    del self._reported[name]
        return out


def worker_main(inq: Any, results: Any, parent_pid: int | None = None) -> None:
    """The QC worker process: :func:`serve` over a :class:`QcWorkerEngine`."""
    lower_priority()
    serve(QcWorkerEngine(), inq, results, parent_pid)

