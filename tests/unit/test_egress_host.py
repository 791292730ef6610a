"""EgressHost's books with fake workers: assignment, feeds, death and restart,
figures summed across workers (server/egress_host.py)."""

from __future__ import annotations

import asyncio
import itertools
import socket
from typing import Any

import pytest

from media.errors import NoCapacity, UnsupportedMedia
from media.webrtc.egress_worker import (
    ControlChannel, LatencyCounts, SessionState, WorkerConfig, WorkerStats, error_from_reply,
)
from media.webrtc.sdp import SdpError
from media.webrtc.viewer import SessionStats
from server import egress_host
from server.egress_host import EgressHost


class FakeStream:
    def __init__(self, name: str) -> None:
        self.name = name


class FakePacketizer:
    made: list["FakePacketizer"] = []

    def __init__(self, stream: FakeStream) -> None:
        self.stream = stream
        self.subscribers: list[Any] = []
        self.closed = False
        self.started = False
        FakePacketizer.made.append(self)

    def start(self) -> None:
        self.started = True

    def subscribe(self, emit: Any) -> None:
        self.subscribers.append(emit)

    def unsubscribe(self, emit: Any) -> None:
        self.subscribers.remove(emit)

    def close(self) -> None:
        self.closed = True


class FakeLink:
    made: list["FakeLink"] = []
    ids = itertools.count(1)

    def __init__(self, index: int, config: WorkerConfig) -> None:
        self.index = index
        self.pid = 1000 + next(self.ids)
        self.calls: list[tuple[str, tuple]] = []
        self.sent: list[tuple] = []
        self.fed: list[Any] = []
        self.errors: dict[str, BaseException] = {}
        self.stopped = False
        self.feed_drops = 0
        self.feed_queued_bytes = 0
        self.fail_start = False
        FakeLink.made.append(self)

    async def start(self) -> None:
        if self.fail_start:
            raise ConnectionError("no")

    async def call(self, method: str, *args: Any) -> Any:
        self.calls.append((method, args))
        await asyncio.sleep(0)
        if method in self.errors:
            raise self.errors[method]
        if method == "create":
            return {"id": f"w{self.index}-{next(self.ids)}", "sdp": "v=0\r\n", "etag": '"e"', "answer_note": "",
                    "layer": None, "created": 1.0}
        if method == "close":
            self.on_message(("closed", args[0], args[1]))
        return True

    def send(self, msg: tuple) -> None:
        self.sent.append(msg)

    def feed(self, ev: Any) -> None:
        self.fed.append(ev)

    async def stop(self, timeout: float) -> None:
        self.stopped = True

    def kill(self) -> None:
        self.on_exit()

    def methods(self) -> list[str]:
        return [m for m, _ in self.calls]


@pytest.fixture(autouse=True)
def _fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeLink.made = []
    FakePacketizer.made = []
    monkeypatch.setattr(egress_host, "next_backoff", lambda d: 0.01)


def _host(n: int = 2, **kw: Any) -> EgressHost:
    return EgressHost(n, WorkerConfig(index=0), make_worker=FakeLink, make_packetizer=FakePacketizer, **kw)


async def _started(n: int = 2, **kw: Any) -> EgressHost:
    host = _host(n, **kw)
    host.start()
    assert await host.wait_ready(2.0)
    return host


async def _view(host: EgressHost, stream: FakeStream, **kw: Any) -> Any:
    return await host.create_session(stream, "v=0\r\n", None, owner="u:1", pin=kw.get("pin"), source_plid=None,
                                     b_frames=kw.get("b_frames", False))


def _stats(sessions: dict[str, SessionState], **kw: Any) -> WorkerStats:
    cfg = WorkerConfig(index=0)
    fwd = LatencyCounts(cfg.forwarding_buckets)
    for v in kw.pop("latencies", ()):
        fwd.observe(v)
    base = dict(totals=SessionStats(), send_errors={}, switches={}, drops={}, closed_by_reason={},
                forwarding=fwd, first_byte=LatencyCounts(cfg.first_byte_buckets))
    base.update(kw)
    return WorkerStats(sessions=sessions, **base)


def test_viewers_go_to_the_least_loaded_worker() -> None:
    async def main() -> None:
        host = await _started(2)
        s = FakeStream("cam")
        sessions = [await _view(host, s) for _ in range(5)]
        workers = [v.worker for v in sessions]
        assert sorted(workers) == [0, 0, 0, 1, 1]
        # Closing two on worker 0 makes it the emptier one: the next goes there.
        for v in [v for v in sessions if v.worker == 0][:2]:
            await v.close()
        assert (await _view(host, s)).worker == 0
        assert len(host.sessions) == 4
        await host.close()

    asyncio.run(main())


def test_concurrent_offers_count_as_load_while_being_answered() -> None:
    async def main() -> None:
        host = await _started(3)
        s = FakeStream("cam")
        sessions = await asyncio.gather(*(_view(host, s) for _ in range(6)))
        assert sorted(v.worker for v in sessions) == [0, 0, 1, 1, 2, 2]
        await host.close()

    asyncio.run(main())


def test_a_worker_gets_a_stream_once_while_it_has_viewers_of_it() -> None:
    async def main() -> None:
        host = await _started(2)
        cam, other = FakeStream("cam"), FakeStream("other")
        a = await _view(host, cam)       # worker 0
        b = await _view(host, cam)       # worker 1
        c = await _view(host, other)     # worker 0
        d = await _view(host, cam)       # worker 1
        assert [v.worker for v in (a, b, c, d)] == [0, 1, 0, 1]
        w0, w1 = FakeLink.made
        p_cam = host.packetizers["cam"]
        assert len(p_cam.subscribers) == 2 and p_cam.started
        assert w0.methods().count("open") == 2 and w1.methods().count("open") == 1
        # The worker opens the stream before its feed joins and before the offer.
        assert w1.methods()[:2] == ["open", "create"]
        await b.close()
        assert len(p_cam.subscribers) == 2  # d still watches on worker 1
        await d.close()
        await asyncio.sleep(0.01)
        assert len(p_cam.subscribers) == 1 and not p_cam.closed
        assert ("close_stream", ("cam",)) in w1.calls
        await a.close()
        await asyncio.sleep(0.01)
        assert p_cam.closed and "cam" not in host.packetizers
        assert not host.packetizers["other"].closed
        await host.close()

    asyncio.run(main())


def test_a_failed_offer_releases_the_feed() -> None:
    async def main() -> None:
        host = await _started(1)
        w0 = FakeLink.made[0]
        w0.errors["create"] = SdpError("no H.264")
        with pytest.raises(SdpError):
            await _view(host, FakeStream("cam"))
        await asyncio.sleep(0.01)
        assert FakePacketizer.made[0].closed and not FakePacketizer.made[0].subscribers
        assert host.slots[0].load == 0 and not host.sessions
        await host.close()

    asyncio.run(main())


def test_refusals_are_the_in_process_ones() -> None:
    async def main() -> None:
        host = await _started(1, max_viewers=1)
        with pytest.raises(UnsupportedMedia):
            await _view(host, FakeStream("cam"), b_frames=True)
        await _view(host, FakeStream("cam"))
        with pytest.raises(NoCapacity, match="^viewer limit reached$"):
            await _view(host, FakeStream("cam"))
        await host.close()
        empty = _host(1)  # never started: no worker (the 503 says so, not "limit")
        with pytest.raises(NoCapacity, match="^no egress worker is running$"):
            await _view(empty, FakeStream("cam"))

    asyncio.run(main())


def test_a_dying_worker_takes_only_its_viewers_and_is_restarted() -> None:
    async def main() -> None:
        host = await _started(2)
        cam = FakeStream("cam")
        views = [await _view(host, cam) for _ in range(4)]
        w0, w1 = FakeLink.made
        host._on_message(host.slots[0], w0, ("stats", _stats(
            {v.id: SessionState("high", False, "connected", False, {}) for v in views if v.worker == 0},
            totals=SessionStats(packets_sent=100), closed_by_reason={"deleted": 2}, latencies=[0.001])))
        before, _ = host.totals()
        w0.kill()
        dead = [v for v in views if v.worker == 0]
        alive = [v for v in views if v.worker == 1]
        assert all(v.closed and v.close_reason == "worker_died" for v in dead)
        assert all(not v.closed for v in alive)
        assert set(host.sessions) == {v.id for v in alive}
        assert host.closed_by_reason == {"deleted": 2, "worker_died": 2}
        after, _ = host.totals()
        assert after.packets_sent == before.packets_sent == 100  # counters never go down
        assert host.histogram("x", "x", "forwarding").counts().counts[2] == 1
        p = host.packetizers["cam"]
        assert len(p.subscribers) == 1  # only worker 1's feed is left
        assert not host.slots[0].live
        # Its figures in /metrics: down now, then up again, restarted once.
        fams = {f.name: f for f in host.collect_workers()}
        assert [s.value for s in fams["returnfeed_egress_worker_up"].samples] == [0, 1]
        assert await host.wait_ready(2.0)
        assert len(FakeLink.made) == 3 and host.slots[0].link is FakeLink.made[2]
        fams = {f.name: f for f in host.collect_workers()}
        assert [s.value for s in fams["returnfeed_egress_worker_restarts"].samples
                if s.name.endswith("_total")] == [1, 0]
        # The new worker takes new viewers (it is the emptier one).
        v = await _view(host, cam)
        assert v.worker == 0 and FakeLink.made[2].methods()[:2] == ["open", "create"]
        assert len(p.subscribers) == 2
        # A dead worker's session resource is gone for the routes (404).
        assert dead[0].id not in host.sessions
        with pytest.raises(KeyError):
            await dead[0].pin("low")
        await host.close()

    asyncio.run(main())


def test_a_worker_that_fails_to_start_is_retried() -> None:
    async def main() -> None:
        orig = FakeLink.start
        calls = {"n": 0}

        async def flaky(self: FakeLink) -> None:
            calls["n"] += 1
            if calls["n"] == 1:
                raise ConnectionError("did not start")
            await orig(self)

        FakeLink.start = flaky  # type: ignore[method-assign]
        try:
            host = await _started(1)
        finally:
            FakeLink.start = orig  # type: ignore[method-assign]
        assert calls["n"] == 2 and host.slots[0].live
        await host.close()

    asyncio.run(main())


def test_figures_are_summed_over_workers() -> None:
    async def main() -> None:
        host = await _started(2)
        cam = FakeStream("cam")
        a, b, c = [await _view(host, cam) for _ in range(3)]
        w0, w1 = FakeLink.made
        host._on_message(host.slots[0], w0, ("stats", _stats(
            {a.id: SessionState("high", False, "connected", False, {"packets_sent": 5}),
             c.id: SessionState("low", True, "connected", True, {})},
            totals=SessionStats(packets_sent=10, nacks=1), send_errors={"EPERM": 1},
            switches={("cam", "high", "low"): 1}, drops={"cam": 1}, closed_by_reason={"deleted": 1},
            latencies=[0.0001, 0.003], ice_tcp_open=1, ice_tcp_idle_closed=2)))
        host._on_message(host.slots[1], w1, ("stats", _stats(
            {b.id: SessionState("high", False, "connected", False, {})},
            totals=SessionStats(packets_sent=7, nacks=2), send_errors={"EPERM": 2, "ENOBUFS": 1},
            switches={("cam", "high", "low"): 2}, closed_by_reason={"ice_failed": 1}, latencies=[0.003],
            ice_tcp_open=2, ice_tcp_frames_dropped=5)))
        # ICE-TCP connections handed to the workers count as the server's.
        assert host.ice_tcp_figures() == (3, 2, 5)
        total, errors = host.totals()
        assert (total.packets_sent, total.nacks) == (17, 3)
        assert errors == {"EPERM": 3, "ENOBUFS": 1}
        assert host.switches == {("cam", "high", "low"): 3}
        assert host.drops == {"cam": 1}
        assert host.closed_by_reason == {"deleted": 1, "ice_failed": 1}
        assert sorted((v.layer_name, v.struggling()) for v in host.viewers("cam")) == [
            ("high", False), ("high", False), ("low", True)]
        info = a.info()
        assert (info.layer, info.state, info.stats) == ("high", "connected", {"packets_sent": 5})
        assert c.info().pinned and a.pc.connectionState == "connected"
        fam = next(iter(host.histogram("lat", "doc", "forwarding").collect()))
        buckets = {s.labels["le"]: s.value for s in fam.samples if s.name == "lat_bucket"}
        assert buckets["0.0002"] == 1 and buckets["0.005"] == 3 and buckets["+Inf"] == 3
        assert next(s.value for s in fam.samples if s.name == "lat_count") == 3
        fams = {f.name: f for f in host.collect_workers()}
        assert [s.value for s in fams["returnfeed_egress_worker_viewers"].samples] == [2, 1]
        await host.close()

    asyncio.run(main())


def test_keyframe_requests_reach_the_source_and_the_answer_goes_back() -> None:
    async def main() -> None:
        host = await _started(1)
        asked: list[str] = []
        host.keyframe_handlers.append(lambda s: asked.append(s) or 1)
        w0 = FakeLink.made[0]
        host._on_message(host.slots[0], w0, ("keyframe", "cam"))
        assert asked == ["cam"] and w0.sent == [("keyframe_result", "cam", 1)]
        await host.close()

    asyncio.run(main())


def test_pin_trickle_and_close_are_calls_to_the_viewers_worker() -> None:
    async def main() -> None:
        host = await _started(2)
        v = await _view(host, FakeStream("cam"))
        w = FakeLink.made[v.worker]
        await v.pin("low")
        assert v.info().pinned
        w.errors["pin"] = ValueError("unknown layer 'x'")
        with pytest.raises(ValueError):
            await v.pin("x")
        await v.add_remote_candidates("a=candidate:1 1 udp 1 127.0.0.1 9 typ host\r\n")
        v.close_soon("access ended", "revoked")
        await asyncio.sleep(0.01)
        assert ("close", (v.id, "access ended", "revoked")) in w.calls and v.closed
        assert v.id not in host.sessions
        await host.close()
        assert all(link.stopped for link in FakeLink.made)

    asyncio.run(main())


def test_a_session_closed_before_its_answer_arrived_is_not_kept() -> None:
    async def main() -> None:
        host = await _started(1)
        w0 = FakeLink.made[0]
        orig = w0.call

        async def call(method: str, *args: Any) -> Any:
            out = await orig(method, *args)
            if method == "create":
                w0.on_message(("closed", out["id"], "connect_timeout"))
            return out

        w0.call = call  # type: ignore[method-assign]
        v = await _view(host, FakeStream("cam"))
        assert v.closed and not host.sessions and host.slots[0].load == 0
        await host.close()

    asyncio.run(main())


# -- the worker's control channel ---------------------------------------------------


def test_control_channel_carries_large_messages_in_order_and_sees_the_end() -> None:
    async def main() -> None:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        got: list[tuple] = []
        ended = asyncio.Event()
        left = ControlChannel(a, lambda m: None, lambda: None)
        right = ControlChannel(b, got.append, ended.set)
        left.start()
        right.start()
        big = ("stats", b"x" * 1_000_000)
        assert left.send(("one",)) and left.send(big) and left.send(("two", 2))
        for _ in range(200):
            if len(got) == 3:
                break
            await asyncio.sleep(0.01)
        assert got == [("one",), big, ("two", 2)]
        left.close()
        await asyncio.wait_for(ended.wait(), 2)
        assert right.closed

    asyncio.run(main())


def test_control_channel_drops_only_droppable_messages_while_backed_up() -> None:
    async def main() -> None:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        gone: list[bool] = []
        ch = ControlChannel(a, lambda m: None, lambda: gone.append(True), max_queued=4 << 20)
        ch.start()
        while ch.queued_bytes == 0:  # nobody reads b: fill the socket
            ch.send(("x", b"y" * 50000))
        assert not ch.send(("stats", 1), droppable=True) and ch.dropped == 1
        while not ch.closed:  # past max_queued the peer is taken for hung
            ch.send(("x", b"y" * 50000))
        assert gone == [True]
        b.close()

    asyncio.run(main())


def test_call_errors_become_the_same_exceptions() -> None:
    assert isinstance(error_from_reply(("SdpError", "bad")), SdpError)
    assert isinstance(error_from_reply(("UnsupportedMedia", "x")), UnsupportedMedia)
    assert isinstance(error_from_reply(("NoCapacity", "x")), NoCapacity)
    err = error_from_reply(("Surprise", "boom"))
    assert type(err) is RuntimeError and str(err) == "boom"


def test_latency_counts_bucket_like_prometheus() -> None:
    c = LatencyCounts((0.001, 0.01))
    for v in (0.0005, 0.001, 0.002, 0.5):
        c.observe(v)
    assert c.counts == [2, 1, 1]  # le=0.001 includes 0.001 itself
    d = LatencyCounts((0.001, 0.01))
    d.add(c)
    d.add(c)
    assert d.counts == [4, 2, 2] and d.total == pytest.approx(2 * 0.5035)


def test_egress_workers_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from server.config import WebRtcSettings

    assert WebRtcSettings(egress_workers=0).egress_worker_count() == 0  # every viewer in the server process
    assert WebRtcSettings(egress_workers=2).egress_worker_count() == 2
    monkeypatch.setattr("server.config.usable_cpus", lambda: 4)
    assert WebRtcSettings().egress_worker_count() == 3  # "auto" by default
    assert WebRtcSettings(egress_workers="auto").egress_worker_count() == 3
    monkeypatch.setattr("server.config.usable_cpus", lambda: 1)
    assert WebRtcSettings(egress_workers=-1).egress_worker_count() == 1
    with pytest.raises(ValidationError):
        WebRtcSettings(egress_workers=-2)


def test_usable_cpus_follow_affinity_and_the_cgroup_quota(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """A container limited to 2 CPUs on a 64-core node gets 1 egress worker,
    not 63 (os.cpu_count() is the node's)."""
    from server.config import usable_cpus

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setattr("os.cpu_count", lambda: 64)
    assert usable_cpus(str(tmp_path)) == 64  # no cpu.max: the affinity stands
    (tmp_path / "cpu.max").write_text("200000 100000\n")
    assert usable_cpus(str(tmp_path)) == 2
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert usable_cpus(str(tmp_path)) == 2  # 1.5 CPUs: two cores run it
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cpus(str(tmp_path)) == 64
    (tmp_path / "cpu.max").write_text("garbage")
    assert usable_cpus(str(tmp_path)) == 64
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2})
    (tmp_path / "cpu.max").write_text("800000 100000\n")
    assert usable_cpus(str(tmp_path)) == 3  # pinned to 3 cores: the quota of 8 does not add any


def test_worker_log_records_are_logged_here_tagged_with_the_worker(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    async def main() -> None:
        host = await _started(2)
        w1 = FakeLink.made[1]
        with caplog.at_level(logging.INFO, logger="returnfeed.webrtc"):
            host._on_message(host.slots[1], w1, ("log", logging.INFO, "returnfeed.webrtc", "webrtc.viewer_closed",
                                                 {"session": "abc", "reason": "deleted"}, None))
            host._on_message(host.slots[1], w1, ("log", logging.DEBUG, "returnfeed.webrtc", "noise", {}, None))
        await host.close()

    asyncio.run(main())
    records = [r for r in caplog.records if r.name == "returnfeed.webrtc"]
    assert [r.getMessage() for r in records] == ["webrtc.viewer_closed"]
    assert records[0].fields == {"session": "abc", "reason": "deleted", "worker": 1}


def test_dead_workers_figures_add_up_counters_but_not_gauges() -> None:
    cfg = WorkerConfig(index=0)
    retired = WorkerStats.empty(cfg.forwarding_buckets, cfg.first_byte_buckets)
    for k in range(2):
        retired.add(_stats({"s": SessionState("high", False, "connected", False, {})},
                           totals=SessionStats(packets_sent=10), send_errors={"EPERM": 1},
                           switches={("cam", "low", "high"): 2}, drops={"backlog": 3},
                           closed_by_reason={"deleted": 1}, latencies=[0.001, 0.05],
                           cpu_s=1.5, ice_tcp_open=4, ice_tcp_idle_closed=1, ice_tcp_frames_dropped=k))
    assert retired.totals.packets_sent == 20 and retired.send_errors == {"EPERM": 2}
    assert retired.switches == {("cam", "low", "high"): 4} and retired.drops == {"backlog": 6}
    assert retired.closed_by_reason == {"deleted": 2} and sum(retired.forwarding.counts) == 4
    assert retired.cpu_s == 3.0 and retired.ice_tcp_idle_closed == 2 and retired.ice_tcp_frames_dropped == 1
    assert retired.sessions == {} and retired.ice_tcp_open == 0  # gauges of dead workers are gone


def test_the_startup_heap_is_frozen_out_of_full_collections() -> None:
    import gc

    from media.procs import freeze_startup_heap

    try:
        frozen = freeze_startup_heap()
        assert frozen == gc.get_freeze_count() > 10000  # this test process's modules at least
    finally:
        gc.unfreeze()


def test_gc_pauses_are_timed_per_generation_and_summed_across_workers() -> None:
    import gc

    from media.histogram import GcPauses

    ticks = iter([1.0, 1.004, 2.0, 2.0002])
    was_enabled = gc.isenabled()
    gc.disable()  # only the two collections below
    pauses = GcPauses(clock=lambda: next(ticks)).install()
    try:
        gc.collect(2)
        gc.collect(0)
    finally:
        pauses.uninstall()
        if was_enabled:
            gc.enable()
    full, young = pauses.by_generation[2], pauses.by_generation[0]
    assert sum(full.counts) == 1 and full.counts[3] == 1 and abs(full.total - 0.004) < 1e-9  # ≤ 5 ms bucket
    assert sum(young.counts) == 1 and young.counts[0] == 1  # ≤ 0.5 ms
    assert dict(full.cumulative())["0.005"] == 1 and dict(full.cumulative())["0.002"] == 0
    # The host sums every worker's, the dead ones' included.
    cfg = WorkerConfig(index=0)
    retired = WorkerStats.empty(cfg.forwarding_buckets, cfg.first_byte_buckets)
    retired.add(_stats({}, gc_pauses=pauses.snapshot()))
    retired.add(_stats({}, gc_pauses=pauses.snapshot()))
    assert sum(retired.gc_pauses[2].counts) == 2 and sum(pauses.by_generation[2].counts) == 1
