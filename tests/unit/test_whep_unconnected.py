"""Issue 9 item 9 (the WHEP rule, sans-I/O): which sessions the ticker frees."""

from __future__ import annotations

from dataclasses import dataclass, field

from media.webrtc.whep import WhepService


@dataclass
class _Fanout:
    closed: bool = False


@dataclass
class _Session:
    created_mono: float
    connected_at: float | None = None
    fanout: _Fanout = field(default_factory=_Fanout)
    closed: bool = False
    reasons: list[str] = field(default_factory=list)

    def close_soon(self, reason: str, detail: str = "") -> None:
        self.reasons.append(reason)


def test_free_unconnected_sessions_after_timeout_and_stream_end() -> None:
    svc = WhepService(connect_timeout=15.0)
    gone = _Fanout(closed=True)
    s = {
        "young": _Session(created_mono=100.0),
        "old": _Session(created_mono=80.0),
        "connected": _Session(created_mono=0.0, connected_at=1.0),
        "stream_gone": _Session(created_mono=99.0, fanout=gone),
        "connected_stream_gone": _Session(created_mono=0.0, connected_at=1.0, fanout=gone),
        "already_closed": _Session(created_mono=0.0, closed=True),
    }
    svc.sessions.update(s)  # type: ignore[arg-type]
    svc.free_unconnected(now=100.5)
    assert {k: v.reasons for k, v in s.items()} == {
        "young": [], "old": ["connect_timeout"], "connected": [], "stream_gone": ["stream_ended"],
        "connected_stream_gone": ["stream_ended"], "already_closed": []}
