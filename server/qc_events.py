"""Live QC events: markers, meters and tap state to ``/ws/events`` and PostgreSQL.

The QC tap (``server.qc_service``) calls three methods on the event loop;
none of them blocks or awaits:

* :meth:`QcEvents.marker` — a marker opened, changed or closed;
* :meth:`QcEvents.meters` — a tile's loudness and peak read-out (≤ 10 Hz);
* :meth:`QcEvents.tap_state` — the tap of a stream started, failed, stopped.

The caption service (``server.caption_service``) calls
:meth:`QcEvents.caption` (a partial or committed caption: partials at most
``caption_partial_hz`` a second per stream, the newest winning; never
stored here — the service stores the finals) and
:meth:`QcEvents.caption_state`, on the event loop too.

Every marker event goes out at once to the WebSocket clients allowed to see
its stream, and is queued for storage: one bounded queue, one writer task
(:class:`server.batch_writer.BatchWriter`, as for tally and captions). While the database is away the queue
holds the writes in order (a database outage only delays storage); beyond
``queue_max`` the oldest write is dropped and counted. The writer keeps
each marker's row id on the live marker, so a close stored after its open
updates that row, and a close whose open was dropped inserts the whole
marker::

    tap ──marker()──▶ broadcast (per-connection bounded queues) ──▶ /ws/events
             └──────▶ pending (bounded deque) ──writer task──▶ markers table
                                                     └─ marker.stored {live_id, id}

Clients (DESIGN "Interfaces", scoped like ``/ws/tally``): a signed link sees
only its own stream; a user sees the streams of the productions where they
are a director (an admin: every stream). Each connection has its own ``seq``
(1, 2, 3, … over every message it receives) and a bounded send queue; a
client that cannot keep up is closed with 4000 "too slow" and never delays
anybody else. Heartbeats as on ``/ws/tally``: a JSON ``ping`` (browsers
cannot see protocol pings) and an RFC 6455 Ping (§5.5.2: the peer "MUST
send a Pong frame in response"); any frame from the client is a sign of
life, and one silent for ``missing_after`` seconds is closed with 4001.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from live_qc.captions.types import Caption
from live_qc.engine import Meters
from live_qc.markers import MarkerEvent
from tally.hub import aiohttp_transport

from . import repo
from .batch_writer import BatchWriter
from .log import event

log = logging.getLogger("returnfeed.qc")

# RFC 6455 §7.4.2: 4000-4999 are the application's; the same codes as /ws/tally.
CLOSE_GOING_AWAY = 1001
CLOSE_TOO_SLOW = 4000
CLOSE_HEARTBEAT_TIMEOUT = 4001

#: Messages queued for one connection before it counts as too slow.
SEND_QUEUE_MAX = 512
#: Meters per stream are forwarded at most this often (issue 12: ≤ 10 Hz).
METERS_MIN_INTERVAL = 0.1
#: Partial captions per stream per second at most (``[captions] partial_hz``).
CAPTION_PARTIAL_HZ = 4.0
#: Streams one ``subscribe`` message may name.
MAX_SUBSCRIBE = 64
#: Writes handed to the database in one transaction.
BATCH_MAX = 200
#: Tries of one batch while the database answers but the write keeps failing.
PERSIST_ATTEMPTS = 20
CLOSE_TIMEOUT = 5.0
#: Seconds a closed client's socket may take to flush its close frame before
#: it is aborted (a peer that stopped reading never takes it).
ABORT_AFTER = 2.0
_PING = object()  # sentinel in a send queue: send an RFC 6455 Ping frame


def _ts(unix: float | None) -> datetime | None:
    return None if unix is None else datetime.fromtimestamp(unix, timezone.utc)


#: The markers table's CHECK (0001_initial.sql).
SEVERITIES = ("info", "warning", "error", "critical")


def json_safe(value: Any, depth: int = 0) -> Any:
    """Detector metadata as JSON both PostgreSQL's jsonb and browsers accept:
    numpy scalars become numbers, NaN/±inf become null (RFC 8259 §6 has no
    such numbers; one would make PostgreSQL refuse the whole batch), keys
    become strings, anything else its text."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        return json_safe(value.item(), depth)  # numpy scalar
    if depth > 8:
        return str(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or hasattr(value, "tolist"):
        items = value.tolist() if hasattr(value, "tolist") else value
        return [json_safe(v, depth + 1) for v in items]
    return str(value)


def _finite(x: Any, default: float | None) -> float | None:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return default
    return f if math.isfinite(f) else default


def _num(x: float | None) -> float | None:
    """JSON has no infinities: a meter at digital silence reads ``null``."""
    return None if x is None or not math.isfinite(x) else round(float(x), 2)


async def _finish(task: asyncio.Task, timeout: float) -> None:
    """Let ``task`` end for ``timeout`` seconds, then cancel it and wait for
    it. Its own outcome is consumed; a cancellation of the caller is not."""
    if not task.done():
        await asyncio.wait({task}, timeout=timeout)
    if not task.done():
        task.cancel()
        await asyncio.wait({task})
    if not task.cancelled():
        task.exception()


@dataclass(slots=True)
class LiveMarker:
    """One marker as this process knows it; ``id`` is the row's once stored."""

    live_id: int
    stream: str
    stream_id: int
    production_id: int
    type: str
    subtype: str
    severity: str
    confidence: float
    media_start: float
    media_end: float | None
    wall_start: float
    wall_end: float | None
    metadata: dict[str, Any]
    id: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "live_id": self.live_id, "stream": self.stream, "kind": self.type,
            "subtype": self.subtype, "severity": self.severity, "confidence": round(self.confidence, 3),
            "start": self.media_start, "end": self.media_end,
            "wall_start": self.wall_start, "wall_end": self.wall_end, "metadata": self.metadata,
        }

    def row(self) -> dict[str, Any]:
        return {"type": self.type, "subtype": self.subtype, "severity": self.severity,
                "confidence": self.confidence, "media_start": self.media_start,
                "media_end": self.media_end, "wall_start": _ts(self.wall_start), "wall_end": _ts(self.wall_end),
                "metadata": self.metadata}


@dataclass(slots=True)
class _Write:
    kind: str  # "open" | "update" | "close"
    marker: LiveMarker
    row: dict[str, Any]  # the marker's fields as of this event


@dataclass(slots=True, eq=False)
class EventsClient:
    ws: Any
    who: str
    #: A signed link's stream: the only one this client sees.
    link_stream: str | None
    user_id: int | None
    admin: bool
    last_seen: float
    queue: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(SEND_QUEUE_MAX))
    seq: int = 0
    subscribed: set[str] = field(default_factory=set)
    closed: str | None = None
    sender: asyncio.Task | None = None


class QcEvents:
    def __init__(self, db: Any, directory: Any, *, queue_max: int = 10_000, heartbeat_interval: float = 1.0,
                 missing_after: float = 10.0) -> None:
        self.db = db
        self.directory = directory
        # Marker writes: one bounded, batched, retrying writer task.
        self._writes: BatchWriter[_Write] = BatchWriter(
            db, self._write, name="qc-marker", queue_max=queue_max, logger=log, batch_max=BATCH_MAX,
            attempts=PERSIST_ATTEMPTS, on_written=self._written, log_prefix="qc.marker_")
        self.heartbeat_interval = heartbeat_interval
        self.missing_after = missing_after
        self.clients: set[EventsClient] = set()
        #: Open markers by (stream, type, subtype): one tracker per fault kind
        #: per stream (live_qc.markers.FaultTracker) has at most one open.
        self.open: dict[tuple[str, str, str], LiveMarker] = {}
        self.taps: dict[str, dict[str, str]] = {}
        self._heartbeat: asyncio.Task | None = None
        self._next_live_id = 0
        self._meters_sent: dict[str, float] = {}
        self._closing = False
        # Counters for /metrics and the tests (the writes' are the writer's).
        self.slow_clients = 0
        self.unknown_stream = 0
        # Live captions (issue 13): partials per stream at most this often;
        # the newest partial held back is sent when its turn comes.
        self.caption_partial_hz = CAPTION_PARTIAL_HZ
        self._partial_sent: dict[str, float] = {}
        self._partial_held: dict[str, dict[str, Any]] = {}

    # -- the tap's interface (event loop; never blocks) ---------------------------
    def marker(self, stream: str, ev: MarkerEvent, *, wall_start: float, wall_end: float | None) -> None:
        m = ev.marker
        key = (stream, m.type, m.subtype)
        live = self.open.get(key)
        if live is None:
            if ev.kind != "open" and ev.kind != "close":
                return  # an update of a marker this process never saw open
            entry = self.directory.stream(stream)
            if entry is None:
                self.unknown_stream += 1
                return
            self._next_live_id += 1
            live = LiveMarker(self._next_live_id, stream, entry.id, entry.production_id, m.type, m.subtype,
                              "warning", 1.0, 0.0, None, wall_start, wall_end, {})
            kind = "open"
        else:
            kind = ev.kind
            if kind == "open":
                kind = "update"  # a repeated open of the same fault: the marker is already out
        live.severity = m.severity if m.severity in SEVERITIES else "warning"
        live.confidence = min(max(_finite(m.confidence, 1.0) or 0.0, 0.0), 1.0)
        live.media_start = _finite(m.start, live.media_start) or 0.0
        live.media_end = _finite(m.end, None)
        live.wall_start, live.wall_end = wall_start, wall_end
        live.metadata.update(json_safe(dict(m.metadata)))  # the tracker only adds to it
        if ev.kind == "close":
            self.open.pop(key, None)
            if kind == "open":  # open and close in one go: both go out, in order
                self._broadcast_marker("open", live)
                self._store("open", live)
            kind = "close"
        else:
            self.open[key] = live
        self._broadcast_marker(kind, live)
        self._store(kind, live)

    def meters(self, stream: str, meters: Meters) -> None:
        now = time.monotonic()
        if now - self._meters_sent.get(stream, -math.inf) < METERS_MIN_INTERVAL - 1e-3:
            return
        self._meters_sent[stream] = now
        msg = {"type": "meters", "stream": stream, "t": round(meters.t, 3), "momentary": _num(meters.momentary),
               "short_term": _num(meters.short_term), "peaks_dbfs": [_num(p) for p in meters.peaks_dbfs]}
        for c in list(self.clients):
            if stream in c.subscribed and self.allowed(c, stream):
                self._send(c, msg)

    def tap_state(self, stream: str, state: str, detail: str = "") -> None:
        self.taps[stream] = {"state": state, "detail": detail}
        self._broadcast(stream, {"type": "tap", "stream": stream, "state": state, "detail": detail})

    def caption(self, stream: str, cap: Caption, *, wall_start: float, wall_end: float) -> None:
        """A caption to everyone allowed to see ``stream``. A final goes out
        at once and supersedes a partial held back; partials go out at most
        ``caption_partial_hz`` times a second per stream, the newest winning
        (an overlay shows the latest hypothesis, never a queue of stale ones)."""
        entry = self.directory.stream(stream)
        msg = {"type": "caption", **cap.to_json(), "stream": stream, "label": entry.label if entry else stream,
               "wall_start": round(wall_start, 3), "wall_end": round(wall_end, 3)}
        if cap.final:
            self._partial_held.pop(stream, None)
            self._broadcast(stream, msg)
            return
        now = time.monotonic()
        due = self._partial_sent.get(stream, -math.inf) + 1.0 / self.caption_partial_hz
        if now >= due - 1e-3:
            self._partial_sent[stream] = now
            self._broadcast(stream, msg)
            return
        if stream not in self._partial_held:
            asyncio.get_running_loop().call_later(due - now, self._release_partial, stream)
        self._partial_held[stream] = msg

    def _release_partial(self, stream: str) -> None:
        msg = self._partial_held.pop(stream, None)
        if msg is not None and not self._closing:
            self._partial_sent[stream] = time.monotonic()
            self._broadcast(stream, msg)

    def caption_state(self, stream: str, state: str, detail: str = "") -> None:
        self._broadcast(stream, {"type": "caption.state", "stream": stream, "state": state, "detail": detail})

    # -- what the REST routes announce ------------------------------------------
    def flagged(self, stream: str, row: dict[str, Any]) -> None:
        self._broadcast(stream, {"type": "marker.flag", **row})

    def noted(self, stream: str, note: dict[str, Any]) -> None:
        self._broadcast(stream, {"type": "note", **note})

    # -- connections ----------------------------------------------------------------
    def allowed(self, c: EventsClient, stream: str) -> bool:
        entry = self.directory.stream(stream)
        if entry is None:
            return False
        if c.link_stream is not None:
            return stream == c.link_stream
        if c.admin:
            return True
        return c.user_id is not None and self.directory.member_role(entry.production_id, c.user_id) == "director"

    def connect(self, ws: Any, *, who: str, link_stream: str | None, user_id: int | None,
                admin: bool) -> EventsClient:
        c = EventsClient(ws, who, link_stream, user_id, admin, time.monotonic())
        self.clients.add(c)
        self._send(c, {"type": "snapshot",
                       "markers": [m.to_json() for m in self.open.values() if self.allowed(c, m.stream)],
                       "taps": {s: t for s, t in self.taps.items() if self.allowed(c, s)}})
        return c

    def kick(self, c: EventsClient, code: int, reason: str) -> None:
        if c.closed is not None:
            return
        c.closed = reason
        self.clients.discard(c)
        # Nothing queued behind a close: empty the queue, then ask the
        # sender to close (it may be blocked on a slow socket; the handler
        # closes the socket when it ends anyway).
        while not c.queue.empty():
            c.queue.get_nowait()
        c.queue.put_nowait((code, reason))
        asyncio.get_running_loop().call_later(ABORT_AFTER, self._force, c)

    @staticmethod
    def _force(c: EventsClient) -> None:
        """The close did not get out in time: drop the connection under it."""
        if c.ws.closed:
            return
        if c.sender is not None:
            c.sender.cancel()
        try:
            aiohttp_transport(c.ws).abort()
        except Exception:  # not an aiohttp socket, or already gone
            pass

    async def serve(self, c: EventsClient) -> None:
        """Run one connection: its sender, and its reader until it ends."""
        from aiohttp import WSMsgType

        ws = c.ws
        sender = c.sender = asyncio.get_running_loop().create_task(self._sender(c), name=f"events-send-{c.who}")
        try:
            async for msg in ws:
                c.last_seen = time.monotonic()
                if msg.type == WSMsgType.TEXT:
                    self._receive(c, msg.data)
                elif msg.type == WSMsgType.PING:
                    await ws.pong(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    self._error(c, "bad_message", "messages are JSON text")
                elif msg.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
                    break
                if c.closed is not None:
                    break
        finally:
            if c.closed is None:
                c.closed = "disconnected"
                self.clients.discard(c)
                sender.cancel()
            await _finish(sender, 2.0)
            if not ws.closed:
                await ws.close()

    async def _sender(self, c: EventsClient) -> None:
        ws = c.ws
        while True:
            item = await c.queue.get()
            if item is None:
                return
            if isinstance(item, tuple):
                code, reason = item
                await ws.close(code=code, message=reason.encode()[:123])
                return
            if item is _PING:
                await ws.ping()
            else:
                await ws.send_str(item)

    def _receive(self, c: EventsClient, data: str) -> None:
        try:
            msg = json.loads(data)
        except ValueError:
            self._error(c, "bad_json", "messages are JSON objects")
            return
        if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
            self._error(c, "bad_message", "a message is an object with a string 'type'")
            return
        kind = msg["type"]
        if kind == "ping":
            self._send(c, {"type": "pong"})
        elif kind == "pong":
            pass  # a sign of life, already noted
        elif kind == "subscribe":
            streams = msg.get("streams")
            if (not isinstance(streams, list) or len(streams) > MAX_SUBSCRIBE
                    or not all(isinstance(s, str) and 0 < len(s) <= 200 for s in streams)):
                self._error(c, "bad_subscribe", f"'streams' is a list of at most {MAX_SUBSCRIBE} stream names")
                return
            allowed = sorted({s for s in streams if self.allowed(c, s)})
            c.subscribed = set(allowed)
            self._send(c, {"type": "subscribed", "streams": allowed,
                           "refused": sorted(set(streams) - set(allowed))})
        else:
            self._error(c, "unknown_type", f"unknown message type {kind[:40]!r}")

    def _error(self, c: EventsClient, code: str, detail: str) -> None:
        self._send(c, {"type": "error", "code": code, "detail": detail})

    def _send(self, c: EventsClient, msg: dict[str, Any]) -> None:
        if c.closed is not None:
            return
        if c.queue.qsize() >= SEND_QUEUE_MAX - 1:  # one slot kept for the close
            self.slow_clients += 1
            event(log, logging.WARNING, "qc.events_client_too_slow", who=c.who, queued=c.queue.qsize())
            self.kick(c, CLOSE_TOO_SLOW, "too slow")
            return
        c.seq += 1
        c.queue.put_nowait(json.dumps({"type": msg["type"], "seq": c.seq, **msg}, separators=(",", ":")))

    def _broadcast(self, stream: str, msg: dict[str, Any]) -> None:
        for c in list(self.clients):
            if self.allowed(c, stream):
                self._send(c, msg)

    def _broadcast_marker(self, kind: str, live: LiveMarker) -> None:
        self._broadcast(live.stream, {"type": f"marker.{kind}", "event": kind, **live.to_json()})

    # -- storage ------------------------------------------------------------------------
    @property
    def pending(self) -> deque[_Write]:
        return self._writes.pending

    @property
    def queue_max(self) -> int:
        return self._writes.queue_max

    @queue_max.setter
    def queue_max(self, value: int) -> None:
        self._writes.queue_max = value

    @property
    def stored(self) -> int:
        return self._writes.stored

    @property
    def dropped_writes(self) -> int:
        return self._writes.dropped

    @property
    def failed_writes(self) -> int:
        return self._writes.failed

    @property
    def deferred_batches(self) -> int:
        return self._writes.deferred

    def _store(self, kind: str, live: LiveMarker) -> None:
        self._writes.put(_Write(kind, live, live.row()))

    async def _write(self, batch: list[_Write]) -> dict[int, int]:
        """One transaction; returns live_id → new row id (applied only after commit)."""
        new: dict[int, int] = {}
        async with self.db.pool.acquire() as conn:
            async with conn.transaction():
                for w in batch:
                    row_id = w.marker.id or new.get(w.marker.live_id)
                    if row_id is None:
                        # The open (or, after an overflow, the close carrying
                        # the whole marker): insert.
                        new[w.marker.live_id] = await repo.insert_marker(conn, w.marker.stream_id, w.row)
                    else:
                        await repo.update_marker(conn, row_id, w.row)
        return new

    def _written(self, batch: list[_Write], new: dict[int, int]) -> None:
        """After a commit: the new rows' ids onto their live markers, announced."""
        for w in batch:
            row_id = new.get(w.marker.live_id)
            if row_id is not None and w.marker.id is None:
                w.marker.id = row_id
                self._broadcast(w.marker.stream, {"type": "marker.stored", "stream": w.marker.stream,
                                                  "live_id": w.marker.live_id, "id": row_id})

    # -- heartbeat and lifecycle ---------------------------------------------------------
    def tick(self, now: float | None = None) -> list[EventsClient]:
        """Ping everyone; close (4001) and return the clients silent too long."""
        now = time.monotonic() if now is None else now
        missing = [c for c in self.clients if now - c.last_seen > self.missing_after]
        for c in missing:
            self.kick(c, CLOSE_HEARTBEAT_TIMEOUT, "heartbeat timeout")
        for c in list(self.clients):
            self._send(c, {"type": "ping"})
            if c.closed is None and not c.queue.full():
                c.queue.put_nowait(_PING)
        return missing

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            self.tick()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._closing = False
        self._writes.start()
        if self._heartbeat is None:
            self._heartbeat = loop.create_task(self._heartbeat_loop(), name="qc-events-heartbeat")

    async def stop(self) -> None:
        """Close every socket (1001), let the writer store what is queued for
        at most ``CLOSE_TIMEOUT`` seconds, then end both tasks."""
        for c in list(self.clients):
            self.kick(c, CLOSE_GOING_AWAY, "server shutting down")
        self._closing = True
        heartbeat, self._heartbeat = self._heartbeat, None
        if heartbeat is not None:
            heartbeat.cancel()
            await _finish(heartbeat, CLOSE_TIMEOUT)
        await self._writes.close(CLOSE_TIMEOUT)

    def collect(self) -> Iterable[Metric]:
        """Metric families for ``/metrics`` (a collector of :class:`server.metrics.Metrics`)."""
        yield GaugeMetricFamily("returnfeed_qc_events_clients", "Connected /ws/events clients", value=len(self.clients))
        yield GaugeMetricFamily("returnfeed_qc_markers_open", "QC markers open now", value=len(self.open))
        yield GaugeMetricFamily("returnfeed_qc_marker_writes_queued", "Marker writes waiting for the database",
                                value=len(self.pending))
        yield CounterMetricFamily("returnfeed_qc_marker_writes_dropped",
                                  "Marker writes dropped because the write queue was full", value=self.dropped_writes)
        yield CounterMetricFamily("returnfeed_qc_marker_writes_failed", "Marker writes the database refused",
                                  value=self.failed_writes)
        yield CounterMetricFamily("returnfeed_qc_events_clients_slow", "/ws/events clients closed for not keeping up",
                                  value=self.slow_clients)
