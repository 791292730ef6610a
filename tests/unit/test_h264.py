"""H.264 bitstream helpers against bytes captured from ffmpeg/libx264."""

from __future__ import annotations

from pathlib import Path

import pytest

from media.errors import BitstreamError
from media.h264 import (
    BitReader,
    NalType,
    Pps,
    SliceHeader,
    SliceType,
    Sps,
    is_keyframe,
    nal_ranges,
    nal_type,
    scan_access_unit,
    split_nals,
    unescape_rbsp,
)
from media.mpegts import AccessUnit, TsDemuxer

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "ts"

# SPS NAL units captured from libx264 (ffmpeg 5.1, testsrc2, one frame each).
SPS_1080P_HIGH = bytes.fromhex("6764002aacd940780227e5c044000003000400000301903c60c658")
SPS_330X186 = bytes.fromhex("67640015acd941519e493011000003000100000300640f162d96")
SPS_1080I = bytes.fromhex("6764003eacd94078044fde0220000003002000000c83e3c7b2c0")
SPS_BASELINE_360P = bytes.fromhex("6742c01ed900a02ff970110000030001000003003c0f162e48")
SPS_HIGH422_NTSC = bytes.fromhex("677a001ebcd940a03db01100000303e90000bb800f162d96")
PPS_CABAC = bytes.fromhex("68ebe3cb22c0")


def video_units(name: str) -> list[AccessUnit]:
    demux = TsDemuxer()
    data = (FIXTURES / name).read_bytes()
    events = demux.feed(data, 0.0) + demux.flush(0.0)
    return [e for e in events if isinstance(e, AccessUnit) and e.codec == "h264"]


def bits(s: str) -> bytes:
    s = s.replace(" ", "")
    s += "0" * (-len(s) % 8)
    return int(s, 2).to_bytes(len(s) // 8, "big")


class TestBitReader:
    def test_exp_golomb_table_9_2(self):
        # §9.1 Table 9-2: 1 → 0, 010 → 1, 011 → 2, 00100 → 3, 00111 → 6, 0001000 → 7
        r = BitReader(bits("1 010 011 00100 00111 0001000 1"))
        assert [r.ue() for _ in range(6)] == [0, 1, 2, 3, 6, 7]

    def test_signed_exp_golomb_table_9_3(self):
        # codeNum 0,1,2,3,4 → 0, 1, -1, 2, -2
        r = BitReader(bits("1 010 011 00100 00101"))
        assert [r.se() for _ in range(5)] == [0, 1, -1, 2, -2]

    def test_fixed_width_reads(self):
        r = BitReader(b"\xa5\x0f")
        assert r.u(1) == 1
        assert r.u(3) == 0b010
        assert r.u(8) == 0x50
        assert r.bits_left == 4
        assert r.u(4) == 0xF
        with pytest.raises(BitstreamError):
            r.u(1)

    def test_ue_past_end_raises(self):
        with pytest.raises(BitstreamError):
            BitReader(b"\x00\x00").ue()

    def test_emulation_prevention_removed(self):
        assert unescape_rbsp(b"\x00\x00\x03\x01") == b"\x00\x00\x01"
        assert unescape_rbsp(b"\x00\x00\x03\x00\x00\x03") == b"\x00\x00\x00\x00"
        assert unescape_rbsp(b"\x00\x00\x03\x03") == b"\x00\x00\x03"
        assert unescape_rbsp(b"\x12\x34") == b"\x12\x34"


class TestAnnexB:
    def test_split_three_and_four_byte_start_codes(self):
        data = b"\x00\x00\x00\x01\x09\xf0" + b"\x00\x00\x01\x67\x42\x00" + b"\x00\x00\x00\x00\x01\x65\x88\x80"
        assert split_nals(data) == [b"\x09\xf0", b"\x67\x42", b"\x65\x88\x80"]
        assert [nal_type(n) for n in split_nals(data)] == [NalType.AUD, NalType.SPS, NalType.IDR]
        assert is_keyframe(data)

    def test_garbage_before_first_start_code_ignored(self):
        assert nal_ranges(b"\xff\xfe\x00\x00\x01\x41\x9a") == [(5, 7)]
        assert nal_ranges(b"no start code") == []

    def test_forbidden_bit(self):
        with pytest.raises(BitstreamError):
            nal_type(b"\x85")
        with pytest.raises(BitstreamError):
            nal_type(b"")


class TestSps:
    def test_1080p_high_cropping(self):
        sps = Sps.parse(SPS_1080P_HIGH)
        # 1088 coded lines cropped to 1080 (frame_crop_bottom_offset 4 × CropUnitY 2)
        assert (sps.width, sps.height) == (1920, 1080)
        assert sps.profile_idc == 100
        assert sps.profile_level_id == "64002a"
        assert sps.frame_mbs_only
        assert sps.fps == 50.0
        assert sps.max_num_reorder_frames == 2

    def test_odd_size_cropping_both_axes(self):
        sps = Sps.parse(SPS_330X186)
        assert (sps.width, sps.height) == (330, 186)

    def test_interlaced_field_coding(self):
        sps = Sps.parse(SPS_1080I)
        assert not sps.frame_mbs_only
        assert (sps.width, sps.height) == (1920, 1080)

    def test_constrained_baseline(self):
        sps = Sps.parse(SPS_BASELINE_360P)
        assert sps.profile_level_id == "42c01e"
        assert sps.pic_order_cnt_type == 2
        assert sps.max_num_reorder_frames == 0
        assert (sps.width, sps.height, sps.fps) == (640, 360, 30.0)

    def test_high422_chroma_and_ntsc_rate(self):
        sps = Sps.parse(SPS_HIGH422_NTSC)
        assert sps.profile_idc == 122
        assert sps.chroma_format_idc == 2
        assert (sps.width, sps.height) == (640, 480)
        assert sps.fps == pytest.approx(24000 / 1001)

    @pytest.mark.parametrize("cut", [4, 6, 8, 10])
    def test_truncated_sps_raises(self, cut):
        with pytest.raises(BitstreamError):
            Sps.parse(SPS_1080P_HIGH[:cut])

    def test_not_an_sps(self):
        with pytest.raises(BitstreamError):
            Sps.parse(PPS_CABAC)

    def test_sps_from_captured_ts(self):
        units = video_units("h264_aac_zerolatency.ts")
        sps = Sps.parse(units[0].sps)
        assert sps.profile_level_id.startswith("64")
        assert (sps.width, sps.height, sps.fps) == (320, 240, 25.0)


class TestPpsAndSlices:
    def test_pps(self):
        pps = Pps.parse(PPS_CABAC)
        assert (pps.pps_id, pps.sps_id, pps.entropy_coding_mode) == (0, 0, True)

    def test_zerolatency_has_no_b_slices(self):
        kinds = set()
        for au in video_units("h264_aac_zerolatency.ts"):
            info = scan_access_unit(au.data)
            kinds.add(SliceHeader.parse(info.first_slice).kind)
            assert info.keyframe == au.keyframe
        assert SliceType.B not in kinds
        assert {SliceType.I, SliceType.P} <= kinds

    def test_default_x264_has_b_slices(self):
        units = video_units("h264_aac_bframes.ts")
        b = [au for au in units if SliceHeader.parse(scan_access_unit(au.data).first_slice).is_b]
        assert len(b) > len(units) // 3
        assert all(not au.keyframe for au in b)
        assert Sps.parse(units[0].sps).max_num_reorder_frames >= 1

    def test_scan_access_unit_keyframe_carries_parameter_sets(self):
        units = video_units("h264_aac_zerolatency.ts")
        info = scan_access_unit(units[0].data)
        assert info.keyframe and info.has_vcl
        assert info.sps == units[0].sps and info.pps == units[0].pps
        assert scan_access_unit(units[1].data).sps is None

    def test_slice_header_truncated(self):
        with pytest.raises(BitstreamError):
            SliceHeader.parse(b"\x41")
        with pytest.raises(BitstreamError):
            SliceHeader.parse(b"\x67\x00")
