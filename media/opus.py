"""Opus packet helpers (RFC 6716) and the Opus-in-MPEG-TS framing.

* :class:`Toc` — the table-of-contents byte (RFC 6716 §3.1): mode,
  bandwidth, frame size, stereo flag, frame count code.
* :func:`packet_samples` — an Opus packet's duration in 48 kHz samples
  (§3.1 frame size × §3.2 frame count; code 3 reads the count byte, §3.2.5),
  with the 120 ms limit of §3.2.5 (R5) enforced.
* :class:`OpusControlHeader` / :func:`split_ts_opus` — the access-unit
  framing used inside MPEG-TS PES payloads ("Opus in MPEG-TS", ETSI
  TS 102 366-style control header, as written by FFmpeg's mpegts muxer):
  an 11-bit prefix 0x3FF (bytes ``7F E0`` masked ``FF E0``), flags
  start_trim / end_trim / control_extension, au_size coded as a run of 0xFF
  bytes plus a final byte, optional 16-bit trims (13 significant bits) and
  an optional extension, then au_size bytes of Opus packet.

Malformed data raises :class:`media.errors.BitstreamError`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from media.errors import BitstreamError

__all__ = [
    "OpusMode",
    "Toc",
    "packet_samples",
    "OpusControlHeader",
    "split_ts_opus",
    "wrap_ts_opus",
]


class OpusMode(enum.IntEnum):
    SILK = 0
    HYBRID = 1
    CELT = 2


# Table 2 of RFC 6716 §3.1: config → (mode, bandwidth, frame size in 48 kHz samples).
_SILK_SIZES = (480, 960, 1920, 2880)  # 10, 20, 40, 60 ms
_HYBRID_SIZES = (480, 960)  # 10, 20 ms
_CELT_SIZES = (120, 240, 480, 960)  # 2.5, 5, 10, 20 ms
_BANDWIDTHS = ("NB", "MB", "WB", "SWB", "FB")


def _config(config: int) -> tuple[OpusMode, str, int]:
    if config < 12:
        return OpusMode.SILK, _BANDWIDTHS[config >> 2], _SILK_SIZES[config & 3]
    if config < 16:
        return OpusMode.HYBRID, _BANDWIDTHS[3 + ((config - 12) >> 1)], _HYBRID_SIZES[config & 1]
    bw = (config - 16) >> 2
    return OpusMode.CELT, ("NB", "WB", "SWB", "FB")[bw], _CELT_SIZES[config & 3]


@dataclass(frozen=True, slots=True)
class Toc:
    """The TOC byte of an Opus packet (RFC 6716 §3.1, Figure 1)."""

    config: int
    stereo: bool
    code: int  # frame count code c: 0 one frame, 1 two equal, 2 two different, 3 arbitrary

    @property
    def mode(self) -> OpusMode:
        return _config(self.config)[0]

    @property
    def bandwidth(self) -> str:
        return _config(self.config)[1]

    @property
    def frame_samples(self) -> int:
        """Samples per frame at 48 kHz."""
        return _config(self.config)[2]

    @classmethod
    def parse(cls, packet: bytes) -> Toc:
        if not packet:
            raise BitstreamError("empty Opus packet")
        b = packet[0]
        return cls(config=b >> 3, stereo=bool(b & 0x04), code=b & 0x03)

    def serialize(self) -> bytes:
        return bytes(((self.config << 3) | (int(self.stereo) << 2) | self.code,))

    __bytes__ = serialize


def packet_samples(packet: bytes) -> int:
    """Duration of an Opus packet in 48 kHz samples (RFC 6716 §3.1/§3.2)."""
    toc = Toc.parse(packet)
    size = toc.frame_samples
    if toc.code == 0:
        count = 1
    elif toc.code in (1, 2):
        count = 2
    else:
        # §3.2.5: frame count byte, M in the low 6 bits, M >= 1.
        if len(packet) < 2:
            raise BitstreamError("Opus code 3 packet without frame count byte")
        count = packet[1] & 0x3F
        if count == 0:
            raise BitstreamError("Opus code 3 packet with zero frames")
    total = size * count
    if total > 5760:  # 120 ms, §3.2.5 (R5)
        raise BitstreamError("Opus packet longer than 120 ms")
    return total


@dataclass(frozen=True, slots=True)
class OpusControlHeader:
    """The per-access-unit control header of Opus in MPEG-TS."""

    au_size: int
    start_trim: int | None = None
    end_trim: int | None = None
    extension: bytes | None = None

    @classmethod
    def parse(cls, data: bytes, offset: int = 0) -> tuple[OpusControlHeader, int]:
        """Parse at ``offset``; returns the header and the offset of the Opus
        packet that follows it."""
        n = len(data)
        if n - offset < 3:
            raise BitstreamError("Opus control header truncated")
        if data[offset] != 0x7F or (data[offset + 1] & 0xE0) != 0xE0:
            raise BitstreamError("Opus control header prefix 0x3FF missing")
        flags = data[offset + 1]
        start_flag = flags & 0x10
        end_flag = flags & 0x08
        ext_flag = flags & 0x04
        pos = offset + 2
        size = 0
        while True:
            if pos >= n:
                raise BitstreamError("Opus au_size truncated")
            b = data[pos]
            pos += 1
            size += b
            if b != 0xFF:
                break
        start_trim = end_trim = None
        extension = None
        if start_flag:
            if pos + 2 > n:
                raise BitstreamError("Opus start_trim truncated")
            start_trim = ((data[pos] << 8) | data[pos + 1]) & 0x1FFF
            pos += 2
        if end_flag:
            if pos + 2 > n:
                raise BitstreamError("Opus end_trim truncated")
            end_trim = ((data[pos] << 8) | data[pos + 1]) & 0x1FFF
            pos += 2
        if ext_flag:
            if pos >= n:
                raise BitstreamError("Opus control extension truncated")
            ext_len = data[pos]
            if pos + 1 + ext_len > n:
                raise BitstreamError("Opus control extension truncated")
            extension = bytes(data[pos + 1 : pos + 1 + ext_len])
            pos += 1 + ext_len
        return cls(size, start_trim, end_trim, extension), pos

    def serialize(self) -> bytes:
        flags = 0xE0
        if self.start_trim is not None:
            flags |= 0x10
        if self.end_trim is not None:
            flags |= 0x08
        if self.extension is not None:
            flags |= 0x04
        out = bytearray((0x7F, flags))
        size = self.au_size
        while size >= 255:
            out.append(0xFF)
            size -= 255
        out.append(size)
        if self.start_trim is not None:
            out += (self.start_trim & 0x1FFF).to_bytes(2, "big")
        if self.end_trim is not None:
            out += (self.end_trim & 0x1FFF).to_bytes(2, "big")
        if self.extension is not None:
            if len(self.extension) > 255:
                raise BitstreamError("Opus control extension longer than 255 bytes")
            out.append(len(self.extension))
            out += self.extension
        return bytes(out)

    __bytes__ = serialize


def split_ts_opus(payload: bytes) -> list[tuple[OpusControlHeader, bytes]]:
    """Split a PES payload into (control header, Opus packet) pairs.

    Raises :class:`BitstreamError` when the payload is not an exact sequence
    of control-header-framed access units."""
    out: list[tuple[OpusControlHeader, bytes]] = []
    pos = 0
    n = len(payload)
    while pos < n:
        hdr, start = OpusControlHeader.parse(payload, pos)
        end = start + hdr.au_size
        if end > n:
            raise BitstreamError("Opus access unit runs past the PES payload")
        out.append((hdr, payload[start:end]))
        pos = end
    return out


def wrap_ts_opus(packet: bytes) -> bytes:
    """Frame one Opus packet for MPEG-TS (control header + packet)."""
    return OpusControlHeader(len(packet)).serialize() + bytes(packet)
