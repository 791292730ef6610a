"""WHIP RTP ingest core (sans-I/O, explicit ``now``).

:class:`RtpIngest`: SRTP-decrypted RTP bytes in, :class:`RtpUnit` (one
access unit or Opus packet each) and RTCP bytes out. Per SSRC:

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
for SRT simulcast (``media.layer.layer_names``). One video SSRC without
simulcast publishes with ``layer=None`` (the hub's ``high``). Timestamps:
the 32-bit RTP timestamp, unwrapped per SSRC, is pts and dts (browsers send
no B-frames); clock rate 90000 for video, 48000 for Opus.

Nothing here awaits, reads a clock or touches a socket (a unit test checks
that no asyncio is imported): :mod:`media.webrtc.whip.session` moves the
bytes and calls :meth:`RtpIngest.tick`.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from typing import Any

from ...log import event
from ...errors import BitstreamError, RtpError, UnsupportedMedia
from ...h264 import Sps
from ...rtp.h264 import H264Depacketizer, NalUnits
from ...rtp.opus import depacketize_opus
from ...rtp.packet import SeqUnwrapper, parse_extensions, payload_bounds, peek_header, unwrap_rtx_payload
from ...rtp.rtcp import (
    Bye, Nack, Pli, ReceiverReport, Remb, ReportBlock, SenderReport, ntp_middle32, parse_rtcp, serialize_rtcp,
)
from ...layer import layer_names
from .plan import WhipPlan

log = logging.getLogger("returnfeed.webrtc")

__all__ = ["RtpUnit", "IngestConfig", "IngestStats", "RtpIngest"]

_STANDARD_LAYERS = frozenset(("high", "mid", "low"))
_EXT_HDR = struct.Struct("!HH")
#: A sequence number jump larger than this is a sender restart, not loss.
_SEQ_RESET = 3000
#: Packets of a new SSRC held (at most ``reorder_window``) before the first
#: is released, so that an earlier one arriving late still counts.
_START_PACKETS = 8


@dataclass(frozen=True, slots=True)
class RtpUnit:
    """One access unit (H.264, Annex-B) or Opus packet: the WHIP ingest's
    :class:`media.unit.Unit`, for ``Publisher.publish``."""

    codec: str  # 'h264' | 'opus'
    pts: int
    dts: int
    keyframe: bool
    data: bytes
    clock_rate: int
    arrival: float  # monotonic time its last packet was released
    layer: str | None = None  # simulcast layer; None = the only video layer
    sps: bytes | None = None  # SPS NAL unit carried in the access unit, if any


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
    gaps: int = 0  # sequence numbers missing when a later one arrived (some repaired later)
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

    def source_counters(self) -> dict[str, int]:
        """Running totals for the stream detectors (live_qc/stream.py):
        packets received, sequence numbers missing on arrival, and those
        given up on (RTCP-style names beside the SRT ones)."""
        st = self.stats
        return {"rtpRecv": st.packets, "rtpGaps": st.gaps, "rtpLost": st.lost}

    def on_rtp(self, data: bytes, now: float) -> list[RtpUnit]:
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
                now: float) -> list[RtpUnit]:
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
                retransmission: bool) -> list[RtpUnit]:
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
        if ext > src.max_seen + 1:
            self.stats.gaps += ext - src.max_seen - 1
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

    def _release(self, src: _Source, now: float, flush: bool = False) -> list[RtpUnit]:
        """Hand held packets to the depacketizer in sequence order; skip a
        hole once the oldest held packet waited ``reorder_window`` (or the
        buffer is full). The first packets of an SSRC are held as long (or
        until ``_START_PACKETS`` are in) so that one arriving out of order
        is not lost."""
        out: list[RtpUnit] = []
        held = src.held
        if not held:
            return out
        cfg = self.config
        nxt = src.next
        if nxt is None:
            if not flush and len(held) < _START_PACKETS and now < src.start_at + cfg.reorder_window:
                return out
            nxt = min(held)
        while held:
            item = held.pop(nxt, None)
            if item is None:
                oldest = min(v[3] for v in held.values())
                if not flush and len(held) <= cfg.max_held and now < oldest + cfg.reorder_window:
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
                 out: list[RtpUnit]) -> None:
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
            out.append(RtpUnit("opus", pts, pts, True, opus, 48000, now))
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

    def _access_unit(self, src: _Source, au: NalUnits, now: float, out: list[RtpUnit]) -> None:
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
        out.append(RtpUnit("h264", pts, pts, au.keyframe, au.annexb(), 90000, now,
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
                # Deadlines compared as get_timer() computes them (sum, not
                # difference: a timer due at ``sent + retry`` must find it due).
                if (src.next is not None and s < src.next) or (state[0] >= cfg.max_nacks and now >= state[1] + 1.0):
                    del src.missing[s]
                elif state[0] < cfg.max_nacks and now >= state[1] + cfg.nack_retry:
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
                event(log, logging.DEBUG, "whip.rtcp_bye", ssrcs=list(p.ssrcs))

    def get_timer(self) -> float | None:
        """When :meth:`tick` has something to do: a reorder hole to give up
        on, a NACK to repeat or forget, a receiver report, an idle source to
        forget (the earliest; None when nothing is pending)."""
        cfg = self.config
        at = self._next_rr
        for src in self._sources.values():
            t = src.last_at + cfg.idle_forget
            held = src.held
            if held:
                if src.next is None:
                    t = min(t, src.start_at + cfg.reorder_window)
                else:
                    t = min(t, min(v[3] for v in held.values()) + cfg.reorder_window)
            for count, sent in src.missing.values():
                t = min(t, sent + (cfg.nack_retry if count < cfg.max_nacks else 1.0))
            if at is None or t < at:
                at = t
        return at

    def tick(self, now: float) -> list[RtpUnit]:
        """Timers (due at :meth:`get_timer`): give up on old holes, repeat
        NACKs, receiver reports + REMB, forget idle sources. (A layer waiting
        for a keyframe asks again with each frame it drops, rate-limited.)"""
        out: list[RtpUnit] = []
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
        for src in [s for s in self._sources.values() if now >= s.last_at + limit]:
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
