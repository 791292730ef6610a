"""H.264 RTP payload format (RFC 6184), packetization-mode 1 (non-interleaved).

:class:`H264Packetizer` turns an Annex-B access unit (ITU-T H.264 Annex B)
into RTP payloads, once per layer:

* single NAL unit packets (RFC 6184 §5.6) for NAL units that fit,
* STAP-A (§5.7.1) aggregating consecutive small NAL units (SPS + PPS + SEI
  + small slices),
* FU-A (§5.8) fragments of equal size for NAL units larger than the MTU
  payload size.

It drops access unit delimiters (type 9) and filler data (type 12) — both
are optional in an access unit and have no effect on decoding (H.264
§7.4.1.2.3, §7.4.2.7), so sending them only costs bandwidth — and puts the
cached SPS/PPS in front of an IDR access unit that lacks them, so every
keyframe a viewer joins on is decodable. The marker bit is set on the last
packet of the access unit (§5.1).

:class:`H264Depacketizer` reassembles RTP payloads back into access units
(for WHIP ingest taps and tests): STAP-A and FU-A, loss gaps (the access unit
is flagged ``lost`` and a broken FU-A is discarded), IDR detection.

Malformed payloads raise :class:`media.errors.RtpError`; payload structures
that packetization-mode 1 does not allow (STAP-B, MTAP, FU-B) raise
:class:`media.errors.UnsupportedMedia`.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Iterable, Sequence

from media.errors import RtpError, UnsupportedMedia
from media.h264 import nal_ranges
from media.rtp.packet import LayerPacket

__all__ = [
    "DEFAULT_MAX_PAYLOAD",
    "NalType",
    "split_annexb",
    "H264Packetizer",
    "NalUnits",
    "H264Depacketizer",
]

#: Default largest RTP payload, bytes (leaves room for RTP header, header
#: extensions, SRTP tag, UDP/IP and TURN headers under a 1500-byte MTU).
DEFAULT_MAX_PAYLOAD = 1200

_U16 = struct.Struct("!H")


class NalType(enum.IntEnum):
    """NAL unit types: H.264 Table 7-1, and RFC 6184 Table 1 (24–29)."""

    SLICE = 1
    IDR = 5
    SEI = 6
    SPS = 7
    PPS = 8
    AUD = 9
    FILLER = 12
    STAP_A = 24
    STAP_B = 25
    MTAP16 = 26
    MTAP24 = 27
    FU_A = 28
    FU_B = 29


_STRIP = frozenset((NalType.AUD, NalType.FILLER))
_INTERLEAVED_ONLY = frozenset(
    (NalType.STAP_B, NalType.MTAP16, NalType.MTAP24, NalType.FU_B)
)


def split_annexb(data: bytes) -> list[bytes]:
    """Split an Annex-B access unit into NAL units (without start codes).

    Splitting is :func:`media.h264.nal_ranges` (B.1.1); on top of it, bytes
    other than zeros before the first start code are not a NAL unit and
    raise :class:`RtpError` rather than being silently lost.
    """
    ranges = nal_ranges(data)
    first = ranges[0][0] - 3 if ranges else len(data)
    if data[:max(first, 0)].strip(b"\x00"):
        raise RtpError("bytes before the first Annex-B start code" if ranges
                       else "no Annex-B start code in access unit")
    return [data[s:e] for s, e in ranges]


class H264Packetizer:
    """Packetize access units for one layer (RFC 6184, packetization-mode 1).

    ``max_payload`` is the largest RTP payload in bytes (≥ 64). The layer
    sequence number starts at ``initial_seq`` and wraps at 16 bits; the first
    packet produced is flagged ``discontinuity`` so that every viewer rebases.
    """

    __slots__ = ("max_payload", "_seq", "_sps", "_pps", "_next_discontinuity")

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD, initial_seq: int = 0) -> None:
        if max_payload < 64:
            raise ValueError("max_payload must be at least 64 bytes")
        self.max_payload = max_payload
        self._seq = initial_seq & 0xFFFF
        self._sps: list[bytes] = []
        self._pps: list[bytes] = []
        self._next_discontinuity = True

    @property
    def next_seq(self) -> int:
        return self._seq

    def restart(self) -> None:
        """The source restarted: flag the next packet as a discontinuity, forget SPS/PPS."""
        self._next_discontinuity = True
        self._sps = []
        self._pps = []

    # -- NAL list preparation ------------------------------------------------

    def prepare(self, nals: Iterable[bytes]) -> tuple[list[bytes], bool]:
        """Strip AUD/filler, cache SPS/PPS, add cached ones before a bare IDR.

        Returns ``(nals, keyframe)``; keyframe means the AU carries an IDR
        slice (nal_unit_type 5).
        """
        out: list[bytes] = []
        sps: list[bytes] = []
        pps: list[bytes] = []
        idr = False
        for nal in nals:
            if not nal:
                continue
            t = nal[0] & 0x1F
            if t in _STRIP:
                continue
            if t == 7:
                sps.append(nal)
            elif t == 8:
                pps.append(nal)
            elif t == 5:
                idr = True
            out.append(nal)
        if sps:
            self._sps = sps
        if pps:
            self._pps = pps
        if idr:
            # H.264 §7.4.1.2.3: SPS/PPS precede the first VCL NAL unit of the
            # AU; putting them first is always a valid order.
            missing = (self._sps if not sps else []) + (self._pps if not pps else [])
            if missing:
                out = missing + out
        return out, idr

    # -- payloads ------------------------------------------------------------

    def payloads(self, nals: Sequence[bytes]) -> list[bytes]:
        """RTP payloads for the NAL units of one access unit, in order."""
        limit = self.max_payload
        out: list[bytes] = []
        i = 0
        n = len(nals)
        while i < n:
            nal = nals[i]
            size = len(nal)
            if size > limit:
                out.extend(_fu_a(nal, limit))
                i += 1
                continue
            # Try to aggregate this and the following NAL units (§5.7.1):
            # 1 byte STAP-A header + (2 byte size + NAL) each.
            total = 1 + 2 + size
            j = i + 1
            while j < n:
                nxt = len(nals[j])
                if total + 2 + nxt > limit:
                    break
                total += 2 + nxt
                j += 1
            if j - i >= 2:
                out.append(_stap_a(nals[i:j]))
                i = j
            else:
                out.append(nal)  # single NAL unit packet (§5.6)
                i += 1
        return out

    def packetize(
        self, access_unit: bytes | Sequence[bytes], timestamp: int
    ) -> list[LayerPacket]:
        """Packetize one access unit with RTP timestamp *timestamp* (90 kHz).

        *access_unit* is Annex-B bytes or an already split NAL unit list.
        Returns the layer packets with consecutive layer sequence numbers;
        empty when the access unit has nothing to send.
        """
        if isinstance(access_unit, (bytes, bytearray, memoryview)):
            nals: Sequence[bytes] = split_annexb(bytes(access_unit))
        else:
            nals = access_unit
        prepared, keyframe = self.prepare(nals)
        payloads = self.payloads(prepared)
        if not payloads:
            return []
        ts = timestamp & 0xFFFFFFFF
        seq = self._seq
        last = len(payloads) - 1
        packets = [
            LayerPacket(
                seq=(seq + k) & 0xFFFF,
                timestamp=ts,
                marker=k == last,
                payload=p,
                keyframe_start=keyframe and k == 0,
                discontinuity=self._next_discontinuity and k == 0,
            )
            for k, p in enumerate(payloads)
        ]
        self._seq = (seq + len(payloads)) & 0xFFFF
        self._next_discontinuity = False
        return packets


def _stap_a(nals: Sequence[bytes]) -> bytes:
    """RFC 6184 §5.7.1: F = OR of the F bits, NRI = max NRI, type 24."""
    f = 0
    nri = 0
    parts = [b""]
    for nal in nals:
        h = nal[0]
        f |= h & 0x80
        if h & 0x60 > nri:
            nri = h & 0x60
        parts.append(_U16.pack(len(nal)))
        parts.append(nal)
    parts[0] = bytes((f | nri | NalType.STAP_A,))
    return b"".join(parts)


def _fu_a(nal: bytes, limit: int) -> list[bytes]:
    """RFC 6184 §5.8: split into FU-A fragments of near-equal size.

    FU indicator = F|NRI of the NAL header | 28; FU header = S|E|R=0|type.
    The NAL header itself is not sent; its bits travel in the two bytes.
    """
    header = nal[0]
    indicator = (header & 0xE0) | NalType.FU_A
    nal_type = header & 0x1F
    body = memoryview(nal)[1:]
    size = len(body)
    room = limit - 2
    count = -(-size // room)
    base, extra = divmod(size, count)
    out: list[bytes] = []
    pos = 0
    for k in range(count):
        chunk = base + (1 if k < extra else 0)
        fu_header = nal_type
        if k == 0:
            fu_header |= 0x80
        if k == count - 1:
            fu_header |= 0x40
        out.append(bytes((indicator, fu_header)) + body[pos : pos + chunk])
        pos += chunk
    return out


# --------------------------------------------------------------------------
# Depacketizer
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NalUnits:
    """The NAL units of one reassembled access unit (not yet a
    :class:`media.unit.Unit`: :meth:`annexb` gives its bytes).

    ``lost``: a sequence gap (or a broken FU-A) hit this access unit, so some
    NAL units or parts of them are missing. ``complete``: it ended with the
    marker bit (rather than being closed by a new timestamp or a flush).
    """

    timestamp: int
    nals: tuple[bytes, ...]
    keyframe: bool
    lost: bool
    complete: bool

    def annexb(self) -> bytes:
        """The access unit as an Annex-B byte stream (4-byte start codes)."""
        return b"".join(b"\x00\x00\x00\x01" + n for n in self.nals)


class H264Depacketizer:
    """Reassemble RFC 6184 payloads (packetization-mode 1) into access units.

    Feed packets in sequence order (after any jitter buffer). A packet whose
    sequence number is not the expected one is a loss: the access unit in
    progress is flagged ``lost`` and a partial FU-A is discarded. A packet
    older than the expected one (duplicate or late) is ignored and counted in
    ``late``.
    """

    __slots__ = ("_expected", "_ts", "_nals", "_lost", "_fu", "_keyframe", "late", "ignored")

    def __init__(self) -> None:
        self._expected: int | None = None
        self._ts: int | None = None
        self._nals: list[bytes] = []
        self._lost = False
        self._fu: bytearray | None = None
        self._keyframe = False
        self.late = 0
        self.ignored = 0

    def push(self, seq: int, timestamp: int, marker: bool, payload: bytes) -> list[NalUnits]:
        """Add one packet; return the access units it completed (0, 1 or 2)."""
        done: list[NalUnits] = []
        seq &= 0xFFFF
        gap = False
        if self._expected is not None and seq != self._expected:
            if (seq - self._expected) & 0xFFFF >= 0x8000:
                self.late += 1
                return done
            gap = True
        self._expected = (seq + 1) & 0xFFFF
        if gap:
            # The missing packets belong to the access unit in progress (its
            # tail) and/or to the one this packet starts (its head): flag both.
            self._lost = True
            self._fu = None
        if self._ts is not None and timestamp != self._ts:
            au = self._emit(complete=False)
            if au is not None:
                done.append(au)
            if gap:
                self._lost = True
        self._ts = timestamp
        self._parse(payload)
        if marker:
            au = self._emit(complete=True)
            if au is not None:
                done.append(au)
        return done

    def flush(self) -> list[NalUnits]:
        """Emit the access unit in progress (e.g. at end of stream)."""
        au = self._emit(complete=False)
        return [au] if au is not None else []

    def _emit(self, complete: bool) -> NalUnits | None:
        if self._fu is not None:
            self._fu = None  # FU-A never finished: that NAL unit is lost
            self._lost = True
        au = None
        if self._nals or self._lost:
            au = NalUnits(
                timestamp=self._ts if self._ts is not None else 0,
                nals=tuple(self._nals),
                keyframe=self._keyframe,
                lost=self._lost,
                complete=complete,
            )
        self._nals = []
        self._lost = False
        self._keyframe = False
        self._ts = None
        return au

    def _add(self, nal: bytes) -> None:
        if (nal[0] & 0x1F) == 5:
            self._keyframe = True
        self._nals.append(nal)

    def _parse(self, payload: bytes) -> None:
        n = len(payload)
        if n < 1:
            raise RtpError("empty H.264 RTP payload")
        t = payload[0] & 0x1F
        if 1 <= t <= 23:
            self._fu_abandon()
            self._add(bytes(payload))
        elif t == NalType.STAP_A:
            self._fu_abandon()
            pos = 1
            nals = []
            while pos < n:
                if pos + 2 > n:
                    raise RtpError("STAP-A NAL unit size truncated")
                size = (payload[pos] << 8) | payload[pos + 1]
                pos += 2
                if size == 0 or pos + size > n:
                    raise RtpError(f"STAP-A NAL unit size {size} invalid")
                nals.append(bytes(payload[pos : pos + size]))
                pos += size
            if not nals:
                raise RtpError("STAP-A without NAL units")
            for nal in nals:
                self._add(nal)
        elif t == NalType.FU_A:
            if n < 2:
                raise RtpError("FU-A header truncated")
            fu = payload[1]
            start = fu & 0x80
            end = fu & 0x40
            if start and end:
                raise RtpError("FU-A with both start and end bits (RFC 6184 §5.8)")
            if start:
                self._fu_abandon()
                buf = bytearray(((payload[0] & 0xE0) | (fu & 0x1F),))
                buf += payload[2:]
                self._fu = buf
            elif self._fu is None:
                self._lost = True  # middle/end fragment without its start
                return
            else:
                self._fu += payload[2:]
            if end:
                nal = bytes(self._fu)
                self._fu = None
                self._add(nal)
        elif t in _INTERLEAVED_ONLY:
            raise UnsupportedMedia(f"H.264 payload type {t} needs interleaved mode (RFC 6184 §5.4)")
        else:
            self.ignored += 1  # types 0, 30, 31: reserved (RFC 6184 §5.2, Table 1)

    def _fu_abandon(self) -> None:
        if self._fu is not None:
            self._fu = None
            self._lost = True
