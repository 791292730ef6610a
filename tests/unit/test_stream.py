"""Stream hub: fan-out, bounded readers, GOP cache, lifecycle, simulcast."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import pytest

from media.mpegts import AccessUnit, ProgramChanged, TsDemuxer
from media.stream import (
    Discontinuity,
    Frame,
    SourceInfo,
    StreamBusy,
    StreamClosed,
    StreamHub,
    StreamState,
    layer_names,
)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "ts"
SRT = SourceInfo("srt", "192.0.2.1:5000")


@dataclass(frozen=True)
class U:
    """A minimal access-unit-like object."""

    codec: str
    pts: int
    keyframe: bool
    data: bytes = b"x" * 100
    dts: int | None = None
    pid: int | None = None


def gop(n: int, start: int = 0, size: int = 100) -> list[U]:
    """n video frames at 25 fps, keyframe first."""
    return [U("h264", (start + i) * 3600, i == 0, b"v" * size) for i in range(n)]


def demuxed(name: str) -> tuple[list, list[AccessUnit]]:
    demux = TsDemuxer()
    data = (FIXTURES / name).read_bytes()
    events = []
    for i in range(0, len(data), 1316):
        events += demux.feed(data[i : i + 1316], i / len(data) * 2.0)
    events += demux.flush(2.0)
    return events, [e for e in events if isinstance(e, AccessUnit)]


def ingest(stream, name: str, **attach):
    """Run a captured TS through a publisher like an SRT session would."""
    pub = stream.attach_publisher(SRT, now=0.0, **attach)
    events, _ = demuxed(name)
    data = (FIXTURES / name).read_bytes()
    pub.publish_ts(data[:1316])
    for e in events:
        if isinstance(e, ProgramChanged):
            pub.set_program(e.pmt)
        elif isinstance(e, AccessUnit):
            pub.publish(e)
    return pub


def frames_of(items) -> list[Frame]:
    return [i for i in items if isinstance(i, Frame)]


# ------------------------------------------------------------ properties


def test_tracks_from_captured_ts():
    stream = StreamHub().get_or_create("cam1")
    reader = stream.subscribe(maxsize=1000)
    ingest(stream, "h264_aac_zerolatency.ts")
    video = stream.tracks["video:high"].info()
    audio = stream.tracks["audio"].info()
    assert (video.codec, video.width, video.height, video.fps) == ("h264", 320, 240, 25.0)
    assert video.profile_level_id.startswith("64")
    assert video.gop_frames == 25
    assert video.b_frames is False
    assert video.frames == 50 and video.pid == 0x100
    assert 100_000 < video.bitrate_bps < 600_000  # encoded at 300 kb/s
    assert (audio.codec, audio.sample_rate, audio.channels) == ("aac", 48000, 2)
    assert 40_000 < audio.bitrate_bps < 120_000
    items = reader.drain()
    assert len(frames_of(items)) == 50 + 95
    assert frames_of(items)[0].keyframe
    assert list(stream.layers) == ["high"]


def test_b_frames_flagged():
    stream = StreamHub().get_or_create("cam2")
    ingest(stream, "h264_aac_bframes.ts")
    video = stream.tracks["video:high"].info()
    assert video.b_frames is True
    assert (video.fps, video.gop_frames) == (30.0, 30)
    assert stream.tracks["audio"].info().channels == 1


def test_opus_track():
    stream = StreamHub().get_or_create("cam3")
    ingest(stream, "h264_opus.ts")
    audio = stream.tracks["audio"].info()
    assert (audio.codec, audio.sample_rate, audio.channels) == ("opus", 48000, 2)


# ------------------------------------------------------------ simulcast


def test_simulcast_pids_ranked_by_resolution():
    stream = StreamHub().get_or_create("sim")
    reader = stream.subscribe(maxsize=1000, layers=["low"], kinds=["video"])
    pub = ingest(stream, "simulcast.ts")
    assert pub.layers == {0x100: "high", 0x101: "low"}
    layers = stream.layers
    assert list(layers) == ["high", "low"]
    assert (layers["high"].width, layers["low"].width) == (320, 160)
    got = frames_of(reader.drain())
    assert len(got) == 50 and all(f.layer == "low" for f in got) and got[0].keyframe


def test_simulcast_ranking_ignores_pid_order():
    """The small layer on the first PID still becomes 'low'."""
    events, aus = demuxed("simulcast.ts")
    pmt = next(e.pmt for e in events if isinstance(e, ProgramChanged))

    @dataclass
    class T:
        pid: int
        kind: str

    @dataclass
    class P:
        tracks: list

    swapped = P([T(0x101, "video"), T(0x100, "video"), T(0x102, "audio")])
    stream = StreamHub().get_or_create("sim2")
    pub = stream.attach_publisher(SRT, now=0.0)
    pub.set_program(swapped)
    for au in aus:
        pub.publish(au)
    assert pub.layers == {0x100: "high", 0x101: "low"}
    assert pmt.track(0x100).kind == "video"


def test_simulcast_two_publishers_each_a_layer():
    stream = StreamHub().get_or_create("sim3")
    reader = stream.subscribe(maxsize=100, kinds=["video"])
    high = stream.attach_publisher(SourceInfo("whip"), layer="high", now=0)
    low = stream.attach_publisher(SourceInfo("whip"), layer="low", now=0)
    with pytest.raises(StreamBusy):
        stream.attach_publisher(SourceInfo("whip"), layer="low", now=0)
    with pytest.raises(StreamBusy):
        stream.attach_publisher(SRT, now=0)  # whole-stream publisher
    for u in gop(3):
        high.publish(u)
        low.publish(u)
    assert {f.layer for f in frames_of(reader.drain())} == {"high", "low"}
    assert list(stream.layers) == ["high", "low"]
    stream.detach_publisher(low, now=1)
    assert stream.state == StreamState.LIVE
    items = reader.drain()
    assert isinstance(items[0], Discontinuity) and items[0].reason == "detach" and items[0].layer == "low"


def test_layer_names():
    assert layer_names(1) == ["high"]
    assert layer_names(2) == ["high", "low"]
    assert layer_names(3) == ["high", "mid", "low"]
    assert len(set(layer_names(5))) == 5


# ------------------------------------------------------------ readers


def test_slow_reader_drops_and_restarts_at_keyframe():
    stream = StreamHub().get_or_create("slow")
    pub = stream.attach_publisher(SRT, now=0)
    slow = stream.subscribe(maxsize=8, kinds=["video"])
    fast = stream.subscribe(maxsize=1000, kinds=["video"])
    units = [u for g in range(6) for u in gop(10, start=g * 10)]
    items = []
    for n, u in enumerate(units):
        pub.publish(u)  # never awaits, never blocks
        assert len(slow) <= 8 + 1  # bounded (+1 marker at most)
        if n % 3 == 0:  # the slow reader consumes one item per three frames
            items.append(slow._buf.popleft())
    items += slow.drain()
    assert len(fast.drain()) == 60 and fast.drops == 0
    frames = frames_of(items)
    assert slow.drops > 0 and slow.drops == 60 - len(frames)
    markers = [i for i, item in enumerate(items) if isinstance(item, Discontinuity)]
    assert markers and all(items[i].reason == "overflow" and items[i + 1].keyframe for i in markers)
    assert frames[0].keyframe
    # no hole inside any delivered GOP: a gap in seq only right before a keyframe
    for a, b in zip(frames, frames[1:]):
        assert b.keyframe or b.seq == a.seq + 1


def test_lagging_reader_jumps_to_live_at_keyframe():
    stream = StreamHub().get_or_create("lag")
    pub = stream.attach_publisher(SRT, now=0)
    reader = stream.subscribe(maxsize=5, kinds=["video"])
    for u in gop(10) + gop(10, start=10):
        pub.publish(u)
    items = reader.drain()
    # queue was still full at the second keyframe: emptied, restart there
    assert isinstance(items[0], Discontinuity)
    assert items[1].keyframe and items[1].pts == 10 * 3600
    assert reader.drops == 20 - len(frames_of(items))


def test_audio_overflow_drops_newest():
    stream = StreamHub().get_or_create("aud")
    pub = stream.attach_publisher(SRT, now=0)
    reader = stream.subscribe(maxsize=3, kinds=["audio"])
    for i in range(6):
        pub.publish(U("opus", i * 960, True, bytes([0xFC, i])))
    assert [f.pts for f in frames_of(reader.drain())] == [0, 960, 1920]
    assert reader.drops == 3


def test_publisher_never_blocks_on_many_full_readers():
    stream = StreamHub().get_or_create("many")
    pub = stream.attach_publisher(SRT, now=0)
    readers = [stream.subscribe(maxsize=2) for _ in range(50)]
    for u in gop(25) * 4:
        assert pub.publish(u) is None
    assert all(r.drops > 0 for r in readers)
    assert stream.stats().drops_total == sum(r.drops for r in readers)


def test_new_reader_starts_with_gop_cache():
    stream = StreamHub().get_or_create("cache")
    pub = stream.attach_publisher(SRT, now=0)
    for u in gop(5):  # an older GOP
        pub.publish(u)
    pub.publish(U("aac", 5 * 3600 - 10, True))  # audio before the last keyframe: not replayed
    for u in gop(4, start=5):
        pub.publish(u)
    pub.publish(U("aac", 9 * 3600, True))
    reader = stream.subscribe(maxsize=100)
    items = reader.drain()
    assert items[0].keyframe and items[0].pts == 5 * 3600
    assert [(f.kind, f.pts) for f in items] == [("video", i * 3600) for i in range(5, 9)] + [("audio", 9 * 3600)]
    assert len(stream.gop_cache("high")) == 4
    pub.publish(gop(1, start=9)[0].__class__("h264", 9 * 3600, False))
    assert reader.drain()[0].pts == 9 * 3600


def test_gop_cache_bounded_in_bytes():
    stream = StreamHub(gop_cache_bytes=1000).get_or_create("small")
    pub = stream.attach_publisher(SRT, now=0)
    for u in gop(20, size=100):
        pub.publish(u)
    assert stream.gop_cache_bytes <= 1000
    reader = stream.subscribe(maxsize=100)
    assert reader.drain() == []  # the GOP did not fit: wait for the next keyframe
    assert reader.waiting_for_keyframe("high")
    pub.publish(U("h264", 20 * 3600, False))
    pub.publish(U("h264", 21 * 3600, True))
    assert [f.keyframe for f in reader.drain()] == [True]


def test_reader_layer_switch_waits_for_keyframe():
    stream = StreamHub().get_or_create("switch")
    high = stream.attach_publisher(SourceInfo("whip"), layer="high", now=0)
    low = stream.attach_publisher(SourceInfo("whip"), layer="low", now=0)
    reader = stream.subscribe(maxsize=100, layers=["low"], kinds=["video"])
    for u in gop(3):
        high.publish(u)
        low.publish(u)
    reader.drain()
    reader.set_layers(["high"])
    high.publish(U("h264", 3 * 3600, False))
    high.publish(U("h264", 4 * 3600, True))
    low.publish(U("h264", 4 * 3600, True))
    assert [(f.layer, f.keyframe) for f in reader.drain()] == [("high", True)]


def test_ts_passthrough_drops_whole_chunks():
    stream = StreamHub().get_or_create("ts")
    pub = stream.attach_publisher(SRT, now=0)
    ts = stream.subscribe_ts(maxsize=3)
    chunks = [bytes([0x47, i]) * 94 for i in range(5)]
    for c in chunks:
        pub.publish_ts(c)
    assert ts.drain() == chunks[:3]
    assert ts.drops == 2 and ts.dropped_bytes == 2 * 188
    pub.publish_ts(chunks[4])
    assert ts.drain() == [chunks[4]]
    assert stream.stats().ts_bytes_in == 6 * 188


# ------------------------------------------------------------ lifecycle


def test_second_publisher_refused_unless_takeover():
    stream = StreamHub().get_or_create("busy")
    first = stream.attach_publisher(SRT, now=0)
    reader = stream.subscribe(maxsize=100, kinds=["video"])
    first.publish(gop(1)[0])
    with pytest.raises(StreamBusy, match="already has a publisher"):
        stream.attach_publisher(SRT, now=1)
    second = stream.attach_publisher(SourceInfo("srt", "198.51.100.7:9"), takeover=True, now=1)
    assert not first.active and second.active
    first.publish(U("h264", 3600, False))  # evicted publisher: ignored
    assert first.ignored == 1
    second.publish(U("h264", 7200, False))  # not a keyframe: reader waits
    second.publish(U("h264", 10800, True))
    items = reader.drain()
    assert [type(i).__name__ for i in items] == ["Frame", "Discontinuity", "Frame"]
    assert items[1].reason == "takeover" and items[2].keyframe and items[2].epoch == second.epoch


async def test_grace_period_reconnect_keeps_reader():
    hub = StreamHub(grace=10.0)
    stream = hub.get_or_create("cam")
    pub = stream.attach_publisher(SRT, now=100.0)
    reader = stream.subscribe(maxsize=100, kinds=["video"])
    for u in gop(3):
        pub.publish(u)
    assert len(reader.drain()) == 3
    stream.detach_publisher(pub, now=101.0)
    assert stream.state == StreamState.RECONNECTING
    assert hub.expire(110.0) == []  # 9 s: still within grace
    again = hub.get_or_create("cam").attach_publisher(SRT, now=110.5)
    assert hub.get("cam") is stream and stream.state == StreamState.LIVE
    assert again.epoch == pub.epoch + 1
    again.publish(U("h264", 500, False))  # mid-GOP join of the new publisher: skipped
    for u in gop(2, start=1000):
        again.publish(u)
    items = reader.drain()
    assert isinstance(items[0], Discontinuity) and items[0].reason == "reconnect"
    assert [f.pts for f in frames_of(items)] == [1000 * 3600, 1001 * 3600]
    # gone for good after the grace period
    stream.detach_publisher(again, now=120.0)
    waiter = asyncio.ensure_future(reader.get())
    await asyncio.sleep(0)
    assert hub.expire(129.9) == []
    assert hub.expire(130.0) == ["cam"]
    assert "cam" not in hub and stream.state == StreamState.CLOSED
    with pytest.raises(StreamClosed):
        await waiter
    with pytest.raises(StreamClosed):
        stream.attach_publisher(SRT, now=131)


async def test_async_get_and_callback():
    stream = StreamHub().get_or_create("async")
    pub = stream.attach_publisher(SRT, now=0)
    woken = []
    reader = stream.subscribe(maxsize=10, callback=lambda r: woken.append(len(r)))
    task = asyncio.ensure_future(reader.get())
    await asyncio.sleep(0)
    assert not task.done()
    pub.publish(gop(1)[0])
    frame = await asyncio.wait_for(task, 1.0)
    assert frame.keyframe and woken == [1]
    reader.close()
    assert reader not in stream.readers
    got = []
    async for item in reader:  # closed and empty: iteration ends
        got.append(item)
    assert got == []


def test_publish_shortcut_and_stats():
    stream = StreamHub().get_or_create("stats")
    stream.attach_publisher(SRT, now=5.0)
    reader = stream.subscribe(maxsize=1)
    for u in gop(3):
        stream.publish(u)
    stats = stream.stats()
    assert stats.state == StreamState.LIVE and stats.frames_in == 3 and stats.bytes_in == 300
    assert stats.publishers[0].protocol == "srt" and stats.publishers[0].frames == 3
    assert stats.readers == 1 and stats.drops_total == reader.drops == 2
    assert stats.tracks[0].id == "video:high"


def test_source_discontinuity_and_reader_restart():
    stream = StreamHub().get_or_create("disc")
    pub = stream.attach_publisher(SRT, now=0)
    reader = stream.subscribe(maxsize=100)
    for u in gop(3):
        pub.publish(u)
    reader.drain()
    pub.discontinuity()  # e.g. a TsDiscontinuity(CC_ERROR) from the demuxer
    pub.publish(U("h264", 3 * 3600, False))  # skipped: restart at a keyframe
    pub.publish(U("aac", 3 * 3600, True))  # audio flows on
    pub.publish(U("h264", 4 * 3600, True))
    items = reader.drain()
    assert [type(i).__name__ for i in items] == ["Discontinuity", "Frame", "Frame"]
    assert items[0].reason == "source" and items[1].kind == "audio" and items[2].keyframe
    pub.publish(U("h264", 5 * 3600, False))
    reader.restart()  # a viewer's PLI: drop the queue, wait for the next IDR
    assert len(reader) == 0 and reader.drops == 1
    pub.publish(U("h264", 6 * 3600, False))
    pub.publish(U("h264", 7 * 3600, True))
    assert [f.pts for f in reader.drain()] == [7 * 3600]
