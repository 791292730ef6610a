"""The live QC tap on the server side: hub readers → worker process → sink.

:class:`QcService` taps each live stream through a
:class:`server.tap_host.TapHost` (the machinery it shares with the caption
service: bounded hub readers, forwarding into the worker's bounded channel
that drops and counts when full, worker processes restarted with backoff,
results read from a pipe the loop watches, media time → wall clock). What
is QC's is here: which layer is read — the lowest video layer and the audio
(like the WHEP fan-out and SRT ``read:`` do), audio alone without video —,
the stream detectors that see every forwarded frame on the loop, and what
the results become (sink, metrics).

Per-stream enable and thresholds come from ``qc_for(name)``
(server/stream_settings.py: the stream's stored settings over the ``[qc]``
defaults). The poll attaches a stream when it is enabled and detaches it
when it no longer is; a changed threshold mapping goes to the worker as a
``thresholds`` message (the host's ``update_op``), not a re-attach.
:meth:`settings_changed` runs the same check at once when the directory
reports a change. Worker processes start with the first stream that is
tapped, not with the server: QC off everywhere costs nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Iterable

from prometheus_client.core import CounterMetricFamily, Metric

from live_qc.engine import Meters
from live_qc.markers import MarkerEvent
from live_qc.stream import StreamMonitor
from live_qc.tap import QcSink, TapWorker
from live_qc.thresholds import Thresholds
from media.stream import Discontinuity, Frame, StreamHub

from .config import QcSettings
from .log import event
from .stream_settings import QcStreamSettings, effective_qc
from .tap_host import POLL_S, TapHost, TapSpec, next_backoff

# next_backoff: the QC worker's restart delays are the host's (tests and
# callers import it from here).
__all__ = ["LogSink", "QcService", "next_backoff"]

log = logging.getLogger("returnfeed.qc")

#: How often the stream monitors sample their sources' counters (TR 101 290,
#: SRT): counters have no events, and a marker is due within a quarter second.
MONITOR_SAMPLE_S = 0.2


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
        # Lazy: the workers start with their first stream, so a server where
        # no stream has QC enabled runs no QC process.
        self.host = TapHost(hub, name="qc", workers=settings.workers, queue_frames=settings.queue_frames,
                            make_worker=lambda index: TapWorker(settings.queue_frames, index), select=self._select,
                            handle=self._handle, on_state=self._state, logger=log, poll_s=poll_s, lazy=True,
                            update_op="thresholds", on_update=self._thresholds_sent,
                            on_frame=self._monitor_frame, on_discontinuity=self._monitor_discontinuity,
                            on_detach=self._monitor_detach)
        # Prometheus totals (only ever go up).
        self.cpu_seconds: dict[str, float] = {}
        self.markers_total: dict[str, int] = {}
        # Stream detectors (live_qc/stream.py), on the loop: O(1) per frame.
        self._monitors: dict[str, StreamMonitor] = {}
        self._monitor_task: asyncio.Task | None = None
        # Streams whose monitor raised: the forwarding to the worker goes on
        # without it (until the stream is tapped again).
        self._monitor_failed: set[str] = set()

    # -- lifecycle -----------------------------------------------------------------
    async def start(self) -> None:
        await self.host.start()
        self._monitor_task = asyncio.get_running_loop().create_task(self._watch_monitors())

    async def stop(self) -> None:
        """The detectors' timers first; then the host, whose detaches flush
        the detectors and whose workers flush their open markers on "stop"."""
        if self._monitor_task is not None:
            self._monitor_task.cancel()
            await asyncio.gather(self._monitor_task, return_exceptions=True)
            self._monitor_task = None
        await self.host.stop()

    @property
    def worker_restarts(self) -> int:
        return self.host.worker_restarts

    @property
    def reader_drops(self) -> dict[str, int]:
        return self.host.reader_drops

    # -- streams -------------------------------------------------------------------
    def enabled_for(self, name: str) -> bool:
        return self.qc_for(name).enabled

    def settings_changed(self, names: set[str]) -> None:
        """The settings store's listener: apply a change now rather than at
        the next poll (enable, disable, thresholds)."""
        if self.host.running:
            self.sync()

    def sync(self) -> None:
        """Attach live streams not yet tapped; re-attach one whose lowest
        layer changed (a simulcast layer appeared or left); detach one whose
        QC was switched off; send changed thresholds."""
        self.host.sync()

    def _select(self, stream: Any) -> TapSpec | None:
        settings = self.qc_for(stream.name)
        if not settings.enabled:
            if stream.name in self.host.taps:
                event(log, logging.INFO, "qc.detached", stream=stream.name, reason="disabled")
            return None
        # The lowest layer is the cheapest to analyse; without video, audio alone.
        layers = list(stream.layers)
        lowest = layers[-1] if layers else None
        return TapSpec(lowest, ("video", "audio") if lowest else ("audio",), settings.thresholds)

    def _thresholds_sent(self, name: str) -> None:
        # Like the worker's detectors, the stream detectors close what is
        # open and start over with the new values (their baselines and
        # windows are sized from the thresholds).
        self._monitor_detach(name)
        event(log, logging.INFO, "qc.thresholds", stream=name)

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
        return self.host.wall(name, t)

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
        for (name, kind), n in sorted(self.host.drop_totals().items()):
            drops.add_metric([name, kind], n)
        yield drops
        markers = CounterMetricFamily("returnfeed_qc_markers", "QC markers opened, by type", labels=["type"])
        for t, n in sorted(self.markers_total.items()):
            markers.add_metric([t], n)
        yield markers
        restarts = CounterMetricFamily("returnfeed_qc_worker_restarts", "QC worker processes restarted")
        restarts.add_metric([], self.worker_restarts)
        yield restarts
