"""A light WHEP viewer for load tests and latency probes: it receives, it never decodes.

Usage::

    async with WhepViewer("http://127.0.0.1:8080/whep/cam1", token=tok) as v:
        await asyncio.sleep(10)
    print(v.stats.video.packets, v.stats.video.lost, v.stats.setup_ms)

What it does (WHEP, draft-ietf-wish-whep §4.2; RFC 9725 §4.2 for the HTTP
rules it shares with WHIP):

1. builds a ``recvonly`` offer with aiortc's ``RTCPeerConnection``: video
   H.264 packetization-mode=1 with profile-level-ids 42e01f, 4d001f, 640c1f
   (each with RTX, RFC 4588), audio Opus; extmap sdes:mid (RFC 8843 §15.1)
   and abs-send-time; rtcp-fb nack, nack pli, goog-remb. Max-bundle,
   rtcp-mux, no STUN/TURN server, and (by default) 127.0.0.1 as the only
   host candidate so nothing leaves the loopback interface;
2. POSTs it (``Content-Type: application/sdp``, optional bearer token,
   optional ``?layer=``), applies the 201 answer, keeps ``Location``;
3. once DTLS is up, takes every SRTP/SRTCP datagram *before aiortc sees it*
   (first byte 128–191, RFC 7983 §7), unprotects it with the DTLS
   transport's own libsrtp session and hands the RTP to :class:`RtpCounter`,
   which reads only the fixed header (``media.rtp.packet.peek_header``) and
   counts per SSRC: packets, bytes, sequence continuity (gaps, late arrivals,
   duplicates, backwards jumps), frame ends (marker bit) with their arrival
   time (``time.monotonic_ns``) and RTP timestamp, and abs-send-time;
4. sends its own receiver reports (RFC 3550 §6.4.2, with LSR/DLSR from the
   server's sender reports so the server can compute RTT) and REMB
   (draft-alvestrand-rmcat-remb-03) built with ``media.rtp.rtcp``, and, when
   asked, a Generic NACK (RFC 4585 §6.2.1) per sequence gap;
5. on exit, DELETEs the session resource (draft-ietf-wish-whep §4.3) and
   closes the peer connection.

Why our own RTCP instead of aiortc's receiver: aiortc's ``RTCRtpReceiver``
produces RR/REMB only from state it updates on *every* packet
(``StreamStatistics.add``, the ``RemoteBitrateEstimator`` inter-arrival
filter, the NACK generator, the jitter buffer) and it always starts a decoder
thread. Keeping it alive just for its reports would cost several µs per
packet (plus ``RtpPacket.parse``, ~8 µs, and an ``asyncio.Queue`` hand-off per
datagram); building one RR+REMB per second from counters we keep anyway costs
a few tens of µs per *second* per viewer. So aiortc's receivers are never
started (their ``receive()`` is replaced by one that only records the
parameters: no decoder thread, no RTCP task) and no RTP ever reaches them.

aiortc internals: every use of a private aiortc/aioice attribute is in the
"aiortc internals" section below (including :class:`SrtpPath`) and in
:meth:`WhepViewer._install_fast_path`; :func:`check_internals` verifies each one
exists so a dependency upgrade fails loudly (the tests call it) instead of
silently falling back to decoding.
"""

from __future__ import annotations

import asyncio
import math
import random
import sys
import time
import urllib.parse
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import aiohttp
import pylibsrtp

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from media.errors import RtpError  # noqa: E402
from media.webrtc.aiortc_adapter import ensure_h264_profiles  # noqa: E402
from media.rtp.packet import RTP_HEADER_SIZE, HeaderExtensionUri, peek_header, unwrap_rtx_payload  # noqa: E402
from media.rtp.rtcp import (  # noqa: E402
    ReportBlock,
    SenderReport,
    build_nack,
    build_pli,
    build_remb,
    build_rr,
    ntp_middle32,
    parse_rtcp,
    serialize_rtcp,
)

__all__ = [
    "H264_PROFILES",
    "WhepError",
    "SsrcStats",
    "RtpCounter",
    "ViewerStats",
    "WhepViewer",
    "prepare_aiortc",
    "use_loopback_candidates",
    "check_internals",
    "SrtpPath",
    "sender_ssrc",
    "percentile",
]

#: H.264 profile-level-ids offered, in order of preference.
H264_PROFILES = ("42e01f", "4d001f", "640c1f")

#: aiortc/aioice versions the internals below were read from.
AIORTC_VERSION = "1.16.0"

#: How far behind the highest sequence number a missing packet is still
#: remembered (a late arrival or RTX repair within it is recognised).
SEQ_WINDOW = 3000
#: At most this many sequence numbers are remembered per gap.
MAX_GAP_TRACKED = 1000


class WhepError(RuntimeError):
    """The WHEP exchange failed: HTTP status (0 = no HTTP answer) and detail."""

    def __init__(self, status: int, detail: str, retry_after: float | None = None) -> None:
        super().__init__(f"WHEP {status or 'failure'}: {detail}")
        self.status = status
        self.detail = detail
        self.retry_after = retry_after


# ==========================================================================
# aiortc internals (all of them; see check_internals)
# ==========================================================================


def check_internals() -> None:
    """Raise RuntimeError when an aiortc/aioice internal this module uses moved."""
    import aioice.ice
    import aiortc
    from aiortc.rtcdtlstransport import RTCDtlsTransport
    from aiortc.rtcicetransport import RTCIceTransport
    from aiortc.rtcrtpsender import RTCRtpSender

    problems = []
    if aiortc.__version__ != AIORTC_VERSION:
        problems.append(f"aiortc {aiortc.__version__} installed, this module was written for {AIORTC_VERSION}")
    if not callable(getattr(aioice.ice, "get_host_addresses", None)):
        problems.append("aioice.ice.get_host_addresses is gone")
    for owner, name in ((RTCDtlsTransport, "_handle_rtp_data"), (RTCDtlsTransport, "_handle_rtcp_data"),
                        (aioice.ice.StunProtocol, "datagram_received"),
                        (aioice.ice.Connection, "data_received")):
        if not callable(getattr(owner, name, None)):
            problems.append(f"{owner.__name__}.{name} is gone")
    src = RTCDtlsTransport._setup_srtp.__code__.co_names
    if "_rx_srtp" not in src or "_tx_srtp" not in src:
        problems.append("RTCDtlsTransport no longer keeps _rx_srtp/_tx_srtp")
    if "_connection" not in RTCIceTransport.__init__.__code__.co_names:
        problems.append("RTCIceTransport no longer wraps an aioice Connection as _connection")
    conn_names = aioice.ice.Connection.__init__.__code__.co_names
    for name in ("_protocols", "_nominated", "_queue"):
        if name not in conn_names:
            problems.append(f"aioice Connection has no {name}")
    if "_ssrc" not in RTCRtpSender.__init__.__code__.co_names:
        problems.append("RTCRtpSender has no _ssrc")
    from aiortc.rtcpeerconnection import RTCPeerConnection

    # We replace receiver.receive (instance attribute) to keep the decoder
    # thread from starting; make sure that is still what the pc calls.
    connect = getattr(RTCPeerConnection, "_RTCPeerConnection__connect", None)
    if connect is None or "receive" not in connect.__code__.co_names:
        problems.append("RTCPeerConnection no longer starts receivers with receiver.receive()")
    if problems:
        raise RuntimeError("; ".join(problems))


def prepare_aiortc() -> None:
    """Add H.264 Main (4d001f) and High (640c1f) with RTX to aiortc's codec
    table (the server's own helper; idempotent)."""
    ensure_h264_profiles(H264_PROFILES)

_original_host_addresses: Callable[..., list[str]] | None = None


def use_loopback_candidates(enable: bool = True) -> None:
    """Gather only 127.0.0.1 as host candidate (process-wide).

    aioice skips 127.0.0.1 and offers every other local address; load traffic
    must stay on the loopback interface. The peer's own candidates are its
    business (a server offering only non-loopback addresses still gets our
    packets from 127.0.0.1, delivered locally by the kernel).
    """
    import aioice.ice

    global _original_host_addresses
    if enable:
        if _original_host_addresses is None:
            _original_host_addresses = aioice.ice.get_host_addresses
        aioice.ice.get_host_addresses = lambda use_ipv4=True, use_ipv6=True: ["127.0.0.1"]
    elif _original_host_addresses is not None:
        aioice.ice.get_host_addresses = _original_host_addresses
        _original_host_addresses = None


def _no_decode_receive(receiver: Any, sink: dict) -> Callable[[Any], Any]:
    """Replacement for ``RTCRtpReceiver.receive``: record the parameters only.

    The stock method starts the decoder thread and the RTCP task and
    registers with the DTLS transport's RTP router; we do none of that.
    """

    async def receive(parameters: Any) -> None:
        sink[receiver] = parameters

    return receive


class SrtpPath:
    """Synchronous SRTP/SRTCP send on a connected aiortc DTLS transport.

    Protects with the transport's own libsrtp session (``_tx_srtp``) and
    writes to the nominated ICE pair's datagram transport — no coroutine,
    no ``RtpPacket`` object per packet. Used for the viewer's RTCP and by
    the swarm's fast reference sender.
    """

    __slots__ = ("_tx", "_conn")

    def __init__(self, dtls: Any) -> None:
        if dtls._tx_srtp is None:
            raise ConnectionError("DTLS transport has no SRTP session yet")
        self._tx = dtls._tx_srtp
        self._conn = dtls.transport._connection

    def _send(self, data: bytes) -> bool:
        pair = self._conn._nominated.get(1)
        if pair is None or pair.protocol.transport is None:
            return False
        pair.protocol.transport.sendto(data, pair.remote_addr)
        return True

    def send_rtp(self, packet: bytes) -> bool:
        return self._send(self._tx.protect(packet))

    def send_rtcp(self, packet: bytes) -> bool:
        return self._send(self._tx.protect_rtcp(packet))


def sender_ssrc(sender: Any) -> int:
    """The SSRC aiortc announced for an ``RTCRtpSender`` (private ``_ssrc``)."""
    return sender._ssrc


# ==========================================================================
# Sans-I/O counting
# ==========================================================================



@dataclass(frozen=True, slots=True)
class BrowserRtcp:
    """What Chromium sends back on a clean link (REFERENCES.md: "about 4
    receiver reports a second", REMB "near the rate it receives"): a video
    RR+REMB every ``video_interval`` on average and an audio RR every
    ``audio_interval`` (≈ 3.3 + 0.7 a second), each randomised 0.5–1.5×
    (RFC 3550 §6.3.1); a NACK per gap at once, repeated while the hole
    stays open past ``nack_retry``; a PLI once a hole outlives ``pli_after``."""

    video_interval: float = 0.3
    audio_interval: float = 1.5
    nack_retry: float = 0.1
    pli_after: float = 1.0


BROWSER_RTCP = BrowserRtcp()

@dataclass(slots=True, eq=False)
class SsrcStats:
    """Counters of one received SSRC (RFC 3550 §6.4.1 / A.3 / A.8 semantics).

    * ``skipped``: sequence numbers jumped over when a newer packet arrived
      (each is a hole at that moment); ``late`` of them arrived afterwards
      (reordering), ``recovered`` were repaired by RTX; ``lost`` is what is
      still missing.
    * ``duplicates``: a sequence number received twice. Note that libsrtp's
      replay check drops a repeated index before it reaches us, so most
      duplicates show up in :attr:`ViewerStats.srtp_replay` instead.
    * ``backwards``: a packet older than the highest sequence number that is
      neither a known hole nor within :data:`SEQ_WINDOW` — the sequence went
      backwards. After one, counting continues from the new number. A jump
      back past libsrtp's 1024-packet replay window is dropped by libsrtp
      (``ViewerStats.srtp_replay_old``). On a forwarder both must be 0.
    """

    ssrc: int
    payload_type: int
    kind: str  # "video", "audio", "rtx" or "unknown"
    clock_rate: int
    packets: int = 0
    bytes: int = 0
    first_arrival_ns: int = 0
    last_arrival_ns: int = 0
    base_seq: int = 0
    last_seq: int = 0  # highest sequence number seen (16 bits)
    cycles: int = 0  # RFC 3550 A.1: wraps × 65536
    gaps: int = 0  # forward jumps > 1
    first_gap_packet: int = -1  # packets received when the first gap was seen (-1: none)
    skipped: int = 0
    late: int = 0
    recovered: int = 0
    rtx_useless: int = 0  # (rtx SSRC) repairs of packets that had arrived
    duplicates: int = 0
    backwards: int = 0
    frames: int = 0  # packets with the marker bit (video: frame ends)
    last_timestamp: int = 0
    jitter: float = 0.0  # RFC 3550 A.8, in timestamp units
    transit: int | None = None
    last_abs_send_time: int = -1
    missing: set[int] = field(default_factory=set)
    frame_log: deque | None = None  # (rtp_ts, arrival_ns, abs_send_time or -1, seq)
    # RR interval state (RFC 3550 A.3)
    expected_prior: int = 0
    received_prior: int = 0

    @property
    def lost(self) -> int:
        return self.skipped - self.late - self.recovered

    @property
    def extended_highest(self) -> int:
        return self.cycles + self.last_seq

    @property
    def expected(self) -> int:
        return self.extended_highest - self.base_seq + 1

    def report_block(self, lsr: int, dlsr: int) -> ReportBlock:
        """RFC 3550 §6.4.1 report block; advances the interval state (A.3)."""
        expected = self.expected
        received = self.packets - self.duplicates
        exp_i = expected - self.expected_prior
        rec_i = received - self.received_prior
        self.expected_prior = expected
        self.received_prior = received
        lost_i = exp_i - rec_i
        fraction = 0 if exp_i <= 0 or lost_i <= 0 else min(255, (lost_i << 8) // exp_i)
        return ReportBlock(self.ssrc, fraction, expected - received, self.extended_highest,
                           int(self.jitter), lsr, dlsr)

    def summary(self) -> dict[str, Any]:
        return {
            "ssrc": self.ssrc, "kind": self.kind, "payload_type": self.payload_type,
            "packets": self.packets, "bytes": self.bytes, "frames": self.frames,
            "gaps": self.gaps, "first_gap_packet": self.first_gap_packet, "skipped": self.skipped, "late": self.late, "recovered": self.recovered,
            "lost": self.lost, "duplicates": self.duplicates, "backwards": self.backwards,
            "jitter_ms": (self.jitter / self.clock_rate * 1000.0) if self.clock_rate else None,
        }


_ONE_BYTE = 0xBEDE


def _one_byte_extension(data: bytes, ext_id: int) -> bytes | None:
    """Value of one-byte header extension element *ext_id* (RFC 8285 §4.2), or None."""
    b0 = data[0]
    if not b0 & 0x10:
        return None
    pos = RTP_HEADER_SIZE + 4 * (b0 & 0x0F)
    if len(data) < pos + 4 or (data[pos] << 8 | data[pos + 1]) != _ONE_BYTE:
        return None
    end = pos + 4 + 4 * (data[pos + 2] << 8 | data[pos + 3])
    if end > len(data):
        return None
    pos += 4
    while pos < end:
        b = data[pos]
        i = b >> 4
        if i == 0:
            pos += 1
            continue
        if i == 15:
            return None
        n = (b & 0x0F) + 1
        if i == ext_id:
            return data[pos + 1: pos + 1 + n]
        pos += 1 + n
    return None


class RtpCounter:
    """Per-SSRC RTP accounting from the fixed header only (no payload parsing).

    ``payload_types`` maps PT → (kind, clock rate); ``rtx_apt`` maps an RTX
    PT to the PT it repairs (RFC 4588 §8.6 ``apt``). ``on_gap(stats, seqs)``
    is called with the sequence numbers a forward jump skipped (for NACK).
    ``frame_log`` > 0 keeps that many (rtp_ts, arrival_ns, abs_send_time, seq)
    entries of marker-bit packets per SSRC.
    """

    def __init__(
        self,
        payload_types: dict[int, tuple[str, int]] | None = None,
        rtx_apt: dict[int, int] | None = None,
        *,
        abs_send_time_id: int | None = None,
        frame_log: int = 0,
        on_gap: Callable[[SsrcStats, list[int]], None] | None = None,
    ) -> None:
        self.payload_types = dict(payload_types or {})
        self.rtx_apt = dict(rtx_apt or {})
        self.abs_send_time_id = abs_send_time_id
        self.frame_log = frame_log
        self.on_gap = on_gap
        self.ssrcs: dict[int, SsrcStats] = {}
        self.invalid = 0  # datagrams that are not RTP v2
        self._media_by_pt: dict[int, SsrcStats] = {}

    def _new(self, ssrc: int, pt: int, seq: int, now: int) -> SsrcStats:
        if pt in self.rtx_apt:
            kind, rate = "rtx", self.payload_types.get(pt, ("rtx", 0))[1]
        else:
            kind, rate = self.payload_types.get(pt, ("unknown", 0))
        st = SsrcStats(ssrc, pt, kind, rate, first_arrival_ns=now, base_seq=seq, last_seq=(seq - 1) & 0xFFFF)
        if seq == 0:
            st.cycles = -0x10000  # the first packet's "wrap" below brings it to 0
        if self.frame_log:
            st.frame_log = deque(maxlen=self.frame_log)
        self.ssrcs[ssrc] = st
        if kind != "rtx":
            self._media_by_pt[pt] = st
        return st

    def on_rtp(self, data: bytes, now: int, trailer: int = 0) -> None:
        """Count one RTP packet that arrived at *now* (monotonic ns).

        *data* is the decrypted packet, or the SRTP packet itself (the header
        is sent in the clear, RFC 3711 §3.1) with *trailer* bytes of
        authentication tag (and MKI) at its end, left out of ``bytes``."""
        try:
            marker, pt, seq, ts, ssrc = peek_header(data)
        except RtpError:
            self.invalid += 1
            return
        st = self.ssrcs.get(ssrc)
        if st is None:
            st = self._new(ssrc, pt, seq, now)
        st.packets += 1
        st.bytes += len(data) - trailer
        st.last_arrival_ns = now
        d = (seq - st.last_seq) & 0xFFFF
        if d == 1:
            st.last_seq = seq
            if seq == 0:
                st.cycles += 0x10000
        elif not self._sequence_event(st, seq, d):
            return
        rate = st.clock_rate
        if rate:
            # RFC 3550 A.8 interarrival jitter (transit in timestamp units).
            transit = (now * rate // 1_000_000_000 - ts) & 0xFFFFFFFF
            prev = st.transit
            st.transit = transit
            if prev is not None:
                dd = (transit - prev) & 0xFFFFFFFF
                if dd >= 0x80000000:
                    dd = 0x100000000 - dd
                st.jitter += (dd - st.jitter) * 0.0625
        st.last_timestamp = ts
        if st.kind == "rtx":
            self._repair(st, data)
        elif marker:
            st.frames += 1
            ast = -1
            if self.abs_send_time_id is not None:
                v = _one_byte_extension(data, self.abs_send_time_id)
                if v is not None and len(v) == 3:
                    ast = v[0] << 16 | v[1] << 8 | v[2]
                    st.last_abs_send_time = ast
            if st.frame_log is not None:
                st.frame_log.append((ts, now, ast, seq))

    def _sequence_event(self, st: SsrcStats, seq: int, d: int) -> bool:
        """Anything but the next sequence number; False: do not count it further."""
        if d == 0:
            st.duplicates += 1
            return False
        if d < 0x8000:  # newer: a gap of d - 1 (RFC 3550 A.1 arithmetic)
            if seq < st.last_seq:
                st.cycles += 0x10000
            skipped = d - 1
            if not st.gaps:
                st.first_gap_packet = st.packets
            st.gaps += 1
            st.skipped += skipped
            holes = [(st.last_seq + 1 + i) & 0xFFFF for i in range(min(skipped, MAX_GAP_TRACKED))]
            st.missing.update(holes)
            st.last_seq = seq
            if len(st.missing) > 4 * MAX_GAP_TRACKED:
                st.missing = {s for s in st.missing if (seq - s) & 0xFFFF <= SEQ_WINDOW}
            if self.on_gap is not None:
                self.on_gap(st, holes)
            return True
        # older than the highest
        if seq in st.missing:
            st.missing.discard(seq)
            st.late += 1
            return True
        if 0x10000 - d <= SEQ_WINDOW:
            st.duplicates += 1
            return False
        st.backwards += 1
        st.last_seq = seq
        return True

    def _repair(self, st: SsrcStats, data: bytes) -> None:
        """An RTX packet (RFC 4588 §4): does its OSN fill a hole of the media SSRC?"""
        media = self._media_by_pt.get(self.rtx_apt.get(st.payload_type, -1))
        if media is None:
            return
        b0 = data[0]
        start = RTP_HEADER_SIZE + 4 * (b0 & 0x0F)
        if b0 & 0x10:
            if len(data) < start + 4:
                return
            start += 4 + 4 * (data[start + 2] << 8 | data[start + 3])
        try:
            osn, _ = unwrap_rtx_payload(data[start:start + 2])
        except RtpError:
            return
        if osn in media.missing:
            media.missing.discard(osn)
            media.recovered += 1
        else:
            st.rtx_useless += 1

    def media(self, kind: str) -> list[SsrcStats]:
        return [s for s in self.ssrcs.values() if s.kind == kind]


# ==========================================================================
# Viewer
# ==========================================================================


@dataclass(slots=True, eq=False)
class ViewerStats:
    """What one viewer saw. Times in ms; None when the step did not happen."""

    url: str
    status: int = 0  # HTTP status of the POST
    location: str | None = None
    offer_ms: float | None = None  # createOffer + setLocalDescription (candidate gathering)
    answer_ms: float | None = None  # POST round trip
    ice_dtls_ms: float | None = None  # answer applied → DTLS connected (ICE checks + DTLS handshake)
    setup_ms: float | None = None  # start → DTLS connected
    first_packet_ms: float | None = None  # start → first RTP packet
    connected: bool = False
    dropped: bool = False  # the peer connection failed/closed after connecting, before close()
    error: str | None = None
    delete_status: int | None = None
    counter: RtpCounter = field(default_factory=RtpCounter)
    srtp_auth: int = 0  # unprotect: authentication failure
    srtp_replay: int = 0  # unprotect: index already seen (duplicate / reused sequence number)
    srtp_replay_old: int = 0  # unprotect: index older than the 1024-packet window (went backwards)
    srtp_other: int = 0
    queued_packets: int = 0  # RTP that took aiortc's queue path (before the fast path was in place)
    rtcp_received: dict[str, int] = field(default_factory=dict)
    rr_sent: int = 0
    remb_sent: int = 0
    nack_sent: int = 0
    rtcp_send_errors: int = 0
    pli_sent: int = 0
    codecs: dict[str, str] = field(default_factory=dict)  # kind → "H264 42e01f" …

    @property
    def ssrcs(self) -> dict[int, SsrcStats]:
        return self.counter.ssrcs

    def _first(self, kind: str) -> SsrcStats | None:
        found = self.counter.media(kind)
        return max(found, key=lambda s: s.packets) if found else None

    @property
    def video(self) -> SsrcStats | None:
        """The video SSRC with the most packets (one per viewer from our server)."""
        return self._first("video")

    @property
    def audio(self) -> SsrcStats | None:
        return self._first("audio")

    @property
    def packets(self) -> int:
        return sum(s.packets for s in self.ssrcs.values())

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.ssrcs.values())

    def totals(self) -> dict[str, int]:
        """Sums over media SSRCs (RTX repairs counted separately) — cheap, for snapshots."""
        out = {"packets": 0, "bytes": 0, "video_packets": 0, "video_bytes": 0, "frames": 0,
               "skipped": 0, "late": 0, "recovered": 0, "lost": 0, "duplicates": 0, "backwards": 0,
               "rtx_packets": 0}
        for s in self.ssrcs.values():
            out["packets"] += s.packets
            out["bytes"] += s.bytes
            if s.kind == "rtx":
                out["rtx_packets"] += s.packets
                continue
            if s.kind == "video":
                out["video_packets"] += s.packets
                out["video_bytes"] += s.bytes
                out["frames"] += s.frames
            out["skipped"] += s.skipped
            out["late"] += s.late
            out["recovered"] += s.recovered
            out["lost"] += s.lost
            out["duplicates"] += s.duplicates
            out["backwards"] += s.backwards
        out["duplicates"] += self.srtp_replay
        out["backwards"] += self.srtp_replay_old
        out["srtp_auth"] = self.srtp_auth
        return out

    def summary(self) -> dict[str, Any]:
        return {
            "url": self.url, "status": self.status, "connected": self.connected, "dropped": self.dropped,
            "error": self.error,
            "offer_ms": self.offer_ms, "answer_ms": self.answer_ms, "ice_dtls_ms": self.ice_dtls_ms,
            "setup_ms": self.setup_ms, "first_packet_ms": self.first_packet_ms,
            "delete_status": self.delete_status, "codecs": dict(self.codecs),
            "srtp": {"auth": self.srtp_auth, "replay": self.srtp_replay, "replay_old": self.srtp_replay_old,
                     "other": self.srtp_other},
            "rtcp_received": dict(self.rtcp_received),
            "rtcp_sent": {"rr": self.rr_sent, "remb": self.remb_sent, "nack": self.nack_sent, "pli": self.pli_sent,
                          "errors": self.rtcp_send_errors},
            "invalid_rtp": self.counter.invalid, "queued_packets": self.queued_packets,
            "ssrcs": [s.summary() for s in self.ssrcs.values()],
        }


def _with_query(url: str, **params: str | None) -> str:
    parts = urllib.parse.urlsplit(url)
    q = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    q += [(k, v) for k, v in params.items() if v is not None]
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(q)))


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


class WhepViewer:
    """One WHEP viewer. ``async with WhepViewer(url) as v`` connects (raises
    :class:`WhepError` when it cannot) and on exit DELETEs the session.

    Parameters:
        url: ``http://127.0.0.1:PORT/whep/{stream}`` (may carry ``?token=``).
        token: sent as ``Authorization: Bearer``.
        layer: appended as ``?layer=`` (pins a simulcast layer).
        session: a shared ``aiohttp.ClientSession`` (one per swarm process);
            otherwise the viewer makes and closes its own.
        connect_timeout: seconds for POST + ICE + DTLS.
        retry_not_live: keep retrying a 409 (stream not live) / 503 for this
            many seconds, honouring ``Retry-After``.
        rtcp_interval: mean seconds between RR+REMB (randomised 0.5–1.5×,
            RFC 3550 §6.3.1).
        remb_bps: bitrate announced in REMB; 0 sends no REMB.
        nack: send a Generic NACK for each sequence gap (the server may
            repair it with RTX; repairs are counted as ``recovered``).
        browser_rtcp: report the way Chromium does (:data:`BROWSER_RTCP`):
            video RR+REMB every ``rtcp_interval`` on average, audio RR on
            its own every ``BROWSER_RTCP.audio_interval``, REMB at the
            received video rate (not ``remb_bps``), a video hole still
            missing after ``BROWSER_RTCP.nack_retry`` NACKed again and after
            ``BROWSER_RTCP.pli_after`` a PLI (one per ``pli_after`` at most).
        frame_log: keep this many frame-end records per SSRC
            (``SsrcStats.frame_log``) — for latency probes.
        loopback_only: gather only 127.0.0.1 (see :func:`use_loopback_candidates`).
        srtp_verify_every: 1 (default) unprotects every SRTP packet, exactly
            like a browser (authentication, replay check). N > 1 unprotects
            every Nth and reads the other packets' headers in the clear
            (RFC 3711 §3.1: SRTP never encrypts the RTP header); 0 verifies
            only the first. Saves the unprotect (≈4 µs per 1.1 kB packet)
            for large swarms; duplicates are still seen by the counter, but
            libsrtp's replay/auth verdicts only on the verified packets.
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        layer: str | None = None,
        *,
        session: aiohttp.ClientSession | None = None,
        connect_timeout: float = 20.0,
        retry_not_live: float = 0.0,
        rtcp_interval: float = 1.0,
        remb_bps: int = 10_000_000,
        nack: bool = False,
        frame_log: int = 0,
        loopback_only: bool = True,
        srtp_verify_every: int = 1,
        browser_rtcp: bool = False,
    ) -> None:
        self.url = _with_query(url, layer=layer) if layer else url
        self.token = token
        self._session = session
        self._own_session = session is None
        self.connect_timeout = connect_timeout
        self.retry_not_live = retry_not_live
        self.rtcp_interval = rtcp_interval
        self.remb_bps = remb_bps
        self.nack = nack
        self.browser_rtcp = browser_rtcp
        self._audio_timer: asyncio.TimerHandle | None = None
        self._remb_mark: tuple[int, int] | None = None  # (video bytes, monotonic ns) at the last REMB
        self._holes: dict[int, int] = {}  # video seq → monotonic ns it went missing (browser_rtcp)
        self._last_pli_ns = 0
        self.loopback_only = loopback_only
        if srtp_verify_every < 0:
            raise ValueError("srtp_verify_every must be >= 0")
        self.srtp_verify_every = srtp_verify_every
        self.stats = ViewerStats(self.url)
        self.stats.counter.frame_log = frame_log
        self._pc: Any = None
        self._dtls: Any = None
        self._conn: Any = None  # aioice.Connection
        self._rx: Any = None  # pylibsrtp.Session (receive)
        self._path: SrtpPath | None = None
        self._rtcp_ssrc = random.getrandbits(32) or 1
        self._receive_params: dict = {}
        self._connected = asyncio.Event()
        self._failed: str | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._lsr: dict[int, tuple[int, int]] = {}  # media SSRC → (LSR, arrival ns)
        self._t0 = 0
        self._closed = False

    # -- lifecycle ---------------------------------------------------------

    async def __aenter__(self) -> WhepViewer:
        try:
            await self.connect()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return self.stats.connected

    def _headers(self, content_type: str | None = None) -> dict[str, str]:
        h = {}
        if content_type:
            h["Content-Type"] = content_type
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        return h

    async def connect(self) -> None:
        """Offer, POST, apply the answer, wait for DTLS. Raises WhepError."""
        from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpReceiver, RTCSessionDescription
        from aiortc.rtcconfiguration import RTCBundlePolicy

        prepare_aiortc()
        if self.loopback_only:
            use_loopback_candidates(True)
        if self._session is None:
            self._session = aiohttp.ClientSession()
        st = self.stats
        self._t0 = time.monotonic_ns()
        deadline = time.monotonic() + self.connect_timeout
        pc = self._pc = RTCPeerConnection(RTCConfiguration(iceServers=[], bundlePolicy=RTCBundlePolicy.MAX_BUNDLE))
        pc.on("connectionstatechange", self._on_pc_state)
        tv = pc.addTransceiver("video", direction="recvonly")
        ta = pc.addTransceiver("audio", direction="recvonly")
        caps = RTCRtpReceiver.getCapabilities("video").codecs
        h264 = {c.parameters.get("profile-level-id"): c for c in caps if c.mimeType.lower() == "video/h264"}
        tv.setCodecPreferences([h264[p] for p in H264_PROFILES if p in h264]
                               + [c for c in caps if c.mimeType.lower() == "video/rtx"])
        ta.setCodecPreferences([c for c in RTCRtpReceiver.getCapabilities("audio").codecs
                                if c.mimeType.lower() == "audio/opus"])
        for t in (tv, ta):
            t.receiver.receive = _no_decode_receive(t.receiver, self._receive_params)
        self._rtcp_ssrc = sender_ssrc(tv.sender)  # the SSRC our offer announced for this endpoint
        await pc.setLocalDescription(await pc.createOffer())
        st.offer_ms = (time.monotonic_ns() - self._t0) / 1e6
        self._hook_dtls(tv.receiver.transport)

        answer = await self._post(pc.localDescription.sdp, deadline)
        self._configure(answer)
        t_answer = time.monotonic_ns()
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        self._hook_dtls(tv.receiver.transport)  # same object under max-bundle; re-hook if not
        remaining = deadline - time.monotonic()
        try:
            await asyncio.wait_for(self._connected.wait(), timeout=max(0.1, remaining))
        except asyncio.TimeoutError:
            raise WhepError(0, f"ICE/DTLS not connected within {self.connect_timeout:g} s "
                               f"(connection state {pc.connectionState})") from None
        if self._failed:
            raise WhepError(0, self._failed)
        st.ice_dtls_ms = (time.monotonic_ns() - t_answer) / 1e6

    async def _post(self, offer: str, deadline: float) -> str:
        st = self.stats
        retry_until = min(deadline, time.monotonic() + self.retry_not_live)
        while True:
            t = time.monotonic_ns()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WhepError(st.status, f"no 201 within {self.connect_timeout:g} s")
            try:
                async with self._session.post(
                    self.url, data=offer.encode(), headers=self._headers("application/sdp"),
                    timeout=aiohttp.ClientTimeout(total=remaining), allow_redirects=False,
                ) as resp:
                    body = await resp.text()
                    st.status = resp.status
                    retry = _parse_retry_after(resp.headers.get("Retry-After"))
                    location = resp.headers.get("Location")
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                raise WhepError(0, f"POST {self.url}: {exc!r}") from None
            if st.status == 307 and location:  # draft-ietf-wish-whep §4.5: redirects are 307
                self.url = urllib.parse.urljoin(self.url, location)
                continue
            if st.status in (409, 503):  # not live yet / overloaded: Retry-After
                wait = retry if retry is not None else 0.5
                if time.monotonic() + wait < retry_until:
                    await asyncio.sleep(wait)
                    continue
            if st.status != 201:
                raise WhepError(st.status, body.strip()[:500], retry)
            st.answer_ms = (time.monotonic_ns() - t) / 1e6
            if location:
                st.location = self._carry_link_token(urllib.parse.urljoin(self.url, location))
            return body

    def _carry_link_token(self, url: str) -> str:
        """A signed link (``?token=`` on the endpoint, no bearer token) also
        authorizes the session resource: carry it over to the Location."""
        if self.token:
            return url
        token = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.url).query)).get("token")
        if not token or "token" in dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query)):
            return url
        return _with_query(url, token=token)

    def _configure(self, answer: str) -> None:
        """Learn payload types, RTX mapping and the abs-send-time id from the answer."""
        from aiortc.sdp import SessionDescription

        try:
            desc = SessionDescription.parse(answer)
        except Exception as exc:  # aiortc raises ValueError/IndexError/KeyError on junk
            raise WhepError(201, f"unparseable SDP answer: {exc!r}") from None
        counter = self.stats.counter
        for media in desc.media:
            for c in media.rtp.codecs:
                name = c.mimeType.split("/", 1)[1].lower()
                if name == "rtx":
                    apt = c.parameters.get("apt")
                    if isinstance(apt, int):
                        counter.rtx_apt[c.payloadType] = apt
                    counter.payload_types[c.payloadType] = ("rtx", c.clockRate)
                elif name in ("red", "ulpfec", "flexfec-03"):
                    continue
                else:
                    counter.payload_types[c.payloadType] = (media.kind, c.clockRate)
                    if media.kind not in self.stats.codecs:
                        plid = c.parameters.get("profile-level-id")
                        self.stats.codecs[media.kind] = c.mimeType.split("/", 1)[1] + (f" {plid}" if plid else "")
            for ext in media.rtp.headerExtensions:
                if ext.uri == HeaderExtensionUri.ABS_SEND_TIME.value:
                    counter.abs_send_time_id = ext.id
        if self.nack or self.browser_rtcp:
            counter.on_gap = self._on_gap

    # -- aiortc hooks (internals) -----------------------------------------

    def _hook_dtls(self, dtls: Any) -> None:
        if dtls is self._dtls:
            return
        self._dtls = dtls
        # Anything SRTP that still takes aiortc's path (datagrams queued before
        # the fast path is in place) ends here instead of in RtpPacket.parse
        # and the receiver: both overrides are instance attributes.
        dtls._handle_rtp_data = self._slow_rtp
        dtls._handle_rtcp_data = self._slow_rtcp
        dtls.on("statechange", self._on_dtls_state)
        if dtls.state == "connected":
            self._on_dtls_state()

    def _on_pc_state(self) -> None:
        state = self._pc.connectionState if self._pc is not None else "closed"
        if state == "failed" and not self._connected.is_set():
            self._failed = "peer connection failed (ICE or DTLS)"
            self._connected.set()
        elif state in ("failed", "closed") and self.stats.connected and not self._closed:
            self.stats.dropped = True
            self.stats.error = self.stats.error or f"peer connection {state} while watching"

    def _on_dtls_state(self) -> None:
        dtls = self._dtls
        if dtls.state == "connected" and not self._connected.is_set():
            self._install_fast_path()
            self.stats.connected = True
            self.stats.setup_ms = (time.monotonic_ns() - self._t0) / 1e6
            self._schedule_rtcp()
            self._connected.set()
        elif dtls.state in ("failed", "closed") and not self._connected.is_set():
            self._failed = f"DTLS {dtls.state}"
            self._connected.set()

    def _install_fast_path(self) -> None:
        """Take SRTP/SRTCP off aioice's protocol callback before aiortc sees it.

        aioice's ``StunProtocol.datagram_received`` tries a STUN parse on every
        datagram, then ``Connection.data_received`` queues it for aiortc's DTLS
        task, which unprotects, parses a full ``RtpPacket`` and routes it. We
        replace ``datagram_received`` on each of the connection's protocols
        (an instance attribute: uvloop looks it up per datagram) with a
        demultiplexer (RFC 7983 §7: 128–191 is RTP/RTCP) that unprotects with
        aiortc's own libsrtp sessions and counts synchronously; STUN and DTLS
        still go the original way. SRTP already queued is handled now, in
        order, so nothing is counted out of order.
        """
        dtls = self._dtls
        self._rx = dtls._rx_srtp
        self._path = SrtpPath(dtls)
        conn = self._conn = dtls.transport._connection
        unprotect = self._rx.unprotect
        on_rtp = self.stats.counter.on_rtp
        on_srtcp = self._on_srtcp
        on_error = self._srtp_error
        mono = time.monotonic_ns
        st = self.stats
        t0 = self._t0
        SrtpError = pylibsrtp.Error

        def first(now: int) -> None:
            st.first_packet_ms = (now - t0) / 1e6

        every = self.srtp_verify_every
        state = [0, -1]  # packets since the last verified one, trailer length (-1: unknown)

        def make_hook(orig: Callable[[bytes, Any], None]) -> Callable[[bytes, Any], None]:
            def datagram_received(data: bytes, addr: Any) -> None:
                if data and 127 < data[0] < 192:
                    now = mono()
                    if 191 < data[1] < 224:  # RFC 5761 §4: RTCP packet types 192–223
                        on_srtcp(data, now)
                        return
                    try:
                        plain = unprotect(data)
                    except SrtpError as exc:
                        on_error(exc)
                        return
                    if st.first_packet_ms is None:
                        first(now)
                    on_rtp(plain, now)
                else:
                    orig(data, addr)
            return datagram_received

        def make_sampling_hook(orig: Callable[[bytes, Any], None]) -> Callable[[bytes, Any], None]:
            def datagram_received(data: bytes, addr: Any) -> None:
                if data and 127 < data[0] < 192:
                    now = mono()
                    if 191 < data[1] < 224:
                        on_srtcp(data, now)
                        return
                    trailer = state[1]
                    if trailer >= 0 and every != 1 and (every == 0 or state[0] < every - 1):
                        state[0] += 1
                        if len(data) > 12 + trailer:
                            on_rtp(data, now, trailer)
                        return
                    state[0] = 0
                    try:
                        plain = unprotect(data)
                    except SrtpError as exc:
                        on_error(exc)
                        return
                    if trailer < 0:
                        state[1] = len(data) - len(plain)
                    if st.first_packet_ms is None:
                        first(now)
                    on_rtp(plain, now)
                else:
                    orig(data, addr)
            return datagram_received

        factory = make_hook if every == 1 else make_sampling_hook
        for proto in conn._protocols:
            proto.datagram_received = factory(proto.datagram_received)
        queue = conn._queue
        pending = []
        while not queue.empty():
            pending.append(queue.get_nowait())
        now = mono()
        for item in pending:
            if item is not None and item[0] and 127 < item[0][0] < 192:
                data = item[0]
                if 191 < data[1] < 224:
                    on_srtcp(data, now)
                    continue
                try:
                    plain = unprotect(data)
                except SrtpError as exc:
                    on_error(exc)
                    continue
                if st.first_packet_ms is None:
                    first(now)
                on_rtp(plain, now)
            else:
                queue.put_nowait(item)

    async def _slow_rtp(self, data: bytes, arrival_time_ms: int = 0) -> None:
        self.stats.queued_packets += 1
        if self.stats.first_packet_ms is None:
            self.stats.first_packet_ms = (time.monotonic_ns() - self._t0) / 1e6
        self.stats.counter.on_rtp(data, time.monotonic_ns())

    async def _slow_rtcp(self, data: bytes) -> None:
        self._on_rtcp(data, time.monotonic_ns())

    def _srtp_error(self, exc: Exception) -> None:
        msg = str(exc)
        st = self.stats
        if "too old" in msg:
            st.srtp_replay_old += 1
        elif "replay" in msg:
            st.srtp_replay += 1
        elif "authentication" in msg:
            st.srtp_auth += 1
        else:
            st.srtp_other += 1

    def _on_srtcp(self, data: bytes, now: int) -> None:
        try:
            plain = self._rx.unprotect_rtcp(data)
        except pylibsrtp.Error as exc:
            self._srtp_error(exc)
            return
        self._on_rtcp(plain, now)

    def _on_rtcp(self, plain: bytes, now: int) -> None:
        got = self.stats.rtcp_received
        try:
            packets = parse_rtcp(plain)
        except RtpError:
            got["invalid"] = got.get("invalid", 0) + 1
            return
        for p in packets:
            name = type(p).__name__
            got[name] = got.get(name, 0) + 1
            if isinstance(p, SenderReport):
                self._lsr[p.ssrc] = (ntp_middle32(p.ntp_timestamp), now)

    # -- sending RTCP --------------------------------------------------------

    def _send_rtcp(self, packet: bytes) -> bool:
        """SRTCP-protect and send on the nominated pair, synchronously."""
        ok = False
        if self._path is not None:
            try:
                ok = self._path.send_rtcp(packet)
            except (pylibsrtp.Error, OSError, AttributeError):
                ok = False
        if not ok:
            self.stats.rtcp_send_errors += 1
        return ok

    def _schedule_rtcp(self) -> None:
        if self._closed:
            return
        delay = self.rtcp_interval * (0.5 + random.random())
        self._timer = asyncio.get_running_loop().call_later(delay, self._rtcp_tick)
        if self.browser_rtcp and self._audio_timer is None:
            self._schedule_audio_rtcp()

    def _rtcp_tick(self) -> None:
        self._timer = None
        try:
            if self.browser_rtcp:
                self.send_reports("video")
                self._repair_requests(time.monotonic_ns())
            else:
                self.send_reports()
        finally:
            self._schedule_rtcp()

    def _schedule_audio_rtcp(self) -> None:
        if self._closed:
            return
        delay = BROWSER_RTCP.audio_interval * (0.5 + random.random())
        self._audio_timer = asyncio.get_running_loop().call_later(delay, self._audio_rtcp_tick)

    def _audio_rtcp_tick(self) -> None:
        self._audio_timer = None
        try:
            self.send_reports("audio")
        finally:
            self._schedule_audio_rtcp()

    def _remb_value(self, now: int) -> int:
        """browser_rtcp: Chromium's REMB stays near the rate it receives
        (REFERENCES.md) — the video bytes since the last REMB, +5 %."""
        video = self.stats.video
        got = video.bytes if video is not None else 0
        mark, self._remb_mark = self._remb_mark, (got, now)
        if mark is None or now <= mark[1]:
            return self.remb_bps
        return max(50_000, int((got - mark[0]) * 8 * 1.05 * 1e9 / (now - mark[1])))

    def _repair_requests(self, now: int) -> None:
        """browser_rtcp: NACK again what is still missing after
        ``nack_retry``; PLI once a hole outlives ``pli_after``."""
        holes = self._holes
        video = self.stats.video
        if not holes or video is None:
            return
        missing = video.missing
        retry, stale = [], False
        for seq, since in list(holes.items()):
            if seq not in missing:
                del holes[seq]
            elif now - since > BROWSER_RTCP.pli_after * 1e9:
                del holes[seq]
                stale = True
            elif now - since > BROWSER_RTCP.nack_retry * 1e9:
                retry.append(seq)
        if retry and self._send_rtcp(bytes(build_nack(self._rtcp_ssrc, video.ssrc, retry[:64]))):
            self.stats.nack_sent += 1
        if stale and now - self._last_pli_ns > BROWSER_RTCP.pli_after * 1e9:
            self._last_pli_ns = now
            if self._send_rtcp(bytes(build_pli(self._rtcp_ssrc, video.ssrc))):
                self.stats.pli_sent += 1

    def send_reports(self, kind: str | None = None) -> None:
        """One compound RR (+ REMB over the video SSRCs); ``kind``: only
        that track's report blocks (browser_rtcp sends one per track)."""
        now = time.monotonic_ns()
        blocks = []
        video = []
        for s in list(self.stats.ssrcs.values()):
            if s.kind == "rtx" or not s.packets or (kind is not None and s.kind != kind):
                continue
            lsr, dlsr = 0, 0
            got = self._lsr.get(s.ssrc)
            if got is not None:
                lsr = got[0]
                dlsr = min(0xFFFFFFFF, (now - got[1]) * 65536 // 1_000_000_000)
            blocks.append(s.report_block(lsr, dlsr))
            if s.kind == "video":
                video.append(s.ssrc)
        if not blocks:
            return
        packets: list[Any] = [build_rr(self._rtcp_ssrc, blocks[:31])]
        if self.remb_bps and video:
            bps = self._remb_value(now) if self.browser_rtcp else self.remb_bps
            packets.append(build_remb(self._rtcp_ssrc, bps, video))
        if self._send_rtcp(serialize_rtcp(packets)):
            self.stats.rr_sent += 1
            if len(packets) > 1:
                self.stats.remb_sent += 1

    def _on_gap(self, st: SsrcStats, holes: list[int]) -> None:
        if not holes or st.kind == "rtx":
            return
        if self.browser_rtcp and st.kind == "video":
            now = st.last_arrival_ns  # the packet that showed the gap
            for seq in holes:
                self._holes.setdefault(seq, now)
        if self._send_rtcp(bytes(build_nack(self._rtcp_ssrc, st.ssrc, holes[:64]))):
            self.stats.nack_sent += 1

    # -- teardown ------------------------------------------------------------

    async def close(self, timeout: float = 5.0) -> None:
        """DELETE the session resource, close the peer connection. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._audio_timer is not None:
            self._audio_timer.cancel()
            self._audio_timer = None
        st = self.stats
        if st.location and self._session is not None and not self._session.closed:
            try:
                async with self._session.delete(
                    st.location, headers=self._headers(), timeout=aiohttp.ClientTimeout(total=timeout)
                ) as resp:
                    await resp.read()
                    st.delete_status = resp.status
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                st.delete_status = 0
                st.error = st.error or f"DELETE failed: {exc!r}"
        if self._pc is not None:
            try:
                await asyncio.wait_for(self._pc.close(), timeout)
            except (asyncio.TimeoutError, ConnectionError):
                pass
        if self._own_session and self._session is not None:
            await self._session.close()


def percentile(values: Iterable[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    v = sorted(values)
    if not v:
        return None
    k = max(0, min(len(v) - 1, math.ceil(q / 100.0 * len(v)) - 1))
    return v[k]
