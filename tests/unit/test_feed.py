"""The packet feed (media/webrtc/feed.py): the codec round-trips every event
and refuses anything that is not exactly a message; a real SOCK_SEQPACKET
pair carries events in order; what the socket cannot take waits in the
sender's bounded queue (a whole cached GOP fits); a worker that stops
reading makes the sender queue, then drop and count, never block, and a
DiscontinuityEvent for what was lost comes before anything after it, so its
viewers re-base; a queue gone stale resyncs to live."""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import time

import pytest

from media.rtp.packet import LayerPacket
from media.rtp.rewrite import MediaAnchor
from media.stream import SourceInfo, StreamHub
from media.webrtc import feed
from media.webrtc.fanout import (AUDIO_LAYER, DiscontinuityEvent, EndedEvent, PacketFanout, PacketsEvent,
                                 StreamPacketizer)
from media.webrtc.feed import FeedError, FeedReceiver, FeedSender, decode, encode


def packets(n: int, *, size: int = 1100, seq0: int = 65530, key: bool = True) -> tuple[LayerPacket, ...]:
    return tuple(LayerPacket((seq0 + i) & 0xFFFF, 0xFFFFFFF0, i == n - 1, bytes([i & 0xFF]) * (size - i % 7),
                             keyframe_start=key and i == 0, discontinuity=i == 1) for i in range(n))


def frame_event(n: int = 5, **kw) -> PacketsEvent:
    args = dict(stream="cam-ü", layer="high", packets=packets(n), anchor=MediaAnchor(0xFFFFFFF0, 1234.5),
                arrival=1234.25, first_byte=1234.0, cached=False)
    args.update(kw)
    return PacketsEvent(**args)


@pytest.mark.parametrize("ev", [
    frame_event(),
    frame_event(1, layer=AUDIO_LAYER, anchor=None, first_byte=None),
    frame_event(3, cached=True, first_byte=None),
    DiscontinuityEvent("cam", "low"),
    DiscontinuityEvent("cam", None),
    EndedEvent("cam"),
])
def test_every_event_round_trips(ev) -> None:
    messages = encode(ev)
    assert len(messages) == 1
    assert decode(messages[0]) == ev
    assert decode(bytearray(messages[0])) == ev and decode(memoryview(messages[0])) == ev


def test_a_large_keyframe_is_split_into_whole_packets_under_max_message() -> None:
    ev = frame_event(40)
    messages = encode(ev, max_message=10_000)
    assert len(messages) > 4 and all(len(m) <= 10_000 for m in messages)
    chunks = [decode(m) for m in messages]
    assert tuple(p for c in chunks for p in c.packets) == ev.packets
    assert all(c == PacketsEvent(ev.stream, ev.layer, c.packets, ev.anchor, ev.arrival, ev.first_byte)
               for c in chunks)
    assert [m for c in chunks for m in (p.marker for p in c.packets)].count(True) == 1
    assert len(encode(ev)) == 1  # 40 × 1.1 kB fits the default message


def test_what_the_format_cannot_carry_is_refused_at_encode() -> None:
    with pytest.raises(ValueError):
        encode(frame_event(2), max_message=500)  # one packet alone is larger
    with pytest.raises(ValueError):
        encode(PacketsEvent("s", "high", (LayerPacket(70000, 0, True, b"x"),), None, 0.0, None))
    with pytest.raises(ValueError):
        encode(frame_event(packets=()))
    with pytest.raises(ValueError):
        encode(frame_event(layer="x" * 256))
    with pytest.raises(ValueError):
        encode(EndedEvent("s"), max_message=feed.MAX_MESSAGE + 1)


def test_every_truncation_and_any_padding_is_a_feed_error() -> None:
    for ev in (frame_event(3), DiscontinuityEvent("cam", "low"), DiscontinuityEvent("cam", None), EndedEvent("c")):
        data = encode(ev)[0]
        for cut in range(len(data)):
            with pytest.raises(FeedError):
                decode(data[:cut])
        with pytest.raises(FeedError):
            decode(data + b"\x00")


def test_garbage_is_a_feed_error() -> None:
    good = encode(frame_event(2))[0]
    bad = [
        b"\x02" + good[1:],  # another version
        good[:1] + b"\x09" + good[2:],  # unknown kind
        good[:2] + b"\x10" + good[3:],  # unknown event flag
        good[:6] + b"\x00\x00" + good[8:],  # zero packets
        good[:8] + struct.pack("!d", float("nan")) + good[16:],  # arrival not finite
        good[:36] + b"\xff" + good[37:],  # stream name not UTF-8
        bytes(feed.MAX_MESSAGE + 1),  # oversized
        encode(DiscontinuityEvent("c", None))[0][:2] + b"\x08\x01" + encode(DiscontinuityEvent("c", None))[0][4:],
    ]
    table = 36 + len("cam-ü".encode()) + len("high")
    bad.append(good[:table + 6] + b"\x08" + good[table + 7:])  # unknown packet flag
    bad.append(good[:table + 7] + b"\xff\xff" + good[table + 9:])  # payload longer than the message
    for data in bad:
        with pytest.raises(FeedError):
            decode(data)
    rng = random.Random(15)
    for _ in range(3000):  # random bytes, and valid messages with one byte changed
        if rng.random() < 0.5:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(60)))
        else:
            mutated = bytearray(good)
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            data = bytes(mutated)
        try:
            decode(data)
        except FeedError:
            pass


def sender_and_receiver(sndbuf: int | None = None):
    main_end, worker_end = feed.socketpair()
    if sndbuf is not None:
        main_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    return main_end, worker_end


def test_events_cross_a_real_socket_pair_in_order() -> None:
    async def run():
        main_end, worker_end = sender_and_receiver()
        got: list = []
        eof: list = []
        receiver = FeedReceiver(worker_end, got.append, on_eof=eof.append)
        receiver.start()
        sender = FeedSender(main_end, max_message=8000)
        events = [frame_event(5, arrival=float(i)) for i in range(20)] + [
            DiscontinuityEvent("cam-ü", "high"), frame_event(30), EndedEvent("cam-ü")]
        for ev in events:
            assert sender.send(ev)
        main_end.send(b"garbage")  # counted and skipped, the feed goes on
        assert sender.send(EndedEvent("other"))
        deadline = time.monotonic() + 5
        while len(got) < 24 + 4 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        main_end.close()
        while not eof and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        worker_end.close()
        return got, sender, receiver, eof

    got, sender, receiver, eof = asyncio.run(run())
    chunks = [e for e in got if isinstance(e, PacketsEvent) and len(e.packets) < 30 and e.arrival == 1234.25]
    assert len(chunks) > 1 and tuple(p for c in chunks for p in c.packets) == frame_event(30).packets
    assert [e for e in got if not (isinstance(e, PacketsEvent) and e.arrival == 1234.25)] == (
        [frame_event(5, arrival=float(i)) for i in range(20)]
        + [DiscontinuityEvent("cam-ü", "high"), EndedEvent("cam-ü"), EndedEvent("other")])
    assert sender.sent == 24 and sender.dropped == 0 and sender.messages == receiver.received - 1
    assert receiver.errors == 1 and receiver.bytes == sender.bytes + len(b"garbage")
    assert eof == [receiver] and receiver.closed


def test_the_receiver_reads_at_most_max_per_wakeup() -> None:
    main_end, worker_end = sender_and_receiver()
    got: list = []
    receiver = FeedReceiver(worker_end, got.append, max_per_wakeup=3)
    sender = FeedSender(main_end)
    for i in range(7):
        sender.send(EndedEvent(str(i)))
    assert [receiver.read_available() for _ in range(4)] == [3, 3, 1, 0]
    assert got == [EndedEvent(str(i)) for i in range(7)]
    main_end.close()
    worker_end.close()


class _Sink:
    def __init__(self) -> None:
        self.sent: list[LayerPacket] = []

    def on_packets(self, index, pkts, now) -> None:
        if index >= 0:
            self.sent += pkts

    def on_layers_changed(self, layers) -> None:
        pass

    def on_stream_ended(self) -> None:
        pass


class _Unit:
    def __init__(self, i: int, key: bool, size: int = 4000) -> None:
        self.codec, self.pts, self.dts, self.keyframe, self.pid = "h264", i * 3600, None, key, None
        self.data = b"\x00\x00\x00\x01" + bytes([0x65 if key else 0x41]) + bytes([(i % 250) + 1]) * size


def test_a_worker_that_stops_reading_costs_queue_then_drops_never_a_block_then_a_resync() -> None:
    """End to end: packetizer → sender ═ socket ═ receiver → fan-out → viewer."""
    main_end, worker_end = sender_and_receiver(sndbuf=32 * 1024)
    stream = StreamHub().get_or_create("s")
    pub = stream.attach_publisher(SourceInfo("whip"), now=0.0)
    packetizer = StreamPacketizer(stream)
    sender = FeedSender(main_end, max_queue_bytes=64 * 1024)
    packetizer.subscribe(sender.send)
    packetizer.start()
    asked: list[str] = []
    fanout = PacketFanout("s", request_keyframe=lambda name: asked.append(name) or 1)
    receiver = FeedReceiver(worker_end, fanout.handle, max_per_wakeup=1000)
    sink = _Sink()
    fanout.attach(sink, None, 0.0)
    # The worker reads nothing: the socket fills, then the queue, then every
    # frame is dropped at once (a blocking send would hang this test).
    started = time.monotonic()
    i = 0
    while sender.dropped < 20:
        pub.publish(_Unit(i, i == 0))
        i += 1
        assert i < 500, "the socket and the queue never filled"
    assert time.monotonic() - started < 2.0
    assert sender.pending > 1 and 0 < sender.pending_bytes <= 64 * 1024
    assert sender.sent == i - 20
    # The worker reads again: every frame taken (socket, then queue, in
    # order), then the one discontinuity for the 20 lost, then what follows.
    while sender.pending:
        receiver.read_available()
        pub.publish(_Unit(i, False))  # driven by hand: each send flushes what fits
        i += 1
    receiver.read_available()
    assert fanout.stats.resyncs == 1 and asked == ["s"]
    assert sender.dropped == 20 and receiver.errors == 0
    assert sink.sent[0].keyframe_start  # the viewer's start
    flagged = [k for k, p in enumerate(sink.sent) if p.discontinuity and k > 0]
    assert len(flagged) == 1 and not sink.sent[flagged[0]].keyframe_start
    # Before the gap, nothing is missing: the sequence numbers run on.
    seqs = [p.seq for p in sink.sent[:flagged[0]]]
    assert seqs == [(seqs[0] + k) & 0xFFFF for k in range(len(seqs))]
    main_end.close()
    worker_end.close()


def test_a_multi_megabyte_cached_gop_reaches_a_slow_worker_whole() -> None:
    """A worker that subscribes to a running stream gets the cached GOP in
    one burst (the whole GOP is what its first viewer needs when the source
    sends no keyframe on request); a socket holds a fraction of it, and the
    worker reads it a few messages at a time: nothing may be dropped."""

    async def run():
        main_end, worker_end = sender_and_receiver(sndbuf=64 * 1024)
        stream = StreamHub().get_or_create("s")
        pub = stream.attach_publisher(SourceInfo("whip"), now=0.0)
        packetizer = StreamPacketizer(stream)
        packetizer.start()
        for k in range(300):  # one keyframe then 299 P frames of ~12 kB: a ~3.6 MB GOP
            pub.publish(_Unit(k, k == 0, size=12000))
        cached_packets = packetizer.stats.packets
        # The source refuses keyframe requests (a one-keyframe stream).
        fanout = PacketFanout("s", request_keyframe=lambda name: 0)
        seqs: list[int] = []

        def handle(ev) -> None:
            seqs.extend(p.seq for p in getattr(ev, "packets", ()))
            fanout.handle(ev)

        receiver = FeedReceiver(worker_end, handle, max_per_wakeup=2)
        receiver.start()
        sender = FeedSender(main_end)
        packetizer.subscribe(sender.send)  # the cached GOP, at once
        assert sender.pending_bytes > 1 << 20 and sender.dropped == 0
        for k in range(300, 320):  # live frames go on while it drains
            pub.publish(_Unit(k, False, size=12000))
            await asyncio.sleep(0.001)
        deadline = time.monotonic() + 10
        while (sender.pending or len(seqs) < packetizer.stats.packets) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        sink = _Sink()
        fanout.attach(sink, None, time.monotonic())  # a late viewer: the cached GOP's replay starts
        receiver.close()
        main_end.close()
        worker_end.close()
        return sender, fanout, packetizer, cached_packets, seqs, sink

    sender, fanout, packetizer, cached_packets, seqs, sink = asyncio.run(run())
    assert sender.dropped == 0 and sender.resyncs == 0 and sender.pending == 0
    assert cached_packets > 3000 and fanout.stats.resyncs == 0
    # Every packet, cached and live, once and in order.
    assert len(seqs) == packetizer.stats.packets
    assert seqs == [(seqs[0] + k) & 0xFFFF for k in range(len(seqs))]
    assert fanout.stats.joins_replayed == 1 and sink.sent[0].keyframe_start and sink.sent[0].seq == seqs[0]


def test_a_queue_older_than_max_lag_resyncs_to_live() -> None:
    now = [100.0]
    main_end, worker_end = sender_and_receiver(sndbuf=16 * 1024)
    sender = FeedSender(main_end, max_lag=2.0, clock=lambda: now[0])
    sent = 0
    while not sender.pending:
        assert sender.send(frame_event(5, layer="high", arrival=float(sent)))
        sent += 1
    in_socket = sent - 1
    assert sender.send(frame_event(5, layer="low", arrival=-1.0))
    assert sender.send(EndedEvent("gone"))
    now[0] += 2.5  # the worker read nothing for longer than max_lag
    assert sender.send(frame_event(5, layer="high", arrival=999.0))
    assert sender.resyncs == 1 and sender.dropped == 2
    got: list = []
    receiver = FeedReceiver(worker_end, got.append, max_per_wakeup=10000)
    while True:
        receiver.read_available()
        if not sender.pending:
            break
        sender._on_writable()  # what the loop's writer callback does
    receiver.read_available()
    assert got[:in_socket] == [frame_event(5, layer="high", arrival=float(k)) for k in range(in_socket)]
    # What waited went stale: its end is kept, each layer that lost packets
    # gets one discontinuity, and the live frame comes after them.
    assert got[in_socket:] == [EndedEvent("gone"), DiscontinuityEvent("cam-ü", "high"),
                               DiscontinuityEvent("cam-ü", "low"), frame_event(5, layer="high", arrival=999.0)]
    main_end.close()
    worker_end.close()


def test_an_end_waits_its_turn_behind_queued_frames_and_goes_as_soon_as_there_is_room() -> None:
    async def run():
        main_end, worker_end = sender_and_receiver(sndbuf=16 * 1024)
        sender = FeedSender(main_end)
        n = 0
        while not sender.pending:
            assert sender.send(frame_event(5, arrival=float(n)))
            n += 1
        for _ in range(5):
            assert sender.send(frame_event(5, arrival=float(n)))
            n += 1
        assert sender.send(EndedEvent("cam-ü"))
        got: list = []
        receiver = FeedReceiver(worker_end, got.append)
        receiver.start()  # reading makes room; no further send is needed
        deadline = time.monotonic() + 5
        while (not got or got[-1] != EndedEvent("cam-ü")) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        receiver.close()
        main_end.close()
        worker_end.close()
        return n, got, sender

    n, got, sender = asyncio.run(run())
    assert got == [frame_event(5, arrival=float(k)) for k in range(n)] + [EndedEvent("cam-ü")]
    assert sender.pending == 0 and sender.dropped == 0 and sender.sent == n + 1


def test_a_gone_worker_stops_the_sender() -> None:
    main_end, worker_end = sender_and_receiver()
    errors: list = []
    sender = FeedSender(main_end, on_error=lambda s, exc: errors.append(exc))
    worker_end.close()
    assert not sender.send(frame_event())
    assert sender.closed and isinstance(sender.error, OSError) and len(errors) == 1
    assert not sender.send(frame_event())
    main_end.close()


def test_a_failing_handler_or_an_unencodable_event_costs_only_that_event(caplog) -> None:
    main_end, worker_end = sender_and_receiver()
    got: list = []

    def handler(ev) -> None:
        if ev == EndedEvent("bad"):
            raise RuntimeError("a bug in one stream's fan-out")
        got.append(ev)

    receiver = FeedReceiver(worker_end, handler)
    sender = FeedSender(main_end)
    assert sender.send(EndedEvent("bad")) and sender.send(EndedEvent("good"))
    assert receiver.read_available() == 2
    assert got == [EndedEvent("good")] and receiver.handler_errors == 1
    # A packet the format cannot carry (a bug upstream): dropped, and its
    # layer's discontinuity sent in its place; the next event still goes.
    assert not sender.send(PacketsEvent("s", "high", (LayerPacket(70000, 0, True, b"x"),), None, 0.0, None))
    assert sender.dropped == 1 and sender.pending == 0
    assert sender.send(EndedEvent("good"))
    receiver.read_available()
    assert got[-2:] == [DiscontinuityEvent("s", "high"), EndedEvent("good")]
    main_end.close()
    worker_end.close()


# -- across a real process boundary ------------------------------------------------------


def worker_process(sock: socket.socket, results) -> None:
    """An egress worker's feed side in a spawned process: receiver → fan-out
    → one viewer attached from the start and one attached after the
    cached GOP arrived (its join replay starts from it)."""
    from media.layer import AUDIO

    class Sink:
        def __init__(self) -> None:
            self.seqs: list[int] = []
            self.audio = 0

        def on_packets(self, index, pkts, now) -> None:
            if index == AUDIO:
                self.audio += len(pkts)
            else:
                self.seqs += [p.seq for p in pkts]

        def on_layers_changed(self, layers) -> None:
            pass

        def on_stream_ended(self) -> None:
            pass

    async def run() -> dict:
        ended = asyncio.get_running_loop().create_future()
        fanout = PacketFanout("cam", on_closed=lambda fo: ended.set_result(None))
        early, late = Sink(), Sink()
        fanout.attach(early, None, time.monotonic())
        cached = []

        def on_event(ev) -> None:
            if isinstance(ev, PacketsEvent) and ev.cached:
                cached.append(len(ev.packets))
            elif isinstance(ev, PacketsEvent) and late not in fanout.fanout_order():
                fanout.attach(late, None, time.monotonic())
            fanout.handle(ev)

        receiver = FeedReceiver(sock, on_event)
        receiver.start()
        await asyncio.wait_for(ended, 20)
        receiver.close()
        return {"cached_packets": sum(cached), "early": early.seqs, "late": late.seqs,
                "early_audio": early.audio, "frames": fanout.stats.frames, "errors": receiver.errors,
                "replays": fanout.stats.joins_replayed}

    results.put(asyncio.run(run()))


def test_a_spawned_worker_gets_the_cached_gop_then_every_live_packet_once() -> None:
    import multiprocessing

    class Unit:
        def __init__(self, i: int, key: bool) -> None:
            self.codec, self.pts, self.dts, self.keyframe, self.pid = "h264", i * 3000, None, key, None
            self.data = b"\x00\x00\x00\x01" + bytes([0x65 if key else 0x41]) + bytes([(i % 250) + 1]) * 4000

    class Opus:
        def __init__(self, k: int) -> None:
            self.codec, self.pts, self.dts, self.keyframe, self.pid = "opus", k * 960, k * 960, True, None
            self.clock_rate = 48000
            self.data = bytes([0xFC]) * 130

    stream = StreamHub().get_or_create("cam")
    pub = stream.attach_publisher(SourceInfo("whip"), now=0.0)
    packetizer = StreamPacketizer(stream)
    packetizer.start()
    for i in range(10):  # before the worker exists: one keyframe, nine P frames
        pub.publish(Unit(i, i == 0))
    cached = packetizer.stats.packets
    main_end, worker_end = feed.socketpair()
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=worker_process, args=(worker_end, results), daemon=True)
    proc.start()
    worker_end.close()
    sender = FeedSender(main_end)
    packetizer.subscribe(sender.send)
    for i in range(10, 40):
        pub.publish(Unit(i, False))
        pub.publish(Opus(i))
    packetizer.close()
    try:
        out = results.get(timeout=30)
    finally:
        proc.join(10)
        main_end.close()
    assert out["errors"] == 0 and sender.dropped == 0
    assert out["cached_packets"] == cached
    # The early viewer: every live packet once, in order (no cached one).
    assert out["early"] == list(range(cached, packetizer.stats.packets - 30))
    assert out["early_audio"] == 30 and out["frames"] == 60
    # The late one starts with the replayed keyframe of the cached GOP.
    assert out["replays"] == 1 and out["late"][0] == 0
