"""QcEvents.caption: /ws/events caption messages, scoped like markers, with
per-connection seq; partials at most ``caption_partial_hz`` per stream,
the newest winning, a final superseding a held partial."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from live_qc.captions.types import Caption, Word
from server.qc_events import QcEvents


@dataclass(frozen=True)
class Entry:
    id: int
    name: str
    production_id: int
    label: str


class Directory:
    streams = {"camA": Entry(1, "camA", 1, "Camera A"), "camB": Entry(2, "camB", 1, "Camera B")}

    def stream(self, name):
        return self.streams.get(name)

    def member_role(self, production_id, user_id):
        return "director" if user_id == 7 else None


class Ws:
    closed = False


def cap(text: str, final: bool, start: float = 10.0, stream: str = "camA") -> Caption:
    words = tuple(Word(w, start + i * 0.5, start + i * 0.5 + 0.4) for i, w in enumerate(text.split()))
    return Caption(stream, final, start, words[-1].end if words else start, text, words, "en")


def sent(client) -> list[dict]:
    out = []
    while not client.queue.empty():
        item = client.queue.get_nowait()
        if isinstance(item, str):
            out.append(json.loads(item))
    return [m for m in out if m["type"] != "snapshot"]


async def test_caption_messages_are_scoped_sequenced_and_carry_wall_clock() -> None:
    ev = QcEvents(None, Directory())
    director = ev.connect(Ws(), who="d", link_stream=None, user_id=7, admin=False)
    link_b = ev.connect(Ws(), who="l", link_stream="camB", user_id=None, admin=False)
    stranger = ev.connect(Ws(), who="s", link_stream=None, user_id=8, admin=False)
    ev.caption("camA", cap("hello world", True), wall_start=1000.0, wall_end=1000.9)
    ev.caption("camB", cap("on b", True, stream="camB"), wall_start=1001.0, wall_end=1001.4)
    ev.caption("nope", cap("unknown stream", True, stream="nope"), wall_start=1.0, wall_end=2.0)
    got = sent(director)
    assert [(m["stream"], m["text"]) for m in got] == [("camA", "hello world"), ("camB", "on b")]
    first = got[0]
    assert first["type"] == "caption" and first["final"] is True and first["label"] == "Camera A"
    assert (first["start"], first["end"], first["wall_start"], first["wall_end"]) == (10.0, 10.9, 1000.0, 1000.9)
    assert [w["text"] for w in first["words"]] == ["hello", "world"] and first["words"][1]["start"] == 10.5
    assert first["language"] == "en"
    assert [m["seq"] for m in got] == [2, 3]  # the snapshot was 1
    assert [m["text"] for m in sent(link_b)] == ["on b"]
    assert sent(stranger) == []


async def test_partials_are_rate_limited_newest_wins_and_a_final_supersedes() -> None:
    ev = QcEvents(None, Directory())
    ev.caption_partial_hz = 4.0
    c = ev.connect(Ws(), who="d", link_stream="camA", user_id=None, admin=False)
    for i, text in enumerate(["one", "one two", "one two three", "one two three four"]):
        ev.caption("camA", cap(text, False), wall_start=1000.0, wall_end=1000.0 + i)
    # The first goes out at once; the rest wait for their turn, only the newest.
    assert [m["text"] for m in sent(c)] == ["one"]
    await asyncio.sleep(0.3)
    assert [m["text"] for m in sent(c)] == ["one two three four"]
    ev.caption("camA", cap("five", False), wall_start=1001.0, wall_end=1001.5)
    ev.caption("camA", cap("five six", True), wall_start=1001.0, wall_end=1002.0)
    await asyncio.sleep(0.35)
    # The final went out at once; the held partial it supersedes never does.
    got = sent(c)
    assert [(m["text"], m["final"]) for m in got] == [("five six", True)]
    # Another stream has its own budget.
    ev.caption("camB", cap("bee", False, stream="camB"), wall_start=1.0, wall_end=2.0)
    assert ev._partial_sent.get("camB") is not None
