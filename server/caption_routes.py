"""Caption transcripts: ``GET /api/v1/streams/{name}/captions[.vtt|.srt]`` (issue 13).

Readers as for the markers list (:mod:`server.qc_routes`): a signed link of
that stream, the directors of its production, admins. Live captions go out
on ``/ws/events`` (:meth:`server.qc_events.QcEvents.caption`); these routes
read the stored finals (the ``captions`` table, migration 0005).

* ``GET …/captions?from=&to=&limit=&after_id=`` — JSON ``{stream, captions:
  [{id, start, end, wall_start, wall_end, text, language, label, translated,
  words: [{text, start, end, probability, emphasis}]}], next_after_id}``,
  oldest first; ``start``/``end`` and word times on the stream's media
  timeline; ``next_after_id`` is set when the page is full.
* ``GET …/captions.vtt`` and ``…/captions.srt`` with ``from``/``to`` —
  WebVTT / SubRip files (``live_qc.captions.export``: ≤ 2 lines of ≤ 42
  characters, cues timed by the words). Cue times are seconds of wall
  clock from ``from`` (without ``from``: from the first caption's start),
  which the ``X-Captions-Origin`` header gives as ISO 8601 — a recording
  started at that moment lines up. Wall clock, not media time, because a
  publisher that reconnects starts a new media timeline.

``from``/``to`` as for markers: ISO 8601 or unix seconds (no offset: UTC);
captions overlapping [from, to) are included. Errors are ``{error, detail}``.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from aiohttp import web

from live_qc.captions.export import to_srt, to_webvtt
from live_qc.captions.types import Caption, Word

from . import repo
from .access import stream_records
from .errors import BadRequest
from .keys import DB
from .query import parse_time, query_int

#: Captions one JSON page may hold.
PAGE_MAX = 5000
PAGE_DEFAULT = 500
#: Captions one WebVTT/SRT file may hold (about 40 hours of speech); a
#: larger range is refused rather than cut short without a word.
EXPORT_MAX = 100_000

_FORMATS = {"vtt": ("text/vtt", to_webvtt), "srt": ("application/x-subrip", to_srt)}


def _range(q: Any, known: set[str]) -> tuple[datetime | None, datetime | None]:
    unknown = sorted(set(q) - known)
    if unknown:
        raise BadRequest(f"unknown query parameter {unknown[0]!r}")
    since = parse_time("from", q["from"]) if "from" in q else None
    until = parse_time("to", q["to"]) if "to" in q else None
    if since is not None and until is not None and until <= since:
        raise BadRequest("'to' must be after 'from'")
    return since, until


def _words(raw: Any) -> list[dict[str, Any]]:
    return raw if isinstance(raw, list) else []


def caption_json(stream: str, r: Any) -> dict[str, Any]:
    return {"id": r["id"], "stream": stream, "start": r["media_start"], "end": r["media_end"],
            "wall_start": r["wall_start"].isoformat(), "wall_end": r["wall_end"].isoformat(), "text": r["text"],
            "language": r["language"], "label": r["label"], "translated": r["translated"],
            "words": _words(r["words"])}


def wall_caption(stream: str, r: Any) -> Caption:
    """A stored caption with its and its words' times on the wall clock
    (unix seconds): each word keeps its offset from the caption's start."""
    wall_start = r["wall_start"].timestamp()
    shift = wall_start - r["media_start"]
    words = []
    for w in _words(r["words"]):
        try:
            words.append(Word(str(w["text"]), float(w["start"]) + shift, float(w["end"]) + shift,
                              float(w.get("probability", 1.0)), bool(w.get("emphasis", False))))
        except (KeyError, TypeError, ValueError):
            continue  # a malformed word is left out; the cue still has the others
    return Caption(stream, True, wall_start, r["wall_end"].timestamp(), r["text"], tuple(words), r["language"])


async def list_captions(request: web.Request) -> web.Response:
    entry, _ = await stream_records(request)
    q = request.query
    since, until = _range(q, {"from", "to", "limit", "after_id"})
    limit = query_int("limit", q.get("limit"), PAGE_DEFAULT, 1, PAGE_MAX)
    after = query_int("after_id", q.get("after_id"), None, 1, 2**63 - 1)
    assert limit is not None
    rows = await repo.list_captions(request.app[DB].pool, entry.id, since=since, until=until, limit=limit,
                                    after_id=after)
    return web.json_response({"stream": entry.name, "captions": [caption_json(entry.name, r) for r in rows],
                              "next_after_id": rows[-1]["id"] if len(rows) == limit else None})


async def export_captions(request: web.Request) -> web.Response:
    fmt = request.match_info["fmt"]
    content_type, render = _FORMATS[fmt]
    entry, _ = await stream_records(request)
    since, until = _range(request.query, {"from", "to"})
    rows = await repo.list_captions(request.app[DB].pool, entry.id, since=since, until=until,
                                    limit=EXPORT_MAX + 1)
    if len(rows) > EXPORT_MAX:
        raise BadRequest(f"more than {EXPORT_MAX} captions in this range: narrow it with from/to")
    captions = [wall_caption(entry.name, r) for r in rows]
    if since is not None:
        origin = since.timestamp()
    else:
        origin = min((c.start for c in captions), default=0.0)
    body = render(captions, origin=origin)
    return web.Response(text=body, content_type=content_type, charset="utf-8", headers={
        "Content-Disposition": f'attachment; filename="captions-{entry.id}.{fmt}"',
        "X-Captions-Origin": datetime.fromtimestamp(origin, timezone.utc).isoformat(),
    })


def setup(app: web.Application) -> None:
    r = app.router
    r.add_get("/api/v1/streams/{name}/captions", list_captions)
    r.add_get("/api/v1/streams/{name}/captions.{fmt:vtt|srt}", export_captions)
