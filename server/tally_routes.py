"""Tally endpoints: ``/ws/tally`` and the REST controls.

``GET /ws/tally`` — WebSocket (protocol in :mod:`tally.protocol`). Auth:
``Authorization: Bearer`` or ``?token=``. A signed stream link decides its
production and sees only its own stream's source (its holder can watch,
not switch); a user token names the
production with ``?production=<id or name>`` and must belong to a member.
Directors (and admins) may send ``cut``/``preview``/``take``; others get
an ``error`` for them and nothing changes. Refused upgrades are plain HTTP
errors with a JSON body (401, 403, 404) so a client sees why.

REST (JSON, errors ``{error, detail}``):

* ``GET /api/v1/productions/{id}/tally`` — snapshot (members);
* ``POST /api/v1/productions/{id}/tally`` ``{"type": "cut"|"preview"|"take",
  "source"?, "duration"?}`` — directors; the body is parsed as the WebSocket's
  command message (:func:`tally.protocol.parse_command`) and applied through
  the same hub method (:meth:`tally.hub.TallyHub.command`): 400 with the
  protocol's ``code`` for a malformed command, 403 for camera/viewer, 409 for
  a refused one (unknown source, source driven by a switcher);
* ``GET|PUT /api/v1/productions/{id}/tally/config`` — sources and switcher
  adapters (see :mod:`server.tally_config`); PUT is for directors and is
  applied in place (clients stay connected, unchanged adapters keep running,
  every resulting change is an ordinary delta);
* ``GET /api/v1/productions/{id}/tally/events?limit=&before_seq=`` — audit.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from tally.errors import CommandRejected, MessageError
from tally.hub import aiohttp_sink, serve_aiohttp
from tally.protocol import CloseCode, parse_command

from . import repo
from .access import Principal, client_ip, json_body, principal, production_role, require_production_role
from .errors import BadRequest, Conflict, Forbidden, NotFound
from .keys import DB, DIRECTORY, SETTINGS, TALLY, WS_CAPS
from .limits import ConnectionCaps
from .grants import WS_CLOSE_REVOKED, Grant
from .redact import keep_secrets, redact_secrets
from .tally_config import TallyConfigError, validate_config
from .tally_service import TallyService

WS_MAX_MESSAGE = 64 * 1024


async def _find_production(request: web.Request, ref: str | int) -> int:
    """A production id from the in-memory directory (tally works
    through a database outage); the database is asked only for a production
    this node has not heard of yet, and only while it is up."""
    entry = request.app[DIRECTORY].production(ref)
    if entry is not None:
        return entry.id
    db = request.app[DB]
    if db.available:
        row = await repo.find_production(db.pool, ref)
        if row is not None:
            return int(row["id"])
    raise NotFound("no such production")


async def _production_for(request: web.Request, p: Principal) -> int:
    if p.kind == "link":
        assert p.link is not None
        return await _find_production(request, p.link.production_id)
    ref = request.query.get("production")
    if not ref:
        raise BadRequest("add ?production=<id or name>")
    return await _find_production(request, ref)


async def ws_tally(request: web.Request) -> web.StreamResponse:
    p = await principal(request)
    production_id = await _production_for(request, p)
    role = await production_role(request, p, production_id)
    if role is None:
        raise Forbidden("not a member of this production")
    service = request.app[TALLY]
    pt = await service.get(production_id)
    # autoping=False: aiohttp would swallow the Pong frames that standard
    # clients answer our RFC 6455 Pings with; serve_aiohttp counts them.
    ws = web.WebSocketResponse(compress=False, max_msg_size=WS_MAX_MESSAGE, autoping=False)
    # One link (or user), one address or one production cannot hold an
    # unbounded number of sockets (issue 9 item 11).
    keys = {"link": f"link:{p.link.jti}" if p.link is not None else f"user:{p.user_id}",
            "ip": client_ip(request), "production": str(production_id)}
    caps = request.app[WS_CAPS]
    hit = caps.acquire(keys)
    if hit is not None:
        # Accepted, then closed with a code the client can tell apart from a
        # failure (RFC 6455 §7.4.2: 4000-4999 are the application's).
        await ws.prepare(request)
        await ws.close(code=CloseCode.TOO_MANY_CONNECTIONS,
                       message=f"too many tally connections for this {hit} (at most {caps.caps[hit]})".encode())
        return ws
    grants = request.app[DIRECTORY].grants
    try:
        await ws.prepare(request)
        who = p.username if p.kind == "user" else f"link:{p.link.stream if p.link else ''}"
        # A signed camera/viewer link sees only its own stream's tally (issue:
        # "a camera link can only see its production's program and its own tally";
        # the program video is its WHEP return feed).
        only = frozenset({p.link.stream}) if p.kind == "link" and p.link is not None else None
        client = pt.hub.connect(aiohttp_sink(ws), director=role in ("admin", "director"), who=who, only=only)
        # Revoking the link, deleting its stream, removing the member or changing
        # their role closes this socket with 4403 and the reason (issue 9 item 5).
        grants.add(ws, Grant(
            "tally", production_id, lambda reason: pt.hub.kick(client, WS_CLOSE_REVOKED, f"access ended: {reason}"),
            lambda: client.closed is None, stream=p.link.stream if p.link is not None else None,
            stream_id=p.link.stream_id if p.link is not None else None, link=p.link, user_id=p.user_id,
            roles=() if p.kind == "link" or role == "admin" else (role,)))
        await serve_aiohttp(pt.hub, client, ws)
    finally:
        grants.discard(ws)
        caps.release(keys)
    return ws


async def _pt(request: web.Request, *roles: str) -> tuple[Any, Principal]:
    p = await principal(request)
    raw = request.match_info["production_id"]
    if not raw.isdigit():
        raise NotFound("no such production")
    production_id = await _find_production(request, int(raw))
    await require_production_role(request, p, production_id, *roles)
    return await request.app[TALLY].get(production_id), p


async def get_tally(request: web.Request) -> web.Response:
    pt, p = await _pt(request, "director", "camera", "viewer")
    snap = request.app[TALLY].snapshot(pt)
    if p.kind == "link" and p.link is not None:
        # The same scope as /ws/tally gives this link (issue 9 item 3): its own
        # source only — no other source's state, no program/preview names of
        # other sources, no switcher adapters.
        own = p.link.stream
        snap = {"production": snap["production"], "production_id": snap["production_id"], "seq": snap["seq"],
                "sources": {n: st for n, st in snap["sources"].items() if n == own}}
    return web.json_response(snap)


async def post_tally(request: web.Request) -> web.Response:
    pt, p = await _pt(request, "director")
    try:
        # The body is a WebSocket command message: the same parser, the same
        # checks and error codes as /ws/tally.
        command = parse_command(await json_body(request))
        request.app[TALLY].command(pt, command, who=p.username or p.label)
    except MessageError as exc:
        raise BadRequest(exc.detail, extra={"code": exc.code}) from None
    except CommandRejected as exc:
        raise Conflict(exc.detail, extra={"code": exc.code}) from None
    # The state changed synchronously, so the snapshot already shows it; the
    # delta reaches WebSocket clients with the hub's normal flush.
    return web.json_response(request.app[TALLY].snapshot(pt))


async def get_config(request: web.Request) -> web.Response:
    pt, _ = await _pt(request, "director")
    settings = await repo.production_settings(request.app[DB].pool, pt.production_id)
    # Write-only secrets (issue 9 item 1): an OBS password is "password_set".
    return web.json_response(redact_secrets(settings.get("tally", {})))


async def put_config(request: web.Request) -> web.Response:
    pt, p = await _pt(request, "director")
    data = await json_body(request)
    service = request.app[TALLY]
    pool = request.app[DB].pool
    stored = await repo.production_tally_config(pool, pt.production_id)
    # A configuration read back (secrets shown as "password_set": true) and
    # sent again keeps the stored secrets instead of erasing them.
    data = keep_secrets(data, stored or {})
    try:
        cfg = validate_config(data)
        # Never store what cannot start: an unusable configuration would
        # otherwise stay in the database (issue 9, item 16).
        await service.check(pt.production_id, cfg)
    except TallyConfigError as exc:
        raise BadRequest(str(exc)) from None
    async with pool.acquire() as conn:
        await repo.set_production_tally_config(conn, pt.production_id, cfg)
        await repo.audit(conn, "tally.config", actor_user_id=p.user_id, actor=p.username,
                         target=str(pt.production_id), detail={"adapters": [a["type"] for a in cfg["adapters"]]},
                         ip=client_ip(request))
    try:
        # In place: connected clients stay, unchanged adapters keep running.
        fresh = await service.apply(pt.production_id)
    except Exception as exc:  # e.g. a source definition the state machine refuses
        raise BadRequest(f"configuration stored but not usable: {exc}") from None
    return web.json_response(service.snapshot(fresh))


async def get_events(request: web.Request) -> web.Response:
    pt, _ = await _pt(request, "director")
    try:
        limit = min(max(int(request.query.get("limit", "100")), 1), 1000)
        before = int(request.query["before_seq"]) if "before_seq" in request.query else None
    except ValueError:
        raise BadRequest("limit and before_seq must be integers") from None
    if before is not None and not -2**63 <= before < 2**63:
        # seq is a bigint: a larger number would fail in the driver, not match nothing.
        raise BadRequest("before_seq must be a 64-bit integer")
    rows = await repo.tally_events(request.app[DB].pool, pt.production_id, before, limit)
    return web.json_response({"events": [
        {"seq": r["seq"], "changes": r["changes"], "actor": r["actor"], "origin": r["origin"],
         "at": r["at"].isoformat()} for r in rows]})


def setup(app: web.Application, service: TallyService) -> None:
    app[TALLY] = service
    h = app[SETTINGS].http
    app[WS_CAPS] = ConnectionCaps({"link": h.ws_max_per_link, "ip": h.ws_max_per_ip,
                                   "production": h.ws_max_per_production})
    r = app.router
    r.add_get("/ws/tally", ws_tally)
    r.add_get("/api/v1/productions/{production_id}/tally", get_tally)
    r.add_post("/api/v1/productions/{production_id}/tally", post_tally)
    r.add_get("/api/v1/productions/{production_id}/tally/config", get_config)
    r.add_put("/api/v1/productions/{production_id}/tally/config", put_config)
    r.add_get("/api/v1/productions/{production_id}/tally/events", get_events)
