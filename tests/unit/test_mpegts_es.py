"""AAC (ADTS) and Opus helpers used by the demuxer, on captured frames."""

from __future__ import annotations

from pathlib import Path

import pytest

from media.aac import AdtsHeader, audio_specific_config, split_adts
from media.errors import BitstreamError
from media.mpegts import AccessUnit, TsDemuxer
from media.opus import OpusControlHeader, OpusMode, Toc, packet_samples, split_ts_opus, wrap_ts_opus

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "ts"


def audio(name: str, codec: str) -> list[AccessUnit]:
    demux = TsDemuxer()
    events = demux.feed((FIXTURES / name).read_bytes(), 0.0) + demux.flush(0.0)
    return [e for e in events if isinstance(e, AccessUnit) and e.codec == codec]


class TestAdts:
    def test_captured_stereo_48k(self):
        frames = audio("h264_aac_zerolatency.ts", "aac")
        hdr = AdtsHeader.parse(frames[0].data)
        assert (hdr.sample_rate, hdr.channels, hdr.object_type, hdr.samples) == (48000, 2, 2, 1024)
        assert all(AdtsHeader.parse(f.data).frame_length == len(f.data) for f in frames)
        # ISO 14496-3 Table 1.16: AAC LC, index 3 (48 kHz), 2 channels → 0x1190
        assert hdr.audio_specific_config() == bytes.fromhex("1190")

    def test_captured_mono_44k1(self):
        hdr = AdtsHeader.parse(audio("h264_aac_bframes.ts", "aac")[0].data)
        assert (hdr.sample_rate, hdr.channels) == (44100, 1)
        assert audio_specific_config(2, 44100, 1) == bytes.fromhex("1208")

    def test_serialize_round_trip(self):
        data = audio("h264_aac_zerolatency.ts", "aac")[3].data
        hdr = AdtsHeader.parse(data)
        assert hdr.serialize() == data[:7]

    def test_split_with_garbage(self):
        frames = [f.data for f in audio("h264_aac_zerolatency.ts", "aac")[:4]]
        buf = b"\x00\x11" + frames[0] + frames[1] + b"\xff\x00junk" + frames[2] + frames[3][:-3]
        got, skipped = split_adts(buf)
        assert [f for _, f in got] == frames[:3]
        assert skipped == 2 + 6 + len(frames[3]) - 3

    @pytest.mark.parametrize("bad", [b"\xff\xf1", b"\x00" * 7, b"\xff\xf1\x7c\x80\x00\x00\x00", b"\xff\xf7\x50\x80\x20\x00\xfc"])
    def test_invalid_headers(self, bad):
        with pytest.raises(BitstreamError):
            AdtsHeader.parse(bad)


class TestOpus:
    def test_toc_table(self):
        # RFC 6716 §3.1 Table 2
        assert Toc.parse(bytes([0 << 3])).frame_samples == 480  # SILK NB 10 ms
        assert Toc.parse(bytes([3 << 3])).frame_samples == 2880  # SILK NB 60 ms
        assert Toc.parse(bytes([13 << 3])).mode == OpusMode.HYBRID
        assert Toc.parse(bytes([13 << 3])).frame_samples == 960
        assert Toc.parse(bytes([16 << 3])).frame_samples == 120  # CELT 2.5 ms
        assert Toc.parse(bytes([31 << 3 | 4])).bandwidth == "FB"
        assert Toc.parse(bytes([31 << 3 | 4])).stereo

    def test_packet_durations(self):
        assert packet_samples(bytes([31 << 3 | 0])) == 960
        assert packet_samples(bytes([31 << 3 | 1, 0])) == 1920
        assert packet_samples(bytes([31 << 3 | 2, 0])) == 1920
        assert packet_samples(bytes([31 << 3 | 3, 6])) == 5760  # 6 × 20 ms = 120 ms
        with pytest.raises(BitstreamError):
            packet_samples(bytes([31 << 3 | 3, 7]))  # 140 ms > 120 ms
        with pytest.raises(BitstreamError):
            packet_samples(bytes([31 << 3 | 3]))
        with pytest.raises(BitstreamError):
            packet_samples(b"")

    def test_captured_libopus_packets(self):
        packets = audio("h264_opus.ts", "opus")
        assert all(packet_samples(p.data) == 960 for p in packets)
        assert all(Toc.parse(p.data).stereo for p in packets)

    def test_control_header_round_trip(self):
        for size in (0, 1, 254, 255, 256, 600):
            for trims in ((None, None), (312, None), (None, 100), (5, 6)):
                hdr = OpusControlHeader(size, *trims, extension=b"ab" if size == 600 else None)
                raw = hdr.serialize()
                back, off = OpusControlHeader.parse(raw + b"x" * size)
                assert back == hdr and off == len(raw)

    def test_split_ts_opus(self):
        a, b = bytes([31 << 3]) + b"\x01" * 300, bytes([31 << 3]) + b"\x02" * 10
        payload = wrap_ts_opus(a) + wrap_ts_opus(b)
        assert [p for _, p in split_ts_opus(payload)] == [a, b]
        with pytest.raises(BitstreamError):
            split_ts_opus(payload[:-1])
        with pytest.raises(BitstreamError):
            split_ts_opus(b"\x7f\x00\x01x")
