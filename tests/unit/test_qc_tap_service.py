"""QcService: hub reader → QC worker → sink, wall clock, restart with
backoff, metrics (server/qc_service.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from helpers import Unit, until
from media.stream import SourceInfo, StreamHub
from server.config import QcSettings
from server.qc_service import QcService, next_backoff
from test_qc_tap import BLACK_END, BLACK_START, clip, make_clip, packets  # noqa: F401 (fixture)


class RecordingSink:
    def __init__(self) -> None:
        self.markers: list[tuple] = []
        self.readings: list[tuple] = []
        self.states: list[tuple] = []

    def marker(self, stream, event, *, wall_start, wall_end):
        self.markers.append((stream, event, wall_start, wall_end))

    def meters(self, stream, meters):
        self.readings.append((stream, meters))

    def tap_state(self, stream, state, detail=""):
        self.states.append((stream, state, detail))


def test_backoff_doubles_from_half_a_second_to_thirty() -> None:
    delays = [next_backoff(None)]
    for _ in range(8):
        delays.append(next_backoff(delays[-1]))
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_qc_settings_thresholds_are_checked_and_typed() -> None:
    s = QcSettings(thresholds={"black_d": "2.5", "clip_runs": 3}, analysis_fps=5)
    th = s.stream_thresholds()
    assert th == {"black_d": 2.5, "clip_runs": 3, "analysis_fps": 5.0}
    assert isinstance(th["clip_runs"], int)
    with pytest.raises(ValueError):
        QcSettings(thresholds={"no_such_threshold": 1})


async def publish(hub: StreamHub, name: str, pkts: list[tuple]) -> None:
    stream = hub.get_or_create(name)
    pub = stream.publishers[0] if stream.publishers else stream.attach_publisher(SourceInfo("test"))
    for i, (kind, codec, t, key, data) in enumerate(pkts):
        pub.publish(Unit(codec, round(t * 90000), round(t * 90000), key, data))
        if i % 20 == 0:
            await asyncio.sleep(0)  # let the tap's reader task forward


async def test_service_taps_a_live_stream_and_hands_markers_to_the_sink(clip) -> None:
    hub = StreamHub()
    sink = RecordingSink()
    qc = QcService(QcSettings(enabled=True, queue_frames=1024), hub, sink, poll_s=0.05)
    await qc.start()
    try:
        stream = hub.get_or_create("cam1")
        stream.attach_publisher(SourceInfo("test"))
        # The first unit makes the stream's tracks; the poll then attaches.
        kind, codec, t, key, data = clip[0]
        stream.publishers[0].publish(Unit(codec, round(t * 90000), round(t * 90000), key, data))
        await until(lambda: any(s[1] == "running" for s in sink.states))
        began = time.time()
        pub = stream.publishers[0]
        for i, (kind, codec, t, key, data) in enumerate(clip[1:]):
            pub.publish(Unit(codec, round(t * 90000), round(t * 90000), key, data))
            if i % 20 == 0:
                await asyncio.sleep(0)
        stream.close()  # the reader ends: the tap detaches, the worker flushes
        await until(lambda: any(s[1] == "stopped" for s in sink.states))
        black = [(ev.kind, ws, we) for name, ev, ws, we in sink.markers if ev.marker.type == "black"]
        assert [k for k, _, _ in black] == ["open", "close"]
        _, ws, we = black[-1]
        # Media time maps onto the wall clock at the publish time of the frames.
        assert abs((we - ws) - (BLACK_END - BLACK_START)) <= 0.15
        assert began - 30 < ws < time.time() + 30
        assert sink.readings and all(name == "cam1" for name, _ in sink.readings)
        assert qc.markers_total.get("black") == 1
        names = {m.name for m in qc.collect()}
        assert names == {"returnfeed_qc_cpu_seconds", "returnfeed_qc_frames_dropped", "returnfeed_qc_markers",
                         "returnfeed_qc_worker_restarts"}
        assert qc.cpu_seconds.get("cam1", 0) > 0  # reported with the detach, before "stopped"
    finally:
        await qc.stop()


async def test_a_killed_worker_is_restarted_and_streams_reattach(clip) -> None:
    hub = StreamHub()
    sink = RecordingSink()
    qc = QcService(QcSettings(enabled=True), hub, sink, poll_s=0.05)
    await qc.start()
    try:
        stream = hub.get_or_create("cam2")
        pub = stream.attach_publisher(SourceInfo("test"))
        kind, codec, t, key, data = clip[0]
        pub.publish(Unit(codec, round(t * 90000), round(t * 90000), key, data))
        await until(lambda: [s for s in sink.states if s[1] == "running"])
        first = qc.host.slots[0].worker
        old_pid = first.pid
        os.kill(old_pid, signal.SIGKILL)
        await until(lambda: [s for s in sink.states if s[1] == "restarting"])
        restarting = [s for s in sink.states if s[1] == "restarting"][0]
        assert "restarting in 0.5 s" in restarting[2]
        await until(lambda: sink.states[-1][1] == "running" and qc.worker_restarts == 1)
        assert qc.host.slots[0].worker.pid != old_pid and qc.host.slots[0].worker.alive()
        # Frames still flow into the new worker.
        for kind, codec, t, key, data in clip[1:]:
            pub.publish(Unit(codec, round(t * 90000), round(t * 90000), key, data))
            await asyncio.sleep(0)
        await until(lambda: [m for m in sink.markers if m[1].marker.type == "black" and m[1].kind == "open"])
        restarts = next(m for m in qc.collect() if m.name == "returnfeed_qc_worker_restarts")
        assert restarts.samples[0].value == 1
    finally:
        await qc.stop()
    assert not first.alive()


async def test_disabled_streams_are_not_tapped(clip) -> None:
    hub = StreamHub()
    sink = RecordingSink()
    qc = QcService(QcSettings(enabled=True, disabled_streams=["quiet"]), hub, sink, poll_s=0.05)
    await qc.start()
    try:
        await publish(hub, "quiet", clip[:30])
        await publish(hub, "loud", clip[:30])
        await until(lambda: [s for s in sink.states if s[0] == "loud" and s[1] == "running"])
        assert "quiet" not in qc.host.taps and not [s for s in sink.states if s[0] == "quiet"]
    finally:
        await qc.stop()


async def test_stopping_the_service_closes_open_markers_into_the_sink(clip) -> None:
    hub = StreamHub()
    sink = RecordingSink()
    qc = QcService(QcSettings(enabled=True, queue_frames=1024), hub, sink, poll_s=0.05)
    await qc.start()
    origin = min(p[2] for p in clip)
    # Up to 0.3 s past where black reaches black_d: the marker is open, not closed.
    partial = [p for p in clip if p[2] < origin + BLACK_START + 2.3]
    await publish(hub, "cam3", partial[:1])
    await until(lambda: [s for s in sink.states if s[1] == "running"])
    await publish(hub, "cam3", partial[1:])
    await until(lambda: [m for m in sink.markers if m[1].marker.type == "black"])
    await qc.stop()
    black = [m[1] for m in sink.markers if m[1].marker.type == "black"]
    assert [e.kind for e in black] == ["open", "close"]
    assert sink.states[-1][1] == "stopped"
    assert qc.host.slots[0].worker is None
