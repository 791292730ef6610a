"""ICE on one UDP port: every WHIP and WHEP session of a process shares one
UDP socket (DESIGN.md "WebRTC forwarding", issue 14).

aioice binds a socket per host address per session and lists every
interface; behind a firewall, in a container with published ports or behind
a 1:1 NAT that cannot work. MediaMTX, LiveKit and OvenMediaEngine use one
fixed UDP port plus announced addresses; aioice/aiortc have no UDP mux, so
it is built here.

Data flow::

    UDP :8189 ──recvmsg (+IP_PKTINFO: our address)──► MuxTable.route
        STUN request  → USERNAME "LFRAG:…"  → session ─┐  (verified: learn addr)
        STUN response → transaction id      → session ─┼─► its StunProtocol
        DTLS/SRTP     → remote address      → session ─┘   (aioice, aiortc)
    aioice sends ─► MuxTransport.sendto ─► shared socket (source = address checked)
    FastPath (SRTP, GSO batches) ─────────► shared socket

Two layers:

* :class:`MuxTable` — sans-I/O demultiplexer. A datagram on the shared port
  goes to a session by, in order (RFC 7983 §7 tells STUN from the rest by
  the first byte):

  1. a STUN request: its USERNAME's first part. RFC 8445 §7.2.2: "the
     USERNAME attribute ... is formed by concatenating the username fragment
     provided by the peer with the username fragment of the ICE agent
     sending the request, separated by a colon" — the receiver's own ufrag
     comes first ("LFRAG:RFRAG" as seen here);
  2. a STUN response: the transaction id of a request a session sent on the
     shared socket (connectivity checks, consent, a STUN server query);
  3. anything else (DTLS, SRTP, SRTCP): the remote address, learned only from
     a Binding request whose MESSAGE-INTEGRITY verified with the session's
     password (RFC 8489 §14.5), so a spoofed datagram cannot claim an
     address. At most ``max_addresses`` per session (the oldest unused one
     is evicted: consent checks every ~5 s keep the live one fresh,
     RFC 7675 §5.1); an address belongs to one session, the last to prove it.

  Unknown ufrag, unknown transaction, unknown address: dropped and counted,
  never an exception.

* :class:`IceMux` — the socket, the host/announced candidates from
  :class:`IceMuxConfig`, and the hook into aioice: :func:`IceMux.attach`
  replaces ``gather_candidates`` of each ICE connection of a peer connection
  so that its local candidates come from the config, each with a
  ``StunProtocol`` whose transport is a :class:`MuxTransport` (``sendto`` →
  the shared socket), and registers the session under its local ufrag; the
  connection's ``close`` unregisters it with all its addresses and pending
  transactions.

Registry API for other transports (ICE-TCP, media/webrtc/icetcp.py):

* :meth:`IceMux.session_for_ufrag` — the :class:`MuxSession` a STUN
  request's USERNAME names, or ``None``;
* :meth:`MuxSession.verify_request` — whether a raw STUN request carries a
  MESSAGE-INTEGRITY valid for that session (check before trusting a peer);
* :attr:`MuxSession.connection` — the aioice ``Connection`` (add a protocol
  to ``_protocols`` and feed it ``datagram_received``);
* :attr:`IceMux.candidate_sources` — callables ``(session) -> list of
  StunProtocol`` run at gathering; each returned protocol carries its
  ``local_candidate`` and joins the session (its candidate is offered in the
  answer after the UDP ones).

The forwarding fast path (:class:`~media.webrtc.aiortc_adapter.FastPath`)
sends on :attr:`MuxTransport.mux_socket` directly, with the same GSO batching
(``sendmsg`` with a destination on an unconnected socket).
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
import hmac
import ipaddress
import logging
import socket
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from ..log import event

log = logging.getLogger("returnfeed.webrtc.icemux")

#: RFC 8489 §5: the magic cookie in bytes 4..8 of every STUN message.
STUN_MAGIC = b"\x21\x12\xa4\x42"
_ATTR_USERNAME = 0x0006
_ATTR_MESSAGE_INTEGRITY = 0x0008
_BINDING = 0x001
_U16x2 = struct.Struct("!HH")

#: RFC 8445 §5.1.2.2: "The RECOMMENDED values for type preferences are 126
#: for host candidates".
HOST_TYPE_PREFERENCE = 126

#: Binding requests a session sent that are still waiting for a response
#: (connectivity checks retransmit with the same id, consent every ~5 s).
_MAX_PENDING_PER_SESSION = 64


class MuxInternalsChanged(RuntimeError):
    """An aioice/aiortc internal the mux hooks moved (the adapter's
    ``check_internals`` reports it as ``AiortcInternalsChanged``)."""


class IceMuxConfigError(ValueError):
    """The ICE mux configuration cannot be used (an address that does not
    parse or resolve, an unknown interface)."""


# -- STUN, just enough to demultiplex (RFC 8489) ---------------------------------------


def stun_class(data: bytes) -> int | None:
    """0 request, 1 indication, 2 success, 3 error; ``None`` if not STUN.

    RFC 7983 §7: a first byte 0..3 is STUN; RFC 8489 §5: the top two bits
    are zero, the magic cookie follows the length, the length is a multiple
    of 4 and the message is exactly header + length."""
    if len(data) < 20 or data[0] > 3 or data[4:8] != STUN_MAGIC:
        return None
    length = (data[2] << 8) | data[3]
    if length & 3 or 20 + length != len(data):
        return None
    t = (data[0] << 8) | data[1]
    return ((t >> 4) & 1) | ((t >> 7) & 2)


def stun_method(data: bytes) -> int:
    t = (data[0] << 8) | data[1]
    return (t & 0x000F) | ((t & 0x00E0) >> 1) | ((t & 0x3E00) >> 2)


def _attributes(data: bytes) -> Iterable[tuple[int, int, int]]:
    """(type, value offset, value length) of each attribute; stops at a
    truncated one."""
    pos, end = 20, len(data)
    while pos + 4 <= end:
        atype, alen = _U16x2.unpack_from(data, pos)
        if pos + 4 + alen > end:
            return
        yield atype, pos + 4, alen
        pos += 4 + ((alen + 3) & ~3)


def stun_username(data: bytes) -> str | None:
    """The USERNAME attribute of a STUN message, or ``None``."""
    for atype, off, alen in _attributes(data):
        if atype == _ATTR_USERNAME:
            try:
                return data[off:off + alen].decode("utf-8")
            except UnicodeDecodeError:
                return None
    return None


def check_integrity(data: bytes, key: bytes) -> bool:
    """Whether the MESSAGE-INTEGRITY of a STUN message verifies with ``key``.

    RFC 8489 §14.5: HMAC-SHA1 over the message up to the attribute before
    MESSAGE-INTEGRITY, with the header length "adjusted to point to the end
    of the MESSAGE-INTEGRITY attribute"; short-term credentials use the
    password as the key (§9.1.1)."""
    for atype, off, alen in _attributes(data):
        if atype == _ATTR_MESSAGE_INTEGRITY:
            if alen != 20:
                return False
            start = off - 4
            header = data[:2] + struct.pack("!H", start + 24 - 20) + data[4:20]
            mac = hmac.new(key, header + data[20:start], hashlib.sha1).digest()
            return hmac.compare_digest(mac, data[off:off + 20])
    return False


# -- the sans-I/O demultiplexer ---------------------------------------------------------


Addr = tuple[str, int]


@dataclass(slots=True)
class MuxCounters:
    """What the demultiplexer saw (monotonic counters and two gauges)."""

    received_packets: int = 0
    received_bytes: int = 0
    dropped_unknown_ufrag: int = 0
    dropped_unknown_transaction: int = 0
    dropped_unknown_address: int = 0
    dropped_not_stun_request: int = 0  # STUN indications / requests without USERNAME
    dropped_bytes: int = 0
    addresses_learned: int = 0
    addresses_evicted: int = 0
    sessions_registered: int = 0
    sessions_unregistered: int = 0
    send_errors: int = 0
    send_dropped: int = 0
    handler_errors: int = 0

    @property
    def dropped_packets(self) -> int:
        return (self.dropped_unknown_ufrag + self.dropped_unknown_transaction + self.dropped_unknown_address
                + self.dropped_not_stun_request)


@dataclass(slots=True, eq=False)
class MuxEntry:
    """One registered session in a :class:`MuxTable`."""

    ufrag: str
    key: bytes  # the local ICE password (RFC 8489 §9.1.1 short-term key)
    target: Any = None  # what the I/O layer delivers to
    #: remote address -> the local address its last verified request was
    #: sent to (replies must come from there: RFC 8445 §7.2.5.2.1).
    addresses: OrderedDict[Addr, str | None] = field(default_factory=OrderedDict)
    pending: OrderedDict[bytes, Any] = field(default_factory=OrderedDict)  # transaction id -> sender hint
    registered: bool = True


class RemoteTarget(abc.ABC):
    """A :class:`MuxTable` target in another process (an egress worker,
    media/webrtc/icerelay.py): :meth:`IceMux.received` hands it the
    datagram instead of a local ``StunProtocol``."""

    @abc.abstractmethod
    def deliver(self, entry: MuxEntry, data: bytes, addr: Addr) -> None: ...


@dataclass(slots=True)
class Route:
    entry: MuxEntry
    hint: Any = None  # for a STUN response: what sent the request


class MuxTable:
    """ufrag → session, transaction id → session, address → session."""

    def __init__(self, max_addresses: int = 8, max_pending: int = _MAX_PENDING_PER_SESSION) -> None:
        if max_addresses < 1:
            raise ValueError("max_addresses must be at least 1")
        self.max_addresses = max_addresses
        self.max_pending = max_pending
        self.by_ufrag: dict[str, MuxEntry] = {}
        self.by_addr: dict[Addr, MuxEntry] = {}
        self.by_txid: dict[bytes, MuxEntry] = {}
        self.counters = MuxCounters()

    def register(self, ufrag: str, key: bytes, target: Any = None) -> MuxEntry:
        """Register a session; raises ``KeyError`` when the ufrag is taken
        (aioice draws 4 random characters: a clash is rare, never silent)."""
        if ufrag in self.by_ufrag:
            raise KeyError(f"ICE ufrag {ufrag!r} is already registered")
        entry = MuxEntry(ufrag, key, target)
        self.by_ufrag[ufrag] = entry
        self.counters.sessions_registered += 1
        return entry

    def unregister(self, entry: MuxEntry) -> None:
        """Forget a session's ufrag, addresses and pending transactions."""
        if not entry.registered:
            return
        entry.registered = False
        if self.by_ufrag.get(entry.ufrag) is entry:
            del self.by_ufrag[entry.ufrag]
        for addr in entry.addresses:
            if self.by_addr.get(addr) is entry:
                del self.by_addr[addr]
        entry.addresses.clear()
        for txid in entry.pending:
            if self.by_txid.get(txid) is entry:
                del self.by_txid[txid]
        entry.pending.clear()
        self.counters.sessions_unregistered += 1

    def note_request(self, entry: MuxEntry, data: bytes, hint: Any = None) -> None:
        """A session sends ``data``: if it is a STUN request, its response is
        routed back to the session (with ``hint``)."""
        if not entry.registered or stun_class(data) != 0:
            return
        txid = bytes(data[8:20])
        pending = entry.pending
        if txid in pending:  # a retransmission
            return
        pending[txid] = hint
        self.by_txid[txid] = entry
        if len(pending) > self.max_pending:
            old, _ = pending.popitem(last=False)
            if self.by_txid.get(old) is entry:
                del self.by_txid[old]

    def learn(self, entry: MuxEntry, addr: Addr, local: str | None = None) -> None:
        """``addr`` proved it talks for ``entry`` (a verified Binding request
        sent to our ``local`` address)."""
        owner = self.by_addr.get(addr)
        if owner is entry:
            entry.addresses[addr] = local
            entry.addresses.move_to_end(addr)
            return
        if owner is not None:
            # A peer address now authenticates for another session (a NAT
            # mapping reused, a client that restarted): the last proof wins.
            owner.addresses.pop(addr, None)
        self.by_addr[addr] = entry
        entry.addresses[addr] = local
        self.counters.addresses_learned += 1
        while len(entry.addresses) > self.max_addresses:
            old, _ = entry.addresses.popitem(last=False)
            if self.by_addr.get(old) is entry:
                del self.by_addr[old]
            self.counters.addresses_evicted += 1

    def _drop(self, data: bytes, reason: str) -> None:
        c = self.counters
        setattr(c, reason, getattr(c, reason) + 1)
        c.dropped_bytes += len(data)

    def local_for(self, addr: Addr) -> str | None:
        """The local address ``addr`` last reached us on (verified), if known."""
        entry = self.by_addr.get(addr)
        return entry.addresses.get(addr) if entry is not None else None

    def route(self, data: bytes, addr: Addr, local: str | None = None) -> Route | None:
        """The session a datagram from ``addr`` (to our ``local`` address,
        when known) belongs to, or ``None`` (dropped and counted)."""
        c = self.counters
        c.received_packets += 1
        c.received_bytes += len(data)
        cls = stun_class(data) if data and data[0] < 4 else None
        if cls is None:
            entry = self.by_addr.get(addr)
            if entry is None:
                self._drop(data, "dropped_unknown_address")
                return None
            return Route(entry)
        if cls == 0:
            username = stun_username(data)
            if username is None:
                self._drop(data, "dropped_not_stun_request")
                return None
            entry = self.by_ufrag.get(username.partition(":")[0])
            if entry is None:
                self._drop(data, "dropped_unknown_ufrag")
                return None
            if stun_method(data) == _BINDING and check_integrity(data, entry.key):
                self.learn(entry, addr, local)
            # A request that fails the check still goes to the session: its
            # ICE agent answers 400/401 as RFC 8489 §9.1.3 asks.
            return Route(entry)
        if cls == 1:
            self._drop(data, "dropped_not_stun_request")
            return None
        txid = bytes(data[8:20])
        entry = self.by_txid.pop(txid, None)
        if entry is None:
            self._drop(data, "dropped_unknown_transaction")
            return None
        return Route(entry, entry.pending.pop(txid, None))


# -- configuration and candidates -------------------------------------------------------


@dataclass(slots=True)
class IceMuxConfig:
    """What the server passes (media never reads server settings)."""

    bind_address: str = "0.0.0.0"
    port: int = 8189
    #: IPs or interface names; empty: every non-loopback address, each once.
    host_addresses: list[str] = field(default_factory=list)
    loopback: bool = False
    #: Public IPs or host names (resolved at start).
    announce: list[str] = field(default_factory=list)
    announce_mode: str = "replace"
    max_addresses_per_session: int = 8
    #: Kernel buffers of the shared socket: every viewer's packets queue in
    #: the one send buffer now (SO_SNDBUFFORCE when permitted).
    sndbuf_bytes: int = 8 * 1024 * 1024
    rcvbuf_bytes: int = 4 * 1024 * 1024
    #: Let other processes of this user (the egress workers) receive a
    #: viewer's datagrams on a socket of their own connected to it, on this
    #: port (:func:`share_port`; IPv4 on the wildcard address only).
    direct_receive: bool = False


SO_ATTACH_REUSEPORT_CBPF = getattr(socket, "SO_ATTACH_REUSEPORT_CBPF", 51)  # Linux ≥ 4.5
#: A classic BPF reuseport program of one instruction, ``ret #0``: the
#: group's first socket, i.e. the one it is attached to.
_FIRST_SOCKET = struct.pack("HBBI", 0x06, 0, 0, 0)


def share_port(sock: socket.socket) -> bool:
    """Before ``sock`` (IPv4, UDP) is bound: let sockets of other processes
    of this user bind its port and ``connect()`` to one peer each, so that
    the kernel hands them that peer's datagrams (Linux prefers a connected
    socket to the unconnected one). Every other datagram still reaches
    ``sock``: ``SO_REUSEPORT`` with a classic BPF reuseport program that
    always picks the group's first socket, so a socket bound but not yet
    connected never takes another peer's datagram (without it, the kernel
    hashes each flow to any member). With the program attached before
    ``bind``, the port cannot be shared with another such socket: a second
    server still fails with EADDRINUSE, and port 0 never lands on one in
    use. ``loadtests/reuseport_check.py`` shows both on a kernel. Returns
    False, with nothing set, where the kernel offers neither option."""
    import ctypes

    program = ctypes.create_string_buffer(_FIRST_SOCKET, len(_FIRST_SOCKET))
    fprog = struct.pack("H6xQ", 1, ctypes.addressof(program))  # struct sock_fprog (64-bit)
    try:
        if struct.calcsize("P") != 8:
            raise OSError("struct sock_fprog is laid out here for 64-bit pointers")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)  # copied by the kernel
    except (OSError, AttributeError):
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 0)
        except (OSError, AttributeError):
            pass
        return False
    return True


def _interfaces() -> dict[str, list[str]]:
    import ifaddr  # aioice's own dependency for the same question

    out: dict[str, list[str]] = {}
    for adapter in ifaddr.get_adapters():
        ips = out.setdefault(adapter.nice_name, [])
        for ip in adapter.ips:
            if isinstance(ip.ip, str):
                ips.append(ip.ip)
            elif ip.ip[2] == 0:  # IPv6 without a scope: not link-local
                ips.append(ip.ip[0])
    return out


def _is_loopback(ip: str) -> bool:
    return ipaddress.ip_address(ip).is_loopback


def families(bind_address: str) -> set[int]:
    """IP versions the shared socket serves: an IPv4 address (0.0.0.0 too)
    serves 4, "::" both (a dual-stack socket), another IPv6 address 6."""
    bind = ipaddress.ip_address(bind_address)
    if bind.version == 4:
        return {4}
    return {4, 6} if bind.is_unspecified else {6}


def host_addresses(config: IceMuxConfig, interfaces: dict[str, list[str]] | None = None) -> list[str]:
    """The host candidate addresses the config names (before announce), of
    the IP versions the socket serves, each once, in config order."""
    interfaces = _interfaces() if interfaces is None else interfaces
    out: list[str] = []
    bind = ipaddress.ip_address(config.bind_address)
    served = families(config.bind_address)
    if config.host_addresses:
        for item in config.host_addresses:
            try:
                out.append(str(ipaddress.ip_address(item)))
            except ValueError:
                if item not in interfaces:
                    raise IceMuxConfigError(
                        f"webrtc.ice_host_addresses: {item!r} is neither an IP address nor an interface "
                        f"(interfaces: {', '.join(sorted(interfaces))})") from None
                out += [ip for ip in interfaces[item] if not _is_loopback(ip)]
    elif not bind.is_unspecified:
        out.append(str(bind))  # a socket bound to one address is reachable only there
    else:
        out += [ip for ips in interfaces.values() for ip in ips if not _is_loopback(ip)]
    if config.loopback:
        out += ["127.0.0.1", "::1"]
    return list(dict.fromkeys(ip for ip in out if ipaddress.ip_address(ip).version in served))


def resolve_announce(names: list[str], bind_address: str = "0.0.0.0") -> list[str]:
    """Addresses of the announced names (IPs stay as they are), of the IP
    versions a socket on ``bind_address`` serves; a name that does not
    resolve is a configuration error."""
    served = families(bind_address)
    family = socket.AF_UNSPEC if served == {4, 6} else socket.AF_INET if served == {4} else socket.AF_INET6
    out: list[str] = []
    for name in names:
        try:
            ip = ipaddress.ip_address(name)
        except ValueError:
            try:
                infos = socket.getaddrinfo(name, None, family, socket.SOCK_DGRAM)
            except (socket.gaierror, UnicodeError) as exc:
                raise IceMuxConfigError(f"webrtc.ice_announce: {name!r} does not resolve ({exc})") from None
            out += [info[4][0] for info in infos]
        else:
            if ip.version not in served:
                raise IceMuxConfigError(f"webrtc.ice_announce: {name!r} is IPv{ip.version}; the ICE socket on "
                                        f"{bind_address} does not serve it")
            out.append(str(ip))
    return list(dict.fromkeys(out))


def candidate_addresses(config: IceMuxConfig, announced: list[str], hosts: list[str]) -> list[str]:
    """The addresses every session offers, best first, each once.

    ``replace`` (1:1 NAT): only the announced addresses (plus loopback when
    asked for: a local client is never behind the NAT). ``add``: the host
    addresses, then the announced ones."""
    if config.announce_mode == "replace" and announced:
        keep = [ip for ip in ("127.0.0.1", "::1")
                if config.loopback and ipaddress.ip_address(ip).version in families(config.bind_address)]
        return list(dict.fromkeys(announced + keep))
    return list(dict.fromkeys(hosts + announced))


def candidate_priority(index: int, component: int = 1) -> int:
    """RFC 8445 §5.1.2.1: priority = 2^24·type preference + 2^8·local
    preference + (256 − component ID); §5.1.2.2: the local preference must
    differ between candidates of one type, so the first address gets 65535,
    the next 65534, ..."""
    return (HOST_TYPE_PREFERENCE << 24) + ((65535 - index) << 8) + (256 - component)


# -- the socket and the aioice hook -----------------------------------------------------


class MuxTransport(asyncio.DatagramTransport):
    """A session protocol's view of the shared socket (aioice calls
    ``sendto``/``close``/``get_extra_info`` on it)."""

    def __init__(self, mux: "IceMux", session: "MuxSession", protocol: Any) -> None:
        super().__init__()
        self._mux = mux
        self._session = session
        self._protocol = protocol
        self._closed = False
        self._sock = mux.sock

    @property
    def mux_socket(self) -> socket.socket:
        """The shared socket itself (the fast path sends on it; never close it)."""
        return self._sock

    def sendto(self, data: Any, addr: Any = None) -> None:
        if self._closed:
            return
        self._mux.send(self._session, self._protocol, bytes(data), addr)

    def ancillary_for(self, addr: Addr) -> list[tuple[int, int, bytes]]:
        """What a datagram to ``addr`` must carry (see :meth:`IceMux.ancillary_for`)."""
        return self._mux.ancillary_for(addr)

    def wire_addr(self, addr: Addr) -> Addr:
        """``addr`` as the shared socket takes it (see :meth:`IceMux.wire_addr`)."""
        return self._mux.wire_addr(addr)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return self._sock
        if name == "sockname":
            return self._mux.sockname
        return default

    def is_closing(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        asyncio.get_running_loop().call_soon(self._protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def get_write_buffer_size(self) -> int:
        return 0


class MuxSession:
    """One aioice ``Connection`` on the shared socket."""

    def __init__(self, mux: "IceMux", connection: Any) -> None:
        self.mux = mux
        self.connection = connection
        self.entry: MuxEntry | None = None
        #: The protocol that receives UDP datagrams: one per IP version
        #: (aioice pairs a local candidate only with remote ones of its
        #: version), not one per address — every candidate is the same
        #: socket, and one protocol means one check per remote candidate.
        self.protocols: dict[int, Any] = {}

    @property
    def protocol(self) -> Any:
        """The first protocol (IPv4 when there is one)."""
        return next(iter(self.protocols.values()), None)

    def protocol_for(self, addr: Addr) -> Any:
        return self.protocols.get(6 if ":" in addr[0] else 4) or self.protocol

    @property
    def ufrag(self) -> str:
        return self.connection.local_username

    @property
    def addresses(self) -> list[Addr]:
        return list(self.entry.addresses) if self.entry is not None else []

    def verify_request(self, data: bytes) -> bool:
        """Whether ``data`` is a STUN Binding request for this session with a
        valid MESSAGE-INTEGRITY."""
        return (self.entry is not None and self.entry.registered and stun_class(data) == 0
                and stun_method(data) == _BINDING
                and (stun_username(data) or "").partition(":")[0] == self.entry.ufrag
                and check_integrity(data, self.entry.key))


#: linux/in.h IP_PKTINFO (Python 3.11 does not export it): with it set,
#: ``recvmsg`` says which local address a datagram was sent to, and a
#: ``sendmsg`` can choose the source address (struct in_pktinfo).
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
_PKTINFO = struct.Struct("=I4s4s")  # ifindex, spec_dst, addr
_CMSG_SPACE = socket.CMSG_SPACE(_PKTINFO.size)
#: Datagrams read per readiness callback before other callbacks get a turn.
_READ_BATCH = 64
#: Remote addresses whose kernel-chosen source address is remembered.
_MAX_ROUTE_CACHE = 4096


_PKTINFO6 = struct.Struct("=16sI")  # struct in6_pktinfo: addr, ifindex
_CMSG_SPACE6 = socket.CMSG_SPACE(_PKTINFO6.size)


def pktinfo(local_ip: str) -> tuple[int, int, bytes]:
    """The ancillary item that makes a datagram leave from ``local_ip``."""
    if ":" in local_ip:
        return (socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, _PKTINFO6.pack(socket.inet_pton(socket.AF_INET6, local_ip), 0))
    return (socket.IPPROTO_IP, IP_PKTINFO, _PKTINFO.pack(0, socket.inet_aton(local_ip), bytes(4)))


def _plain(host: str) -> str:
    """An IPv4-mapped IPv6 address (a dual-stack socket's view of an IPv4
    peer) as the IPv4 address ICE candidates use."""
    return host[7:] if host.startswith("::ffff:") and "." in host else host


class IceMux:
    """The shared ICE UDP socket of one process (each egress worker process
    gets its own object)."""

    def __init__(self, config: IceMuxConfig) -> None:
        self.config = config
        self.table = MuxTable(config.max_addresses_per_session)
        self.sock: socket.socket | None = None
        self.sockname: Addr | None = None
        self.addresses: list[str] = []  # the candidate addresses, best first
        self.sndbuf = 0
        self.sessions: dict[str, MuxSession] = {}
        self.candidate_sources: list[Callable[[MuxSession], list[Any]]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._family = socket.AF_INET
        #: remote address -> the source address the kernel picks for it.
        self._route_source: dict[Addr, str] = {}
        #: Other processes may receive their viewers' datagrams on this
        #: port directly (``config.direct_receive`` and the kernel agreed).
        self.direct_receive = False

    @property
    def counters(self) -> MuxCounters:
        return self.table.counters

    @property
    def port(self) -> int:
        if self.sockname is None:
            raise RuntimeError("the ICE mux is not started")
        return self.sockname[1]

    async def start(self) -> None:
        """Resolve the addresses and bind the socket. Raises
        :class:`IceMuxConfigError` for a config that cannot work and
        ``OSError`` when the port cannot be bound."""
        c = self.config
        loop = asyncio.get_running_loop()
        announced = await loop.run_in_executor(None, resolve_announce, list(c.announce), c.bind_address)
        hosts = host_addresses(c)
        self.addresses = candidate_addresses(c, announced, hosts)
        if not self.addresses:
            raise IceMuxConfigError("no ICE candidate address: set webrtc.ice_host_addresses, "
                                    "webrtc.ice_announce or webrtc.ice_loopback")
        self._family = socket.AF_INET6 if ipaddress.ip_address(c.bind_address).version == 6 else socket.AF_INET
        sock = socket.socket(self._family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            if self._family == socket.AF_INET6:
                # "::" serves IPv4 too (IPv4-mapped); another IPv6 address only IPv6.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if families(c.bind_address) == {4, 6} else 1)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
            direct = (c.direct_receive and self._family == socket.AF_INET and c.bind_address == "0.0.0.0"
                      and share_port(sock))
            try:
                sock.bind((c.bind_address, c.port))
            except OSError as exc:
                raise OSError(exc.errno, f"cannot bind the ICE UDP port {c.bind_address}:{c.port} "
                                         f"(webrtc.ice_udp_port): {exc.strerror}") from None
            for force, plain, size in ((getattr(socket, "SO_SNDBUFFORCE", None), socket.SO_SNDBUF, c.sndbuf_bytes),
                                       (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF, c.rcvbuf_bytes)):
                try:
                    if force is None:
                        raise PermissionError
                    sock.setsockopt(socket.SOL_SOCKET, force, size)
                except PermissionError:  # not CAP_NET_ADMIN: capped at net.core.[wr]mem_max
                    sock.setsockopt(socket.SOL_SOCKET, plain, size)
            self.sndbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
            sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            loop.add_reader(sock.fileno(), self._readable)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self._loop = loop
        self.sockname = sock.getsockname()[:2]
        self.direct_receive = direct
        event(log, logging.INFO, "webrtc.ice_mux_listening", address=c.bind_address, port=self.sockname[1],
              candidates=",".join(self.addresses), sndbuf=self.sndbuf, direct_receive=direct)

    async def close(self) -> None:
        for session in list(self.sessions.values()):
            self._unregister(session)
        if self.sock is not None and self._loop is not None:
            self._loop.remove_reader(self.sock.fileno())
            self.sock.close()
        self.sock = None

    # -- datagrams ------------------------------------------------------------------

    def _readable(self) -> None:
        sock = self.sock
        if sock is None:
            return
        for _ in range(_READ_BATCH):
            try:
                data, anc, _flags, addr = sock.recvmsg(65536, _CMSG_SPACE6)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # An ICMP error of an earlier send (a peer that went away):
                # consent freshness ends such sessions.
                self.counters.send_errors += 1
                continue
            local = None
            for level, kind, value in anc:
                if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(value) >= _PKTINFO.size:
                    local = socket.inet_ntoa(_PKTINFO.unpack_from(value)[2])
                elif level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and len(value) >= _PKTINFO6.size:
                    local = _plain(socket.inet_ntop(socket.AF_INET6, _PKTINFO6.unpack_from(value)[0]))
            self.received(data, addr, local)

    def received(self, data: bytes, addr: Any, local: str | None = None) -> None:
        addr = (_plain(addr[0]), addr[1])
        route = self.table.route(data, addr, local)
        if route is None:
            return
        session: MuxSession = route.entry.target
        if isinstance(session, RemoteTarget):
            session.deliver(route.entry, data, addr)
            return
        protocol = route.hint if route.hint is not None else session.protocol_for(addr)
        try:
            protocol.datagram_received(data, addr)
        except Exception:  # one session's bug must not stop the socket
            self.counters.handler_errors += 1
            log.exception("webrtc.ice_mux_handler_failed")

    def send(self, session: MuxSession, protocol: Any, data: bytes, addr: Any) -> None:
        entry = session.entry
        if entry is not None:
            self.table.note_request(entry, data, protocol)
        self.send_datagram(data, addr)

    def send_datagram(self, data: bytes, addr: Any) -> None:
        """Send ``data`` to ``addr`` on the shared socket, from the local
        address ``addr`` checked (every session's datagrams, and a worker's
        STUN requests, which the ICE relay registered with
        :meth:`MuxTable.note_request` first)."""
        sock = self.sock
        if sock is None:
            return
        addr = (addr[0], addr[1])
        try:
            anc = self.ancillary_for(addr)
            if anc:
                sock.sendmsg([data], anc, 0, self.wire_addr(addr))
            else:
                sock.sendto(data, self.wire_addr(addr))
        except BlockingIOError:
            # An 8 MB buffer full: STUN and DTLS retransmit; never queue
            # without bound.
            self.counters.send_dropped += 1
        except OSError:
            self.counters.send_errors += 1

    def wire_addr(self, addr: Addr) -> Addr:
        """``addr`` as the socket takes it: an IPv4 peer on a dual-stack
        socket is IPv4-mapped."""
        if self._family == socket.AF_INET6 and ":" not in addr[0]:
            return ("::ffff:" + addr[0], addr[1])
        return addr

    def ancillary_for(self, addr: Addr) -> list[tuple[int, int, bytes]]:
        """What a datagram to ``addr`` needs to leave from the local address
        the peer sent its checks to: nothing when the kernel picks that
        address anyway (the usual case, and the fast path stays a plain
        ``sendto``), else an IP_PKTINFO source. RFC 8445 §7.2.5.2.1: a
        response whose source is not the request's destination fails the
        check (a peer on 127.0.0.1 checking our LAN address would get its
        answer from 127.0.0.1)."""
        local = self.table.local_for(addr)
        if local is None or not ipaddress.ip_address(self.config.bind_address).is_unspecified:
            return []
        natural = self._route_source.get(addr)
        if natural is None:
            probe = socket.socket(socket.AF_INET6 if ":" in addr[0] else socket.AF_INET, socket.SOCK_DGRAM)
            try:
                probe.connect(addr)  # a route lookup: nothing is sent
                natural = _plain(probe.getsockname()[0])
            except OSError:
                natural = ""
            finally:
                probe.close()
            if len(self._route_source) >= _MAX_ROUTE_CACHE:
                self._route_source.clear()
            self._route_source[addr] = natural
        return [] if natural == local else [pktinfo(local)]

    # -- sessions ---------------------------------------------------------------------

    def session_for_ufrag(self, ufrag: str) -> MuxSession | None:
        entry = self.table.by_ufrag.get(ufrag)
        if entry is not None and isinstance(entry.target, RemoteTarget):
            return None  # another process's session (the ICE relay's)
        return entry.target if entry is not None else None

    def attach(self, pc: Any) -> None:
        """Put every ICE connection of ``pc`` on the shared socket (after
        ``setRemoteDescription``, before ``setLocalDescription``, which
        gathers)."""
        if self.sock is None:
            raise RuntimeError("the ICE mux is not started")
        for ice_transport in ice_transports(pc):
            self._hook(ice_transport._connection)

    def _hook(self, connection: Any) -> None:
        if getattr(connection, "_returnfeed_mux", None) is not None:
            return
        session = MuxSession(self, connection)
        connection._returnfeed_mux = session
        original_close = connection.close

        async def gather_candidates() -> None:
            await self._gather(session)

        async def close() -> None:
            try:
                await original_close()
            finally:
                self._unregister(session)

        connection.gather_candidates = gather_candidates
        connection.close = close

    async def _gather(self, session: MuxSession) -> None:
        from aioice import Candidate, TransportPolicy, stun
        from aioice.candidate import candidate_foundation
        from aioice.ice import StunProtocol

        conn = session.connection
        if conn._local_candidates_start:
            return
        conn._local_candidates_start = True
        candidates: list[Any] = []
        if conn._transport_policy == TransportPolicy.ALL and not conn._closing:
            while conn.local_username in self.table.by_ufrag:
                # aioice draws 4 characters (62^4): among 2,000 live sessions
                # a clash is likely somewhere (birthday bound ~13 %). The
                # answer is not written yet, so this session takes another.
                conn._local_username = _random_ufrag()
            entry = self.table.register(conn.local_username, conn.local_password.encode("utf8"), session)
            session.entry = entry
            self.sessions[conn.local_username] = session
            for component in sorted(conn._components):
                for i, address in enumerate(self.addresses):
                    cand = Candidate(
                        foundation=candidate_foundation("host", "udp", address), component=component,
                        transport="udp", priority=candidate_priority(i, component), host=address, port=self.port,
                        type="host")
                    candidates.append(cand)
                    version = ipaddress.ip_address(address).version
                    if version not in session.protocols:
                        protocol = StunProtocol(conn)
                        protocol.connection_made(MuxTransport(self, session, protocol))
                        protocol.local_candidate = cand
                        conn._protocols.append(protocol)
                        session.protocols[version] = protocol
                if conn.stun_server and 4 in session.protocols:  # aioice queries STUN over IPv4 only
                    candidates += await self._server_reflexive(session.protocols[4], conn.stun_server, candidates,
                                                               stun)
            for source in self.candidate_sources:
                for protocol in source(session):
                    conn._protocols.append(protocol)
                    candidates.append(protocol.local_candidate)
        if conn.turn_server:
            # TURN allocations keep aioice's own socket to the TURN server.
            for component in sorted(conn._components):
                candidates += await conn.get_component_candidates(component=component, addresses=[])
        conn._local_candidates += candidates
        conn._local_candidates_end = True

    async def _server_reflexive(self, protocol: Any, server: Any, known: list[Any], stun: Any) -> list[Any]:
        from aioice.ice import server_reflexive_candidate

        try:
            cand, _ = await asyncio.wait_for(server_reflexive_candidate(protocol, server), 5)
        except (asyncio.TimeoutError, OSError, stun.TransactionError) as exc:
            event(log, logging.INFO, "webrtc.ice_mux_stun_failed", server=str(server), detail=str(exc))
            return []
        # The mapped address of the shared socket may already be announced.
        if any(c.host == cand.host and c.port == cand.port for c in known):
            return []
        return [cand]

    def _unregister(self, session: MuxSession) -> None:
        entry = session.entry
        if entry is None:
            return
        self.table.unregister(entry)
        if self.sessions.get(entry.ufrag) is session:
            del self.sessions[entry.ufrag]


def _random_ufrag() -> str:
    import secrets
    import string

    # RFC 8839 §5.4: ice-char = ALPHA / DIGIT / "+" / "/"; 8 of them.
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(8))


def ice_transports(pc: Any) -> list[Any]:
    """Every ``RTCIceTransport`` of an aiortc peer connection (the ones its
    ``__gather`` gathers)."""
    return list(pc._RTCPeerConnection__iceTransports)


def _names(code: Any) -> set[str]:
    """Attribute and global names a function's code uses, comprehensions
    included (they are nested code objects before Python 3.12)."""
    out = set(code.co_names)
    for const in code.co_consts:
        if hasattr(const, "co_names"):
            out |= _names(const)
    return out


def check_mux_internals() -> None:
    """Raise :class:`MuxInternalsChanged` if an aioice/aiortc internal the
    mux relies on moved (part of
    :func:`media.webrtc.aiortc_adapter.check_internals`)."""
    import inspect

    import aioice
    from aioice import ice
    from aiortc import RTCPeerConnection
    from aiortc.rtcicetransport import RTCIceGatherer, RTCIceTransport

    init_names = set(_names(aioice.Connection.__init__.__code__))
    for name in ("_local_candidates_start", "_local_candidates_end", "_local_candidates", "_protocols",
                 "_local_username",
                 "_components", "_transport_policy", "_closing", "stun_server", "turn_server"):
        if name not in init_names:
            raise MuxInternalsChanged(f"aioice.Connection no longer sets {name}")
    gather = _names(aioice.Connection.gather_candidates.__code__)
    if "_local_candidates_end" not in gather or "get_component_candidates" not in gather:
        raise MuxInternalsChanged("aioice.Connection.gather_candidates changed")
    connect = _names(aioice.Connection.connect.__code__)
    if "_local_candidates_end" not in connect:
        raise MuxInternalsChanged("aioice.Connection.connect no longer checks _local_candidates_end")
    params = list(inspect.signature(aioice.Connection.get_component_candidates).parameters)
    if params[:3] != ["self", "component", "addresses"]:
        raise MuxInternalsChanged(f"aioice get_component_candidates signature changed: {params}")
    if list(inspect.signature(ice.StunProtocol.__init__).parameters) != ["self", "receiver"]:
        raise MuxInternalsChanged("aioice StunProtocol(receiver) changed")
    for name in ("connection_made", "connection_lost", "datagram_received", "close", "request", "send_stun"):
        if not callable(getattr(ice.StunProtocol, name, None)):
            raise MuxInternalsChanged(f"aioice StunProtocol.{name} is gone")
    close_names = _names(ice.StunProtocol.close.__code__)
    if "transport" not in close_names:
        raise MuxInternalsChanged("aioice StunProtocol.close no longer closes its transport")
    if "local_candidate" not in _names(ice.CandidatePair.local_candidate.fget.__code__):
        raise MuxInternalsChanged("aioice CandidatePair no longer reads protocol.local_candidate")
    if not callable(getattr(ice, "server_reflexive_candidate", None)):
        raise MuxInternalsChanged("aioice.ice.server_reflexive_candidate is gone")
    if "_RTCPeerConnection__iceTransports" not in _names(RTCPeerConnection.__init__.__code__):
        raise MuxInternalsChanged("RTCPeerConnection no longer keeps __iceTransports")
    if "gather_candidates" not in _names(RTCIceGatherer.gather.__code__):
        raise MuxInternalsChanged("RTCIceGatherer.gather no longer calls gather_candidates")
    if "_connection" not in _names(RTCIceTransport.__init__.__code__):
        raise MuxInternalsChanged("RTCIceTransport no longer keeps its aioice Connection in _connection")
    if "close" not in _names(RTCIceTransport.stop.__code__):
        raise MuxInternalsChanged("RTCIceTransport.stop no longer closes its connection")
    if "close" not in _names(aioice.Connection.query_consent.__code__):
        raise MuxInternalsChanged("aioice consent expiry no longer calls close()")
