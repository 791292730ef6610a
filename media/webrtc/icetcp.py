"""ICE-TCP: passive TCP host candidates on one listening port (RFC 6544).

aioice 0.13 gathers only UDP candidates. For networks that block UDP this
module adds, to every WHEP/WHIP peer connection it is attached to, passive
TCP host candidates on one shared TCP port, and carries that session's
STUN, DTLS and SRTP over the connections the browser opens to it::

    browser (tcptype active) ──TCP──► IceTcpListener (one port)
                                          │ RFC 4571 frames (Framer)
                                          │ 1st frame: STUN Binding request,
                                          │ USERNAME "<our ufrag>:<theirs>",
                                          │ MESSAGE-INTEGRITY with our password
                                          ▼
                                      IceTcpSession (one per aioice Connection)
                                          │ frames → TcpStunProtocol.datagram_received(data, addr)
                                          ▼
                                      aioice Connection: checks, prflx candidate, nomination
                                          │ sends (STUN, DTLS, SRTP) → transport.sendto(data, addr)
                                          ▼
                                      the link whose remote address is ``addr``: framed,
                                      one ``transport.write`` per batch, dropped when full

A connection is anonymous until its first frame, which must be a STUN
Binding request whose USERNAME names a registered local ufrag and whose
MESSAGE-INTEGRITY verifies with that session's password (RFC 8445 §7.3,
RFC 6544 §7.2: "the first STUN message ... on a TCP connection" decides
which check it belongs to); anything else closes it. Bounds: connections in
total, connections still anonymous, connections per session, a deadline for
the first request, an idle deadline, a write buffer per connection.

With the ICE mux (media/webrtc/icemux.py) the TCP candidates carry the
mux's addresses (host or announced): :func:`attach` runs after the mux's
gathering hook and copies them. The listener keeps its own ufrag registry
rather than the mux's, so ICE-TCP also works with ``ice_mux = false`` and two
sessions that drew the same 4-character ufrag are told apart by integrity.

:class:`Framer` is sans-I/O (bytes in, frames out); :meth:`IceTcpListener.sweep`
takes ``now`` and is what the listener's one timer calls.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import secrets
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from aioice import Candidate, stun
from aioice.candidate import candidate_foundation, candidate_priority
from aioice.ice import StunProtocol

from ..log import event

log = logging.getLogger("returnfeed.webrtc.icetcp")

__all__ = [
    "FRAME_MAX", "FramedSender", "Framer", "FrameTooLarge", "IceTcpListener", "IceTcpSession",
    "IceTcpStats", "TcpStunProtocol", "attach", "frame", "tcp_candidate_priority",
]

#: Largest RFC 4571 frame accepted. Everything this path carries was made to
#: fit a UDP datagram on the same network: STUN checks (< 200 bytes), DTLS
#: records (browsers and aiortc fragment handshake flights to a ~1200-byte
#: MTU), RTP/RTCP (packetized to ~1200 bytes by every WebRTC stack, ours
#: included, plus the SRTP tag). An Ethernet MTU (1500) leaves room for all
#: of it; a bigger frame is not WebRTC and closes the connection instead of
#: making us buffer up to 64 KiB for each anonymous peer.
FRAME_MAX = 1500

_HEADER = struct.Struct("!H")

#: RFC 6544 §4.2: "the local preference for TCP candidates SHOULD be set ...
#: the direction-pref" — passive 4 (of 0..7, active 6, so-only 2), and the
#: RFC 8445 §5.1.2.2 recommendation that UDP be preferred when both work:
#: the type preference of a TCP host candidate is lowered below every
#: direct UDP candidate (host 126, prflx 110, srflx 100) and kept above a
#: relayed one (0): a browser that can reach us over UDP picks UDP, and one
#: that cannot prefers a direct TCP connection to a TURN relay.
TCP_HOST_TYPE_PREF = 90
TCP_PASSIVE_DIRECTION_PREF = 4


class FrameTooLarge(ValueError):
    """A frame's length prefix exceeds the negotiated maximum."""


def frame(data: bytes) -> bytes:
    """RFC 4571 §2: a 16-bit big-endian length, then the packet."""
    return _HEADER.pack(len(data)) + data


def tcp_candidate_priority(component: int, other_pref: int = 8191) -> int:
    """RFC 6544 §4.2: local preference = (2^13) * direction-pref + other-pref;
    priority per RFC 8445 §5.1.2.1 with the lowered TCP type preference."""
    local_pref = (1 << 13) * TCP_PASSIVE_DIRECTION_PREF + other_pref
    return (1 << 24) * TCP_HOST_TYPE_PREF + (1 << 8) * local_pref + (256 - component)


class Framer:
    """Split a TCP byte stream into RFC 4571 frames.

    ``feed(data)`` returns the frames completed by ``data`` (any split or
    coalescing of the stream). A zero-length frame is legal framing and
    carries nothing: it is skipped. A length over ``max_frame`` raises
    :class:`FrameTooLarge` (the connection must close: the stream can no
    longer be trusted to be in sync).
    """

    __slots__ = ("_buf", "max_frame")

    def __init__(self, max_frame: int = FRAME_MAX) -> None:
        self._buf = bytearray()
        self.max_frame = max_frame

    @property
    def pending(self) -> int:
        """Bytes held for an incomplete frame."""
        return len(self._buf)

    def take(self) -> bytes:
        """The bytes of an incomplete frame, removed (a connection handed to
        another process carries them along)."""
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf
        buf += data
        frames: list[bytes] = []
        pos = 0
        end = len(buf)
        while end - pos >= 2:
            (length,) = _HEADER.unpack_from(buf, pos)
            if length > self.max_frame:
                raise FrameTooLarge(f"frame of {length} bytes (max {self.max_frame})")
            if end - pos - 2 < length:
                break
            if length:
                frames.append(bytes(buf[pos + 2:pos + 2 + length]))
            pos += 2 + length
        if pos:
            del buf[:pos]
        return frames


@dataclass(slots=True)
class IceTcpStats:
    """Counters of one listener (Prometheus: ``returnfeed_webrtc_ice_tcp_*``)."""

    accepted: int = 0
    #: Closed before or at their first frame, by reason: ``limit`` (too many
    #: connections), ``not_stun``, ``unknown_ufrag``, ``bad_integrity``,
    #: ``session_limit``, ``oversized``.
    refused: dict[str, int] = field(default_factory=dict)
    #: Connections whose first request named another process's session
    #: (an egress worker, media/webrtc/icerelay.py), handed over to it.
    handed_off: int = 0
    #: Connections received from another process (the worker's listener).
    adopted: int = 0
    #: No valid first request within ``first_request_timeout``.
    timed_out: int = 0
    #: Bound connections closed after ``idle_timeout`` without a frame.
    idle_closed: int = 0
    #: Frames not written because the connection's write buffer was full.
    frames_dropped: int = 0
    frames_in: int = 0
    frames_out: int = 0

    def refuse(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1


class _Link(asyncio.Protocol):
    """One accepted TCP connection (asyncio side; decisions in the listener)."""

    def __init__(self, listener: "IceTcpListener", initial: bytes = b"") -> None:
        self.listener = listener
        self.framer = Framer(listener.max_frame)
        #: Bytes another process read from this connection before handing
        #: it over (IceTcpListener.adopt): parsed before anything new.
        self.initial = initial
        self.transport: asyncio.Transport | None = None
        self.peer: tuple[str, int] = ("", 0)
        self.local: tuple[str, int] = ("", 0)
        self.session: IceTcpSession | None = None
        self.deadline = 0.0  # first request, then idle
        self.closed = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername") or ("", 0)
        local = transport.get_extra_info("sockname") or ("", 0)
        self.peer = (peer[0], peer[1])
        self.local = (local[0], local[1])
        self.listener._accepted(self, time.monotonic())
        if self.initial and not self.closed:
            # asyncio adds the reader only after connection_made: these
            # bytes come first.
            data, self.initial = self.initial, b""
            self.data_received(data)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            frames = self.framer.feed(data)
        except FrameTooLarge:
            self.listener._oversized(self)
            return
        if frames:
            self.listener._frames(self, frames, time.monotonic())

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.listener._lost(self)

    # ours
    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()
            self.listener._lost(self)

    def write_many(self, datas: Iterable[bytes], limit: int) -> tuple[int, int]:
        """Frame and write ``datas`` with one ``transport.write``; return
        (bytes written, frames dropped). A full write buffer drops the whole
        batch: a viewer whose TCP window is closed loses packets as it would
        over UDP, and nothing here ever waits for it."""
        transport = self.transport
        datas = list(datas)
        if transport is None or self.closed or transport.is_closing():
            return 0, len(datas)
        payload = b"".join(_HEADER.pack(len(d)) + d for d in datas)
        if transport.get_write_buffer_size() + len(payload) > limit:
            return 0, len(datas)
        transport.write(payload)
        return len(payload), 0


class IceTcpListener:
    """The one ICE-TCP port of the process, and its ufrag registry."""

    def __init__(self, host: str | None, port: int, *, max_connections: int = 1024,
                 max_per_session: int = 8, max_anonymous: int | None = None,
                 first_request_timeout: float = 5.0, idle_timeout: float = 30.0,
                 write_limit: int = 512 * 1024, max_frame: int = FRAME_MAX) -> None:
        self.host = host
        self.port = port
        self.max_connections = max_connections
        #: A browser opens one connection per (its interface, our candidate):
        #: a few; a bound keeps one session from taking the whole pool.
        self.max_per_session = max_per_session
        #: Connections that have not authenticated yet may take at most a
        #: quarter of the pool: a flood of idle connects cannot lock out
        #: viewers that have an answer in hand.
        self.max_anonymous = max_anonymous if max_anonymous is not None else max(1, max_connections // 4)
        self.first_request_timeout = first_request_timeout
        #: RFC 7675 §5.1: consent expires after 30 s without a response; the
        #: browser's consent checks (every ~5 s) and media keep a live
        #: connection far busier than this.
        self.idle_timeout = idle_timeout
        self.write_limit = write_limit
        self.max_frame = max_frame
        self.stats = IceTcpStats()
        self.links: set[_Link] = set()
        self._anonymous = 0
        self._sessions: dict[str, list[IceTcpSession]] = {}
        self._server: asyncio.AbstractServer | None = None
        self._timer: asyncio.TimerHandle | None = None
        #: Address families the listening sockets accept (set by start()).
        self.families: set[int] = set()
        #: The ICE relay's hook for a first request no local session knows
        #: (media/webrtc/icerelay.py): ``(link, frames) -> False`` (not
        #: another process's either), ``True`` (handed over: the link is
        #: closed here, its socket lives on there) or a refusal reason.
        self.handoff: Any = None
        self._adopting: set[asyncio.Task] = set()

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        # "::" means every address of both families, as the ICE mux's
        # dual-stack UDP socket does; asyncio would make it IPv6-only
        # (IPV6_V6ONLY), so bind each family's wildcard instead.
        host = None if self.host in ("::", "") else self.host
        for _attempt in range(8):
            server = await loop.create_server(lambda: _Link(self), host, self.port, reuse_address=True)
            ports = {sock.getsockname()[1] for sock in server.sockets}
            if len(ports) == 1:
                break
            # Port 0 on every address (IPv4 and IPv6 sockets) gives each its
            # own port, but the candidates name one: try again on the first.
            chosen = server.sockets[0].getsockname()[1]
            server.close()
            await server.wait_closed()
            try:
                server = await loop.create_server(lambda: _Link(self), host, chosen, reuse_address=True)
                break
            except OSError:
                continue
        else:
            raise OSError(errno.EADDRINUSE, "no port free on every address for ICE-TCP")
        self._server = server
        self.port = server.sockets[0].getsockname()[1]
        self.families = {sock.family for sock in server.sockets}
        self._arm()
        event(log, logging.INFO, "webrtc.ice_tcp_listening", host=self.host or "*", port=self.port)

    def start_adopting(self, families: set[int]) -> None:
        """Run without a listening socket: connections arrive by
        :meth:`adopt` (an egress worker's listener; its candidates name
        main's port, ``self.port``)."""
        self.families = set(families)
        self._arm()

    def adopt(self, sock: socket.socket, initial: bytes = b"") -> None:
        """Serve a connection another process accepted and read ``initial``
        from (its first frames), under this listener's limits and
        deadlines."""
        self.stats.adopted += 1
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        task = loop.create_task(loop.connect_accepted_socket(lambda: _Link(self, initial), sock))
        self._adopting.add(task)
        task.add_done_callback(lambda t: self._adopted(t, sock))

    def _adopted(self, task: "asyncio.Task", sock: socket.socket) -> None:
        self._adopting.discard(task)
        if task.cancelled() or task.exception() is not None:
            # No transport owns the socket (the listener closed first).
            sock.close()
            if not task.cancelled():
                event(log, logging.INFO, "webrtc.ice_tcp_adopt_failed", detail=str(task.exception()))

    async def close(self) -> None:
        for task in list(self._adopting):
            task.cancel()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._server is not None:
            self._server.close()
        for link in list(self.links):
            link.close()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    @property
    def open_connections(self) -> int:
        return len(self.links)

    def reachable(self, host: str) -> bool:
        """Whether a candidate at ``host`` can reach this listener: one of
        its sockets has that address family (an IPv4-only bind must not
        offer IPv6 candidates that no socket answers)."""
        try:
            version = ipaddress.ip_address(host).version
        except ValueError:
            return False
        return (socket.AF_INET if version == 4 else socket.AF_INET6) in self.families

    def _arm(self) -> None:
        # One timer for every deadline: a sweep each second is exact enough
        # for 5 s / 30 s timeouts and costs one pass over the links.
        self._timer = asyncio.get_running_loop().call_later(1.0, self._tick)

    def _tick(self) -> None:
        self.sweep(time.monotonic())
        self._arm()

    def sweep(self, now: float) -> None:
        """Close connections past their deadline (first request or idle)."""
        for link in [link for link in self.links if link.deadline <= now]:
            if link.session is None:
                self.stats.timed_out += 1
                event(log, logging.DEBUG, "webrtc.ice_tcp_timeout", peer=link.peer)
            else:
                self.stats.idle_closed += 1
            link.close()

    # -- registry ------------------------------------------------------------------

    def register(self, session: "IceTcpSession") -> None:
        # Local ufrags are 4 random characters (aioice): two sessions may share
        # one, so the first request's integrity picks among them.
        self._sessions.setdefault(session.ufrag, []).append(session)

    def unregister(self, session: "IceTcpSession") -> None:
        found = self._sessions.get(session.ufrag)
        if found is not None and session in found:
            found.remove(session)
            if not found:
                del self._sessions[session.ufrag]

    def sessions(self, ufrag: str) -> list["IceTcpSession"]:
        return list(self._sessions.get(ufrag, ()))

    # -- connections (called by _Link) -------------------------------------------------

    def _accepted(self, link: _Link, now: float) -> None:
        if len(self.links) >= self.max_connections or self._anonymous >= self.max_anonymous:
            self.stats.refuse("limit")
            link.closed = True
            if link.transport is not None:
                link.transport.close()
            return
        self.links.add(link)
        self._anonymous += 1
        self.stats.accepted += 1
        link.deadline = now + self.first_request_timeout

    def _lost(self, link: _Link) -> None:
        if link not in self.links:
            return
        self.links.discard(link)
        if link.session is None:
            self._anonymous -= 1
        else:
            link.session._link_lost(link)

    def _oversized(self, link: _Link) -> None:
        self.stats.refuse("oversized")
        link.close()

    def _refuse(self, link: _Link, reason: str) -> None:
        self.stats.refuse(reason)
        event(log, logging.DEBUG, "webrtc.ice_tcp_refused", peer=link.peer, reason=reason)
        link.close()

    def _frames(self, link: _Link, frames: list[bytes], now: float) -> None:
        self.stats.frames_in += len(frames)
        session = link.session
        if session is None:
            session = self.authenticate(frames[0])
            if isinstance(session, str):
                if session == "unknown_ufrag" and self.handoff is not None:
                    taken = self.handoff(link, frames)
                    if taken is True:
                        self.stats.handed_off += 1
                        link.close()  # our descriptor only: the other process holds the connection
                        return
                    if isinstance(taken, str):
                        session = taken
                self._refuse(link, session)
                return
            if not session._bind(link):
                self._refuse(link, "session_limit")
                return
            self._anonymous -= 1
        link.deadline = now + self.idle_timeout
        for data in frames:
            if link.closed:
                return
            session._deliver(link, data)

    def authenticate(self, data: bytes) -> "IceTcpSession | str":
        """The session a connection's first frame belongs to, or why none.

        RFC 8445 §7.3: a Binding request is authenticated by its USERNAME
        (``<our ufrag>:<their ufrag>``) and MESSAGE-INTEGRITY, the HMAC with
        our password (RFC 8489 §14.5); the FINGERPRINT (RFC 8489 §14.7) is
        checked by the parser when present."""
        try:
            message = stun.parse_message(data)
        except ValueError:
            return "not_stun"
        if message.message_method != stun.Method.BINDING or message.message_class != stun.Class.REQUEST:
            return "not_stun"
        username = message.attributes.get("USERNAME")
        if not isinstance(username, str) or "MESSAGE-INTEGRITY" not in message.attributes:
            return "not_stun"
        ufrag, colon, _remote = username.partition(":")
        candidates = self._sessions.get(ufrag) if colon else None
        if not candidates:
            return "unknown_ufrag"
        for session in candidates:
            if message.check_message_integrity(session.password.encode("utf8")):
                return session
        return "bad_integrity"


class IceTcpSession:
    """The TCP side of one aioice ``Connection``: its passive candidates'
    protocols and the connections that authenticated for it."""

    def __init__(self, listener: IceTcpListener, connection: Any) -> None:
        self.listener = listener
        self.connection = connection
        self.ufrag: str = connection.local_username
        self.password: str = connection.local_password
        self.protocols: list[TcpStunProtocol] = []
        self.links: dict[tuple[str, int], _Link] = {}
        self.closed = False

    def add_candidates(self, hosts: Iterable[str], component: int = 1) -> list[Candidate]:
        """Create one passive host candidate (and its protocol) per address
        and register for the listener's connections (RFC 6544 §4.5:
        ``tcptype passive``, the port the listener is bound to)."""
        # The UDP gathering may have drawn a new ufrag since attach (the ICE
        # mux replaces one that clashes; an egress worker's always does).
        self.ufrag = self.connection.local_username
        self.password = self.connection.local_password
        made = []
        for i, host in enumerate(dict.fromkeys(hosts)):
            protocol = TcpStunProtocol(self.connection, self)
            protocol.local_candidate = Candidate(
                foundation=candidate_foundation("host", "tcp", host), component=component, transport="tcp",
                priority=tcp_candidate_priority(component, 8191 - i), host=host, port=self.listener.port,
                type="host", tcptype="passive")
            protocol.connection_made(_SessionTransport(self, protocol))
            self.protocols.append(protocol)
            made.append(protocol.local_candidate)
        if made:
            self.listener.register(self)
        return made

    # -- from the listener -------------------------------------------------------------

    def _bind(self, link: _Link) -> bool:
        if self.closed or len(self.links) >= self.listener.max_per_session:
            return False
        old = self.links.get(link.peer)
        if old is not None and old is not link:
            old.close()
        link.session = self
        self.links[link.peer] = link
        self._learn_remote(link.peer)
        return True

    def _learn_remote(self, addr: tuple[str, int]) -> None:
        # aioice learns a peer-reflexive candidate from an incoming check
        # (RFC 8445 §7.3.1.3) but always labels it "udp". Known first, it is
        # found by address and keeps the right transport (RFC 6544 §7.2.2:
        # the remote candidate of a passive connection is the active peer).
        conn = self.connection
        for c in conn._remote_candidates:
            if c._network_host == addr[0] and c.port == addr[1]:
                return
        conn._remote_candidates.append(Candidate(
            foundation=secrets.token_hex(5), component=1, transport="tcp",
            priority=candidate_priority(1, "prflx"), host=addr[0], port=addr[1], type="prflx",
            tcptype="active"))

    def _deliver(self, link: _Link, data: bytes) -> None:
        protocol = self._protocol_for(link)
        if protocol is not None:
            protocol.datagram_received(data, link.peer)

    def _protocol_for(self, link: _Link) -> "TcpStunProtocol | None":
        # The candidate whose address the browser dialled; behind a NAT
        # (announced addresses) none matches the socket's own: the first one.
        for protocol in self.protocols:
            if protocol.local_candidate.host == link.local[0]:
                return protocol
        return self.protocols[0] if self.protocols else None

    def _link_lost(self, link: _Link) -> None:
        if self.links.get(link.peer) is link:
            del self.links[link.peer]
        # The nominated pair's connection is the media path: when it goes,
        # the session's transport is gone (as a closed UDP socket would be),
        # rather than waiting 30 s for consent to expire.
        pair = self.connection._nominated.get(1)
        if pair is not None and pair.protocol in self.protocols and pair.remote_addr == link.peer:
            self.connection.protocol_lost(pair.protocol)

    # -- to the network ------------------------------------------------------------------

    def send(self, data: bytes, addr: tuple[str, int]) -> bool:
        """Send one packet to ``addr`` framed on its connection; False when
        there is none or its buffer is full (dropped, counted)."""
        link = self.links.get((addr[0], addr[1]))
        if link is None:
            # A check towards a browser's "tcptype active" candidate (port 9):
            # a passive candidate never connects out (RFC 6544 §6.2).
            return False
        written, dropped = link.write_many((data,), self.listener.write_limit)
        stats = self.listener.stats
        stats.frames_out += 1 - dropped
        stats.frames_dropped += dropped
        return not dropped

    def close_protocol(self, protocol: "TcpStunProtocol") -> None:
        if protocol in self.protocols:
            self.protocols.remove(protocol)
        if not self.protocols and not self.closed:
            self.closed = True
            self.listener.unregister(self)
            for link in list(self.links.values()):
                link.close()
            self.links.clear()


class _SessionTransport:
    """What aioice sees as a candidate's datagram transport."""

    #: Read by :class:`~media.webrtc.aiortc_adapter.FastPath`: send framed
    #: through :meth:`framed_sender`, not on a duplicated UDP socket.
    framed = True

    def __init__(self, session: IceTcpSession, protocol: "TcpStunProtocol") -> None:
        self.session = session
        self.protocol = protocol
        self._closing = False

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        if not self._closing:
            self.session.send(data, addr)

    def framed_sender(self, addr: tuple[str, int]) -> "FramedSender":
        return FramedSender(self.session, addr)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "sockname":
            return (self.protocol.local_candidate.host, self.protocol.local_candidate.port)
        return default

    def is_closing(self) -> bool:
        return self._closing

    def get_write_buffer_size(self) -> int:
        return 0

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self.session.close_protocol(self.protocol)
        asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)


class TcpStunProtocol(StunProtocol):
    """aioice's ``StunProtocol`` for a passive TCP candidate: the same STUN
    transactions and dispatch, over :class:`_SessionTransport`."""

    def __init__(self, receiver: Any, session: IceTcpSession) -> None:
        super().__init__(receiver)
        self.session = session

    def __repr__(self) -> str:
        return f"tcp-protocol({self.id})"


class _NoSocket:
    """:class:`FramedSender` owns no socket; FastPath closes "its" socket."""

    @staticmethod
    def close() -> None:
        return None


class FramedSender:
    """:class:`~media.webrtc.aiortc_adapter.DatagramSender`'s interface for
    an ICE-TCP pair: packets framed (RFC 4571) on the pair's connection, one
    ``transport.write`` per batch. No GSO (a byte stream has no datagrams).
    A full write buffer drops the batch (``backlogged``); no connection for
    the pair counts as an error (``ENOTCONN``) and starts ``failing_since``,
    so the session ends after its send-failure timeout."""

    __slots__ = ("session", "addr", "backlogged", "errors", "errors_by_errno", "last_errno",
                 "failing_since", "gso_fallbacks", "sock")

    #: The fan-out's per-frame path (aiortc_adapter.send_runs) builds GSO
    #: runs only for senders that have it; a frame here is one batch write.
    gso = False
    ancillary: list = []

    def __init__(self, session: IceTcpSession, addr: tuple[str, int]) -> None:
        self.session = session
        self.addr = addr
        self.backlogged = 0
        self.errors = 0
        self.errors_by_errno: dict[int, int] = {}
        self.last_errno: int | None = None
        self.failing_since: float | None = None
        self.gso_fallbacks = 0
        self.sock = _NoSocket()

    def send(self, data: bytes, now: float = 0.0) -> int:
        return self.send_batch([data], now)

    def send_batch(self, datas: list[bytes], now: float = 0.0) -> int:
        session = self.session
        link = session.links.get((self.addr[0], self.addr[1]))
        if link is None:
            code = errno.ENOTCONN
            self.errors += len(datas)
            self.errors_by_errno[code] = self.errors_by_errno.get(code, 0) + len(datas)
            self.last_errno = code
            if self.failing_since is None:
                self.failing_since = now
            return 0
        written, dropped = link.write_many(datas, session.listener.write_limit)
        stats = session.listener.stats
        if dropped:
            self.backlogged += dropped
            stats.frames_dropped += dropped
            return 0
        stats.frames_out += len(datas)
        self.failing_since = None
        # What went on the wire for the packets (the 2-byte prefixes excluded),
        # as DatagramSender reports payload bytes.
        return written - 2 * len(datas)


def attach(pc: Any, listener: IceTcpListener | None) -> None:
    """Offer passive TCP candidates on ``pc``'s ICE connections.

    Call before ``setLocalDescription`` (aiortc gathers there), after the
    ICE mux's own hook if any. Wraps each gatherer's
    ``Connection.gather_candidates``: after the UDP candidates are gathered
    (by aioice or the mux), one TCP candidate per distinct address among the
    UDP host ones — the same addresses, host or announced — that the
    listener's sockets can answer. The session unregisters when aioice
    closes its protocols.
    """
    if listener is None:
        return
    for connection in _ice_connections(pc):
        _wrap_gather(connection, listener)


def _ice_connections(pc: Any) -> list[Any]:
    # Every ICE transport aiortc's __gather gathers (bundled or not).
    return [ice._connection for ice in pc._RTCPeerConnection__iceTransports]


def _wrap_gather(connection: Any, listener: IceTcpListener) -> None:
    if getattr(connection, "_returnfeed_ice_tcp", None) is not None:
        return
    gather = connection.gather_candidates
    session = IceTcpSession(listener, connection)
    connection._returnfeed_ice_tcp = session

    async def gather_candidates() -> None:
        started = connection._local_candidates_start
        await gather()
        if started or connection._closing:
            return
        addresses = [c.host for c in connection._local_candidates
                     if c.transport.lower() == "udp" and c.type == "host" and listener.reachable(c.host)]
        made = session.add_candidates(addresses)
        connection._protocols.extend(session.protocols)
        connection._local_candidates.extend(made)

    connection.gather_candidates = gather_candidates


def check_internals() -> None:
    """Raise ``RuntimeError`` when an aioice internal this module uses moved
    (called by :func:`media.webrtc.aiortc_adapter.check_internals`)."""
    import inspect

    from aioice import Connection

    init_names = Connection.__init__.__code__.co_names
    for name in ("_local_candidates", "_local_candidates_start", "_protocols", "_remote_candidates",
                 "_nominated", "_closing"):
        if name not in init_names:
            raise RuntimeError(f"aioice.Connection no longer keeps {name}")
    if "tcptype" not in inspect.signature(Candidate.__init__).parameters:
        raise RuntimeError("aioice.Candidate no longer takes tcptype")
    # check_incoming finds the remote candidate of a check by address: the
    # prflx candidate _learn_remote adds must be the one it finds.
    src = inspect.getsource(Connection.check_incoming)
    if "c._network_host == addr[0] and c.port == addr[1]" not in src:
        raise RuntimeError("aioice.Connection.check_incoming no longer finds remote candidates by address")
    for method in (StunProtocol.send_data, StunProtocol.send_stun):
        if "self.transport.sendto" not in inspect.getsource(method):
            raise RuntimeError("aioice.StunProtocol no longer sends through transport.sendto")
    from aiortc import RTCPeerConnection

    if "_RTCPeerConnection__iceTransports" not in RTCPeerConnection.__init__.__code__.co_names:
        raise RuntimeError("RTCPeerConnection no longer keeps its ICE transports in __iceTransports")
    if not callable(getattr(Connection, "protocol_lost", None)):
        raise RuntimeError("aioice.Connection.protocol_lost is gone")
