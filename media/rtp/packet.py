"""RTP packets (RFC 3550 §5.1) and header extensions (RFC 8285).

Two forms:

* :class:`RtpPacket` — a frozen value for tests, ingest and anything off the
  hot path: ``RtpPacket.parse(data)`` / ``bytes(packet)``.
* Plain functions over ``bytes``/``bytearray`` for the per-packet path:
  :func:`peek_header`, :func:`payload_bounds`, :func:`write_header`,
  :func:`is_rtcp`. They use precompiled :class:`struct.Struct` objects and
  never build intermediate objects.

:class:`LayerPacket` is the unit the forwarding path moves around: one RTP
payload packetized once per simulcast layer, with the layer-local sequence
number and timestamp (see ``media/rtp/rewrite.py``).

Every structural violation raises :class:`media.errors.RtpError`.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field, replace

from media.errors import RtpError

__all__ = [
    "RTP_VERSION",
    "RTP_HEADER_SIZE",
    "ONE_BYTE_PROFILE",
    "TWO_BYTE_PROFILE",
    "HeaderExtensionUri",
    "RtpPacket",
    "LayerPacket",
    "SeqUnwrapper",
    "is_rtcp",
    "peek_header",
    "payload_bounds",
    "write_header",
    "parse_extensions",
    "build_extensions",
    "abs_send_time",
    "wrap_rtx_payload",
    "unwrap_rtx_payload",
    "seq_newer",
]

RTP_VERSION = 2
RTP_HEADER_SIZE = 12
#: RFC 8285 §4.2 one-byte header extension profile ("defined by profile").
ONE_BYTE_PROFILE = 0xBEDE
#: RFC 8285 §4.3 two-byte header extension profile (low 4 bits: appbits).
TWO_BYTE_PROFILE = 0x1000

_FIXED = struct.Struct("!BBHII")  # V/P/X/CC, M/PT, seq, ts, ssrc
_SEQ_TS = struct.Struct("!BHI")  # M/PT, seq, ts (offset 1)
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_EXT_HDR = struct.Struct("!HH")


class HeaderExtensionUri(str, enum.Enum):
    """Header extension URIs the forwarding path writes or reads."""

    MID = "urn:ietf:params:rtp-hdrext:sdes:mid"  # RFC 8843 §15.1
    RID = "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id"  # RFC 8852 §3.1
    REPAIRED_RID = "urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id"  # RFC 8852 §3.2
    ABS_SEND_TIME = "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"
    TRANSPORT_CC = (
        "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01"
    )


# --------------------------------------------------------------------------
# Hot-path functions
# --------------------------------------------------------------------------


def is_rtcp(data: bytes | bytearray | memoryview) -> bool:
    """RFC 5761 §4: with rtcp-mux, byte 1 in 192..223 means RTCP."""
    return len(data) >= 2 and 192 <= data[1] <= 223


def peek_header(data: bytes | bytearray | memoryview) -> tuple[bool, int, int, int, int]:
    """Return ``(marker, payload_type, seq, timestamp, ssrc)`` of an RTP packet.

    Checks only the version and the fixed 12 bytes (RFC 3550 §5.1); use
    :func:`payload_bounds` to find the payload.
    """
    if len(data) < RTP_HEADER_SIZE:
        raise RtpError(f"RTP packet too short: {len(data)} bytes")
    b0, b1, seq, ts, ssrc = _FIXED.unpack_from(data, 0)
    if b0 >> 6 != RTP_VERSION:
        raise RtpError(f"RTP version {b0 >> 6}, expected 2")
    return bool(b1 & 0x80), b1 & 0x7F, seq, ts, ssrc


def payload_bounds(data: bytes | bytearray | memoryview) -> tuple[int, int]:
    """Return ``(start, end)`` of the payload, after CSRCs, extension, padding.

    RFC 3550 §5.1: CSRC list is CC × 4 bytes; §5.3.1: the extension is a
    16-bit profile, a 16-bit length in 32-bit words, then the data; the last
    octet of the padding counts the padding octets, itself included.
    """
    n = len(data)
    if n < RTP_HEADER_SIZE:
        raise RtpError(f"RTP packet too short: {n} bytes")
    b0 = data[0]
    if b0 >> 6 != RTP_VERSION:
        raise RtpError(f"RTP version {b0 >> 6}, expected 2")
    start = RTP_HEADER_SIZE + 4 * (b0 & 0x0F)
    if b0 & 0x10:
        if n < start + 4:
            raise RtpError("RTP header extension truncated")
        words = _U16.unpack_from(data, start + 2)[0]
        start += 4 + 4 * words
    if start > n:
        raise RtpError("RTP header longer than the packet")
    end = n
    if b0 & 0x20:
        pad = data[n - 1]
        if pad == 0 or start + pad > n:
            raise RtpError(f"RTP padding count {pad} invalid")
        end = n - pad
    return start, end


def write_header(
    buf: bytearray, marker: bool, payload_type: int, seq: int, timestamp: int
) -> None:
    """Overwrite M/PT, sequence number and timestamp of the header in *buf*."""
    _SEQ_TS.pack_into(
        buf, 1, (0x80 if marker else 0) | payload_type, seq & 0xFFFF, timestamp & 0xFFFFFFFF
    )


def abs_send_time(now: float) -> int:
    """abs-send-time value: seconds as 6.18 fixed point, 24 bits (wraps every 64 s)."""
    return int(now * 262144.0) & 0xFFFFFF


def seq_newer(a: int, b: int) -> bool:
    """True when 16-bit sequence number *a* is newer than *b* (RFC 3550 A.1 arithmetic)."""
    d = (a - b) & 0xFFFF
    return 0 < d < 0x8000


def wrap_rtx_payload(original_seq: int, payload: bytes) -> bytes:
    """RFC 4588 §4: RTX payload = original sequence number (OSN, 16 bits) + payload."""
    return _U16.pack(original_seq & 0xFFFF) + payload


def unwrap_rtx_payload(payload: bytes) -> tuple[int, bytes]:
    """Inverse of :func:`wrap_rtx_payload`: ``(original_seq, original_payload)``."""
    if len(payload) < 2:
        raise RtpError("RTX payload shorter than its 2-byte original sequence number")
    return _U16.unpack_from(payload, 0)[0], bytes(payload[2:])


# --------------------------------------------------------------------------
# Header extensions (RFC 8285)
# --------------------------------------------------------------------------


def parse_extensions(profile: int, data: bytes) -> tuple[tuple[int, bytes], ...]:
    """Parse the elements of a header extension block.

    One-byte form (§4.2): ID 1–14, L+1 data bytes; a 0x00 byte is padding;
    ID 15 stops processing. Two-byte form (§4.3): ID byte, length byte, data;
    a 0x00 ID byte is padding. Any other profile yields no elements.
    """
    out: list[tuple[int, bytes]] = []
    n = len(data)
    pos = 0
    if profile == ONE_BYTE_PROFILE:
        while pos < n:
            b = data[pos]
            ext_id = b >> 4
            if ext_id == 0:
                pos += 1  # padding (§4.2: ID 0 is reserved for padding)
                continue
            if ext_id == 15:
                break  # §4.2: stop processing at ID 15
            length = (b & 0x0F) + 1
            pos += 1
            if pos + length > n:
                raise RtpError(f"one-byte header extension id {ext_id} truncated")
            out.append((ext_id, bytes(data[pos : pos + length])))
            pos += length
    elif profile & 0xFFF0 == TWO_BYTE_PROFILE:
        while pos < n:
            ext_id = data[pos]
            if ext_id == 0:
                pos += 1
                continue
            if pos + 2 > n:
                raise RtpError("two-byte header extension header truncated")
            length = data[pos + 1]
            pos += 2
            if pos + length > n:
                raise RtpError(f"two-byte header extension id {ext_id} truncated")
            out.append((ext_id, bytes(data[pos : pos + length])))
            pos += length
    return tuple(out)


def build_extensions(
    elements: tuple[tuple[int, bytes], ...] | list[tuple[int, bytes]],
    two_byte: bool | None = None,
) -> tuple[int, bytes]:
    """Encode elements as ``(profile, data)``, data padded to 32-bit words.

    The one-byte form is used when every ID is 1–14 and every value 1–16
    bytes (RFC 8285 §4.2), otherwise the two-byte form (§4.3); *two_byte*
    forces a choice.
    """
    fits_one = all(1 <= i <= 14 and 1 <= len(v) <= 16 for i, v in elements)
    if two_byte is None:
        two_byte = not fits_one
    if not two_byte and not fits_one:
        raise RtpError("extension elements do not fit the one-byte form")
    parts = bytearray()
    if two_byte:
        for i, v in elements:
            if not 1 <= i <= 255 or len(v) > 255:
                raise RtpError(f"two-byte extension id {i} / length {len(v)} out of range")
            parts += bytes((i, len(v))) + v
        profile = TWO_BYTE_PROFILE
    else:
        for i, v in elements:
            parts.append((i << 4) | (len(v) - 1))
            parts += v
        profile = ONE_BYTE_PROFILE
    parts += b"\x00" * (-len(parts) % 4)
    return profile, bytes(parts)


# --------------------------------------------------------------------------
# Value form
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RtpPacket:
    """An RTP packet (RFC 3550 §5.1). Padding is removed on parse."""

    payload_type: int
    sequence_number: int
    timestamp: int
    ssrc: int
    payload: bytes = b""
    marker: bool = False
    csrc: tuple[int, ...] = ()
    extension_profile: int | None = None
    extension_data: bytes = b""

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> RtpPacket:
        marker, pt, seq, ts, ssrc = peek_header(data)
        start, end = payload_bounds(data)
        cc = data[0] & 0x0F
        csrc = struct.unpack_from(f"!{cc}I", data, RTP_HEADER_SIZE) if cc else ()
        profile = None
        ext = b""
        if data[0] & 0x10:
            pos = RTP_HEADER_SIZE + 4 * cc
            profile, words = _EXT_HDR.unpack_from(data, pos)
            ext = bytes(data[pos + 4 : pos + 4 + 4 * words])
            parse_extensions(profile, ext)  # validate the element framing
        return cls(
            payload_type=pt,
            sequence_number=seq,
            timestamp=ts,
            ssrc=ssrc,
            payload=bytes(data[start:end]),
            marker=marker,
            csrc=tuple(csrc),
            extension_profile=profile,
            extension_data=ext,
        )

    @property
    def extensions(self) -> tuple[tuple[int, bytes], ...]:
        """Header extension elements as ``((id, value), ...)``."""
        if self.extension_profile is None:
            return ()
        return parse_extensions(self.extension_profile, self.extension_data)

    def extension(self, ext_id: int) -> bytes | None:
        """Value of the element with local identifier *ext_id*, or None."""
        for i, v in self.extensions:
            if i == ext_id:
                return v
        return None

    def with_extensions(
        self, elements: tuple[tuple[int, bytes], ...] | list[tuple[int, bytes]]
    ) -> RtpPacket:
        """Copy with the extension block replaced by *elements* (none: no block)."""
        if not elements:
            return replace(self, extension_profile=None, extension_data=b"")
        profile, data = build_extensions(elements)
        return replace(self, extension_profile=profile, extension_data=data)

    def serialize(self) -> bytes:
        if not 0 <= self.payload_type <= 127:
            raise RtpError(f"payload type {self.payload_type} out of range")
        if len(self.csrc) > 15:
            raise RtpError("more than 15 CSRCs")
        if len(self.extension_data) % 4:
            raise RtpError("extension data is not a multiple of 4 bytes")
        has_ext = self.extension_profile is not None
        b0 = (RTP_VERSION << 6) | (0x10 if has_ext else 0) | len(self.csrc)
        out = bytearray(
            _FIXED.pack(
                b0,
                (0x80 if self.marker else 0) | self.payload_type,
                self.sequence_number & 0xFFFF,
                self.timestamp & 0xFFFFFFFF,
                self.ssrc & 0xFFFFFFFF,
            )
        )
        for c in self.csrc:
            out += _U32.pack(c)
        if has_ext:
            out += _EXT_HDR.pack(self.extension_profile, len(self.extension_data) // 4)
            out += self.extension_data
        out += self.payload
        return bytes(out)

    __bytes__ = serialize


@dataclass(frozen=True, slots=True)
class LayerPacket:
    """One RTP payload of a simulcast layer, packetized once for every viewer.

    ``seq`` and ``timestamp`` are in the layer's own space (16 and 32 bits,
    wrapping). ``keyframe_start`` marks the first packet of a decoder refresh
    point (IDR access unit; every Opus packet). ``discontinuity`` marks the
    first packet after the layer's source restarted (publisher reconnect): its
    seq/ts have no relation to the packets before it.
    """

    seq: int
    timestamp: int
    marker: bool
    payload: bytes
    keyframe_start: bool = False
    discontinuity: bool = False


@dataclass(slots=True)
class SeqUnwrapper:
    """Extend 16-bit sequence numbers to a monotonic-ish integer (RFC 3550 A.1).

    A number up to 32767 ahead of the highest seen is newer; anything else is
    older (a reordered or repeated packet) and maps below the highest.
    """

    highest: int | None = field(default=None)

    def unwrap(self, seq: int) -> int:
        seq &= 0xFFFF
        if self.highest is None:
            self.highest = seq
            return seq
        d = (seq - self.highest) & 0xFFFF
        if d < 0x8000:
            self.highest += d
            return self.highest
        return self.highest - (0x10000 - d)
