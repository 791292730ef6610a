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
from ..errors import BadRequest, Conflict, Forbidden, NotFound, PayloadTooLarge
from ..keys import DB, LIVE_STATE, SETTINGS
from ..redact import keep_secrets, redact_secrets
from ..stream_settings import SettingsError, apply_patch, check_document, effective_json, limits_json, stored_sections
from .common import int_field, notify_streams_changed, production_or_404, str_field

#: A settings PATCH is a few hundred bytes; anything near this is not one.
SETTINGS_MAX_BODY = 16 * 1024
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
    # The control room's QC/captions toggles show what is in force.
    out["effective_settings"] = _effective(request, name, r["settings"])
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
    _check_sections(settings)
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
        _check_sections(settings)
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


# -- per-stream QC and caption settings (server/stream_settings.py) ---------------------

def _effective(request: web.Request, name: str, settings: Any) -> dict[str, Any]:
    # ``[captions]`` gives the caption defaults where the server has that section.
    config = request.app[SETTINGS]
    return effective_json(config.qc, getattr(config, "captions", None), name, stored_sections(settings))


def _check_sections(settings: dict[str, Any]) -> None:
    """The whole-settings routes may write the QC/captions sections too: same schema."""
    try:
        check_document(settings)
    except SettingsError as exc:
        raise BadRequest(f"settings: {exc}") from None


def _settings_json(request: web.Request, row: asyncpg.Record, settings: Any) -> dict[str, Any]:
    return {"stream": row["name"], "stored": stored_sections(settings),
            "effective": _effective(request, row["name"], settings), "limits": limits_json()}


async def get_settings(request: web.Request) -> web.Response:
    """GET /api/v1/streams/{name}/settings: what the stream stores and what is in force."""
    p = await principal(request)
    row = await _stream(request)
    if p.kind == "link" and p.link is not None and p.link.stream != row["name"]:
        raise Forbidden("this link is for another stream")
    await require_production_role(request, p, row["production_id"], *MEMBER_ROLES)
    return web.json_response(_settings_json(request, row, row["settings"]))


async def patch_settings(request: web.Request) -> web.Response:
    """PATCH /api/v1/streams/{name}/settings: a merge patch of the QC/captions
    sections (server/stream_settings.py), by the production's directors."""
    p = await user_principal(request)
    row = await _stream(request)
    await require_production_role(request, p, row["production_id"], "director")
    data = await json_body(request, SETTINGS_MAX_BODY)
    if len(await request.read()) > SETTINGS_MAX_BODY:  # chunked: no Content-Length was checked
        raise PayloadTooLarge(f"body larger than {SETTINGS_MAX_BODY} bytes")
    if not data:
        raise BadRequest("nothing to change: send 'qc' and/or 'captions'")
    try:
        apply_patch({}, data)  # the patch alone: 400 before any database work
    except SettingsError as exc:
        raise BadRequest(str(exc)) from None
    pool = request.app[DB].pool
    async with pool.acquire() as conn, conn.transaction():
        current = await repo.stream_settings_for_update(conn, row["id"])
        if current is None:
            raise NotFound("no such stream")
        try:
            sections = apply_patch(current, data)
        except SettingsError as exc:
            # The stored document predates the schema: the patch must fix it.
            raise BadRequest(f"{exc} (stored settings; send null for that section to reset it)") from None
        settings = await repo.set_stream_sections(conn, row["id"], sections)
        await repo.audit(conn, "stream.settings", actor_user_id=p.user_id, actor=p.username,
                         target=row["name"], detail={"patch": data}, ip=client_ip(request))
    # This node follows at once (QC taps attach/detach on the listener);
    # the others on the trigger's NOTIFY.
    await notify_streams_changed(request.app)
    return web.json_response(_settings_json(request, row, settings))


def setup(app: web.Application) -> None:
    r = app.router
    r.add_post("/api/v1/streams", create_stream)
    r.add_get("/api/v1/streams", list_streams)
    r.add_get("/api/v1/streams/{name}", get_stream)
    r.add_patch("/api/v1/streams/{name}", update_stream)
    r.add_delete("/api/v1/streams/{name}", delete_stream)
    r.add_get("/api/v1/streams/{name}/settings", get_settings)
    r.add_patch("/api/v1/streams/{name}/settings", patch_settings)
