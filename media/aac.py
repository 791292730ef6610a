"""AAC helpers: ADTS headers and AudioSpecificConfig (ISO/IEC 14496-3).

* :class:`AdtsHeader` — adts_fixed_header + adts_variable_header
  (14496-3 §1.A.2.2, Table 1.A.5/1.A.6), parse and serialize.
* :func:`split_adts` — cut a buffer of concatenated ADTS frames into frames,
  resynchronising on the 0xFFF syncword after garbage.
* :func:`audio_specific_config` — the 2-byte AudioSpecificConfig
  (14496-3 §1.6.2.1) for SDP ``config=`` / MP4 / decoder extradata.

Malformed data raises :class:`media.errors.BitstreamError`.
"""

from __future__ import annotations

from dataclasses import dataclass

from media.errors import BitstreamError

__all__ = [
    "SAMPLE_RATES",
    "AdtsHeader",
    "split_adts",
    "audio_specific_config",
    "sample_rate_index",
]

#: samplingFrequencyIndex → Hz (14496-3 §1.6.3.4, Table 1.18); 13, 14 reserved.
SAMPLE_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)


def sample_rate_index(rate: int) -> int:
    try:
        return SAMPLE_RATES.index(rate)
    except ValueError:
        raise BitstreamError(f"sample rate {rate} has no AAC sampling frequency index") from None


@dataclass(frozen=True, slots=True)
class AdtsHeader:
    """One ADTS frame header."""

    mpeg_version: int  # ID bit: 0 = MPEG-4, 1 = MPEG-2
    protection_absent: bool
    profile: int  # profile_ObjectType: audio object type - 1 (1 = AAC LC)
    sampling_frequency_index: int
    channel_configuration: int
    frame_length: int  # whole frame, header included
    buffer_fullness: int
    raw_data_blocks: int  # number_of_raw_data_blocks_in_frame + 1

    @property
    def header_length(self) -> int:
        return 7 if self.protection_absent else 9

    @property
    def sample_rate(self) -> int:
        return SAMPLE_RATES[self.sampling_frequency_index]

    @property
    def object_type(self) -> int:
        return self.profile + 1

    @property
    def channels(self) -> int:
        # channel_configuration 7 means 8 channels (7.1), Table 1.19.
        return 8 if self.channel_configuration == 7 else self.channel_configuration

    @property
    def samples(self) -> int:
        """PCM samples per channel in this frame (1024 per raw data block)."""
        return 1024 * self.raw_data_blocks

    @classmethod
    def parse(cls, data: bytes, offset: int = 0) -> AdtsHeader:
        if len(data) - offset < 7:
            raise BitstreamError("ADTS header truncated")
        b0, b1, b2, b3, b4, b5, b6 = data[offset : offset + 7]
        if b0 != 0xFF or (b1 & 0xF0) != 0xF0:
            raise BitstreamError("ADTS syncword missing")
        if b1 & 0x06:
            raise BitstreamError("ADTS layer is not 0")
        sfi = (b2 >> 2) & 0x0F
        if sfi >= len(SAMPLE_RATES):
            raise BitstreamError("reserved ADTS sampling_frequency_index")
        protection_absent = bool(b1 & 1)
        length = ((b3 & 0x03) << 11) | (b4 << 3) | (b5 >> 5)
        if length < (7 if protection_absent else 9):
            raise BitstreamError("ADTS frame_length shorter than its header")
        return cls(
            mpeg_version=(b1 >> 3) & 1,
            protection_absent=protection_absent,
            profile=b2 >> 6,
            sampling_frequency_index=sfi,
            channel_configuration=((b2 & 1) << 2) | (b3 >> 6),
            frame_length=length,
            buffer_fullness=((b5 & 0x1F) << 6) | (b6 >> 2),
            raw_data_blocks=(b6 & 0x03) + 1,
        )

    def serialize(self) -> bytes:
        """The 7-byte header (CRC, when protection_absent is 0, is not
        computed here: the caller appends it)."""
        if not 0 < self.raw_data_blocks <= 4 or not 0 <= self.frame_length < 1 << 13:
            raise BitstreamError("ADTS field out of range")
        b1 = 0xF0 | (self.mpeg_version << 3) | int(self.protection_absent)
        b2 = (self.profile << 6) | (self.sampling_frequency_index << 2) | (self.channel_configuration >> 2)
        b3 = ((self.channel_configuration & 3) << 6) | (self.frame_length >> 11)
        b4 = (self.frame_length >> 3) & 0xFF
        b5 = ((self.frame_length & 7) << 5) | (self.buffer_fullness >> 6)
        b6 = ((self.buffer_fullness & 0x3F) << 2) | (self.raw_data_blocks - 1)
        return bytes((0xFF, b1, b2, b3, b4, b5, b6))

    __bytes__ = serialize

    def audio_specific_config(self) -> bytes:
        return audio_specific_config(self.object_type, self.sample_rate, self.channel_configuration)


def split_adts(data: bytes) -> tuple[list[tuple[AdtsHeader, bytes]], int]:
    """Split concatenated ADTS frames.

    Returns ``(frames, skipped)``: each frame as (header, whole frame bytes
    including the header), and how many bytes were skipped while looking for
    a syncword (garbage, or a frame cut short at the end of the buffer).
    """
    frames: list[tuple[AdtsHeader, bytes]] = []
    skipped = 0
    pos = 0
    n = len(data)
    while pos < n:
        if n - pos >= 7 and data[pos] == 0xFF and (data[pos + 1] & 0xF6) == 0xF0:
            try:
                hdr = AdtsHeader.parse(data, pos)
            except BitstreamError:
                hdr = None
            if hdr is not None and pos + hdr.frame_length <= n:
                frames.append((hdr, data[pos : pos + hdr.frame_length]))
                pos += hdr.frame_length
                continue
        nxt = data.find(b"\xff", pos + 1)
        if nxt < 0:
            nxt = n
        skipped += nxt - pos
        pos = nxt
    return frames, skipped


def audio_specific_config(object_type: int, sample_rate: int, channel_configuration: int) -> bytes:
    """AudioSpecificConfig (14496-3 §1.6.2.1) for object types < 31 with a
    tabled sample rate: 5 bits audioObjectType, 4 bits
    samplingFrequencyIndex, 4 bits channelConfiguration, then
    GASpecificConfig's frameLengthFlag, dependsOnCoreCoder and extensionFlag
    all 0 (§4.4.1)."""
    if not 0 < object_type < 31:
        raise BitstreamError("audio object type out of range")
    if not 0 <= channel_configuration < 16:
        raise BitstreamError("channel configuration out of range")
    sfi = sample_rate_index(sample_rate)
    v = (object_type << 11) | (sfi << 7) | (channel_configuration << 3)
    return v.to_bytes(2, "big")
