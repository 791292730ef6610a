"""SRT listener: many callers on ONE UDP port, routed by Stream ID.

Flow of one caller::

    caller ──handshake──► libsrt receive thread
                            │ srt_listen_callback (synchronous, on libsrt's thread)
                            │   rate limit per IP ─► reject 1402 without asking
                            │   max connections   ─► reject 1503
                            │   parse Stream ID, authorize(request, peer, raw)
                            │   accept: SRTO_PASSPHRASE / PBKEYLEN / RCVLATENCY on the new socket
                            │   reject: srt_setrejectreason(ns, code), return -1
                            ▼
                          libsrt checks the passphrase: a wrong one is rejected by libsrt,
                          the caller reads SRT_REJ_BADSECRET (10), or SRT_REJ_UNSECURE (11)
                          when only one side has a passphrase (1010/1011 in the handshake)
                            ▼
    epoll thread (bridge) srt_accept ─► loop: SrtConnection, on_connection(conn)
                          srt_recvmsg2 batches ─► loop: conn.on_data(messages, now)
                          broken/closed ─► loop: conn.on_close(reason)

``authorize`` runs on libsrt's thread while libsrt holds its listener lock, so
it must be a fast in-memory lookup that never touches the event loop (it is
not a coroutine). It receives ``None`` for a Stream ID that does not parse
(with the raw text, so an application may still accept a custom scheme; use
:func:`reject_unparsable` to answer with the parser's reason and code).

A passphrase mismatch is decided by libsrt after our callback returned; the
listener notices a socket it accepted in the callback that vanished before
``srt_accept`` and counts it as ``handshake_failed`` (charging the caller's
rate-limit bucket, so passphrase guessing is throttled like other rejects).
Garbage datagrams never reach any API: libsrt drops them silently.

Reject codes (``SRT_REJX_*``, access_control.h) are passed to
``srt_setrejectreason`` unchanged and a libsrt 1.5 caller reads the same
number back with ``srt_getrejectreason`` (e.g. 1404; verified with libsrt
1.5.1 on both sides — the handshake carries 1000 + code, libsrt subtracts it
again). The listener itself answers 1402 (rate limited), 1503 (full or
shutting down) and 1500 (``authorize`` raised).

In caller-listener mode the caller's AES key length wins (libsrt 1.5), so a
``Decision.pbkeylen`` is enforced after the handshake: a connection with
another key length is closed before ``on_connection`` (``policy_closed``).

libsrt refuses ``srt_bistats`` once a peer is gone, so the listener samples
each connection's stats every ``stats_interval_s``; ``SrtConnection.stats()``
falls back to the last sample.

Every accept, reject and close is one log event on ``returnfeed.srt``
(:func:`media.log.event`): the message is ``srt.<event>``, the fields are
in the record's ``fields`` (keys of the JSON log line). Rejects of an IP
that is over its rate limit are logged at DEBUG only (one WARNING when the
limit trips), so a caller retrying every few milliseconds cannot flood the
log.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from media.errors import SrtApiError
from media.log import event
from media.srt.binding import (
    SRT_LIVE_DEF_PLSIZE,
    SRT_REJC_PREDEFINED,
    KmState,
    RejectReason,
    SockOpt,
    SockStatus,
    SrtLibrary,
    TransType,
    format_peer,
    read_c_string,
    sockaddr_from_pointer,
)
from media.srt.bridge import SrtBridge
from media.srt.streamid import StreamIdError, StreamIdRequest, parse_stream_id

__all__ = [
    "Authorize",
    "Decision",
    "ListenerCounters",
    "RateLimit",
    "RejectRateLimiter",
    "SrtConnection",
    "SrtListener",
    "reject_unparsable",
]

log = logging.getLogger("returnfeed.srt")

#: Reject codes this module uses itself (access_control.h).
REJ_OVERLOAD: Final = int(RejectReason.X_OVERLOAD)  # rate limited
REJ_ISE: Final = int(RejectReason.X_ISE)  # authorize raised / setsockflag failed
REJ_DOWN: Final = int(RejectReason.X_DOWN)  # listener closing / full
_PENDING_CHECK_S: Final = 0.25
_PENDING_STALE_S: Final = 30.0


# --------------------------------------------------------------------------
# Decisions
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer of ``authorize`` for one caller.

    ``reason_code`` is an SRT reject code for ``srt_setrejectreason``:
    ``SRT_REJX_*`` of access_control.h (1000 + HTTP status: 1401
    unauthorized, 1403 forbidden, 1404 not found, 1409 conflict, 1503
    unavailable …) or an application code from 2000. ``passphrase`` (10–79
    characters) enables AES for the connection; ``pbkeylen`` 16/24/32 asks for
    AES-128/192/256 (a caller that sets its own key length wins, libsrt 1.5);
    ``latency_ms`` overrides the listener's receive latency.
    """

    accept: bool
    reason_code: int = 0
    reason: str = ""
    passphrase: str | None = None
    pbkeylen: int | None = None
    latency_ms: int | None = None

    def __post_init__(self) -> None:
        if not self.accept and not SRT_REJC_PREDEFINED <= self.reason_code < 3000:
            raise ValueError(f"reject reason_code must be 1000..2999 (SRT_REJC_*), not {self.reason_code}")
        if self.passphrase is not None and not 10 <= len(self.passphrase) <= 79:
            raise ValueError("an SRT passphrase must be 10 to 79 characters")
        if self.pbkeylen not in (None, 0, 16, 24, 32):
            raise ValueError(f"pbkeylen must be 16, 24 or 32, not {self.pbkeylen}")
        if self.latency_ms is not None and not 0 <= self.latency_ms <= 60_000:
            raise ValueError(f"latency_ms out of range: {self.latency_ms}")

    @classmethod
    def allow(
        cls,
        *,
        passphrase: str | None = None,
        pbkeylen: int | None = None,
        latency_ms: int | None = None,
        reason: str = "ok",
    ) -> Decision:
        return cls(True, 0, reason, passphrase, pbkeylen, latency_ms)

    @classmethod
    def deny(cls, reason_code: int, reason: str) -> Decision:
        return cls(False, reason_code, reason)


def reject_unparsable(raw_streamid: str) -> Decision:
    """A reject carrying the Stream ID parser's reason and code."""
    try:
        parse_stream_id(raw_streamid)
    except StreamIdError as exc:
        return Decision.deny(exc.reject_code, exc.reason)
    return Decision.deny(int(RejectReason.X_BAD_REQUEST), "unsupported stream ID")


Authorize = Callable[[StreamIdRequest | None, str, str], Decision]


# --------------------------------------------------------------------------
# Rate limiting of rejected callers (sans-I/O, explicit clock)
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RateLimit:
    """Token bucket per caller IP: ``burst`` rejects at once, refilled at
    ``per_second``. An IP with an empty bucket is rejected (1402) without
    calling ``authorize``."""

    burst: float = 10.0
    per_second: float = 1.0
    max_hosts: int = 10_000

    def __post_init__(self) -> None:
        if self.burst < 1 or self.per_second <= 0 or self.max_hosts < 1:
            raise ValueError("RateLimit needs burst >= 1, per_second > 0, max_hosts >= 1")


class RejectRateLimiter:
    """Per-key token buckets charged by rejects; thread-safe."""

    def __init__(self, limit: RateLimit) -> None:
        self.limit = limit
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, last)
        self._lock = threading.Lock()

    def _tokens(self, key: str, now: float) -> float:
        entry = self._buckets.get(key)
        if entry is None:
            return self.limit.burst
        tokens, last = entry
        return min(self.limit.burst, tokens + max(0.0, now - last) * self.limit.per_second)

    def blocked(self, key: str, now: float) -> bool:
        """True when ``key`` has no token left for another reject."""
        with self._lock:
            return self._tokens(key, now) < 1.0

    def charge(self, key: str, now: float) -> bool:
        """Spend one token for a reject of ``key``; True if that emptied the
        bucket (the moment ``key`` becomes blocked), False otherwise."""
        with self._lock:
            before = self._tokens(key, now)
            tokens = max(0.0, before - 1.0)
            self._buckets[key] = (tokens, now)
            self._buckets.move_to_end(key)
            if len(self._buckets) > self.limit.max_hosts:
                self._prune(now)
            return before >= 1.0 > tokens

    def _prune(self, now: float) -> None:
        for k in [k for k in self._buckets if self._tokens(k, now) >= self.limit.burst]:
            del self._buckets[k]
        while len(self._buckets) > self.limit.max_hosts:
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)


# --------------------------------------------------------------------------
# Counters
# --------------------------------------------------------------------------


@dataclass(slots=True)
class ListenerCounters:
    """Plain counters for the metrics exporter (read them at any time)."""

    accepted: int = 0
    rejected: int = 0
    rejected_by_reason: dict[int, int] = field(default_factory=dict)
    rate_limited: int = 0
    parse_errors: int = 0
    handshake_failed: int = 0
    authorize_errors: int = 0
    policy_closed: int = 0
    closed: int = 0
    active: int = 0
    send_drops: int = 0

    def as_dict(self) -> dict[str, object]:
        return {
            "accepted": self.accepted,
            "rejected": self.rejected,
            "rejected_by_reason": dict(self.rejected_by_reason),
            "rate_limited": self.rate_limited,
            "parse_errors": self.parse_errors,
            "handshake_failed": self.handshake_failed,
            "authorize_errors": self.authorize_errors,
            "policy_closed": self.policy_closed,
            "closed": self.closed,
            "active": self.active,
            "send_drops": self.send_drops,
        }


# --------------------------------------------------------------------------
# Connections
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConnectionFailure:
    """A caller that did not get through, for the people who run the stream
    (``SrtListener.failures``). Never carries the raw stream ID: it may hold
    a token."""

    at: float  # wall clock (time.time())
    peer: str
    stream: str | None  # None when the stream ID named none we could read
    code: int | None  # the reject code the caller saw; None: closed after the handshake
    reason: str


@dataclass(slots=True)
class _Pending:
    request: StreamIdRequest | None
    raw_streamid: str
    decision: Decision
    peer: str
    ip: str
    since: float


class SrtConnection:
    """One accepted caller. Lives on the event loop thread.

    Set :attr:`on_data` (``(messages, now)``; ``now`` is ``time.monotonic()``
    when the epoll thread woke up) and :attr:`on_close` (``(reason)``) in the
    ``on_connection`` callback: messages arriving while ``on_data`` is None
    are dropped and counted in :attr:`dropped_no_consumer`.
    """

    __slots__ = (
        "_listener",
        "socket_id",
        "request",
        "raw_streamid",
        "peer",
        "decision",
        "connected_at",
        "latency_ms",
        "peer_latency_ms",
        "pbkeylen",
        "encrypted",
        "on_data",
        "on_close",
        "bytes_received",
        "messages_received",
        "messages_sent",
        "send_drops",
        "dropped_no_consumer",
        "closed",
        "close_reason",
        "final_stats",
        "__weakref__",
    )

    def __init__(
        self,
        listener: SrtListener,
        socket_id: int,
        pending: _Pending,
        connected_at: float,
    ) -> None:
        self._listener = listener
        self.socket_id = socket_id
        self.request = pending.request
        self.raw_streamid = pending.raw_streamid
        self.peer = pending.peer
        self.decision = pending.decision
        self.connected_at = connected_at
        lib = listener.library
        self.latency_ms = self._flag(lib, SockOpt.RCVLATENCY)
        self.peer_latency_ms = self._flag(lib, SockOpt.PEERLATENCY)
        self.pbkeylen = self._flag(lib, SockOpt.PBKEYLEN)
        self.encrypted = self._flag(lib, SockOpt.KMSTATE) == KmState.SECURED
        self.on_data: Callable[[list[bytes], float], None] | None = None
        self.on_close: Callable[[str], None] | None = None
        self.bytes_received = 0
        self.messages_received = 0
        self.messages_sent = 0
        self.send_drops = 0
        self.dropped_no_consumer = 0
        self.closed = False
        self.close_reason: str | None = None
        self.final_stats: dict[str, float | int] | None = None

    def _flag(self, lib: SrtLibrary, opt: SockOpt) -> int:
        try:
            return int(lib.getsockflag(self.socket_id, opt))
        except SrtApiError:
            return -1

    @property
    def stream(self) -> str | None:
        return self.request.stream if self.request is not None else None

    def send(self, data: bytes) -> bool:
        """Queue ``data`` (split into 1316-byte messages) without blocking.

        False when any part was dropped because the send buffer is full (a
        reader that cannot keep up loses data) or the connection is gone.
        """
        if self.closed:
            return False
        sent, dropped, broken = self._listener.bridge.send(self.socket_id, data)
        self.messages_sent += sent
        if dropped:
            self.send_drops += dropped
            self._listener.counters.send_drops += dropped
        return not dropped and not broken

    def receive_pending(self) -> bool:
        """True while received data may not have reached :attr:`on_data` yet
        (in libsrt's buffer or in a batch on its way to the loop)."""
        if self.closed:
            return False
        return self._listener.bridge.receive_pending(self.socket_id)

    def close(self) -> None:
        """Close from our side; ``on_close('local')`` follows synchronously."""
        self._listener._finish(self, "local")

    def stats(self, *, clear: bool = False) -> dict[str, float | int]:
        """Selected ``srt_bistats`` figures (totals since connect) + latency.

        libsrt answers ``srt_bistats`` only while the connection is up; the
        listener samples every connection each ``stats_interval_s`` into
        :attr:`final_stats`, and once the peer is gone (or after close) this
        returns that last sample (``sampled_at`` says when, monotonic).
        """
        if not self.closed:
            try:
                return self._read_stats(clear=clear)
            except SrtApiError:
                # libsrt refuses stats once the peer is gone (broken socket
                # still draining): fall back to the last periodic sample.
                if self.final_stats is None:
                    raise
        if self.final_stats is None:
            raise SrtApiError("srt_bistats", -1, "connection closed before stats could be read")
        return dict(self.final_stats)

    def _read_stats(self, *, clear: bool) -> dict[str, float | int]:
        perf = self._listener.library.bistats(self.socket_id, clear=clear, instantaneous=True)
        return {
            "msRTT": perf.msRTT,
            "mbpsBandwidth": perf.mbpsBandwidth,
            "mbpsRecvRate": perf.mbpsRecvRate,
            "mbpsSendRate": perf.mbpsSendRate,
            "pktRecv": perf.pktRecvTotal,
            "byteRecv": perf.byteRecvTotal,
            "pktRcvLoss": perf.pktRcvLossTotal,
            "pktRcvRetrans": perf.pktRcvRetrans,
            "pktRcvDrop": perf.pktRcvDropTotal,
            "pktRcvBelated": perf.pktRcvBelated,
            "pktRcvUndecrypt": perf.pktRcvUndecryptTotal,
            "msRcvBuf": perf.msRcvBuf,
            "msRcvTsbPdDelay": perf.msRcvTsbPdDelay,
            "pktSent": perf.pktSentTotal,
            "pktSndLoss": perf.pktSndLossTotal,
            "pktRetrans": perf.pktRetransTotal,
            "pktSndDrop": perf.pktSndDropTotal,
            "latency_ms": self.latency_ms,
            "peer_latency_ms": self.peer_latency_ms,
            "sampled_at": time.monotonic(),
        }

    def raw_stats(self, *, clear: bool = False) -> dict[str, int | float]:
        """Every ``SRT_TRACEBSTATS`` field."""
        return self._listener.library.bistats(self.socket_id, clear=clear).as_dict()

    def __repr__(self) -> str:
        return f"<SrtConnection socket={self.socket_id} peer={self.peer} streamid={self.raw_streamid!r}>"


# --------------------------------------------------------------------------
# Listener
# --------------------------------------------------------------------------


class SrtListener:
    """Serve many SRT callers on one UDP port.

    ``await listener.start()`` binds (``port=0`` picks a free port; read
    :attr:`port`), ``await listener.close()`` stops accepting, closes every
    connection (``on_close('listener_closed')``) and stops the epoll thread.
    Also usable as ``async with``.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        authorize: Authorize,
        on_connection: Callable[[SrtConnection], None],
        latency_ms: int = 120,
        max_connections: int = 256,
        reject_rate_limit: RateLimit | None = RateLimit(),
        backlog: int = 64,
        payload_size: int = SRT_LIVE_DEF_PLSIZE,
        peer_idle_timeout_ms: int = 5000,
        library: SrtLibrary | None = None,
        max_pending_bytes: int = 32 * 1024 * 1024,
        wait_timeout_ms: int = 100,
        stats_interval_s: float = 1.0,
        failure_history: int = 256,
    ) -> None:
        if not 0 <= latency_ms <= 60_000:
            raise ValueError(f"latency_ms out of range: {latency_ms}")
        if max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        self.host = host
        self._requested_port = port
        self.port: int = port
        self.latency_ms = latency_ms
        self.max_connections = max_connections
        self._authorize = authorize
        self._on_connection = on_connection
        self._limiter = RejectRateLimiter(reject_rate_limit) if reject_rate_limit is not None else None
        self._backlog = backlog
        self._payload_size = payload_size
        self._peer_idle_timeout_ms = peer_idle_timeout_ms
        self._given_library = library
        self._max_pending_bytes = max_pending_bytes
        self._wait_timeout_ms = wait_timeout_ms
        self._lib: SrtLibrary | None = None
        self._bridge: SrtBridge | None = None
        self._sock: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._connections: dict[int, SrtConnection] = {}
        #: The most recent callers that did not get through (bounded).
        self.failures: deque[ConnectionFailure] = deque(maxlen=failure_history)
        self._closing = False
        self._checker: asyncio.TimerHandle | None = None
        self._sampler: asyncio.TimerHandle | None = None
        self._stats_interval_s = stats_interval_s
        self.counters = ListenerCounters()

    # -- properties ---------------------------------------------------------

    @property
    def library(self) -> SrtLibrary:
        if self._lib is None:
            raise RuntimeError("listener not started")
        return self._lib

    @property
    def bridge(self) -> SrtBridge:
        if self._bridge is None:
            raise RuntimeError("listener not started")
        return self._bridge

    @property
    def connections(self) -> dict[int, SrtConnection]:
        """Active connections by socket id (a copy)."""
        return dict(self._connections)

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        if self._lib is not None:
            raise RuntimeError("listener already started")
        self._loop = asyncio.get_running_loop()
        lib = self._given_library if self._given_library is not None else SrtLibrary.open()
        self._lib = lib
        sock = lib.create_socket()
        bridge: SrtBridge | None = None
        try:
            lib.setsockflag(sock, SockOpt.TRANSTYPE, TransType.LIVE)
            lib.setsockflag(sock, SockOpt.RCVLATENCY, self.latency_ms)
            lib.setsockflag(sock, SockOpt.PEERLATENCY, self.latency_ms)
            lib.setsockflag(sock, SockOpt.PAYLOADSIZE, self._payload_size)
            lib.setsockflag(sock, SockOpt.PEERIDLETIMEO, self._peer_idle_timeout_ms)
            lib.setsockflag(sock, SockOpt.REUSEADDR, True)
            if ":" in self.host:
                lib.setsockflag(sock, SockOpt.IPV6ONLY, 0)
            lib.bind(sock, self.host, self._requested_port)
            self.port = lib.getsockname(sock)[1]
            ref = weakref.ref(self)

            def on_listen(opaque: object, ns: int, hsversion: int, peeraddr: int | None, streamid: int | None) -> int:
                listener = ref()
                if listener is None:
                    return -1
                return listener._listen_callback(ns, hsversion, peeraddr, streamid)

            lib.listen_callback(sock, on_listen)
            lib.listen(sock, self._backlog)
            bridge = SrtBridge(
                lib,
                self._loop,
                self,
                wait_timeout_ms=self._wait_timeout_ms,
                max_pending_bytes=self._max_pending_bytes,
                payload_size=self._payload_size,
            )
            bridge.add_listener(sock)
        except BaseException:
            if bridge is not None:
                bridge.release()
            lib.c.srt_close(sock)
            if self._given_library is None:
                lib.close()
            self._lib = None
            raise
        self._sock = sock
        self._bridge = bridge
        bridge.start()
        self._checker = self._loop.call_later(_PENDING_CHECK_S, self._check_pending)
        self._sampler = self._loop.call_later(self._stats_interval_s, self._sample_stats)
        event(
            log,
            logging.INFO,
            "srt.listen",
            host=self.host,
            port=self.port,
            latency_ms=self.latency_ms,
            max_connections=self.max_connections,
            libsrt=f"{lib.name} {lib.version_string}",
        )

    async def close(self) -> None:
        if self._lib is None or self._closing:
            return
        self._closing = True
        lib = self._lib
        bridge = self.bridge
        for timer in (self._checker, self._sampler):
            if timer is not None:
                timer.cancel()
        if self._sock is not None:
            bridge.remove_listener(self._sock)
            lib.c.srt_close(self._sock)  # no listen callback runs after this returns
        await bridge.aclose()
        # Deliveries the thread queued before it stopped are still in the
        # loop's ready queue; let them run so no data or close is lost.
        await asyncio.sleep(0)
        for conn in list(self._connections.values()):
            self._finish(conn, "listener_closed")
        with self._lock:
            self._pending.clear()
        event(log, logging.INFO, "srt.listener_closed", port=self.port, **self.counters.as_dict())
        if self._given_library is None:
            lib.close()

    async def __aenter__(self) -> SrtListener:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the listen callback (libsrt thread) ---------------------------------

    def _reject(self, ns: int, code: int, *, ip: str | None, now: float, level: int, **fields: object) -> int:
        lib = self._lib
        assert lib is not None
        if lib.c.srt_setrejectreason(ns, code) < 0:
            lib.c.srt_setrejectreason(ns, int(RejectReason.X_FALLBACK))
        tripped = False
        with self._lock:
            c = self.counters
            c.rejected += 1
            c.rejected_by_reason[code] = c.rejected_by_reason.get(code, 0) + 1
        if ip is not None and self._limiter is not None:
            tripped = self._limiter.charge(ip, now)
        event(log, level, "srt.reject", code=code, **fields)
        if tripped:
            event(log, logging.WARNING, "srt.rate_limit", ip=ip, note="further rejects of this IP skip authorize")
        return -1

    def _failed(self, peer: str, stream: str | None, code: int | None, reason: str) -> None:
        # deque.append is atomic; called from libsrt's thread and the loop's.
        self.failures.append(ConnectionFailure(time.time(), peer, stream, code, reason))

    def _listen_callback(self, ns: int, hsversion: int, peeraddr: int | None, streamid_ptr: int | None) -> int:
        try:
            return self._decide(ns, hsversion, peeraddr, streamid_ptr)
        except BaseException:  # nothing may escape into libsrt
            event(log, logging.ERROR, "srt.listen_callback_failed", exc_info=True)
            try:
                assert self._lib is not None
                self._lib.c.srt_setrejectreason(ns, REJ_ISE)
            except BaseException:
                pass
            return -1

    def _decide(self, ns: int, hsversion: int, peeraddr: int | None, streamid_ptr: int | None) -> int:
        lib = self._lib
        assert lib is not None
        now = time.monotonic()
        try:
            host, port = sockaddr_from_pointer(peeraddr)
            peer = format_peer(host, port)
        except ValueError:
            host, peer = "?", "?"
        raw_bytes = read_c_string(streamid_ptr)
        raw = raw_bytes.decode("utf-8", "replace")

        if self._closing:
            return self._reject(ns, REJ_DOWN, ip=None, now=now, level=logging.INFO, peer=peer, reason="shutting down")

        limiter = self._limiter
        if limiter is not None and limiter.blocked(host, now):
            with self._lock:
                self.counters.rate_limited += 1
            return self._reject(
                ns, REJ_OVERLOAD, ip=None, now=now, level=logging.DEBUG, peer=peer, streamid=raw, reason="rate limited"
            )

        if len(self._connections) + len(self._pending) >= self.max_connections:
            return self._reject(
                ns,
                REJ_DOWN,
                ip=None,
                now=now,
                level=logging.WARNING,
                peer=peer,
                streamid=raw,
                reason=f"max_connections={self.max_connections} reached",
            )

        request: StreamIdRequest | None
        parse_error = None
        try:
            request = parse_stream_id(raw_bytes)
        except StreamIdError as exc:
            request = None
            parse_error = exc.reason
            with self._lock:
                self.counters.parse_errors += 1

        try:
            decision = self._authorize(request, peer, raw)
            if not isinstance(decision, Decision):
                raise TypeError(f"authorize returned {type(decision).__name__}, not Decision")
        except Exception as exc:
            with self._lock:
                self.counters.authorize_errors += 1
            event(log, logging.ERROR, "srt.authorize_failed", exc_info=True, peer=peer, streamid=raw)
            return self._reject(
                ns, REJ_ISE, ip=None, now=now, level=logging.ERROR, peer=peer, streamid=raw, reason=f"authorize: {exc}"
            )

        if not decision.accept:
            self._failed(peer, request.stream if request is not None else None, decision.reason_code,
                         decision.reason or f"rejected ({decision.reason_code})")
            fields: dict[str, object] = {"peer": peer, "streamid": raw, "reason": decision.reason}
            if parse_error is not None:
                fields["parse_error"] = parse_error
            if hsversion < 5:
                fields["hsversion"] = hsversion
            return self._reject(ns, decision.reason_code, ip=host, now=now, level=logging.INFO, **fields)

        try:
            if decision.passphrase:
                lib.setsockflag(ns, SockOpt.PASSPHRASE, decision.passphrase)
                if decision.pbkeylen:
                    lib.setsockflag(ns, SockOpt.PBKEYLEN, decision.pbkeylen)
            latency = self.latency_ms if decision.latency_ms is None else decision.latency_ms
            lib.setsockflag(ns, SockOpt.RCVLATENCY, latency)
            lib.setsockflag(ns, SockOpt.PEERLATENCY, latency)
        except SrtApiError as exc:
            return self._reject(
                ns, REJ_ISE, ip=None, now=now, level=logging.ERROR, peer=peer, streamid=raw, reason=str(exc)
            )

        with self._lock:
            self._pending[ns] = _Pending(request, raw, decision, peer, host, now)
        return 0

    # -- bridge sink (loop thread) --------------------------------------------

    def bridge_accepted(self, sock: int, peer: tuple[str, int], listener: int) -> None:
        with self._lock:
            pending = self._pending.pop(sock, None)
        bridge = self.bridge
        if pending is None or self._closing:
            bridge.close_socket(sock)
            if pending is None:
                event(log, logging.ERROR, "srt.accept_undecided", socket=sock, peer=format_peer(*peer),
                      note="accepted without a listen-callback decision; closed")
            return
        conn = SrtConnection(self, sock, pending, time.monotonic())
        wanted = pending.decision.pbkeylen
        if wanted and pending.decision.passphrase and conn.pbkeylen < wanted:
            # In caller-listener mode the caller's key length wins (libsrt 1.5),
            # so the stream's key length is a minimum, enforced here: a caller
            # with a shorter key is closed before anyone sees it.
            bridge.close_socket(sock)
            self._failed(conn.peer, conn.request.stream if conn.request else None, None,
                         f"key too short: the encoder uses AES-{conn.pbkeylen * 8}, the stream requires "
                         f"AES-{wanted * 8} or longer (set pbkeylen={wanted} or more)")
            with self._lock:
                self.counters.policy_closed += 1
            if self._limiter is not None:
                self._limiter.charge(pending.ip, time.monotonic())
            event(
                log,
                logging.INFO,
                "srt.policy_close",
                socket=sock,
                peer=conn.peer,
                streamid=conn.raw_streamid,
                reason=f"caller uses AES-{conn.pbkeylen * 8}, stream requires AES-{wanted * 8} or longer",
            )
            return
        self._connections[sock] = conn
        c = self.counters
        with self._lock:
            c.accepted += 1
            c.active = len(self._connections)
        req = conn.request
        event(
            log,
            logging.INFO,
            "srt.accept",
            socket=sock,
            peer=conn.peer,
            stream=req.stream if req else "-",
            action=req.action if req else "-",
            layer=(req.layer or "-") if req else "-",
            user=(req.user or "-") if req else "-",
            streamid=conn.raw_streamid,
            latency_ms=conn.latency_ms,
            encrypted=conn.encrypted,
            pbkeylen=conn.pbkeylen if conn.encrypted else 0,
            active=c.active,
        )
        try:
            self._on_connection(conn)
        except Exception:
            event(log, logging.ERROR, "srt.on_connection_failed", exc_info=True, socket=conn.socket_id, peer=conn.peer)
            self._finish(conn, "on_connection_error")

    def bridge_data(self, sock: int, messages: list[bytes], now: float) -> None:
        conn = self._connections.get(sock)
        if conn is None:
            return
        conn.messages_received += len(messages)
        conn.bytes_received += sum(map(len, messages))
        handler = conn.on_data
        if handler is None:
            conn.dropped_no_consumer += len(messages)
            return
        handler(messages, now)

    def bridge_closed(self, sock: int, reason: str) -> None:
        conn = self._connections.get(sock)
        if conn is None:
            # Not (or no longer) ours: closed locally already, or accepted
            # while the listener was closing.
            self.bridge.close_socket(sock)
            return
        self._finish(conn, reason)

    def _finish(self, conn: SrtConnection, reason: str) -> None:
        if conn.closed:
            return
        conn.closed = True
        conn.close_reason = reason
        self._connections.pop(conn.socket_id, None)
        final: dict[str, object] = {}
        try:
            conn.final_stats = conn._read_stats(clear=False)
        except SrtApiError:
            pass  # peer already gone: keep the last periodic sample
        fs = conn.final_stats
        if fs is not None:
            final = {k: fs[k] for k in ("pktRecv", "pktRcvLoss", "pktRcvRetrans", "pktRcvDrop", "pktSent", "pktSndDrop")}
            final["stats_age_s"] = round(time.monotonic() - float(fs["sampled_at"]), 3)
        self.bridge.close_socket(conn.socket_id)
        with self._lock:
            self.counters.closed += 1
            self.counters.active = len(self._connections)
        event(
            log,
            logging.INFO,
            "srt.close",
            socket=conn.socket_id,
            peer=conn.peer,
            streamid=conn.raw_streamid,
            reason=reason,
            duration_s=round(time.monotonic() - conn.connected_at, 3),
            bytes=conn.bytes_received,
            send_drops=conn.send_drops,
            **final,
        )
        handler = conn.on_close
        if handler is not None:
            try:
                handler(reason)
            except Exception:
                event(log, logging.ERROR, "srt.on_close_failed", exc_info=True, socket=conn.socket_id, peer=conn.peer)

    # -- periodic stats sample ------------------------------------------------

    def _sample_stats(self) -> None:
        if self._closing:
            return
        for conn in list(self._connections.values()):
            try:
                conn.final_stats = conn._read_stats(clear=False)
            except SrtApiError:
                pass  # broken, draining: keep the previous sample
        assert self._loop is not None
        self._sampler = self._loop.call_later(self._stats_interval_s, self._sample_stats)

    # -- handshake failures after our callback accepted ------------------------

    def _check_pending(self) -> None:
        """Find callers we accepted in the callback that libsrt then dropped
        (wrong or missing passphrase, handshake aborted): their socket is gone
        before ``srt_accept`` ever returned it."""
        lib = self._lib
        if lib is None or self._closing:
            return
        now = time.monotonic()
        with self._lock:
            candidates = list(self._pending.items())
        # libsrt is asked outside our lock: the listen callback takes this
        # lock on libsrt's thread, so never hold it while calling into libsrt.
        verdicts: list[tuple[int, _Pending, str]] = []
        for ns, p in candidates:
            state = lib.getsockstate(ns)
            if state in (SockStatus.CLOSED, SockStatus.NONEXIST):
                verdicts.append((ns, p, state.name.lower()))
            elif now - p.since > _PENDING_STALE_S:
                verdicts.append((ns, p, f"stale_{state.name.lower()}"))
        failed: list[tuple[int, _Pending, str]] = []
        with self._lock:
            for ns, p, state in verdicts:
                # still pending (not accepted meanwhile) and the same attempt
                if self._pending.get(ns) is p:
                    del self._pending[ns]
                    failed.append((ns, p, state))
            self.counters.handshake_failed += len(failed)
        for ns, p, state in failed:
            self._failed(p.peer, p.request.stream if p.request is not None else None, None,
                         "wrong or missing passphrase (or the encoder left during the handshake)"
                         if p.decision.passphrase else
                         "the encoder sent a passphrase but the stream is not encrypted (or it left during the "
                         "handshake)")
            tripped = self._limiter.charge(p.ip, now) if self._limiter is not None else False
            event(
                log,
                logging.INFO,
                "srt.handshake_failed",
                socket=ns,
                peer=p.peer,
                streamid=p.raw_streamid,
                state=state,
                encrypted=bool(p.decision.passphrase),
                reason=(
                    "wrong or missing passphrase (or the caller left mid-handshake)"
                    if p.decision.passphrase
                    else "caller sent a passphrase for an unencrypted stream (or left mid-handshake)"
                ),
            )
            if tripped:
                event(log, logging.WARNING, "srt.rate_limit", ip=p.ip,
                      note="further rejects of this IP skip authorize")
        assert self._loop is not None
        self._checker = self._loop.call_later(_PENDING_CHECK_S, self._check_pending)
