"""Live captions on the server side: hub audio → caption worker → /ws/events + PostgreSQL.

:class:`CaptionService` taps the AUDIO of every live stream whose captions
are on (``options_for(name)`` → the worker's attach options, or ``None``)
through a :class:`server.tap_host.TapHost`: one bounded hub reader per
stream, compressed frames forwarded into the caption worker's bounded
channel (dropped and counted when full; the forwarding path never waits),
worker processes started when the first stream needs one and restarted
with backoff when they die. The worker (``live_qc.captions.worker``) speaks::

    in:  ("attach", stream, {model, language, translate, data_dir, …})
         ("audio", stream, codec, t, data)  ("reset", stream, reason)
         ("detach", stream)  ("stop",)
    out: ("caption", stream, Caption)  ("stats", stream, CaptionStats)
         ("state", stream, state, detail)

Captions get wall-clock times from the stream's latest (media, wall) pair
and go to the sink on the event loop (:meth:`server.qc_events.QcEvents.caption`,
partials rate-limited there); finals are also queued in
:class:`CaptionStore`, whose one writer task stores them in batches — a
database outage only delays storage::

    hub ─Reader(audio)─▶ TapHost ─channel─▶ caption worker (faster-whisper)
                                                │ results pipe
    sink.caption() ◀── wall clock ◀── handle ◀──┘
    CaptionStore.add(final) ──BatchWriter──▶ captions table
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from live_qc.captions.types import Caption, CaptionStats
from live_qc.tap import TapWorker
from media.stream import StreamHub

from . import repo
from .batch_writer import BatchWriter
from .config import CaptionSettings
from .log import event
from .tap_host import POLL_S, TapHost, TapSpec, Worker

log = logging.getLogger("returnfeed.captions")

OptionsFor = Callable[[str], "dict[str, Any] | None"]


class CaptionSink(Protocol):
    """Where the service hands captions (the /ws/events service)."""

    def caption(self, stream: str, caption: Caption, *, wall_start: float, wall_end: float) -> None: ...

    def caption_state(self, stream: str, state: str, detail: str = "") -> None: ...


def default_options_for(settings: CaptionSettings, data_dir: Path,
                        stream_settings: Callable[[str], Any] | None = None) -> OptionsFor:
    """``options_for`` from the ``[captions]`` defaults and, where given, a
    stream's own captions settings: ``stream_settings(name)`` returns a
    mapping or an object with any of ``enabled``, ``language``,
    ``translate``, ``model`` (the API's ``captions`` section, or the
    effective settings built from it), or None. A field it has replaces the
    default; ``language`` None or "auto" is detection, ``model`` None the
    default model. A stream in ``disabled_streams`` is never captioned."""
    base = settings.stream_options(data_dir)

    def field_of(own: Any, key: str) -> tuple[bool, Any]:
        if isinstance(own, Mapping):
            return key in own, own.get(key)
        return hasattr(own, key), getattr(own, key, None)

    def options_for(name: str) -> dict[str, Any] | None:
        if name in settings.disabled_streams:
            return None
        own = stream_settings(name) if stream_settings is not None else None
        enabled = settings.enabled
        out = dict(base)
        if own is not None:
            has, value = field_of(own, "enabled")
            if has and isinstance(value, bool):
                enabled = value
            has, value = field_of(own, "language")
            if has:
                out["language"] = None if value in (None, "", "auto") else value
            has, value = field_of(own, "translate")
            if has and isinstance(value, bool):
                out["translate"] = value
            has, value = field_of(own, "model")
            if has and value:
                out["model"] = value
        return out if enabled else None

    return options_for


def _caption_worker(capacity: int) -> Callable[[int], Worker]:
    def make(index: int) -> Worker:
        # Imported here: the worker module pulls in PyAV and numpy, which the
        # server needs only once a stream is captioned.
        from live_qc.captions.worker import caption_worker_main

        return TapWorker(capacity, index, target=caption_worker_main, label="captions")

    return make


@dataclass(slots=True)
class _Stats:
    rtf: float = 0.0
    lag_s: float = 0.0
    #: Skipped seconds in total, over every worker that served the stream.
    skipped_s: float = 0.0
    #: The current streamer's own total (after a detach or a worker restart
    #: the next one starts again from 0).
    worker_skipped_s: float = 0.0


class CaptionService:
    def __init__(self, settings: CaptionSettings, hub: StreamHub, sink: CaptionSink,
                 store: "CaptionStore | None" = None, *, options_for: OptionsFor,
                 make_worker: Callable[[int], Worker] | None = None, poll_s: float = POLL_S) -> None:
        self.settings = settings
        self.sink = sink
        self.store = store
        self.options_for = options_for
        self.host = TapHost(hub, name="captions", workers=settings.workers, queue_frames=settings.queue_frames,
                            make_worker=make_worker or _caption_worker(settings.queue_frames),
                            select=self._select, handle=self._handle, on_state=self._state, logger=log,
                            poll_s=poll_s, lazy=True)
        # Prometheus totals and gauges by stream.
        self.stats: dict[str, _Stats] = {}
        self.cpu_seconds: dict[str, float] = {}
        self.captions_total: dict[tuple[str, str], int] = {}
        self.words_total: dict[str, int] = {}

    async def start(self) -> None:
        if self.store is not None:
            self.store.start()
        await self.host.start()

    async def stop(self) -> None:
        """Taps first (the workers' last finals are still handed on), then
        the store's writer drains."""
        await self.host.stop()
        if self.store is not None:
            await self.store.close()

    @property
    def worker_restarts(self) -> int:
        return self.host.worker_restarts

    def _select(self, stream: Any) -> TapSpec | None:
        if not any(t.kind == "audio" for t in stream.tracks.values()):
            return None
        options = self.options_for(stream.name)
        if options is None:
            return None
        # From now on only: a re-attach (new options) must not caption the
        # cached seconds again.
        return TapSpec(None, ("audio",), options, from_cache=False)

    def sync(self) -> None:
        self.host.sync()

    def wall(self, name: str, t: float) -> float:
        return self.host.wall(name, t)

    def _handle(self, msg: tuple) -> None:
        op, name = msg[0], msg[1]
        if op == "caption":
            cap: Caption = msg[2]
            wall_start = self.host.wall(name, cap.start)
            wall_end = max(self.host.wall(name, cap.end), wall_start)
            key = (name, "final" if cap.final else "partial")
            self.captions_total[key] = self.captions_total.get(key, 0) + 1
            if cap.final:
                self.words_total[name] = self.words_total.get(name, 0) + len(cap.words)
                if self.store is not None:
                    tap = self.host.taps.get(name)
                    options = tap.spec.options if tap is not None else None
                    translated = bool(options.get("translate")) if isinstance(options, dict) else False
                    self.store.add(name, cap, wall_start=wall_start, wall_end=wall_end, translated=translated)
            self.sink.caption(name, cap, wall_start=wall_start, wall_end=wall_end)
        elif op == "stats":
            st: CaptionStats = msg[2]
            s = self.stats.setdefault(name, _Stats())
            s.rtf, s.lag_s = st.rtf, st.lag_s
            s.skipped_s += st.skipped_s - s.worker_skipped_s
            s.worker_skipped_s = st.skipped_s
            if st.cpu_s > 0:
                self.cpu_seconds[name] = self.cpu_seconds.get(name, 0.0) + st.cpu_s
        elif op == "state":
            self._state(name, msg[2], msg[3] if len(msg) > 3 else "")

    def _state(self, name: str, state: str, detail: str) -> None:
        stats = self.stats.get(name)
        if stats is not None and state in ("stopped", "restarting"):
            stats.worker_skipped_s = 0.0  # the stream's next streamer counts from 0 again
        event(log, logging.INFO if state in ("running", "stopped") else logging.WARNING,
              "captions.state", stream=name, state=state, detail=detail)
        self.sink.caption_state(name, state, detail)

    # -- metrics -------------------------------------------------------------------
    def collect(self) -> Iterable[Metric]:
        rtf = GaugeMetricFamily("returnfeed_captions_rtf", "Caption decoding time per second of audio "
                                "(real-time factor; below 1 keeps up)", labels=["stream"])
        lag = GaugeMetricFamily("returnfeed_captions_lag_seconds", "Media seconds between the newest audio "
                                "the caption worker received and its newest committed or skipped audio",
                                labels=["stream"])
        skipped = CounterMetricFamily("returnfeed_captions_skipped_seconds", "Audio the caption worker skipped "
                                      "to catch up with real time", labels=["stream"])
        for name, s in sorted(self.stats.items()):
            rtf.add_metric([name], s.rtf)
            lag.add_metric([name], s.lag_s)
            skipped.add_metric([name], s.skipped_s)
        yield rtf
        yield lag
        yield skipped
        cpu = CounterMetricFamily("returnfeed_captions_cpu_seconds", "CPU seconds the caption worker spent "
                                  "on the stream", labels=["stream"])
        for name, v in sorted(self.cpu_seconds.items()):
            cpu.add_metric([name], v)
        yield cpu
        drops = CounterMetricFamily("returnfeed_captions_frames_dropped", "Audio frames the caption tap "
                                    "dropped: 'reader' (its hub reader fell behind), 'audio' (the worker's "
                                    "channel was full or the worker down)", labels=["stream", "kind"])
        for (name, kind), n in sorted(self.host.drop_totals().items()):
            drops.add_metric([name, kind], n)
        yield drops
        captions = CounterMetricFamily("returnfeed_captions", "Captions produced, final or partial",
                                       labels=["stream", "kind"])
        for (name, kind), n in sorted(self.captions_total.items()):
            captions.add_metric([name, kind], n)
        yield captions
        words = CounterMetricFamily("returnfeed_captions_words", "Words committed", labels=["stream"])
        for name, n in sorted(self.words_total.items()):
            words.add_metric([name], n)
        yield words
        restarts = CounterMetricFamily("returnfeed_captions_worker_restarts", "Caption worker processes restarted")
        restarts.add_metric([], self.host.worker_restarts)
        yield restarts
        if self.store is not None:
            yield from self.store.collect()


def _ts(unix: float) -> datetime:
    return datetime.fromtimestamp(unix, timezone.utc)


class CaptionStore:
    """Final captions to the ``captions`` table, off the forwarding path:
    :meth:`add` only queues (bounded, :class:`server.batch_writer.BatchWriter`);
    one writer task inserts batches in one transaction each."""

    def __init__(self, db: Any, directory: Any, *, queue_max: int) -> None:
        self.db = db
        self.directory = directory
        self.writer: BatchWriter[tuple] = BatchWriter(db, self._write, name="captions", queue_max=queue_max,
                                                      logger=log)
        self.unknown_stream = 0

    def add(self, stream: str, cap: Caption, *, wall_start: float, wall_end: float,
            translated: bool = False) -> None:
        entry = self.directory.stream(stream)
        if entry is None:
            self.unknown_stream += 1
            return
        words = [w.to_json() for w in cap.words]
        self.writer.put((entry.id, float(cap.start), float(max(cap.end, cap.start)), _ts(wall_start),
                         _ts(max(wall_end, wall_start)), cap.text, cap.language or "", words, entry.label,
                         translated))

    async def _write(self, rows: list[tuple]) -> None:
        async with self.db.pool.acquire() as conn:
            async with conn.transaction():
                await repo.insert_captions(conn, rows)

    def start(self) -> None:
        self.writer.start()

    async def close(self) -> None:
        await self.writer.close()

    @property
    def pending(self) -> int:
        return len(self.writer)

    @property
    def stored(self) -> int:
        return self.writer.stored

    def collect(self) -> Iterable[Metric]:
        w = self.writer
        yield GaugeMetricFamily("returnfeed_captions_writes_queued", "Final captions waiting for the database",
                                value=len(w))
        yield CounterMetricFamily("returnfeed_captions_writes_dropped", "Final captions dropped because the "
                                  "write queue was full", value=w.dropped)
        yield CounterMetricFamily("returnfeed_captions_writes_failed", "Final captions the database refused",
                                  value=w.failed)
