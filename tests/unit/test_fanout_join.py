"""A viewer joining mid-GOP (media/webrtc/fanout.py, explicit clock).

Drives a real :class:`~media.stream.Stream` and :class:`StreamFanout` with a
recording sink: the join replay is paced at the policy's rate, live packets
queue behind it in order, what was replayed stays retransmittable after the
shared 1 s history has dropped it, a source that can make a keyframe is
asked for one instead, and the layer's next keyframe ends a replay early.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from media.rtp.packet import LayerPacket
from media.stream import SourceInfo, StreamHub
from media.webrtc.fanout import JoinPolicy, StreamFanout

FPS = 25
FRAME_BYTES = 5000  # 5 kB a frame at 25 fps: 1 Mbit/s


@dataclass(frozen=True)
class Unit:
    codec: str
    pts: int
    keyframe: bool
    data: bytes
    dts: int | None = None
    pid: int | None = None


def au(i: int, key: bool) -> Unit:
    nal = bytes([0x65 if key else 0x41]) + bytes([i & 0xFF]) * (FRAME_BYTES - 1)
    return Unit("h264", i * 90000 // FPS, key, b"\x00\x00\x00\x01" + nal)


class Sink:
    def __init__(self) -> None:
        self.sent: list[tuple[float, LayerPacket]] = []
        self.layers: list[str] = []

    def on_packets(self, index: int, packets: list[LayerPacket], now: float) -> None:
        if index >= 0:
            self.sent += [(now, p) for p in packets]

    def on_layers_changed(self, layers: list[str]) -> None:
        self.layers = layers

    def on_stream_ended(self) -> None:
        pass

    def bytes_until(self, t: float) -> int:
        return sum(len(p.payload) for at, p in self.sent if at <= t)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def setup(frames: int, *, keyframe_requests: int | None = None, policy: JoinPolicy = JoinPolicy()):
    clock = Clock()
    hub = StreamHub()
    stream = hub.get_or_create("s")
    pub = stream.attach_publisher(SourceInfo("whip"), now=clock.now)
    asked: list[str] = []

    def request_keyframe(name: str) -> int:
        asked.append(name)
        return keyframe_requests or 0

    fo = StreamFanout(stream, clock=clock, join=policy,
                      request_keyframe=None if keyframe_requests is None else request_keyframe)
    fo.start()
    for i in range(frames):
        clock.now += 1 / FPS
        pub.publish(au(i, i == 0))
    return clock, pub, fo, asked


def test_long_gop_join_is_paced_and_live_queues_behind_in_order() -> None:
    policy = JoinPolicy()
    clock, pub, fo, _ = setup(20 * FPS)  # one keyframe, 20 s: 2.5 MB cached
    gop = fo.gop_packets(0)
    gop_bytes = sum(len(p.payload) for p in gop)
    sink = Sink()
    t0 = clock.now
    fo.attach(sink, 0, t0)
    # The keyframe at once (the picture starts now), never the whole GOP.
    key = [p for p in gop[:next(i for i, p in enumerate(gop) if p.marker) + 1]]
    assert [p for _, p in sink.sent] == key
    key_bytes = sum(len(p.payload) for p in key)
    frame = 20 * FPS
    while len(sink.sent) < 3 * len(gop) and clock.now < t0 + 30:
        clock.now += policy.tick
        if round((clock.now - t0) / policy.tick) % 8 == 0:  # a live frame every 40 ms
            pub.publish(au(frame, False))
            frame += 1
        fo.pump_replays(clock.now)
        elapsed = clock.now - t0
        rate = max(4 * gop_bytes * 8 / 20, policy.min_bps)  # speedup × the layer's bitrate, at least min_bps
        assert sink.bytes_until(clock.now) <= key_bytes + rate / 8 * elapsed + 4 * rate / 8 * policy.tick + 1300
    seqs = [p.seq for _, p in sink.sent]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "one run, in order, nothing lost or repeated"
    assert sink.sent[0][1].keyframe_start and fo.stats.joins_replayed == 1
    # Caught up (4× the layer's rate against 1×): once the queue is empty,
    # live packets go straight to the viewer.
    assert not fo.pump_replays(clock.now)
    before = len(sink.sent)
    pub.publish(au(frame, False))
    assert len(sink.sent) > before and sink.sent[-1][0] == clock.now


def test_replayed_packets_answer_nacks_after_the_shared_history_forgot_them() -> None:
    policy = JoinPolicy()
    clock, pub, fo, _ = setup(5 * FPS)
    sink = Sink()
    fo.attach(sink, 0, clock.now)
    while fo.pump_replays(clock.now):
        clock.now += policy.tick
    first = sink.sent[0][1]
    # The shared history keeps 1 s: the keyframe of 5 s ago is gone there.
    assert fo.histories()[0].get(first.seq, clock.now, first.timestamp) is None
    assert fo.histories(sink)[0].get(first.seq, clock.now, first.timestamp) is first
    assert fo.histories(sink)[0].get(first.seq, clock.now, first.timestamp ^ 1) is None  # a stale mapping
    other = Sink()
    assert fo.histories(other)[0].get(first.seq, clock.now) is None  # only for the viewer it was sent to
    clock.now += policy.history_s + 0.1
    assert fo.histories(sink)[0].get(first.seq, clock.now, first.timestamp) is None
    fo.pump_replays(clock.now)
    fo.detach(sink)
    assert fo.histories(sink)[0].get(first.seq, clock.now) is None


def test_source_that_accepts_pli_is_asked_for_a_fresh_keyframe_instead() -> None:
    clock, pub, fo, asked = setup(5 * FPS, keyframe_requests=1)
    sink = Sink()
    fo.attach(sink, 0, clock.now)
    assert asked == ["s"] and fo.stats.joins_fresh_keyframe == 1 and fo.stats.joins_replayed == 0
    assert sink.sent == []  # nothing old: the viewer starts at the fresh keyframe
    pub.publish(au(5 * FPS, True))
    assert sink.sent and sink.sent[0][1].keyframe_start


def test_source_that_cannot_be_asked_gets_the_paced_replay() -> None:
    # ffmpeg's WHIP offer has nack but not nack pli: no PLI is sent (0).
    clock, pub, fo, asked = setup(5 * FPS, keyframe_requests=0)
    sink = Sink()
    fo.attach(sink, 0, clock.now)
    assert asked == ["s"] and fo.stats.joins_replayed == 1 and sink.sent[0][1].keyframe_start


def test_short_gop_is_replayed_without_asking_for_a_keyframe() -> None:
    clock, pub, fo, asked = setup(FPS // 2, keyframe_requests=1)
    sink = Sink()
    fo.attach(sink, 0, clock.now)
    assert asked == [] and fo.stats.joins_replayed == 1


def test_next_keyframe_ends_the_replay_and_the_viewer_skips_to_live() -> None:
    clock, pub, fo, _ = setup(10 * FPS)
    sink = Sink()
    fo.attach(sink, 0, clock.now)
    clock.now += 0.1
    fo.pump_replays(clock.now)
    replayed = len(sink.sent)
    assert 0 < replayed < len(fo.gop_packets(0))
    pub.publish(au(10 * FPS, True))
    jump = sink.sent[replayed][1]
    assert jump.keyframe_start and jump.discontinuity  # the viewer's rewriter starts a new run here
    assert fo.stats.replay_skipped_to_keyframe == 1
    assert not fo.pump_replays(clock.now + 1)
    pub.publish(au(10 * FPS + 1, False))
    assert sink.sent[-1][1].seq == (jump.seq + len(sink.sent) - replayed - 1) & 0xFFFF


async def test_on_the_event_loop_the_replay_paces_itself_and_forgets_its_history() -> None:
    policy = JoinPolicy(history_s=1.0)
    hub = StreamHub()
    stream = hub.get_or_create("s")
    pub = stream.attach_publisher(SourceInfo("whip"), now=0.0)
    fo = StreamFanout(stream, join=policy)
    fo.start()
    for i in range(FPS):
        pub.publish(au(i, i == 0))
    sink = Sink()
    fo.attach(sink, 0, time.monotonic())
    assert 0 < len(sink.sent) < len(fo.gop_packets(0))
    await asyncio.sleep(0.4)  # 125 kB at 4 Mbit/s: 0.25 s
    assert [p.seq for _, p in sink.sent] == [p.seq for p in fo.gop_packets(0)]
    first = sink.sent[0][1]
    await asyncio.sleep(0.8)  # the shared history (1 s) has forgotten it, the replay's has not
    assert fo.histories()[0].get(first.seq, time.monotonic()) is None
    assert fo.histories(sink)[0].get(first.seq, time.monotonic()) is first
    await asyncio.sleep(policy.history_s)
    assert fo.histories(sink)[0].get(first.seq, time.monotonic()) is None
    fo.close()


def test_viewer_that_cannot_catch_up_goes_live_and_a_keyframe_is_asked_for() -> None:
    policy = JoinPolicy(max_queue_bytes=20 * FRAME_BYTES)
    clock, pub, fo, asked = setup(FPS // 2, keyframe_requests=0, policy=policy)
    sink = Sink()
    fo.attach(sink, 0, clock.now)  # never pumped: the queue only grows
    for i in range(FPS // 2, FPS // 2 + 30):
        pub.publish(au(i, False))
    jumped = [p for _, p in sink.sent[1:] if p.discontinuity]  # (the very first packet starts the run)
    assert len(jumped) == 1 and not jumped[0].keyframe_start  # its rewriter waits for the next keyframe
    assert asked == ["s"] and fo.stats.replay_skipped_to_keyframe == 1
    assert not fo.pump_replays(clock.now)
