"""An egress worker process: a share of the WHEP viewers on its own loop and GIL.

Issue 15 (DESIGN.md "Scaling out"): with ``webrtc.egress_workers`` > 0 the
server process (server/egress_host.py) packetizes each layer once and hands
the packets to every worker once; a worker owns its viewers' peer
connections, SRTP contexts, rewrite state, layer choice and RTCP. What runs
here is today's :class:`~media.webrtc.whep.WhepService` and
:class:`~media.webrtc.whep.WhepSession`, unchanged, over a
:class:`~media.webrtc.fanout.PacketFanout` per stream fed by a
:class:`~media.webrtc.feed.FeedReceiver` instead of a hub reader.

The sockets reach the process as arguments of the spawned process (their
descriptors are inherited):

* ``control`` (``SOCK_SEQPACKET``): :class:`ControlChannel` carries pickled
  tuples both ways, one message per record, larger ones in fragments.
  From the host: ``("call", id, method, args)`` with the methods of
  :class:`EgressWorker` named in ``_CALLS`` (create, trickle, pin, close,
  open, close_stream, snapshots), ``("keyframe_result", stream, n)`` and
  ``("stop",)``. To the host: ``("ready", pid, ice_port)``,
  ``("reply", id, ok, value)`` (an error is ``(kind, text)``, kind one of
  :data:`ERROR_KINDS`, re-raised there as the same exception the in-process
  service raises, so the HTTP answer is the same), ``("closed", session,
  reason)``, ``("keyframe", stream)``, every ``stats_interval``
  ``("stats", WorkerStats)``, its log records (``("log", …)``: the host
  logs them with the server's handlers, redaction included) and, last,
  ``("stopped",)``.
* ``feed``: the packets (media/webrtc/feed.py), read with ``loop.add_reader``.
* the ICE side (media/webrtc/icerelay.py): the main process's one ICE UDP
  socket (a duplicate: DTLS, STUN answers and SRTP leave from it directly)
  and the relay socket that brings this worker's datagrams from main,
  served by a :class:`~media.webrtc.icerelay.RelayedIceMux`; with
  ``webrtc.ice_mux`` off there is none and aioice opens a socket per session
  (the same fallback as in one process).

The worker exits when the control socket ends (the host closed it or died)
or its parent process is gone: a killed server leaves no orphan behind.
``("stop",)`` is the ordered way: sessions closed, the last stats sent,
then the reply.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import signal
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import NoCapacity, SessionGone, UnsupportedMedia
from ..histogram import GcPauses, LatencyCounts, gc_pause_counts
from ..log import event
from ..procs import freeze_startup_heap
from ..rtp.layers import LayerPolicy
from .sdp import Offer, SdpError
from .viewer import SessionStats

log = logging.getLogger("returnfeed.egress")

__all__ = ["ControlChannel", "ERROR_KINDS", "EgressWorker", "LatencyCounts", "SessionState", "WorkerConfig",
           "WorkerStats", "error_from_reply", "worker_main"]

#: One control record at most this big; a larger message goes in fragments
#: (a ``SOCK_SEQPACKET`` record must fit the socket's send buffer whole).
RECORD_BYTES = 60000
_MORE, _LAST = b"\x01", b"\x00"

#: Errors a call may end with, re-raised by the host as the same type (what
#: server/whep.py maps to HTTP: SdpError/UnsupportedMedia 422, NoCapacity
#: 503, ValueError 400, SessionGone and any other KeyError 404).
ERROR_KINDS: dict[str, type[BaseException]] = {
    "SdpError": SdpError, "UnsupportedMedia": UnsupportedMedia, "NoCapacity": NoCapacity,
    "ValueError": ValueError, "SessionGone": SessionGone, "KeyError": KeyError, "IndexError": IndexError,
}


def error_from_reply(value: Any) -> BaseException:
    """The exception a failed call's ``(kind, text)`` stands for."""
    kind, text = value
    cls = ERROR_KINDS.get(kind, RuntimeError)
    return cls(text)


class ControlChannel:
    """Pickled tuples over a non-blocking ``SOCK_SEQPACKET`` socket, on the
    running loop.

    Sends never wait: what the socket does not take is queued (and sent when
    it is writable) up to ``max_queued`` bytes; past that the peer is not
    reading (hung), and the channel ends as if the peer had gone — the host
    restarts such a worker, a worker exits. ``droppable`` messages (the
    periodic stats: the next one supersedes) are skipped while anything is
    queued."""

    def __init__(self, sock: socket.socket, on_message: Callable[[tuple], None], on_eof: Callable[[], None], *,
                 max_queued: int = 16 << 20) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._on_message = on_message
        self._on_eof = on_eof
        self.max_queued = max_queued
        self._out: deque[bytes] = deque()
        self._queued = 0
        self._parts: list[bytes] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writing = False
        self.closed = False
        self.dropped = 0

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.sock.fileno(), self._readable)

    @property
    def queued_bytes(self) -> int:
        return self._queued

    def send(self, msg: tuple, *, droppable: bool = False) -> bool:
        if self.closed:
            return False
        if droppable and self._out:
            self.dropped += 1
            return False
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        records = [(_MORE if i + RECORD_BYTES < len(data) else _LAST) + data[i:i + RECORD_BYTES]
                   for i in range(0, max(len(data), 1), RECORD_BYTES)]
        for rec in records:
            self._out.append(rec)
            self._queued += len(rec)
        if self._queued > self.max_queued:
            self._fail()
            return False
        self._flush()
        return not self.closed

    def _flush(self) -> None:
        out = self._out
        try:
            while out:
                self.sock.send(out[0])
                self._queued -= len(out.popleft())
        except BlockingIOError:
            pass
        except OSError:
            self._fail()
            return
        want = bool(out)
        if want != self._writing and self._loop is not None and not self.closed:
            if want:
                self._loop.add_writer(self.sock.fileno(), self._flush)
            else:
                self._loop.remove_writer(self.sock.fileno())
            self._writing = want

    def _readable(self) -> None:
        # A bounded batch per wake-up: the loop's other work is not starved.
        for _ in range(256):
            try:
                rec = self.sock.recv(RECORD_BYTES + 1)
            except BlockingIOError:
                return
            except OSError:
                self._fail()
                return
            if not rec:
                self._fail()
                return
            self._parts.append(rec[1:])
            if rec[:1] == _MORE:
                if sum(len(p) for p in self._parts) > self.max_queued:
                    self._fail()
                    return
                continue
            data = b"".join(self._parts)
            self._parts = []
            try:
                msg = pickle.loads(data)
            except Exception:  # a peer of our own making: a broken record means a broken peer
                self._fail()
                return
            self._on_message(msg)
            if self.closed:
                return

    def _fail(self) -> None:
        if self.closed:
            return
        self.close()
        self._on_eof()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._loop is not None:
            self._loop.remove_reader(self.sock.fileno())
            if self._writing:
                self._loop.remove_writer(self.sock.fileno())
        self._out.clear()
        self._queued = 0
        self.sock.close()


@dataclass(slots=True)
class SessionState:
    """What the host shows of one viewer between two stats messages."""

    layer: str | None
    pinned: bool
    state: str
    struggling: bool
    counters: dict[str, int | float | None]


@dataclass(slots=True)
class WorkerStats:
    sessions: dict[str, SessionState]
    totals: SessionStats
    send_errors: dict[str, int]
    switches: dict[tuple[str, str, str], int]
    drops: dict[str, int]
    closed_by_reason: dict[str, int]
    forwarding: LatencyCounts
    first_byte: LatencyCounts
    feed_events: int = 0
    feed_errors: int = 0
    control_dropped: int = 0
    #: CPU seconds of the worker process (user + system, all threads).
    cpu_s: float = 0.0
    #: The worker's ICE-TCP listener (the connections main handed over):
    #: open now, and its idle-closed / dropped-frame counters.
    ice_tcp_open: int = 0
    ice_tcp_idle_closed: int = 0
    ice_tcp_frames_dropped: int = 0
    #: Viewers' sockets on the shared ICE port (RelayedIceMux.receive_direct):
    #: open now, the datagrams they received, the viewers left on the relay.
    ice_direct_open: int = 0
    ice_direct_received: int = 0
    ice_direct_refused: int = 0
    #: The worker's garbage-collector pauses, per generation (0, 1, 2).
    gc_pauses: list[LatencyCounts] = field(default_factory=gc_pause_counts)

    @classmethod
    def empty(cls, forwarding_buckets: tuple[float, ...], first_byte_buckets: tuple[float, ...]) -> "WorkerStats":
        return cls({}, SessionStats(), {}, {}, {}, {}, LatencyCounts(forwarding_buckets),
                   LatencyCounts(first_byte_buckets))

    def add(self, other: "WorkerStats") -> None:
        """Add ``other``'s counters to these (the host keeps dead workers'
        last figures this way, so that every ``_total`` only goes up). The
        gauges — ``sessions``, ``ice_tcp_open``, ``ice_direct_open`` — are not summed."""
        self.totals.add(other.totals)
        for mine, theirs in ((self.send_errors, other.send_errors), (self.switches, other.switches),
                             (self.drops, other.drops), (self.closed_by_reason, other.closed_by_reason)):
            add_counts(mine, theirs)
        self.forwarding.add(other.forwarding)
        self.first_byte.add(other.first_byte)
        self.feed_events += other.feed_events
        self.feed_errors += other.feed_errors
        self.control_dropped += other.control_dropped
        self.cpu_s += other.cpu_s
        self.ice_tcp_idle_closed += other.ice_tcp_idle_closed
        self.ice_tcp_frames_dropped += other.ice_tcp_frames_dropped
        self.ice_direct_received += other.ice_direct_received
        self.ice_direct_refused += other.ice_direct_refused
        for mine, theirs in zip(self.gc_pauses, other.gc_pauses):
            mine.add(theirs)


def add_counts(into: dict, other: dict) -> None:
    """``into[k] += other[k]`` for every key of ``other``."""
    for k, n in other.items():
        into[k] = into.get(k, 0) + n


#: The forwarding-latency histograms' buckets (s): frame complete at ingest,
#: and its first byte in, to its last packet sent to every viewer — one set
#: for the server process's own histograms and the workers' counts.
FORWARDING_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
FIRST_BYTE_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.1, 0.2)


@dataclass(slots=True)
class WorkerConfig:
    """Everything a worker needs, picklable (media never reads server settings)."""

    index: int
    ice_servers: list[dict[str, Any]] = field(default_factory=list)
    max_viewers: int = 2000
    backlog_limit: int = 512 * 1024
    send_failure_timeout: float = 5.0
    connect_timeout: float = 15.0
    layer_policy: LayerPolicy = field(default_factory=LayerPolicy)
    rtx_share: float = 0.25
    rtx_playout_allowance: float = 0.5
    c_fastpath: bool = True
    c_fanout: bool = True
    stats_interval: float = 0.5
    forwarding_buckets: tuple[float, ...] = FORWARDING_BUCKETS
    first_byte_buckets: tuple[float, ...] = FIRST_BYTE_BUCKETS
    log_level: int = logging.INFO


@dataclass(slots=True)
class _StreamRef:
    """What the worker's WhepService takes for a hub Stream: only the name
    is used once the fan-out is not made from the Stream."""

    name: str


def _make_service(config: WorkerConfig, worker: "EgressWorker") -> Any:
    from .whep import WhepService

    class WorkerWhepService(WhepService):
        """Today's service, with fan-outs fed from the host's packets: one
        :class:`PacketFanout` per stream the host opened here, kept until
        the host closes it (``close_stream``), not when the last viewer
        leaves — the host decides when this worker stops getting a
        stream's packets."""

        def fanout(self, stream: Any) -> Any:
            fo = self.fanouts.get(stream.name)
            if fo is None or fo.closed:
                fo = worker.open_stream(stream.name)
            return fo

        def session_ended(self, session: Any) -> None:
            # The base class closes a stream's fan-out with its last viewer;
            # here the host does that (it also stops the stream's feed).
            fo = self.fanouts.pop(session.stream_name, None)
            try:
                super().session_ended(session)
            finally:
                if fo is not None and not fo.closed:
                    self.fanouts[session.stream_name] = fo
            worker.session_closed(session)

    svc = WorkerWhepService(
        ice_servers=config.ice_servers, max_viewers=config.max_viewers, backlog_limit=config.backlog_limit,
        send_failure_timeout=config.send_failure_timeout, connect_timeout=config.connect_timeout,
        layer_policy=config.layer_policy, rtx_share=config.rtx_share,
        rtx_playout_allowance=config.rtx_playout_allowance, c_fastpath=config.c_fastpath,
        c_fanout=config.c_fanout, on_keyframe_request=worker.request_keyframe,
        on_frame_sent=worker.frame_sent)
    return svc


class EgressWorker:
    """The worker's state on its loop: the service, the channel, the feed."""

    _CALLS = ("create", "trickle", "pin", "close", "open", "close_stream", "snapshots")

    def __init__(self, config: WorkerConfig, control: socket.socket, feed: socket.socket,
                 parent_pid: int | None, relay: tuple[Any, socket.socket, socket.socket] | None = None) -> None:
        self.config = config
        #: (RelayHandoff, relay socket, the shared UDP socket), or None.
        self._relay = relay
        self.parent_pid = parent_pid
        self.control = ControlChannel(control, self._on_message, self._on_eof)
        self._feed_sock = feed
        self.feed: Any = None
        self.service = _make_service(config, self)
        self.ice_mux: Any = None
        self.forwarding = LatencyCounts(config.forwarding_buckets)
        self.first_byte = LatencyCounts(config.first_byte_buckets)
        #: Installed by worker_main (a callback on the process's collector).
        self.gc_pauses = GcPauses()
        #: The last answer of the host to a keyframe request per stream: how
        #: many requests it really sent upstream. A fan-out asks before
        #: deciding how to start a joining viewer and needs the answer at
        #: once; the last one is the best guess (a source that could be asked
        #: before can be asked now).
        self._keyframe_results: dict[str, int] = {}
        self.feed_events = 0
        self._done = asyncio.Event()
        self._stats_timer: asyncio.TimerHandle | None = None
        self._stopping = False
        self._tasks: set[asyncio.Task] = set()

    # -- lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        from .feed import FeedReceiver

        if self._relay is not None:
            from .icerelay import RelayedIceMux

            handoff, relay_sock, udp_sock = self._relay
            self.ice_mux = RelayedIceMux(handoff, relay_sock, udp_sock)
            self.ice_mux.on_main_lost = self._done.set  # nothing reaches our viewers any more
            await self.ice_mux.start()
            self.service.ice_mux = self.ice_mux
        self.feed = FeedReceiver(self._feed_sock, self._on_feed)
        self.feed.start()
        self.service.start()
        self.control.start()
        self.control.send(("ready", os.getpid(), self.ice_mux.port if self.ice_mux is not None else None))
        self._arm_stats()

    async def run(self) -> None:
        await self.start()
        await self._done.wait()
        await self._shutdown()

    async def _shutdown(self) -> None:
        if self._stats_timer is not None:
            self._stats_timer.cancel()
        await self.service.close()
        if self.feed is not None:
            self.feed.close()
        self._feed_sock.close()
        if self.ice_mux is not None:
            await self.ice_mux.close()

    def _on_eof(self) -> None:
        self._done.set()

    # -- control ------------------------------------------------------------------

    def _on_message(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "call":
            _, call_id, method, args = msg
            self._spawn(self._call(call_id, method, args))
        elif kind == "keyframe_result":
            self._keyframe_results[msg[1]] = msg[2]
        elif kind == "stop":
            self._spawn(self._stop())

    def _spawn(self, coro: Any) -> None:
        # The loop keeps only weak references to tasks: hold each until done.
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _call(self, call_id: int, method: str, args: tuple) -> None:
        try:
            if method not in self._CALLS:
                raise ValueError(f"unknown call {method!r}")
            value = await getattr(self, "call_" + method)(*args)
        except Exception as exc:
            kind = type(exc).__name__
            if kind not in ERROR_KINDS:
                event(log, logging.WARNING, "egress.call_failed", method=method, error=repr(exc))
            self.control.send(("reply", call_id, False, (kind if kind in ERROR_KINDS else "RuntimeError",
                                                         str(exc.args[0]) if exc.args else kind)))
            return
        self.control.send(("reply", call_id, True, value))

    async def _stop(self) -> None:
        """Ordered: no new work, every session closed (their reasons go to
        the host), the last stats, then the channel closes."""
        if self._stopping:
            return
        self._stopping = True
        if self._stats_timer is not None:
            self._stats_timer.cancel()
            self._stats_timer = None
        await self.service.close()
        self.control.send(("stats", self.stats()))
        self.control.send(("stopped",))
        self._done.set()

    async def call_open(self, stream: str) -> bool:
        self.open_stream(stream)
        return True

    async def call_close_stream(self, stream: str) -> bool:
        fo = self.service.fanouts.pop(stream, None)
        if fo is not None:
            fo.close()  # its viewers (there should be none) hear stream_ended
        return fo is not None

    async def call_create(self, stream: str, offer_sdp: str, offer: Offer, owner: str, pin: str | None,
                          source_plid: str | None, b_frames: bool, sync: bool) -> dict[str, Any]:
        if self._stopping:
            raise NoCapacity("the egress worker is stopping")
        session = await self.service.create_session(_StreamRef(stream), offer_sdp, offer, owner=owner, pin=pin,
                                                    source_plid=source_plid, b_frames=b_frames, sync=sync)
        return {"id": session.id, "sdp": session.sdp_answer, "etag": session.etag,
                "answer_note": session.answer_note, "layer": session.layer_name, "created": session.created}

    def _session(self, sid: str) -> Any:
        session = self.service.sessions.get(sid)
        if session is None:
            raise SessionGone("no such session")
        return session

    async def call_trickle(self, sid: str, frag: str) -> bool:
        await self._session(sid).add_remote_candidates(frag)
        return True

    async def call_pin(self, sid: str, layer: str | None) -> str | None:
        session = self._session(sid)
        await session.pin(layer)
        return session.layer_name

    async def call_close(self, sid: str, reason: str, detail: str) -> bool:
        session = self.service.sessions.get(sid)
        if session is None:
            return False
        await session.close(reason, detail)
        return True

    async def call_snapshots(self, stream: str) -> list[Any]:
        return await self.service.snapshots(stream)

    # -- the service's callbacks --------------------------------------------------

    def open_stream(self, name: str) -> Any:
        from .fanout import PacketFanout

        fo = self.service.fanouts.get(name)
        if fo is None or fo.closed:
            fo = PacketFanout(name, on_frame_sent=self.frame_sent, request_keyframe=self.request_keyframe,
                              on_closed=self._on_fanout_closed)
            self.service.fanouts[name] = fo
        return fo

    def _on_fanout_closed(self, fanout: Any) -> None:
        for name, fo in list(self.service.fanouts.items()):
            if fo is fanout:
                del self.service.fanouts[name]
        self.service.free_unconnected(time.monotonic())

    def _on_feed(self, ev: Any) -> None:
        self.feed_events += 1
        fo = self.service.fanouts.get(ev.stream)
        if fo is not None:
            fo.handle(ev)

    def session_closed(self, session: Any) -> None:
        self.control.send(("closed", session.id, session.close_reason or "deleted"))

    def request_keyframe(self, stream: str) -> int:
        self.control.send(("keyframe", stream))
        return self._keyframe_results.get(stream, 0)

    def frame_sent(self, ev: Any, now: float) -> None:
        self.forwarding.observe(max(0.0, now - ev.arrival))
        if getattr(ev, "first_byte", None) is not None:
            self.first_byte.observe(max(0.0, now - ev.first_byte))

    # -- stats ----------------------------------------------------------------------

    def stats(self) -> WorkerStats:
        svc = self.service
        sessions = {}
        for sid, s in list(svc.sessions.items()):
            sessions[sid] = SessionState(s.layer_name, s.core.pinned, s.pc.connectionState, s.struggling(),
                                         s.counters())
        totals, errors = svc.totals()
        tcp = getattr(self.ice_mux, "ice_tcp", None)
        relay = getattr(self.ice_mux, "relay_stats", None)
        return WorkerStats(sessions=sessions, totals=totals, send_errors=errors, switches=dict(svc.switches),
                           drops=dict(svc.drops), closed_by_reason=dict(svc.closed_by_reason),
                           forwarding=self.forwarding, first_byte=self.first_byte, feed_events=self.feed_events,
                           feed_errors=self.feed.errors if self.feed is not None else 0,
                           control_dropped=self.control.dropped,
                           cpu_s=time.process_time(),
                           ice_tcp_open=tcp.open_connections if tcp is not None else 0,
                           ice_tcp_idle_closed=tcp.stats.idle_closed if tcp is not None else 0,
                           ice_tcp_frames_dropped=tcp.stats.frames_dropped if tcp is not None else 0,
                           ice_direct_open=getattr(self.ice_mux, "direct_open", 0),
                           ice_direct_received=relay.direct_received if relay is not None else 0,
                           ice_direct_refused=relay.direct_refused if relay is not None else 0,
                           gc_pauses=self.gc_pauses.snapshot())

    def _arm_stats(self) -> None:
        self._stats_timer = asyncio.get_running_loop().call_later(self.config.stats_interval, self._on_stats)

    def _on_stats(self) -> None:
        self._stats_timer = None
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            self._done.set()  # the server is gone: so are we
            return
        self.control.send(("stats", self.stats()), droppable=True)
        self._arm_stats()


class _ControlLogHandler(logging.Handler):
    """The worker's log records go to the host, which logs them with the
    server's own handlers (its format, JSON or text, and its redaction of
    tokens), tagged with the worker: ``("log", level, logger, event,
    fields, exception text)``. Dropped while the channel is backed up."""

    def __init__(self, control: ControlChannel) -> None:
        super().__init__()
        self.control = control

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = getattr(record, "fields", None)
            plain = {str(k): v if isinstance(v, (str, int, float, bool, type(None))) else str(v)
                     for k, v in (fields.items() if isinstance(fields, dict) else ())}
            exc = logging.Formatter().formatException(record.exc_info) if record.exc_info else None
            self.control.send(("log", record.levelno, record.name, record.getMessage(), plain, exc),
                              droppable=True)
        except Exception:  # logging must never take the worker down
            self.handleError(record)


def worker_main(config: WorkerConfig, control: socket.socket, feed: socket.socket,
                parent_pid: int | None = None, relay: tuple[Any, socket.socket, socket.socket] | None = None) -> None:
    """The process entry point (multiprocessing, spawn context)."""
    logging.getLogger().setLevel(config.log_level)
    # Ctrl-C, or a service manager's SIGTERM, reaches the whole process
    # group: the server orders our stop (its sessions closed in order), and
    # if it is gone the control socket's end stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        import uvloop

        runner: Callable[[Any], Any] = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a pinned dependency on Linux
        runner = asyncio.run

    async def main() -> None:
        worker = EgressWorker(config, control, feed, parent_pid, relay)
        logging.getLogger().addHandler(_ControlLogHandler(worker.control))
        event(log, logging.INFO, "egress.heap_frozen", objects=freeze_startup_heap())
        worker.gc_pauses.install()
        await worker.run()

    runner(main())
