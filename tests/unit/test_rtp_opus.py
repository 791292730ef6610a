"""Opus RTP payload (RFC 7587)."""

from __future__ import annotations

import fractions

import pytest

from media.errors import RtpError
from media.rtp.opus import OPUS_CLOCK_RATE, OpusPacketizer, depacketize_opus
from media.rtp.packet import RtpPacket
from media.rtp.rewrite import Rewriter, TrackParams


def test_one_packet_per_payload_48khz_timestamps_no_marker() -> None:
    pk = OpusPacketizer(initial_seq=65535)
    frames = [bytes((0xFC,)) + bytes((i,)) * 60 for i in range(3)]  # TOC: CELT FB 20 ms
    out = [pk.packetize(f, 0x1_0000_0000 - 960 + i * 960) for i, f in enumerate(frames)]
    assert [p.seq for p in out] == [65535, 0, 1]
    assert [p.timestamp for p in out] == [0xFFFFFC40, 0, 960]
    assert [p.payload for p in out] == frames
    assert not any(p.marker for p in out) and all(p.keyframe_start for p in out)
    assert [p.discontinuity for p in out] == [True, False, False]
    pk.restart()
    assert pk.packetize(frames[0], 0).discontinuity and pk.next_seq == 3
    assert OPUS_CLOCK_RATE == 48000


def test_invalid_packets() -> None:
    with pytest.raises(RtpError):
        OpusPacketizer().packetize(b"", 0)
    with pytest.raises(RtpError):
        OpusPacketizer().packetize(b"\x00" * 70000, 0)
    with pytest.raises(RtpError):
        depacketize_opus(b"")


def test_real_opus_through_rewriter_decodes() -> None:
    av = pytest.importorskip("av")
    np = pytest.importorskip("numpy")
    enc = av.CodecContext.create("libopus", "w")
    enc.sample_rate, enc.layout, enc.format = 48000, "stereo", "s16"
    enc.time_base = fractions.Fraction(1, 48000)
    t = np.arange(960 * 10) / 48000
    pcm = (np.sin(2 * np.pi * 440 * t) * 8000).astype(np.int16)
    packets = []
    for k in range(10):
        frame = av.AudioFrame.from_ndarray(np.repeat(pcm[None, k * 960:(k + 1) * 960], 2, 0).reshape(1, -1),
                                           format="s16", layout="stereo")
        frame.sample_rate, frame.pts = 48000, k * 960
        packets += [(bytes(p), p.pts) for p in enc.encode(frame)]
    assert packets
    pk = OpusPacketizer()
    rw = Rewriter(TrackParams(ssrc=7, payload_type=111, clock_rate=48000), initial_seq=0, initial_ts=0)
    dec = av.CodecContext.create("opus", "r")
    decoded = 0
    last_ts = None
    for data, pts in packets:
        wire = rw.rewrite(0, pk.packetize(data, pts), 0.02)
        rtp = RtpPacket.parse(wire)
        if last_ts is not None:
            assert rtp.timestamp - last_ts == 960
        last_ts = rtp.timestamp
        for frame in dec.decode(av.Packet(depacketize_opus(rtp.payload))):
            decoded += frame.samples
    assert decoded >= 960 * (len(packets) - 1)
