"""WHIP ingest (RFC 9725): aiortc for ICE/DTLS/SRTP, our own RTP path.

Three layers, outermost last:

* :func:`plan_offer` / :func:`patch_answer` (sans-I/O SDP). A WHIP offer is
  ``sendonly`` H.264 (packetization-mode 1, RFC 6184 §8.1) and/or Opus
  (RFC 7587), BUNDLEd (RFC 9725 §4.5), optionally simulcast with RIDs
  (RFC 8853 §5.1 ``a=simulcast:send``, RFC 8851 ``a=rid``). aiortc knows
  neither RIDs nor simulcast, so after it writes its answer we add, in the
  video section, ``a=rid:<id> recv`` (RFC 8851 §4.3: the answerer reverses
  the direction), ``a=simulcast:recv <streams>`` (RFC 8853 §5.3) and the
  ``sdes:rtp-stream-id`` / ``sdes:repaired-rtp-stream-id`` header extensions
  (RFC 8852 §3) with the offer's ids (RFC 8285 §6: the answer keeps them).
  Without those Chromium sends only its first encoding.

* :class:`RtpIngest` (sans-I/O, explicit ``now``): SRTP-decrypted RTP bytes
  in, access units and RTCP bytes out. Per SSRC:

  - demultiplexing: payload type tells video / RTX / audio. A video SSRC's
    RID is read from the RID header extension, which senders put only on
    the first packets of an SSRC (RFC 8852 §4; Chromium ≈ 21 packets), so
    SSRC → RID is remembered; an RTX SSRC (RFC 4588) is tied to its media
    SSRC by ``a=ssrc-group:FID``, by the repaired-RID extension, or — one
    video layer only — by elimination;
  - a bounded reorder buffer (``reorder_window`` seconds after the oldest
    held packet, at most ``max_held`` packets): packets leave in sequence
    order; a hole that does not fill in time is declared lost;
  - Generic NACK (RFC 4585 §6.2.1) for each hole, at most ``max_nacks``
    times per packet; retransmissions (plain or RTX, RFC 4588 §4) fill it;
  - :class:`~media.rtp.h264.H264Depacketizer` → access units. An access
    unit with a hole is dropped and the layer waits for its next IDR,
    asking for one with PLI (RFC 4585 §6.3.1) at most every
    ``pli_interval`` seconds; the same when a viewer asks
    (:meth:`RtpIngest.request_keyframe`);
  - receiver reports (RFC 3550 §6.4.2; fraction lost per §A.3, jitter per
    §A.8, LSR/DLSR from the publisher's sender reports) once per
    ``rr_interval``, with a REMB (draft-alvestrand-rmcat-remb-03) when
    ``goog-remb`` was negotiated: a browser trusts a REMB in its first two
    seconds and starts every simulcast layer at once instead of ramping
    its bandwidth estimate up from ≈300 kbit/s. The REMB (``remb_bps``,
    3 Mbit/s) is also what the browser's uplink will carry: measured with
    Chromium 156, a simple picture is topped up with RTX padding to about
    the REMB value (5 Mbit/s → ≈2.6 Mbit/s received, 1.5 Mbit/s → ≈1.5).

  Layer names: RIDs named ``high``/``mid``/``low`` name the layers directly;
  any other RIDs are ranked by the picture size in their SPS, the hub's rule
  for SRT simulcast (``media.stream.layer_names``). One video SSRC without
  simulcast publishes with ``layer=None`` (the hub's ``high``). Timestamps:
  the 32-bit RTP timestamp, unwrapped per SSRC, is pts and dts (browsers send
  no B-frames); clock rate 90000 for video, 48000 for Opus.

* :class:`WhipSession` / :class:`WhipService` (asyncio). A session answers
  the offer with transceivers whose receivers never start aiortc's decoder
  (:class:`~media.webrtc.aiortc_adapter.CapturingReceiver`) and takes the
  decrypted RTP/RTCP from the DTLS transport before aiortc's router sees it
  (:func:`~media.webrtc.aiortc_adapter.capture_rtp`): nothing is decoded.
  Once ICE/DTLS are up it attaches one whole-stream publisher to the hub's
  stream (``SourceInfo("whip")``) and publishes each access unit with its
  layer. ICE/DTLS failure, ``connect_timeout`` without connecting,
  ``media_timeout`` without RTP, or :meth:`WhipSession.close` (HTTP DELETE)
  detach the publisher: the stream enters its reconnect grace period and its
  viewers stay. The service owns the sessions, one 20 ms ticker for every
  session's timers, and :meth:`WhipService.request_keyframe` for viewers'
  PLI/FIR.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.rtcrtpparameters import RTCRtcpFeedback, RTCRtpCodecParameters

from ..errors import BitstreamError, RtpError, UnsupportedMedia
from ..h264 import Sps
from ..rtp.h264 import AccessUnit, H264Depacketizer
from ..rtp.opus import depacketize_opus
from ..rtp.packet import (
    HeaderExtensionUri, SeqUnwrapper, parse_extensions, payload_bounds, peek_header, unwrap_rtx_payload,
)
from ..rtp.rtcp import (
    Bye, Nack, Pli, ReceiverReport, Remb, ReportBlock, SenderReport, ntp_middle32, parse_rtcp, serialize_rtcp,
)
from ..stream import Publisher, SourceInfo, StreamBusy, StreamClosed, StreamHub, layer_names
from . import aiortc_adapter as adapter
from .sdp import CodecChoice, Offer, OfferedCodec, SdpError, choose_h264_ingest, choose_opus

log = logging.getLogger("returnfeed.webrtc")

__all__ = [
    "IngestUnit",
    "WhipPlan",
    "plan_offer",
    "patch_answer",
    "IngestConfig",
    "RtpIngest",
    "WhipSession",
    "WhipService",
]

URI_MID = HeaderExtensionUri.MID.value
URI_RID = HeaderExtensionUri.RID.value
URI_RRID = HeaderExtensionUri.REPAIRED_RID.value

#: RFC 8851 §10: rid-id = 1*(alpha-numeric / "-" / "_"); one-byte header
#: extension elements carry at most 16 bytes (RFC 8285 §4.2).
_RID_RE = re.compile(r"^[A-Za-z0-9_-]{1,16}$")
_STANDARD_LAYERS = frozenset(("high", "mid", "low"))
#: Most simulcast layers accepted in one offer.
MAX_RIDS = 4
_EXT_HDR = struct.Struct("!HH")
#: A sequence number jump larger than this is a sender restart, not loss.
_SEQ_RESET = 3000
#: Packets of a new SSRC held (at most ``reorder_window``) before the first
#: is released, so that an earlier one arriving late still counts.
_START_PACKETS = 8


# --------------------------------------------------------------------------
# What is published
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IngestUnit:
    """One access unit (H.264, Annex-B) or Opus packet for ``Publisher.publish``."""

    codec: str  # 'h264' | 'opus'
    pts: int
    dts: int
    keyframe: bool
    data: bytes
    clock_rate: int
    arrival: float  # monotonic time its last packet was released
    layer: str | None = None  # simulcast layer; None = the only video layer
    sps: bytes | None = None  # SPS NAL unit carried in the access unit, if any


# --------------------------------------------------------------------------
# SDP (sans-I/O)
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WhipPlan:
    """What a WHIP offer asks for and what the answer grants."""

    video: CodecChoice | None
    audio: OfferedCodec | None
    video_mid: str | None
    audio_mid: str | None
    rids: tuple[str, ...] = ()  # simulcast RIDs in a=simulcast order
    simulcast: str = ""  # the stream list echoed in a=simulcast:recv
    rid_ext: int | None = None
    rrid_ext: int | None = None
    fid: tuple[tuple[int, int], ...] = ()  # (rtx ssrc, media ssrc), RFC 5576 §4.3 FID groups
    nack: bool = False
    pli: bool = False
    remb: bool = False

    @property
    def answer_extmaps(self) -> list[tuple[int, str]]:
        """Header extensions to add to the video answer (aiortc omits them)."""
        out = []
        if self.rids and self.rid_ext is not None:
            out.append((self.rid_ext, URI_RID))
            if self.rrid_ext is not None and self.video is not None and self.video.rtx is not None:
                out.append((self.rrid_ext, URI_RRID))
        return out


def _sections(text: str) -> list[list[str]]:
    """Lines of each m= section (the session part is dropped)."""
    out: list[list[str]] = []
    for ln in text.replace("\r\n", "\n").split("\n"):
        if ln.startswith("m="):
            out.append([ln])
        elif out and ln:
            out[-1].append(ln)
    return out


def _parse_simulcast(value: str) -> list[str]:
    """RFC 8853 §5.1 ``a=simulcast`` value → RIDs of the send streams
    (first alternative of each; a paused one keeps its '~')."""
    tokens = value.split()
    if len(tokens) % 2:
        raise SdpError(f"malformed a=simulcast: {value[:60]!r}")
    streams: list[str] = []
    for direction, lst in zip(tokens[0::2], tokens[1::2]):
        if direction not in ("send", "recv"):
            raise SdpError(f"malformed a=simulcast direction {direction[:10]!r}")
        if direction != "send":
            continue
        for stream in lst.split(";"):
            alt = stream.split(",")[0]
            if not _RID_RE.match(alt.removeprefix("~")):
                raise SdpError(f"bad RID {alt[:20]!r} in a=simulcast")
            streams.append(alt)
    return streams


def plan_offer(text: str, offer: Offer) -> WhipPlan:
    """Check a (parsed) WHIP offer and decide the answer. Raises
    :class:`SdpError` for an offer that cannot be ingested passthrough."""
    video = offer.section("video")
    audio = offer.section("audio")
    for section in (video, audio):
        if section is not None and section.direction not in ("sendonly", "sendrecv"):
            raise SdpError(f"the {section.kind} section must be sendonly for WHIP (RFC 9725 §4.2), "
                           f"not {section.direction}")
    video_choice = choose_h264_ingest(video) if video is not None else None
    opus = choose_opus(audio) if audio is not None else None
    sections = _sections(text)
    bundle = [ln for ln in text.replace("\r\n", "\n").split("\n") if ln.startswith("a=group:BUNDLE")]
    mids = {m.mid for m in (video, audio) if m is not None}
    if len(mids) > 1 and not any(mids <= set(ln.split()[1:]) for ln in bundle):
        raise SdpError("audio and video must be BUNDLEd on one transport (RFC 9725 §4.5 max-bundle)")
    rids: tuple[str, ...] = ()
    simulcast = ""
    fid: list[tuple[int, int]] = []
    nack = pli = remb = False
    rid_ext = rrid_ext = None
    if video is not None and video_choice is not None:
        lines = next((s for s in sections if s[0].startswith("m=video")), [])
        for ln in lines:
            if ln.startswith("a=ssrc-group:FID "):
                parts = ln.split()[1:]
                if len(parts) == 2 and all(p.isdigit() for p in parts):
                    fid.append((int(parts[1]) & 0xFFFFFFFF, int(parts[0]) & 0xFFFFFFFF))
        sim_lines = [ln[len("a=simulcast:"):] for ln in lines if ln.startswith("a=simulcast:")]
        if sim_lines:
            streams = _parse_simulcast(sim_lines[0])
            declared = {rid for rid, direction in video.rids if direction == "send"}
            for s in streams:
                if s.removeprefix("~") not in declared:
                    raise SdpError(f"a=simulcast names RID {s.removeprefix('~')!r} without an a=rid send line")
            if len(streams) > MAX_RIDS:
                raise SdpError(f"at most {MAX_RIDS} simulcast layers are accepted, the offer has {len(streams)}")
            names = [s.removeprefix("~") for s in streams]
            if len(set(names)) != len(names):
                raise SdpError("a=simulcast repeats a RID")
            if streams:
                rid_ext = video.extmap.get(URI_RID)
                if rid_ext is None:
                    raise SdpError("simulcast needs the RID header extension "
                                   f"({URI_RID}, RFC 8852) in the offer")
                rrid_ext = video.extmap.get(URI_RRID)
                rids = tuple(names)
                simulcast = ";".join(streams)
        fb = video_choice.codec.rtcp_fb
        nack, pli, remb = "nack" in fb, "nack pli" in fb, "goog-remb" in fb
    return WhipPlan(video=video_choice, audio=opus, video_mid=video.mid if video else None,
                    audio_mid=audio.mid if audio else None, rids=rids, simulcast=simulcast, rid_ext=rid_ext,
                    rrid_ext=rrid_ext, fid=tuple(fid), nack=nack, pli=pli, remb=remb)


def patch_answer(answer: str, plan: WhipPlan) -> str:
    """Add what aiortc's answer lacks for RID simulcast (see module docstring)."""
    if not plan.rids or plan.video_mid is None:
        return answer
    lines = answer.split("\r\n")
    trailing = lines and lines[-1] == ""
    if trailing:
        lines.pop()
    starts = [i for i, ln in enumerate(lines) if ln.startswith("m=")] + [len(lines)]
    for a, b in zip(starts, starts[1:]):
        if lines[a].startswith("m=video") and f"a=mid:{plan.video_mid}" in lines[a:b]:
            section = lines[a:b]
            break
    else:
        raise SdpError("the answer has no video section to carry simulcast")
    have = {ln.split()[1] for ln in section if ln.startswith("a=extmap:") and len(ln.split()) > 1}
    extra = [f"a=extmap:{i} {uri}" for i, uri in plan.answer_extmaps if uri not in have]
    ext_at = max((k for k, ln in enumerate(section) if ln.startswith("a=extmap:")), default=None)
    if ext_at is None:
        ext_at = next((k for k, ln in enumerate(section) if ln.startswith("a=mid:")), 0)
    section[ext_at + 1:ext_at + 1] = extra
    section += [f"a=rid:{rid} recv" for rid in plan.rids]
    section.append(f"a=simulcast:recv {plan.simulcast}")
    lines[a:b] = section
    return "\r\n".join(lines) + ("\r\n" if trailing else "")


# --------------------------------------------------------------------------
# RTP ingest (sans-I/O)
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IngestConfig:
    """Negotiated parameters and tuning of one :class:`RtpIngest`."""

    sender_ssrc: int  # our SSRC in the RTCP we send
    video_pt: int | None = None
    rtx_pt: int | None = None
    audio_pt: int | None = None
    rids: tuple[str, ...] = ()
    rid_ext: int | None = None
    rrid_ext: int | None = None
    fid: tuple[tuple[int, int], ...] = ()
    nack: bool = True
    pli: bool = True
    remb: bool = False
    reorder_window: float = 0.05
    max_held: int = 128
    nack_retry: float = 0.025
    max_nacks: int = 2
    pli_interval: float = 0.5
    rr_interval: float = 1.0
    remb_bps: int = 3_000_000
    max_ssrcs: int = 16
    idle_forget: float = 30.0

    @classmethod
    def from_plan(cls, plan: WhipPlan, sender_ssrc: int, **tuning: Any) -> "IngestConfig":
        v = plan.video
        return cls(sender_ssrc=sender_ssrc, video_pt=v.codec.payload_type if v else None,
                   rtx_pt=v.rtx.payload_type if v and v.rtx else None,
                   audio_pt=plan.audio.payload_type if plan.audio else None, rids=plan.rids,
                   rid_ext=plan.rid_ext, rrid_ext=plan.rrid_ext, fid=plan.fid, nack=plan.nack, pli=plan.pli,
                   remb=plan.remb, **tuning)


@dataclass(slots=True)
class IngestStats:
    packets: int = 0
    bytes: int = 0
    malformed: int = 0
    unknown: int = 0  # packets of an unknown payload type / unidentified SSRC
    late: int = 0  # duplicates and packets behind the reorder buffer
    rtx_redundant: int = 0  # retransmissions of packets already held or released
    lost: int = 0  # packets given up on
    recovered: int = 0  # holes filled by a retransmission
    padding: int = 0
    nacks_sent: int = 0  # NACK packets
    nacked_packets: int = 0  # sequence numbers asked for
    plis_sent: int = 0
    keyframe_requests: int = 0  # asks from viewers
    frames: int = 0
    keyframes: int = 0
    frames_dropped: int = 0  # broken, or before a keyframe
    audio_packets: int = 0
    rtcp_sent: int = 0

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class _TsUnwrapper:
    """32-bit RTP timestamps → a monotonic-ish integer (RFC 3550 §5.1 wrap)."""

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last: int | None = None

    def unwrap(self, ts: int) -> int:
        last = self.last
        if last is None:
            self.last = ts
            return ts
        d = (ts - last) & 0xFFFFFFFF
        out = last + d if d < 0x80000000 else last - (0x100000000 - d)
        if out > last:
            self.last = out
        return out


class _Source:
    """State of one media SSRC (a video layer or the audio)."""

    __slots__ = (
        "ssrc", "kind", "clock_rate", "rid", "unwrap", "ts", "next", "start_at", "max_seen", "held", "missing",
        "depack", "padding", "need_key", "last_pli", "received", "base", "expected_prior", "received_prior",
        "jitter", "transit", "lsr", "lsr_at", "last_at", "area", "frames", "keyframes", "width", "height",
    )

    def __init__(self, ssrc: int, kind: str, now: float) -> None:
        self.ssrc = ssrc
        self.kind = kind
        self.clock_rate = 90000 if kind == "video" else 48000
        self.rid: str | None = None
        self.unwrap = SeqUnwrapper()
        self.ts = _TsUnwrapper()
        self.next: int | None = None  # extended seq the reorder buffer releases next (None: starting)
        self.start_at = now
        self.max_seen = -1
        self.held: dict[int, tuple[int, bool, bytes, float]] = {}
        self.missing: dict[int, list[float]] = {}  # ext seq → [nacks sent, last sent at]
        self.depack = H264Depacketizer() if kind == "video" else None
        self.padding = 0  # empty packets removed before the depacketizer
        self.need_key = True
        self.last_pli = -1e9
        self.received = 0
        self.base: int | None = None
        self.expected_prior = 0
        self.received_prior = 0
        self.jitter = 0.0
        self.transit: int | None = None
        self.lsr = 0
        self.lsr_at = 0.0
        self.last_at = now
        self.area: int | None = None
        self.frames = 0
        self.keyframes = 0
        self.width: int | None = None
        self.height: int | None = None

    def report_block(self, now: float) -> ReportBlock:
        """RFC 3550 §6.4.1 / §A.3 for this SSRC since the last report."""
        highest = self.unwrap.highest or 0
        base = self.base if self.base is not None else highest
        expected = highest - base + 1
        lost = expected - self.received
        exp_int = expected - self.expected_prior
        rec_int = self.received - self.received_prior
        self.expected_prior, self.received_prior = expected, self.received
        lost_int = exp_int - rec_int
        fraction = (lost_int << 8) // exp_int if exp_int > 0 and lost_int > 0 else 0
        dlsr = int((now - self.lsr_at) * 65536) if self.lsr else 0
        return ReportBlock(self.ssrc, min(fraction, 255), lost, highest & 0xFFFFFFFF, int(self.jitter),
                           self.lsr, dlsr & 0xFFFFFFFF)


class RtpIngest:
    """Decrypted RTP of one WHIP peer → access units; RTCP back (sans-I/O).

    ``on_rtp`` / ``tick`` return the units to publish; the RTCP they
    produce waits in :meth:`take_rtcp`.
    """

    def __init__(self, config: IngestConfig) -> None:
        self.config = config
        self.stats = IngestStats()
        self._sources: dict[int, _Source] = {}
        self._rtx: dict[int, _Source | None] = {}  # rtx ssrc → its media source (None: not known yet)
        self._rtx_rid: dict[int, str] = {}  # rtx ssrc → the RID it repairs
        self._fid = dict(config.fid)
        self._rid_source: dict[str, _Source] = {}
        self._names: dict[str, str] = {}  # rid → layer name
        self._direct_names = bool(config.rids) and set(config.rids) <= _STANDARD_LAYERS
        self._simulcast = len(config.rids) > 1
        self._feedback: list[Any] = []
        self._out: list[bytes] = []
        self._next_rr: float | None = None

    # -- packets -----------------------------------------------------------------

    def on_rtp(self, data: bytes, now: float) -> list[IngestUnit]:
        """One decrypted RTP packet; returns what it completed."""
        try:
            marker, pt, seq, ts, ssrc = peek_header(data)
            start, end = payload_bounds(data)
        except RtpError:
            self.stats.malformed += 1
            return []
        stats = self.stats
        stats.packets += 1
        stats.bytes += len(data)
        src = self._sources.get(ssrc)
        if src is None:
            if ssrc in self._rtx:
                return self._on_rtx(ssrc, data, ts, marker, start, end, now)
            src = self._new_source(ssrc, pt, now)
            if src is None:
                if pt == self.config.rtx_pt and self.config.rtx_pt is not None:
                    return self._on_rtx(ssrc, data, ts, marker, start, end, now)
                stats.unknown += 1
                return []
        if src.kind == "video":
            if pt != self.config.video_pt:
                stats.unknown += 1
                return []
            if src.rid is None and self.config.rids:
                self._learn_rid(src, data)
        elif pt != self.config.audio_pt:
            stats.unknown += 1
            return []
        src.last_at = now
        if self._next_rr is None:
            self._next_rr = now + 0.1
        # RFC 3550 §A.8 interarrival jitter, in timestamp units.
        arrival = int(now * src.clock_rate)
        transit = arrival - ts
        if src.transit is not None:
            d = abs(transit - src.transit)
            if d < src.clock_rate * 10:
                src.jitter += (d - src.jitter) / 16.0
        src.transit = transit
        out = self._insert(src, seq, ts, marker, bytes(data[start:end]), now, retransmission=False)
        if self._feedback:
            self._flush_feedback(now)
        return out

    def _new_source(self, ssrc: int, pt: int, now: float) -> _Source | None:
        cfg = self.config
        if pt == cfg.video_pt and cfg.video_pt is not None:
            kind = "video"
        elif pt == cfg.audio_pt and cfg.audio_pt is not None:
            kind = "audio"
        else:
            return None
        if len(self._sources) + len(self._rtx) >= cfg.max_ssrcs:
            self._forget_idle(now, force=True)
            if len(self._sources) + len(self._rtx) >= cfg.max_ssrcs:
                return None
        if kind == "audio":
            for other in [s for s in self._sources.values() if s.kind == "audio"]:
                self._drop_source(other)  # the publisher restarted its audio SSRC
        src = _Source(ssrc, kind, now)
        self._sources[ssrc] = src
        return src

    def _drop_source(self, src: _Source) -> None:
        self._sources.pop(src.ssrc, None)
        if src.rid is not None and self._rid_source.get(src.rid) is src:
            del self._rid_source[src.rid]
        for rtx, media in list(self._rtx.items()):
            if media is src:
                self._rtx[rtx] = None

    def _extensions(self, data: bytes) -> dict[int, bytes]:
        if not data[0] & 0x10:
            return {}
        pos = 12 + 4 * (data[0] & 0x0F)
        try:
            profile, words = _EXT_HDR.unpack_from(data, pos)
            return dict(parse_extensions(profile, data[pos + 4:pos + 4 + 4 * words]))
        except (struct.error, RtpError):
            return {}

    def _rid_value(self, data: bytes, ext_id: int | None) -> str | None:
        if ext_id is None:
            return None
        raw = self._extensions(data).get(ext_id)
        if not raw:
            return None
        try:
            rid = raw.decode("ascii")
        except UnicodeDecodeError:
            return None
        return rid if rid in self.config.rids else None

    def _learn_rid(self, src: _Source, data: bytes) -> None:
        rid = self._rid_value(data, self.config.rid_ext)
        if rid is None:
            # No RID seen (its first packets were lost): if this is the only
            # unidentified video SSRC and one RID has no SSRC, it is that one.
            free = [r for r in self.config.rids if r not in self._rid_source]
            unknown = [s for s in self._sources.values() if s.kind == "video" and s.rid is None]
            if len(free) == 1 and unknown == [src] and src.received >= 32:
                rid = free[0]
            else:
                return
        old = self._rid_source.get(rid)
        if old is not None and old is not src:
            self._drop_source(old)  # the encoder restarted this layer on a new SSRC
        src.rid = rid
        src.need_key = True
        self._rid_source[rid] = src
        for rtx, media in list(self._rtx.items()):
            if media is None and self._fid.get(rtx) == src.ssrc:
                self._rtx[rtx] = src

    def _on_rtx(self, ssrc: int, data: bytes, ts: int, marker: bool, start: int, end: int,
                now: float) -> list[IngestUnit]:
        """RFC 4588 §4: payload = original sequence number + original payload."""
        cfg = self.config
        if data[1] & 0x7F != cfg.rtx_pt:
            self.stats.unknown += 1
            return []
        media = self._rtx.get(ssrc)
        if media is None:
            if ssrc not in self._rtx and len(self._sources) + len(self._rtx) >= cfg.max_ssrcs:
                self.stats.unknown += 1
                return []
            media = self._rtx_media(ssrc, data)
            self._rtx[ssrc] = media
            if media is None:
                self.stats.unknown += 1
                return []
        if end - start < 2:
            self.stats.padding += 1  # RTX padding (bandwidth probing)
            return []
        osn, payload = unwrap_rtx_payload(data[start:end])
        if not payload:
            self.stats.padding += 1
            return []
        media.last_at = now
        out = self._insert(media, osn, ts, marker, payload, now, retransmission=True)
        if self._feedback:
            self._flush_feedback(now)
        return out

    def _rtx_media(self, ssrc: int, data: bytes) -> _Source | None:
        media_ssrc = self._fid.get(ssrc)
        if media_ssrc is not None:
            return self._sources.get(media_ssrc)
        rid = self._rid_value(data, self.config.rrid_ext) or self._rtx_rid.get(ssrc)
        if rid is not None:
            # Remembered: the repaired-RID may come (on probing padding)
            # before the layer's own SSRC is known.
            self._rtx_rid[ssrc] = rid
            return self._rid_source.get(rid)
        video = [s for s in self._sources.values() if s.kind == "video"]
        if not self._simulcast and len(video) == 1:
            return video[0]
        return None

    # -- reorder buffer ---------------------------------------------------------------

    def _insert(self, src: _Source, seq: int, ts: int, marker: bool, payload: bytes, now: float, *,
                retransmission: bool) -> list[IngestUnit]:
        if retransmission and src.base is None:
            self.stats.rtx_redundant += 1  # nothing to repair before the first packet
            return []
        ext = src.unwrap.unwrap(seq)
        if src.base is None:
            src.base = ext
            src.start_at = now
            src.max_seen = ext - 1
        elif ext - src.max_seen > _SEQ_RESET or (src.next if src.next is not None else src.base) - ext > _SEQ_RESET:
            # A jump no reorder buffer explains: the sender restarted its
            # sequence numbers. Start over from this packet; the
            # depacketizer sees a hole, so the layer restarts at an IDR.
            out = self._release(src, now, flush=True)
            src.unwrap = SeqUnwrapper()
            src.next = src.base = None
            src.missing.clear()
            src.received = src.expected_prior = src.received_prior = 0
            return out + self._insert(src, seq, ts, marker, payload, now, retransmission=retransmission)
        if (src.next is not None and ext < src.next) or ext in src.held:
            if retransmission:
                self.stats.rtx_redundant += 1  # e.g. RTX payload padding (bandwidth probing)
            else:
                self.stats.late += 1
            return []
        if src.next is None and ext < src.base:
            src.base = ext  # reordered before the start was settled
        if retransmission:
            if src.missing.pop(ext, None) is not None:
                self.stats.recovered += 1
        else:
            src.received += 1
            src.missing.pop(ext, None)
        if ext > src.max_seen + 1 and src.kind == "video" and self.config.nack:
            first = max(src.max_seen + 1, src.next if src.next is not None else src.base)
            if ext - first <= self.config.max_held:
                for s in range(first, ext):
                    src.missing[s] = [0, -1e9]
                self._feedback.append(src)
        if ext > src.max_seen:
            src.max_seen = ext
        src.held[ext] = (ts, marker, payload, now)
        return self._release(src, now)

    def _release(self, src: _Source, now: float, flush: bool = False) -> list[IngestUnit]:
        """Hand held packets to the depacketizer in sequence order; skip a
        hole once the oldest held packet waited ``reorder_window`` (or the
        buffer is full). The first packets of an SSRC are held as long (or
        until ``_START_PACKETS`` are in) so that one arriving out of order
        is not lost."""
        out: list[IngestUnit] = []
        held = src.held
        if not held:
            return out
        cfg = self.config
        nxt = src.next
        if nxt is None:
            if not flush and len(held) < _START_PACKETS and now - src.start_at < cfg.reorder_window:
                return out
            nxt = min(held)
        while held:
            item = held.pop(nxt, None)
            if item is None:
                oldest = min(v[3] for v in held.values())
                if not flush and len(held) <= cfg.max_held and now - oldest < cfg.reorder_window:
                    break
                first = min(held)
                self.stats.lost += first - nxt
                for s in [s for s in src.missing if s < first]:
                    del src.missing[s]
                nxt = first
                continue
            self._deliver(src, nxt, item, now, out)
            nxt += 1
        src.next = nxt
        return out

    # -- depacketizing ---------------------------------------------------------------

    def _deliver(self, src: _Source, ext: int, item: tuple[int, bool, bytes, float], now: float,
                 out: list[IngestUnit]) -> None:
        ts, marker, payload, _arrival = item
        if not payload:
            src.padding += 1  # padding-only packet (RFC 3550 §5.1 P bit): not a hole
            self.stats.padding += 1
            return
        if src.depack is None:
            try:
                opus = depacketize_opus(payload)
            except RtpError:
                self.stats.malformed += 1
                return
            pts = src.ts.unwrap(ts)
            self.stats.audio_packets += 1
            out.append(IngestUnit("opus", pts, pts, True, opus, 48000, now))
            return
        try:
            aus = src.depack.push((ext - src.padding) & 0xFFFF, ts, marker, payload)
        except (RtpError, UnsupportedMedia):
            self.stats.malformed += 1
            src.need_key = True
            self._request_pli(src, now)
            return
        for au in aus:
            self._access_unit(src, au, now, out)

    def _access_unit(self, src: _Source, au: AccessUnit, now: float, out: list[IngestUnit]) -> None:
        stats = self.stats
        pts = src.ts.unwrap(au.timestamp)
        if au.lost or not au.nals:
            stats.frames_dropped += 1
            src.need_key = True
            self._request_pli(src, now)
            return
        if src.need_key and not au.keyframe:
            stats.frames_dropped += 1
            self._request_pli(src, now)
            return
        sps = None
        if au.keyframe:
            sps = next((n for n in au.nals if n[0] & 0x1F == 7), None)
            if sps is not None:
                self._saw_sps(src, sps)
        layer = self._layer(src)
        if layer is False:
            stats.frames_dropped += 1  # simulcast layer not identified yet
            if src.rid is not None:
                self._request_pli(src, now)
            return
        src.need_key = False
        src.frames += 1
        stats.frames += 1
        if au.keyframe:
            src.keyframes += 1
            stats.keyframes += 1
        out.append(IngestUnit("h264", pts, pts, au.keyframe, au.annexb(), 90000, now,
                              layer if isinstance(layer, str) else None, sps))

    def _saw_sps(self, src: _Source, sps: bytes) -> None:
        try:
            parsed = Sps.parse(sps)
        except BitstreamError:
            return
        src.width, src.height = parsed.width, parsed.height
        area = parsed.width * parsed.height
        if area != src.area:
            src.area = area
            if self._simulcast and not self._direct_names:
                self._rank()

    def _rank(self) -> None:
        """RIDs with a known picture size ranked by it (ties: offer order)."""
        rids = self.config.rids
        known = [r for r in rids if r in self._rid_source and self._rid_source[r].area is not None]
        known.sort(key=lambda r: (-(self._rid_source[r].area or 0), rids.index(r)))
        names = dict(zip(known, layer_names(len(known))))
        for rid, name in names.items():
            if self._names.get(rid) not in (None, name):
                src = self._rid_source[rid]
                src.need_key = True  # its frames now go to another layer: start it at an IDR
        self._names = names

    def _layer(self, src: _Source) -> str | None | bool:
        """Layer name; None = the single layer; False = not identified yet."""
        if not self._simulcast:
            return None
        if src.rid is None:
            return False
        if self._direct_names:
            return src.rid
        return self._names.get(src.rid, False)

    def layer_of_ssrc(self, ssrc: int) -> str | None:
        src = self._sources.get(ssrc)
        if src is None:
            return None
        name = self._layer(src)
        return name if isinstance(name, str) else ("high" if name is None and src.kind == "video" else None)

    # -- RTCP --------------------------------------------------------------------------

    def _request_pli(self, src: _Source, now: float) -> None:
        if not self.config.pli or src.kind != "video":
            return
        if now - src.last_pli < self.config.pli_interval:
            return
        src.last_pli = now
        self.stats.plis_sent += 1
        self._out.append(serialize_rtcp((ReceiverReport(self.config.sender_ssrc),
                                         Pli(self.config.sender_ssrc, src.ssrc))))

    def request_keyframe(self, now: float) -> int:
        """A viewer lost its picture: PLI every video layer that is sending
        (rate-limited per layer). Returns how many PLIs were queued."""
        self.stats.keyframe_requests += 1
        before = self.stats.plis_sent
        for src in self._sources.values():
            if src.kind == "video" and now - src.last_at < 2.0:
                self._request_pli(src, now)
        return self.stats.plis_sent - before

    def _flush_feedback(self, now: float) -> None:
        """Generic NACKs (RFC 4585 §6.2.1) for the due holes of the sources in
        ``_feedback``: each hole at most ``max_nacks`` times, ``nack_retry``
        apart; holes given up on are forgotten."""
        cfg = self.config
        pending, self._feedback = self._feedback, []
        packets: list[Any] = []
        for src in dict.fromkeys(pending):
            seqs = []
            for s, state in list(src.missing.items()):
                if (src.next is not None and s < src.next) or (state[0] >= cfg.max_nacks and now - state[1] > 1.0):
                    del src.missing[s]
                elif state[0] < cfg.max_nacks and now - state[1] >= cfg.nack_retry:
                    state[0] += 1
                    state[1] = now
                    seqs.append(s)
            self.stats.nacked_packets += len(seqs)
            for i in range(0, len(seqs), 64):
                packets.append(Nack(cfg.sender_ssrc, src.ssrc, tuple(s & 0xFFFF for s in seqs[i:i + 64])))
        if packets:
            # RFC 4585 §3.1: feedback travels in a compound packet led by an RR.
            self.stats.nacks_sent += len(packets)
            self._out.append(serialize_rtcp([ReceiverReport(cfg.sender_ssrc), *packets]))

    def on_rtcp(self, data: bytes, now: float) -> None:
        """RTCP from the publisher: sender reports give LSR for our reports."""
        try:
            packets = parse_rtcp(data)
        except RtpError:
            self.stats.malformed += 1
            return
        for p in packets:
            if isinstance(p, SenderReport):
                src = self._sources.get(p.ssrc)
                if src is not None:
                    src.lsr = ntp_middle32(p.ntp_timestamp)
                    src.lsr_at = now
            elif isinstance(p, Bye):
                log.debug("whip.rtcp_bye", extra={"fields": {"ssrcs": list(p.ssrcs)}})

    def tick(self, now: float) -> list[IngestUnit]:
        """Timers: give up on old holes, repeat NACKs, receiver reports +
        REMB. Call every 10–20 ms. (A layer waiting for a keyframe asks again
        with each frame it drops, rate-limited.)"""
        out: list[IngestUnit] = []
        for src in list(self._sources.values()):
            if src.held:
                out += self._release(src, now)
            if src.missing:
                self._feedback.append(src)
        if self._feedback:
            self._flush_feedback(now)
        if self._next_rr is not None and now >= self._next_rr:
            self._next_rr = now + self.config.rr_interval
            self._report(now)
        self._forget_idle(now)
        return out

    def _report(self, now: float) -> None:
        cfg = self.config
        active = [s for s in self._sources.values() if now - s.last_at < 5.0 and s.received > 0]
        blocks = tuple(s.report_block(now) for s in active[:31])
        packets: list[Any] = [ReceiverReport(cfg.sender_ssrc, blocks)]
        video = [s.ssrc for s in active if s.kind == "video"]
        if cfg.remb and video:
            packets.append(Remb(cfg.sender_ssrc, cfg.remb_bps, tuple(video)))
        self._out.append(serialize_rtcp(packets))

    def _forget_idle(self, now: float, force: bool = False) -> None:
        limit = 2.0 if force else self.config.idle_forget
        for src in [s for s in self._sources.values() if now - s.last_at > limit]:
            self._drop_source(src)
        if force:
            for rtx in [r for r, m in self._rtx.items() if m is None]:
                del self._rtx[rtx]
                self._rtx_rid.pop(rtx, None)

    @property
    def pending_rtcp(self) -> bool:
        return bool(self._out)

    def take_rtcp(self) -> list[bytes]:
        """Compound RTCP packets to send to the publisher, oldest first."""
        out, self._out = self._out, []
        self.stats.rtcp_sent += len(out)
        return out

    # -- observation --------------------------------------------------------------------

    def layers(self) -> list[dict[str, Any]]:
        out = []
        for src in self._sources.values():
            block_highest = src.unwrap.highest or 0
            expected = block_highest - (src.base if src.base is not None else block_highest) + 1
            out.append({
                "ssrc": src.ssrc, "kind": src.kind, "rid": src.rid, "layer": self.layer_of_ssrc(src.ssrc),
                "width": src.width, "height": src.height, "packets": src.received,
                "lost": max(0, expected - src.received), "jitter_ms": round(src.jitter * 1000 / src.clock_rate, 2),
                "frames": src.frames, "keyframes": src.keyframes, "waiting_for_keyframe": src.need_key
                if src.kind == "video" else False,
            })
        return out


# --------------------------------------------------------------------------
# Sessions (asyncio)
# --------------------------------------------------------------------------


@dataclass(slots=True)
class SessionInfo:
    id: str
    stream: str
    state: str
    attached: bool
    created: float
    remote: str
    stats: dict[str, int] = field(default_factory=dict)
    layers: list[dict[str, Any]] = field(default_factory=list)


class WhipSession:
    """One WHIP publisher."""

    def __init__(self, service: "WhipService", stream_name: str, *, owner: str, remote: str = "",
                 label: str = "") -> None:
        self.id = secrets.token_urlsafe(12)
        self.etag = '"' + secrets.token_hex(8) + '"'
        self.service = service
        self.stream_name = stream_name
        self.owner = owner
        self.remote = remote
        self.label = label
        self.created = time.monotonic()
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[RTCIceServer(**s) for s in service.ice_servers]))
        self.plan: WhipPlan | None = None
        self.ingest: RtpIngest | None = None
        self.publisher: Publisher | None = None
        self.sdp_answer = ""
        self.closed = False
        self.close_reason = ""
        self.connected_at: float | None = None
        self.last_rtp: float | None = None
        self._dtls: Any = None
        self.dtls_role = ""
        self._closing: asyncio.Task | None = None

    # -- negotiation -------------------------------------------------------------

    async def answer(self, offer_sdp: str, offer: Offer) -> str:
        """Return the SDP answer; raises SdpError for what cannot be ingested."""
        plan = plan_offer(offer_sdp, offer)
        self.plan = plan
        transceivers = {}
        for section in offer.media:
            if section.kind in ("audio", "video"):
                tr = self.pc.addTransceiver(section.kind, direction="recvonly")
                adapter.install_receiver(tr, adapter.CapturingReceiver(section.kind, tr.receiver.transport))
                transceivers[section.kind] = tr
        self.pc.on("connectionstatechange", self._on_state)
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(offer_sdp, "offer"))
        except Exception as exc:  # aiortc raises assorted errors on SDP it dislikes
            raise SdpError(f"offer rejected by the WebRTC stack: {exc}") from None
        self.dtls_role = adapter.choose_dtls_role(self.pc)
        for kind, tr in transceivers.items():
            if kind == "video" and plan.video is not None:
                c = plan.video.codec
                fb = [RTCRtcpFeedback(type="nack")] if plan.nack else []
                fb += [RTCRtcpFeedback(type="nack", parameter="pli")] if plan.pli else []
                fb += [RTCRtcpFeedback(type="goog-remb")] if plan.remb else []
                codecs = [RTCRtpCodecParameters(
                    mimeType="video/H264", clockRate=90000, payloadType=c.payload_type, rtcpFeedback=fb,
                    parameters={"level-asymmetry-allowed": "1", "packetization-mode": "1",
                                "profile-level-id": plan.video.answer_profile_level_id})]
                if plan.video.rtx is not None:
                    codecs.append(RTCRtpCodecParameters(mimeType="video/rtx", clockRate=90000,
                                                        payloadType=plan.video.rtx.payload_type,
                                                        parameters={"apt": c.payload_type}))
                adapter.set_negotiated_codecs(tr, codecs)
            elif kind == "audio" and plan.audio is not None:
                params = {k: v for k, v in plan.audio.fmtp.items() if k in ("minptime", "useinbandfec", "stereo")}
                adapter.set_negotiated_codecs(tr, [RTCRtpCodecParameters(
                    mimeType="audio/opus", clockRate=48000, channels=2, payloadType=plan.audio.payload_type,
                    parameters=params)])
        main = transceivers.get("video") or transceivers["audio"]
        self.ingest = RtpIngest(IngestConfig.from_plan(plan, adapter.sender_ssrc(main), **self.service.tuning))
        self._dtls = main.receiver.transport
        for dtls in {id(tr.receiver.transport): tr.receiver.transport for tr in transceivers.values()}.values():
            adapter.capture_rtp(dtls, self._on_rtp, self._on_rtcp)
        answer = await self.pc.createAnswer()
        await self.pc.setLocalDescription(answer)
        return patch_answer(self.pc.localDescription.sdp, plan)

    async def add_remote_candidates(self, frag: str) -> None:
        """Trickle ICE (RFC 8840 sdpfrag) from a PATCH."""
        await adapter.add_trickle_candidates(self.pc, frag)

    # -- connection ------------------------------------------------------------------

    def _on_state(self) -> None:
        state = self.pc.connectionState
        if state == "connected" and self.connected_at is None:
            self.connected_at = time.monotonic()
            self._attach()
        elif state in ("failed", "closed") and not self.closed:
            self.close_soon(f"ice/dtls {state}")

    def _attach(self) -> None:
        if self.publisher is not None or self.closed or self._closing is not None:
            return
        remote = adapter.nominated_remote(self._dtls) or self.remote
        if remote:
            self.remote = remote
        try:
            self.publisher = self.service.attach(self)
        except (StreamBusy, StreamClosed) as exc:
            self.close_soon(f"refused: {exc}")
            return
        log.info("whip.publishing", extra={"fields": {
            "session": self.id, "stream": self.stream_name, "remote": self.remote, "who": self.label,
            "rids": list(self.plan.rids) if self.plan else [], "dtls_role": self.dtls_role,
            "connect_ms": round(((self.connected_at or self.created) - self.created) * 1000.0, 1)}})

    def _on_rtp(self, data: bytes) -> None:
        if self.closed or self.ingest is None:
            return
        now = time.monotonic()
        self.last_rtp = now
        if self.publisher is None:
            self._attach()
            if self.publisher is None:
                return
        units = self.ingest.on_rtp(data, now)
        if units:
            self._publish(units)
        if self.ingest.pending_rtcp:
            self._send_rtcp()

    def _on_rtcp(self, data: bytes) -> None:
        if self.ingest is not None and not self.closed:
            self.ingest.on_rtcp(data, time.monotonic())

    def _publish(self, units: list[IngestUnit]) -> None:
        pub = self.publisher
        if pub is None:
            return
        if not pub.active:
            self.close_soon("taken over by another publisher")
            return
        try:
            for u in units:
                pub.publish(u, layer=u.layer)
        except StreamClosed:
            self.close_soon("stream closed")

    def _send_rtcp(self) -> None:
        if self.ingest is None:
            return
        for packet in self.ingest.take_rtcp():
            try:
                adapter.send_rtcp(self._dtls, packet)
            except (ConnectionError, OSError):
                return

    def tick(self, now: float) -> None:
        if self.closed:
            return
        svc = self.service
        if self.connected_at is None:
            if now - self.created > svc.connect_timeout:
                self.close_soon("ICE/DTLS did not connect in time")
            return
        last = self.last_rtp if self.last_rtp is not None else self.connected_at
        if now - last > svc.media_timeout:
            self.close_soon(f"no media for {svc.media_timeout:g} s")
            return
        if self.ingest is None:
            return
        units = self.ingest.tick(now)
        if units:
            self._publish(units)
        self._send_rtcp()

    def request_keyframe(self) -> int:
        """PLIs sent (0 when the offer did not accept ``nack pli``, or rate-limited)."""
        if self.ingest is not None and self.publisher is not None and not self.closed:
            sent = self.ingest.request_keyframe(time.monotonic())
            if sent:
                self._send_rtcp()
            return sent
        return 0

    # -- lifecycle ------------------------------------------------------------------------

    def close_soon(self, reason: str = "") -> None:
        if self._closing is None and not self.closed:
            self._closing = asyncio.get_running_loop().create_task(self.close(reason))

    async def close(self, reason: str = "deleted") -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        pub, self.publisher = self.publisher, None
        if pub is not None:
            pub.stream.detach_publisher(pub, time.monotonic())
        self.service._forget(self)
        log.info("whip.closed", extra={"fields": {
            "session": self.id, "stream": self.stream_name, "reason": reason,
            "stats": self.ingest.stats.as_dict() if self.ingest else {}}})
        try:
            await asyncio.wait_for(self.pc.close(), timeout=5)
        except (asyncio.TimeoutError, Exception):
            log.warning("whip.close_timeout", extra={"fields": {"session": self.id}})

    @property
    def attached(self) -> bool:
        return self.publisher is not None and self.publisher.active

    def info(self) -> SessionInfo:
        return SessionInfo(self.id, self.stream_name, self.pc.connectionState, self.attached, self.created,
                           self.remote, self.ingest.stats.as_dict() if self.ingest else {},
                           self.ingest.layers() if self.ingest else [])


class WhipService:
    """All WHIP sessions of this process."""

    def __init__(self, hub: StreamHub, *, ice_servers: list[dict[str, Any]] | None = None, takeover: bool = False,
                 max_sessions: int = 64, connect_timeout: float = 15.0, media_timeout: float = 8.0,
                 **tuning: Any) -> None:
        adapter.ensure_h264_profiles()
        self.hub = hub
        self.ice_servers = ice_servers or []
        self.takeover = takeover
        self.max_sessions = max_sessions
        self.connect_timeout = connect_timeout
        self.media_timeout = media_timeout
        self.tuning = tuning
        IngestConfig(sender_ssrc=0, **tuning)  # reject unknown tuning keys now, not per session
        self.sessions: dict[str, WhipSession] = {}
        self.totals = IngestStats()
        self.sessions_total = 0
        self._ticker: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None

    def start(self) -> None:
        if self._ticker is None:
            self._wake = asyncio.Event()
            self._ticker = asyncio.get_running_loop().create_task(self._tick_loop(), name="whip-ticker")

    async def _tick_loop(self) -> None:
        assert self._wake is not None
        while True:
            if not self.sessions:
                self._wake.clear()
                await self._wake.wait()
            await asyncio.sleep(0.02)
            now = time.monotonic()
            for session in list(self.sessions.values()):
                try:
                    session.tick(now)
                except Exception:  # one broken session must not stop the others' timers
                    log.exception("whip.tick_failed", extra={"fields": {"session": session.id}})

    def for_stream(self, name: str) -> list[WhipSession]:
        return [s for s in self.sessions.values() if s.stream_name == name and not s.closed]

    def check_free(self, name: str) -> None:
        """Raise StreamBusy when ``name`` is published (and takeover is off)."""
        if self.takeover:
            return
        stream = self.hub.get(name)
        if stream is not None and any(p.active for p in stream.publishers):
            held = ", ".join(sorted({p.info.protocol for p in stream.publishers}))
            raise StreamBusy(f"stream {name!r} is already being published ({held})")
        if self.for_stream(name):
            raise StreamBusy(f"stream {name!r} is already being published (WHIP)")

    async def create_session(self, name: str, offer_sdp: str, offer: Offer, *, owner: str, remote: str = "",
                             label: str = "") -> WhipSession:
        """Raises StreamBusy (409), SdpError/UnsupportedMedia (422), OverflowError (503).

        A session of ``name`` that has not connected yet does not hold the
        stream: a publisher with valid rights replaces it (one that never
        connects would otherwise lock the stream for ``connect_timeout``)."""
        stale = [s for s in self.for_stream(name) if s.connected_at is None]
        for s in stale:
            await s.close("replaced before it connected")
        self.check_free(name)
        if len(self.sessions) >= self.max_sessions:
            raise OverflowError("WHIP session limit reached")
        session = WhipSession(self, name, owner=owner, remote=remote, label=label)
        self.sessions[session.id] = session  # before any await: a concurrent POST sees it
        self.sessions_total += 1
        if self._wake is not None:
            self._wake.set()
        try:
            session.sdp_answer = await session.answer(offer_sdp, offer)
        except BaseException:
            await session.close("offer refused")
            raise
        return session

    def attach(self, session: WhipSession) -> Publisher:
        """Attach ``session`` as the stream's publisher (called once connected)."""
        stream = self.hub.get_or_create(session.stream_name)
        pub = stream.attach_publisher(SourceInfo("whip", remote=session.remote, description=session.label),
                                      layer=None, takeover=self.takeover, now=time.monotonic())
        for other in self.for_stream(session.stream_name):
            if other is not session:
                other.close_soon("taken over by another publisher")
        return pub

    def _forget(self, session: WhipSession) -> None:
        if self.sessions.pop(session.id, None) is not None and session.ingest is not None:
            t = self.totals
            for k, v in session.ingest.stats.as_dict().items():
                setattr(t, k, getattr(t, k) + v)

    def publishing(self, name: str) -> WhipSession | None:
        """The session whose publisher is attached to stream ``name``."""
        return next((s for s in self.for_stream(name) if s.attached), None)

    def request_keyframe(self, name: str) -> int:
        """A viewer of ``name`` sent PLI/FIR or joined: ask the publisher
        (rate-limited per layer); returns the PLIs really sent."""
        return sum(s.request_keyframe() for s in self.for_stream(name))

    def counters(self) -> IngestStats:
        """Totals over closed and live sessions (monotonic)."""
        out = IngestStats(**self.totals.as_dict())
        for s in list(self.sessions.values()):
            if s.ingest is not None:
                for k, v in s.ingest.stats.as_dict().items():
                    setattr(out, k, getattr(out, k) + v)
        return out

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            try:
                await self._ticker
            except asyncio.CancelledError:
                pass
            self._ticker = None
        await asyncio.gather(*(s.close("server shutdown") for s in list(self.sessions.values())),
                             return_exceptions=True)
