"""``/api/v1/streams``: a production's streams, their SRT/WHIP/WHEP URLs
and live state.

Passphrases and SRT URLs are shown to directors and admins only; a signed
link reads its own stream. The live state (``LIVE_STATE``, with what
``LIVE_STATE_HOOKS`` add) comes from the media layer.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import asyncpg
from aiohttp import web

from media.srt.streamid import is_valid_stream_name

from .. import repo
from ..access import base_url, client_ip, json_body, principal, require_production_role, user_principal
from ..auth import MEMBER_ROLES
from ..errors import BadRequest, Conflict, Forbidden, NotFound
from ..keys import DB, LIVE_STATE, SETTINGS
from ..redact import keep_secrets, redact_secrets
from .common import int_field, notify_streams_changed, production_or_404, str_field
from .srt_urls import LATENCY_MAX_MS, LATENCY_MIN_MS, srt_urls, stream_latency_ms


def _offline(name: str) -> dict[str, Any]:
    return {"live": False, "state": "offline", "source": None, "tracks": [], "layers": [], "viewers": 0}


def stream_json(request: web.Request, r: asyncpg.Record, *, secrets_visible: bool) -> dict[str, Any]:
    base = base_url(request)
    name = r["name"]
    out: dict[str, Any] = {
        "id": r["id"], "name": name, "label": r["label"],
        "production": {"id": r["production_id"], "name": r["production_name"]},
        "whip_url": f"{base}/whip/{quote(name)}", "whep_url": f"{base}/whep/{quote(name)}",
        "watch_url": f"{base}/watch/{quote(name)}",
        "srt_streamid": f"publish:{name}",
        "pbkeylen": r["pbkeylen"],
        "latency_ms": stream_latency_ms(request, r["latency_ms"]),
        "latency_default": r["latency_ms"] is None,
        # Secrets in settings are write-only (issue 9 item 1).
        "settings": redact_secrets(r["settings"]),
        "created_at": r["created_at"].isoformat(),
    }
    if secrets_visible:
        out["passphrase"] = r["passphrase"]
        for key, action in (("srt_url", "publish"), ("srt_read_url", "read")):
            out.update(srt_urls(request, key, f"{action}:{name}", r["passphrase"], r["pbkeylen"], r["latency_ms"]))
    out.update(request.app.get(LIVE_STATE, _offline)(name))
    if not secrets_visible:
        # Peers' addresses and why their encoders failed are for directors.
        out.pop("connection_failures", None)
    return out


async def _stream(request: web.Request) -> asyncpg.Record:
    row = await repo.stream_by_name(request.app[DB].pool, request.match_info["name"])
    if row is None:
        raise NotFound("no such stream")
    return row


async def create_stream(request: web.Request) -> web.Response:
    p = await user_principal(request)
    data = await json_body(request)
    name = str_field(data, "name", max_len=64)
    # Stream names travel in URL paths and SRT stream IDs: one rule for both.
    if not is_valid_stream_name(name):
        raise BadRequest("'name' must be 1–64 characters of letters, digits, '_', '.', '-', "
                         "starting with a letter or digit")
    prod_ref = data.get("production")
    if prod_ref is None:
        raise BadRequest("'production' is required (id or name)")
    if isinstance(prod_ref, bool) or not isinstance(prod_ref, (int, str)):
        raise BadRequest("'production' must be an id or a name")
    prod = await production_or_404(request, prod_ref)
    await require_production_role(request, p, prod["id"], "director")
    label = str_field(data, "label", required=False, max_len=200, default="")
    settings = data.get("settings", {})
    if not isinstance(settings, dict):
        raise BadRequest("'settings' must be an object")
    settings = keep_secrets(settings, {})  # "<key>_set" markers are answers, not settings
    pbkeylen = int_field(data, "pbkeylen", default=request.app[SETTINGS].srt.pbkeylen)
    if pbkeylen not in (16, 24, 32):
        raise BadRequest("'pbkeylen' must be 16, 24 or 32")
    latency_ms = int_field(data, "latency_ms", lo=LATENCY_MIN_MS, hi=LATENCY_MAX_MS)
    pool = request.app[DB].pool
    try:
        async with pool.acquire() as conn:
            row = await repo.create_stream(conn, name, prod["id"], pbkeylen, label, settings, latency_ms)
            await repo.audit(conn, "stream.create", actor_user_id=p.user_id, actor=p.username,
                             target=name, detail={"production": prod["id"]}, ip=client_ip(request))
    except asyncpg.UniqueViolationError:
        raise Conflict("a stream with this name already exists") from None
    await notify_streams_changed(request.app)
    return web.json_response(stream_json(request, row, secrets_visible=True), status=201)


async def list_streams(request: web.Request) -> web.Response:
    p = await principal(request)
    pool = request.app[DB].pool
    if p.is_admin:
        rows = await repo.list_streams(pool, None)
        roles: dict[int, str] = {}
    elif p.kind == "link":
        assert p.link is not None
        rows = [r for r in [await repo.stream_by_name(pool, p.link.stream)] if r is not None]
        roles = {}
    else:
        roles = await repo.user_production_roles(pool, p.user_id)
        rows = await repo.list_streams(pool, list(roles))
    prod_filter = request.query.get("production")
    if prod_filter:
        rows = [r for r in rows if str(r["production_id"]) == prod_filter or r["production_name"] == prod_filter]
    out = [stream_json(request, r, secrets_visible=p.is_admin or roles.get(r["production_id"]) == "director")
           for r in rows]
    return web.json_response({"streams": out})


async def get_stream(request: web.Request) -> web.Response:
    p = await principal(request)
    row = await _stream(request)
    if p.kind == "link" and p.link is not None and p.link.stream != row["name"]:
        raise Forbidden("this link is for another stream")
    role = await require_production_role(request, p, row["production_id"], *MEMBER_ROLES)
    return web.json_response(stream_json(request, row, secrets_visible=role in ("admin", "director")))


async def update_stream(request: web.Request) -> web.Response:
    p = await user_principal(request)
    row = await _stream(request)
    await require_production_role(request, p, row["production_id"], "director")
    data = await json_body(request)
    label = str_field(data, "label", required=False, max_len=200)
    settings = data.get("settings")
    if settings is not None and not isinstance(settings, dict):
        raise BadRequest("'settings' must be an object")
    if settings is not None:
        # Settings read back (secrets as "<key>_set": true) keep the stored secrets.
        old = row["settings"]
        settings = keep_secrets(settings, old)
    rotate = data.get("rotate_passphrase", False)
    if not isinstance(rotate, bool):
        raise BadRequest("'rotate_passphrase' must be a boolean")
    # null resets the stream to the server's default latency
    set_latency = "latency_ms" in data
    latency_ms = int_field(data, "latency_ms", lo=LATENCY_MIN_MS, hi=LATENCY_MAX_MS)
    pool = request.app[DB].pool
    async with pool.acquire() as conn:
        await repo.update_stream(conn, row["id"], label, settings)
        if set_latency:
            await repo.set_stream_latency(conn, row["id"], latency_ms)
        if rotate:
            await repo.rotate_passphrase(conn, row["id"])
            await repo.audit(conn, "stream.rotate_passphrase", actor_user_id=p.user_id, actor=p.username,
                             target=row["name"], ip=client_ip(request))
        row = await repo.stream_by_id(conn, row["id"])
    await notify_streams_changed(request.app)
    return web.json_response(stream_json(request, row, secrets_visible=True))


async def delete_stream(request: web.Request) -> web.Response:
    p = await user_principal(request)
    row = await _stream(request)
    await require_production_role(request, p, row["production_id"], "director")
    pool = request.app[DB].pool
    async with pool.acquire() as conn:
        await repo.delete_stream(conn, row["id"])
        await repo.audit(conn, "stream.delete", actor_user_id=p.user_id, actor=p.username,
                         target=row["name"], ip=client_ip(request))
    await notify_streams_changed(request.app)
    return web.Response(status=204)


def setup(app: web.Application) -> None:
    r = app.router
    r.add_post("/api/v1/streams", create_stream)
    r.add_get("/api/v1/streams", list_streams)
    r.add_get("/api/v1/streams/{name}", get_stream)
    r.add_patch("/api/v1/streams/{name}", update_stream)
    r.add_delete("/api/v1/streams/{name}", delete_stream)
