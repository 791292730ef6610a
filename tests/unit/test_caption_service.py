"""CaptionService on TapHost with a stand-in worker process (the caption
worker's messages, scripted by audio payloads: caption_fake_worker.py):
attach/detach by options, wall clock, restart with backoff, drops counted,
metrics; and the ``[captions]`` options."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from caption_fake_worker import FakeCaptionWorker
from helpers import Unit, until
from live_qc.tap import TapWorker
from media.stream import SourceInfo, StreamHub
from server.caption_service import CaptionService, default_options_for
from server.config import CaptionSettings
from server.tap_host import next_backoff


class Sink:
    def __init__(self) -> None:
        self.captions: list[tuple] = []
        self.states: list[tuple] = []

    def caption(self, stream, cap, *, wall_start, wall_end):
        self.captions.append((stream, cap, wall_start, wall_end))

    def caption_state(self, stream, state, detail=""):
        self.states.append((stream, state, detail))


class Store:
    def __init__(self) -> None:
        self.rows: list[tuple] = []

    def add(self, stream, cap, *, wall_start, wall_end, translated=False):
        self.rows.append((stream, cap.text, translated))

    def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def collect(self):
        return iter(())


def audio(t: float, data: bytes) -> Unit:
    return Unit("opus", round(t * 90000), round(t * 90000), True, data)


def live(hub: StreamHub, name: str):
    stream = hub.get_or_create(name)
    stream.attach_publisher(SourceInfo("test"))
    stream.publishers[0].publish(audio(0.0, b"first"))  # makes the audio track: the stream is live
    return stream


def service(options: dict[str, dict | None], sink: Sink, store: Store | None = None, **kw) -> CaptionService:
    settings = CaptionSettings(enabled=True, **kw)
    return CaptionService(settings, StreamHub(), sink, store, options_for=lambda name: options.get(name),
                          make_worker=lambda i: FakeCaptionWorker(settings.queue_frames, i), poll_s=0.05)


def test_backoff_doubles_from_half_a_second_to_thirty() -> None:
    delays = [next_backoff(None)]
    for _ in range(7):
        delays.append(next_backoff(delays[-1]))
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_options_from_config_and_the_streams_own_settings(tmp_path: Path) -> None:
    s = CaptionSettings(enabled=False, language="EN", disabled_streams=["muted"])
    own = {"camB": {"enabled": True, "language": "auto", "translate": True},
           "camC": {"enabled": True, "model": "base", "language": "ko"}, "muted": {"enabled": True}}
    options_for = default_options_for(s, tmp_path, own.get)
    assert options_for("camA") is None  # off by default
    assert options_for("camB") == {"model": "tiny.en", "language": None, "translate": True,
                                   "data_dir": str(tmp_path), "cpu_threads": 2}
    assert options_for("camC")["model"] == "base" and options_for("camC")["language"] == "ko"
    assert options_for("muted") is None  # disabled_streams wins
    on = default_options_for(CaptionSettings(enabled=True), tmp_path)
    assert on("camA")["language"] is None and on("camA")["model"] == "tiny.en"
    off_for_one = default_options_for(CaptionSettings(enabled=True), tmp_path, {"camA": {"enabled": False}}.get)
    assert off_for_one("camA") is None and off_for_one("camZ") is not None
    with pytest.raises(ValueError):
        CaptionSettings(language="english!")

    @dataclass(frozen=True)
    class Effective:  # the shape of the API's effective per-stream settings
        enabled: bool
        language: str | None
        translate: bool
        model: str | None

    eff = {"camA": Effective(True, None, False, None), "camB": Effective(True, "es", True, "base"),
           "camC": Effective(False, "en", False, None)}
    from_api = default_options_for(CaptionSettings(language="en"), tmp_path, eff.get)
    assert from_api("camA")["language"] is None and from_api("camA")["model"] == "tiny.en"  # null: detect
    assert (from_api("camB")["language"], from_api("camB")["translate"], from_api("camB")["model"]) == \
        ("es", True, "base")
    assert from_api("camC") is None and from_api("camZ") is None  # off, and off by default
    explicit_null = default_options_for(CaptionSettings(enabled=True, language="en"), tmp_path,
                                        {"camA": {"language": None}}.get)
    assert explicit_null("camA")["language"] is None and explicit_null("camB")["language"] == "en"


async def test_captions_of_an_enabled_stream_reach_sink_and_store_with_wall_clock() -> None:
    sink, store = Sink(), Store()
    opts = {"cam1": {"model": "tiny.en", "language": "en", "translate": True}}
    svc = service(opts, sink, store)
    await svc.start()
    try:
        # No worker process until a stream needs one.
        assert all(slot.worker is None for slot in svc.host.slots)
        hub = svc.host.hub
        cam1, cam2 = live(hub, "cam1"), live(hub, "cam2")
        await until(lambda: ("cam1", "running") in [(s, st) for s, st, _ in sink.states])
        assert "language" in [d for s, st, d in sink.states if s == "cam1"][0]
        pub = cam1.publishers[0]
        began = time.time()
        pub.publish(audio(10.0, b"hyp:hello"))
        pub.publish(audio(10.5, b"say:hello WORLD"))
        cam2.publishers[0].publish(audio(3.0, b"say:never captioned"))  # options None: not tapped
        await until(lambda: len(sink.captions) == 2)
        (s1, partial, _, _), (s2, final, ws, we) = sink.captions
        assert (s1, partial.final, partial.text) == ("cam1", False, "hello")
        assert (s2, final.final, final.text) == ("cam1", True, "hello WORLD")
        # Media 10.5 was published at about `began`: the wall clock follows.
        assert began - 1 < ws < time.time() + 1
        assert we - ws == pytest.approx(final.end - final.start, abs=1e-3)
        assert store.rows == [("cam1", "hello WORLD", True)]  # finals only, with the stream's translate
        assert svc.captions_total == {("cam1", "partial"): 1, ("cam1", "final"): 1}
        assert svc.words_total == {"cam1": 2}
        await until(lambda: svc.stats.get("cam1") and svc.stats["cam1"].rtf == 0.25)
        names = {m.name for m in svc.collect()}
        assert names >= {"returnfeed_captions_rtf", "returnfeed_captions_lag_seconds",
                         "returnfeed_captions_skipped_seconds", "returnfeed_captions_cpu_seconds",
                         "returnfeed_captions_frames_dropped", "returnfeed_captions_worker_restarts",
                         "returnfeed_captions"}
        assert "cam2" not in svc.host.taps
    finally:
        await svc.stop()
    assert ("cam1", "stopped", "worker stopping") in sink.states


async def test_turning_captions_off_detaches_and_changed_options_reattach() -> None:
    sink = Sink()
    opts: dict[str, dict | None] = {"cam1": {"language": "en"}}
    svc = service(opts, sink)
    await svc.start()
    try:
        live(svc.host.hub, "cam1")
        await until(lambda: [st for s, st, _ in sink.states if st == "running"])
        opts["cam1"] = {"language": "es"}
        await until(lambda: any("'es'" in d for _, st, d in sink.states if st == "running"))
        assert [st for _, st, _ in sink.states] == ["running", "stopped", "running"]
        opts["cam1"] = None
        await until(lambda: len(sink.states) == 4)
        assert sink.states[-1][:2] == ("cam1", "stopped") and not svc.host.taps
    finally:
        await svc.stop()


async def test_a_crashed_worker_is_restarted_with_backoff_and_its_streams_reattach() -> None:
    sink = Sink()
    svc = service({"cam1": {}, "cam2": {}}, sink)
    await svc.start()
    try:
        hub = svc.host.hub
        cam1, _ = live(hub, "cam1"), live(hub, "cam2")
        await until(lambda: len([1 for _, st, _ in sink.states if st == "running"]) == 2)
        first = svc.host.slots[0].worker
        cam1.publishers[0].publish(audio(0.5, b"x"))
        await until(lambda: svc.stats.get("cam1") and svc.stats["cam1"].skipped_s == 1.5)
        cam1.publishers[0].publish(audio(1.0, b"die"))
        await until(lambda: len([1 for _, st, _ in sink.states if st == "restarting"]) == 2)
        assert "exited (3)" in sink.states[-1][2] and svc.host.slots[0].delay == 0.5
        await until(lambda: len([1 for _, st, _ in sink.states if st == "running"]) == 4)
        assert svc.worker_restarts == 1 and svc.host.slots[0].worker is not first
        # The tap kept its reader: what comes now is captioned by the new worker.
        cam1.publishers[0].publish(audio(2.0, b"say:back again"))
        await until(lambda: sink.captions)
        assert sink.captions[0][1].text == "back again"
        # Skipped audio adds up over both workers (each reports 1.5 s in total).
        await until(lambda: svc.stats["cam1"].skipped_s == 3.0)
        # Dying again soon after a start doubles the delay.
        cam1.publishers[0].publish(audio(3.0, b"die"))
        await until(lambda: len([1 for _, st, _ in sink.states if st == "restarting"]) == 4)
        assert svc.host.slots[0].delay == 1.0
        await until(lambda: svc.worker_restarts == 2)
    finally:
        await svc.stop()


async def test_a_worker_that_falls_behind_drops_and_counts_never_blocks() -> None:
    sink = Sink()
    svc = service({"cam1": {}}, sink, queue_frames=8)
    await svc.start()
    try:
        cam1 = live(svc.host.hub, "cam1")
        await until(lambda: sink.states)
        pub = cam1.publishers[0]
        pub.publish(audio(1.0, b"slow:1.5"))
        began = time.monotonic()
        for i in range(200):
            pub.publish(audio(1.02 + i * 0.02, b"x"))
            if i % 10 == 0:
                await asyncio.sleep(0.001)
        # Publishing 200 frames never waited for the sleeping worker.
        assert time.monotonic() - began < 1.0
        totals = await until(lambda: {k: n for k, n in svc.host.drop_totals().items() if n})
        assert sum(totals.values()) > 0 and {s for s, _ in totals} == {"cam1"}
        dropped = {tuple(s.labels.values()): s.value for m in svc.collect()
                   if m.name == "returnfeed_captions_frames_dropped" for s in m.samples}
        assert sum(dropped.values()) == sum(svc.host.drop_totals().values())
    finally:
        await svc.stop()


async def test_a_killed_worker_is_noticed_and_stop_leaves_no_process() -> None:
    sink = Sink()
    svc = service({"cam1": {}}, sink)
    await svc.start()
    live(svc.host.hub, "cam1")
    await until(lambda: sink.states)
    pid = svc.host.slots[0].worker.pid
    os.kill(pid, signal.SIGKILL)
    await until(lambda: any(st == "restarting" for _, st, _ in sink.states))
    await until(lambda: svc.worker_restarts == 1 and svc.host.slots[0].worker is not None)
    new = svc.host.slots[0].worker.proc
    await svc.stop()
    assert not new.is_alive() and all(slot.worker is None for slot in svc.host.slots)


async def test_a_worker_that_cannot_start_is_retried_and_a_bad_stream_setting_skips_only_that_stream() -> None:
    sink = Sink()
    settings = CaptionSettings(enabled=True)
    made: list[int] = []

    def make(i: int) -> TapWorker:
        made.append(i)
        if len(made) == 1:
            raise ImportError("no caption engine here")
        return FakeCaptionWorker(settings.queue_frames, i)

    def options_for(name: str) -> dict | None:
        if name == "broken":
            raise KeyError(name)
        return {}

    svc = CaptionService(settings, StreamHub(), sink, None, options_for=options_for, make_worker=make, poll_s=0.05)
    await svc.start()
    try:
        live(svc.host.hub, "broken")
        live(svc.host.hub, "cam1")
        # The first start fails; the backoff's restart attaches cam1 all the same.
        await until(lambda: ("cam1", "running") in [(s, st) for s, st, _ in sink.states])
        assert len(made) == 2 and svc.worker_restarts == 1
        assert set(svc.host.taps) == {"cam1"}
    finally:
        await svc.stop()
