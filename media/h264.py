"""H.264 / AVC bitstream helpers (ITU-T H.264 (08/2021)).

What the forwarding path needs, and nothing that requires decoding:

* Annex-B byte stream splitting (Annex B.1) with ``bytes.find`` so the scan
  runs at C speed: :func:`nal_ranges`, :func:`split_nals`.
* NAL unit header (§7.3.1): :class:`NalType`.
* Exp-Golomb bit reader over RBSP with emulation-prevention bytes removed
  (§7.4.1, §9.1): :class:`BitReader`, :func:`unescape_rbsp`.
* Sequence parameter set (§7.3.2.1.1 and VUI, Annex E.1.1): :class:`Sps`
  (profile/constraint flags/level, cropped resolution, frame_mbs_only,
  pic_order_cnt_type, VUI frame rate, max_num_reorder_frames) and the SDP
  ``profile-level-id`` (RFC 6184 §8.1).
* Picture parameter set ids (§7.3.2.2): :class:`Pps`.
* Slice header prefix (§7.3.3) for the slice type, so B-slices can be
  detected: :class:`SliceHeader`.
* Access-unit summary in one pass (:func:`scan_access_unit`): keyframe (IDR,
  nal_unit_type 5), SPS/PPS carried, first slice type.

Malformed data raises :class:`media.errors.BitstreamError`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from media.errors import BitstreamError

__all__ = [
    "NalType",
    "SliceType",
    "BitReader",
    "unescape_rbsp",
    "nal_ranges",
    "split_nals",
    "nal_type",
    "Sps",
    "Pps",
    "SliceHeader",
    "AuInfo",
    "scan_access_unit",
    "is_keyframe",
    "VCL_NAL_TYPES",
]

_START = b"\x00\x00\x01"


class NalType(enum.IntEnum):
    """nal_unit_type values, Table 7-1."""

    UNSPECIFIED = 0
    SLICE = 1  # coded slice of a non-IDR picture
    SLICE_DPA = 2
    SLICE_DPB = 3
    SLICE_DPC = 4
    IDR = 5  # coded slice of an IDR picture
    SEI = 6
    SPS = 7
    PPS = 8
    AUD = 9
    END_OF_SEQUENCE = 10
    END_OF_STREAM = 11
    FILLER = 12
    SPS_EXT = 13
    PREFIX = 14
    SUBSET_SPS = 15
    SLICE_AUX = 19
    SLICE_EXT = 20


#: Video coding layer NAL unit types (Table 7-1, "VCL" column).
VCL_NAL_TYPES = frozenset({1, 2, 3, 4, 5})


class SliceType(enum.IntEnum):
    """slice_type % 5, Table 7-6."""

    P = 0
    B = 1
    I = 2  # noqa: E741 - the standard's name
    SP = 3
    SI = 4


# --------------------------------------------------------------------------
# Annex-B splitting
# --------------------------------------------------------------------------


def nal_ranges(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of every NAL unit payload in an Annex-B buffer.

    Start codes (``00 00 01`` and ``00 00 00 01``) are excluded; trailing zero
    bytes before the next start code (trailing_zero_8bits, B.1.1) are
    stripped. Bytes before the first start code are ignored. Empty NAL units
    are skipped.
    """
    ranges: list[tuple[int, int]] = []
    find = data.find
    pos = find(_START)
    n = len(data)
    while pos >= 0:
        start = pos + 3
        nxt = find(_START, start)
        end = n if nxt < 0 else nxt
        while end > start and data[end - 1] == 0:
            end -= 1
        if end > start:
            ranges.append((start, end))
        pos = nxt
    return ranges


def split_nals(data: bytes) -> list[bytes]:
    """The NAL units (without start codes) of an Annex-B buffer."""
    return [data[s:e] for s, e in nal_ranges(data)]


def nal_type(nal: bytes) -> int:
    """nal_unit_type of a NAL unit (§7.3.1); raises on an empty unit or a set
    forbidden_zero_bit."""
    if not nal:
        raise BitstreamError("empty NAL unit")
    b = nal[0]
    if b & 0x80:
        raise BitstreamError("forbidden_zero_bit set in NAL header")
    return b & 0x1F


def is_keyframe(data: bytes) -> bool:
    """True when the Annex-B access unit contains an IDR slice (type 5)."""
    for s, _e in nal_ranges(data):
        if data[s] & 0x1F == 5:
            return True
    return False


# --------------------------------------------------------------------------
# Bit reader
# --------------------------------------------------------------------------


def unescape_rbsp(nal_payload: bytes) -> bytes:
    """Remove emulation_prevention_three_byte (§7.4.1): ``00 00 03`` →
    ``00 00``. A non-overlapping left-to-right replace is exact because the
    zero count restarts after each removed 03."""
    if b"\x00\x00\x03" not in nal_payload:
        return bytes(nal_payload)
    return bytes(nal_payload).replace(b"\x00\x00\x03", b"\x00\x00")


class BitReader:
    """MSB-first bit reader with Exp-Golomb codes (§9.1) over RBSP bytes.

    The whole buffer is held as one Python int, so reads are shifts and
    masks; reading past the end raises :class:`BitstreamError`.
    """

    __slots__ = ("_value", "_nbits", "_pos")

    def __init__(self, rbsp: bytes) -> None:
        self._value = int.from_bytes(rbsp, "big")
        self._nbits = len(rbsp) * 8
        self._pos = 0

    @property
    def position(self) -> int:
        return self._pos

    @property
    def bits_left(self) -> int:
        return self._nbits - self._pos

    def u(self, n: int) -> int:
        """Read n bits as an unsigned integer (u(n))."""
        if n == 0:
            return 0
        end = self._pos + n
        if end > self._nbits:
            raise BitstreamError("read past end of RBSP")
        self._pos = end
        return (self._value >> (self._nbits - end)) & ((1 << n) - 1)

    def flag(self) -> bool:
        return bool(self.u(1))

    def skip(self, n: int) -> None:
        if self._pos + n > self._nbits:
            raise BitstreamError("skip past end of RBSP")
        self._pos += n

    def ue(self) -> int:
        """Unsigned Exp-Golomb ue(v), §9.1."""
        left = self._nbits - self._pos
        rest = self._value & ((1 << left) - 1)
        if rest == 0:
            raise BitstreamError("Exp-Golomb code runs past end of RBSP")
        leading = left - rest.bit_length()
        if leading > 31:
            raise BitstreamError("Exp-Golomb code longer than 32 bits")
        self._pos += leading
        return self.u(leading + 1) - 1

    def se(self) -> int:
        """Signed Exp-Golomb se(v), §9.1.1 (Table 9-3)."""
        k = self.ue()
        return (k + 1) >> 1 if k & 1 else -(k >> 1)


# --------------------------------------------------------------------------
# SPS
# --------------------------------------------------------------------------

# profile_idc values that carry chroma_format_idc etc. (§7.3.2.1.1)
_HIGH_PROFILES = frozenset({100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135})


def _skip_scaling_list(r: BitReader, size: int) -> None:
    # §7.3.2.1.1.1
    last = 8
    nxt = 8
    for _ in range(size):
        if nxt != 0:
            delta = r.se()
            if not -128 <= delta <= 127:
                raise BitstreamError("delta_scale out of range")
            nxt = (last + delta + 256) % 256
        last = last if nxt == 0 else nxt


def _skip_hrd(r: BitReader) -> None:
    # Annex E.1.2
    cpb_cnt = r.ue() + 1
    if cpb_cnt > 32:
        raise BitstreamError("cpb_cnt_minus1 out of range")
    r.skip(8)  # bit_rate_scale, cpb_size_scale
    for _ in range(cpb_cnt):
        r.ue()
        r.ue()
        r.skip(1)
    r.skip(20)  # four 5-bit length fields


@dataclass(frozen=True, slots=True)
class Sps:
    """A parsed sequence parameter set (the fields the server uses)."""

    profile_idc: int
    constraint_flags: int  # the whole constraint_set0..5 byte incl. reserved bits
    level_idc: int
    sps_id: int
    chroma_format_idc: int
    bit_depth_luma: int
    pic_order_cnt_type: int
    max_num_ref_frames: int
    frame_mbs_only: bool
    width: int
    height: int
    fps: float | None  # from VUI timing_info, None when absent
    fixed_frame_rate: bool
    max_num_reorder_frames: int | None  # from VUI bitstream_restriction

    @property
    def profile_level_id(self) -> str:
        """RFC 6184 §8.1 profile-level-id: 6 hex digits, e.g. "640028"."""
        return f"{self.profile_idc:02x}{self.constraint_flags:02x}{self.level_idc:02x}"

    @classmethod
    def parse(cls, nal: bytes) -> Sps:
        """Parse an SPS NAL unit (with its 1-byte NAL header, no start code)."""
        if len(nal) < 4 or nal[0] & 0x1F != NalType.SPS:
            raise BitstreamError("not an SPS NAL unit")
        r = BitReader(unescape_rbsp(nal[1:]))
        profile_idc = r.u(8)
        constraint = r.u(8)
        level_idc = r.u(8)
        sps_id = r.ue()
        if sps_id > 31:
            raise BitstreamError("seq_parameter_set_id out of range")
        chroma_format_idc = 1
        separate_colour_plane = False
        bit_depth_luma = 8
        if profile_idc in _HIGH_PROFILES:
            chroma_format_idc = r.ue()
            if chroma_format_idc > 3:
                raise BitstreamError("chroma_format_idc out of range")
            if chroma_format_idc == 3:
                separate_colour_plane = r.flag()
            bit_depth_luma = r.ue() + 8
            r.ue()  # bit_depth_chroma_minus8
            r.skip(1)  # qpprime_y_zero_transform_bypass_flag
            if r.flag():  # seq_scaling_matrix_present_flag
                for i in range(8 if chroma_format_idc != 3 else 12):
                    if r.flag():
                        _skip_scaling_list(r, 16 if i < 6 else 64)
        r.ue()  # log2_max_frame_num_minus4
        poc_type = r.ue()
        if poc_type == 0:
            r.ue()  # log2_max_pic_order_cnt_lsb_minus4
        elif poc_type == 1:
            r.skip(1)  # delta_pic_order_always_zero_flag
            r.se()
            r.se()
            cycle = r.ue()
            if cycle > 255:
                raise BitstreamError("num_ref_frames_in_pic_order_cnt_cycle out of range")
            for _ in range(cycle):
                r.se()
        elif poc_type != 2:
            raise BitstreamError("pic_order_cnt_type out of range")
        max_num_ref_frames = r.ue()
        r.skip(1)  # gaps_in_frame_num_value_allowed_flag
        width_mbs = r.ue() + 1
        height_map_units = r.ue() + 1
        frame_mbs_only = r.flag()
        if not frame_mbs_only:
            r.skip(1)  # mb_adaptive_frame_field_flag
        r.skip(1)  # direct_8x8_inference_flag
        crop_l = crop_r = crop_t = crop_b = 0
        if r.flag():  # frame_cropping_flag
            crop_l, crop_r, crop_t, crop_b = r.ue(), r.ue(), r.ue(), r.ue()
        # Cropping units, equations 7-19 .. 7-22 and Table 6-1.
        chroma_array_type = 0 if separate_colour_plane else chroma_format_idc
        if chroma_array_type == 0:
            crop_unit_x = 1
            crop_unit_y = 2 - frame_mbs_only
        else:
            sub_w = 1 if chroma_format_idc == 3 else 2
            sub_h = 2 if chroma_format_idc == 1 else 1
            crop_unit_x = sub_w
            crop_unit_y = sub_h * (2 - frame_mbs_only)
        width = width_mbs * 16 - crop_unit_x * (crop_l + crop_r)
        height = (2 - frame_mbs_only) * height_map_units * 16 - crop_unit_y * (crop_t + crop_b)
        if width <= 0 or height <= 0:
            raise BitstreamError("cropping larger than the coded picture")

        fps: float | None = None
        fixed = False
        reorder: int | None = None
        if r.bits_left > 0 and r.flag():  # vui_parameters_present_flag
            fps, fixed, reorder = cls._parse_vui(r)
        return cls(
            profile_idc=profile_idc,
            constraint_flags=constraint,
            level_idc=level_idc,
            sps_id=sps_id,
            chroma_format_idc=chroma_format_idc,
            bit_depth_luma=bit_depth_luma,
            pic_order_cnt_type=poc_type,
            max_num_ref_frames=max_num_ref_frames,
            frame_mbs_only=frame_mbs_only,
            width=width,
            height=height,
            fps=fps,
            fixed_frame_rate=fixed,
            max_num_reorder_frames=reorder,
        )

    @staticmethod
    def _parse_vui(r: BitReader) -> tuple[float | None, bool, int | None]:
        # Annex E.1.1
        if r.flag():  # aspect_ratio_info_present_flag
            if r.u(8) == 255:  # Extended_SAR
                r.skip(32)
        if r.flag():  # overscan_info_present_flag
            r.skip(1)
        if r.flag():  # video_signal_type_present_flag
            r.skip(4)  # video_format, video_full_range_flag
            if r.flag():  # colour_description_present_flag
                r.skip(24)
        if r.flag():  # chroma_loc_info_present_flag
            r.ue()
            r.ue()
        fps: float | None = None
        fixed = False
        if r.flag():  # timing_info_present_flag
            num_units_in_tick = r.u(32)
            time_scale = r.u(32)
            fixed = r.flag()
            if num_units_in_tick and time_scale:
                # One frame = two field ticks (E.2.1, equation C-1 with
                # DeltaTfiDivisor 2 for frame pictures).
                fps = time_scale / (2 * num_units_in_tick)
        nal_hrd = r.flag()
        if nal_hrd:
            _skip_hrd(r)
        vcl_hrd = r.flag()
        if vcl_hrd:
            _skip_hrd(r)
        if nal_hrd or vcl_hrd:
            r.skip(1)  # low_delay_hrd_flag
        r.skip(1)  # pic_struct_present_flag
        reorder: int | None = None
        if r.flag():  # bitstream_restriction_flag
            r.skip(1)  # motion_vectors_over_pic_boundaries_flag
            r.ue()  # max_bytes_per_pic_denom
            r.ue()  # max_bits_per_mb_denom
            r.ue()  # log2_max_mv_length_horizontal
            r.ue()  # log2_max_mv_length_vertical
            reorder = r.ue()  # max_num_reorder_frames
            r.ue()  # max_dec_frame_buffering
        return fps, fixed, reorder


@dataclass(frozen=True, slots=True)
class Pps:
    """The identifying fields of a picture parameter set (§7.3.2.2)."""

    pps_id: int
    sps_id: int
    entropy_coding_mode: bool  # True = CABAC

    @classmethod
    def parse(cls, nal: bytes) -> Pps:
        if len(nal) < 2 or nal[0] & 0x1F != NalType.PPS:
            raise BitstreamError("not a PPS NAL unit")
        r = BitReader(unescape_rbsp(nal[1:9]))
        pps_id = r.ue()
        sps_id = r.ue()
        if pps_id > 255 or sps_id > 31:
            raise BitstreamError("parameter set id out of range")
        return cls(pps_id=pps_id, sps_id=sps_id, entropy_coding_mode=r.flag())


@dataclass(frozen=True, slots=True)
class SliceHeader:
    """The first three fields of a slice header (§7.3.3)."""

    first_mb_in_slice: int
    slice_type: int  # raw value 0..9
    pps_id: int

    @property
    def kind(self) -> SliceType:
        return SliceType(self.slice_type % 5)

    @property
    def is_b(self) -> bool:
        return self.slice_type % 5 == SliceType.B

    @classmethod
    def parse(cls, nal: bytes) -> SliceHeader:
        if len(nal) < 2 or (nal[0] & 0x1F) not in VCL_NAL_TYPES:
            raise BitstreamError("not a slice NAL unit")
        # 16 bytes hold the three ue(v) values with plenty to spare.
        r = BitReader(unescape_rbsp(nal[1:17]))
        first_mb = r.ue()
        slice_type = r.ue()
        if slice_type > 9:
            raise BitstreamError("slice_type out of range")
        pps_id = r.ue()
        if pps_id > 255:
            raise BitstreamError("pic_parameter_set_id out of range")
        return cls(first_mb_in_slice=first_mb, slice_type=slice_type, pps_id=pps_id)


@dataclass(frozen=True, slots=True)
class AuInfo:
    """What one pass over an Annex-B access unit tells."""

    keyframe: bool  # contains an IDR slice
    has_vcl: bool  # contains at least one slice NAL unit
    sps: bytes | None  # last SPS NAL unit in the AU (no start code)
    pps: bytes | None  # last PPS NAL unit in the AU (no start code)
    first_slice: bytes | None  # first slice NAL unit, for SliceHeader.parse
    nal_count: int


def scan_access_unit(data: bytes) -> AuInfo:
    """Summarise an Annex-B access unit without copying slice data."""
    keyframe = False
    has_vcl = False
    sps = pps = first_slice = None
    ranges = nal_ranges(data)
    for s, e in ranges:
        t = data[s] & 0x1F
        if t in VCL_NAL_TYPES:
            if t == 5:
                keyframe = True
            if not has_vcl:
                has_vcl = True
                first_slice = data[s : min(e, s + 17)]
        elif t == 7:
            sps = data[s:e]
        elif t == 8:
            pps = data[s:e]
    return AuInfo(keyframe, has_vcl, sps, pps, first_slice, len(ranges))
