"""Live captions through the server (issue 13): CaptionService → /ws/events,
the captions table, and the JSON/WebVTT/SRT transcripts.

In process: the real application on a real PostgreSQL (as in
test_qc_events.py), a real StreamHub, and the CaptionService fed by the
stand-in caption worker process (tests/unit/caption_fake_worker.py: audio
payloads script its captions), so what is tested here is the server's path,
not speech recognition (test_captions_live.py does that).

Production "show" has streams camA and camB, directors d1 and d2 and a
viewer member v; production "other" has camC.
"""

from __future__ import annotations

import asyncio
import io
import sys
from datetime import datetime
from pathlib import Path
from typing import AsyncIterator

import pytest
import srt
import webvtt

from helpers import AppEnv as Env
from helpers import Unit, app_env, until
from media.stream import SourceInfo, StreamHub
from server.caption_service import CaptionService, CaptionStore
from server.config import CaptionSettings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "unit"))
from caption_fake_worker import FakeCaptionWorker  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture
async def env(db_url: str, tmp_path) -> AsyncIterator[Env]:
    async with app_env(db_url, tmp_path, "captions-test-secret-" * 3,
                       labels={"camA": "Host", "camB": "Guest", "camC": "C"}) as e:
        # The caption tap as the app wires it, on a hub of its own and the stand-in worker.
        cs = CaptionSettings(enabled=True)
        e.hub = StreamHub()
        e.store = CaptionStore(e.db, e.directory, queue_max=cs.write_queue_max)
        e.options = {"camA": {"language": "en"}, "camB": {"language": "en"}, "camC": {"language": "en"}}
        e.captions = CaptionService(cs, e.hub, e.qc, e.store, options_for=lambda name: e.options.get(name),
                                    make_worker=lambda i: FakeCaptionWorker(cs.queue_frames, i), poll_s=0.05)
        await e.captions.start()
        try:
            yield e
        finally:
            await e.captions.stop()


def publisher(env: Env, name: str):
    stream = env.hub.get_or_create(name)
    stream.attach_publisher(SourceInfo("test"))
    pub = stream.publishers[0]
    pub.publish(Unit("opus", 0, 0, True, b"first"))
    return pub


def say(pub, t: float, payload: bytes) -> None:
    pub.publish(Unit("opus", round(t * 90000), round(t * 90000), True, payload))


async def _running(env: Env, *names: str) -> None:
    await until(lambda: all(n in env.captions.host.taps for n in names)
                and env.captions.host.slots[0].worker is not None)
    await asyncio.sleep(0.3)  # the worker has the attach before the first audio


async def test_captions_in_order_scoped_stored_and_exported(env: Env) -> None:
    d1, link = await env.ws("d1"), await env.ws("linkA")
    await d1.wait(lambda s: s.of("snapshot"))
    await link.wait(lambda s: s.of("snapshot"))
    a, b, c = publisher(env, "camA"), publisher(env, "camB"), publisher(env, "camC")
    await _running(env, "camA", "camB", "camC")
    say(a, 100.0, b"hyp:good")
    await asyncio.sleep(0.05)
    say(a, 100.2, b"say:good evening everybody")
    say(b, 50.0, b"say:thank you SO much")
    say(c, 10.0, b"say:other production")
    say(a, 103.0, b"say:and welcome to the show tonight we have a long sentence to split over cues")
    await d1.wait(lambda s: len([m for m in s.of("caption") if m["final"]]) == 3)
    await link.wait(lambda s: len([m for m in s.of("caption") if m["final"]]) == 2)

    # In order per stream (streams are forwarded by tasks of their own).
    caps = [m for m in d1.of("caption") if m["stream"] == "camA"]
    assert [(m["final"], m["text"]) for m in caps] == [
        (False, "good"), (True, "good evening everybody"),
        (True, "and welcome to the show tonight we have a long sentence to split over cues")]
    [on_b] = [m for m in d1.of("caption") if m["stream"] == "camB"]
    seqs = [m["seq"] for m in d1.messages]
    assert seqs == list(range(1, len(seqs) + 1))
    first = caps[1]
    assert first["label"] == "Host" and first["language"] == "en"
    assert (first["start"], first["end"]) == (100.2, 100.2 + 0.3 * 2 + 0.25)
    assert [w["text"] for w in first["words"]] == ["good", "evening", "everybody"]
    assert first["wall_end"] - first["wall_start"] == pytest.approx(0.85, abs=0.002)
    assert [w["emphasis"] for w in on_b["words"]] == [False, False, True, False]
    # The camA link: camA only; d1 never sees the other production's camC.
    assert {m["stream"] for m in link.of("caption", "caption.state")} == {"camA"}
    assert "camC" not in {m.get("stream") for m in d1.messages}

    await until(lambda: env.store.stored == 4)
    status, body = await env.req("GET", "/api/v1/streams/camA/captions", "linkA")
    assert status == 200 and [c["text"] for c in body["captions"]] == [
        "good evening everybody", "and welcome to the show tonight we have a long sentence to split over cues"]
    stored = body["captions"][0]
    assert stored["label"] == "Host" and stored["words"][1]["start"] == 100.5 and stored["translated"] is False
    assert body["next_after_id"] is None
    status, page = await env.req("GET", "/api/v1/streams/camA/captions?limit=1", "d1")
    assert status == 200 and len(page["captions"]) == 1 and page["next_after_id"] == stored["id"]
    status, page = await env.req("GET", f"/api/v1/streams/camA/captions?after_id={stored['id']}", "d1")
    assert [c["text"][:7] for c in page["captions"]] == ["and wel"]

    # WebVTT, parsed by webvtt-py: cue times are the words' times from the first caption's start.
    status, text = await env.req("GET", "/api/v1/streams/camA/captions.vtt", "d1", raw=True)
    assert status == 200
    cues = webvtt.from_buffer(io.StringIO(text)).captions
    words = [w for c in body["captions"] for w in c["words"]]
    t0 = words[0]["start"]
    assert cues[0].text == "good evening everybody"
    assert cues[0].start_time.in_milliseconds() / 1000 == pytest.approx(0.0, abs=0.002)
    assert cues[0].end_time.in_milliseconds() / 1000 == pytest.approx(words[2]["end"] - t0, abs=0.002)
    # The long caption: split into cues of ≤ 2 lines of ≤ 42 characters, each timed by its words.
    long_words = body["captions"][1]["words"]
    assert len(cues) >= 2 and all(len(line) <= 42 for c in cues for line in c.lines)
    assert all(len(c.lines) <= 2 for c in cues)
    assert cues[1].start_time.in_milliseconds() / 1000 == pytest.approx(long_words[0]["start"] - t0, abs=0.002)
    assert cues[-1].end_time.in_milliseconds() / 1000 == pytest.approx(long_words[-1]["end"] - t0, abs=0.002)
    assert " ".join(" ".join(c.lines) for c in cues[1:]) == body["captions"][1]["text"]

    # SRT, parsed by srt: same cues; and a time range moves the origin.
    status, text = await env.req("GET", "/api/v1/streams/camB/captions.srt", "d2", raw=True)
    assert status == 200
    [sub] = list(srt.parse(text))
    assert sub.content == "thank you SO much"
    assert sub.start.total_seconds() == pytest.approx(0.0, abs=0.002)
    assert sub.end.total_seconds() == pytest.approx(0.3 * 3 + 0.25, abs=0.002)
    wall = datetime.fromisoformat(stored["wall_start"]).timestamp()
    status, text = await env.req("GET", f"/api/v1/streams/camA/captions.srt?from={wall - 5:.3f}", "d1", raw=True)
    subs = list(srt.parse(text))
    assert subs[0].start.total_seconds() == pytest.approx(5.0, abs=0.002)
    status, text = await env.req("GET", f"/api/v1/streams/camA/captions.vtt?from={wall + 2.5:.3f}", "d1",
                                 raw=True)
    assert status == 200 and "good evening" not in text and "welcome" in text
    status, text = await env.req("GET", "/api/v1/streams/camA/captions.vtt?to=2000-01-01T00:00:00Z", "d1",
                                 raw=True)
    assert status == 200 and text.strip() == "WEBVTT"
    await d1.close()
    await link.close()


async def test_partials_are_broadcast_not_stored(env: Env) -> None:
    d1 = await env.ws("d1")
    await d1.wait(lambda s: s.of("snapshot"))
    a = publisher(env, "camA")
    await _running(env, "camA")
    for i in range(6):
        say(a, 1.0 + i * 0.1, b"hyp:" + b" ".join([b"word"] * (i + 1)))
    say(a, 2.0, b"say:word word")
    await d1.wait(lambda s: [m for m in s.of("caption") if m["final"]])
    partials = [m for m in d1.of("caption") if not m["final"]]
    # Six partials within a few milliseconds: at most 4 Hz gets through.
    assert 1 <= len(partials) <= 2
    await until(lambda: env.store.stored == 1)
    _, body = await env.req("GET", "/api/v1/streams/camA/captions", "d1")
    assert [c["text"] for c in body["captions"]] == ["word word"]
    await d1.close()


async def test_a_database_outage_only_delays_storage(env: Env) -> None:
    db = env.db
    d1 = await env.ws("d1")
    await d1.wait(lambda s: s.of("snapshot"))
    a = publisher(env, "camA")
    await _running(env, "camA")
    db.note_failure(ConnectionRefusedError("test outage"), where="test")
    assert not db.available
    for i in range(3):
        say(a, 10.0 + i, f"say:during outage {i}".encode())
    # Live all the same.
    await d1.wait(lambda s: len(s.of("caption")) == 3)
    await asyncio.sleep(0.3)
    assert env.store.stored == 0 and env.store.pending == 3
    assert (await env.req("GET", "/api/v1/streams/camA/captions.vtt", "d1"))[0] == 503
    db._set_up()
    await until(lambda: env.store.stored == 3)
    _, body = await env.req("GET", "/api/v1/streams/camA/captions", "d1")
    assert [c["text"] for c in body["captions"]] == [f"during outage {i}" for i in range(3)]
    await d1.close()


async def test_caption_metrics_are_exported(env: Env) -> None:
    a = publisher(env, "camA")
    await _running(env, "camA")
    say(a, 1.0, b"say:one two")
    await until(lambda: env.captions.words_total.get("camA") == 2)
    text = "".join(str(m) for m in env.captions.collect())
    for name in ("returnfeed_captions_rtf", "returnfeed_captions_frames_dropped", "returnfeed_captions_words",
                 "returnfeed_captions_writes_queued", "returnfeed_captions_worker_restarts"):
        assert name in text


@pytest.mark.parametrize("path,who,status", [
    ("/api/v1/streams/camA/captions", None, 401),
    ("/api/v1/streams/camA/captions.vtt", None, 401),
    ("/api/v1/streams/nope/captions.vtt", "d1", 404),
    ("/api/v1/streams/camA/captions.txt", "d1", 404),
    ("/api/v1/streams/camA/captions.vtt?from=yesterday", "d1", 400),
    ("/api/v1/streams/camA/captions.srt?from=100&to=50", "d1", 400),
    ("/api/v1/streams/camA/captions.srt?limit=5", "d1", 400),
    ("/api/v1/streams/camA/captions?limit=0", "d1", 400),
    ("/api/v1/streams/camA/captions?limit=100000", "d1", 400),
    ("/api/v1/streams/camA/captions?after_id=x", "d1", 400),
    ("/api/v1/streams/camA/captions?frm=1", "d1", 400),
    ("/api/v1/streams/camB/captions.vtt", "linkA", 403),
    ("/api/v1/streams/camC/captions", "d2", 403),
    ("/api/v1/streams/camA/captions.vtt", "v", 403),
])
async def test_bad_inputs_are_4xx_json(env: Env, path: str, who: str | None, status: int) -> None:
    got, answer = await env.req("GET", path, who)
    assert got == status, answer
    assert set(answer) >= {"error", "detail"}
