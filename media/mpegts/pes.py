"""PES packet header (ISO/IEC 13818-1 §2.4.3.6/§2.4.3.7, Table 2-21) and a
PES → TS packetizer used to craft test streams.
"""

from __future__ import annotations

from dataclasses import dataclass

from media.errors import TsError
from media.mpegts.psi import ts_packet

__all__ = ["PesHeader", "packetize_pes", "encode_timestamp", "decode_timestamp"]

# stream_ids without the optional PES header (Table 2-21: program_stream_map,
# padding, private_stream_2, ECM, EMM, program_stream_directory, DSMCC,
# H.222.1 type E).
_NO_OPTIONAL_HEADER = frozenset({0xBC, 0xBE, 0xBF, 0xF0, 0xF1, 0xFF, 0xF2, 0xF8})


def decode_timestamp(d: bytes, i: int) -> int:
    """33-bit PTS/DTS from its 5-byte field (§2.4.3.7); marker bits ignored."""
    return (
        (((d[i] >> 1) & 7) << 30)
        | (d[i + 1] << 22)
        | ((d[i + 2] >> 1) << 15)
        | (d[i + 3] << 7)
        | (d[i + 4] >> 1)
    )


def encode_timestamp(prefix: int, ts: int) -> bytes:
    ts &= (1 << 33) - 1
    return bytes(
        (
            (prefix << 4) | (((ts >> 30) & 7) << 1) | 1,
            (ts >> 22) & 0xFF,
            (((ts >> 15) & 0x7F) << 1) | 1,
            (ts >> 7) & 0xFF,
            ((ts & 0x7F) << 1) | 1,
        )
    )


@dataclass(frozen=True, slots=True)
class PesHeader:
    stream_id: int
    pts: int | None = None
    dts: int | None = None
    packet_length: int = 0  # PES_packet_length: bytes after this field; 0 = unbounded
    header_length: int = 9  # bytes before the PES payload
    data_alignment: bool = False

    @classmethod
    def parse(cls, d: bytes) -> PesHeader:
        if len(d) < 6 or d[0] != 0 or d[1] != 0 or d[2] != 1:
            raise TsError("PES packet_start_code_prefix missing")
        sid = d[3]
        length = (d[4] << 8) | d[5]
        if sid in _NO_OPTIONAL_HEADER:
            return cls(sid, None, None, length, 6)
        if len(d) < 9:
            raise TsError("PES header truncated")
        if (d[6] & 0xC0) != 0x80:
            raise TsError("PES optional header marker '10' missing")
        flags = d[7] >> 6
        hl = d[8]
        off = 9 + hl
        if off > len(d):
            raise TsError("PES_header_data_length runs past the data")
        if length and off > 6 + length:
            raise TsError("PES header longer than PES_packet_length")
        pts = dts = None
        if flags == 1:
            raise TsError("PTS_DTS_flags '01' is forbidden")
        if flags & 2:
            if hl < 5:
                raise TsError("PES header too short for PTS")
            pts = decode_timestamp(d, 9)
        if flags == 3:
            if hl < 10:
                raise TsError("PES header too short for DTS")
            dts = decode_timestamp(d, 14)
        return cls(sid, pts, dts, length, off, bool(d[6] & 0x04))

    def serialize(self, payload_length: int | None = None) -> bytes:
        """Header bytes; ``payload_length`` sets PES_packet_length (None or
        too large for 16 bits: 0, unbounded — allowed for video only)."""
        opt = b""
        flags = 0
        if self.pts is not None:
            if self.dts is not None and self.dts != self.pts:
                opt = encode_timestamp(3, self.pts) + encode_timestamp(1, self.dts)
                flags = 0xC0
            else:
                opt = encode_timestamp(2, self.pts)
                flags = 0x80
        length = 0
        if payload_length is not None:
            length = 3 + len(opt) + payload_length
            if length > 0xFFFF:
                length = 0
        return (
            b"\x00\x00\x01"
            + bytes((self.stream_id, length >> 8, length & 0xFF, 0x84 if self.data_alignment else 0x80, flags, len(opt)))
            + opt
        )


def packetize_pes(
    pid: int,
    pes: bytes,
    cc: int = 0,
    *,
    pcr: int | None = None,
    random_access: bool = False,
) -> tuple[list[bytes], int]:
    """Cut a whole PES packet into TS packets the way FFmpeg does: the first
    carries PUSI (and optionally a PCR / random_access_indicator), the last
    is padded with adaptation-field stuffing. Returns (packets, next cc)."""
    packets: list[bytes] = []
    pos = 0
    first = True
    n = len(pes)
    while pos < n or first:
        af = None
        if first and (pcr is not None or random_access):
            flags = (0x40 if random_access else 0) | (0x10 if pcr is not None else 0)
            af = bytes((flags,))
            if pcr is not None:
                base, ext = divmod(pcr, 300)
                af += (base << 15 | 0x3F << 9 | ext).to_bytes(6, "big")
        room = 184 - (len(af) + 1 if af is not None else 0)
        chunk = pes[pos : pos + room]
        packets.append(ts_packet(pid, chunk, cc=cc, pusi=first, adaptation=af))
        cc = (cc + 1) & 15
        pos += len(chunk)
        first = False
    return packets, cc
