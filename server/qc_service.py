"""The live QC tap on the server side: hub readers → worker process → sink.

:class:`QcService` subscribes to each live stream through a bounded
:class:`~media.stream.Reader` taking the lowest video layer and the audio
(like the WHEP fan-out and SRT ``read:`` do), and forwards the compressed
frames into a :class:`~live_qc.tap.TapWorker`'s channel, which drops and
counts when full: nothing here ever waits on the worker. Results come back
on a pipe the loop watches (``loop.add_reader``; only what is already there
is read) and go to the sink, media time converted to wall clock with the
stream's latest pair (wall = now − (media_now − t)).

A worker that dies (its process sentinel becomes readable) is restarted
after 0.5 s, doubling to 30 s while it keeps dying; its streams are attached
again. Streams attach when the hub shows them live and detach when their
reader ends (the stream closed): the hub has no events, so a short poll.

Per-stream enable and thresholds come from ``qc_for(name)``
(server/stream_settings.py: the stream's stored settings over the ``[qc]``
defaults). The poll attaches a stream when it is enabled and detaches it
when it no longer is; a changed threshold mapping goes to the worker as a
``thresholds`` message. :meth:`settings_changed` runs the same check at once
when the directory reports a change. Worker processes start with the first
stream that is tapped, not with the server: QC off everywhere costs nothing.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from prometheus_client.core import CounterMetricFamily, Metric

from live_qc.engine import Meters
from live_qc.markers import MarkerEvent
from live_qc.stream import StreamMonitor
from live_qc.tap import QcSink, TapWorker
from live_qc.thresholds import Thresholds
from media.stream import Discontinuity, Frame, Reader, StreamClosed, StreamHub, StreamState

from .config import QcSettings
from .log import event
from .stream_settings import QcStreamSettings, effective_qc

log = logging.getLogger("returnfeed.qc")

#: Restart delays of a dying worker (issue 12: restarted with backoff).
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
#: A worker that ran this long before dying starts the backoff over.
BACKOFF_RESET_AFTER_S = 60.0
#: How often the hub is looked at for streams to attach.
POLL_S = 0.5
#: How often the stream monitors sample their sources' counters (TR 101 290,
#: SRT): counters have no events, and a marker is due within a quarter second.
MONITOR_SAMPLE_S = 0.2


def next_backoff(delay: float | None) -> float:
    """0.5 s, then doubling, at most 30 s."""
    return BACKOFF_FIRST_S if delay is None else min(delay * 2, BACKOFF_MAX_S)


@dataclass(slots=True)
class _Tap:
    name: str
    worker: int
    reader: Reader
    layer: str | None
    task: asyncio.Task | None = None
    #: The threshold mapping last sent to the worker for this stream.
    thresholds: dict[str, float | int] | None = None


@dataclass(slots=True)
class _WorkerSlot:
    index: int
    worker: TapWorker | None = None
    delay: float | None = None
    restarting: asyncio.Task | None = None
    streams: set[str] = field(default_factory=set)


class LogSink:
    """No sink wired: results are only logged (by the service)."""

    def marker(self, stream: str, event: MarkerEvent, *, wall_start: float, wall_end: float | None) -> None:
        pass

    def meters(self, stream: str, meters: Meters) -> None:
        pass

    def tap_state(self, stream: str, state: str, detail: str = "") -> None:
        pass


class QcService:
    def __init__(self, settings: QcSettings, hub: StreamHub, sink: QcSink | None = None, *,
                 poll_s: float = POLL_S, qc_for: Callable[[str], QcStreamSettings] | None = None) -> None:
        self.settings = settings
        #: A stream's effective QC settings; without a settings store, the
        #: configuration's ``[qc]`` alone.
        self.qc_for: Callable[[str], QcStreamSettings] = qc_for or (lambda name: effective_qc(settings, name, None))
        self.hub = hub
        self.sink: QcSink = sink or LogSink()
        self.poll_s = poll_s
        self._slots = [_WorkerSlot(i) for i in range(settings.workers)]
        self._taps: dict[str, _Tap] = {}
        # Stream → (media time, unix time) of its latest forwarded frame; kept
        # past the detach, whose flushed markers still need it.
        self._clock: dict[str, tuple[float, float]] = {}
        self._poller: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        # Prometheus totals (only ever go up).
        self.cpu_seconds: dict[str, float] = {}
        self.reader_drops: dict[str, int] = {}
        self._closed_channel_drops: dict[tuple[str, str], int] = {}
        self.markers_total: dict[str, int] = {}
        self.worker_restarts = 0
        # Stream detectors (live_qc/stream.py), on the loop: O(1) per frame.
        self._monitors: dict[str, StreamMonitor] = {}
        self._monitor_task: asyncio.Task | None = None
        # Streams whose monitor raised: the forwarding to the worker goes on
        # without it (until the stream is tapped again).
        self._monitor_failed: set[str] = set()

    # -- lifecycle -----------------------------------------------------------------
    async def start(self) -> None:
        # The workers start with their first stream (_attach): a server where
        # no stream has QC enabled runs no QC process.
        self._loop = asyncio.get_running_loop()
        self._poller = self._loop.create_task(self._poll())
        self._monitor_task = self._loop.create_task(self._watch_monitors())

    async def stop(self) -> None:
        self._stopping = True
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
            self._poller = None
        if self._monitor_task is not None:
            self._monitor_task.cancel()
            await asyncio.gather(self._monitor_task, return_exceptions=True)
            self._monitor_task = None
        tasks = [t.task for t in self._taps.values() if t.task is not None]
        for name in list(self._taps):
            self._detach(name, notify_worker=False)
        await asyncio.gather(*tasks, return_exceptions=True)
        running = []
        for slot in self._slots:
            if slot.restarting is not None:
                slot.restarting.cancel()
            w = slot.worker
            if w is not None:
                self._unwatch(w)
                w.request_stop()
                running.append((slot, w))
        # The workers flush their open markers on "stop": wait for them (off
        # the loop), hand those markers on, then release everything.
        await asyncio.gather(*(asyncio.to_thread(w.proc.join, 5.0) for _, w in running), return_exceptions=True)
        for slot, w in running:
            self._read_results(slot, w)
            self._keep_drops(w)
            slot.worker = None
        await asyncio.gather(*(asyncio.to_thread(w.close) for _, w in running), return_exceptions=True)

    # -- workers -------------------------------------------------------------------
    def _start_worker(self, slot: _WorkerSlot) -> None:
        assert self._loop is not None
        w = TapWorker(self.settings.queue_frames, slot.index)
        w.start()
        slot.worker = w
        self._loop.add_reader(w.results.fileno(), self._on_results, slot, w)
        self._loop.add_reader(w.sentinel, self._on_exit, slot, w)
        event(log, logging.INFO, "qc.worker_started", worker=slot.index, pid=w.pid)
        for name in sorted(slot.streams):
            self._send_attach(w, name)

    def _unwatch(self, w: TapWorker) -> None:
        assert self._loop is not None
        if w.results is not None:
            self._loop.remove_reader(w.results.fileno())
        if w.proc is not None:
            self._loop.remove_reader(w.sentinel)

    def _on_exit(self, slot: _WorkerSlot, w: TapWorker) -> None:
        if slot.worker is not w:
            return
        self._unwatch(w)
        self._read_results(slot, w)  # what it sent before dying still counts
        w.proc.join(0)
        code = w.proc.exitcode
        lived = time.monotonic() - w.started_at
        self._keep_drops(w)
        w.discard()
        slot.worker = None
        if self._stopping:
            return
        if lived >= BACKOFF_RESET_AFTER_S:
            slot.delay = None
        slot.delay = next_backoff(slot.delay)
        event(log, logging.ERROR, "qc.worker_died", worker=slot.index, exitcode=code,
              restart_in_s=slot.delay, streams=len(slot.streams))
        for name in slot.streams:
            self._state(name, "restarting", f"worker exited ({code}); restarting in {slot.delay} s")
        slot.restarting = asyncio.get_running_loop().create_task(self._restart(slot, slot.delay))

    async def _restart(self, slot: _WorkerSlot, delay: float) -> None:
        await asyncio.sleep(delay)
        slot.restarting = None
        if self._stopping:
            return
        self.worker_restarts += 1
        try:
            self._start_worker(slot)
        except OSError as exc:
            event(log, logging.ERROR, "qc.worker_start_failed", worker=slot.index, error=str(exc))
            slot.delay = next_backoff(slot.delay)
            slot.restarting = asyncio.get_running_loop().create_task(self._restart(slot, slot.delay))

    def _keep_drops(self, w: TapWorker) -> None:
        if w.channel is not None:
            for key, n in w.channel.drops.items():
                self._closed_channel_drops[key] = self._closed_channel_drops.get(key, 0) + n
            w.channel.drops.clear()

    def _send_attach(self, w: TapWorker, name: str) -> None:
        assert w.channel is not None
        thresholds = self.qc_for(name).thresholds
        w.channel.control(("attach", name, thresholds))
        tap = self._taps.get(name)
        if tap is not None:
            tap.thresholds = thresholds

    # -- streams -------------------------------------------------------------------
    def enabled_for(self, name: str) -> bool:
        return self.qc_for(name).enabled

    def settings_changed(self, names: set[str]) -> None:
        """The settings store's listener: apply a change now rather than at
        the next poll (enable, disable, thresholds)."""
        if self._loop is not None and not self._stopping:
            self.sync()

    async def _poll(self) -> None:
        while True:
            self.sync()
            await asyncio.sleep(self.poll_s)

    def sync(self) -> None:
        """Attach live streams not yet tapped; re-attach one whose lowest
        layer changed (a simulcast layer appeared or left); detach one whose
        QC was switched off; send changed thresholds."""
        for stream in self.hub:
            settings = self.qc_for(stream.name)
            tap = self._taps.get(stream.name)
            if not settings.enabled:
                if tap is not None:
                    self._detach(stream.name)
                    event(log, logging.INFO, "qc.detached", stream=stream.name, reason="disabled")
                continue
            if stream.state != StreamState.LIVE or not stream.tracks:
                continue
            layers = list(stream.layers)
            lowest = layers[-1] if layers else None
            if tap is not None:
                if tap.layer == lowest:
                    if tap.thresholds is not None and tap.thresholds != settings.thresholds:
                        self._send_thresholds(tap, settings.thresholds)
                    continue
                self._detach(stream.name)
            self._attach(stream, lowest)

    def _send_thresholds(self, tap: _Tap, thresholds: dict[str, float | int]) -> None:
        w = self._slots[tap.worker].worker
        if w is None or w.channel is None:
            return  # the restart's attach carries the current thresholds
        if w.channel.control(("thresholds", tap.name, thresholds)):
            tap.thresholds = thresholds
            # Like the worker's detectors, the stream detectors close what is
            # open and start over with the new values (their baselines and
            # windows are sized from the thresholds).
            self._monitor_detach(tap.name)
            event(log, logging.INFO, "qc.thresholds", stream=tap.name)

    def _attach(self, stream: Any, layer: str | None) -> None:
        name = stream.name
        try:
            reader = stream.subscribe(self.settings.queue_frames, layers=[layer] if layer else [],
                                      kinds=("video", "audio") if layer else ("audio",))
        except StreamClosed:
            return
        slot = min(self._slots, key=lambda s: len(s.streams))
        slot.streams.add(name)
        tap = _Tap(name, slot.index, reader, layer)
        self._taps[name] = tap
        if slot.worker is not None:
            self._send_attach(slot.worker, name)
        elif slot.restarting is None:
            # The slot's first stream: start its worker (it attaches slot.streams).
            try:
                self._start_worker(slot)
            except OSError as exc:
                event(log, logging.ERROR, "qc.worker_start_failed", worker=slot.index, error=str(exc))
                slot.delay = next_backoff(slot.delay)
                slot.restarting = self._loop.create_task(self._restart(slot, slot.delay))
        assert self._loop is not None
        tap.task = self._loop.create_task(self._forward(tap))
        event(log, logging.INFO, "qc.attached", stream=name, layer=layer, worker=slot.index)

    def _detach(self, name: str, notify_worker: bool = True) -> None:
        tap = self._taps.pop(name, None)
        if tap is None:
            return
        self.reader_drops[name] = self.reader_drops.get(name, 0) + tap.reader.drops
        tap.reader.close()
        if tap.task is not None and tap.task is not asyncio.current_task():
            tap.task.cancel()
        self._monitor_detach(name)
        slot = self._slots[tap.worker]
        slot.streams.discard(name)
        if notify_worker and slot.worker is not None and slot.worker.channel is not None:
            slot.worker.channel.control(("detach", name))

    async def _forward(self, tap: _Tap) -> None:
        reader = tap.reader
        name = tap.name
        slots = self._slots
        clock = self._clock
        try:
            while True:
                items = [await reader.get()]
                items += reader.drain()
                w = slots[tap.worker].worker
                channel = w.channel if w is not None else None
                for item in items:
                    if isinstance(item, Discontinuity):
                        self._monitor_discontinuity(name, item)
                        if channel is not None:
                            channel.control(("reset", name, item.reason))
                        continue
                    assert isinstance(item, Frame)
                    self._monitor_frame(name, item)
                    if item.pts is None:
                        continue
                    t = item.pts / item.clock_rate
                    clock[name] = (t, time.time())
                    if channel is None:
                        key = (name, item.kind)
                        self._closed_channel_drops[key] = self._closed_channel_drops.get(key, 0) + 1
                    elif item.kind == "video":
                        channel.put_video(name, item.codec, t, item.keyframe, item.data)
                    else:
                        channel.put_audio(name, item.codec, t, item.data)
        except StreamClosed:
            pass
        finally:
            if self._taps.get(name) is tap:
                self._detach(name)

    # -- stream detectors --------------------------------------------------------------
    # live_qc/stream.py's StreamMonitor runs here, not in the worker: it needs
    # only each frame's metadata (O(1) arithmetic, an SPS scan per keyframe),
    # the wall clock (a stalled track sends the worker nothing to notice) and
    # the ingest's counters, which live in this process.

    def _monitor_thresholds(self, name: str) -> Thresholds:
        return Thresholds.from_mapping(self.qc_for(name).thresholds)

    def _monitor_frame(self, name: str, frame: Frame) -> None:
        monitor = self._monitors.get(name)
        if monitor is None:
            if name in self._monitor_failed:
                return
            monitor = self._monitors[name] = StreamMonitor(self._monitor_thresholds(name))
        ts = frame.pts if frame.pts is not None else frame.dts
        if ts is None:
            return
        try:
            events = monitor.on_frame(frame.kind, frame.arrival, ts / frame.clock_rate, len(frame.data),
                                      frame.keyframe, frame.pts, frame.dts,
                                      frame.data if frame.keyframe else None, frame.codec)
        except Exception:
            self._monitor_broke(name)
            return
        if events:
            self._monitor_events(name, events)

    def _monitor_broke(self, name: str) -> None:
        event(log, logging.ERROR, "qc.monitor_failed", exc_info=True, stream=name)
        self._monitors.pop(name, None)
        self._monitor_failed.add(name)

    def _monitor_discontinuity(self, name: str, item: Discontinuity) -> None:
        monitor = self._monitors.get(name)
        if monitor is not None:
            try:
                events = monitor.on_discontinuity(time.monotonic(), item.reason)
            except Exception:
                self._monitor_broke(name)
                return
            self._monitor_events(name, events)

    def _monitor_detach(self, name: str) -> None:
        self._monitor_failed.discard(name)
        monitor = self._monitors.pop(name, None)
        if monitor is not None:
            try:
                events = monitor.flush(time.monotonic())
            except Exception:
                self._monitor_broke(name)
                self._monitor_failed.discard(name)
                return
            self._monitor_events(name, events)

    def _monitor_events(self, name: str, events: list[MarkerEvent]) -> None:
        for ev in events:
            try:
                self._handle(("marker", name, ev))
            except Exception:  # a sink's bug must not stop the detectors
                event(log, logging.ERROR, "qc.sink_failed", exc_info=True, kind="marker")

    def _sample_sources(self, now: float) -> None:
        """Each monitored stream's publishers' counters, keyed by publisher
        (a reconnect is a new source whose totals start over)."""
        for name, monitor in list(self._monitors.items()):
            stream = self.hub.get(name)
            if stream is None:
                continue
            try:
                sources = {(p.layer, p.epoch, p.attached_at): p.source_counters() for p in stream.publishers}
                events = monitor.on_counters(now, sources)
            except Exception:
                self._monitor_broke(name)
                continue
            if events:
                self._monitor_events(name, events)

    async def _watch_monitors(self) -> None:
        """Samples counters every MONITOR_SAMPLE_S and wakes each monitor at
        its timer (a stall's threshold, a marker's quiet period)."""
        next_sample = time.monotonic()
        while True:
            now = time.monotonic()
            sampled = now >= next_sample
            if sampled:
                self._sample_sources(now)
                next_sample = now + MONITOR_SAMPLE_S
            wake = next_sample
            for name, monitor in list(self._monitors.items()):
                deadline = monitor.get_timer()
                # After a sample every monitor is asked again: the connection
                # being there can turn a quiet track into a stall.
                if sampled or (deadline is not None and deadline <= now):
                    try:
                        events = monitor.handle_timer(now)
                        deadline = monitor.get_timer()
                    except Exception:
                        self._monitor_broke(name)
                        continue
                    self._monitor_events(name, events)
                if deadline is not None:
                    wake = min(wake, deadline)
            await asyncio.sleep(max(0.0, wake - time.monotonic()))

    # -- results -------------------------------------------------------------------
    def _on_results(self, slot: _WorkerSlot, w: TapWorker) -> None:
        if slot.worker is not w:
            return
        self._read_results(slot, w)

    def _read_results(self, slot: _WorkerSlot, w: TapWorker) -> None:
        if w.results is None:
            return
        messages = w.receive()
        if w.eof and self._loop is not None:
            # The pipe ended: the sentinel reports the exit; stop watching the pipe.
            self._loop.remove_reader(w.results.fileno())
        for msg in messages:
            try:
                self._handle(msg)
            except Exception:  # a sink's bug must not stop the results
                event(log, logging.ERROR, "qc.sink_failed", exc_info=True, kind=msg[0])

    def _handle(self, msg: tuple) -> None:
        op, name = msg[0], msg[1]
        if op == "marker":
            ev: MarkerEvent = msg[2]
            m = ev.marker
            wall_start = self.wall(name, m.start)
            wall_end = None if m.end is None else self.wall(name, m.end)
            if ev.kind == "open":
                self.markers_total[m.type] = self.markers_total.get(m.type, 0) + 1
            if self.settings.log_markers:
                event(log, logging.INFO, "qc.marker", stream=name, event=ev.kind, type=m.type, subtype=m.subtype,
                      start=round(m.start, 3), end=None if m.end is None else round(m.end, 3),
                      wall_start=round(wall_start, 3), wall_end=None if wall_end is None else round(wall_end, 3),
                      severity=m.severity, metadata=m.metadata)
            self.sink.marker(name, ev, wall_start=wall_start, wall_end=wall_end)
        elif op == "meters":
            self.sink.meters(name, msg[2])
        elif op == "cpu":
            self.cpu_seconds[name] = self.cpu_seconds.get(name, 0.0) + msg[2]
        elif op == "state":
            self._state(name, msg[2], msg[3])

    def _state(self, name: str, state: str, detail: str) -> None:
        event(log, logging.INFO if state in ("running", "stopped") else logging.WARNING, "qc.tap_state",
              stream=name, state=state, detail=detail)
        self.sink.tap_state(name, state, detail)

    def wall(self, name: str, t: float) -> float:
        """Unix time of media time ``t`` on stream ``name``."""
        pair = self._clock.get(name)
        if pair is None or not math.isfinite(t):
            return time.time()
        media_now, wall_now = pair
        return wall_now - (media_now - t)

    # -- metrics -------------------------------------------------------------------
    def collect(self) -> Iterable[Metric]:
        cpu = CounterMetricFamily("returnfeed_qc_cpu_seconds", "CPU seconds the QC worker spent on the stream",
                                  labels=["stream"])
        for name, v in self.cpu_seconds.items():
            cpu.add_metric([name], v)
        yield cpu
        drops = CounterMetricFamily("returnfeed_qc_frames_dropped", "Frames the QC tap dropped: 'reader' "
                                    "(its hub reader fell behind), 'video'/'audio' (the worker's channel "
                                    "was full or the worker down)", labels=["stream", "kind"])
        totals = dict(self._closed_channel_drops)
        for slot in self._slots:
            if slot.worker is not None and slot.worker.channel is not None:
                for key, n in slot.worker.channel.drops.items():
                    totals[key] = totals.get(key, 0) + n
        reader = dict(self.reader_drops)
        for name, tap in self._taps.items():
            reader[name] = reader.get(name, 0) + tap.reader.drops
        for name, n in reader.items():
            totals[(name, "reader")] = n
        for (name, kind), n in sorted(totals.items()):
            drops.add_metric([name, kind], n)
        yield drops
        markers = CounterMetricFamily("returnfeed_qc_markers", "QC markers opened, by type", labels=["type"])
        for t, n in sorted(self.markers_total.items()):
            markers.add_metric([t], n)
        yield markers
        restarts = CounterMetricFamily("returnfeed_qc_worker_restarts", "QC worker processes restarted")
        restarts.add_metric([], self.worker_restarts)
        yield restarts
