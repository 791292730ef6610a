"""Program-specific information: PAT and PMT sections (ISO/IEC 13818-1).

* :class:`Section` — the long-form section header shared by PAT and PMT
  (§2.4.4.4, §2.4.4.8) with the CRC_32 check (§2.4.4.10, Annex A).
* :class:`Pat` — program_association_section (§2.4.4.3, Table 2-30).
* :class:`Pmt` / :class:`PmtTrack` / :class:`Descriptor` —
  TS_program_map_section (§2.4.4.8, Table 2-33), with the codec of each
  elementary stream derived from stream_type (Table 2-34) and, for
  stream_type 0x06, the registration descriptor (§2.6.8, tag 5).
* :func:`packetize_section` — cut a section into 188-byte TS packets with a
  pointer_field (§2.4.4.2) and 0xFF stuffing; used to craft streams.

Parsing raises :class:`media.errors.TsError`; the demuxer counts those.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from media.errors import TsError
from media.mpegts.crc import crc32_mpeg2

__all__ = [
    "TableId",
    "StreamType",
    "Section",
    "Pat",
    "Descriptor",
    "PmtTrack",
    "Pmt",
    "packetize_section",
    "ts_packet",
]


class TableId(enum.IntEnum):
    """table_id assignments, Table 2-31."""

    PAT = 0x00
    CAT = 0x01
    PMT = 0x02


class StreamType(enum.IntEnum):
    """stream_type values the server understands, Table 2-34."""

    MPEG1_AUDIO = 0x03
    MPEG2_AUDIO = 0x04
    PRIVATE_PES = 0x06  # PES packets with private data (Opus, AC-3 in DVB ...)
    AAC_ADTS = 0x0F
    AAC_LATM = 0x11
    H264 = 0x1B
    HEVC = 0x24


_CODEC_BY_STREAM_TYPE = {StreamType.H264: "h264", StreamType.AAC_ADTS: "aac", StreamType.HEVC: "hevc"}
_KIND_BY_CODEC = {"h264": "video", "hevc": "video", "aac": "audio", "opus": "audio"}

# Descriptor tags (Table 2-45; 0x7F is the DVB extension descriptor, EN 300 468 §6.2.16).
TAG_REGISTRATION = 0x05
TAG_LANGUAGE = 0x0A
TAG_DVB_EXTENSION = 0x7F
DVB_EXT_OPUS = 0x80  # Opus audio descriptor inside the DVB extension descriptor


@dataclass(frozen=True, slots=True)
class Section:
    """A long-form PSI section, CRC checked."""

    table_id: int
    table_id_extension: int  # transport_stream_id (PAT) or program_number (PMT)
    version: int
    current_next: bool
    section_number: int
    last_section_number: int
    body: bytes  # the bytes between the 8-byte header and the CRC

    @classmethod
    def parse(cls, data: bytes) -> Section:
        """Parse one complete section (exactly 3 + section_length bytes)."""
        if len(data) < 12:
            raise TsError("PSI section shorter than its fixed fields")
        table_id = data[0]
        if not data[1] & 0x80:
            raise TsError("section_syntax_indicator is 0 in a PAT/PMT section")
        length = ((data[1] & 0x0F) << 8) | data[2]
        if length > 1021:
            raise TsError("section_length larger than 1021")  # §2.4.4.5
        if len(data) != 3 + length:
            raise TsError("section size does not match section_length")
        if crc32_mpeg2(data) != 0:
            raise TsError("PSI section CRC_32 mismatch")
        return cls(
            table_id=table_id,
            table_id_extension=(data[3] << 8) | data[4],
            version=(data[5] >> 1) & 0x1F,
            current_next=bool(data[5] & 1),
            section_number=data[6],
            last_section_number=data[7],
            body=bytes(data[8:-4]),
        )

    def serialize(self) -> bytes:
        length = 5 + len(self.body) + 4
        if length > 1021:
            raise TsError("section too long")
        head = bytes(
            (
                self.table_id,
                0xB0 | (length >> 8),
                length & 0xFF,
                self.table_id_extension >> 8,
                self.table_id_extension & 0xFF,
                0xC0 | (self.version << 1) | int(self.current_next),
                self.section_number,
                self.last_section_number,
            )
        )
        data = head + self.body
        return data + crc32_mpeg2(data).to_bytes(4, "big")

    __bytes__ = serialize


@dataclass(frozen=True, slots=True)
class Pat:
    """Program association table: program_number → program_map_PID."""

    transport_stream_id: int
    version: int
    programs: tuple[tuple[int, int], ...]  # (program_number, pmt_pid); program 0 (NIT) excluded
    network_pid: int | None = None

    @classmethod
    def from_sections(cls, sections: list[Section]) -> Pat:
        programs: list[tuple[int, int]] = []
        network_pid = None
        for sec in sections:
            if sec.table_id != TableId.PAT:
                raise TsError(f"table_id 0x{sec.table_id:02x} on the PAT PID")
            body = sec.body
            if len(body) % 4:
                raise TsError("PAT program loop not a multiple of 4 bytes")
            for i in range(0, len(body), 4):
                number, pid = struct.unpack_from(">HH", body, i)
                pid &= 0x1FFF
                if number == 0:
                    network_pid = pid
                else:
                    programs.append((number, pid))
        first = sections[0]
        return cls(first.table_id_extension, first.version, tuple(programs), network_pid)

    @classmethod
    def parse(cls, section: bytes) -> Pat:
        return cls.from_sections([Section.parse(section)])

    def serialize(self) -> bytes:
        body = bytearray()
        if self.network_pid is not None:
            body += struct.pack(">HH", 0, 0xE000 | self.network_pid)
        for number, pid in self.programs:
            body += struct.pack(">HH", number, 0xE000 | pid)
        return Section(TableId.PAT, self.transport_stream_id, self.version, True, 0, 0, bytes(body)).serialize()

    __bytes__ = serialize


@dataclass(frozen=True, slots=True)
class Descriptor:
    tag: int
    data: bytes

    def serialize(self) -> bytes:
        return bytes((self.tag, len(self.data))) + self.data

    __bytes__ = serialize


def _parse_descriptors(data: bytes) -> tuple[Descriptor, ...]:
    out = []
    pos = 0
    n = len(data)
    while pos < n:
        if pos + 2 > n:
            raise TsError("descriptor header truncated")
        tag = data[pos]
        length = data[pos + 1]
        if pos + 2 + length > n:
            raise TsError("descriptor runs past its loop")
        out.append(Descriptor(tag, bytes(data[pos + 2 : pos + 2 + length])))
        pos += 2 + length
    return tuple(out)


@dataclass(frozen=True, slots=True)
class PmtTrack:
    """One elementary stream of a program."""

    pid: int
    stream_type: int
    codec: str | None  # 'h264', 'aac', 'opus', 'hevc', or None when not recognised
    descriptors: tuple[Descriptor, ...] = ()

    @property
    def kind(self) -> str:
        """'video', 'audio' or 'other'."""
        return _KIND_BY_CODEC.get(self.codec or "", "other")

    @property
    def registration(self) -> bytes | None:
        """format_identifier of the registration descriptor (§2.6.8)."""
        for d in self.descriptors:
            if d.tag == TAG_REGISTRATION and len(d.data) >= 4:
                return d.data[:4]
        return None

    @property
    def language(self) -> str | None:
        """ISO 639 language code (§2.6.18) when present."""
        for d in self.descriptors:
            if d.tag == TAG_LANGUAGE and len(d.data) >= 3:
                return d.data[:3].decode("latin-1")
        return None

    @property
    def opus_channel_config(self) -> int | None:
        """channel_config_code of the DVB Opus audio descriptor (ETSI
        TS 102 366-style extension descriptor ``7F 02 80 cc``)."""
        for d in self.descriptors:
            if d.tag == TAG_DVB_EXTENSION and len(d.data) >= 2 and d.data[0] == DVB_EXT_OPUS:
                return d.data[1]
        return None


def codec_for(stream_type: int, descriptors: tuple[Descriptor, ...], program_registration: bytes | None) -> str | None:
    codec = _CODEC_BY_STREAM_TYPE.get(stream_type)
    if codec is not None:
        return codec
    if stream_type == StreamType.PRIVATE_PES:
        regs = [d.data[:4] for d in descriptors if d.tag == TAG_REGISTRATION and len(d.data) >= 4]
        if b"Opus" in regs or (not regs and program_registration == b"Opus"):
            return "opus"
    return None


@dataclass(frozen=True, slots=True)
class Pmt:
    """Program map table of one program."""

    program_number: int
    version: int
    pcr_pid: int
    descriptors: tuple[Descriptor, ...] = ()
    tracks: tuple[PmtTrack, ...] = field(default=())
    pmt_pid: int | None = None  # the PID it was carried on, when known

    @property
    def pids(self) -> frozenset[int]:
        return frozenset(t.pid for t in self.tracks)

    def track(self, pid: int) -> PmtTrack | None:
        for t in self.tracks:
            if t.pid == pid:
                return t
        return None

    @property
    def video_tracks(self) -> tuple[PmtTrack, ...]:
        return tuple(t for t in self.tracks if t.kind == "video")

    @property
    def audio_tracks(self) -> tuple[PmtTrack, ...]:
        return tuple(t for t in self.tracks if t.kind == "audio")

    @classmethod
    def from_section(cls, sec: Section, pmt_pid: int | None = None) -> Pmt:
        if sec.table_id != TableId.PMT:
            raise TsError(f"table_id 0x{sec.table_id:02x} on a PMT PID")
        body = sec.body
        if len(body) < 4:
            raise TsError("PMT body truncated")
        pcr_pid = ((body[0] & 0x1F) << 8) | body[1]
        info_len = ((body[2] & 0x0F) << 8) | body[3]
        if 4 + info_len > len(body):
            raise TsError("program_info_length runs past the section")
        prog_desc = _parse_descriptors(body[4 : 4 + info_len])
        prog_reg = next((d.data[:4] for d in prog_desc if d.tag == TAG_REGISTRATION and len(d.data) >= 4), None)
        pos = 4 + info_len
        tracks = []
        seen: set[int] = set()
        while pos < len(body):
            if pos + 5 > len(body):
                raise TsError("PMT elementary stream entry truncated")
            stream_type = body[pos]
            pid = ((body[pos + 1] & 0x1F) << 8) | body[pos + 2]
            es_len = ((body[pos + 3] & 0x0F) << 8) | body[pos + 4]
            if pos + 5 + es_len > len(body):
                raise TsError("ES_info_length runs past the section")
            desc = _parse_descriptors(body[pos + 5 : pos + 5 + es_len])
            pos += 5 + es_len
            if pid in seen or pid < 0x10 or pid == 0x1FFF:
                raise TsError(f"PMT lists invalid or duplicate elementary PID {pid}")
            seen.add(pid)
            tracks.append(PmtTrack(pid, stream_type, codec_for(stream_type, desc, prog_reg), desc))
        return cls(sec.table_id_extension, sec.version, pcr_pid, prog_desc, tuple(tracks), pmt_pid)

    @classmethod
    def parse(cls, section: bytes, pmt_pid: int | None = None) -> Pmt:
        return cls.from_section(Section.parse(section), pmt_pid)

    def serialize(self) -> bytes:
        prog = b"".join(d.serialize() for d in self.descriptors)
        body = bytearray(struct.pack(">HH", 0xE000 | self.pcr_pid, 0xF000 | len(prog)))
        body += prog
        for t in self.tracks:
            es = b"".join(d.serialize() for d in t.descriptors)
            body += struct.pack(">BHH", t.stream_type, 0xE000 | t.pid, 0xF000 | len(es))
            body += es
        return Section(TableId.PMT, self.program_number, self.version, True, 0, 0, bytes(body)).serialize()

    __bytes__ = serialize


def ts_packet(
    pid: int,
    payload: bytes,
    *,
    cc: int,
    pusi: bool = False,
    adaptation: bytes | None = None,
    stuff: bool = True,
) -> bytes:
    """Build one 188-byte TS packet (§2.4.3.2).

    ``adaptation`` is the adaptation field body after its length byte (flags
    first); when ``stuff`` is true a short payload is padded with
    adaptation-field stuffing (0xFF), as muxers do for the last packet of a
    PES."""
    if adaptation is None and not (stuff and len(payload) < 184):
        af = b""
    else:
        body = adaptation if adaptation is not None else b""
        if stuff:
            total = 184 - len(payload)  # adaptation field bytes, length byte included
            if total < 1 + len(body):
                raise TsError("payload and adaptation field do not fit one packet")
            if total >= 2 and not body:
                body = b"\x00"  # flags byte, stuffing follows
            body = body + b"\xff" * (total - 1 - len(body))
        af = bytes((len(body),)) + body
    room = 184 - len(af)
    if len(payload) > room:
        raise TsError("payload does not fit one packet")
    afc = (2 if af else 0) | (1 if payload else 0)
    if afc == 0:
        afc = 1
    head = bytes((0x47, (0x40 if pusi else 0) | (pid >> 8), pid & 0xFF, (afc << 4) | (cc & 15)))
    pkt = head + af + payload
    if len(pkt) < 188:
        pkt += b"\xff" * (188 - len(pkt))
    return pkt


def packetize_section(pid: int, section: bytes, cc: int = 0) -> list[bytes]:
    """Cut one section into TS packets: pointer_field 0 in the first, 0xFF
    filling the last (§2.4.4.2)."""
    data = b"\x00" + section
    packets = []
    first = True
    while data:
        chunk, data = data[:184], data[184:]
        if len(chunk) < 184:
            chunk = chunk + b"\xff" * (184 - len(chunk))
        packets.append(ts_packet(pid, chunk, cc=cc, pusi=first, stuff=False))
        cc = (cc + 1) & 15
        first = False
    return packets
