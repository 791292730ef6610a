"""QC endpoints: ``/ws/events`` and the markers/notes REST API (issue 12).

``GET /ws/events`` — WebSocket (see :mod:`server.qc_events`). Auth like
``/ws/tally``: ``Authorization: Bearer`` or ``?token=``; a signed stream
link sees only its own stream, a user the streams of the productions they
direct (an admin: all). Client messages: ``{"type": "subscribe", "streams":
[...]}`` (meters of those streams), ``ping``/``pong``.

REST (JSON, errors ``{error, detail}``):

* ``GET /api/v1/streams/{name}/markers?from=&to=&type=&include_false_positive=&limit=&before_id=&format=json|csv``
  — markers overlapping the wall-clock range (``from``/``to``: ISO 8601 or
  unix seconds; without an offset, UTC), newest first; ``type`` one or more
  comma-separated marker types; CSV with a header row. Directors of the
  stream's production, admins, and a link of that stream.
* ``PATCH /api/v1/markers/{id}`` ``{"false_positive"?: bool, "verified"?: bool}``
  — directors; records verified_by/at and broadcasts ``marker.flag``.
* ``POST /api/v1/streams/{name}/notes`` ``{"text", "marker_id"?, "at"?}`` —
  directors; broadcasts ``note``. ``GET .../notes?marker_id=&limit=`` — as
  the markers list.
"""

from __future__ import annotations

import csv
import io
import json
import time
from datetime import datetime, timezone
from typing import Any

from aiohttp import web

from live_qc.markers import TYPES

from . import repo
from .access import check_stream_records, client_ip, json_body, principal, stream_records
from .errors import BadRequest, NotFound
from .grants import WS_CLOSE_REVOKED, Grant
from .keys import DB, DIRECTORY, QC_EVENTS, QC_WS_CAPS, SETTINGS
from .limits import ConnectionCaps
from .qc_events import QcEvents
from .query import parse_time, query_int

WS_MAX_MESSAGE = 64 * 1024
#: Longest note (characters); the notes table checks the same bound.
NOTE_MAX_CHARS = 4000
#: Rows one markers/notes page may hold.
PAGE_MAX = 5000
PAGE_DEFAULT = 500
CLOSE_TOO_MANY = 4029


def _iso(d: datetime | None) -> str | None:
    return None if d is None else d.isoformat()


def marker_json(r: Any) -> dict[str, Any]:
    return {"id": r["id"], "stream": r["stream"], "kind": r["type"], "subtype": r["subtype"],
            "severity": r["severity"], "confidence": round(float(r["confidence"]), 3),
            "start": r["media_start"], "end": r["media_end"], "wall_start": _iso(r["wall_start"]),
            "wall_end": _iso(r["wall_end"]), "metadata": r["metadata"], "false_positive": r["false_positive"],
            "verified_by": r["verified_by"], "verified_at": _iso(r["verified_at"])}


def note_json(stream: str, r: Any) -> dict[str, Any]:
    return {"id": r["id"], "stream": stream, "marker_id": r["marker_id"], "at": _iso(r["at"]), "text": r["text"],
            "author": r["author"], "created_at": _iso(r["created_at"])}


def _bool(name: str, raw: str) -> bool:
    low = raw.lower()
    if low in ("1", "true", "yes"):
        return True
    if low in ("0", "false", "no"):
        return False
    raise BadRequest(f"{name} must be true or false")


async def ws_events(request: web.Request) -> web.StreamResponse:
    p = await principal(request)
    service = request.app[QC_EVENTS]
    ws = web.WebSocketResponse(compress=False, max_msg_size=WS_MAX_MESSAGE, autoping=False)
    keys = {"link": f"link:{p.link.jti}" if p.link is not None else f"user:{p.user_id}", "ip": client_ip(request)}
    caps = request.app[QC_WS_CAPS]
    hit = caps.acquire(keys)
    await ws.prepare(request)
    if hit is not None:
        await ws.close(code=CLOSE_TOO_MANY,
                       message=f"too many event connections for this {hit} (at most {caps.caps[hit]})".encode())
        return ws
    grants = request.app[DIRECTORY].grants
    try:
        link = p.link
        client = service.connect(ws, who=p.username or p.label, link_stream=link.stream if link else None,
                                 user_id=p.user_id, admin=p.is_admin)
        if link is not None:
            # Revoking the link or deleting its stream closes the socket with
            # 4403, as on /ws/tally. Users are checked on every message
            # instead (a director removed from a production sees no more of it).
            grants.add(ws, Grant("events", link.production_id,
                                 lambda reason: service.kick(client, WS_CLOSE_REVOKED, f"access ended: {reason}"),
                                 lambda: client.closed is None, stream=link.stream, stream_id=link.stream_id,
                                 link=link))
        await service.serve(client)
    finally:
        grants.discard(ws)
        caps.release(keys)
    return ws


async def list_markers(request: web.Request) -> web.StreamResponse:
    entry, _ = await stream_records(request, write=False)
    q = request.query
    known = {"from", "to", "type", "include_false_positive", "format", "limit", "before_id"}
    unknown = sorted(set(q) - known)
    if unknown:
        raise BadRequest(f"unknown query parameter {unknown[0]!r}")
    since = parse_time("from", q["from"]) if "from" in q else None
    until = parse_time("to", q["to"]) if "to" in q else None
    if since is not None and until is not None and until <= since:
        raise BadRequest("'to' must be after 'from'")
    types = None
    if "type" in q:
        types = [t.strip() for t in q["type"].split(",") if t.strip()]
        bad = [t for t in types if t not in TYPES]
        if bad or not types:
            raise BadRequest(f"type must be one or more of {', '.join(TYPES)}")
    fp = _bool("include_false_positive", q["include_false_positive"]) if "include_false_positive" in q else False
    fmt = q.get("format", "json")
    if fmt not in ("json", "csv"):
        raise BadRequest("format must be json or csv")
    limit = query_int("limit", q.get("limit"), PAGE_DEFAULT, 1, PAGE_MAX)
    before = query_int("before_id", q.get("before_id"), None, 1, 2**63 - 1)
    rows = await repo.list_markers(request.app[DB].pool, entry.id, since=since, until=until, types=types,
                                   include_false_positive=fp, limit=limit, before_id=before)
    markers = [marker_json(r) for r in rows]
    if fmt == "json":
        return web.json_response({"stream": entry.name, "markers": markers})
    out = io.StringIO()
    cols = ["id", "stream", "kind", "subtype", "severity", "confidence", "start", "end", "wall_start", "wall_end",
            "false_positive", "verified_by", "verified_at", "metadata"]
    w = csv.writer(out, lineterminator="\r\n")  # RFC 4180 §2: CRLF line breaks
    w.writerow(cols)
    for m in markers:
        m = {**m, "metadata": json.dumps(m["metadata"], separators=(",", ":"))}
        w.writerow([_cell(m[c]) for c in cols])
    return web.Response(text=out.getvalue(), content_type="text/csv", charset="utf-8",
                        headers={"Content-Disposition": f'attachment; filename="markers-{entry.id}.csv"'})


def _cell(value: Any) -> Any:
    """A CSV cell; text a spreadsheet would run as a formula (OWASP "CSV
    injection": a leading = + - @ tab or CR) is prefixed with a quote."""
    if value is None:
        return ""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def _marker_id(request: web.Request) -> int:
    raw = request.match_info["marker_id"]
    if not raw.isdigit() or len(raw) > 18:
        raise NotFound("no such marker")
    return int(raw)


async def patch_marker(request: web.Request) -> web.Response:
    p = await principal(request)
    marker_id = _marker_id(request)
    data = await json_body(request)
    unknown = sorted(set(data) - {"false_positive", "verified"})
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}")
    if not data:
        raise BadRequest("send false_positive and/or verified")
    for k, v in data.items():
        if not isinstance(v, bool):
            raise BadRequest(f"{k} must be true or false")
    pool = request.app[DB].pool
    row = await repo.marker_by_id(pool, marker_id)
    if row is None:
        raise NotFound("no such marker")
    entry = request.app[DIRECTORY].stream(row["stream"])
    if entry is None:
        raise NotFound("no such marker")
    await check_stream_records(request, p, entry, write=True)
    async with pool.acquire() as conn:
        async with conn.transaction():
            await repo.flag_marker(conn, marker_id, false_positive=data.get("false_positive"),
                                   verified=data.get("verified"), user_id=p.user_id)
            await repo.audit(conn, "marker.flag", actor_user_id=p.user_id, actor=p.username,
                             target=str(marker_id), detail=data, ip=client_ip(request))
        row = await repo.marker_by_id(conn, marker_id)
    body = marker_json(row)
    request.app[QC_EVENTS].flagged(entry.name, body)
    return web.json_response(body)


async def post_note(request: web.Request) -> web.Response:
    entry, p = await stream_records(request, write=True)
    data = await json_body(request)
    unknown = sorted(set(data) - {"text", "marker_id", "at"})
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}")
    text = data.get("text")
    if not isinstance(text, str) or not text.strip():
        raise BadRequest("text is a non-empty string")
    text = text.strip()
    if len(text) > NOTE_MAX_CHARS:
        raise BadRequest(f"text is at most {NOTE_MAX_CHARS} characters")
    marker_id = data.get("marker_id")
    if marker_id is not None and (isinstance(marker_id, bool) or not isinstance(marker_id, int)
                                  or not 1 <= marker_id < 2**63):
        raise BadRequest("marker_id is a marker's id")
    at = parse_time("at", data["at"]) if data.get("at") is not None else None
    pool = request.app[DB].pool
    if marker_id is not None:
        marker = await repo.marker_by_id(pool, marker_id)
        if marker is None or marker["stream"] != entry.name:
            raise NotFound("no such marker on this stream")
        at = at or marker["wall_start"]
    at = at or datetime.fromtimestamp(time.time(), timezone.utc)
    row = await repo.insert_note(pool, entry.id, marker_id, at, text, p.user_id, p.username)
    body = note_json(entry.name, row)
    request.app[QC_EVENTS].noted(entry.name, body)
    return web.json_response(body, status=201)


async def list_notes(request: web.Request) -> web.Response:
    entry, _ = await stream_records(request, write=False)
    q = request.query
    marker_id = query_int("marker_id", q.get("marker_id"), None, 1, 2**63 - 1)
    limit = query_int("limit", q.get("limit"), PAGE_DEFAULT, 1, PAGE_MAX)
    rows = await repo.list_notes(request.app[DB].pool, entry.id, marker_id=marker_id, limit=limit)
    return web.json_response({"stream": entry.name, "notes": [note_json(entry.name, r) for r in rows]})


def setup(app: web.Application, service: QcEvents) -> None:
    app[QC_EVENTS] = service
    h = app[SETTINGS].http
    app[QC_WS_CAPS] = ConnectionCaps({"link": h.ws_max_per_link, "ip": h.ws_max_per_ip})
    r = app.router
    r.add_get("/ws/events", ws_events)
    r.add_get("/api/v1/streams/{name}/markers", list_markers)
    r.add_patch("/api/v1/markers/{marker_id}", patch_marker)
    r.add_get("/api/v1/streams/{name}/notes", list_notes)
    r.add_post("/api/v1/streams/{name}/notes", post_note)
