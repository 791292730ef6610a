"""The fan-out's two halves (media/webrtc/fanout.py): a StreamPacketizer
reading a real Stream, its events handed to PacketFanouts as a worker
process would get them (here by direct calls; the wire is test_feed.py).

What a viewer gets through the split equals what StreamFanout gives it; a
late subscriber starts from the cached GOP without sending it to anyone; a
gap in the events makes every viewer of the layer re-base and asks for a
keyframe; a keyframe in chunks counts and reports as one frame; the end
reaches every subscriber.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from media.layer import AUDIO
from media.rtp.packet import LayerPacket
from media.stream import SourceInfo, StreamHub
from media.webrtc.fanout import (AUDIO_LAYER, DiscontinuityEvent, EndedEvent, PacketFanout, PacketsEvent,
                                 StreamFanout, StreamPacketizer)

FPS = 25


@dataclass(frozen=True)
class Unit:
    codec: str
    pts: int
    keyframe: bool
    data: bytes
    dts: int | None = None
    pid: int | None = None
    arrival: float | None = None
    clock_rate: int = 90000


def au(i: int, key: bool, size: int = 3000) -> Unit:
    nal = bytes([0x65 if key else 0x41]) + bytes([i & 0xFF]) * (size - 1)
    return Unit("h264", i * 90000 // FPS, key, b"\x00\x00\x00\x01" + nal, arrival=100.0 + i / FPS)


def opus(i: int) -> Unit:
    return Unit("opus", i * 960, True, bytes([0xFC, i & 0xFF]) * 40, arrival=100.0 + i * 0.02, clock_rate=48000)


class Sink:
    def __init__(self) -> None:
        self.sent: list[tuple[int, LayerPacket]] = []
        self.layers: tuple = ()
        self.ended = 0

    def on_packets(self, index: int, packets: list[LayerPacket], now: float) -> None:
        self.sent += [(index, p) for p in packets]

    def on_layers_changed(self, layers) -> None:
        self.layers = layers

    def on_stream_ended(self) -> None:
        self.ended += 1


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_stream(name: str = "s"):
    stream = StreamHub().get_or_create(name)
    return stream, stream.attach_publisher(SourceInfo("whip"), now=100.0)


def test_the_split_gives_a_viewer_exactly_what_the_in_process_fanout_gives() -> None:
    stream, pub = make_stream()
    clock = Clock()
    whole = StreamFanout(stream, clock=clock)
    whole.start()
    packetizer = StreamPacketizer(stream, clock=clock)
    worker = PacketFanout("s", clock=clock)
    packetizer.subscribe(worker.handle)
    packetizer.start()
    a, b = Sink(), Sink()
    whole.attach(a, None, clock.now)
    worker.attach(b, None, clock.now)
    for i in range(2 * FPS):
        clock.now += 1 / FPS
        pub.publish(au(i, i % FPS == 0))
        pub.publish(opus(2 * i))
    assert a.sent and [(i, p) for i, p in a.sent] == [(i, p) for i, p in b.sent]
    assert {i for i, _ in b.sent} == {0, AUDIO}
    assert worker.anchors() == whole.anchors() and set(worker.anchors()) == {0, AUDIO}
    assert worker.stats.frames == whole.stats.frames == 4 * FPS
    assert worker.stats.packet_sends == whole.stats.packet_sends == len(b.sent)
    assert packetizer.stats.frames == 4 * FPS


def test_a_late_subscriber_gets_the_cached_gop_sends_none_of_it_and_starts_viewers_from_it() -> None:
    stream, pub = make_stream()
    clock = Clock()
    packetizer = StreamPacketizer(stream, clock=clock)
    packetizer.start()
    for i in range(FPS + 10):  # two GOPs: the cache holds the second (10 frames)
        clock.now += 1 / FPS
        pub.publish(au(i, i % FPS == 0))
        pub.publish(opus(2 * i))
    events: list = []
    packetizer.subscribe(events.append)
    assert [type(e) for e in events] == [PacketsEvent] * 11 and all(e.cached for e in events)
    assert events[0].packets[0].keyframe_start and events[-1].layer == AUDIO_LAYER
    # A worker's fan-out fed the cache (0.7 s later): viewers already
    # attached get nothing from it, a viewer joining now is replayed the GOP.
    clock.now += 0.7
    worker = PacketFanout("s", clock=clock)
    early = Sink()
    worker.attach(early, None, clock.now)
    for e in events:
        worker.handle(e)
    assert early.sent == [] and worker.stats.frames == 0
    assert len(worker.gop_packets(0)) == sum(len(e.packets) for e in events[:-1])
    assert set(worker.anchors()) == {0, AUDIO}
    late = Sink()
    worker.attach(late, None, clock.now)
    assert late.sent and late.sent[0][1].keyframe_start and worker.stats.joins_replayed == 1
    # Cached packets age from their arrival: the shared history forgets the
    # old ones as it would have.
    first = events[0].packets[0]
    assert worker.histories()[0].get(first.seq, clock.now) is None
    last = events[-2].packets[-1]
    assert worker.histories()[0].get(last.seq, clock.now) is last
    # Then live frames flow to both.
    packetizer.unsubscribe(events.append)
    packetizer.subscribe(worker.handle)
    clock.now += 1 / FPS
    before = len(early.sent)
    pub.publish(au(FPS + 10, False))
    assert len(early.sent) > before and worker.stats.frames == 1


def test_the_packetizer_cache_is_bounded_by_gop_cache_bytes() -> None:
    stream, pub = make_stream()
    packetizer = StreamPacketizer(stream, gop_cache_bytes=20_000)
    packetizer.start()
    for i in range(10):  # one keyframe, then 3 kB frames: over 20 kB at frame 7
        pub.publish(au(i, i == 0))
    events: list = []
    packetizer.subscribe(events.append)
    assert events == []
    pub.publish(au(10, True))
    assert len(events) == 1 and not events[0].cached  # live from then on


def test_lost_events_make_the_next_packet_a_discontinuity_and_ask_for_a_keyframe() -> None:
    stream, pub = make_stream()
    clock = Clock()
    asked: list[str] = []
    packetizer = StreamPacketizer(stream, clock=clock)
    worker = PacketFanout("s", clock=clock, request_keyframe=lambda name: asked.append(name) or 1)
    packetizer.subscribe(worker.handle)
    packetizer.start()
    sink = Sink()
    worker.attach(sink, None, clock.now)
    pub.publish(au(0, True))
    pub.publish(opus(0))
    assert worker.gop_packets(0)
    # What a FeedSender sends after it dropped events of layer "high".
    worker.handle(DiscontinuityEvent("s", "high"))
    assert worker.gop_packets(0) == [] and 0 not in worker.anchors() and AUDIO in worker.anchors()
    sink.sent.clear()
    pub.publish(au(5, False))
    pub.publish(opus(1))
    video = [p for i, p in sink.sent if i == 0]
    assert video[0].discontinuity and not any(p.discontinuity for p in video[1:])
    assert not [p for i, p in sink.sent if i == AUDIO][0].discontinuity  # audio was not lost
    assert asked == ["s"] and worker.stats.resyncs == 1
    # A source restart is flagged by the packetizer itself: no second flag,
    # no keyframe request (the stream restarts at a keyframe).
    pub.discontinuity()
    sink.sent.clear()
    pub.publish(au(6, True))
    assert sink.sent[0][1].discontinuity and asked == ["s"] and worker.stats.resyncs == 1


def test_a_keyframe_in_chunks_is_one_frame_and_reported_once() -> None:
    stream, pub = make_stream()
    clock = Clock()
    packetizer = StreamPacketizer(stream, clock=clock, first_byte=lambda frame: 99.5)
    reported: list[tuple[PacketsEvent, float]] = []
    worker = PacketFanout("s", clock=clock, on_frame_sent=lambda ev, now: reported.append((ev, now)))
    sink = Sink()
    worker.attach(sink, None, clock.now)

    def chunked(ev) -> None:  # as feed.encode splits a large frame
        if isinstance(ev, PacketsEvent) and len(ev.packets) > 4:
            for k in range(0, len(ev.packets), 4):
                worker.handle(dataclasses.replace(ev, packets=ev.packets[k:k + 4]))
        else:
            worker.handle(ev)

    packetizer.subscribe(chunked)
    packetizer.start()
    pub.publish(au(0, True, size=40 * 1200))
    pub.publish(au(1, False))
    assert worker.stats.frames == 2 and len(reported) == 2
    assert reported[0][0].packets[-1].marker and reported[0][0].first_byte == 99.5
    assert reported[0][0].arrival == 100.0
    assert len(worker.gop_packets(0)) == len(sink.sent) == packetizer.stats.packets


def test_closing_the_packetizer_ends_every_subscriber_and_their_viewers() -> None:
    stream, pub = make_stream()
    packetizer = StreamPacketizer(stream)
    closed: list = []
    worker = PacketFanout("s", on_closed=closed.append)
    packetizer.subscribe(worker.handle)
    events: list = []
    packetizer.subscribe(events.append)
    packetizer.start()
    sink = Sink()
    worker.attach(sink, None, 0.0)
    pub.publish(au(1, True))
    sent = len(sink.sent)
    packetizer.close()
    assert sent and packetizer.closed and worker.closed and closed == [worker] and sink.ended == 1
    assert events[-1] == EndedEvent("s")
    pub.publish(au(2, False))  # its reader is gone
    assert events[-1] == EndedEvent("s") and len(sink.sent) == sent
    late: list = []
    packetizer.subscribe(late.append)
    assert late == [EndedEvent("s")]


def test_stream_fanout_close_stops_its_packetizer() -> None:
    stream, pub = make_stream()
    closed: list = []
    fo = StreamFanout(stream, on_closed=closed.append)
    fo.start()
    sink = Sink()
    fo.attach(sink, None, 0.0)
    fo.close()
    assert fo.packetizer.closed and closed == [fo] and sink.ended == 1
    pub.publish(au(0, True))
    assert sink.sent == []
