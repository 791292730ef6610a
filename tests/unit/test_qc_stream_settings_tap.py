"""Per-stream QC settings reaching the tap: the worker's ``thresholds``
message (live_qc/tap.py worker_main), and QcService following a stream's
effective settings: workers start with the first enabled stream, a stream
attaches/detaches within a poll, thresholds changes reach the worker."""

from __future__ import annotations

import asyncio
import queue

from live_qc.tap import worker_main
from media.stream import StreamHub
from server.config import QcSettings
from server.qc_service import QcService
from server.stream_settings import StreamSettings
from test_qc_tap import BLACK_END, BLACK_START, clip, make_clip, packets  # noqa: F401 (fixture)
from helpers import until
from test_qc_tap_service import RecordingSink, publish


class Pipe:
    def __init__(self) -> None:
        self.sent: list[tuple] = []

    def send(self, batch: list[tuple]) -> None:
        self.sent.extend(batch)

    def close(self) -> None:
        pass


def run_worker(messages: list[tuple]) -> list[tuple]:
    """worker_main in this process over a plain queue, until its 'stop'."""
    q: queue.Queue = queue.Queue()
    for m in messages + [("stop",)]:
        q.put(m)
    out = Pipe()
    worker_main(q, out, None)
    return out.sent


def frames(name: str, pkts: list[tuple]) -> list[tuple]:
    return [("video", name, codec, t, key, data) if kind == "video" else ("audio", name, codec, t, data)
            for kind, codec, t, key, data in pkts]


def black(results: list[tuple], name: str) -> list[str]:
    return [r[2].kind for r in results if r[0] == "marker" and r[1] == name and r[2].marker.type == "black"]


def test_worker_applies_new_thresholds_to_an_attached_stream(clip) -> None:
    origin = min(p[2] for p in clip)
    # "long": black_d raised past the 2.5 s of black before any frame → no marker.
    # "open": the change comes while the black marker is open → it closes at
    # the change and the rest of the black (under the new 5 s) opens nothing.
    # "same": no change → the marker opens and closes with the black.
    # "bad": a mapping the worker cannot use keeps the old thresholds.
    during = [p for p in clip if p[2] < origin + BLACK_START + 2.3]
    after = clip[len(during):]
    msgs = [("attach", n, {}) for n in ("long", "open", "same", "bad")]
    msgs += [("thresholds", "long", {"black_d": 5.0}), ("thresholds", "bad", {"black_d": "x", "nope": 1})]
    msgs += frames("long", clip) + frames("same", clip) + frames("bad", clip) + frames("open", during)
    msgs += [("thresholds", "open", {"black_d": 5.0})] + frames("open", after)
    msgs += [("thresholds", "nobody", {"black_d": 5.0})]  # not attached: ignored
    results = run_worker(msgs)
    assert black(results, "long") == []
    assert black(results, "same") == ["open", "close"]
    assert black(results, "bad") == ["open", "close"]
    assert black(results, "open") == ["open", "close"]
    closed = [r[2].marker for r in results if r[0] == "marker" and r[1] == "open" and r[2].kind == "close"
              and r[2].marker.type == "black"][0]
    assert closed.end < origin + BLACK_END - 0.1  # closed at the change, not at the end of the black
    assert [r for r in results if r[0] == "state" and r[1] == "bad" and "bad thresholds" in r[3]]
    # Decoding carried on through the change: no decode errors, meters kept coming.
    assert not [r for r in results if r[0] == "marker" and r[2].marker.subtype == "decode_error"]


class Switchable:
    """A settings store the test flips."""

    def __init__(self) -> None:
        self.store = StreamSettings(QcSettings())
        self.docs: dict[str, dict] = {}

    def set(self, name: str, qc: dict) -> None:
        self.docs[name] = {"qc": qc}
        self.store.update(self.docs)


async def test_service_follows_per_stream_settings(clip) -> None:
    hub = StreamHub()
    sink = RecordingSink()
    settings = Switchable()
    qc = QcService(QcSettings(queue_frames=1024), hub, sink, poll_s=0.05, qc_for=settings.store.qc_for)
    settings.store.listeners.append(qc.settings_changed)
    await qc.start()
    try:
        origin = min(p[2] for p in clip)
        during = [p for p in clip if p[2] < origin + BLACK_START + 2.3]
        await publish(hub, "cam", during[:20])
        await asyncio.sleep(0.3)
        # QC off by default ([qc] enabled = false): nothing tapped, no worker process.
        assert not qc.host.taps and all(s.worker is None for s in qc.host.slots)
        settings.set("cam", {"enabled": True})
        # The listener attaches at once; the worker starts with its first stream.
        assert "cam" in qc.host.taps and qc.host.slots[0].worker is not None
        await until(lambda: [s for s in sink.states if s[0] == "cam" and s[1] == "running"])
        await publish(hub, "cam", during[20:])
        await until(lambda: [m for m in sink.markers if m[1].marker.type == "black"])
        # A threshold change reaches the worker: the open marker closes at the change.
        settings.set("cam", {"enabled": True, "thresholds": {"black_d": 5.0}})
        assert qc.host.taps["cam"].spec.options["black_d"] == 5.0
        await until(lambda: [m for m in sink.markers if m[1].marker.type == "black" and m[1].kind == "close"])
        # Switched off: detached within one poll, its worker told.
        settings.set("cam", {"enabled": False})
        assert "cam" not in qc.host.taps
        await until(lambda: [s for s in sink.states if s[0] == "cam" and s[1] == "stopped"])
        # On again, and this time only the poll notices: attached within a poll.
        settings.store.listeners.remove(qc.settings_changed)
        settings.set("cam", {"enabled": True})
        assert "cam" not in qc.host.taps
        await until(lambda: "cam" in qc.host.taps, timeout=5)
        assert qc.enabled_for("cam")
    finally:
        await qc.stop()


async def test_config_default_still_enables_every_stream_without_stored_settings(clip) -> None:
    hub = StreamHub()
    sink = RecordingSink()
    store = StreamSettings(QcSettings(enabled=True))
    store.update({"off": {"qc": {"enabled": False}}})
    qc = QcService(QcSettings(enabled=True), hub, sink, poll_s=0.05, qc_for=store.qc_for)
    await qc.start()
    try:
        await publish(hub, "off", clip[:30])
        await publish(hub, "on", clip[:30])
        await until(lambda: [s for s in sink.states if s[0] == "on" and s[1] == "running"])
        assert "off" not in qc.host.taps
    finally:
        await qc.stop()
