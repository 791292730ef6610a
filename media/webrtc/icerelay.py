"""The ICE relay: egress worker processes keep the one shared ICE port
(issue 15; the mux is media/webrtc/icemux.py, issue 14).

WHEP viewers live in egress worker processes (own event loop, own aiortc),
but every WebRTC session must stay on the main process's one ICE UDP port
(and its optional ICE-TCP port): the port is what the firewall, the
container's published ports and the announced 1:1 NAT address name. The
heavy path must not cross processes: a worker sends SRTP (FastPath, GSO
batches) itself, on a duplicate of the shared socket's descriptor::

    main process                                       worker process i
    UDP :8189 ─recvmsg─► MuxTable.route (IceMux)
        local session (WHIP) ──► its StunProtocol
        worker's ufrag/address/transaction
            ──► IceRelayHub ══ relay socket (SOCK_SEQPACKET) ══► RelayedIceMux
                 DATA: ufrag, remote, verified local, datagram     └► StunProtocol (aioice)
                                                                 ◄══ SEND: a STUN request
        main notes its transaction id, then sends it ◄───────────┘   (checks, consent)
    the same UDP socket (a dup of the fd) ◄──── DTLS, STUN responses, SRTP (FastPath)
                                                 sent by the worker directly, from the
                                                 IP_PKTINFO source the peer checked
    ICE-TCP listener: first Binding request for a worker's ufrag, integrity
        verified ──► the connection's fd (+ the bytes already read) ══ TCP ══► worker's
                                                 IceTcpListener.adopt: same framing code

Routing in main stays :class:`~media.webrtc.icemux.MuxTable`'s: a worker's
session is an entry whose target is a :class:`~media.webrtc.icemux.RemoteTarget`
(one per worker), registered by :meth:`IceRelayHub.register` with the
ice-ufrag/ice-pwd of the worker's answer (before the answer reaches the
client) and again by the worker itself at gathering (idempotent). STUN
requests learn verified addresses with the session's password (RFC 8489
§14.5) in main, exactly as for local sessions; a STUN response finds its
session by the transaction id main registered *before* it sent the request
(so a response cannot race its registration); DTLS/SRTP/SRTCP by learned
address.

Wire format of the relay socket (sans-I/O :func:`encode` / :func:`decode`;
one message per datagram, so SOCK_SEQPACKET keeps the boundaries and the
order): an 8-byte header ``kind, flags, len(ufrag), len(remote ip),
len(local ip), 0, remote port`` (network order), then the three strings
(UTF-8 ufrag, IP addresses as text) and the payload.

========== ============ ===================================================
kind       direction    meaning
========== ============ ===================================================
DATA       main→worker  a datagram for ``ufrag`` from ``remote``;
                        flag VERIFIED: main learned ``remote`` from a
                        verified request sent to our ``local`` address
SEND       worker→main  a STUN request to send to ``remote`` (payload)
REGISTER   worker→main  ``ufrag`` with its password (payload) is the worker's
UNREGISTER worker→main  ``ufrag`` closed
TCP        main→worker  an ICE-TCP connection (SCM_RIGHTS fd) for ``ufrag``;
                        payload: the RFC 4571 bytes main already read
========== ============ ===================================================

Wiring (the egress host, server/egress_host.py)::

    # main
    hub = IceRelayHub(mux, ice_tcp)                  # once
    main_end, worker_end = relay_socketpair()        # per worker
    hub.add_worker(i, main_end)
    spawn(worker, hub.worker_handoff(), worker_end, hub.udp_socket)   # spawn args or send_fds
    ufrag, pwd = answer_credentials(answer_sdp)      # before answering the HTTP request
    hub.register(ufrag, pwd, i)
    hub.remove_worker(i)                             # the worker exited (EOF does it too)
    # worker
    mux = RelayedIceMux(handoff, relay_sock, udp_sock); await mux.start()
    mux.attach(pc)    # as IceMux.attach; also offers main's ICE-TCP port (mux.ice_tcp)

ICE-TCP limits: until the handoff a connection is main's (its total and
anonymous limits, the first-request deadline; a wrong password is refused
there and never reaches a worker); from then on the worker's listener's,
built with main's limits (:class:`TcpHandoff`): per session, idle deadline,
write buffer, and a total per worker.

Every queue is bounded: the relay socket's send buffer (a full one drops
the datagram and counts it, as a full UDP buffer would; STUN and DTLS
retransmit, SRTCP is periodic). A worker that dies (EOF on its relay socket,
or :meth:`IceRelayHub.remove_worker`) loses its routes at once; its
viewers' datagrams are then dropped as unknown and counted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from dataclasses import dataclass
from typing import Any, Callable

from ..log import event
from . import icetcp
from .icemux import (
    IceMux,
    IceMuxConfig,
    MuxEntry,
    MuxSession,
    RemoteTarget,
    _random_ufrag,
    check_integrity,
    stun_class,
    stun_username,
)

log = logging.getLogger("returnfeed.webrtc.icerelay")

__all__ = [
    "DATA", "SEND", "REGISTER", "UNREGISTER", "TCP", "VERIFIED", "IceRelayHub", "RelayError", "RelayHandoff",
    "RelayMessage", "RelayStats", "RelayedIceMux", "TcpHandoff", "WorkerRelayStats", "answer_credentials",
    "decode", "encode", "relay_socketpair",
]

DATA, SEND, REGISTER, UNREGISTER, TCP = 1, 2, 3, 4, 5
_KINDS = frozenset((DATA, SEND, REGISTER, UNREGISTER, TCP))
#: DATA flag: main verified the remote address (a Binding request with a
#: valid MESSAGE-INTEGRITY came from it, to ``local``).
VERIFIED = 1

_HDR = struct.Struct("!BBBBBBH")  # kind, flags, len ufrag, len remote, len local, pad, remote port
#: Largest relay message: a UDP datagram (64 KiB) plus the header and names.
MAX_MESSAGE = 65536 + 1024
#: The relay socket's kernel buffers: ~3,600 relayed 1,200-byte datagrams
#: (measured on a socketpair), a busy worker's backlog of RTCP and checks.
RELAY_BUFFER_BYTES = 4 * 1024 * 1024
#: DATA headers cached per worker (cleared when full).
_MAX_HEADERS = 4096
#: Messages read per readiness callback before other callbacks get a turn.
_READ_BATCH = 64


#: Descriptors a worker keeps free beside its viewers' sockets (receive_direct):
#: its relay, feed and control sockets, ICE-TCP connections handed over.
_FD_RESERVE = 256


def open_files_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit (a
    worker holds a socket per viewer, receive_direct) and return it."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


_FD_SPACE = socket.CMSG_SPACE(struct.calcsize("i"))
_NO_FDS: list[int] = []


def _fds(anc: list[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors an SCM_RIGHTS message carried."""
    out: list[int] = []
    for level, kind, value in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(value) - len(value) % 4
            out += struct.unpack(f"{usable // 4}i", value[:usable])
    return out


class RelayError(ValueError):
    """A relay message that does not parse (never from a healthy peer)."""


@dataclass(slots=True)
class RelayMessage:
    kind: int
    ufrag: str
    remote: tuple[str, int] | None = None
    local: str | None = None
    payload: bytes = b""
    flags: int = 0


def encode(kind: int, ufrag: str, remote: tuple[str, int] | None = None, local: str | None = None,
           payload: bytes = b"", flags: int = 0) -> bytes:
    u = ufrag.encode("utf-8")
    r = remote[0].encode("ascii") if remote is not None else b""
    lo = local.encode("ascii") if local else b""
    if len(u) > 255 or len(r) > 255 or len(lo) > 255:
        raise RelayError("relay header field too long")
    port = remote[1] if remote is not None else 0
    return _HDR.pack(kind, flags, len(u), len(r), len(lo), 0, port) + u + r + lo + payload


def decode(data: bytes) -> RelayMessage:
    """Parse one relay message; raises :class:`RelayError` on garbage."""
    if len(data) < _HDR.size:
        raise RelayError("short relay message")
    kind, flags, lu, lr, ll, _pad, port = _HDR.unpack_from(data)
    if kind not in _KINDS:
        raise RelayError(f"unknown relay message kind {kind}")
    pos = _HDR.size
    end = pos + lu + lr + ll
    if end > len(data):
        raise RelayError("truncated relay message")
    try:
        ufrag = data[pos:pos + lu].decode("utf-8")
        rip = data[pos + lu:pos + lu + lr].decode("ascii")
        lip = data[pos + lu + lr:end].decode("ascii")
    except UnicodeDecodeError:
        raise RelayError("relay message names do not decode") from None
    return RelayMessage(kind, ufrag, (rip, port) if lr else None, lip or None, bytes(data[end:]), flags)


def answer_credentials(sdp: str) -> tuple[str, str]:
    """The ice-ufrag and ice-pwd of an SDP (session level or the first media
    section: aiortc bundles, so every section repeats the same pair)."""
    ufrag = pwd = None
    for line in sdp.splitlines():
        if ufrag is None and line.startswith("a=ice-ufrag:"):
            ufrag = line.split(":", 1)[1].strip()
        elif pwd is None and line.startswith("a=ice-pwd:"):
            pwd = line.split(":", 1)[1].strip()
    if not ufrag or not pwd:
        raise ValueError("the SDP has no ice-ufrag/ice-pwd")
    return ufrag, pwd


def relay_socketpair(buffer_bytes: int = RELAY_BUFFER_BYTES) -> tuple[socket.socket, socket.socket]:
    """A connected (main end, worker end) relay socket pair with bounded,
    enlarged buffers (SO_SNDBUFFORCE when permitted, else capped by
    net.core.wmem_max)."""
    pair = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for sock in pair:
        for force, plain in ((getattr(socket, "SO_SNDBUFFORCE", None), socket.SO_SNDBUF),
                             (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF)):
            try:
                if force is None:
                    raise PermissionError
                sock.setsockopt(socket.SOL_SOCKET, force, buffer_bytes)
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, plain, buffer_bytes)
    return pair


# -- handoff (picklable: it crosses the spawn boundary) ---------------------------------


@dataclass(slots=True, frozen=True)
class TcpHandoff:
    """The main ICE-TCP listener's port, families and per-connection limits,
    so the worker's candidates name the same port and its adopted
    connections keep today's limits."""

    port: int
    families: tuple[int, ...]
    max_connections: int
    max_per_session: int
    first_request_timeout: float
    idle_timeout: float
    write_limit: int
    max_frame: int


@dataclass(slots=True, frozen=True)
class RelayHandoff:
    """What a worker needs to offer the main process's candidates. The UDP
    socket itself travels beside it (:attr:`IceRelayHub.udp_socket`, by
    ``socket.send_fds`` or as a spawn argument)."""

    config: IceMuxConfig
    addresses: tuple[str, ...]
    port: int
    sndbuf: int
    tcp: TcpHandoff | None = None
    #: Main's socket lets this worker receive its viewers' datagrams on
    #: sockets of its own (:func:`media.webrtc.icemux.share_port`).
    direct: bool = False


# -- main side --------------------------------------------------------------------------


@dataclass(slots=True)
class RelayStats:
    """Counters of one worker's relay (main side)."""

    relayed_packets: int = 0
    relayed_bytes: int = 0
    #: Datagrams for the worker dropped because its relay socket was full
    #: (or already gone).
    dropped_full: int = 0
    requests_sent: int = 0
    registered: int = 0
    unregistered: int = 0
    register_conflicts: int = 0
    tcp_handed_off: int = 0
    tcp_handoff_failed: int = 0
    bad_messages: int = 0


class _Worker(RemoteTarget):
    """A worker as a MuxTable target: what main delivers its datagrams to."""

    def __init__(self, hub: "IceRelayHub", worker_id: int, sock: socket.socket) -> None:
        self.hub = hub
        self.worker_id = worker_id
        self.sock = sock
        self.ufrags: set[str] = set()
        self.stats = RelayStats()
        #: (ufrag, remote, local) -> the DATA header of a verified address:
        #: the steady state (a viewer's RTCP) encodes nothing per datagram.
        self.headers: dict[tuple[str, tuple[str, int], str | None], bytes] = {}

    def deliver(self, entry: MuxEntry, data: bytes, addr: tuple[str, int]) -> None:
        # Only a verified request puts an address in ``entry.addresses``
        # (with the local address it was sent to, when the kernel said).
        addresses = entry.addresses
        if addr in addresses:
            key = (entry.ufrag, addr, addresses[addr])
            header = self.headers.get(key)
            if header is None:
                if len(self.headers) >= _MAX_HEADERS:
                    self.headers.clear()
                header = self.headers[key] = encode(DATA, entry.ufrag, addr, addresses[addr], b"", VERIFIED)
        else:
            header = encode(DATA, entry.ufrag, addr, None, b"")
        self.send((header, data), len(data))

    def send(self, message: Any, size: int) -> bool:
        try:
            if type(message) is tuple:
                self.sock.sendmsg(message)  # header and datagram: one SEQPACKET message
            else:
                self.sock.send(message)
        except OSError:
            # Full (a busy worker: bounded, like a UDP buffer) or gone (EOF
            # is on its way to the reader, which drops the routes).
            self.stats.dropped_full += 1
            return False
        self.stats.relayed_packets += 1
        self.stats.relayed_bytes += size
        return True


class IceRelayHub:
    """Main side: the mux's routes for worker-owned sessions, the relay
    sockets, and ICE-TCP handoff."""

    def __init__(self, mux: IceMux, ice_tcp: icetcp.IceTcpListener | None = None) -> None:
        self.mux = mux
        self.ice_tcp = ice_tcp
        self.workers: dict[int, _Worker] = {}
        self._retired = RelayStats()  # counters of removed workers
        if ice_tcp is not None:
            ice_tcp.handoff = self._tcp_handoff

    @property
    def udp_socket(self) -> socket.socket:
        """The shared ICE UDP socket a worker duplicates (send its fd)."""
        if self.mux.sock is None:
            raise RuntimeError("the ICE mux is not started")
        return self.mux.sock

    def worker_handoff(self) -> RelayHandoff:
        mux = self.mux
        tcp = None
        lst = self.ice_tcp
        if lst is not None and lst.families:
            tcp = TcpHandoff(lst.port, tuple(sorted(lst.families)), lst.max_connections, lst.max_per_session,
                             lst.first_request_timeout, lst.idle_timeout, lst.write_limit, lst.max_frame)
        return RelayHandoff(mux.config, tuple(mux.addresses), mux.port, mux.sndbuf, tcp, mux.direct_receive)

    # -- workers ---------------------------------------------------------------------

    def add_worker(self, worker_id: int, sock: socket.socket) -> None:
        """Serve a worker on ``sock`` (the main end of its relay socket)."""
        if worker_id in self.workers:
            raise KeyError(f"egress worker {worker_id} already has a relay")
        sock.setblocking(False)
        worker = _Worker(self, worker_id, sock)
        self.workers[worker_id] = worker
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable, worker)

    def remove_worker(self, worker_id: int) -> None:
        """Drop every route of the worker now (it died or was stopped) and
        close its relay socket."""
        worker = self.workers.pop(worker_id, None)
        if worker is None:
            return
        table = self.mux.table
        for ufrag in list(worker.ufrags):
            entry = table.by_ufrag.get(ufrag)
            if entry is not None and entry.target is worker:
                table.unregister(entry)
        worker.ufrags.clear()
        for name in RelayStats.__dataclass_fields__:
            setattr(self._retired, name, getattr(self._retired, name) + getattr(worker.stats, name))
        try:
            asyncio.get_running_loop().remove_reader(worker.sock.fileno())
        except (RuntimeError, ValueError):
            pass
        worker.sock.close()
        event(log, logging.INFO, "webrtc.ice_relay_worker_removed", worker=worker_id)

    def close(self) -> None:
        for worker_id in list(self.workers):
            self.remove_worker(worker_id)
        if self.ice_tcp is not None and self.ice_tcp.handoff == self._tcp_handoff:
            self.ice_tcp.handoff = None

    def stats(self, worker_id: int) -> RelayStats:
        return self.workers[worker_id].stats

    def totals(self) -> RelayStats:
        """Every worker's counters summed, those of removed workers included
        (monotonic, for Prometheus counters)."""
        out = RelayStats()
        for st in [self._retired, *(w.stats for w in self.workers.values())]:
            for name in RelayStats.__dataclass_fields__:
                setattr(out, name, getattr(out, name) + getattr(st, name))
        return out

    # -- routes ----------------------------------------------------------------------

    def register(self, ufrag: str, pwd: str, worker_id: int) -> None:
        """Route ``ufrag`` (and what its verified checks teach) to the
        worker. The same registration again is a no-op; a ufrag another
        session holds raises ``KeyError``."""
        worker = self.workers[worker_id]
        key = pwd.encode("utf-8")
        table = self.mux.table
        entry = table.by_ufrag.get(ufrag)
        if entry is not None:
            if entry.target is worker and entry.key == key:
                return
            worker.stats.register_conflicts += 1
            raise KeyError(f"ICE ufrag {ufrag!r} is already registered")
        table.register(ufrag, key, worker)
        worker.ufrags.add(ufrag)
        worker.stats.registered += 1

    def unregister(self, ufrag: str) -> None:
        entry = self.mux.table.by_ufrag.get(ufrag)
        if entry is None or not isinstance(entry.target, _Worker):
            return
        worker: _Worker = entry.target
        self.mux.table.unregister(entry)
        worker.ufrags.discard(ufrag)
        worker.stats.unregistered += 1

    def worker_of(self, ufrag: str) -> int | None:
        entry = self.mux.table.by_ufrag.get(ufrag)
        return entry.target.worker_id if entry is not None and isinstance(entry.target, _Worker) else None

    # -- from a worker ---------------------------------------------------------------

    def _readable(self, worker: _Worker) -> None:
        sock = worker.sock
        for _ in range(_READ_BATCH):
            try:
                data = sock.recv(MAX_MESSAGE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                # EOF: the worker exited or crashed. Its viewers reconnect;
                # nobody else may keep receiving its datagrams.
                self.remove_worker(worker.worker_id)
                return
            try:
                self._message(worker, decode(data))
            except (ValueError, KeyError) as exc:  # RelayError, a password that is not UTF-8, a clash
                worker.stats.bad_messages += 1
                event(log, logging.WARNING, "webrtc.ice_relay_bad_message", worker=worker.worker_id,
                      detail=str(exc))

    def _message(self, worker: _Worker, msg: RelayMessage) -> None:
        table = self.mux.table
        if msg.kind == SEND:
            entry = table.by_ufrag.get(msg.ufrag)
            if entry is None or entry.target is not worker or msg.remote is None:
                return  # unregistered meanwhile: its checks are moot
            if stun_class(msg.payload) != 0:
                # Main sends only what it must know the transaction of; the
                # rest the worker sends itself.
                raise RelayError("SEND carries no STUN request")
            # Registered before the request leaves: the response cannot race it.
            table.note_request(entry, msg.payload)
            self.mux.send_datagram(msg.payload, msg.remote)
            worker.stats.requests_sent += 1
        elif msg.kind == REGISTER:
            self.register(msg.ufrag, msg.payload.decode("utf-8"), worker.worker_id)
        elif msg.kind == UNREGISTER:
            entry = table.by_ufrag.get(msg.ufrag)
            if entry is not None and entry.target is worker:
                self.unregister(msg.ufrag)
        else:
            raise RelayError(f"relay message kind {msg.kind} is not for main")

    # -- ICE-TCP ---------------------------------------------------------------------

    def _tcp_handoff(self, link: Any, frames: list[bytes]) -> bool | str:
        """The listener's hook for a first frame no local session knows:
        ``False`` (not a worker's), a refusal reason, or ``True`` (the
        connection now belongs to the worker)."""
        first = frames[0]
        username = stun_username(first) if stun_class(first) == 0 else None
        if username is None:
            return False
        ufrag, colon, _ = username.partition(":")
        entry = self.mux.table.by_ufrag.get(ufrag) if colon else None
        if entry is None or not isinstance(entry.target, _Worker):
            return False
        worker: _Worker = entry.target
        # RFC 8445 §7.3 / RFC 6544 §7.2: the first request must verify with
        # the session's password before the connection is anyone's.
        if not check_integrity(first, entry.key):
            return "bad_integrity"
        transport = link.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is None:
            return "handoff_failed"
        pending = b"".join(icetcp.frame(f) for f in frames) + link.framer.take()
        fd = os.dup(sock.fileno())
        try:
            socket.send_fds(worker.sock, [encode(TCP, ufrag, link.peer, link.local[0], pending)], [fd])
        except OSError:
            worker.stats.tcp_handoff_failed += 1
            return "handoff_failed"
        finally:
            os.close(fd)
        worker.stats.tcp_handed_off += 1
        return True


# -- worker side ------------------------------------------------------------------------


@dataclass(slots=True)
class WorkerRelayStats:
    """Counters of the worker's end of the relay."""

    requests_via_main: int = 0
    #: Messages to main dropped (its end full or gone); STUN retransmits.
    to_main_dropped: int = 0
    tcp_adopted: int = 0
    bad_messages: int = 0
    sent_direct: int = 0
    main_lost: bool = False
    #: Viewers' sockets of this worker on the shared port (receive_direct):
    #: opened, refused (the kernel's source for the viewer is not the
    #: address it checked, the bind failed, no descriptors to spare); their
    #: datagrams. Open now: RelayedIceMux.direct_open.
    direct_opened: int = 0
    direct_refused: int = 0
    direct_received: int = 0


class RelayedIceMux(IceMux):
    """Worker side: the same ``attach(pc)`` / counters / port / ``sessions``
    API as :class:`IceMux`, on the main process's socket.

    It never reads the UDP socket (a read would steal main's datagrams):
    datagrams arrive over the relay socket. It sends DTLS, STUN responses
    and (through ``MuxTransport.mux_socket``, unchanged) FastPath's SRTP on
    its duplicate of the socket, from the IP_PKTINFO source the peer
    checked; STUN requests go through main, which registers the transaction
    first."""

    def __init__(self, handoff: RelayHandoff, relay_sock: socket.socket, udp_sock: socket.socket) -> None:
        super().__init__(handoff.config)
        self.handoff = handoff
        self.relay_sock = relay_sock
        self._udp = udp_sock
        self.addresses = list(handoff.addresses)
        self._family = udp_sock.family
        self.sndbuf = handoff.sndbuf
        self.relay_stats = WorkerRelayStats()
        #: Relay messages are read into one buffer, not a fresh 64 KiB one
        #: per read (the read that finds the socket empty included).
        self._rbuf = bytearray(MAX_MESSAGE)
        #: DATA headers (their bytes) already decoded → (ufrag, remote,
        #: local, flags): a viewer's RTCP decodes no names per datagram.
        self._heads: dict[bytes, tuple[str, tuple[str, int], str | None, int]] = {}
        #: ufrag → the socket connected to that viewer (receive_direct).
        self._direct: dict[str, socket.socket] = {}
        #: At most this many (set at start from the open-files limit); the
        #: viewers beyond them keep the relay.
        self.max_direct = 0
        #: Called once when main's end of the relay closes (main exited):
        #: nothing reaches this worker's sessions any more.
        self.on_main_lost: Callable[[], None] | None = None
        self.ice_tcp: icetcp.IceTcpListener | None = None
        if handoff.tcp is not None:
            t = handoff.tcp
            self.ice_tcp = icetcp.IceTcpListener(None, t.port, max_connections=t.max_connections,
                                                 max_per_session=t.max_per_session,
                                                 first_request_timeout=t.first_request_timeout,
                                                 idle_timeout=t.idle_timeout, write_limit=t.write_limit,
                                                 max_frame=t.max_frame)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._udp.setblocking(False)
        self.relay_sock.setblocking(False)
        self.sock = self._udp
        self.sockname = self._udp.getsockname()[:2]
        self._loop = loop
        if self.handoff.direct:
            self.max_direct = max(0, open_files_limit() - _FD_RESERVE)
        loop.add_reader(self.relay_sock.fileno(), self._relay_readable)
        if self.ice_tcp is not None and self.handoff.tcp is not None:
            self.ice_tcp.start_adopting(set(self.handoff.tcp.families))
        event(log, logging.INFO, "webrtc.ice_relay_worker_started", port=self.handoff.port,
              candidates=",".join(self.addresses), tcp=self.ice_tcp is not None)

    async def close(self) -> None:
        for session in list(self.sessions.values()):
            self._unregister(session)
        for ufrag in list(self._direct):
            self._close_direct(ufrag)
        if self.ice_tcp is not None:
            await self.ice_tcp.close()
        if self._loop is not None and self.relay_sock.fileno() >= 0:
            self._loop.remove_reader(self.relay_sock.fileno())
        self.relay_sock.close()
        if self.sock is not None:
            self.sock.close()  # our duplicate; main's socket stays open
        self.sock = None

    def attach(self, pc: Any) -> None:
        """Put ``pc``'s ICE connections on the shared UDP port, and on the
        main ICE-TCP port when main has one."""
        super().attach(pc)
        icetcp.attach(pc, self.ice_tcp)

    # -- to main / to the network ------------------------------------------------------

    def _to_main(self, message: bytes) -> None:
        try:
            self.relay_sock.send(message)
        except OSError:
            self.relay_stats.to_main_dropped += 1

    def send(self, session: MuxSession, protocol: Any, data: bytes, addr: Any) -> None:
        entry = session.entry
        if entry is not None and data and data[0] < 4 and stun_class(data) == 0:
            # A check or consent request: main must know its transaction
            # before the response can arrive, so main sends it.
            self.table.note_request(entry, data, protocol)
            self.relay_stats.requests_via_main += 1
            self._to_main(encode(SEND, entry.ufrag, (addr[0], addr[1]), None, data))
            return
        self.relay_stats.sent_direct += 1
        super().send(session, protocol, data, addr)

    # -- sessions ------------------------------------------------------------------

    def _hook(self, connection: Any) -> None:
        if getattr(connection, "_returnfeed_mux", None) is None and not connection._local_candidates_start:
            # Main's table holds every process's ufrags; this process cannot
            # see the others, so draw from 62^8 rather than aioice's 62^4
            # (before anything, ICE-TCP included, reads it).
            connection._local_username = _random_ufrag()
        super()._hook(connection)

    async def _gather(self, session: MuxSession) -> None:
        await super()._gather(session)
        if session.entry is not None:
            self._to_main(encode(REGISTER, session.entry.ufrag, payload=session.entry.key))

    def _unregister(self, session: MuxSession) -> None:
        entry = session.entry
        if entry is not None:
            self._close_direct(entry.ufrag)
        super()._unregister(session)
        if entry is not None and self.relay_sock.fileno() >= 0:
            self._to_main(encode(UNREGISTER, entry.ufrag))

    # -- straight from the viewer -----------------------------------------------------

    def receive_direct(self, connection: Any) -> bool:
        """Once ``connection`` (an aioice Connection of this mux) has its
        nominated pair: receive that viewer's datagrams here, on a socket
        bound to the shared port and connected to the viewer, instead of
        through main (one wake-up, read and relay send fewer per datagram;
        loadtests/README.md "Wake-ups"). False where main's socket does not
        share its port, for IPv6, without a nominated pair, beyond
        ``max_direct`` sockets, or when the kernel's source address for the
        viewer is not the one it checked (its datagrams keep coming through
        main, as before)."""
        if not self.handoff.direct or self._loop is None:
            return False
        session = self.sessions.get(connection.local_username)
        pair = connection._nominated.get(1)
        entry = session.entry if session is not None else None
        if entry is None or not entry.registered or pair is None:
            return False
        addr = (pair.remote_addr[0], pair.remote_addr[1])
        if ":" in addr[0]:
            return False
        self._close_direct(entry.ufrag)
        if len(self._direct) >= self.max_direct:
            self.relay_stats.direct_refused += 1
            return False
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(("0.0.0.0", self.handoff.port))
            sock.connect(addr)
            local, source = entry.addresses.get(addr), sock.getsockname()[0]
            if local is not None and source != local:
                # Its datagrams to ``local`` would never reach this socket.
                raise OSError(f"the route's source {source} is not the address the viewer checked ({local})")
        except OSError as exc:
            sock.close()
            self.relay_stats.direct_refused += 1
            event(log, logging.DEBUG, "webrtc.ice_direct_refused", ufrag=entry.ufrag, detail=str(exc))
            return False
        self._loop.add_reader(sock.fileno(), self._direct_readable, entry.ufrag, sock)
        self._direct[entry.ufrag] = sock
        self.relay_stats.direct_opened += 1
        return True

    @property
    def direct_open(self) -> int:
        """Viewers' sockets of this worker open now (receive_direct)."""
        return len(self._direct)

    def _direct_readable(self, ufrag: str, sock: socket.socket) -> None:
        view = memoryview(self._rbuf)
        for _ in range(_READ_BATCH):
            try:
                n, addr = sock.recvfrom_into(view)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # An ICMP error for a datagram sent to this viewer from the
                # shared socket lands on the socket connected to it: as on
                # main's socket, consent freshness ends such sessions.
                self.table.counters.send_errors += 1
                continue
            self.relay_stats.direct_received += 1
            # Its address was verified before the socket was opened; the
            # kernel delivers only the connected peer's datagrams here.
            self._deliver(ufrag, (addr[0], addr[1]), None, 0, bytes(view[:n]))

    def _close_direct(self, ufrag: str) -> None:
        sock = self._direct.pop(ufrag, None)
        if sock is None:
            return
        if self._loop is not None and sock.fileno() >= 0:
            self._loop.remove_reader(sock.fileno())
        sock.close()

    # -- from main -------------------------------------------------------------------

    def _relay_readable(self) -> None:
        sock = self.relay_sock
        view = memoryview(self._rbuf)
        heads = self._heads
        hdr = _HDR.size
        for _ in range(_READ_BATCH):
            try:
                n, anc, _flags, _addr = sock.recvmsg_into((view,), _FD_SPACE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                n, anc = 0, []
            fds = _fds(anc) if anc else _NO_FDS
            if not n:
                for fd in fds:
                    os.close(fd)
                self._main_lost()
                return
            if not anc and n >= hdr and view[0] == DATA:
                # The steady state: a DATA message whose header was seen before.
                end = hdr + view[2] + view[3] + view[4]
                if end <= n:
                    key = bytes(view[:end])
                    head = heads.get(key)
                    if head is None:
                        try:
                            msg = decode(key)
                        except RelayError:
                            self.relay_stats.bad_messages += 1
                            continue
                        if msg.remote is None:
                            self.relay_stats.bad_messages += 1
                            continue
                        if len(heads) >= _MAX_HEADERS:
                            heads.clear()
                        head = heads[key] = (msg.ufrag, msg.remote, msg.local, msg.flags)
                    self._deliver(head[0], head[1], head[2], head[3], bytes(view[end:n]))
                    continue
            data = bytes(view[:n])
            try:
                msg = decode(data)
            except RelayError:
                self.relay_stats.bad_messages += 1
                for fd in fds:
                    os.close(fd)
                continue
            if msg.kind == TCP:
                self._adopt(msg, fds)
            else:
                for fd in fds:
                    os.close(fd)
                if msg.kind == DATA and msg.remote is not None:
                    self.relayed(msg)
                else:
                    self.relay_stats.bad_messages += 1

    def _main_lost(self) -> None:
        if self._loop is not None and self.relay_sock.fileno() >= 0:
            self._loop.remove_reader(self.relay_sock.fileno())
        if not self.relay_stats.main_lost:
            self.relay_stats.main_lost = True
            event(log, logging.WARNING, "webrtc.ice_relay_main_lost")
            if self.on_main_lost is not None:
                self.on_main_lost()

    def relayed(self, msg: RelayMessage) -> None:
        """One datagram main routed to this worker (sans socket)."""
        if msg.remote is None:
            self.relay_stats.bad_messages += 1
            return
        self._deliver(msg.ufrag, msg.remote, msg.local, msg.flags, msg.payload)

    def _deliver(self, ufrag: str, addr: tuple[str, int], local: str | None, flags: int, data: bytes) -> None:
        c = self.table.counters
        c.received_packets += 1
        c.received_bytes += len(data)
        entry = self.table.by_ufrag.get(ufrag)
        if entry is None:
            # Closed here, main not told yet (UNREGISTER in flight).
            c.dropped_unknown_ufrag += 1
            c.dropped_bytes += len(data)
            return
        hint = None
        if data and data[0] < 4 and (stun_class(data) or 0) >= 2:
            txid = bytes(data[8:20])
            if self.table.by_txid.get(txid) is entry:
                del self.table.by_txid[txid]
            hint = entry.pending.pop(txid, None)
        if flags & VERIFIED:
            # Main proved this address for the session (RFC 8489 §14.5) and
            # saw which of our addresses it checked: replies leave from
            # there (RFC 8445 §7.2.5.2.1).
            self.table.learn(entry, addr, local)
        session: MuxSession = entry.target
        protocol = hint if hint is not None else session.protocol_for(addr)
        if protocol is None:
            return
        try:
            protocol.datagram_received(data, addr)
        except Exception:  # one session's bug must not stop the relay
            c.handler_errors += 1
            log.exception("webrtc.ice_relay_handler_failed")

    def _adopt(self, msg: RelayMessage, fds: list[int]) -> None:
        if not fds:
            self.relay_stats.bad_messages += 1
            return
        for extra in fds[1:]:
            os.close(extra)
        sock = socket.socket(fileno=fds[0])
        if self.ice_tcp is None:
            sock.close()
            self.relay_stats.bad_messages += 1
            return
        self.relay_stats.tcp_adopted += 1
        self.ice_tcp.adopt(sock, msg.payload)
