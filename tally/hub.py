"""Tally WebSocket fan-out, independent of the web framework.

One ``TallyHub`` per production. Clients are *sinks* that take a prepared
WebSocket frame without blocking (``FrameSink``): normally a
``TransportSink`` around the connection's asyncio transport, so the hub
writes frame bytes straight into the socket.

The cheap path
--------------
For each delta the hub encodes the JSON once, builds the RFC 6455 frame once
and calls ``transport.write(frame)`` for every client — no per-client queue,
task or encoder. ``transport.write`` tries to send immediately and keeps what
the kernel did not take in the transport's buffer; that buffer is the
client's bounded send backlog. After each write the hub checks
``get_write_buffer_size()``: a client above ``max_backlog`` (256 KiB by
default) is closed with 4000 "too slow" and dropped, so it never delays
anybody else.

Coalescing and leading edge
---------------------------
The hub listens to the ``TallyState``. The first change schedules a flush
with ``loop.call_soon`` — no timer, no debounce: it runs in the next loop
iteration. Changes arriving before that flush (a switcher flooding, many
datagrams in one iteration, a flush that took long because of many clients)
are merged by the hub's ``DeltaAccumulator`` into one ``tally`` message with
the latest state of every changed source. A client that received a snapshot
at ``seq`` ≥ the delta's seq skips it; every other client gets it.

Heartbeat and transitions
-------------------------
``tick(now)`` sends, every ``heartbeat_interval``, the JSON ``ping`` (for
browsers: their WebSocket API can neither send nor see protocol pings) and
an RFC 6455 Ping frame (§5.5.2: "Upon receipt of a Ping frame, an endpoint
MUST send a Pong frame in response" — so any standard client that only
listens, e.g. ``wscat``, answers it without knowing our JSON protocol).
Any frame a client sends counts as a sign of life: a text message, a Pong,
a Ping (``touch``). ``tick`` closes (4001 "heartbeat timeout") and returns
the clients not heard from for ``missing_after`` seconds; ``start()`` runs
it on a loop timer. The hub also arms a timer for the end of a running
``take`` so the transition completes on time.

Server wiring (aiohttp)
-----------------------
::

    # autoping=False: aiohttp would swallow Pong frames, which are the
    # only sign of life a standard passive client sends.
    ws = web.WebSocketResponse(compress=False, max_msg_size=64 * 1024, autoping=False)
    await ws.prepare(request)
    client = hub.connect(aiohttp_sink(ws), director=is_director, who=username)
    await serve_aiohttp(hub, client, ws)
    return ws

``aiohttp_transport`` is the one place that knows where aiohttp keeps the
transport of a ``WebSocketResponse``; its test fails loudly if an aiohttp
upgrade moves it. Frames the hub writes are complete, uncompressed frames
(RSV1 clear), valid with or without permessage-deflate (RFC 7692 §6).
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, assert_never

from tally.errors import CommandRejected, MessageError, TallyError
from tally.log import event
from tally.protocol import (
    PING,
    CloseCode,
    Command,
    Cut,
    ErrorCode,
    Ping,
    Pong,
    Preview,
    Take,
    encode_error,
    encode_pong,
    encode_snapshot,
    encode_tally,
    parse_client_message,
)
from tally.state import DIRECTOR, DeltaAccumulator, TallyChange, TallyState

log = logging.getLogger(__name__)

DEFAULT_MAX_BACKLOG = 256 * 1024

# RFC 6455 §5.2 opcodes
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA
_FIN = 0x80
_AIOHTTP_ERROR = 0x102  # aiohttp WSMsgType.ERROR: the connection failed


def build_frame(opcode: int, payload: bytes) -> bytes:
    """One unmasked, unfragmented server→client frame (RFC 6455 §5.2).

    Byte 0: FIN=1, RSV1-3=0, opcode. Byte 1: MASK=0 ("a server MUST NOT
    mask any frames that it sends to the client", §5.1) and the payload
    length: 0-125 inline; 126 + 16-bit length; 127 + 64-bit length (most
    significant bit 0), both in network byte order, "the minimal number of
    bytes MUST be used to encode the length"."""
    if not 0 <= opcode <= 0xF:
        raise ValueError("opcode is 4 bits")
    n = len(payload)
    if opcode >= 0x8 and n > 125:
        raise ValueError("control frames carry at most 125 bytes (RFC 6455 §5.5)")
    if n < 126:
        header = bytes((_FIN | opcode, n))
    elif n < 65536:
        header = struct.pack("!BBH", _FIN | opcode, 126, n)
    else:
        header = struct.pack("!BBQ", _FIN | opcode, 127, n)
    return header + payload


def build_text_frame(text: str | bytes) -> bytes:
    payload = text.encode("utf-8") if isinstance(text, str) else text
    return build_frame(OP_TEXT, payload)


def build_close_frame(code: int, reason: str = "") -> bytes:
    """Close frame: 2-byte status code then UTF-8 reason (RFC 6455 §5.5.1),
    the reason truncated to fit 125 bytes on a character boundary."""
    if not (1000 <= code <= 4999):
        raise ValueError("close code must be 1000..4999")
    raw = reason.encode("utf-8")
    if len(raw) > 123:
        raw = raw[:123].decode("utf-8", "ignore").encode("utf-8")
    return build_frame(OP_CLOSE, struct.pack("!H", code) + raw)


class FrameSink(Protocol):
    """What the hub needs from a client connection (all non-blocking)."""

    def write(self, frame: bytes) -> None: ...

    def get_write_buffer_size(self) -> int: ...

    def close(self, code: int, reason: str) -> None: ...


class TransportSink:
    """A ``FrameSink`` over an asyncio transport carrying a WebSocket.

    ``close`` writes a close frame, closes the transport gracefully (the
    buffered bytes are still flushed) and aborts it after ``abort_after``
    seconds if the peer has not taken them by then."""

    __slots__ = ("transport", "write", "get_write_buffer_size", "abort_after", "_abort", "closed")

    def __init__(self, transport: asyncio.Transport, *, abort_after: float = 2.0) -> None:
        self.transport = transport
        # Bound methods of the transport itself: the hub's write is one call.
        self.write: Callable[[bytes], None] = transport.write
        self.get_write_buffer_size: Callable[[], int] = transport.get_write_buffer_size
        self.abort_after = abort_after
        self._abort: asyncio.TimerHandle | None = None
        self.closed = False

    def close(self, code: int, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        t = self.transport
        if t.is_closing():
            return
        try:
            t.write(build_close_frame(code, reason))
        except (OSError, RuntimeError):
            pass
        t.close()
        try:
            self._abort = asyncio.get_running_loop().call_later(self.abort_after, self._force)
        except RuntimeError:
            t.abort()

    def _force(self) -> None:
        self._abort = None
        try:
            self.transport.abort()
        except (OSError, RuntimeError):
            pass


def aiohttp_transport(ws: Any) -> asyncio.Transport:
    """The asyncio transport under a prepared ``aiohttp.web.WebSocketResponse``.

    aiohttp has no public accessor on the response: its ``WebSocketWriter``
    (``ws._writer``) holds the transport it writes frames to (aiohttp 3.14).
    """
    writer = getattr(ws, "_writer", None)
    if writer is None:
        raise TallyError("WebSocketResponse is not prepared (or aiohttp moved _writer)")
    transport = getattr(writer, "transport", None)
    for attr in ("write", "get_write_buffer_size", "is_closing", "close", "abort"):
        if not callable(getattr(transport, attr, None)):
            raise TallyError(f"aiohttp WebSocket writer has no usable transport (missing {attr})")
    return transport  # type: ignore[return-value]


def aiohttp_sink(ws: Any, *, abort_after: float = 2.0) -> TransportSink:
    return TransportSink(aiohttp_transport(ws), abort_after=abort_after)


async def serve_aiohttp(hub: "TallyHub", client: "TallyClient", ws: Any) -> None:
    """Read one aiohttp ``WebSocketResponse`` (prepared with
    ``autoping=False``) until it closes, then disconnect ``client``.

    Every frame counts as a sign of life. Pings are answered here because
    autoping is off (RFC 6455 §5.5.3: the Pong carries the Ping's
    "Application data"). Duck-typed like the rest of the hub: aiohttp's
    ``WSMsgType`` values are the RFC 6455 opcodes (``ERROR`` is 0x102);
    a test pins that."""
    try:
        async for msg in ws:
            t = int(msg.type)
            if t == OP_TEXT or t == OP_BINARY:
                hub.receive(client, msg.data)
            elif t == OP_PONG:
                hub.touch(client)
            elif t == OP_PING:
                hub.touch(client)
                await ws.pong(msg.data)
            elif t == _AIOHTTP_ERROR:
                break
    finally:
        hub.disconnect(client)


class TallyClient:
    """One connected client, as the hub sees it."""

    __slots__ = ("id", "sink", "director", "who", "only", "seq", "last_seen", "connected_at", "closed", "_write",
                 "_backlog")

    def __init__(self, client_id: int, sink: FrameSink, director: bool, who: str, now: float,
                 only: frozenset[str] | None = None) -> None:
        self.id = client_id
        #: Sources this client may see (a camera operator's link: its own
        #: camera); None = the whole production.
        self.only = only
        self.sink = sink
        self.director = director
        self.who = who
        self.seq = -1
        self.last_seen = now
        self.connected_at = now
        self.closed: str | None = None
        self._write = sink.write
        self._backlog = sink.get_write_buffer_size

    def __repr__(self) -> str:
        return f"<TallyClient {self.id} {self.who or '-'}{' director' if self.director else ''}>"


@dataclass(slots=True)
class HubStats:
    connects: int = 0
    deltas: int = 0
    changes: int = 0
    frames: int = 0
    slow_closed: int = 0
    missing_closed: int = 0
    errors_sent: int = 0
    write_failures: int = 0


class TallyHub:
    """WebSocket fan-out for one production (see the module docstring)."""

    def __init__(
        self,
        state: TallyState,
        *,
        max_backlog: int = DEFAULT_MAX_BACKLOG,
        heartbeat_interval: float = 1.0,
        missing_after: float = 3.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.state = state
        self.max_backlog = max_backlog
        self.heartbeat_interval = heartbeat_interval
        self.missing_after = missing_after
        self._clock = clock
        self._clients: dict[int, TallyClient] = {}
        self._next_id = 0
        self._acc = DeltaAccumulator()
        self._flush_handle: asyncio.Handle | None = None
        self._deadline_handle: asyncio.TimerHandle | None = None
        self._deadline_at: float | None = None
        self._tick_handle: asyncio.TimerHandle | None = None
        self._next_ping: float | None = None
        self._snapshot_cache: tuple[int, bytes] | None = None
        # Sent together: the JSON ping for browsers, the protocol Ping for
        # standard clients (see the module docstring).
        self._ping_frame = build_text_frame(PING) + build_frame(OP_PING, b"")
        self._pong_frame = build_text_frame(encode_pong())
        self.stats = HubStats()
        self._closed = False
        self._pending_since: float | None = None
        #: Called after each flush with (seconds from the first change of the
        #: delta to the last client written, clients written): for metrics.
        self.on_delivered: Callable[[float, int], None] | None = None
        state.add_listener(self._on_change)

    # ------------------------------------------------------------ clients

    @property
    def clients(self) -> list[TallyClient]:
        return list(self._clients.values())

    def connect(self, sink: FrameSink, *, director: bool = False, who: str = "", now: float | None = None,
                only: frozenset[str] | None = None) -> TallyClient:
        """Register a client and send it the snapshot.

        ``only`` scopes a client to some sources (it sees nothing else, in the
        snapshot or in deltas); frames are still encoded once per distinct
        scope, not per client."""
        if self._closed:
            raise TallyError("hub is closed")
        now = self._clock() if now is None else now
        self._next_id += 1
        client = TallyClient(self._next_id, sink, director, who, now, only)
        seq = self.state.seq
        if only is None:
            cache = self._snapshot_cache
            if cache is None or cache[0] != seq:
                frame = build_text_frame(encode_snapshot(seq, self.state.production, self.state.states()))
                self._snapshot_cache = cache = (seq, frame)
            frame = cache[1]
        else:
            states = {n: st for n, st in self.state.states().items() if n in only}
            frame = build_text_frame(encode_snapshot(seq, self.state.production, states))
        client.seq = seq
        self._clients[client.id] = client
        self.stats.connects += 1
        self._write_one(client, frame)
        return client

    def kick(self, client: TallyClient, code: int, reason: str) -> None:
        """Close one client with ``code`` and ``reason`` (its access ended)."""
        self._drop(client, code, reason[:120])

    def disconnect(self, client: TallyClient) -> None:
        """Forget a client (the connection is gone or going)."""
        self._clients.pop(client.id, None)
        if client.closed is None:
            client.closed = "disconnected"

    def touch(self, client: TallyClient, now: float | None = None) -> None:
        """Count a frame that is not a text message (an RFC 6455 Pong or
        Ping) as a sign of life."""
        client.last_seen = self._clock() if now is None else now

    def receive(self, client: TallyClient, data: str | bytes, now: float | None = None) -> TallyChange | None:
        """Handle one client message; answers errors/pongs directly."""
        now = self._clock() if now is None else now
        client.last_seen = now
        try:
            msg = parse_client_message(data)
        except MessageError as exc:
            self._send_error(client, exc.code, exc.detail, None)
            return None
        if isinstance(msg, Ping):
            self._write_one(client, self._pong_frame if msg.id is None else build_text_frame(encode_pong(msg.id)))
            return None
        if isinstance(msg, Pong):
            return None
        if not client.director:
            self._send_error(client, ErrorCode.FORBIDDEN, "only directors can switch", msg.id)
            return None
        try:
            return self.command(msg, who=client.who or DIRECTOR, now=now)
        except CommandRejected as exc:
            self._send_error(client, exc.code, exc.detail, msg.id)
            return None

    def command(self, msg: Command, *, who: str = DIRECTOR, now: float | None = None) -> TallyChange | None:
        """Apply one parsed switching command for ``who`` (a director): the one
        path for WebSocket clients (:meth:`receive`) and the REST route.

        Raises ``CommandRejected`` (nothing changed). The resulting delta goes
        out with the hub's normal cadence (the flush scheduled by the state
        change), never forced from here."""
        now = self._clock() if now is None else now
        match msg:
            case Cut(source=source):
                return self.state.cut(source, now=now, who=who)
            case Preview(source=source):
                return self.state.set_preview(source, now=now, who=who)
            case Take(duration=duration):
                return self.state.take(duration, now=now, who=who)
            case _:
                assert_never(msg)

    # ------------------------------------------------------------ fan-out

    def flush(self) -> int:
        """Send the pending delta now; returns the number of clients written."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        delta = self._acc.take()
        since, self._pending_since = self._pending_since, None
        if delta is None:
            return 0
        seq = delta.seq
        full = build_text_frame(encode_tally(seq, delta.sources))
        scoped: dict[frozenset[str], bytes | None] = {}
        self.stats.deltas += 1
        limit = self.max_backlog
        bad: list[tuple[TallyClient, int, str]] = []
        n = 0
        for client in self._clients.values():
            if client.seq >= seq:
                continue
            client.seq = seq
            only = client.only
            if only is None:
                frame = full
            else:
                if only not in scoped:
                    part = {name: st for name, st in delta.sources.items() if name in only}
                    scoped[only] = build_text_frame(encode_tally(seq, part)) if part else None
                frame = scoped[only]
                if frame is None:
                    continue  # nothing this client may see changed
            try:
                client._write(frame)
                if client._backlog() > limit:
                    bad.append((client, CloseCode.TOO_SLOW, "too slow"))
            except Exception as exc:  # a dead transport must not stop the fan-out
                bad.append((client, 0, f"write failed: {exc}"))
            n += 1
        self.stats.frames += n
        for client, code, reason in bad:
            self._drop(client, code, reason)
        if self.on_delivered is not None and since is not None:
            # change → its frame written to every client's socket
            self.on_delivered(self._clock() - since, n)
        return n

    def tick(self, now: float | None = None) -> list[TallyClient]:
        """Heartbeat, transition deadline, missing-client detection.

        Sends ``ping`` (JSON and an RFC 6455 Ping frame) when due, completes a finished transition, and closes
        and returns the clients not heard from for ``missing_after`` s."""
        now = self._clock() if now is None else now
        self.state.tick(now)
        if self._next_ping is None or now >= self._next_ping:
            self._next_ping = now + self.heartbeat_interval
            self._broadcast(self._ping_frame)
        missing = [c for c in self._clients.values() if now - c.last_seen > self.missing_after]
        for client in missing:
            self.stats.missing_closed += 1
            self._drop(client, CloseCode.HEARTBEAT_TIMEOUT, "heartbeat timeout")
        return missing

    def start(self) -> None:
        """Run ``tick`` on a loop timer every ``heartbeat_interval``/2
        (pings still go out once per interval)."""
        if self._tick_handle is None:
            self._tick_handle = asyncio.get_running_loop().call_soon(self._auto_tick)

    def close(self, code: int = CloseCode.GOING_AWAY, reason: str = "server shutting down") -> None:
        """Stop timers, detach from the state and close every client."""
        self._closed = True
        self.state.remove_listener(self._on_change)
        for handle in (self._tick_handle, self._flush_handle, self._deadline_handle):
            if handle is not None:
                handle.cancel()
        self._tick_handle = self._flush_handle = self._deadline_handle = None
        for client in list(self._clients.values()):
            self._drop(client, code, reason)

    # ------------------------------------------------------------ internals

    def _on_change(self, change: TallyChange) -> None:
        if self._pending_since is None:
            self._pending_since = self._clock()
        self._acc.add(change)
        self.stats.changes += 1
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (sans-I/O use): the owner calls flush()
        if self._flush_handle is None:
            self._flush_handle = loop.call_soon(self._flush_soon)
        deadline = self.state.next_deadline()
        if deadline != self._deadline_at:
            if self._deadline_handle is not None:
                self._deadline_handle.cancel()
                self._deadline_handle = None
            self._deadline_at = deadline
            if deadline is not None:
                self._deadline_handle = loop.call_later(max(0.0, deadline - self._clock()) + 0.001, self._on_deadline)

    def _flush_soon(self) -> None:
        self._flush_handle = None
        self.flush()

    def _on_deadline(self) -> None:
        self._deadline_handle = None
        self._deadline_at = None
        now = self._clock()
        self.state.tick(now)
        deadline = self.state.next_deadline()
        if deadline is not None and self._deadline_handle is None:
            # Loop timers may fire a little early (uvloop keeps a millisecond
            # clock): try again at the deadline.
            self._deadline_at = deadline
            self._deadline_handle = asyncio.get_running_loop().call_later(
                max(0.0, deadline - now) + 0.001, self._on_deadline
            )

    def _auto_tick(self) -> None:
        self.tick()
        if not self._closed:
            self._tick_handle = asyncio.get_running_loop().call_later(self.heartbeat_interval / 2, self._auto_tick)

    def _broadcast(self, frame: bytes) -> None:
        limit = self.max_backlog
        bad: list[tuple[TallyClient, int, str]] = []
        for client in self._clients.values():
            try:
                client._write(frame)
                if client._backlog() > limit:
                    bad.append((client, CloseCode.TOO_SLOW, "too slow"))
            except Exception as exc:
                bad.append((client, 0, f"write failed: {exc}"))
        for client, code, reason in bad:
            self._drop(client, code, reason)

    def _write_one(self, client: TallyClient, frame: bytes) -> None:
        try:
            client._write(frame)
            if client._backlog() > self.max_backlog:
                self._drop(client, CloseCode.TOO_SLOW, "too slow")
        except Exception as exc:
            self._drop(client, 0, f"write failed: {exc}")

    def _send_error(self, client: TallyClient, code: str, detail: str, msg_id: str | int | None) -> None:
        self.stats.errors_sent += 1
        self._write_one(client, build_text_frame(encode_error(str(code), detail, msg_id)))

    def _drop(self, client: TallyClient, code: int, reason: str) -> None:
        if self._clients.pop(client.id, None) is None:
            return
        client.closed = reason
        if code == CloseCode.TOO_SLOW:
            self.stats.slow_closed += 1
            event(log, logging.WARNING, "tally.client_too_slow", client=client.id, who=client.who)
        elif code == 0:
            self.stats.write_failures += 1
            event(log, logging.INFO, "tally.client_dropped", client=client.id, who=client.who, reason=reason)
        try:
            client.sink.close(code or 1011, reason)
        except Exception as exc:
            event(log, logging.ERROR, "tally.client_close_failed", client=client.id, who=client.who,
                  error=f"{type(exc).__name__}: {exc}")
