"""Hosting tap worker processes: what the QC and caption services share.

A *tap* reads one live stream through its own bounded hub
:class:`~media.stream.Reader` and forwards the compressed frames into a
worker process's bounded channel (``put_video``/``put_audio``/``control``,
which drop and count when full: nothing here ever waits on a worker).
:class:`TapHost` owns

* the worker slots: a worker per slot, started when the first stream is
  assigned to it (``lazy``) or at start; one that dies (its process sentinel
  becomes readable) is restarted after 0.5 s, doubling to 30 s while it keeps
  dying, and its streams are attached again;
* the hub poll: the hub has no events, so every ``poll_s`` the owner's
  ``select(stream)`` says what to read from each live stream and what the
  worker's ``attach`` carries (:class:`TapSpec`, or ``None``: no tap); a
  changed spec re-attaches, ``None`` detaches (also while the stream
  reconnects); with ``update_op`` a spec whose ``options`` alone changed is
  sent to the worker as ``(update_op, stream, options)`` instead (QC's
  thresholds: the worker keeps its state);
* the forwarding task per tap, which also keeps each stream's latest
  (media time, wall time) pair: :meth:`TapHost.wall` maps media time to
  wall clock (wall = now − (media_now − t)), and shows the owner every
  frame and discontinuity it reads (``on_frame``/``on_discontinuity``, on
  the loop: QC's stream detectors);
* the result pipes, watched with ``loop.add_reader`` (only what is already
  there is read); every result tuple goes to the owner's ``handle``;
* the drop and restart totals for the owner's metrics, and an ordered stop
  (poll, readers, then ``stop`` to each worker, whose last results are still
  handed on, then the processes).

::

    hub ──poll──▶ select(stream) ─▶ Reader ──forward task──▶ worker.channel ─▶ process
                                                                              │ results
    owner.handle(msg) ◀──────────────── loop.add_reader(results pipe) ◀───────┘

The worker object (``make_worker(index)``, not started) is what
:class:`live_qc.tap.TapWorker` is: ``start()``, ``channel``, ``results``,
``sentinel``, ``proc``, ``receive()``, ``eof``, ``started_at``,
``request_stop()``, ``close()``, ``discard()``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Protocol

from media.stream import Discontinuity, Frame, Reader, StreamClosed, StreamHub, StreamState

from .log import event

#: Restart delays of a dying worker.
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
#: A worker that ran this long before dying starts the backoff over.
BACKOFF_RESET_AFTER_S = 60.0
#: How often the hub is looked at for streams to attach.
POLL_S = 0.5


def next_backoff(delay: float | None) -> float:
    """0.5 s, then doubling, at most 30 s."""
    return BACKOFF_FIRST_S if delay is None else min(delay * 2, BACKOFF_MAX_S)


class Channel(Protocol):
    drops: dict[tuple[str, str], int]

    def put_video(self, stream: str, codec: str, t: float, keyframe: bool, data: bytes) -> bool: ...

    def put_audio(self, stream: str, codec: str, t: float, data: bytes) -> bool: ...

    def control(self, msg: tuple) -> bool: ...


class Worker(Protocol):
    channel: Channel | None
    results: Any
    proc: Any
    eof: bool
    started_at: float

    def start(self) -> None: ...

    @property
    def sentinel(self) -> int: ...

    @property
    def pid(self) -> int | None: ...

    def receive(self) -> list[tuple]: ...

    def request_stop(self) -> None: ...

    def close(self, timeout: float = 5.0) -> None: ...

    def discard(self) -> None: ...


@dataclass(slots=True, frozen=True)
class TapSpec:
    """What a tap reads and what its worker is told on ``attach``."""

    #: The simulcast layer read (with ``video`` in ``kinds``); None: none.
    layer: str | None = None
    kinds: tuple[str, ...] = ("audio",)
    #: The third element of the ``("attach", stream, options)`` message.
    options: Any = None
    #: Start with the hub's cached frames (the last GOP); False: from now on
    #: (a re-attach must not feed the worker audio it has already had).
    from_cache: bool = True


@dataclass(slots=True)
class _Tap:
    name: str
    worker: int
    reader: Reader
    spec: TapSpec
    task: asyncio.Task | None = None


@dataclass(slots=True)
class _Slot:
    index: int
    worker: Any = None
    delay: float | None = None
    restarting: asyncio.Task | None = None
    streams: set[str] = field(default_factory=set)


class TapHost:
    def __init__(self, hub: StreamHub, *, name: str, workers: int, queue_frames: int,
                 make_worker: Callable[[int], Worker], select: Callable[[Any], TapSpec | None],
                 handle: Callable[[tuple], None], on_state: Callable[[str, str, str], None],
                 logger: logging.Logger, poll_s: float = POLL_S, lazy: bool = False,
                 update_op: str | None = None, on_update: Callable[[str], None] | None = None,
                 on_frame: Callable[[str, Frame], None] | None = None,
                 on_discontinuity: Callable[[str, Discontinuity], None] | None = None,
                 on_detach: Callable[[str], None] | None = None) -> None:
        self.hub = hub
        self.name = name
        self.queue_frames = queue_frames
        self.make_worker = make_worker
        self.select = select
        self.handle = handle
        self.on_state = on_state
        self.log = logger
        self.poll_s = poll_s
        self.lazy = lazy
        #: The control message that carries changed options (None: a change
        #: re-attaches); ``on_update(stream)`` once the worker has it.
        self.update_op = update_op
        self.on_update = on_update
        # Every frame and discontinuity a tap reads, before it is forwarded,
        # and a tap's end: the owner's per-stream state that lives on the loop.
        self.on_frame = on_frame
        self.on_discontinuity = on_discontinuity
        self.on_detach = on_detach
        self.slots = [_Slot(i) for i in range(workers)]
        self.taps: dict[str, _Tap] = {}
        # Stream → (media time, unix time) of its latest forwarded frame; kept
        # past the detach, whose flushed results still need it.
        self._clock: dict[str, tuple[float, float]] = {}
        self._poller: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        # Totals (only ever go up).
        self.reader_drops: dict[str, int] = {}
        self._closed_channel_drops: dict[tuple[str, str], int] = {}
        self.worker_restarts = 0

    # -- lifecycle -----------------------------------------------------------------
    @property
    def running(self) -> bool:
        """Started and not stopping."""
        return self._loop is not None and not self._stopping

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        if not self.lazy:
            for slot in self.slots:
                self._start_worker(slot)
        self._poller = self._loop.create_task(self._poll(), name=f"{self.name}-poll")

    async def stop(self) -> None:
        self._stopping = True
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
            self._poller = None
        tasks = [t.task for t in self.taps.values() if t.task is not None]
        for name in list(self.taps):
            self.detach(name, notify_worker=False)
        await asyncio.gather(*tasks, return_exceptions=True)
        running = []
        for slot in self.slots:
            if slot.restarting is not None:
                slot.restarting.cancel()
            w = slot.worker
            if w is not None:
                self._unwatch(w)
                w.request_stop()
                running.append((slot, w))
        # A worker flushes what it holds on "stop": wait for it (off the
        # loop), hand its last results on, then release everything.
        await asyncio.gather(*(asyncio.to_thread(w.proc.join, 5.0) for _, w in running), return_exceptions=True)
        for slot, w in running:
            self._read_results(slot, w)
            self._keep_drops(w)
            slot.worker = None
        await asyncio.gather(*(asyncio.to_thread(w.close) for _, w in running), return_exceptions=True)

    # -- workers -------------------------------------------------------------------
    def _start_worker(self, slot: _Slot) -> None:
        assert self._loop is not None
        w = self.make_worker(slot.index)
        w.start()
        slot.worker = w
        self._loop.add_reader(w.results.fileno(), self._on_results, slot, w)
        self._loop.add_reader(w.sentinel, self._on_exit, slot, w)
        event(self.log, logging.INFO, f"{self.name}.worker_started", worker=slot.index, pid=w.pid)
        for name in sorted(slot.streams):
            tap = self.taps.get(name)
            if tap is not None:
                self._send_attach(w, tap)

    def _ensure_worker(self, slot: _Slot) -> None:
        if slot.worker is None and slot.restarting is None and not self._stopping:
            try:
                self._start_worker(slot)
            except Exception as exc:  # no process (OSError), or its module would not import
                event(self.log, logging.ERROR, f"{self.name}.worker_start_failed", worker=slot.index,
                      error=f"{type(exc).__name__}: {exc}")
                self._schedule_restart(slot)

    def _unwatch(self, w: Any) -> None:
        assert self._loop is not None
        if w.results is not None:
            self._loop.remove_reader(w.results.fileno())
        if w.proc is not None:
            self._loop.remove_reader(w.sentinel)

    def _on_exit(self, slot: _Slot, w: Any) -> None:
        if slot.worker is not w:
            return
        self._unwatch(w)
        self._read_results(slot, w)  # what it sent before dying still counts
        w.proc.join(0)
        if w.proc.exitcode is None:
            # The sentinel (a pipe the child held) closes a moment before the
            # kernel lets the child be reaped; the exit code is that close.
            w.proc.join(0.2)
        code = w.proc.exitcode
        lived = time.monotonic() - w.started_at
        self._keep_drops(w)
        w.discard()
        slot.worker = None
        if self._stopping:
            return
        if lived >= BACKOFF_RESET_AFTER_S:
            slot.delay = None
        self._schedule_restart(slot)
        event(self.log, logging.ERROR, f"{self.name}.worker_died", worker=slot.index, exitcode=code,
              restart_in_s=slot.delay, streams=len(slot.streams))
        for name in sorted(slot.streams):
            self.on_state(name, "restarting", f"worker exited ({code}); restarting in {slot.delay} s")

    def _schedule_restart(self, slot: _Slot) -> None:
        slot.delay = next_backoff(slot.delay)
        assert self._loop is not None
        slot.restarting = self._loop.create_task(self._restart(slot, slot.delay), name=f"{self.name}-restart")

    async def _restart(self, slot: _Slot, delay: float) -> None:
        await asyncio.sleep(delay)
        slot.restarting = None
        if self._stopping:
            return
        self.worker_restarts += 1
        try:
            self._start_worker(slot)
        except Exception as exc:
            event(self.log, logging.ERROR, f"{self.name}.worker_start_failed", worker=slot.index,
                  error=f"{type(exc).__name__}: {exc}")
            slot.worker = None
            self._schedule_restart(slot)

    def _keep_drops(self, w: Any) -> None:
        if w.channel is not None:
            for key, n in w.channel.drops.items():
                self._closed_channel_drops[key] = self._closed_channel_drops.get(key, 0) + n
            w.channel.drops.clear()

    def _send_attach(self, w: Any, tap: _Tap) -> None:
        if w.channel is not None:
            w.channel.control(("attach", tap.name, tap.spec.options))

    # -- streams -------------------------------------------------------------------
    async def _poll(self) -> None:
        while True:
            self.sync()
            await asyncio.sleep(self.poll_s)

    def sync(self) -> None:
        """Attach live streams the owner wants and are not tapped; re-attach
        one whose spec changed (or send its new options, with
        ``update_op``); detach one the owner no longer wants, at once even
        while it reconnects. A tap also ends with its reader (the stream
        closed); a stream reconnecting within its grace period keeps its tap
        and spec until it is live again."""
        for stream in self.hub:
            tap = self.taps.get(stream.name)
            live = stream.state == StreamState.LIVE and bool(stream.tracks)
            if tap is None and not live:
                continue
            try:
                spec = self.select(stream)
            except Exception:  # an owner's bug (or settings it cannot read) skips this stream only
                event(self.log, logging.ERROR, f"{self.name}.select_failed", exc_info=True, stream=stream.name)
                continue
            if tap is not None:
                if spec is None:
                    self.detach(stream.name)
                    continue
                if not live or tap.spec == spec or self._update(tap, spec):
                    continue
                self.detach(stream.name)
            if spec is not None:
                self._attach(stream, spec)

    def _update(self, tap: _Tap, spec: TapSpec) -> bool:
        """Whether ``spec`` (options changed, the reader's part not) is
        handled without a re-attach: sent as ``update_op``, or left to the
        worker's next attach when it is down. A full channel tries again at
        the next poll."""
        if self.update_op is None or replace(tap.spec, options=spec.options) != spec:
            return False
        w = self.slots[tap.worker].worker
        if w is None or w.channel is None:
            tap.spec = spec  # the (re)start's attach carries it
        elif w.channel.control((self.update_op, tap.name, spec.options)):
            tap.spec = spec
            if self.on_update is not None:
                self.on_update(tap.name)
        return True

    def _attach(self, stream: Any, spec: TapSpec) -> None:
        name = stream.name
        try:
            reader = stream.subscribe(self.queue_frames, layers=[spec.layer] if spec.layer else [],
                                      kinds=spec.kinds, from_cache=spec.from_cache)
        except StreamClosed:
            return
        slot = min(self.slots, key=lambda s: len(s.streams))
        slot.streams.add(name)
        tap = _Tap(name, slot.index, reader, spec)
        self.taps[name] = tap
        if slot.worker is not None:
            self._send_attach(slot.worker, tap)
        else:
            self._ensure_worker(slot)  # attaches the slot's streams once started
        assert self._loop is not None
        tap.task = self._loop.create_task(self._forward(tap), name=f"{self.name}-forward")
        event(self.log, logging.INFO, f"{self.name}.attached", stream=name, layer=spec.layer, worker=slot.index)

    def detach(self, name: str, notify_worker: bool = True) -> None:
        tap = self.taps.pop(name, None)
        if tap is None:
            return
        self.reader_drops[name] = self.reader_drops.get(name, 0) + tap.reader.drops
        tap.reader.close()
        if tap.task is not None and tap.task is not asyncio.current_task():
            tap.task.cancel()
        if self.on_detach is not None:
            self.on_detach(name)
        slot = self.slots[tap.worker]
        slot.streams.discard(name)
        if notify_worker and slot.worker is not None and slot.worker.channel is not None:
            slot.worker.channel.control(("detach", name))

    async def _forward(self, tap: _Tap) -> None:
        reader = tap.reader
        name = tap.name
        slots = self.slots
        clock = self._clock
        on_frame = self.on_frame
        on_discontinuity = self.on_discontinuity
        try:
            while True:
                items = [await reader.get()]
                items += reader.drain()
                w = slots[tap.worker].worker
                channel = w.channel if w is not None else None
                for item in items:
                    if isinstance(item, Discontinuity):
                        if on_discontinuity is not None:
                            on_discontinuity(name, item)
                        if channel is not None:
                            channel.control(("reset", name, item.reason))
                        continue
                    assert isinstance(item, Frame)
                    if on_frame is not None:
                        on_frame(name, item)
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
            if self.taps.get(name) is tap:
                self.detach(name)

    # -- results -------------------------------------------------------------------
    def _on_results(self, slot: _Slot, w: Any) -> None:
        if slot.worker is not w:
            return
        self._read_results(slot, w)

    def _read_results(self, slot: _Slot, w: Any) -> None:
        if w.results is None:
            return
        messages = w.receive()
        if w.eof and self._loop is not None:
            # The pipe ended: the sentinel reports the exit; stop watching the pipe.
            self._loop.remove_reader(w.results.fileno())
        for msg in messages:
            try:
                self.handle(msg)
            except Exception:  # an owner's bug must not stop the results
                event(self.log, logging.ERROR, f"{self.name}.handle_failed", exc_info=True, kind=msg[0])

    def wall(self, name: str, t: float) -> float:
        """Unix time of media time ``t`` on stream ``name``."""
        pair = self._clock.get(name)
        if pair is None or not math.isfinite(t):
            return time.time()
        media_now, wall_now = pair
        return wall_now - (media_now - t)

    # -- totals for the owner's metrics ---------------------------------------------
    def drop_totals(self) -> dict[tuple[str, str], int]:
        """(stream, kind) → frames dropped: 'reader' (its hub reader fell
        behind), 'video'/'audio' (the worker's channel was full or the
        worker down)."""
        totals = dict(self._closed_channel_drops)
        for slot in self.slots:
            if slot.worker is not None and slot.worker.channel is not None:
                for key, n in slot.worker.channel.drops.items():
                    totals[key] = totals.get(key, 0) + n
        reader = dict(self.reader_drops)
        for name, tap in self.taps.items():
            reader[name] = reader.get(name, 0) + tap.reader.drops
        for name, n in reader.items():
            totals[(name, "reader")] = n
        return totals
