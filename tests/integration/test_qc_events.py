"""QC markers live and stored (issue 12): QcEvents → /ws/events, PostgreSQL, REST.

In process: the real application (:func:`server.app.create_app`) on a real
PostgreSQL, behind aiohttp's ``TestServer`` (tests/helpers.py ``app_env``);
markers are fed to ``app[QC_EVENTS]`` exactly as the QC tap does (on the
event loop).

Production "show" has streams camA and camB, directors d1 and d2 and a
viewer member v; production "other" has camC and no member of "show".
"""

from __future__ import annotations

import asyncio
import csv
import io
import time
from typing import Any, AsyncIterator

import aiohttp
import pytest

from helpers import AppEnv as Env
from helpers import app_env
from live_qc.engine import Meters
from live_qc.markers import Marker, MarkerEvent

pytestmark = pytest.mark.integration


@pytest.fixture
async def env(db_url: str, tmp_path) -> AsyncIterator[Env]:
    async with app_env(db_url, tmp_path, "qc-events-test-secret-" * 3) as e:
        yield e


def _ev(kind: str, type_: str, start: float, end: float | None = None, **meta: Any) -> MarkerEvent:
    return MarkerEvent(kind, Marker(type_, type_, start, end, "error", 0.9, dict(meta)))


async def _stored(env: Env, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while env.qc.pending or env.qc.stored == 0:
        assert time.monotonic() < deadline, "markers not stored"
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.05)  # the last batch's marker.stored messages


async def test_markers_in_order_scoped_stored_and_listed(env: Env) -> None:
    qc = env.qc
    wall = time.time()
    qc.marker("camB", _ev("open", "silence", 3.25), wall_start=wall - 2, wall_end=None)
    d1, link = await env.ws("d1"), await env.ws("linkA")
    # A snapshot of the open markers on connect, scoped: the camA link sees none of camB's.
    await d1.wait(lambda s: s.of("snapshot"))
    await link.wait(lambda s: s.of("snapshot"))
    assert [m["stream"] for m in d1.of("snapshot")[0]["markers"]] == ["camB"]
    assert link.of("snapshot")[0]["markers"] == []

    qc.marker("camA", _ev("open", "black", 12.34), wall_start=wall - 2.0, wall_end=None)
    qc.marker("camA", _ev("update", "black", 12.34, level=0.01), wall_start=wall - 2.0, wall_end=None)
    qc.marker("camC", _ev("open", "freeze", 1.0), wall_start=wall, wall_end=None)
    qc.marker("camA", _ev("close", "black", 12.34, 15.01), wall_start=wall - 2.0, wall_end=wall + 0.67)
    qc.marker("camB", _ev("close", "silence", 3.25, 9.5), wall_start=wall - 2, wall_end=wall + 4.25)
    qc.tap_state("camB", "running")
    await d1.wait(lambda s: s.of("tap"))
    await link.wait(lambda s: s.of("marker.close"))
    await _stored(env)

    kinds = [(m["type"], m["stream"]) for m in d1.of("marker.open", "marker.update", "marker.close")]
    assert kinds == [("marker.open", "camA"), ("marker.update", "camA"), ("marker.close", "camA"),
                     ("marker.close", "camB")]
    seqs = [m["seq"] for m in d1.messages]
    assert seqs == list(range(1, len(seqs) + 1))
    close = d1.of("marker.close")[0]
    assert (close["kind"], close["start"], close["end"], close["severity"]) == ("black", 12.34, 15.01, "error")
    # The camA link: camA only (never camB, never the other production's camC).
    assert {m.get("stream") for m in link.messages if "stream" in m} == {"camA"}
    assert [m["seq"] for m in link.messages] == list(range(1, len(link.messages) + 1))
    stored = {m["live_id"]: m["id"] for m in d1.of("marker.stored")}
    assert close["live_id"] in stored

    status, body = await env.req("GET", "/api/v1/streams/camA/markers", "d1")
    assert status == 200
    [m] = body["markers"]
    assert m["id"] == stored[close["live_id"]]
    assert (m["kind"], m["start"], m["end"], m["metadata"]) == ("black", 12.34, 15.01, {"level": 0.01})
    assert m["wall_end"] is not None
    status, text = await env.req("GET", "/api/v1/streams/camB/markers?format=csv", "d1", raw=True)
    assert status == 200
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0][:4] == ["id", "stream", "kind", "subtype"] and len(rows) == 2 and rows[1][2] == "silence"
    # Time range (unix seconds and ISO 8601) and type filter.
    status, body = await env.req("GET", f"/api/v1/streams/camA/markers?from={wall + 5:.3f}", "d1")
    assert status == 200 and body["markers"] == []
    status, body = await env.req("GET", "/api/v1/streams/camA/markers?to=2000-01-01T00:00:00Z", "d1")
    assert status == 200 and body["markers"] == []
    status, body = await env.req("GET", "/api/v1/streams/camA/markers?type=silence,freeze", "d1")
    assert status == 200 and body["markers"] == []
    # Scope on REST too: the link reads its stream only; d2 sees nothing of "other".
    assert (await env.req("GET", "/api/v1/streams/camA/markers", "linkA"))[0] == 200
    assert (await env.req("GET", "/api/v1/streams/camB/markers", "linkA"))[0] == 403
    assert (await env.req("GET", "/api/v1/streams/camC/markers", "d2"))[0] == 403
    assert (await env.req("GET", "/api/v1/streams/camA/markers", "v"))[0] == 403
    await d1.close()
    await link.close()


async def test_flag_and_note_reach_every_other_director(env: Env) -> None:
    qc = env.qc
    wall = time.time()
    qc.marker("camA", _ev("open", "clipping", 4.0), wall_start=wall, wall_end=None)
    qc.marker("camA", _ev("close", "clipping", 4.0, 5.5), wall_start=wall, wall_end=wall + 1.5)
    await _stored(env)
    d2, other = await env.ws("d2"), await env.ws("admin")
    await d2.wait(lambda s: s.of("snapshot"))
    _, body = await env.req("GET", "/api/v1/streams/camA/markers", "d1")
    mid = body["markers"][0]["id"]

    status, flagged = await env.req("PATCH", f"/api/v1/markers/{mid}", "d1", {"false_positive": True})
    assert status == 200 and flagged["false_positive"] is True and flagged["verified_by"] == "d1"
    status, note = await env.req("POST", "/api/v1/streams/camA/notes", "d1", {"text": "mic bump", "marker_id": mid})
    assert status == 201 and note["marker_id"] == mid
    status, moment = await env.req("POST", "/api/v1/streams/camA/notes", "d1", {"text": "cue 4", "at": wall + 30})
    assert status == 201 and moment["marker_id"] is None
    for s in (d2, other):
        await s.wait(lambda s: len(s.of("note")) == 2)
        [flag] = s.of("marker.flag")
        assert (flag["id"], flag["false_positive"], flag["verified_by"]) == (mid, True, "d1")
        assert [n["text"] for n in s.of("note")] == ["mic bump", "cue 4"]

    # A false positive is left out unless asked for; notes are listed newest first.
    _, body = await env.req("GET", "/api/v1/streams/camA/markers", "d1")
    assert body["markers"] == []
    _, body = await env.req("GET", "/api/v1/streams/camA/markers?include_false_positive=true", "d2")
    assert [m["id"] for m in body["markers"]] == [mid]
    _, body = await env.req("GET", "/api/v1/streams/camA/notes", "linkA")
    assert [n["text"] for n in body["notes"]] == ["cue 4", "mic bump"]
    _, body = await env.req("GET", f"/api/v1/streams/camA/notes?marker_id={mid}", "d2")
    assert [n["text"] for n in body["notes"]] == ["mic bump"]
    # Verified: false clears who verified.
    status, flagged = await env.req("PATCH", f"/api/v1/markers/{mid}", "d2", {"verified": False})
    assert status == 200 and flagged["verified_by"] is None
    await d2.close()
    await other.close()


async def test_meters_only_to_subscribers_and_at_most_10_hz(env: Env) -> None:
    qc = env.qc
    d1, d2 = await env.ws("d1"), await env.ws("d2")
    await d1.ws.send_json({"type": "subscribe", "streams": ["camA", "camC"]})
    await d1.wait(lambda s: s.of("subscribed"))
    assert d1.of("subscribed")[0]["streams"] == ["camA"]
    assert d1.of("subscribed")[0]["refused"] == ["camC"]  # not a director of "other"
    for _ in range(5):  # a burst: one goes out per stream per 100 ms
        qc.meters("camA", Meters(1.0, -23.04, -22.5, [-6.0, float("-inf")]))
        qc.meters("camB", Meters(1.0, -30.0, -30.0, [-12.0, -12.0]))
    await d1.wait(lambda s: s.of("meters"))
    await asyncio.sleep(0.2)
    [m] = d1.of("meters")
    assert (m["stream"], m["momentary"], m["short_term"], m["peaks_dbfs"]) == ("camA", -23.04, -22.5, [-6.0, None])
    assert d2.of("meters") == []
    await d1.ws.send_str("not json")
    await d1.ws.send_json({"type": "subscribe", "streams": "camA"})
    await d1.wait(lambda s: len(s.of("error")) == 2)
    assert [e["code"] for e in d1.of("error")] == ["bad_json", "bad_subscribe"]
    await d1.close()
    await d2.close()


async def test_database_outage_delays_storage_only(env: Env) -> None:
    qc, db = env.qc, env.db
    d1 = await env.ws("d1")
    await d1.wait(lambda s: s.of("snapshot"))
    # The supervisor's verdict "down" (what a lost connection sets): every
    # pool call fails fast with DatabaseUnavailable.
    db.note_failure(ConnectionRefusedError("test outage"), where="test")
    assert not db.available
    qc.queue_max = 4
    wall = time.time()
    for i, kind in enumerate(("black", "freeze", "silence")):
        qc.marker("camA", _ev("open", kind, 10.0 + i), wall_start=wall + i, wall_end=None)
        qc.marker("camA", _ev("close", kind, 10.0 + i, 11.0 + i), wall_start=wall + i, wall_end=wall + i + 1)
    # Live all the same, in order.
    await d1.wait(lambda s: len(s.of("marker.close")) == 3)
    assert [m["kind"] for m in d1.of("marker.open")] == ["black", "freeze", "silence"]
    await asyncio.sleep(0.3)
    assert qc.stored == 0 and len(qc.pending) == 4 and qc.dropped_writes == 2
    assert (await env.req("GET", "/api/v1/streams/camA/markers", "d1"))[0] == 503

    db._set_up()  # the database is back
    await _stored(env)
    _, body = await env.req("GET", "/api/v1/streams/camA/markers", "d1")
    # black's open and close were the oldest writes and were dropped; freeze's
    # close survived its dropped open and lands as the whole marker.
    got = sorted((m["kind"], m["start"], m["end"]) for m in body["markers"])
    assert got == [("freeze", 11.0, 12.0), ("silence", 12.0, 13.0)]
    await d1.close()


@pytest.mark.parametrize("method,path,who,body,status", [
    ("GET", "/api/v1/streams/camA/markers", None, None, 401),
    ("GET", "/api/v1/streams/nope/markers", "d1", None, 404),
    ("GET", "/api/v1/streams/camA/markers?from=yesterday", "d1", None, 400),
    ("GET", "/api/v1/streams/camA/markers?from=100&to=50", "d1", None, 400),
    ("GET", "/api/v1/streams/camA/markers?type=black,nope", "d1", None, 400),
    ("GET", "/api/v1/streams/camA/markers?format=xml", "d1", None, 400),
    ("GET", "/api/v1/streams/camA/markers?limit=0", "d1", None, 400),
    ("GET", "/api/v1/streams/camA/markers?limit=100000", "d1", None, 400),
    ("GET", "/api/v1/streams/camA/markers?include_false_positive=maybe", "d1", None, 400),
    ("GET", "/api/v1/streams/camA/markers?frm=1", "d1", None, 400),
    ("PATCH", "/api/v1/markers/99999", "d1", {"false_positive": True}, 404),
    ("PATCH", "/api/v1/markers/abc", "d1", {"false_positive": True}, 404),
    ("PATCH", "/api/v1/markers/1", "d1", {}, 400),
    ("PATCH", "/api/v1/markers/1", "d1", {"false_positive": "yes"}, 400),
    ("PATCH", "/api/v1/markers/1", "d1", {"hidden": True}, 400),
    ("POST", "/api/v1/streams/camA/notes", "d1", {"text": ""}, 400),
    ("POST", "/api/v1/streams/camA/notes", "d1", {"text": "x" * 4001}, 400),
    ("POST", "/api/v1/streams/camA/notes", "d1", {"text": "hi", "marker_id": "1"}, 400),
    ("POST", "/api/v1/streams/camA/notes", "d1", {"text": "hi", "marker_id": 99999}, 404),
    ("POST", "/api/v1/streams/camA/notes", "d1", {"text": "hi", "at": "noon"}, 400),
    ("POST", "/api/v1/streams/camA/notes", "d1", [1, 2], 400),
    ("POST", "/api/v1/streams/camA/notes", "linkA", {"text": "hi"}, 403),
    ("POST", "/api/v1/streams/camA/notes", "v", {"text": "hi"}, 403),
    ("GET", "/api/v1/streams/camA/notes?marker_id=x", "d1", None, 400),
])
async def test_bad_inputs_are_4xx_json(env: Env, method: str, path: str, who: str | None, body: Any,
                                      status: int) -> None:
    got, answer = await env.req(method, path, who, body)
    assert got == status, answer
    assert set(answer) >= {"error", "detail"}


async def test_flag_needs_a_director(env: Env) -> None:
    wall = time.time()
    env.qc.marker("camA", _ev("open", "phase", 1.0), wall_start=wall, wall_end=None)
    await _stored(env)
    _, body = await env.req("GET", "/api/v1/streams/camA/markers", "d1")
    mid = body["markers"][0]["id"]
    for who in ("linkA", "v"):
        status, answer = await env.req("PATCH", f"/api/v1/markers/{mid}", who, {"false_positive": True})
        assert status == 403 and answer["error"] == "forbidden"


class StuckSocket:
    """A peer that stopped reading: every send waits until ``gate`` opens."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.closed = False
        self.close_code: int | None = None
        self.sent = 0

    async def send_str(self, text: str) -> None:
        await self.gate.wait()
        self.sent += 1

    async def ping(self) -> None:
        await self.gate.wait()

    async def close(self, code: int = 1000, message: bytes = b"") -> None:
        self.close_code = code
        self.closed = True


async def test_a_slow_client_is_dropped_and_delays_nobody(env: Env) -> None:
    qc = env.qc
    d1 = await env.ws("d1")
    await d1.wait(lambda s: s.of("snapshot"))
    stuck = StuckSocket()
    slow = qc.connect(stuck, who="stuck", link_stream=None, user_id=None, admin=True)
    slow.sender = asyncio.get_running_loop().create_task(qc._sender(slow))
    wall = time.time()
    n = 400  # 800 messages: more than one connection's send queue holds
    for i in range(n):
        qc.marker("camA", _ev("open", "black", float(i)), wall_start=wall + i, wall_end=None)
        qc.marker("camA", _ev("close", "black", float(i), i + 0.5), wall_start=wall + i, wall_end=wall + i + 0.5)
        if i % 20 == 19:
            await asyncio.sleep(0.01)  # the tap's events arrive over time, a few per read
    assert slow.closed == "too slow" and slow not in qc.clients and qc.slow_clients == 1
    # The others got everything, in order.
    await d1.wait(lambda s: len(s.of("marker.close")) == n)
    assert [m["start"] for m in d1.of("marker.open")] == [float(i) for i in range(n)]
    # Once the stuck send returns, the next thing it sends is the close (4000).
    stuck.gate.set()
    await asyncio.wait_for(slow.sender, 5)
    assert stuck.close_code == 4000 and stuck.sent <= 1
    await _stored(env)
    await d1.close()


async def test_heartbeat_pings_both_ways_and_closes_a_silent_client(env: Env) -> None:
    qc = env.qc
    qc.missing_after = 0.6
    await qc.stop()
    qc.heartbeat_interval = 0.1
    await qc.start()
    url = env.url("/ws/events") + f"?token={env.tokens['d1']}"
    # A standard client answers RFC 6455 pings by itself and stays.
    alive = await env.ws("d1")
    # This one does not answer anything.
    silent = await env.session.ws_connect(url, autoping=False)
    got: list[Any] = []
    while True:
        msg = await asyncio.wait_for(silent.receive(), 5)
        got.append(msg.type)
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
            break
    assert aiohttp.WSMsgType.PING in got and aiohttp.WSMsgType.TEXT in got
    assert silent.close_code == 4001
    await asyncio.sleep(0.7)
    assert not alive.ws.closed and alive.of("ping")
    await alive.close()
    await silent.close()


async def test_qc_metrics_are_exported(env: Env) -> None:
    from server.keys import METRICS

    env.qc.marker("camA", _ev("open", "tone", 2.0), wall_start=time.time(), wall_end=None)
    text = env.server.app[METRICS].render().decode()
    assert "returnfeed_qc_markers_open 1.0" in text
    assert "returnfeed_qc_marker_writes_dropped_total 0.0" in text


async def test_revoking_the_link_closes_its_socket(env: Env) -> None:
    link, d1 = await env.ws("linkA"), await env.ws("d1")
    await link.wait(lambda s: s.of("snapshot"))
    env.directory.note_revoked(env.link_jti)
    await asyncio.wait_for(link.task, 5)
    assert link.ws.close_code == 4403
    # Events go on for the others; the revoked link is not counted any more.
    env.qc.marker("camA", _ev("open", "bars", 1.0), wall_start=time.time(), wall_end=None)
    await d1.wait(lambda s: s.of("marker.open"))
    assert len(env.qc.clients) == 1
    await d1.close()


async def test_detector_metadata_with_numpy_and_nan_is_stored_and_sent(env: Env) -> None:
    import numpy as np

    d1 = await env.ws("d1")
    meta = {"level": np.float32(0.25), "channels": np.array([1, 2]), "ratio": float("nan"), 3: "x"}
    ev = MarkerEvent("open", Marker("phase", "phase", 5.0, None, "severe", float("nan"), meta))
    env.qc.marker("camA", ev, wall_start=time.time(), wall_end=None)
    await d1.wait(lambda s: s.of("marker.open"))
    expected = {"level": 0.25, "channels": [1, 2], "ratio": None, "3": "x"}
    sent = d1.of("marker.open")[0]
    assert (sent["metadata"], sent["severity"], sent["confidence"]) == (expected, "warning", 1.0)
    await _stored(env)
    _, body = await env.req("GET", "/api/v1/streams/camA/markers", "d1")
    assert body["markers"][0]["metadata"] == expected and env.qc.failed_writes == 0
    await d1.close()
