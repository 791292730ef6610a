"""TapHost's owner hooks (server/tap_host.py): changed options sent as a
control message instead of a re-attach (QC's thresholds), every frame and
discontinuity shown to the owner, the tap's end reported, and a tapped
stream the owner no longer wants detached while it reconnects. The worker
is an in-process stand-in that records what the host sends it."""

from __future__ import annotations

import logging
import os
import time

from helpers import Unit, until
from media.stream import SourceInfo, StreamHub, StreamState
from server.tap_host import TapHost, TapSpec


class Channel:
    def __init__(self) -> None:
        self.drops: dict[tuple[str, str], int] = {}
        self.sent: list[tuple] = []

    def put_video(self, stream, codec, t, keyframe, data) -> bool:
        self.sent.append(("video", stream, t))
        return True

    def put_audio(self, stream, codec, t, data) -> bool:
        self.sent.append(("audio", stream, t))
        return True

    def control(self, msg: tuple) -> bool:
        self.sent.append(msg)
        return True


class Proc:
    exitcode = None

    def join(self, timeout=None) -> None:
        pass


class Worker:
    """Pipes for the results and the sentinel (the host watches both);
    nothing ever arrives on them."""

    def __init__(self) -> None:
        self.channel: Channel | None = None
        self.results = None
        self.proc = None
        self.eof = False
        self.started_at = time.monotonic()
        self._fds: list[int] = []

    def start(self) -> None:
        r, w = os.pipe()
        s, t = os.pipe()
        self._fds = [r, w, s, t]
        self.results = os.fdopen(r, "rb", buffering=0, closefd=False)
        self._sentinel = s
        self.proc = Proc()
        self.channel = Channel()

    @property
    def sentinel(self) -> int:
        return self._sentinel

    @property
    def pid(self) -> int | None:
        return None

    def receive(self) -> list[tuple]:
        return []

    def request_stop(self) -> None:
        pass

    def close(self, timeout: float = 5.0) -> None:
        self.discard()

    def discard(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


class Owner:
    def __init__(self, hub: StreamHub, **kw) -> None:
        self.options: dict[str, dict | None] = {}
        self.updated: list[str] = []
        self.frames: list[tuple[str, str, int | None]] = []
        self.discontinuities: list[tuple[str, str]] = []
        self.detached: list[str] = []
        self.workers: list[Worker] = []
        self.host = TapHost(hub, name="test", workers=1, queue_frames=64, make_worker=self.make,
                            select=self.select, handle=lambda msg: None, on_state=lambda *a: None,
                            logger=logging.getLogger("test.tap_host"), poll_s=0.02, lazy=True,
                            on_frame=lambda name, f: self.frames.append((name, f.kind, f.pts)),
                            on_discontinuity=lambda name, d: self.discontinuities.append((name, d.reason)),
                            on_detach=self.detached.append, **kw)

    def make(self, index: int) -> Worker:
        w = Worker()
        self.workers.append(w)
        return w

    def select(self, stream) -> TapSpec | None:
        options = self.options.get(stream.name)
        return None if options is None else TapSpec(None, ("audio",), options)

    @property
    def sent(self) -> list[tuple]:
        return self.workers[-1].channel.sent


def publish_audio(pub, i: int) -> None:
    pub.publish(Unit("opus", i * 1800, i * 1800, True, b"a%d" % i))


async def tapped(owner: Owner, hub: StreamHub, options: dict):
    """Stream "cam", live (its first audio frame), tapped with ``options``."""
    owner.options["cam"] = options
    await owner.host.start()
    stream = hub.get_or_create("cam")
    pub = stream.attach_publisher(SourceInfo("test"))
    publish_audio(pub, 0)
    await until(lambda: "cam" in owner.host.taps)
    return stream, pub


async def test_changed_options_go_to_the_worker_as_the_update_message_without_a_reattach() -> None:
    hub = StreamHub()
    owner = Owner(hub, update_op="thresholds", on_update=lambda name: owner.updated.append(name))
    try:
        await tapped(owner, hub, {"black_d": 2.0})
        reader = owner.host.taps["cam"].reader
        assert owner.sent[0] == ("attach", "cam", {"black_d": 2.0})
        owner.options["cam"] = {"black_d": 5.0}
        owner.host.sync()
        assert owner.sent[-1] == ("thresholds", "cam", {"black_d": 5.0}) and owner.updated == ["cam"]
        assert owner.host.taps["cam"].reader is reader and owner.detached == []
        assert owner.host.taps["cam"].spec.options == {"black_d": 5.0}
        owner.host.sync()  # unchanged since: nothing more is sent
        assert owner.sent[-1] == ("thresholds", "cam", {"black_d": 5.0}) and owner.updated == ["cam"]
    finally:
        await owner.host.stop()


async def test_without_an_update_message_changed_options_reattach() -> None:
    hub = StreamHub()
    owner = Owner(hub)
    try:
        await tapped(owner, hub, {"language": "en"})
        owner.options["cam"] = {"language": "ko"}
        owner.host.sync()
        assert owner.sent[-2:] == [("detach", "cam"), ("attach", "cam", {"language": "ko"})]
        assert owner.detached == ["cam"]
    finally:
        await owner.host.stop()


async def test_the_owner_sees_every_frame_and_discontinuity_and_the_taps_end() -> None:
    hub = StreamHub()
    owner = Owner(hub)
    try:
        stream, pub = await tapped(owner, hub, {})
        for i in range(1, 5):
            publish_audio(pub, i)
        pub.discontinuity()
        publish_audio(pub, 5)
        # (The first frame made the stream live before the tap: audio has no cache.)
        await until(lambda: len(owner.frames) == 5)
        assert [pts for _, _, pts in owner.frames] == [i * 1800 for i in range(1, 6)]
        assert owner.discontinuities == [("cam", "source")]
        # What the worker got, in the same order: the reset between the frames.
        assert [m[0] for m in owner.sent] == ["attach"] + ["audio"] * 4 + ["reset", "audio"]
        stream.close()
        await until(lambda: owner.detached == ["cam"])
        assert "cam" not in owner.host.taps
    finally:
        await owner.host.stop()


async def test_a_reconnecting_stream_keeps_its_tap_unless_the_owner_no_longer_wants_it() -> None:
    hub = StreamHub()
    owner = Owner(hub)
    try:
        stream, pub = await tapped(owner, hub, {})
        stream.detach_publisher(pub)
        assert stream.state == StreamState.RECONNECTING
        owner.host.sync()
        assert "cam" in owner.host.taps  # within its grace period
        owner.options["cam"] = None
        owner.host.sync()
        assert "cam" not in owner.host.taps and owner.sent[-1] == ("detach", "cam")
    finally:
        await owner.host.stop()

