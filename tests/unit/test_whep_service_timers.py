"""WhepService without a ticker (media/webrtc/whep.py): a session that never
connects is freed by the one connect timer, the sessions a fan-out never fed
are freed when its stream ends, and a fan-out is closed when its last
session goes."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from media.webrtc.viewer import SessionStats
from media.webrtc.whep import WhepService


@dataclass(eq=False)
class _Fanout:
    stream_name: str = "cam1"
    closed: bool = False
    viewer_count: int = 0
    closes: int = 0
    on_closed: object = None

    @property
    def stream(self):
        return self

    @property
    def name(self) -> str:
        return self.stream_name

    def close(self) -> None:
        self.closes += 1
        self.closed = True
        if self.on_closed is not None:
            self.on_closed(self)


@dataclass(eq=False)
class _Session:
    id: str
    created_mono: float
    fanout: _Fanout
    stream_name: str = "cam1"
    connected_at: float | None = None
    closed: bool = False
    close_reason: str | None = None
    stats: object = None
    reasons: list[str] = field(default_factory=list)

    def close_soon(self, reason: str, detail: str = "") -> None:
        self.reasons.append(reason)
        self.closed = True  # as once the close task has run

    def send_errors_by_name(self) -> dict[str, int]:
        return {}


def test_the_connect_timer_frees_only_sessions_that_never_connected() -> None:
    async def run() -> None:
        svc = WhepService(connect_timeout=0.05)
        svc.start()
        fo = _Fanout()
        now = time.monotonic()
        late = _Session("late", now, fo)
        connected = _Session("connected", now, fo)
        later = _Session("later", now + 0.1, fo)  # its own deadline, after the first
        for s in (late, connected, later):
            svc._admit(s)  # type: ignore[arg-type]
        connected.connected_at = now + 0.01
        for _ in range(200):
            await asyncio.sleep(0.01)
            if later.reasons:
                break
        assert late.reasons == ["connect_timeout"] and later.reasons == ["connect_timeout"]
        assert connected.reasons == []
        await asyncio.sleep(0.02)
        assert svc._connect_timer is None  # nothing left to wait for: no polling

    asyncio.run(run())


def test_a_fanout_that_ends_frees_its_unattached_sessions_and_is_forgotten() -> None:
    async def run() -> None:
        svc = WhepService(connect_timeout=60.0)
        fo = _Fanout()
        fo.on_closed = svc._on_fanout_closed
        svc.fanouts["cam1"] = fo  # type: ignore[assignment]
        waiting = _Session("waiting", time.monotonic(), fo)
        svc._admit(waiting)  # type: ignore[arg-type]
        fo.close()  # the stream ended
        assert waiting.reasons == ["stream_ended"] and "cam1" not in svc.fanouts

    asyncio.run(run())


def test_the_last_session_leaving_closes_the_fanout() -> None:
    async def run() -> None:
        svc = WhepService()
        fo = _Fanout()
        fo.on_closed = svc._on_fanout_closed
        svc.fanouts["cam1"] = fo  # type: ignore[assignment]
        a, b = _Session("a", 0.0, fo, close_reason="deleted"), _Session("b", 0.0, fo, close_reason="deleted")
        a.stats = SessionStats()
        b.stats = SessionStats()
        svc._admit(a)  # type: ignore[arg-type]
        svc._admit(b)  # type: ignore[arg-type]
        svc.session_ended(a)  # type: ignore[arg-type]
        assert fo.closes == 0 and svc.fanouts["cam1"] is fo
        svc.session_ended(b)  # type: ignore[arg-type]
        assert fo.closes == 1 and "cam1" not in svc.fanouts
        assert svc.closed_by_reason == {"deleted": 2}

    asyncio.run(run())
