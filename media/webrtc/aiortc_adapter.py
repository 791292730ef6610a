"""Every use of aiortc internals, in one place (DESIGN.md "WebRTC forwarding").

aiortc gives us ICE, DTLS, SRTP and SDP. Its media paths decode and encode
everything, which a passthrough forwarder must not do, so this module:

* :func:`ensure_h264_profiles` adds H.264 Main/High profiles to aiortc's
  codec table (``aiortc.codecs.CODECS``), which only knows 42001f/42e01f, so
  a remote offer listing only High profile is still negotiable.
* :class:`ForwardingSender` replaces a transceiver's ``RTCRtpSender``: it
  registers with the DTLS transport (so RTCP for its SSRC is routed to it)
  but never runs aiortc's encode loop, and hands RTCP to a callback.
* :func:`install_sender` swaps it in (private attribute of the transceiver).
* :func:`set_negotiated_codecs` overrides the codecs aiortc chose for a
  transceiver (private ``_codecs``) so the answer carries the H.264
  profile-level-id the source actually has.
* :class:`FastPath` sends already-built RTP/RTCP without a coroutine per
  packet: SRTP-protect with the DTLS transport's pylibsrtp session, then
  ``sendto`` on the nominated ICE pair's datagram transport.
* :func:`capture_rtcp` takes a WHEP viewer's SRTCP off its aioice
  connection, unprotects it and hands the bytes to the session
  synchronously: no aioice queue, no DTLS task wake-up, no aiortc objects.
* WHIP ingest: :class:`CapturingReceiver` (installed by
  :func:`install_receiver`) never starts aiortc's decoder thread, jitter
  buffer or RTCP loop; :func:`capture_rtp` takes the SRTP-decrypted RTP and
  RTCP bytes off the DTLS transport (its ``_handle_rtp_data`` /
  ``_handle_rtcp_data``) before aiortc's parser and ``RtpRouter`` — which
  would put every simulcast layer into one receiver — see them;
  :func:`send_rtcp` sends our receiver reports and feedback upstream.

:func:`check_internals` verifies each internal this module touches exists
with the expected shape; the adapter tests call it so an aiortc upgrade that
moves one fails loudly instead of silently falling back to decoding.
"""

from __future__ import annotations

import copy
import errno
import logging
import os
import socket
import struct
import asyncio
import sys
from typing import Any, Callable

import aiortc
from aiortc import RTCRtpReceiver, RTCRtpSender
from aiortc.codecs import CODECS
from aiortc.rtcrtpparameters import RTCRtcpFeedback, RTCRtpCodecParameters, RTCRtpSendParameters

from ..log import event
from ..errors import RtpError
from ..rtp.rtcp import parse_rtcp

log = logging.getLogger("returnfeed.webrtc")

#: The aiortc release these internals were read from. pyproject pins it.
AIORTC_VERSION = "1.16.0"

_H264_EXTRA_PROFILES = ("4d001f", "640c1f", "64001f", "f4001f")

RtcpCallback = Callable[[Any], None]

_UDP_SEGMENT = 103  # linux/udp.h: UDP_SEGMENT (GSO segment size)
try:  # libsrtp through pylibsrtp's cffi module (protect_all); None: use Session.protect
    from pylibsrtp import SRTP_MAX_TRAILER_LEN as _SRTP_TRAILER, _srtp_assert as _srtp_check
    from pylibsrtp._binding import ffi as _srtp_ffi, lib as _srtp_lib
    _srtp_protect: Any = _srtp_lib.srtp_protect

    def _len_cell() -> Any:
        return _srtp_ffi.new("int *")
except ImportError:  # another pylibsrtp layout
    _srtp_protect = None
#: The optional C extension (_fastsend.c): one viewer's frame rewritten,
#: protected and sent in one call. None where it was not built (setup.py
#: marks it optional: no compiler, no extension); FastPath(native=False)
#: (``webrtc.c_fastpath = false``) takes the pure-Python path, same bytes.
_fastsend: Any = None
if _srtp_protect is not None:
    try:
        from . import _fastsend
    except ImportError:
        pass
_U16 = struct.Struct("=H")
_U32 = struct.Struct("=I")
_NET_U16 = struct.Struct("!H")
_NET_U32 = struct.Struct("!I")


class AiortcInternalsChanged(RuntimeError):
    """The installed aiortc no longer has an internal this adapter relies on."""


def check_internals() -> None:
    """Raise :class:`AiortcInternalsChanged` if any relied-on internal moved."""
    if aiortc.__version__ != AIORTC_VERSION:
        raise AiortcInternalsChanged(
            f"aiortc {aiortc.__version__} installed, adapter written for {AIORTC_VERSION}: re-verify "
            "media/webrtc/aiortc_adapter.py and update AIORTC_VERSION"
        )
    from aiortc.rtcdtlstransport import RTCDtlsTransport
    from aiortc.rtcrtptransceiver import RTCRtpTransceiver

    for owner, name in (
        (RTCDtlsTransport, "_register_rtp_sender"),
        (RTCDtlsTransport, "_unregister_rtp_sender"),
        (RTCDtlsTransport, "_send_rtp"),
        (RTCRtpSender, "_handle_rtcp_packet"),
    ):
        if not callable(getattr(owner, name, None)):
            raise AiortcInternalsChanged(f"{owner.__name__}.{name} is gone")
    if not hasattr(RTCRtpTransceiver, "_RTCRtpTransceiver__sender") and "_RTCRtpTransceiver__sender" not in (
        RTCRtpTransceiver.__init__.__code__.co_names
    ):
        raise AiortcInternalsChanged("RTCRtpTransceiver no longer stores its sender as __sender")
    from aiortc import rtcpeerconnection

    describe = getattr(rtcpeerconnection, "create_media_description_for_transceiver", None)
    if describe is None or "_stream_id" not in describe.__code__.co_names:
        raise AiortcInternalsChanged("the answer's a=msid no longer comes from RTCRtpSender._stream_id")
    if _ESTIMATOR not in RTCRtpReceiver.__init__.__code__.co_names:
        raise AiortcInternalsChanged("RTCRtpReceiver no longer keeps its REMB estimator as __remote_bitrate_estimator")
    check_ingest_internals()
    check_rtcp_capture_internals()
    from . import icetcp

    try:
        icetcp.check_internals()
    except RuntimeError as exc:
        raise AiortcInternalsChanged(f"ICE-TCP: {exc}") from None
    from .icemux import MuxInternalsChanged, check_mux_internals

    try:
        check_mux_internals()
    except MuxInternalsChanged as exc:
        raise AiortcInternalsChanged(str(exc)) from None


def ensure_h264_profiles(profiles: tuple[str, ...] = _H264_EXTRA_PROFILES) -> None:
    """Add H.264 profiles (with RTX) to aiortc's codec table, once each.

    aiortc only knows 42001f/42e01f; ``aiortc.codecs.CODECS`` is a
    module-level list, so this changes every peer connection of the process.
    """
    video = CODECS["video"]
    present = {str(c.parameters.get("profile-level-id", "")).lower() for c in video
               if c.mimeType.lower() == "video/h264"}
    used = {c.payloadType for c in CODECS["video"] + CODECS["audio"]}
    pt = 96
    for plid in profiles:
        if plid in present:
            continue
        while pt in used or pt + 1 in used:
            pt += 1
        video.append(RTCRtpCodecParameters(
            mimeType="video/H264", clockRate=90000, payloadType=pt,
            rtcpFeedback=[RTCRtcpFeedback(type="nack"), RTCRtcpFeedback(type="nack", parameter="pli"),
                          RTCRtcpFeedback(type="goog-remb")],
            parameters={"level-asymmetry-allowed": "1", "packetization-mode": "1", "profile-level-id": plid},
        ))
        video.append(RTCRtpCodecParameters(mimeType="video/rtx", clockRate=90000, payloadType=pt + 1,
                                           parameters={"apt": pt}))
        used.update((pt, pt + 1))


class ForwardingSender(RTCRtpSender):
    """An ``RTCRtpSender`` that sends nothing by itself.

    aiortc calls :meth:`send` once DTLS is up with the negotiated
    parameters; we register for RTCP and report readiness. RTP is written by
    the forwarder through :class:`FastPath`.
    """

    def __init__(self, kind: str, transport: Any, on_rtcp: RtcpCallback,
                 on_ready: Callable[["ForwardingSender", RTCRtpSendParameters], None]) -> None:
        super().__init__(kind, transport)
        self._on_rtcp = on_rtcp
        self._on_ready = on_ready
        self._registered = False
        self.parameters: RTCRtpSendParameters | None = None

    @property
    def ssrc(self) -> int:
        return self._ssrc

    @property
    def rtx_ssrc(self) -> int:
        return self._rtx_ssrc

    async def send(self, parameters: RTCRtpSendParameters) -> None:  # noqa: D401 - aiortc API
        if self._registered:
            return
        self.parameters = parameters
        self.transport._register_rtp_sender(self, parameters)
        self._registered = True
        self._on_ready(self, parameters)

    async def stop(self) -> None:
        if self._registered:
            self.transport._unregister_rtp_sender(self)
            self._registered = False

    async def _handle_rtcp_packet(self, packet: Any) -> None:
        # aiortc hands over its own parsed objects; re-read their bytes with
        # our parser so nothing past this module depends on aiortc's types.
        try:
            parsed = parse_rtcp(bytes(packet))
        except RtpError:
            return
        for p in parsed:
            try:
                self._on_rtcp(p)
            except Exception:  # a viewer's RTCP must never break the transport
                log.exception("webrtc.rtcp_handler_failed")


def check_rtcp_capture_internals() -> None:
    """The internals :func:`capture_rtcp` relies on (part of :func:`check_internals`)."""
    import inspect

    import aioice
    from aiortc.rtcdtlstransport import RTCDtlsTransport

    params = list(inspect.signature(aioice.Connection.data_received).parameters)
    if params != ["self", "data", "component"]:
        raise AiortcInternalsChanged(f"aioice Connection.data_received signature changed: {params}")
    if "data_received" not in aioice.ice.StunProtocol.datagram_received.__code__.co_names:
        raise AiortcInternalsChanged("aioice's StunProtocol no longer hands data to Connection.data_received")
    if "_rx_srtp" not in RTCDtlsTransport.__init__.__code__.co_names:
        raise AiortcInternalsChanged("RTCDtlsTransport no longer keeps _rx_srtp")
    if "_protocols" not in aioice.Connection.__init__.__code__.co_names:
        raise AiortcInternalsChanged("aioice Connection no longer keeps its StunProtocols in _protocols")
    if list(inspect.signature(aioice.ice.StunProtocol.datagram_received).parameters) != ["self", "data", "addr"]:
        raise AiortcInternalsChanged("aioice StunProtocol.datagram_received signature changed")
    if "is_rtcp" not in RTCDtlsTransport._recv_next.__code__.co_names:
        raise AiortcInternalsChanged("RTCDtlsTransport._recv_next no longer tells SRTCP by aiortc.rtp.is_rtcp")


def capture_rtcp(dtls_transport: Any, on_rtcp: Callable[[bytes], None]) -> bool:
    """Take the viewer's SRTCP off its ICE connection as it arrives: unprotect
    it with the DTLS transport's SRTP session and hand the plain compound
    packet to ``on_rtcp`` (synchronous, bytes). Returns False, changing
    nothing, before DTLS has keyed SRTP.

    aiortc's own path queues every datagram in aioice, wakes the DTLS task
    for it, parses it into aiortc's objects and routes those to senders
    (which re-serialize them for :mod:`media.rtp.rtcp`): with browsers
    reporting 4–5 times a second per viewer, that was a tenth of a
    forwarding process's CPU. Everything else (STUN and consent — never
    seen here, aioice answers those before ``data_received`` — DTLS, and
    SRTP) still takes aioice's queue to aiortc. Same predicate as aiortc
    (``aiortc.rtp.is_rtcp``, RFC 5761 §4), same SRTP session (its replay
    window, RFC 3711 §3.3.2), a datagram failing authentication dropped as
    aiortc drops it. ``on_rtcp``'s exceptions are logged, never raised into
    aioice's receive path."""
    import aioice
    import pylibsrtp
    from aiortc.rtp import is_rtcp

    srtp = dtls_transport._rx_srtp
    if srtp is None:
        return False
    connection = dtls_transport.transport._connection
    queued = connection.data_received  # aioice's own: into the queue aiortc reads
    unprotect = srtp.unprotect_rtcp
    srtp_error = pylibsrtp.Error

    def data_received(data: bytes, component: int) -> None:
        if len(data) > 1 and 127 < data[0] < 192 and is_rtcp(data):
            try:
                plain = unprotect(data)
            except srtp_error:
                return
            try:
                on_rtcp(plain)
            except Exception:  # a viewer's RTCP must never break the transport
                log.exception("webrtc.rtcp_handler_failed")
            return
        queued(data, component)

    connection.data_received = data_received
    # The protocols of the host candidates (the shared ICE socket's among
    # them) see every datagram first and try it as STUN, which an SRTCP
    # datagram fails by raising: route those to the capture before that.
    # A protocol added later (ICE-TCP, TURN) still reaches it through
    # ``data_received``.
    stun_protocol = aioice.ice.StunProtocol
    for protocol in list(connection._protocols):
        if type(protocol) is stun_protocol:
            protocol.datagram_received = _srtcp_first(protocol.datagram_received, data_received)
    return True


def _srtcp_first(datagram_received: Callable[[bytes, Any], None],
                 data_received: Callable[[bytes, int], None]) -> Callable[[bytes, Any], None]:
    from aiortc.rtp import is_rtcp

    def received(data: bytes, addr: Any) -> None:
        if len(data) > 1 and 127 < data[0] < 192 and is_rtcp(data):
            data_received(data, 1)  # rtcp-mux (RFC 5761): RTCP rides component 1
        else:
            datagram_received(data, addr)

    return received


def install_sender(transceiver: Any, sender: ForwardingSender, stream_id: str) -> None:
    """Replace ``transceiver``'s sender (before the answer is created).

    ``stream_id`` is the MediaStream id the answer announces for the track
    (``a=msid:<stream id> <track id>``, RFC 8830 §2). aiortc writes the
    sender's ``_stream_id`` there; a fresh sender gets a random one, so
    audio and video would land in different streams and a browser would not
    lip-sync them (WebRTC syncs only tracks of one stream).
    """
    sender._stream_id = stream_id
    transceiver._RTCRtpTransceiver__sender = sender


def set_negotiated_codecs(transceiver: Any, codecs: list[RTCRtpCodecParameters]) -> None:
    transceiver._codecs = [copy.deepcopy(c) for c in codecs]


def negotiated_codecs(transceiver: Any) -> list[RTCRtpCodecParameters]:
    return list(transceiver._codecs)


def offered_header_extensions(transceiver: Any) -> list[Any]:
    return list(transceiver._headerExtensions)


#: linux/udp.h UDP_MAX_SEGMENTS: the most datagrams one GSO send may carry
#: (64 on the kernels we run on; newer ones allow 128).
GSO_MAX_SEGMENTS = 64
#: The most bytes one GSO send may carry: a UDP payload is at most
#: 65,535 − 8 (UDP header) − 20 (IPv4 header) = 65,507 bytes (RFC 768,
#: RFC 791); the kernel answers ``EMSGSIZE`` above it. Kept a little lower.
GSO_MAX_BYTES = 65_000

#: Errors one datagram send can meet that say nothing about the viewer's
#: next send: a firewall rule that drops this packet (EPERM), a full device
#: queue (ENOBUFS), an ICMP error from an earlier datagram reported on this
#: one (ECONNREFUSED, EHOSTUNREACH, ENETUNREACH), a route change (ENETDOWN,
#: EHOSTDOWN, EADDRNOTAVAIL), a datagram the path cannot carry (EMSGSIZE).
#: They are counted and the session goes on; only an error that lasts
#: (see :attr:`DatagramSender.failing_since`) ends a session.
TRANSIENT_SEND_ERRNOS = frozenset({
    errno.EPERM, errno.ENOBUFS, errno.EAGAIN, errno.ECONNREFUSED, errno.EMSGSIZE, errno.EHOSTUNREACH,
    errno.ENETUNREACH, errno.ENETDOWN, errno.EHOSTDOWN, errno.EADDRNOTAVAIL, errno.EINTR,
})

#: GSO errors that mean "this socket's route cannot segment" (no UDP GSO in
#: the kernel, a device without checksum offload): send one datagram at a
#: time on this socket from then on.
_GSO_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP, errno.EIO})


class DatagramSender:
    """Send already-protected datagrams to one peer on a non-blocking UDP
    socket, with UDP generic segmentation offload for runs of equal size.

    ``send_batch`` groups consecutive datagrams of one size — the FU-A
    fragments of a frame — into one ``sendmsg`` with ``UDP_SEGMENT`` (Linux
    ≥ 4.18), capped at :data:`GSO_MAX_SEGMENTS` datagrams and
    :data:`GSO_MAX_BYTES` bytes per call: a single-slice 1080p keyframe is
    130 KB and more, past the kernel's limit for one send. Measured here 5.3
    → 2.8 µs per packet for runs of five. Any GSO failure resends that run
    one datagram at a time, so a GSO problem never costs a packet.

    Per-datagram outcome, never an exception for a transient problem:

    * the socket buffer is full (``EAGAIN``): the datagram is dropped for
      this viewer only and counted in ``backlogged`` — the bounded per-viewer
      send queue DESIGN.md asks for;
    * a transient error (:data:`TRANSIENT_SEND_ERRNOS`): counted in
      ``errors`` (by errno in ``errors_by_errno``); the next send is tried.

    ``failing_since`` is the ``now`` of the first failed send after the last
    successful one (``None`` while sends succeed): the session ends a viewer
    only when it stays set for a while. Other ``OSError``s (a closed socket)
    propagate.
    """

    __slots__ = ("sock", "addr", "gso", "backlogged", "errors", "errors_by_errno", "last_errno",
                 "failing_since", "gso_fallbacks", "ancillary")

    gso_available = hasattr(socket, "SOL_UDP") and sys.platform.startswith("linux")

    def __init__(self, sock: Any, addr: Any) -> None:
        self.sock = sock
        self.addr = addr
        self.gso = DatagramSender.gso_available
        self.backlogged = 0
        self.errors = 0
        self.errors_by_errno: dict[int, int] = {}
        self.last_errno: int | None = None
        self.failing_since: float | None = None
        self.gso_fallbacks = 0
        #: Ancillary data every datagram carries (an IP_PKTINFO source
        #: address on the shared ICE socket, when the kernel would pick
        #: another one); empty: a plain ``sendto``.
        self.ancillary: list[tuple[int, int, bytes]] = []

    def _failed(self, exc: OSError, count: int, now: float) -> None:
        code = exc.errno or 0
        if code not in TRANSIENT_SEND_ERRNOS:
            raise exc
        self.errors += count
        self.errors_by_errno[code] = self.errors_by_errno.get(code, 0) + count
        self.last_errno = code
        if self.failing_since is None:
            self.failing_since = now

    def send(self, data: bytes, now: float = 0.0) -> int:
        """Send one datagram; return the bytes written (0 when it was dropped)."""
        try:
            if self.ancillary:
                self.sock.sendmsg([data], self.ancillary, 0, self.addr)
            else:
                self.sock.sendto(data, self.addr)
        except BlockingIOError:
            self.backlogged += 1
            return 0
        except OSError as exc:
            self._failed(exc, 1, now)
            return 0
        self.failing_since = None
        return len(data)

    def send_batch(self, datas: list[bytes], now: float = 0.0) -> int:
        """Send several datagrams in order; return the bytes written."""
        sent = 0
        i, n = 0, len(datas)
        send = self.send
        gso = self.gso
        while i < n:
            size = len(datas[i])
            j = i + 1
            if gso:
                limit = min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // size) if size else 1
                while j < n and j - i < limit and len(datas[j]) == size:
                    j += 1
            if j - i > 1:
                try:
                    self.sock.sendmsg([b"".join(datas[i:j])],
                                      [(socket.SOL_UDP, _UDP_SEGMENT, _U16.pack(size)), *self.ancillary],
                                      0, self.addr)
                except BlockingIOError:
                    self.backlogged += j - i
                except OSError as exc:
                    # Whatever the kernel disliked about the batch, the
                    # datagrams themselves may be fine: send them one by one.
                    self.gso_fallbacks += 1
                    if exc.errno in _GSO_UNSUPPORTED:
                        self.gso = gso = False
                    for k in range(i, j):
                        sent += send(datas[k], now)
                else:
                    sent += size * (j - i)
                    self.failing_since = None
            else:
                sent += send(datas[i], now)
            i = j
        return sent


class FastPath:
    """Synchronous SRTP-protect + send on a connected DTLS transport.

    Packets go straight to the nominated ICE pair's UDP socket (a duplicate
    of the descriptor aioice's transport owns), not through the transport's
    write buffer, through a :class:`DatagramSender` (GSO batching, transient
    errors counted and survived, a full buffer drops for this viewer only).
    """

    __slots__ = ("_dtls", "_srtp", "_conn", "_nominated", "sender", "_sock_of", "_sndbuf", "_pair", "_protect",
                 "_native", "_wire", "_wire_of")

    def __init__(self, dtls_transport: Any, sndbuf: int | None = None, native: bool = True) -> None:
        self._dtls = dtls_transport
        self._sndbuf = sndbuf
        self._srtp = dtls_transport._tx_srtp
        if self._srtp is None:
            raise ConnectionError("DTLS transport has no SRTP session yet")
        self._conn = dtls_transport.transport._connection  # aioice.Connection
        #: Its nominated pair per component (the dict itself: _fastsend.fanout reads it).
        self._nominated = self._conn._nominated
        #: libsrtp's context, buffer and length cell, read once (see protect_all).
        self._protect = _protect_handles(self._srtp)
        #: (srtp_protect, the srtp_t) as addresses and the longest packet,
        #: for _fastsend; None: the Python path.
        self._native = _native_handles(self._protect) if native else None
        #: The sender's destination as a struct sockaddr (None: the Python
        #: path for this address), and the address object it was made from.
        self._wire: bytes | None = None
        self._wire_of: Any = None
        #: The current socket's sender (its counters), once anything was sent.
        self.sender: DatagramSender | None = None
        self._pair: Any = None  # the nominated pair the sender was made for
        self._sock_of: Any = None

    @property
    def backlogged(self) -> int:
        return self.sender.backlogged if self.sender is not None else 0

    def _current(self) -> DatagramSender:
        pair = self._conn._nominated.get(1)
        if pair is self._pair and pair is not None:
            transport = pair.protocol.transport
            if transport is self._sock_of and transport is not None:
                return self.sender  # type: ignore[return-value]  # the per-packet case
        if pair is None:
            raise ConnectionError("no nominated ICE candidate pair")
        self._pair = pair
        transport = pair.protocol.transport
        if transport is None:
            raise ConnectionError("ICE transport closed")
        sender = self.sender
        if getattr(transport, "framed", False) and (self._sock_of is not transport or sender is None):
            # An ICE-TCP pair (media/webrtc/icetcp.py): RFC 4571 frames on its
            # TCP connection, one write per batch; no socket of ours to dup.
            fresh = transport.framed_sender(pair.remote_addr)
            self._replace(sender, fresh, transport)
            return fresh
        if self._sock_of is not transport or sender is None:
            shared = getattr(transport, "mux_socket", None)
            if shared is not None:
                # The shared ICE socket (media/webrtc/icemux.py): sent on as
                # it is; its buffer is every viewer's, sized by the mux.
                sock = shared
            else:
                sock = socket.socket(fileno=os.dup(transport.get_extra_info("socket").fileno()))
                sock.setblocking(False)
                if self._sndbuf:
                    # The viewer's send queue: the kernel buffer of its socket.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._sndbuf)
            sender = DatagramSender(sock, pair.remote_addr)
            self._replace(self.sender, sender, transport)
        elif sender.addr is not pair.remote_addr:
            sender.addr = pair.remote_addr
        if shared_ancillary := getattr(transport, "ancillary_for", None):
            # The shared ICE socket: the peer's address as that socket takes
            # it (IPv4-mapped on a dual-stack one), from the address it checked.
            remote = tuple(pair.remote_addr)
            sender.addr = transport.wire_addr(remote)
            sender.ancillary = shared_ancillary(remote)
        return sender

    def _replace(self, old: Any, fresh: Any, transport: Any) -> None:
        """``fresh`` sends for this viewer from now on (a new nominated pair,
        UDP or ICE-TCP); ``old``'s counters carry over and its socket, if it
        was ours, closes."""
        if old is not None:
            # Counters describe the viewer, not one socket.
            fresh.backlogged, fresh.errors, fresh.gso_fallbacks = old.backlogged, old.errors, old.gso_fallbacks
            fresh.errors_by_errno = old.errors_by_errno
            fresh.failing_since, fresh.last_errno = old.failing_since, old.last_errno
            self._release(old)
        self.sender = fresh
        self._sock_of = transport

    def _release(self, sender: DatagramSender) -> None:
        # Only our duplicate is ours to close, never the shared ICE socket.
        if getattr(self._sock_of, "mux_socket", None) is not sender.sock:
            sender.sock.close()

    def close(self) -> None:
        if self.sender is not None:
            self._release(self.sender)
        self._sock_of = None

    def send_rtp(self, packet: bytes, now: float = 0.0) -> int:
        """Protect and send one RTP packet; return the bytes written (0 when
        it was dropped: full buffer or a transient error, both counted)."""
        return self._current().send(self._srtp.protect(packet), now)

    def send_batch(self, packets: list[bytes], now: float = 0.0) -> int:
        """Protect and send several RTP packets; return the bytes written."""
        protect = self._srtp.protect
        if len(packets) == 1:  # an audio packet, a short frame
            return self._current().send(protect(packets[0]), now)
        return self._current().send_batch([protect(p) for p in packets], now)

    def send_rtcp(self, packet: bytes, now: float = 0.0) -> int:
        return self._current().send(self._srtp.protect_rtcp(packet), now)

    def _sender_now(self) -> DatagramSender:
        pair = self._conn._nominated.get(1)
        if (pair is self._pair and pair is not None and (transport := pair.protocol.transport) is self._sock_of
                and transport is not None):
            return self.sender  # type: ignore[return-value]  # _current()'s per-packet case, without the call
        return self._current()

    def _refresh_wire(self, sender: DatagramSender) -> None:
        """``_wire``: the sender's destination as :mod:`_fastsend` takes it
        (None: the Python path for this address), made again only when the
        sender's address object changed."""
        self._wire_of = sender.addr
        self._wire = sockaddr_bytes(sender.sock.family, sender.addr)

    def send_frame(self, packets: list[bytes], now: float = 0.0) -> int:
        """Protect and send one frame's RTP packets for this viewer (the
        fan-out's per-packet path); return the bytes written. What
        :meth:`send_batch` does, cheaper: :func:`protect_all`, and the
        frame's shorter last packet rides in its GSO run (:func:`send_runs`).
        With the C extension all of it is one call."""
        sender = self._sender_now()
        native = self._native
        if native is not None and sender.__class__ is DatagramSender:
            if sender.addr is not self._wire_of:
                self._refresh_wire(sender)
            if self._wire is not None and (fd := sender.sock.fileno()) >= 0:
                result = _fastsend.send_frame(native[0], native[1], fd, self._wire, sender.ancillary, sender.gso,
                                              native[2], packets)
                if result.__class__ is int:
                    sender.failing_since = None
                    return result  # type: ignore[no-any-return]
                if result is not None:
                    return native_outcome(sender, result, now)
        protected = _protect_with(self._protect, self._srtp, packets)
        if len(protected) == 1:
            return sender.send(protected[0], now)
        return send_runs(sender, protected, now)

    def rewrite_send(self, rewriter: Any, layer: int, packets: list[Any], now: float) -> tuple[int, int]:
        """``rewriter.rewrite_frame(layer, packets, now)`` then
        :meth:`send_frame`, in one C call for the packets the rewriter's
        in-order path takes (``_fastsend.rewrite_send``): returns (packets
        handled from the first on, bytes written). The caller gives the rest
        to ``rewrite_frame`` and ``send_frame``; (0, 0) without the extension
        or when the rewriter is not on ``layer``."""
        native = self._native
        if native is None:
            return 0, 0
        # _sender_now() inline: this runs per viewer per frame
        pair = self._conn._nominated.get(1)
        if (pair is self._pair and pair is not None and (transport := pair.protocol.transport) is self._sock_of
                and transport is not None):
            sender = self.sender
        else:
            sender = self._current()
        if sender.__class__ is not DatagramSender:
            return 0, 0
        if sender.addr is not self._wire_of:
            self._refresh_wire(sender)
        if self._wire is None or (fd := sender.sock.fileno()) < 0:
            return 0, 0
        result = _fastsend.rewrite_send(native[0], native[1], fd, self._wire, sender.ancillary, sender.gso,
                                        native[2], rewriter, layer, packets, now)
        if result.__class__ is int:
            sender.failing_since = None
            return len(packets), result
        if not result[0]:
            return 0, 0
        return result[0], native_outcome(sender, result, now)


def _protect_handles(session: Any) -> tuple[Any, Any, Any, Any, int] | None:
    """(libsrtp context, cffi buffer, its Python view, length cell, room)
    of a pylibsrtp session, for calling ``srtp_protect`` directly; None
    when this pylibsrtp is laid out differently (use ``session.protect``)."""
    handle = getattr(session, "_srtp", None)
    buf = getattr(session, "_buffer", None)
    if handle is None or buf is None or _srtp_protect is None:
        return None
    cdata = session._cdata
    # The length cell lives beside the session's own buffer: allocating one
    # per call cost as much as the rest of the Python work around libsrtp.
    cell = getattr(session, "_rf_len_cell", None)
    if cell is None:
        cell = session._rf_len_cell = _len_cell()
    return handle[0], cdata, buf, cell, len(cdata) - _SRTP_TRAILER


def _native_handles(handles: tuple[Any, Any, Any, Any, int] | None) -> tuple[int, int, int] | None:
    """libsrtp's ``srtp_protect`` and the session's ``srtp_t`` as addresses
    for :mod:`_fastsend`, and the longest packet pylibsrtp's buffer takes;
    None when the extension is not there (or pylibsrtp is laid out
    differently)."""
    if _fastsend is None or handles is None:
        return None
    return (int(_srtp_ffi.cast("uintptr_t", _srtp_protect)), int(_srtp_ffi.cast("uintptr_t", handles[0])),
            handles[4])


def sockaddr_bytes(family: int, addr: Any) -> bytes | None:
    """``addr`` as the ``struct sockaddr`` a socket of ``family`` sends to
    (what Python's ``sendto`` builds per call); None for anything but a
    numeric IPv4/IPv6 address of that family (the Python path sends those,
    or raises what it always raised)."""
    # struct sockaddr_in / sockaddr_in6 (Linux): the family and the scope id
    # in host order, the port and the flow label in network order.
    try:
        if family == socket.AF_INET:
            return b"".join((_U16.pack(socket.AF_INET), _NET_U16.pack(addr[1]),
                             socket.inet_pton(socket.AF_INET, addr[0]), bytes(8)))
        if family == socket.AF_INET6:
            flow = addr[2] if len(addr) > 2 else 0
            scope = addr[3] if len(addr) > 3 else 0
            return b"".join((_U16.pack(socket.AF_INET6), _NET_U16.pack(addr[1]), _NET_U32.pack(flow),
                             socket.inet_pton(socket.AF_INET6, addr[0]), _U32.pack(scope)))
    except (OSError, ValueError, TypeError, IndexError, struct.error):
        return None
    return None


def fanout_lanes(lanes: list[Any], start: int, index: int, audio: int, packets: list[Any],
                 now: float) -> list[tuple[int, Any]] | None:
    """``_fastsend.fanout``: one frame to every viewer lane (see
    ``whep.FrameLane``) from position ``start`` round; None without the
    extension or while a C call is already running (each viewer its own
    call then)."""
    if _fastsend is None:
        return None
    return _fastsend.fanout(lanes, start, index, audio, packets, now, DatagramSender)


def native_outcome(sender: DatagramSender, result: tuple[int, int, int, int, list[bytes] | None, int],
                    now: float) -> int:
    """:mod:`_fastsend`'s answer when not every datagram went out (or not
    every packet was taken): the same counts and errors as the Python path."""
    _, sent, backlogged, any_sent, rest, code = result
    if code > 0:
        _srtp_check(code)  # libsrtp refused a packet: raises, nothing was sent
    sender.backlogged += backlogged
    if any_sent:
        sender.failing_since = None
    if rest:
        # From the datagram whose sendmsg failed on: the Python path counts
        # the error (or raises it) and tries GSO / one by one as it does.
        sent += send_runs(sender, rest, now)
    return sent


def protect_all(session: Any, packets: list[bytes]) -> list[bytes]:
    """``session.protect`` of each packet, calling libsrtp through
    pylibsrtp's own cffi handle, buffer and length cell: pylibsrtp's wrapper
    allocates an ``int *`` and checks types per call (measured here 6.3 →
    5.1 µs for a 1.2 kB packet). Same bytes, same errors (a packet too long
    for the buffer goes through ``protect`` and raises there)."""
    return _protect_with(_protect_handles(session), session, packets)


def _protect_with(handles: tuple[Any, Any, Any, Any, int] | None, session: Any, packets: list[bytes]) -> list[bytes]:
    """:func:`protect_all` with the session's handles already looked up
    (:func:`_protect_handles`; FastPath keeps them: it runs once per viewer
    per frame)."""
    if handles is None:
        return [session.protect(p) for p in packets]
    ctx, cdata, buf, cell, room = handles
    out = []
    for p in packets:
        n = len(p)
        if n > room or type(p) is not bytes:
            out.append(session.protect(p))
            continue
        buf[0:n] = p
        cell[0] = n
        rc = _srtp_protect(ctx, cdata, cell)
        if rc:
            _srtp_check(rc)
        out.append(buf[0:cell[0]])
    return out


def send_runs(sender: DatagramSender, datas: list[bytes], now: float = 0.0) -> int:
    """:meth:`DatagramSender.send_batch` where a run of equal-size datagrams
    may end in one shorter datagram — a frame's last FU-A fragment — in the
    same ``sendmsg``: UDP GSO cuts every segment at ``UDP_SEGMENT`` bytes and
    the last may be shorter (Linux udp(7)). One syscall per frame instead of
    two. Failures go to ``send_batch``'s own handling of that run."""
    if not sender.gso:
        return sender.send_batch(datas, now)
    sent = 0
    i, n = 0, len(datas)
    while i < n:
        size = len(datas[i])
        limit = min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // size) if size else 1
        j = i + 1
        while j < n and j - i < limit:
            length = len(datas[j])
            if length == size:
                j += 1
            else:
                if length < size:
                    j += 1  # the shorter last segment ends the run
                break
        if j - i == 1:
            sent += sender.send(datas[i], now)
        else:
            run = datas[i:j]
            try:
                sender.sock.sendmsg([b"".join(run)],
                                   [(socket.SOL_UDP, _UDP_SEGMENT, _U16.pack(size)), *sender.ancillary],
                                   0, sender.addr)
            except BlockingIOError:
                sender.backlogged += j - i
            except OSError:
                sent += sender.send_batch(run, now)  # its fallback: counted, one by one
            else:
                sent += sum(map(len, run))
                sender.failing_since = None
        i = j
    return sent


# -- WHIP ingest: RTP captured before aiortc's receivers (media/webrtc/whip/) -----------


def check_ingest_internals() -> None:
    """The internals the WHIP ingest path relies on (part of :func:`check_internals`)."""
    import inspect

    import aioice
    from aiortc.rtcdtlstransport import RTCDtlsTransport
    from aiortc.rtcrtpreceiver import RTCRtpReceiver
    from aiortc.rtcrtptransceiver import RTCRtpTransceiver

    for owner, name in ((RTCDtlsTransport, "_handle_rtp_data"), (RTCDtlsTransport, "_handle_rtcp_data"),
                        (RTCRtpReceiver, "receive")):
        if not inspect.iscoroutinefunction(getattr(owner, name, None)):
            raise AiortcInternalsChanged(f"{owner.__name__}.{name} is gone or no longer a coroutine")
    params = list(inspect.signature(RTCDtlsTransport._handle_rtp_data).parameters)
    if params[:2] != ["self", "data"] or "arrival_time_ms" not in params:
        raise AiortcInternalsChanged(f"RTCDtlsTransport._handle_rtp_data signature changed: {params}")
    for name in ("_handle_rtp_data", "_handle_rtcp_data", "_rx_srtp"):
        if name not in RTCDtlsTransport._recv_next.__code__.co_names:
            raise AiortcInternalsChanged(f"RTCDtlsTransport._recv_next no longer uses {name}: captured RTP "
                                         "would bypass the WHIP ingest")
    if "_tx_srtp" not in RTCDtlsTransport.__init__.__code__.co_names:
        raise AiortcInternalsChanged("RTCDtlsTransport no longer keeps _tx_srtp")
    if "_RTCRtpTransceiver__receiver" not in RTCRtpTransceiver.__init__.__code__.co_names:
        raise AiortcInternalsChanged("RTCRtpTransceiver no longer stores its receiver as __receiver")
    if "_ssrc" not in RTCRtpSender.__init__.__code__.co_names:
        raise AiortcInternalsChanged("RTCRtpSender no longer keeps its SSRC in _ssrc")
    if "_nominated" not in aioice.Connection.__init__.__code__.co_names:
        raise AiortcInternalsChanged("aioice.Connection no longer keeps _nominated candidate pairs")
    from aiortc.rtcicetransport import RTCIceTransport

    if not callable(getattr(RTCDtlsTransport, "_set_role", None)) or "_role" not in (
            RTCDtlsTransport.__init__.__code__.co_names):
        raise AiortcInternalsChanged("RTCDtlsTransport no longer keeps its DTLS role in _role/_set_role")
    if not {"_send", "_recv"} <= set(RTCIceTransport.__init__.__code__.co_names):
        raise AiortcInternalsChanged("RTCIceTransport no longer exposes _send/_recv per instance")


_ESTIMATOR = "_RTCRtpReceiver__remote_bitrate_estimator"


def drop_receive_estimator(receiver: Any) -> None:
    """Remove aiortc's receive-side bandwidth estimator from a video
    ``RTCRtpReceiver`` whose RTP aiortc never sees (a WHEP viewer sends
    none; WHIP RTP is captured at the DTLS transport, and its REMB is our
    own). aiortc builds one per video receiver, a ``RateCounter`` of 1,000
    one-millisecond ``RateBucket`` objects: 1,001 objects the garbage
    collector tracks and scans in every full collection — measured, 100,100
    of the 178,000 objects 100 WHEP viewers added to the server process, the
    larger half of each full collection's pause — and ~100 kB per viewer.
    aiortc checks the estimator for ``None`` before it feeds it."""
    if hasattr(receiver, _ESTIMATOR):
        setattr(receiver, _ESTIMATOR, None)


class CapturingReceiver(RTCRtpReceiver):
    """An ``RTCRtpReceiver`` that never starts aiortc's jitter buffer,
    decoder thread or RTCP loop: ``receive()`` only records the negotiated
    parameters. Its RTP never reaches it anyway — :func:`capture_rtp` takes
    it at the DTLS transport."""

    def __init__(self, kind: str, transport: Any) -> None:
        super().__init__(kind, transport)
        drop_receive_estimator(self)
        self.parameters: Any = None

    async def receive(self, parameters: Any) -> None:  # noqa: D401 - aiortc API
        self.parameters = parameters


def install_receiver(transceiver: Any, receiver: CapturingReceiver) -> None:
    """Replace ``transceiver``'s receiver (before setRemoteDescription)."""
    transceiver._RTCRtpTransceiver__receiver = receiver


def sender_ssrc(transceiver: Any) -> int:
    """The SSRC aiortc announces for ``transceiver`` (``a=ssrc`` in its SDP);
    a receive-only transceiver uses it as its RTCP sender SSRC."""
    return int(transceiver.sender._ssrc)


def capture_rtp(dtls_transport: Any, on_rtp: Callable[[bytes], None], on_rtcp: Callable[[bytes], None]) -> None:
    """Route every SRTP-decrypted RTP/RTCP datagram of ``dtls_transport`` to
    ``on_rtp``/``on_rtcp`` (synchronous, bytes) instead of aiortc's parser
    and RtpRouter. Exceptions are logged, never raised into aiortc's
    receive loop (which would tear the transport down)."""

    async def handle_rtp(data: bytes, arrival_time_ms: int = 0) -> None:
        try:
            on_rtp(data)
        except Exception:
            log.exception("whip.rtp_handler_failed")

    async def handle_rtcp(data: bytes) -> None:
        try:
            on_rtcp(data)
        except Exception:
            log.exception("whip.rtcp_handler_failed")

    dtls_transport._handle_rtp_data = handle_rtp
    dtls_transport._handle_rtcp_data = handle_rtcp


def send_rtcp(dtls_transport: Any, packet: bytes) -> None:
    """SRTCP-protect ``packet`` and queue it on the nominated ICE pair's
    datagram transport (buffered by asyncio: RTCP to a publisher is rare and
    must not be dropped). Raises ConnectionError when not connected."""
    srtp = dtls_transport._tx_srtp
    if srtp is None:
        raise ConnectionError("DTLS transport has no SRTP session yet")
    pair = dtls_transport.transport._connection._nominated.get(1)
    if pair is None or pair.protocol.transport is None:
        raise ConnectionError("no nominated ICE candidate pair")
    pair.protocol.transport.sendto(srtp.protect_rtcp(packet), pair.remote_addr)


def nominated_remote(dtls_transport: Any) -> str | None:
    """``host:port`` of the peer on the nominated ICE pair, if any."""
    try:
        pair = dtls_transport.transport._connection._nominated.get(1)
    except AttributeError:
        return None
    if pair is None:
        return None
    host, port = pair.remote_addr[:2]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


async def add_trickle_candidates(pc: Any, frag: str) -> None:
    """Apply the ``a=candidate`` lines of a trickle-ICE fragment (RFC 8840)
    to a peer connection; with BUNDLE they all belong to the first m-line.
    Every candidate is checked first (aiortc's parser asserts on garbage):
    a bad one raises :class:`~media.webrtc.sdp.SdpError` before any is added."""
    from aiortc.sdp import candidate_from_sdp

    from .sdp import parse_trickle_candidates

    values = parse_trickle_candidates(frag)
    mids = [t.mid for t in pc.getTransceivers()]
    for value in values:
        cand = candidate_from_sdp(value)
        cand.sdpMid = mids[0] if mids else None
        cand.sdpMLineIndex = 0
        await pc.addIceCandidate(cand)


# -- DTLS role (RFC 8842 §5.3, RFC 5763 §5) -------------------------------------------

#: RFC 9147 §5.8.2: "Implementations SHOULD use an initial timer value of
#: 100 msec (the minimum defined in RFC 6298) and double the value at each
#: retransmission"; OpenSSL's DTLS 1.2 timer starts at 1 s.
FIRST_FLIGHT_RETRANSMIT_S = 0.1

#: One early copy of the first flight: a peer whose ICE loop swallows the
#: first DTLS datagram (ffmpeg 9's WHIP muxer as DTLS server, measured:
#: handshake 1003 ms with OpenSSL's timer alone, 100 ms with the RFC 9147
#: timer, 19 ms with a copy after 20 ms) starts its handshake on the copy.
EARLY_COPY_S = 0.01


def _is_dtls(data: bytes) -> bool:
    # RFC 7983 §7: a first byte in 20..63 is DTLS on a multiplexed 5-tuple.
    return bool(data) and 19 < data[0] < 64


def choose_dtls_role(pc: Any) -> str:
    """After ``setRemoteDescription(offer)``, before ``createAnswer()``: pick
    this side's DTLS role and return it (``"server"`` = ``a=setup:passive``).

    RFC 8842 §5.3: the answerer picks the role when the offer says
    ``actpass``. We pick passive (DTLS server): the offerer then sends its
    ClientHello once *its* ICE check has succeeded, so nothing we send can
    arrive before the peer listens. An offer that is ``passive`` itself
    (ffmpeg 9's WHIP default) leaves us the client: that peer swallows the
    first ClientHello in its ICE loop and OpenSSL would resend it only after
    1 s, so the first flight is resent early (:func:`_resend_first_flight`).
    """
    remote = pc.remoteDescription.sdp if pc.remoteDescription is not None else ""
    offered = {ln.split(":", 1)[1].strip() for ln in remote.splitlines() if ln.startswith("a=setup:")}
    role = "client"
    for transport in _dtls_transports(pc):
        if transport._role == "auto" and offered <= {"actpass"}:
            transport._set_role("server")
        elif transport._role == "auto":  # the offer said passive: aiortc answers active
            transport._set_role("client")
        if transport._role == "client":
            _resend_first_flight(transport)
        else:
            role = "server"
    return role


def _dtls_transports(pc: Any) -> list[Any]:
    seen: dict[int, Any] = {}
    for tr in pc.getTransceivers():
        t = tr.receiver.transport
        seen.setdefault(id(t), t)
    return list(seen.values())


def _resend_first_flight(dtls_transport: Any, early: float = EARLY_COPY_S,
                         first: float = FIRST_FLIGHT_RETRANSMIT_S, until: float = 1.0) -> None:
    """Resend our first DTLS flight (the ClientHello) ``early`` s after it
    went out, then on the RFC 9147 timer (``first``, doubling), until the
    peer sends any DTLS record or OpenSSL's own 1 s timer takes over
    (``until``). The datagram is resent byte for byte: a peer that did see
    the first copy discards the duplicate record (RFC 6347 §4.1.2.6 replay
    detection)."""
    ice = dtls_transport.transport
    send, recv = ice._send, ice._recv
    state: dict[str, Any] = {"flight": None, "heard": False, "t0": 0.0}
    resends: set[asyncio.Task[None]] = set()  # owned until done (the loop holds tasks weakly)

    async def watched_recv() -> bytes:
        data = await recv()
        if _is_dtls(data):
            state["heard"] = True
        return data

    async def watched_send(data: bytes) -> None:
        if state["flight"] is None and _is_dtls(data) and not state["heard"]:
            state["flight"] = bytes(data)
            loop = asyncio.get_running_loop()
            state["t0"] = loop.time()
            loop.call_later(early, resend, first)
        await send(data)

    def resend(next_delay: float) -> None:
        if state["heard"] or dtls_transport.state != "connecting":
            return
        loop = asyncio.get_running_loop()
        event(log, logging.DEBUG, "webrtc.dtls_first_flight_resent", after_s=loop.time() - state["t0"])
        task = loop.create_task(send(state["flight"]))
        resends.add(task)
        task.add_done_callback(resends.discard)
        if loop.time() - state["t0"] + next_delay < until:
            loop.call_later(next_delay, resend, next_delay * 2)

    ice._send, ice._recv = watched_send, watched_recv
