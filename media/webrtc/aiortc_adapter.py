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

:func:`check_internals` verifies each internal this module touches exists
with the expected shape; the adapter tests call it so an aiortc upgrade that
moves one fails loudly instead of silently falling back to decoding.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Callable

import aiortc
from aiortc import RTCRtpSender
from aiortc.codecs import CODECS
from aiortc.rtcrtpparameters import RTCRtcpFeedback, RTCRtpCodecParameters, RTCRtpSendParameters

from ..errors import RtpError
from ..rtp.rtcp import parse_rtcp

log = logging.getLogger("returnfeed.webrtc")

#: The aiortc release these internals were read from. pyproject pins it.
AIORTC_VERSION = "1.16.0"

_H264_EXTRA_PROFILES = ("4d001f", "640c1f", "64001f", "f4001f")

RtcpCallback = Callable[[Any], None]


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


def ensure_h264_profiles() -> None:
    """Add Main/High H.264 profiles (with RTX) to aiortc's codec table once."""
    video = CODECS["video"]
    present = {str(c.parameters.get("profile-level-id", "")).lower() for c in video
               if c.mimeType.lower() == "video/h264"}
    used = {c.payloadType for c in CODECS["video"] + CODECS["audio"]}
    pt = 96
    for plid in _H264_EXTRA_PROFILES:
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


def install_sender(transceiver: Any, sender: ForwardingSender) -> None:
    """Replace ``transceiver``'s sender (before the answer is created)."""
    transceiver._RTCRtpTransceiver__sender = sender


def set_negotiated_codecs(transceiver: Any, codecs: list[RTCRtpCodecParameters]) -> None:
    transceiver._codecs = [copy.deepcopy(c) for c in codecs]


def negotiated_codecs(transceiver: Any) -> list[RTCRtpCodecParameters]:
    return list(transceiver._codecs)


def offered_header_extensions(transceiver: Any) -> list[Any]:
    return list(transceiver._headerExtensions)


class FastPath:
    """Synchronous SRTP-protect + sendto on a connected DTLS transport."""

    __slots__ = ("_dtls", "_srtp", "_conn")

    def __init__(self, dtls_transport: Any) -> None:
        self._dtls = dtls_transport
        self._srtp = dtls_transport._tx_srtp
        if self._srtp is None:
            raise ConnectionError("DTLS transport has no SRTP session yet")
        self._conn = dtls_transport.transport._connection  # aioice.Connection

    def _pair(self) -> Any:
        pair = self._conn._nominated.get(1)
        if pair is None:
            raise ConnectionError("no nominated ICE candidate pair")
        return pair

    def send_rtp(self, packet: bytes) -> int:
        """Protect and send one RTP packet; return the bytes written."""
        data = self._srtp.protect(packet)
        pair = self._conn._nominated.get(1)
        if pair is None:
            raise ConnectionError("no nominated ICE candidate pair")
        pair.protocol.transport.sendto(data, pair.remote_addr)
        return len(data)

    def send_rtcp(self, packet: bytes) -> int:
        data = self._srtp.protect_rtcp(packet)
        pair = self._pair()
        pair.protocol.transport.sendto(data, pair.remote_addr)
        return len(data)

    def write_buffer_size(self) -> int:
        """Bytes queued in the datagram transport (the viewer's send queue)."""
        pair = self._conn._nominated.get(1)
        if pair is None or pair.protocol.transport is None:
            return 0
        return pair.protocol.transport.get_write_buffer_size()

