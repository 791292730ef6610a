"""AAC → Opus transcoder on real AAC from ffmpeg (lavfi sine)."""

from __future__ import annotations

import asyncio
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from media.mpegts import AccessUnit, TsDemuxer
from media.opus import Toc, packet_samples
from media.transcode import AacToOpus, OpusPacket, TranscodeWorker, run_in_executor

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "ts"


def aac_frames(name: str) -> list[AccessUnit]:
    demux = TsDemuxer()
    events = demux.feed((FIXTURES / name).read_bytes(), 0.0) + demux.flush(0.0)
    return [e for e in events if isinstance(e, AccessUnit) and e.codec == "aac"]


def decode(packets: list[OpusPacket], layout: str) -> np.ndarray:
    dec = av.CodecContext.create("opus", "r")
    dec.layout = layout
    dec.sample_rate = 48000
    chunks = []
    for p in packets:
        for f in dec.decode(av.Packet(p.data)):
            chunks.append(f.to_ndarray().reshape(-1, f.samples))
    return np.concatenate(chunks, axis=1)


def dominant_hz(signal: np.ndarray) -> float:
    mono = signal.mean(axis=0)[4800:]  # skip the start-up
    spectrum = np.abs(np.fft.rfft(mono * np.hanning(len(mono))))
    return float(np.fft.rfftfreq(len(mono), 1 / 48000)[spectrum.argmax()])


@pytest.mark.parametrize(
    "name, in_rate, channels, tone",
    [("h264_aac_zerolatency.ts", 48000, 2, 440.0), ("h264_aac_bframes.ts", 44100, 1, 1000.0)],
)
def test_transcode_duration_channels_and_signal(name, in_rate, channels, tone):
    frames = aac_frames(name)
    t = AacToOpus()
    packets = t.process(frames) + t.flush()
    assert t.decode_errors == 0 and t.resets == 0
    assert t.channels == channels
    assert all(Toc.parse(p.data).stereo == (channels == 2) for p in packets)
    assert all(packet_samples(p.data) == 960 for p in packets)
    # 48 kHz timeline, continuous, anchored at the first AAC PTS (minus libopus look-ahead)
    assert {b.pts - a.pts for a, b in zip(packets, packets[1:])} == {960}
    # (libopus look-ahead: 120 samples with the default application=lowdelay)
    assert abs(packets[0].pts - (frames[0].pts * 8 // 15 - 120)) <= 1
    pcm = decode(packets, "stereo" if channels == 2 else "mono")
    assert pcm.shape[0] == channels
    in_seconds = len(frames) * 1024 / in_rate
    out_seconds = (pcm.shape[1] - 120) / 48000  # decoder output includes the pre-skip
    assert abs(out_seconds - in_seconds) <= 0.040
    assert dominant_hz(pcm) == pytest.approx(tone, abs=5)
    assert np.abs(pcm).max() > 0.05  # real audio, not silence


def _adts(raw: bytes, rate: int, channels: int) -> bytes:
    """ADTS header (ISO/IEC 14496-3 §1.A.2.2, AAC-LC, no CRC) + one raw AAC frame."""
    index = {48000: 3, 44100: 4}[rate]
    n = len(raw) + 7
    return bytes((0xFF, 0xF1, (1 << 6) | (index << 2) | (channels >> 2), ((channels & 3) << 6) | (n >> 11),
                  (n >> 3) & 0xFF, ((n & 7) << 5) | 0x1F, 0xFC)) + raw


@pytest.mark.parametrize("rate, channels, application, frame_ms", [
    (48000, 2, "lowdelay", 20), (44100, 1, "lowdelay", 20), (48000, 2, "audio", 20), (48000, 1, "lowdelay", 10)])
def test_output_pts_put_the_sound_where_the_aac_pts_said(rate, channels, application, frame_ms):
    """A noise burst at AAC PTS P comes out of the Opus at 48 kHz timestamp
    P × 8/15, decoded as WebRTC does (no pre-skip): the AAC encoder's priming
    (its packets' PTS start 1024 samples early, as in an MPEG-TS), the
    resampler and libopus's look-ahead are all in the stamped PTS, so audio
    and video of one PTS can be presented together (lip sync)."""
    rng = np.random.default_rng(7)
    signal = np.zeros(rate * 2, dtype=np.float32)
    burst = rng.uniform(-0.5, 0.5, rate // 20).astype(np.float32)
    signal[rate:rate + len(burst)] = burst  # at 1.0 s
    layout = "mono" if channels == 1 else "stereo"
    enc = av.CodecContext.create("aac", "w")
    enc.sample_rate, enc.layout, enc.format = rate, layout, "fltp"
    enc.time_base, enc.bit_rate = Fraction(1, rate), 128000
    enc.open()
    packets = []
    for i in range(0, len(signal), 1024):
        frame = av.AudioFrame.from_ndarray(np.tile(signal[i:i + 1024], (channels, 1)), format="fltp", layout=layout)
        frame.sample_rate, frame.pts, frame.time_base = rate, i, Fraction(1, rate)
        packets += enc.encode(frame)
    packets += enc.encode(None)
    assert packets[0].pts == -1024  # the encoder's priming, carried in the PTS
    origin = 900000  # 90 kHz PTS of input sample 0 (10 s)
    t = AacToOpus(application=application, frame_ms=frame_ms)
    out = t.process([(_adts(bytes(p), rate, channels), origin + int(p.pts) * 90000 // rate) for p in packets])
    out += t.flush()
    timeline = np.zeros(out[-1].pts - out[0].pts + 2000, dtype=np.float32)
    pcm = decode(out, layout).mean(axis=0)
    at = 0
    for p in out:  # each packet's samples at its PTS
        n = packet_samples(p.data)
        timeline[p.pts - out[0].pts:p.pts - out[0].pts + n] = pcm[at:at + n]
        at += n
    ref = np.interp(np.arange(len(burst) * 48000 // rate) * rate / 48000, np.arange(len(burst)), burst)
    expected = origin * 8 // 15 + 48000 - out[0].pts  # the burst's 48 kHz PTS, relative to the first packet
    window = timeline[expected - 2000:expected + len(ref) + 2000]
    lag = int(np.argmax(np.correlate(window, ref.astype(np.float32), mode="valid"))) - 2000
    assert abs(lag) <= 2, f"the sound is {lag} samples away from its PTS"


def test_pts_jump_restarts_pipeline():
    frames = aac_frames("h264_aac_zerolatency.ts")
    first, second = frames[:40], frames[40:80]
    t = AacToOpus()
    out = t.process((f.data, f.pts) for f in first)
    out += t.process((f.data, f.pts + 90000) for f in second)  # a 1 s gap (publisher reconnect)
    out += t.flush()
    assert t.resets == 1
    jumps = [b.pts - a.pts for a, b in zip(out, out[1:]) if b.pts - a.pts != 960]
    assert len(jumps) == 1 and 47000 < jumps[0] < 49500


def test_garbage_frames_are_counted_not_raised():
    frames = aac_frames("h264_aac_zerolatency.ts")[:20]
    t = AacToOpus()
    bad = [(b"\x00\x01\x02", frames[5].pts), (frames[6].data[:7] + b"\x00" * 50, frames[6].pts)]
    out = t.process([(f.data, f.pts) for f in frames[:5]] + bad + [(f.data, f.pts) for f in frames[7:]])
    out += t.flush()
    assert t.decode_errors >= 1
    assert len(out) > 15


async def test_worker_batches_in_executor():
    frames = aac_frames("h264_aac_zerolatency.ts")
    expected = AacToOpus().process(frames)
    received: list[OpusPacket] = []
    worker = TranscodeWorker(AacToOpus(), received.extend)
    worker.start()
    for f in frames:
        worker.push(f)
        if f.pts % 7 == 0:
            await asyncio.sleep(0)
    await worker.stop()
    assert worker.dropped == 0 and 1 <= worker.batches <= len(frames)
    assert [p.pts for p in received[: len(expected)]] == [p.pts for p in expected]
    assert len(received) >= len(expected)
    direct = await run_in_executor(AacToOpus(), frames[:10])
    assert len(direct) >= 8


async def test_worker_drops_oldest_when_overloaded():
    frames = aac_frames("h264_aac_zerolatency.ts")
    worker = TranscodeWorker(AacToOpus(), lambda p: None, max_pending=10)
    for f in frames[:30]:  # not started: nothing drains
        worker.push(f)
    assert worker.dropped == 20
    worker.start()
    await worker.stop()
    assert worker.transcoder.frames_in == 10


def test_unsupported_settings_are_refused():
    from media.errors import LocalMediaError

    with pytest.raises(LocalMediaError):
        AacToOpus(frame_ms=15)
    with pytest.raises(LocalMediaError):
        AacToOpus(application="music")
