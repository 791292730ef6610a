"""QcService runs the stream detectors (live_qc/stream.py) on the loop: a
track that stops on the wall clock and a publisher's counters that grow
become stall and transport markers in the sink, with wall-clock times."""

from __future__ import annotations

import asyncio
import time

import pytest

from helpers import Unit, until
from media.stream import SourceInfo, StreamHub
from server.config import QcSettings
from server.qc_service import QcService
from test_qc_tap_service import RecordingSink

IDR = b"\x00\x00\x00\x01\x65\x88\x84\x00\x33"
OPUS = b"\xfc\xff\xfe"  # TOC: CELT 20 ms stereo


async def test_stall_and_transport_markers_reach_the_sink_with_wall_clock_times() -> None:
    hub = StreamHub()
    sink = RecordingSink()
    settings = QcSettings(enabled=True, thresholds={"stall_d": 0.6, "transport_clear_s": 0.4})
    qc = QcService(settings, hub, sink, poll_s=0.05)
    await qc.start()
    counters = {"packets": 0, "cc_error": 0, "pat_error": 0}
    try:
        stream = hub.get_or_create("cam")
        pub = stream.attach_publisher(SourceInfo("test"))
        pub.set_source_counters(lambda: dict(counters))
        began = time.monotonic()
        wall_began = time.time()
        video_gap = (1.0, 2.2)
        cc_at = 1.5
        next_video = next_audio = 0.0
        while (t := time.monotonic() - began) < 3.2:
            counters["packets"] += 7
            if t >= cc_at and not counters["cc_error"]:
                counters["cc_error"] = 2
            while next_audio <= t:
                pub.publish(Unit("opus", round(next_audio * 90000), round(next_audio * 90000), True, OPUS))
                next_audio += 0.02
            while next_video <= t:
                if not video_gap[0] <= next_video < video_gap[1]:
                    pub.publish(Unit("h264", round(next_video * 90000), round(next_video * 90000), True, IDR))
                next_video += 0.04
            await asyncio.sleep(0.01)
        await until(lambda: [m for m in sink.markers if m[1].marker.subtype == "cc_error" and m[1].kind == "close"],
                    timeout=5)
        stall = [(ev.kind, ev.marker, ws, we) for _, ev, ws, we in sink.markers if ev.marker.subtype == "video_stalled"]
        assert [k for k, *_ in stall] == ["open", "close"]
        _, marker, ws, we = stall[-1]
        assert marker.type == "stall"
        assert marker.start == pytest.approx(1.0, abs=0.1)  # media time: where the frame was due
        assert marker.end == pytest.approx(2.2, abs=0.15)
        assert abs(ws - (wall_began + 1.0)) < 0.3 and abs(we - (wall_began + 2.2)) < 0.3
        cc = [(ev.kind, ev.marker) for _, ev, _, _ in sink.markers if ev.marker.subtype == "cc_error"]
        assert [k for k, _ in cc] == ["open", "close"]
        assert cc[0][1].type == "transport" and cc[0][1].severity == "error"
        assert cc[-1][1].metadata == {"count": 2, "total": 2}
        assert not [m for m in sink.markers if m[1].marker.subtype in ("pat_error", "audio_stalled")]
        assert qc.markers_total.get("stall") == 1  # (the worker adds its own transport decode_error)
    finally:
        await qc.stop()


async def test_detach_closes_an_open_stream_marker() -> None:
    hub = StreamHub()
    sink = RecordingSink()
    qc = QcService(QcSettings(enabled=True, thresholds={"transport_clear_s": 30.0}), hub, sink, poll_s=0.05)
    await qc.start()
    counters = {"packets": 0, "crc_error": 0}
    try:
        stream = hub.get_or_create("cam2")
        pub = stream.attach_publisher(SourceInfo("test"))
        pub.set_source_counters(lambda: dict(counters))
        for i in range(10):
            pub.publish(Unit("h264", i * 3600, i * 3600, True, IDR))
            await asyncio.sleep(0.05)
        await until(lambda: "cam2" in qc._monitors)
        await asyncio.sleep(0.3)  # the first sample is the baseline
        counters["crc_error"] = 1
        await until(lambda: [m for m in sink.markers if m[1].marker.subtype == "crc_error"])
        stream.close()
        await until(lambda: [m for m in sink.markers if m[1].marker.subtype == "crc_error" and m[1].kind == "close"])
        assert "cam2" not in qc._monitors
    finally:
        await qc.stop()


async def test_a_failing_monitor_is_dropped_and_the_tap_carries_on(monkeypatch) -> None:
    import server.qc_service as qc_service
    from live_qc.stream import StreamMonitor

    class Broken(StreamMonitor):
        def on_frame(self, *args, **kwargs):
            raise RuntimeError("detector bug")

    monkeypatch.setattr(qc_service, "StreamMonitor", Broken)
    hub = StreamHub()
    sink = RecordingSink()
    qc = QcService(QcSettings(enabled=True), hub, sink, poll_s=0.05)
    await qc.start()
    try:
        stream = hub.get_or_create("cam3")
        pub = stream.attach_publisher(SourceInfo("test"))
        for i in range(20):
            pub.publish(Unit("h264", i * 3600, i * 3600, True, IDR))
            await asyncio.sleep(0.02)
        await until(lambda: "cam3" in qc._monitor_failed)
        task = qc.host.taps["cam3"].task
        for i in range(20, 30):
            pub.publish(Unit("h264", i * 3600, i * 3600, True, IDR))
            await asyncio.sleep(0.02)
        assert "cam3" in qc.host.taps and not task.done()  # forwarding to the worker goes on
        assert "cam3" not in qc._monitors
    finally:
        await qc.stop()


async def test_a_streams_own_thresholds_reach_its_stream_detectors() -> None:
    """Per-stream settings (server/stream_settings.py) drive the stream
    detectors too; a change closes what is open and starts over with them."""
    from server.stream_settings import QcStreamSettings

    per_stream = {"cam4": {"transport_clear_s": 30.0}}
    hub = StreamHub()
    sink = RecordingSink()
    qc = QcService(QcSettings(enabled=True), hub, sink, poll_s=0.05,
                   qc_for=lambda name: QcStreamSettings(True, dict(per_stream.get(name, {}))))
    await qc.start()
    counters = {"packets": 0, "crc_error": 0}
    try:
        stream = hub.get_or_create("cam4")
        pub = stream.attach_publisher(SourceInfo("test"))
        pub.set_source_counters(lambda: dict(counters))
        for i in range(10):
            pub.publish(Unit("h264", i * 3600, i * 3600, True, IDR))
            await asyncio.sleep(0.05)
        await until(lambda: "cam4" in qc._monitors)
        assert qc._monitors["cam4"].th.transport_clear_s == 30.0
        await asyncio.sleep(0.3)  # the first sample is the baseline
        counters["crc_error"] = 1
        await until(lambda: [m for m in sink.markers if m[1].marker.subtype == "crc_error"])
        per_stream["cam4"] = {"transport_clear_s": 5.0}
        qc.settings_changed({"cam4"})
        # the open marker closes at the change, and the next frame builds a
        # monitor with the new value
        await until(lambda: [m for m in sink.markers if m[1].marker.subtype == "crc_error" and m[1].kind == "close"])
        pub.publish(Unit("h264", 10 * 3600, 10 * 3600, True, IDR))
        await until(lambda: "cam4" in qc._monitors)
        assert qc._monitors["cam4"].th.transport_clear_s == 5.0
    finally:
        await qc.stop()
