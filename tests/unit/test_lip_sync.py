"""Lip sync: a viewer's audio and video sender reports describe one clock.

A browser plays audio and video of one MediaStream in sync by mapping each
track's RTP timestamps to NTP time through that track's sender reports
(RFC 3550 §6.4.1). So for one viewer, the (NTP, RTP) pairs of the video SR
(90 kHz) and of the audio SR (48 kHz Opus) must put frames of equal PTS at
the same NTP time — although the Opus, transcoded from AAC, reaches the
fan-out tens of milliseconds after the video of the same PTS, arrival jitter
differs per track, and a layer switch re-bases the viewer's video timestamps.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

from media.mpegts import AccessUnit, ProgramChanged, TsDemuxer
from media.rtp.packet import LayerPacket, RtpPacket
from media.rtp.rewrite import Rewriter, TrackParams
from media.rtp.rtcp import SenderReport
from media.stream import SourceInfo, StreamHub
from media.transcode import AacToOpus
from media.webrtc.fanout import AUDIO, StreamFanout

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "ts"
WALL = 1_800_000_000.0  # Unix time at monotonic 0 in these tests
TRANSCODE_DELAY = 0.065  # AAC frame + resampler + Opus frame, wall clock


@dataclasses.dataclass
class Timed:
    """A transcoded Opus packet as the stream sees it, with its publish time."""

    data: bytes
    pts: int
    dts: int
    arrival: float
    codec: str = "opus"
    clock_rate: int = 48000
    keyframe: bool = True


class Viewer:
    """The two rewriters of one WHEP viewer, fed by the fan-out as WhepSession is."""

    def __init__(self, rng: random.Random) -> None:
        self.video = Rewriter(TrackParams(ssrc=1, payload_type=102, clock_rate=90000), initial_layer=1,
                              initial_seq=rng.getrandbits(16), initial_ts=rng.getrandbits(32))
        self.audio = Rewriter(TrackParams(ssrc=2, payload_type=111, clock_rate=48000), initial_layer=AUDIO,
                              initial_seq=rng.getrandbits(16), initial_ts=rng.getrandbits(32))
        # kind → (media seconds, viewer RTP timestamp) of the newest packet sent
        self.last: dict[str, tuple[float, int]] = {}
        self.media: dict[int, dict[int, float]] = {}  # layer → layer ts → media seconds

    def on_layers_changed(self, layers: list[str]) -> None:
        pass

    def on_packets(self, index: int, packets: list[LayerPacket], now: float) -> None:
        rw = self.audio if index == AUDIO else self.video
        if index != AUDIO and index not in (rw.current_layer, rw.target_layer):
            return
        for p in packets:
            data = rw.rewrite(index, p, now)
            if data is not None:
                kind = "audio" if index == AUDIO else "video"
                self.last[kind] = (self.media[index][p.timestamp], RtpPacket.parse(data).timestamp)

    def on_stream_ended(self) -> None:
        pass


def ntp_of(sr: SenderReport, rtp_ts: int, rate: int) -> float:
    """NTP seconds of an RTP timestamp by one SR (what the receiver computes)."""
    delta = (rtp_ts - sr.rtp_timestamp) & 0xFFFFFFFF
    if delta >= 1 << 31:
        delta -= 1 << 32
    return sr.ntp_timestamp / 2**32 + delta / rate


def skew(viewer: Viewer, now: float, anchors: Any) -> float:
    """Seconds by which the viewer would play audio after video of the same PTS."""
    wall = WALL + now
    v_sr = viewer.video.sender_report(now, wall, anchors)
    a_sr = viewer.audio.sender_report(now, wall, anchors)
    (v_media, v_ts), (a_media, a_ts) = viewer.last["video"], viewer.last["audio"]
    v_ntp, a_ntp = ntp_of(v_sr, v_ts, 90000), ntp_of(a_sr, a_ts, 48000)
    # Same media time → same NTP time: compare after removing the PTS difference.
    return (a_ntp - a_media) - (v_ntp - v_media)


def run_simulcast_source(seed: int) -> list[tuple[float, float]]:
    """ffmpeg's simulcast TS (two H.264 PIDs + AAC) through the hub, the AAC
    through the real transcoder, into one viewer that switches layers.
    Returns (skew with the stream's clock, skew extrapolated from arrivals)
    at each sender report tick."""
    rng = random.Random(seed)
    demux = TsDemuxer()
    events = demux.feed((FIXTURES / "simulcast.ts").read_bytes(), 0.0) + demux.flush(0.0)
    units = [e for e in events if isinstance(e, AccessUnit) and e.pts is not None]
    pts0 = min(u.pts for u in units)
    clock = [0.0]
    stream = StreamHub().get_or_create("sync")
    pub = stream.attach_publisher(SourceInfo("srt", "192.0.2.1:5000"), now=0.0)
    pub.set_program(next(e.pmt for e in events if isinstance(e, ProgramChanged)))
    fanout = StreamFanout(stream, clock=lambda: clock[0])
    fanout.start()
    viewer = Viewer(rng)
    transcoder = AacToOpus()
    # Publish in arrival order: video 10 ms after its PTS (+ up to 15 ms of
    # jitter), Opus TRANSCODE_DELAY after its PTS (+ jitter of its own).
    timeline: list[tuple[float, Any]] = []
    for u in units:
        media = (u.pts - pts0) / 90000
        if u.codec == "aac":
            for p in transcoder.process([u]):
                at = 1.0 + (p.pts - pts0 * 8 // 15) / 48000 + TRANSCODE_DELAY + rng.uniform(0, 0.015)
                timeline.append((at, Timed(p.data, p.pts, p.pts, at)))
        else:
            at = 1.0 + media + 0.010 + rng.uniform(0, 0.015)
            timeline.append((at, dataclasses.replace(u, arrival=at)))
    timeline.sort(key=lambda item: item[0])
    attached = False
    switched = False
    next_tick = 1.5
    skews = []
    for at, unit in timeline:
        clock[0] = at
        if not attached and fanout.layers and len(fanout.layers) == 2:
            fanout.attach(viewer, 1, at)
            attached = True
        if isinstance(unit, Timed):
            viewer.media.setdefault(AUDIO, {})[unit.pts & 0xFFFFFFFF] = unit.pts / 48000
        else:
            for index in range(2):
                viewer.media.setdefault(index, {})[unit.pts & 0xFFFFFFFF] = unit.pts / 90000
        pub.publish(unit)
        if attached and not switched and at > 1.5:
            viewer.video.request_switch(0)  # takes effect at the low layer's next keyframe
            switched = True
        if at >= next_tick and "video" in viewer.last and "audio" in viewer.last:
            skews.append((skew(viewer, at, fanout.anchors()), skew(viewer, at, None)))
            next_tick += 0.2
    assert viewer.video.switches == 1 and viewer.video.current_layer == 0
    fanout.close()
    return skews


def test_sender_reports_put_audio_and_video_of_equal_pts_at_one_ntp_time() -> None:
    for seed in range(3):
        skews = run_simulcast_source(seed)
        assert len(skews) >= 5
        synced = [s for s, _ in skews]
        # Within a 48 kHz tick plus rounding, before and after the layer switch.
        assert max(abs(s) for s in synced) < 0.0005, synced
        # The arrival-based mapping (last packet extrapolated) would tell the
        # browser to play the audio a transcoding delay late: the scenario
        # above discriminates.
        naive = [n for _, n in skews]
        assert min(naive) > TRANSCODE_DELAY - 0.030, naive


def test_tracks_on_unrelated_clocks_keep_their_own_arrival_base() -> None:
    """WHIP: each SSRC's RTP timestamps start at random, so audio PTS say
    nothing about video PTS; such a track is anchored on its own arrivals."""
    stream = StreamHub().get_or_create("whip")
    pub = stream.attach_publisher(SourceInfo("whip", "192.0.2.1:5000"), now=0.0)
    clock = [0.0]
    fanout = StreamFanout(stream, clock=lambda: clock[0])
    fanout.start()
    demux = TsDemuxer()
    events = demux.feed((FIXTURES / "h264_opus.ts").read_bytes(), 0.0) + demux.flush(0.0)
    pub.set_program(next(e.pmt for e in events if isinstance(e, ProgramChanged)))
    units = [e for e in events if isinstance(e, AccessUnit) and e.pts is not None]
    pts0 = min(u.pts for u in units)
    far = 3_000_000_000  # audio PTS origin ~9 h away from the video's
    for u in sorted(units, key=lambda u: u.pts):
        at = 1.0 + (u.pts - pts0) / 90000 + (0.05 if u.codec == "opus" else 0.0)
        clock[0] = at
        pts = u.pts + far if u.codec == "opus" else u.pts
        pub.publish(dataclasses.replace(u, pts=pts, dts=pts, arrival=at))
    anchors = fanout.anchors()
    video = anchors[0]
    audio = anchors[AUDIO]
    # Each anchor puts its latest frame at its own arrival.
    last_video = max(u.pts for u in units if u.codec == "h264")
    last_audio = max(u.pts for u in units if u.codec == "opus")
    assert video.timestamp == last_video & 0xFFFFFFFF
    assert abs(video.at - (1.0 + (last_video - pts0) / 90000)) < 1e-6
    assert audio.timestamp == (last_audio + far) * 48000 // 90000 & 0xFFFFFFFF
    assert abs(audio.at - (1.05 + (last_audio - pts0) / 90000)) < 1e-3
    fanout.close()


def test_anchors_follow_the_pts_wrap_and_a_source_clock_reset() -> None:
    """The 33-bit MPEG-TS PTS wraps every 26.5 h: the presentation clock goes
    on (no 26.5 h jump in the sender reports); a source that resets its
    timestamps moves every track to its new clock together."""
    stream = StreamHub().get_or_create("wrap")
    clock = [0.0]
    fanout = StreamFanout(stream, clock=lambda: clock[0])
    demux = TsDemuxer()
    events = demux.feed((FIXTURES / "h264_opus.ts").read_bytes(), 0.0) + demux.flush(0.0)
    units = sorted((e for e in events if isinstance(e, AccessUnit) and e.pts is not None), key=lambda u: u.pts)
    pts0 = units[0].pts
    start = (1 << 33) - 45000  # half a second before the wrap
    pub = stream.attach_publisher(SourceInfo("srt", "192.0.2.1:5000"), now=0.0)
    pub.set_program(next(e.pmt for e in events if isinstance(e, ProgramChanged)))
    fanout.start()
    for u in units:
        at = 1.0 + (u.pts - pts0) / 90000
        clock[0] = at
        pts = (u.pts - pts0 + start) & ((1 << 33) - 1)
        pub.publish(dataclasses.replace(u, pts=pts, dts=pts, arrival=at))
    last = units[-1].pts - pts0
    anchors = fanout.anchors()
    # Every anchor still says "presented at its arrival" after the wrap.
    assert abs(anchors[0].at - (1.0 + max(u.pts - pts0 for u in units if u.codec == "h264") / 90000)) < 1e-6
    assert abs(anchors[AUDIO].at - (1.0 + max(u.pts - pts0 for u in units if u.codec == "opus") / 90000)) < 1e-3
    assert last > 45000  # the run crossed the wrap
    # The source resets its timestamps (announced for the video only, as an
    # SRT source's TS discontinuity is): both tracks move to the new clock.
    pub.discontinuity()
    jump = 5_000_000
    for u in units:
        at = 10.0 + (u.pts - pts0) / 90000
        clock[0] = at
        pts = u.pts + jump
        pub.publish(dataclasses.replace(u, pts=pts, dts=pts, arrival=at))
    anchors = fanout.anchors()
    assert abs(anchors[0].at - (10.0 + max(u.pts - pts0 for u in units if u.codec == "h264") / 90000)) < 1e-6
    assert abs(anchors[AUDIO].at - (10.0 + max(u.pts - pts0 for u in units if u.codec == "opus") / 90000)) < 1e-3
    fanout.close()
