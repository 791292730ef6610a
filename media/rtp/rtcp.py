"""RTCP (RFC 3550 §6) and the feedback messages a WebRTC forwarder uses.

Parsing: :func:`parse_rtcp` splits a compound packet (RFC 3550 §6.4, A.2;
reduced-size packets per RFC 5506 are accepted, so the first packet need not
be SR/RR) into values:

* ``SenderReport``   PT 200          RFC 3550 §6.4.1
* ``ReceiverReport`` PT 201          RFC 3550 §6.4.2
* ``Sdes``           PT 202          RFC 3550 §6.5
* ``Bye``            PT 203          RFC 3550 §6.6
* ``Nack``           PT 205 FMT 1    RFC 4585 §6.2.1 (Generic NACK: PID + BLP)
* ``Pli``            PT 206 FMT 1    RFC 4585 §6.3.1
* ``Fir``            PT 206 FMT 4    RFC 5104 §4.3.1
* ``Remb``           PT 206 FMT 15   draft-alvestrand-rmcat-remb-03 §2.2
* ``UnknownRtcp``    anything else (APP, XR, transport-cc RTPFB FMT 15, …),
  kept as bytes so it never breaks the compound parse

Every length is checked against the bytes present; a violation raises
:class:`media.errors.RtpError`, nothing else escapes the parser.

Building: every value has ``serialize()``/``bytes()``; :func:`serialize_rtcp`
joins a compound packet. NTP helpers turn an explicit wall clock into the
64-bit NTP timestamp of a sender report and compute round-trip time from a
report block (RFC 3550 §6.4.1, "DLSR").
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Iterable, Union

from media.errors import RtpError

__all__ = [
    "RtcpType",
    "RtpfbFmt",
    "PsfbFmt",
    "ReportBlock",
    "SenderReport",
    "ReceiverReport",
    "SdesChunk",
    "Sdes",
    "Bye",
    "Nack",
    "Pli",
    "Fir",
    "FirEntry",
    "Remb",
    "UnknownRtcp",
    "RtcpPacket",
    "parse_rtcp",
    "serialize_rtcp",
    "NTP_UNIX_OFFSET",
    "ntp_from_unix",
    "ntp_middle32",
    "rtt_from_report",
    "build_sr",
    "build_rr",
    "build_nack",
    "build_pli",
    "build_remb",
]


class RtcpType(enum.IntEnum):
    SR = 200
    RR = 201
    SDES = 202
    BYE = 203
    APP = 204
    RTPFB = 205
    PSFB = 206
    XR = 207


class RtpfbFmt(enum.IntEnum):
    NACK = 1  # RFC 4585 §6.2.1
    TRANSPORT_CC = 15  # draft-holmer-rmcat-transport-wide-cc-extensions-01 §3.1


class PsfbFmt(enum.IntEnum):
    PLI = 1  # RFC 4585 §6.3.1
    FIR = 4  # RFC 5104 §4.3.1
    AFB = 15  # RFC 4585 §6.4 application layer feedback (REMB)


_HDR = struct.Struct("!BBH")
_U32 = struct.Struct("!I")
_2U32 = struct.Struct("!II")
_SENDER_INFO = struct.Struct("!IQIII")  # SSRC, NTP, RTP ts, packets, octets
_BLOCK = struct.Struct("!IB3sIIII")
_NACK_FCI = struct.Struct("!HH")
_FIR_FCI = struct.Struct("!IB3x")
_REMB_HEAD = struct.Struct("!4sBBH")

#: Seconds from the NTP epoch (1900) to the Unix epoch (1970).
NTP_UNIX_OFFSET = 2208988800


def _packet(packet_type: int, count: int, body: bytes) -> bytes:
    """Header + body; a body that is not 32-bit aligned gets RTCP padding (§6.4.1)."""
    if not 0 <= count <= 31:
        raise RtpError(f"RTCP count/FMT {count} out of range")
    pad = -len(body) % 4
    if pad:
        body = body + b"\x00" * (pad - 1) + bytes((pad,))
        return _HDR.pack(0xA0 | count, packet_type, len(body) // 4) + body
    return _HDR.pack(0x80 | count, packet_type, len(body) // 4) + body


# --------------------------------------------------------------------------
# Report blocks, SR, RR
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReportBlock:
    """RFC 3550 §6.4.1 reception report block (24 bytes)."""

    ssrc: int
    fraction_lost: int  # 8-bit fixed point, lost / expected × 256
    packets_lost: int  # cumulative, signed 24-bit
    highest_seq: int  # extended highest sequence number received
    jitter: int  # interarrival jitter, timestamp units
    lsr: int  # middle 32 bits of the last SR's NTP timestamp, 0 if none
    dlsr: int  # delay since that SR, 1/65536 s

    @property
    def loss_fraction(self) -> float:
        """``fraction_lost`` as a ratio in [0, 1)."""
        return self.fraction_lost / 256.0

    @classmethod
    def parse(cls, data: bytes, offset: int) -> ReportBlock:
        ssrc, fraction, lost24, highest, jitter, lsr, dlsr = _BLOCK.unpack_from(data, offset)
        lost = int.from_bytes(lost24, "big", signed=True)
        return cls(ssrc, fraction, lost, highest, jitter, lsr, dlsr)

    def serialize(self) -> bytes:
        if not 0 <= self.fraction_lost <= 255:
            raise RtpError("fraction_lost out of range")
        # RFC 3550 §6.4.1: cumulative loss is a signed 24-bit value; clamp.
        lost = max(-(1 << 23), min(self.packets_lost, (1 << 23) - 1))
        return _BLOCK.pack(
            self.ssrc,
            self.fraction_lost,
            lost.to_bytes(3, "big", signed=True),
            self.highest_seq & 0xFFFFFFFF,
            self.jitter & 0xFFFFFFFF,
            self.lsr & 0xFFFFFFFF,
            self.dlsr & 0xFFFFFFFF,
        )

    __bytes__ = serialize


def _blocks(data: bytes, offset: int, count: int) -> tuple[ReportBlock, ...]:
    return tuple(ReportBlock.parse(data, offset + 24 * i) for i in range(count))


@dataclass(frozen=True, slots=True)
class SenderReport:
    """RFC 3550 §6.4.1. ``extension``: profile-specific bytes after the blocks."""

    ssrc: int
    ntp_timestamp: int
    rtp_timestamp: int
    packet_count: int
    octet_count: int
    reports: tuple[ReportBlock, ...] = ()
    extension: bytes = b""

    @classmethod
    def parse(cls, body: bytes, count: int) -> SenderReport:
        need = 24 + 24 * count
        if len(body) < need:
            raise RtpError(f"SR body {len(body)} bytes, needs {need}")
        ssrc, ntp, rtp_ts, packets, octets = _SENDER_INFO.unpack_from(body, 0)
        return cls(ssrc, ntp, rtp_ts, packets, octets, _blocks(body, 24, count), bytes(body[need:]))

    def serialize(self) -> bytes:
        body = _SENDER_INFO.pack(
            self.ssrc,
            self.ntp_timestamp & 0xFFFFFFFFFFFFFFFF,
            self.rtp_timestamp & 0xFFFFFFFF,
            self.packet_count & 0xFFFFFFFF,
            self.octet_count & 0xFFFFFFFF,
        )
        body += b"".join(b.serialize() for b in self.reports) + self.extension
        return _packet(RtcpType.SR, len(self.reports), body)

    __bytes__ = serialize


@dataclass(frozen=True, slots=True)
class ReceiverReport:
    """RFC 3550 §6.4.2."""

    ssrc: int
    reports: tuple[ReportBlock, ...] = ()
    extension: bytes = b""

    @classmethod
    def parse(cls, body: bytes, count: int) -> ReceiverReport:
        need = 4 + 24 * count
        if len(body) < need:
            raise RtpError(f"RR body {len(body)} bytes, needs {need}")
        return cls(_U32.unpack_from(body, 0)[0], _blocks(body, 4, count), bytes(body[need:]))

    def serialize(self) -> bytes:
        body = _U32.pack(self.ssrc) + b"".join(b.serialize() for b in self.reports) + self.extension
        return _packet(RtcpType.RR, len(self.reports), body)

    __bytes__ = serialize


# --------------------------------------------------------------------------
# SDES, BYE
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SdesChunk:
    """One SDES chunk: an SSRC/CSRC and its ``(item type, value)`` items."""

    ssrc: int
    items: tuple[tuple[int, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class Sdes:
    """RFC 3550 §6.5 source description (CNAME = item type 1)."""

    chunks: tuple[SdesChunk, ...] = ()

    @classmethod
    def parse(cls, body: bytes, count: int) -> Sdes:
        n = len(body)
        pos = 0
        chunks = []
        for _ in range(count):
            if pos + 4 > n:
                raise RtpError("SDES chunk truncated")
            ssrc = _U32.unpack_from(body, pos)[0]
            pos += 4
            items = []
            while True:
                if pos >= n:
                    raise RtpError("SDES chunk without a terminating null item")
                item_type = body[pos]
                if item_type == 0:
                    # §6.5: the list ends with a null octet, then zero padding
                    # to the next 32-bit boundary.
                    pos = (pos + 4) & ~3
                    break
                if pos + 2 > n:
                    raise RtpError("SDES item header truncated")
                length = body[pos + 1]
                pos += 2
                if pos + length > n:
                    raise RtpError("SDES item truncated")
                items.append((item_type, bytes(body[pos : pos + length])))
                pos += length
            chunks.append(SdesChunk(ssrc, tuple(items)))
        if pos > n:
            raise RtpError("SDES chunk padding truncated")
        return cls(tuple(chunks))

    def serialize(self) -> bytes:
        body = bytearray()
        for chunk in self.chunks:
            body += _U32.pack(chunk.ssrc)
            for item_type, value in chunk.items:
                if not 1 <= item_type <= 255 or len(value) > 255:
                    raise RtpError("SDES item type or length out of range")
                body += bytes((item_type, len(value))) + value
            body += b"\x00" * (4 - len(body) % 4)  # null item + padding (≥ 1 byte)
        return _packet(RtcpType.SDES, len(self.chunks), bytes(body))

    __bytes__ = serialize


@dataclass(frozen=True, slots=True)
class Bye:
    """RFC 3550 §6.6 goodbye, with an optional reason."""

    ssrcs: tuple[int, ...] = ()
    reason: bytes = b""

    @classmethod
    def parse(cls, body: bytes, count: int) -> Bye:
        n = len(body)
        if n < 4 * count:
            raise RtpError("BYE SSRC list truncated")
        ssrcs = struct.unpack_from(f"!{count}I", body, 0)
        pos = 4 * count
        reason = b""
        if pos < n:
            length = body[pos]
            if pos + 1 + length > n:
                raise RtpError("BYE reason truncated")
            reason = bytes(body[pos + 1 : pos + 1 + length])
        return cls(tuple(ssrcs), reason)

    def serialize(self) -> bytes:
        body = b"".join(_U32.pack(s) for s in self.ssrcs)
        if self.reason:
            if len(self.reason) > 255:
                raise RtpError("BYE reason longer than 255 bytes")
            body += bytes((len(self.reason),)) + self.reason
            body += b"\x00" * (-len(body) % 4)
        return _packet(RtcpType.BYE, len(self.ssrcs), body)

    __bytes__ = serialize


# --------------------------------------------------------------------------
# Feedback (RFC 4585 §6.1 common format: sender SSRC, media SSRC, FCI)
# --------------------------------------------------------------------------


def _nack_fci(lost: Iterable[int]) -> bytes:
    seqs = sorted({s & 0xFFFF for s in lost})
    if not seqs:
        raise RtpError("a Generic NACK needs at least one sequence number")
    # Order by distance from the first so a wrap (65535, 0, 1) stays together:
    # start at the element after the largest gap between neighbours.
    if len(seqs) > 1:
        gaps = [(seqs[(i + 1) % len(seqs)] - seqs[i]) & 0xFFFF for i in range(len(seqs))]
        first = (gaps.index(max(gaps)) + 1) % len(seqs)
        seqs = seqs[first:] + seqs[:first]
    out = bytearray()
    pid = seqs[0]
    blp = 0
    for s in seqs[1:]:
        d = (s - pid - 1) & 0xFFFF
        if d < 16:
            blp |= 1 << d
        else:
            out += _NACK_FCI.pack(pid, blp)
            pid, blp = s, 0
    out += _NACK_FCI.pack(pid, blp)
    return bytes(out)


@dataclass(frozen=True, slots=True)
class Nack:
    """RFC 4585 §6.2.1 Generic NACK; ``lost`` lists the sequence numbers."""

    sender_ssrc: int
    media_ssrc: int
    lost: tuple[int, ...]

    @classmethod
    def parse(cls, body: bytes) -> Nack:
        n = len(body)
        if n < 12 or n % 4:
            raise RtpError(f"Generic NACK body of {n} bytes is not 8 + 4·N (N ≥ 1)")
        sender, media = _2U32.unpack_from(body, 0)
        lost: list[int] = []
        for pos in range(8, n, 4):
            pid, blp = _NACK_FCI.unpack_from(body, pos)
            lost.append(pid)
            bit = 0
            while blp:
                if blp & 1:
                    lost.append((pid + bit + 1) & 0xFFFF)
                blp >>= 1
                bit += 1
        return cls(sender, media, tuple(lost))

    def serialize(self) -> bytes:
        body = _2U32.pack(self.sender_ssrc, self.media_ssrc) + _nack_fci(self.lost)
        return _packet(RtcpType.RTPFB, RtpfbFmt.NACK, body)

    __bytes__ = serialize


@dataclass(frozen=True, slots=True)
class Pli:
    """RFC 4585 §6.3.1 Picture Loss Indication (no FCI; length field 2)."""

    sender_ssrc: int
    media_ssrc: int

    @classmethod
    def parse(cls, body: bytes) -> Pli:
        if len(body) != 8:
            raise RtpError(f"PLI body must be 8 bytes, got {len(body)}")
        return cls(*_2U32.unpack_from(body, 0))

    def serialize(self) -> bytes:
        body = _2U32.pack(self.sender_ssrc, self.media_ssrc)
        return _packet(RtcpType.PSFB, PsfbFmt.PLI, body)

    __bytes__ = serialize


@dataclass(frozen=True, slots=True)
class FirEntry:
    ssrc: int
    seq_nr: int  # command sequence number, 8 bits


@dataclass(frozen=True, slots=True)
class Fir:
    """RFC 5104 §4.3.1 Full Intra Request; media SSRC of the header is 0."""

    sender_ssrc: int
    entries: tuple[FirEntry, ...]
    media_ssrc: int = 0

    @classmethod
    def parse(cls, body: bytes) -> Fir:
        n = len(body)
        if n < 16 or (n - 8) % 8:
            raise RtpError(f"FIR body of {n} bytes is not 8 + 8·N (N ≥ 1)")
        sender, media = _2U32.unpack_from(body, 0)
        entries = tuple(FirEntry(*_FIR_FCI.unpack_from(body, pos)) for pos in range(8, n, 8))
        return cls(sender, entries, media)

    def serialize(self) -> bytes:
        if not self.entries:
            raise RtpError("FIR needs at least one entry")
        body = _2U32.pack(self.sender_ssrc, self.media_ssrc) + b"".join(
            _FIR_FCI.pack(e.ssrc, e.seq_nr & 0xFF) for e in self.entries
        )
        return _packet(RtcpType.PSFB, PsfbFmt.FIR, body)

    __bytes__ = serialize


@dataclass(frozen=True, slots=True)
class Remb:
    """Receiver Estimated Max Bitrate (draft-alvestrand-rmcat-remb-03 §2.2).

    FCI: "REMB", Num SSRC (8), BR Exp (6), BR Mantissa (18), SSRC list.
    bitrate (bit/s) = mantissa · 2^exp. The header's media SSRC is 0.
    """

    sender_ssrc: int
    bitrate: int
    ssrcs: tuple[int, ...] = ()
    media_ssrc: int = 0

    @classmethod
    def parse(cls, body: bytes) -> Remb:
        n = len(body)
        if n < 16:
            raise RtpError("REMB FCI truncated")
        sender, media = _2U32.unpack_from(body, 0)
        ident, num, b1, b23 = _REMB_HEAD.unpack_from(body, 8)
        if ident != b"REMB":
            raise RtpError("application feedback is not REMB")
        if n != 16 + 4 * num:
            raise RtpError(f"REMB with {num} SSRCs must be {16 + 4 * num} bytes, got {n}")
        exp = b1 >> 2
        mantissa = ((b1 & 0x03) << 16) | b23
        ssrcs = struct.unpack_from(f"!{num}I", body, 16)
        return cls(sender, mantissa << exp, tuple(ssrcs), media)

    def serialize(self) -> bytes:
        if self.bitrate < 0:
            raise RtpError("negative REMB bitrate")
        if len(self.ssrcs) > 255:
            raise RtpError("REMB lists at most 255 SSRCs")
        exp = 0
        mantissa = self.bitrate
        while mantissa >= 1 << 18:
            mantissa >>= 1
            exp += 1
        if exp > 63:
            raise RtpError("REMB bitrate too large")
        body = _2U32.pack(self.sender_ssrc, self.media_ssrc) + _REMB_HEAD.pack(
            b"REMB", len(self.ssrcs), (exp << 2) | (mantissa >> 16), mantissa & 0xFFFF
        )
        body += b"".join(_U32.pack(s) for s in self.ssrcs)
        return _packet(RtcpType.PSFB, PsfbFmt.AFB, body)

    __bytes__ = serialize


@dataclass(frozen=True, slots=True)
class UnknownRtcp:
    """A well-framed RTCP packet this module does not interpret."""

    packet_type: int
    count: int  # RC / FMT / subtype field
    body: bytes

    def serialize(self) -> bytes:
        return _packet(self.packet_type, self.count, self.body)

    __bytes__ = serialize


RtcpPacket = Union[SenderReport, ReceiverReport, Sdes, Bye, Nack, Pli, Fir, Remb, UnknownRtcp]


def parse_rtcp(data: bytes | bytearray | memoryview) -> list[RtcpPacket]:
    """Parse a (compound) RTCP packet.

    RFC 3550 A.2 validity checks: version 2 everywhere, the lengths add up to
    the datagram, padding only in the last packet and not longer than it.
    """
    data = bytes(data)
    n = len(data)
    if n < 4:
        raise RtpError(f"RTCP packet too short: {n} bytes")
    out: list[RtcpPacket] = []
    pos = 0
    while pos < n:
        if pos + 4 > n:
            raise RtpError("RTCP header truncated")
        b0, packet_type, words = _HDR.unpack_from(data, pos)
        if b0 >> 6 != 2:
            raise RtpError(f"RTCP version {b0 >> 6}, expected 2")
        end = pos + 4 + 4 * words
        if end > n:
            raise RtpError(f"RTCP length {words} runs past the datagram")
        body_end = end
        if b0 & 0x20:
            if end != n:
                raise RtpError("RTCP padding on a packet that is not the last")
            pad = data[end - 1] if end > pos + 4 else 0
            if pad == 0 or pos + 4 + pad > end:
                raise RtpError(f"RTCP padding count {pad} invalid")
            body_end = end - pad
        body = data[pos + 4 : body_end]
        out.append(_parse_one(packet_type, b0 & 0x1F, body))
        pos = end
    return out


def _parse_one(packet_type: int, count: int, body: bytes) -> RtcpPacket:
    if packet_type == RtcpType.SR:
        return SenderReport.parse(body, count)
    if packet_type == RtcpType.RR:
        return ReceiverReport.parse(body, count)
    if packet_type == RtcpType.SDES:
        return Sdes.parse(body, count)
    if packet_type == RtcpType.BYE:
        return Bye.parse(body, count)
    if packet_type == RtcpType.RTPFB:
        if len(body) < 8:
            raise RtpError("transport feedback shorter than its two SSRCs")
        if count == RtpfbFmt.NACK:
            return Nack.parse(body)
    elif packet_type == RtcpType.PSFB:
        if len(body) < 8:
            raise RtpError("payload-specific feedback shorter than its two SSRCs")
        if count == PsfbFmt.PLI:
            return Pli.parse(body)
        if count == PsfbFmt.FIR:
            return Fir.parse(body)
        if count == PsfbFmt.AFB and body[8:12] == b"REMB":
            return Remb.parse(body)
    return UnknownRtcp(packet_type, count, body)


def serialize_rtcp(packets: Iterable[RtcpPacket]) -> bytes:
    """Join packets into one compound RTCP packet."""
    return b"".join(p.serialize() for p in packets)


# --------------------------------------------------------------------------
# NTP, RTT and builders
# --------------------------------------------------------------------------


def ntp_from_unix(wall_time: float) -> int:
    """64-bit NTP timestamp (RFC 3550 §4) for Unix time *wall_time* (seconds)."""
    seconds = int(wall_time // 1)
    frac = int((wall_time - seconds) * 4294967296.0)
    return (((seconds + NTP_UNIX_OFFSET) & 0xFFFFFFFF) << 32) | (frac & 0xFFFFFFFF)


def ntp_middle32(ntp: int) -> int:
    """Middle 32 bits of a 64-bit NTP timestamp (the LSR form, §6.4.1)."""
    return (ntp >> 16) & 0xFFFFFFFF


def rtt_from_report(lsr: int, dlsr: int, now_middle32: int) -> float | None:
    """Round-trip time in seconds: now − LSR − DLSR in 1/65536 s (§6.4.1).

    None when the peer has not received a sender report yet (LSR = 0).
    A negative result (clock or rounding noise) is clamped to 0.
    """
    if lsr == 0:
        return None
    d = (now_middle32 - lsr - dlsr) & 0xFFFFFFFF
    if d >= 0x80000000:
        return 0.0
    return d / 65536.0


def build_sr(
    ssrc: int,
    wall_time: float,
    rtp_timestamp: int,
    packet_count: int,
    octet_count: int,
    reports: Iterable[ReportBlock] = (),
) -> SenderReport:
    """Sender report stamped with NTP time from the explicit *wall_time*.

    *rtp_timestamp* must correspond to the same instant (§6.4.1): extrapolate
    the last packet's timestamp by the elapsed time × clock rate.
    """
    return SenderReport(
        ssrc, ntp_from_unix(wall_time), rtp_timestamp, packet_count, octet_count, tuple(reports)
    )


def build_rr(ssrc: int, reports: Iterable[ReportBlock] = ()) -> ReceiverReport:
    return ReceiverReport(ssrc, tuple(reports))


def build_nack(sender_ssrc: int, media_ssrc: int, lost: Iterable[int]) -> Nack:
    return Nack(sender_ssrc, media_ssrc, tuple(s & 0xFFFF for s in lost))


def build_pli(sender_ssrc: int, media_ssrc: int) -> Pli:
    return Pli(sender_ssrc, media_ssrc)


def build_remb(sender_ssrc: int, bitrate: int, ssrcs: Iterable[int]) -> Remb:
    return Remb(sender_ssrc, int(bitrate), tuple(ssrcs))
