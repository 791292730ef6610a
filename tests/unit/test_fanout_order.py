"""Fair fan-out order (media/webrtc/fanout.py): one thread serves viewer
after viewer, so whoever is served last waits for all the others. The start
position rotates per frame: over many frames every viewer's average position
is the middle, none is last more often than its share, and a viewer that
joins or leaves mid-run neither repeats nor skips anyone in a frame."""

from __future__ import annotations

from collections import defaultdict

from media.layer import AUDIO
from media.rtp.packet import LayerPacket
from media.stream import SourceInfo, StreamHub
from media.webrtc.fanout import StreamFanout
from test_fanout_join import Clock, au


class OrderSink:
    """Records its position in each frame's fan-out (a shared counter)."""

    def __init__(self, log: list["OrderSink"]) -> None:
        self.log = log

    def on_packets(self, index: int, packets: list[LayerPacket], now: float) -> None:
        if index != AUDIO:
            self.log.append(self)

    def on_layers_changed(self, layers) -> None:
        pass

    def on_stream_ended(self) -> None:
        pass


def _studio():
    clock = Clock()
    stream = StreamHub().get_or_create("s")
    pub = stream.attach_publisher(SourceInfo("whip"), now=clock.now)
    fo = StreamFanout(stream, clock=clock)
    fo.start()
    return clock, pub, fo


def _frames(clock, pub, fo, log, first: int, count: int) -> list[list[OrderSink]]:
    """Publish ``count`` frames; each frame's list of sinks in serving order."""
    out = []
    for i in range(first, first + count):
        clock.now += 0.04
        log.clear()
        pub.publish(au(i, i % 25 == 0))
        out.append(list(log))
        fo.pump_replays(clock.now + 10.0)  # finish any join replay (not part of the order)
    return out


def test_each_viewers_average_position_is_the_middle_and_none_is_always_last() -> None:
    clock, pub, fo = _studio()
    _frames(clock, pub, fo, [], 0, 1)  # a keyframe: the viewers' replays start from it
    log: list[OrderSink] = []
    sinks = [OrderSink(log) for _ in range(20)]
    for s in sinks:
        fo.attach(s, 0, clock.now)
    frames = _frames(clock, pub, fo, log, 1, 20 * 15)
    positions: dict[OrderSink, list[int]] = defaultdict(list)
    last: dict[OrderSink, int] = defaultdict(int)
    for order in frames:
        assert sorted(map(id, order)) == sorted(map(id, sinks))  # everyone, once
        for pos, s in enumerate(order):
            positions[s].append(pos)
        last[order[-1]] += 1
    middle = (len(sinks) - 1) / 2
    for s in sinks:
        assert sum(positions[s]) / len(positions[s]) == middle
        assert last[s] == 15  # last in exactly 1 frame of 20
    # Deterministic: consecutive frames start one viewer further along.
    assert frames[1][0] is frames[0][1]


def test_the_order_in_a_set_would_have_served_the_same_viewer_last_every_time() -> None:
    # What the rotation replaces: with no rotation the same sink ends every
    # frame. Guard that the rotation really moves it (not a vacuous test).
    clock, pub, fo = _studio()
    _frames(clock, pub, fo, [], 0, 1)
    log: list[OrderSink] = []
    sinks = [OrderSink(log) for _ in range(5)]
    for s in sinks:
        fo.attach(s, 0, clock.now)
    frames = _frames(clock, pub, fo, log, 1, 10)
    assert len({id(order[-1]) for order in frames}) == 5


def test_joining_and_leaving_mid_run_serves_everyone_attached_once_per_frame() -> None:
    clock, pub, fo = _studio()
    _frames(clock, pub, fo, [], 0, 1)
    log: list[OrderSink] = []
    sinks = [OrderSink(log) for _ in range(7)]
    for s in sinks[:4]:
        fo.attach(s, 0, clock.now)
    _frames(clock, pub, fo, log, 1, 3)
    for s in sinks[4:]:
        fo.attach(s, 0, clock.now)
    fo.detach(sinks[2])
    fo.detach(sinks[2])  # twice: harmless
    present = [s for s in sinks if s is not sinks[2]]
    # A newcomer's live packets may queue behind its join replay until it
    # has caught up (by the next keyframe, frame 25 at the latest).
    frames = _frames(clock, pub, fo, log, 4, 40)
    for order in frames[:21]:
        assert len(set(map(id, order))) == len(order)
        assert {id(s) for s in sinks[:2] + sinks[3:4]} <= set(map(id, order)) <= set(map(id, present))
    for order in frames[21:]:
        assert sorted(map(id, order)) == sorted(map(id, present))
    assert fo.viewer_count == 6 and fo.stats.viewers == 6


class CallSink:
    """Records each on_packets call: (seq of each packet)."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    def on_packets(self, index: int, packets: list[LayerPacket], now: float) -> None:
        if index != AUDIO:
            self.calls.append([p.seq for p in packets])

    def on_layers_changed(self, layers) -> None:
        pass

    def on_stream_ended(self) -> None:
        pass


def test_a_join_replay_never_runs_inside_a_live_frames_fan_out() -> None:
    # Live viewers get exactly the live frame during its fan-out; the
    # replaying newcomer's catch-up is sent only from its own pacing timer
    # (pump_replays), between frames, in bounded steps.
    clock, pub, fo = _studio()
    live = [CallSink() for _ in range(3)]
    for s in live:
        fo.attach(s, 0, clock.now)
    _frames(clock, pub, fo, [], 0, 12)  # a GOP of 12 frames cached
    newcomer = CallSink()
    fo.attach(newcomer, 0, clock.now)
    assert newcomer.calls  # its keyframe at once, on attach (not inside a frame)
    for s in (*live, newcomer):
        s.calls.clear()
    clock.now += 0.04
    pub.publish(au(12, False))
    frame = live[0].calls
    assert len(frame) == 1 and all(s.calls == frame for s in live)
    assert newcomer.calls == []  # queued behind its replay, nothing sent inside the frame
    fo.pump_replays(clock.now + 0.005)  # one pacing tick: a bounded step of the replay
    step = sum(map(len, newcomer.calls))
    assert 0 < step < sum(len(c) for c in frame) * 12
    assert all(s.calls == frame for s in live)  # the live viewers saw nothing of it
