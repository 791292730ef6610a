"""Egress worker processes: WHEP viewers spread over N processes (issue 15).

With ``webrtc.egress_workers`` > 0 :class:`EgressHost` takes the place of
:class:`~media.webrtc.whep.WhepService` in :class:`~server.media_service.MediaService`:
the routes (server/whep.py), the live state and the metrics use the same
surface (``sessions`` of session proxies, ``create_session``, ``viewers``,
``totals``, ``switches``, ``drops``, ``closed_by_reason``, ``close``) and do
not care which process a viewer lives in.

::

    Stream ─► StreamPacketizer (one per stream with remote viewers, here)
                 │ PacketsEvent, once per worker that has viewers of the stream
                 ▼
    FeedSender ──feed socket──► worker i: FeedReceiver ─► PacketFanout ─► WhepSessions
    EgressHost ◄─control socket─► worker i (calls, closed, keyframe, stats)

* **Assignment**: a new viewer goes to the live worker with the fewest
  viewers (sessions being created count), ties to the lowest index.
* **Feeds**: a worker gets a stream's packets while it has viewers of it:
  before its first viewer's offer is answered the worker opens the stream
  (``open``) and its feed joins the stream's packetizer (which first replays
  the cached GOP, so the viewer starts at once); after its last one left,
  the feed leaves and the worker drops the stream (``close_stream``). A
  packetizer without feeds is closed.
* **Death**: a worker whose process ends (its sentinel) or whose control
  socket breaks takes only its viewers: their sessions close with reason
  ``worker_died`` (the session resource answers 404 from then on; the
  viewer reconnects), its last counters are kept so that every ``_total``
  still only goes up, and it is restarted after 0.5 s, doubling to 30 s
  while it keeps dying (server/tap_host.py's backoff). The other workers
  never notice.
* **Keyframes**: a worker's keyframe request (a viewer's PLI/FIR, a join)
  goes to the same handlers as in one process (the WHIP publisher's PLI);
  how many were sent goes back to the worker.
* **Stats**: every worker sends its figures every ``stats_interval``
  (media/webrtc/egress_worker.py :class:`WorkerStats`); the host sums them
  with what dead workers had reached.
* **Shutdown** (``close``): every worker is asked to stop (it closes its
  sessions and sends its last figures), then joined, terminated, killed
  — in that order, with timeouts.

* **ICE**: every viewer stays on the main process's one ICE port (and its
  ICE-TCP port): :class:`~media.webrtc.icerelay.IceRelayHub` routes a
  worker's datagrams to it over its relay socket, the worker sends on a
  duplicate of the shared socket. The ufrag/password of each answer is
  registered with the hub before the answer leaves, and unregistered when
  the session ends; a dead worker's routes go with it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import multiprocessing
import os
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from media.errors import NoCapacity, SessionGone, UnsupportedMedia
from media.histogram import gc_pause_counts
from media.procs import join_or_kill
from media.webrtc.egress_worker import (
    ControlChannel, LatencyCounts, SessionState, WorkerConfig, WorkerStats, add_counts, error_from_reply, worker_main,
)
from media.webrtc.viewer import SessionStats
from media.webrtc.whep import SessionInfo

from .log import event
from .tap_host import BACKOFF_RESET_AFTER_S, next_backoff

log = logging.getLogger("returnfeed.egress")

__all__ = ["EgressHost", "EgressSession", "MergedHistogram", "ProcessWorker"]

#: How long a worker may take to start (import aiortc, bind its port).
READY_TIMEOUT_S = 30.0
#: How long one call may take (an answer needs ICE gathering: seconds).
CALL_TIMEOUT_S = 20.0
#: Sessions the worker reported closed before the host had their proxy.
_EARLY_CLOSED = 1024


class WorkerLink(Protocol):
    """One worker process as the host uses it (:class:`ProcessWorker`; the
    unit tests' fakes). ``on_message(msg)`` and ``on_exit()`` are set by the
    host before ``start``."""

    index: int
    pid: int | None
    on_message: Callable[[tuple], None]
    on_exit: Callable[[], None]

    async def start(self) -> None: ...

    async def call(self, method: str, *args: Any) -> Any: ...

    def send(self, msg: tuple) -> None: ...

    def feed(self, ev: Any) -> None: ...

    @property
    def feed_drops(self) -> int: ...

    @property
    def feed_queued_bytes(self) -> int: ...

    async def stop(self, timeout: float) -> None: ...

    def kill(self) -> None: ...


class ProcessWorker:
    """A worker process (spawn context) and the main ends of its sockets."""

    def __init__(self, index: int, config: WorkerConfig, relay: Any = None) -> None:
        self.index = index
        self.config = dataclasses.replace(config, index=index)
        #: The main process's IceRelayHub (None: ICE mux off, aioice's
        #: sockets per session in the worker).
        self.relay = relay
        self.pid: int | None = None
        self.proc: Any = None
        self.on_message: Callable[[tuple], None] = lambda msg: None
        self.on_exit: Callable[[], None] = lambda: None
        self._channel: ControlChannel | None = None
        self._feed_sock: socket.socket | None = None
        self._sender: Any = None
        self._calls: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self._ready: asyncio.Future | None = None
        self._stopped: asyncio.Future | None = None
        self._gone = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        from media.webrtc import feed as feeds

        loop = self._loop = asyncio.get_running_loop()
        control, child_control = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        feed, child_feed = feeds.socketpair()  # its send buffer raised: room for a busy worker
        relay_args = child_relay = None
        if self.relay is not None:
            from media.webrtc.icerelay import relay_socketpair

            self.relay.remove_worker(self.index)  # an earlier life's routes, if any are left
            main_relay, child_relay = relay_socketpair()
            self.relay.add_worker(self.index, main_relay)
            relay_args = (self.relay.worker_handoff(), child_relay, self.relay.udp_socket)
        ctx = multiprocessing.get_context("spawn")
        self.proc = ctx.Process(target=worker_main,
                                args=(self.config, child_control, child_feed, os.getpid(), relay_args),
                                name=f"returnfeed-egress-{self.index}", daemon=True)
        try:
            self.proc.start()
        finally:
            child_control.close()
            child_feed.close()
            if child_relay is not None:
                child_relay.close()
        self.pid = self.proc.pid
        self._ready = loop.create_future()
        self._channel = ControlChannel(control, self._on_message, self._on_gone)
        self._channel.start()
        self._feed_sock = feed
        self._sender = feeds.FeedSender(feed)
        loop.add_reader(self.proc.sentinel, self._on_gone)
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), READY_TIMEOUT_S)
        except asyncio.TimeoutError:
            self.kill()
            raise ConnectionError(f"egress worker {self.index} did not start in {READY_TIMEOUT_S:g} s") from None

    def _on_message(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "reply":
            fut = self._calls.pop(msg[1], None)
            if fut is not None and not fut.done():
                if msg[2]:
                    fut.set_result(msg[3])
                else:
                    fut.set_exception(error_from_reply(msg[3]))
            return
        if kind == "ready":
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(msg)
        elif kind == "stopped":
            if self._stopped is not None and not self._stopped.done():
                self._stopped.set_result(None)
        self.on_message(msg)

    def _on_gone(self) -> None:
        """The process ended or its control socket broke: once."""
        if self._gone:
            return
        self._gone = True
        loop = self._loop
        if loop is not None and self.proc is not None:
            loop.remove_reader(self.proc.sentinel)
        if self._channel is not None:
            self._channel.close()
        for fut in (self._ready, self._stopped, *self._calls.values()):
            if fut is not None and not fut.done():
                fut.set_exception(ConnectionError(f"egress worker {self.index} is gone"))
        self._calls.clear()
        if self._ready is not None and self._ready.done() and not self._ready.cancelled():
            self._ready.exception()  # retrieved: no "never retrieved" warning
        if self._stopped is not None and self._stopped.done() and not self._stopped.cancelled():
            self._stopped.exception()
        if self._sender is not None:
            self._sender.close()
        if self._feed_sock is not None:
            self._feed_sock.close()
        if self.relay is not None:
            self.relay.remove_worker(self.index)
        self.on_exit()

    async def call(self, method: str, *args: Any) -> Any:
        if self._gone or self._channel is None:
            raise ConnectionError(f"egress worker {self.index} is gone")
        call_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._calls[call_id] = fut
        self._channel.send(("call", call_id, method, args))
        try:
            return await asyncio.wait_for(fut, CALL_TIMEOUT_S)
        finally:
            self._calls.pop(call_id, None)

    def send(self, msg: tuple) -> None:
        if not self._gone and self._channel is not None:
            self._channel.send(msg)

    def feed(self, ev: Any) -> None:
        if not self._gone and self._sender is not None:
            self._sender.send(ev)

    @property
    def feed_drops(self) -> int:
        return self._sender.dropped if self._sender is not None else 0

    @property
    def feed_queued_bytes(self) -> int:
        """What waits in the feed's queue for room in the worker's socket."""
        return self._sender.pending_bytes if self._sender is not None else 0

    async def stop(self, timeout: float) -> None:
        """Ordered: ``stop`` (the worker closes its sessions, sends its last
        figures), then join, terminate, kill."""
        if not self._gone and self._channel is not None:
            self._stopped = asyncio.get_running_loop().create_future()
            self._channel.send(("stop",))
            try:
                await asyncio.wait_for(asyncio.shield(self._stopped), timeout)
            except (asyncio.TimeoutError, ConnectionError):
                pass
        proc = self.proc
        if proc is not None:
            await asyncio.to_thread(join_or_kill, proc, timeout)
        self._on_gone()

    def kill(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            self.proc.kill()


class _RemoteDescription:
    __slots__ = ("sdp", "type")

    def __init__(self, sdp: str) -> None:
        self.sdp = sdp
        self.type = "offer"


class _PcView:
    """What the routes read of a session's peer connection (the offer, for
    PATCH's ICE-restart check; the state)."""

    __slots__ = ("remoteDescription", "_session")

    def __init__(self, session: "EgressSession", offer_sdp: str) -> None:
        self.remoteDescription = _RemoteDescription(offer_sdp)
        self._session = session

    @property
    def connectionState(self) -> str:
        return self._session.state.state


class EgressSession:
    """A viewer living in a worker, as the routes and metrics see it."""

    def __init__(self, host: "EgressHost", slot: "_Slot", reply: dict[str, Any], stream: str, owner: str,
                 offer_sdp: str, sync: bool) -> None:
        self.host = host
        self.slot = slot
        self.id: str = reply["id"]
        self.stream_name = stream
        self.owner = owner
        self.sync = sync
        #: The ICE ufrag of our answer: the relay's route to the worker.
        self.ufrag: str | None = None
        self.etag: str = reply["etag"]
        self.sdp_answer: str = reply["sdp"]
        self.answer_note: str = reply["answer_note"]
        self.created: float = reply["created"]
        self.pc = _PcView(self, offer_sdp)
        self.state = SessionState(reply["layer"], False, "new", False, {})
        self.closed = False
        self.close_reason: str | None = None
        self._closing: asyncio.Task | None = None

    @property
    def worker(self) -> int:
        return self.slot.index

    @property
    def layer_name(self) -> str | None:
        return self.state.layer

    def struggling(self) -> bool:
        return self.state.struggling

    def counters(self) -> dict[str, int | float | None]:
        return dict(self.state.counters)

    def info(self) -> SessionInfo:
        st = self.state
        return SessionInfo(self.id, self.stream_name, st.layer, st.pinned, st.state, self.created, dict(st.counters))

    async def add_remote_candidates(self, frag: str) -> None:
        try:
            await self._call("trickle", self.id, frag)
        except SessionGone:
            pass  # it closed meanwhile: candidates for nobody, as in one process

    async def pin(self, layer: str | None) -> None:
        """Pin to a layer name, or ``None`` for automatic selection (a call
        to the worker: await it)."""
        name = await self._call("pin", self.id, layer)
        self.state = dataclasses.replace(self.state, layer=name, pinned=layer is not None)

    async def _call(self, method: str, *args: Any) -> Any:
        link = self.slot.link
        if self.closed or link is None:
            raise SessionGone("session closed")
        try:
            return await link.call(method, *args)
        except ConnectionError:
            raise SessionGone("session closed") from None

    def close_soon(self, reason: str, detail: str = "") -> None:
        if self._closing is None and not self.closed:
            self._closing = asyncio.get_running_loop().create_task(self.close(reason, detail))

    async def close(self, reason: str = "deleted", detail: str = "") -> None:
        if self.closed:
            return
        link = self.slot.link
        if link is not None:
            try:
                await link.call("close", self.id, reason, detail)
            except (ConnectionError, asyncio.TimeoutError):
                pass
        # The worker's "closed" came before its reply; if the worker is gone
        # (or the reply never came) the host ends the proxy itself.
        self.host._session_gone(self, reason, count=False)


@dataclass(slots=True)
class _Sub:
    """One worker's feed of one stream."""

    packetizer: Any
    sessions: int = 0
    #: The callable given to the packetizer (given back to unsubscribe).
    emit: Callable[[Any], None] | None = None


@dataclass(slots=True)
class _Slot:
    index: int
    link: WorkerLink | None = None
    live: bool = False
    started_at: float = 0.0
    delay: float | None = None
    restarts: int = 0
    restarting: asyncio.Task | None = None
    pending: int = 0
    sessions: dict[str, EgressSession] = field(default_factory=dict)
    streams: dict[str, _Sub] = field(default_factory=dict)
    stats: WorkerStats | None = None
    feed_drops_retired: int = 0
    cpu_retired: float = 0.0

    @property
    def load(self) -> int:
        return len(self.sessions) + self.pending


class MergedHistogram:
    """One Prometheus histogram summed over the workers' counts (and what
    dead workers had reached): ``collect()`` as a prometheus Histogram."""

    def __init__(self, host: "EgressHost", name: str, doc: str, which: str, buckets: tuple[float, ...]) -> None:
        self.host = host
        self.name = name
        self.doc = doc
        self.which = which
        self.buckets = buckets

    def counts(self) -> LatencyCounts:
        total = LatencyCounts(self.buckets)
        for counts in self.host._latencies(self.which):
            total.add(counts)
        return total

    def collect(self) -> Iterable[Metric]:
        c = self.counts()
        fam = HistogramMetricFamily(self.name, self.doc)
        fam.add_metric([], c.cumulative(), c.total)
        yield fam


class EgressHost:
    """The WHEP service of a server with egress worker processes."""

    def __init__(self, workers: int, config: WorkerConfig, *,
                 make_worker: Callable[[int, WorkerConfig], WorkerLink] | None = None,
                 make_packetizer: Callable[[Any], Any] | None = None, max_viewers: int = 2000,
                 stop_timeout: float = 5.0, wait_for_ice: bool = False) -> None:
        self.config = config
        self.max_viewers = max_viewers
        self.stop_timeout = stop_timeout
        self._make_worker = make_worker or (lambda i, c: ProcessWorker(i, c, self.relay))
        self._make_packetizer = make_packetizer
        self.slots = [_Slot(i) for i in range(workers)]
        self.sessions: dict[str, EgressSession] = {}
        self.keyframe_handlers: list[Callable[[str], int | None]] = []
        #: Set by the owner like WhepService's: the main process's ICE
        #: socket and ICE-TCP listener, which the workers' viewers share
        #: through :attr:`relay` (made in :meth:`use_ice`).
        self.ice_mux: Any = None
        self.ice_tcp: Any = None
        self.relay: Any = None
        #: Workers are spawned once the ICE side is known (:meth:`use_ice`);
        #: a host without the ICE wait (the unit tests') spawns at once.
        self._ice_known = asyncio.Event()
        if not wait_for_ice:
            self._ice_known.set()
        self.packetizers: dict[str, Any] = {}
        #: What dead workers had reached, so that every counter only goes up.
        self._retired = WorkerStats.empty(config.forwarding_buckets, config.first_byte_buckets)
        #: Sessions the host ended itself (worker_died).
        self._host_closed: dict[str, int] = {}
        self._early_closed: deque[str] = deque(maxlen=_EARLY_CLOSED)
        #: ``first_byte(frame)``: when the frame's first byte came in (the
        #: owner's SRT ingest knows), for the first-byte latency histogram.
        self.first_byte: Callable[[Any], float | None] | None = None
        self._closing = False
        self._tasks: set[asyncio.Task] = set()

    # -- lifecycle --------------------------------------------------------------

    def start(self) -> None:
        """Start every worker (on the running loop; each comes up on its own)."""
        for slot in self.slots:
            slot.restarting = asyncio.get_running_loop().create_task(self._run_slot(slot, 0.0))

    async def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> bool:
        """True once every worker is up (the tests and the benchmark wait)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(s.live for s in self.slots):
                return True
            await asyncio.sleep(0.05)
        return False

    def use_ice(self, mux: Any, ice_tcp: Any) -> None:
        """The main process's started ICE socket and ICE-TCP listener (either
        may be None): workers relay through them; spawning may begin."""
        from media.webrtc.icerelay import IceRelayHub

        self.ice_mux, self.ice_tcp = mux, ice_tcp
        if mux is not None and self.relay is None:
            self.relay = IceRelayHub(mux, ice_tcp)
        self._ice_known.set()

    async def _run_slot(self, slot: _Slot, delay: float) -> None:
        await self._ice_known.wait()
        if delay:
            await asyncio.sleep(delay)
        while not self._closing:
            link = self._make_worker(slot.index, self.config)
            link.on_message = lambda msg, s=slot, lk=link: self._on_message(s, lk, msg)
            link.on_exit = lambda s=slot, lk=link: self._on_exit(s, lk)
            slot.link = link
            slot.started_at = time.monotonic()
            try:
                await link.start()
                if slot.link is not link:
                    raise ConnectionError("it exited as soon as it was ready")
            except (ConnectionError, OSError) as exc:
                event(log, logging.ERROR, "egress.worker_start_failed", worker=slot.index, error=str(exc))
                if slot.link is link:
                    self._retire(slot)
                slot.delay = next_backoff(slot.delay)
                await asyncio.sleep(slot.delay)
                continue
            slot.live = True
            event(log, logging.INFO, "egress.worker_started", worker=slot.index, pid=link.pid)
            break
        slot.restarting = None

    def _on_exit(self, slot: _Slot, link: WorkerLink) -> None:
        if slot.link is not link:
            return
        was_live = slot.live
        lived = time.monotonic() - slot.started_at
        self._retire(slot)
        if self._closing:
            return
        event(log, logging.WARNING, "egress.worker_died", worker=slot.index, pid=link.pid,
              lived_s=round(lived, 1))
        if not was_live:
            return  # _run_slot's own retry loop goes on
        if lived >= BACKOFF_RESET_AFTER_S:
            slot.delay = None
        slot.delay = next_backoff(slot.delay)
        slot.restarts += 1
        slot.restarting = asyncio.get_running_loop().create_task(self._run_slot(slot, slot.delay))

    def _retire(self, slot: _Slot) -> None:
        """The worker is gone: its viewers close (``worker_died``), its feeds
        leave their packetizers, its last figures are kept."""
        link = slot.link
        slot.link = None
        slot.live = False
        for session in list(slot.sessions.values()):
            self._session_gone(session, "worker_died", count=True, release=False)
        for name in list(slot.streams):
            self._unsubscribe(link, name, slot.streams.pop(name))
        if link is not None:
            slot.feed_drops_retired += link.feed_drops
        st = slot.stats
        slot.stats = None
        if st is not None:
            slot.cpu_retired += st.cpu_s
            self._retired.add(st)

    async def close(self) -> None:
        self._closing = True
        for slot in self.slots:
            if slot.restarting is not None:
                slot.restarting.cancel()
        links = [(s, s.link) for s in self.slots if s.link is not None]
        await asyncio.gather(*(link.stop(self.stop_timeout) for _s, link in links), return_exceptions=True)
        for slot, _link in links:
            if slot.link is not None:
                self._retire(slot)
        for p in list(self.packetizers.values()):
            p.close()
        self.packetizers.clear()
        if self.relay is not None:
            self.relay.close()

    # -- messages from the workers ----------------------------------------------

    def _on_message(self, slot: _Slot, link: WorkerLink, msg: tuple) -> None:
        if slot.link is not link:
            return
        kind = msg[0]
        if kind == "stats":
            st: WorkerStats = msg[1]
            slot.stats = st
            for sid, state in st.sessions.items():
                session = slot.sessions.get(sid)
                if session is not None:
                    session.state = state
        elif kind == "closed":
            session = slot.sessions.get(msg[1])
            if session is None:
                self._early_closed.append(msg[1])
            else:
                self._session_gone(session, msg[2], count=False)
        elif kind == "keyframe":
            n = self.on_keyframe_request(msg[1])
            link.send(("keyframe_result", msg[1], n))
        elif kind == "log":
            # The worker's log line, through this process's handlers (format,
            # redaction), tagged with the worker.
            _, level, name, text, fields, exc = msg
            logger = logging.getLogger(name)
            if logger.isEnabledFor(level):
                logger.log(level, text + ("\n" + exc if exc else ""),
                           extra={"fields": {**fields, "worker": slot.index}})

    def on_keyframe_request(self, stream: str) -> int:
        return sum(handler(stream) or 0 for handler in self.keyframe_handlers)

    def _session_gone(self, session: EgressSession, reason: str, *, count: bool, release: bool = True) -> None:
        """A session ended: in its worker (counted there), or here because the
        worker died (``count``: counted here)."""
        if session.closed:
            return
        session.closed = True
        session.close_reason = reason
        slot = session.slot
        if slot.sessions.pop(session.id, None) is not None and release:
            self._release(slot, session.stream_name)
        self.sessions.pop(session.id, None)
        if count:
            self._host_closed[reason] = self._host_closed.get(reason, 0) + 1
        if self.relay is not None and session.ufrag is not None:
            self.relay.unregister(session.ufrag)

    # -- feeds ------------------------------------------------------------------

    def _packetizer(self, stream: Any) -> Any:
        p = self.packetizers.get(stream.name)
        if p is None or p.closed or p.stream is not stream:
            if p is not None and not p.closed:
                p.close()
            p = self._make_packetizer(stream) if self._make_packetizer is not None else self._default_packetizer(
                stream)
            self.packetizers[stream.name] = p
            p.start()
        return p

    def _default_packetizer(self, stream: Any) -> Any:
        from media.webrtc.fanout import StreamPacketizer

        return StreamPacketizer(stream, first_byte=self.first_byte, on_closed=self._on_packetizer_closed)

    def _on_packetizer_closed(self, p: Any) -> None:
        for name, q in list(self.packetizers.items()):
            if q is p:
                del self.packetizers[name]

    async def _subscribe(self, slot: _Slot, link: WorkerLink, stream: Any) -> _Sub:
        """The worker gets the stream's packets from now on (once per worker)."""
        name = stream.name
        sub = slot.streams.get(name)
        p = self._packetizer(stream)
        if sub is not None and sub.packetizer is p:
            sub.sessions += 1
            return sub
        if sub is not None:  # a packetizer of the stream's earlier life
            self._unsubscribe(link, name, sub)
        sub = slot.streams[name] = _Sub(p, 1)
        await link.call("open", name)
        if slot.link is link and slot.streams.get(name) is sub and not p.closed:
            sub.emit = link.feed
            p.subscribe(sub.emit)
        return sub

    def _release(self, slot: _Slot, name: str) -> None:
        sub = slot.streams.get(name)
        if sub is None:
            return
        sub.sessions -= 1
        if sub.sessions > 0:
            return
        del slot.streams[name]
        link = slot.link
        self._unsubscribe(link, name, sub)
        if link is not None:
            # Held until done: the loop keeps only weak references to tasks.
            task = asyncio.get_running_loop().create_task(self._close_stream(link, name))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _close_stream(self, link: WorkerLink, name: str) -> None:
        try:
            await link.call("close_stream", name)
        except (ConnectionError, asyncio.TimeoutError, KeyError):
            pass

    def _unsubscribe(self, link: WorkerLink | None, name: str, sub: _Sub) -> None:
        p = sub.packetizer
        if sub.emit is not None:
            p.unsubscribe(sub.emit)
            sub.emit = None
        if not p.closed and not any(s.streams.get(name) is not None and s.streams[name].packetizer is p
                                    for s in self.slots):
            p.close()  # nobody watches it anywhere
            if self.packetizers.get(name) is p:
                del self.packetizers[name]

    # -- sessions ---------------------------------------------------------------

    def pick(self) -> _Slot | None:
        """The live worker with the fewest viewers (ties: the lowest index)."""
        live = [s for s in self.slots if s.live and s.link is not None]
        return min(live, key=lambda s: (s.load, s.index)) if live else None

    async def create_session(self, stream: Any, offer_sdp: str, offer: Any, *, owner: str, pin: str | None,
                             source_plid: str | None, b_frames: bool, sync: bool = True) -> EgressSession:
        if b_frames:
            raise UnsupportedMedia(
                "the source sends B-frames, which WebRTC cannot play passthrough; encode with "
                "B-frames off (x264: -bf 0 or -tune zerolatency)")
        if len(self.sessions) + sum(s.pending for s in self.slots) >= self.max_viewers:
            raise NoCapacity("viewer limit reached")
        slot = self.pick()
        if slot is None:
            raise NoCapacity("no egress worker is running")
        link = slot.link
        assert link is not None
        slot.pending += 1
        subscribed = False
        try:
            await self._subscribe(slot, link, stream)
            subscribed = True
            reply = await link.call("create", stream.name, offer_sdp, offer, owner, pin, source_plid, b_frames,
                                    sync)
        except (ConnectionError, asyncio.TimeoutError):
            raise NoCapacity("the viewer's egress worker went away; try again") from None
        except BaseException:
            if subscribed and slot.link is link:
                self._release(slot, stream.name)
            raise
        finally:
            slot.pending -= 1
        session = EgressSession(self, slot, reply, stream.name, owner, offer_sdp, sync)
        if slot.link is not link or reply["id"] in self._early_closed:
            # It died meanwhile, or the session ended before we got here.
            session.closed = True
            session.close_reason = "worker_died" if slot.link is not link else "closed"
            if slot.link is link:
                self._release(slot, stream.name)
            return session
        if self.relay is not None:
            # Before the answer reaches the viewer: its first check must
            # find the route (the worker registers it too, at gathering).
            from media.webrtc.icerelay import answer_credentials

            try:
                session.ufrag, pwd = answer_credentials(session.sdp_answer)
                self.relay.register(session.ufrag, pwd, slot.index)
            except (ValueError, KeyError) as exc:
                session.ufrag = None
                await session.close("ice_failed", str(exc))
                if slot.link is link:
                    self._release(slot, stream.name)
                raise NoCapacity(f"cannot route the viewer's ICE: {exc}") from None
        slot.sessions[session.id] = session
        self.sessions[session.id] = session
        return session

    def viewers(self, stream: str) -> list[EgressSession]:
        return [s for s in self.sessions.values() if s.stream_name == stream]

    async def snapshots(self, stream: str) -> list[Any]:
        """Every viewer of ``stream`` as a director sees it, from each worker
        that has some (a worker that cannot answer leaves its viewers out)."""
        slots = [s for s in self.slots if s.link is not None and any(
            v.stream_name == stream for v in s.sessions.values())]
        results = await asyncio.gather(*(s.link.call("snapshots", stream) for s in slots if s.link is not None),
                                       return_exceptions=True)
        return [v for r in results if isinstance(r, list) for v in r]

    # -- figures ----------------------------------------------------------------

    def _live_stats(self) -> list[WorkerStats]:
        return [s.stats for s in self.slots if s.stats is not None]

    def _all_stats(self) -> list[WorkerStats]:
        """The dead workers' sum, then each live worker's last report."""
        return [self._retired, *self._live_stats()]

    def _summed(self, field: str, extra: dict | None = None) -> dict:
        out = dict(extra or {})
        for st in self._all_stats():
            add_counts(out, getattr(st, field))
        return out

    def totals(self) -> tuple[SessionStats, dict[str, int]]:
        total = SessionStats()
        for st in self._all_stats():
            total.add(st.totals)
        return total, self._summed("send_errors")

    @property
    def switches(self) -> dict[tuple[str, str, str], int]:
        return self._summed("switches")

    @property
    def drops(self) -> dict[str, int]:
        return self._summed("drops")

    @property
    def closed_by_reason(self) -> dict[str, int]:
        return self._summed("closed_by_reason", self._host_closed)

    def ice_tcp_figures(self) -> tuple[int, int, int]:
        """The workers' ICE-TCP connections (handed over by the server's
        listener): open now, closed after idling, frames dropped — added to
        the server's own ``returnfeed_webrtc_ice_tcp_*``."""
        every = self._all_stats()
        return (sum(st.ice_tcp_open for st in self._live_stats()),
                sum(st.ice_tcp_idle_closed for st in every),
                sum(st.ice_tcp_frames_dropped for st in every))

    def _latencies(self, which: str) -> list[LatencyCounts]:
        return [getattr(st, which) for st in self._all_stats()]

    def gc_pauses(self) -> list[LatencyCounts]:
        """Every worker's garbage-collector pauses (dead ones' too), summed
        per generation."""
        total = gc_pause_counts()
        for st in self._all_stats():
            for mine, theirs in zip(total, st.gc_pauses):
                mine.add(theirs)
        return total

    def histogram(self, name: str, doc: str, which: str) -> MergedHistogram:
        buckets = self.config.forwarding_buckets if which == "forwarding" else self.config.first_byte_buckets
        return MergedHistogram(self, name, doc, which, buckets)

    def collect_workers(self) -> Iterable[Metric]:
        """``returnfeed_egress_worker_*``: up, restarts, viewers, feed drops, CPU."""
        up = GaugeMetricFamily("returnfeed_egress_worker_up", "1 while the egress worker process runs",
                               labels=["worker"])
        viewers = GaugeMetricFamily("returnfeed_egress_worker_viewers", "WHEP viewers of each egress worker",
                                    labels=["worker"])
        restarts = CounterMetricFamily("returnfeed_egress_worker_restarts", "Egress worker restarts after dying",
                                       labels=["worker"])
        drops = CounterMetricFamily("returnfeed_egress_worker_feed_drops",
                                    "Packet feed events to an egress worker lost (its queue was full or stale; "
                                    "its viewers resync at the next keyframe)", labels=["worker"])
        queued = GaugeMetricFamily("returnfeed_egress_worker_feed_queued_bytes",
                                   "Packet feed bytes waiting for room in an egress worker's socket",
                                   labels=["worker"])
        for s in self.slots:
            label = [str(s.index)]
            up.add_metric(label, 1 if s.live else 0)
            viewers.add_metric(label, len(s.sessions))
            restarts.add_metric(label, s.restarts)
            drops.add_metric(label, s.feed_drops_retired + (s.link.feed_drops if s.link is not None else 0))
            queued.add_metric(label, s.link.feed_queued_bytes if s.link is not None and s.live else 0)
        cpu = CounterMetricFamily("returnfeed_egress_worker_cpu_seconds",
                                  "CPU seconds of each egress worker process (user + system; as of its last "
                                  "report)", labels=["worker"])
        for s in self.slots:
            cpu.add_metric([str(s.index)], s.cpu_retired + (s.stats.cpu_s if s.stats is not None else 0.0))
        yield from (up, viewers, restarts, drops, queued, cpu)
        if self.relay is not None:
            t = self.relay.totals()
            for name, value, doc in (
                    ("returnfeed_webrtc_ice_relay_packets", t.relayed_packets,
                     "Datagrams on the shared ICE port relayed to egress workers"),
                    ("returnfeed_webrtc_ice_relay_dropped", t.dropped_full,
                     "Datagrams for egress workers dropped: their relay socket was full or gone"),
                    ("returnfeed_webrtc_ice_relay_requests", t.requests_sent,
                     "STUN requests of egress workers sent by the server process"),
                    ("returnfeed_webrtc_ice_relay_tcp_handed_off", t.tcp_handed_off,
                     "ICE-TCP connections handed to egress workers"),
                    ("returnfeed_webrtc_ice_direct_packets", sum(st.ice_direct_received for st in self._all_stats()),
                     "Datagrams egress workers received from their viewers on sockets of their own "
                     "(webrtc.ice_direct_to_workers), past the server process"),
                    ("returnfeed_webrtc_ice_direct_refused", sum(st.ice_direct_refused for st in self._all_stats()),
                     "Viewers left on the relay: the route's source address was not the one they checked")):
                fam = CounterMetricFamily(name, doc)
                fam.add_metric([], value)
                yield fam
            direct = GaugeMetricFamily("returnfeed_webrtc_ice_direct_sockets",
                                       "Egress workers' sockets connected to one viewer each on the ICE port")
            direct.add_metric([], sum(st.ice_direct_open for st in self._live_stats()))
            yield direct
