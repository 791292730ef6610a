"""REST API v1: auth, users, productions, members, streams, signed links.

Shapes follow DESIGN.md "Interfaces". Authorisation:

* admin: everything;
* director (user role): may create productions (and becomes their director);
  within a production, members with production role ``director`` manage its
  streams, members, links and tally;
* camera / viewer: read the productions and streams they are members of
  (stream passphrases are shown to directors and admins only);
* a signed stream link acts only on its one stream and action.
"""

from __future__ import annotations

import asyncio
import json
import logging
import unicodedata
import uuid
from datetime import datetime, timezone
from typing import Any, Callable
from urllib.parse import quote, urlencode

import asyncpg
from aiohttp import web

from . import repo
from .app import (
    DB, DIRECTORY, LIMITER, METRICS, SETTINGS, TOKENS, base_url, client_ip, json_body, principal,
    require_production_role, require_roles, stream_entry, user_principal,
)
from .directory import CHANNEL as DIRECTORY_CHANNEL, StreamEntry
from .auth import (
    MEMBER_ROLES, ROLES, TokenError, hash_password, hash_refresh_token, needs_rehash, new_refresh_token,
    validate_password_strength, verify_password,
)
from media.srt.streamid import is_valid_stream_name

from .errors import (
    BadRequest, Conflict, DatabaseUnavailable, Forbidden, NotFound, TooManyRequests, Unauthorized,
)
from .log import event
from .redact import keep_secrets, redact_secrets

log = logging.getLogger("returnfeed.api")


#: Live state of a stream for the API, supplied by the media layer.
LIVE_STATE = web.AppKey("live_state", Callable[[str], dict[str, Any]])


def _offline(name: str) -> dict[str, Any]:
    return {"live": False, "state": "offline", "source": None, "tracks": [], "layers": [], "viewers": 0}


# -- validation helpers ------------------------------------------------------

def _str(data: dict[str, Any], key: str, *, required: bool = True, max_len: int = 200,
         default: str | None = None) -> str | None:
    if key not in data or data[key] is None:
        if required:
            raise BadRequest(f"'{key}' is required")
        return default
    value = data[key]
    if not isinstance(value, str):
        raise BadRequest(f"'{key}' must be a string")
    if len(value) > max_len:
        raise BadRequest(f"'{key}' must be at most {max_len} characters")
    return value


def _display_name(value: str, key: str) -> str:
    """Free text names: any Unicode, but no control characters, not blank."""
    if not value.strip():
        raise BadRequest(f"'{key}' must not be blank")
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in value):
        raise BadRequest(f"'{key}' must not contain control characters")
    return value


def _username(value: str) -> str:
    _display_name(value, "username")
    if any(ch.isspace() for ch in value):
        raise BadRequest("'username' must not contain spaces")
    return value


def _int(data: dict[str, Any], key: str, *, required: bool = False, default: int | None = None,
         lo: int | None = None, hi: int | None = None) -> int | None:
    if key not in data or data[key] is None:
        if required:
            raise BadRequest(f"'{key}' is required")
        return default
    v = data[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise BadRequest(f"'{key}' must be an integer")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise BadRequest(f"'{key}' must be between {lo} and {hi}")
    return v


def _path_int(request: web.Request, key: str) -> int:
    raw = request.match_info[key]
    if not raw.isdigit() or len(raw) > 18:
        raise NotFound(f"no such {key.removesuffix('_id')}")
    return int(raw)


async def _hash(password: str) -> str:
    return await asyncio.get_running_loop().run_in_executor(None, hash_password, password)


async def _verify(password_hash: str | None, password: str) -> bool:
    return await asyncio.get_running_loop().run_in_executor(None, verify_password, password_hash, password)


# -- auth ----------------------------------------------------------------------

async def _issue_session(request: web.Request, conn: Any, user_id: int, username: str, role: str,
                         family: Any = None) -> dict[str, Any]:
    settings = request.app[SETTINGS]
    # The family names the login; access tokens carry it as ``sid`` so a
    # logout can end them too.
    family = family or uuid.uuid4()
    access, exp = request.app[TOKENS].issue_access(user_id, username, role, str(family))
    refresh, refresh_hash = new_refresh_token()
    await repo.store_refresh(conn, user_id, refresh_hash, settings.auth.refresh_ttl_s, family,
                             request.headers.get("User-Agent"), client_ip(request))
    return {
        "access_token": access, "token_type": "Bearer", "expires_in": settings.auth.access_ttl_s,
        "expires_at": exp, "refresh_token": refresh, "refresh_expires_in": settings.auth.refresh_ttl_s,
        "user": {"id": user_id, "username": username, "role": role},
    }


async def login(request: web.Request) -> web.Response:
    data = await json_body(request)
    username = _str(data, "username", max_len=200)
    password = _str(data, "password", max_len=1024)
    ip = client_ip(request)
    limiter = request.app[LIMITER]
    metrics = request.app[METRICS]
    wait = limiter.retry_after(username, ip)
    if wait > 0:
        metrics.logins.labels("rate_limited").inc()
        raise TooManyRequests("too many failed logins; try again later", wait)
    pool = request.app[DB].pool
    user = await repo.user_by_name(pool, username)
    ok = await _verify(user["password_hash"] if user else None, password)
    if not ok or user is None or user["disabled"]:
        limiter.failed(username, ip)
        metrics.logins.labels("failure").inc()
        event(log, logging.WARNING, "auth.login_failed", username=username[:64], ip=ip)
        # Same answer whether or not the user exists.
        raise Unauthorized("invalid user name or password")
    limiter.succeeded(username, ip)
    metrics.logins.labels("success").inc()
    async with pool.acquire() as conn:
        if needs_rehash(user["password_hash"]):
            await repo.set_password(conn, user["id"], await _hash(password))
        body = await _issue_session(request, conn, user["id"], user["username"], user["role"])
        await repo.audit(conn, "auth.login", actor_user_id=user["id"], actor=user["username"], ip=ip)
    return web.json_response(body)


async def refresh(request: web.Request) -> web.Response:
    data = await json_body(request)
    token = _str(data, "refresh_token", max_len=200)
    pool = request.app[DB].pool
    reused = None
    async with pool.acquire() as conn, conn.transaction():
        row = await repo.refresh_by_hash(conn, hash_refresh_token(token))
        if row is None:
            raise Unauthorized("invalid refresh token")
        if row["revoked_at"] is not None and row["replaced_by"] is None:
            # Revoked without a successor: its login was ended (logout, or a
            # theft response already taken). Not a copy of a rotated token.
            raise Unauthorized("logged out; please log in again")
        if row["revoked_at"] is not None:
            # A rotated token came back: someone holds a copy. End the whole
            # login (committed before the error is raised), access tokens too.
            await _end_login(conn, row["family"])
            await repo.audit(conn, "auth.refresh_reuse", actor_user_id=row["user_id"],
                             actor=row["username"], ip=client_ip(request))
            reused = row["username"]
        elif row["expires_at"] <= datetime.now(timezone.utc) or row["disabled"]:
            raise Unauthorized("refresh token expired")
        else:
            body = await _issue_session(request, conn, row["user_id"], row["username"], row["role"],
                                        row["family"])
            new_id = await conn.fetchval("SELECT id FROM refresh_tokens WHERE token_hash = $1",
                                         hash_refresh_token(body["refresh_token"]))
            await repo.revoke_refresh(conn, row["id"], new_id)
    if reused is not None:
        request.app[DIRECTORY].note_session_ended(str(row["family"]))
        event(log, logging.WARNING, "auth.refresh_reuse", user=reused)
        raise Unauthorized("refresh token already used; please log in again")
    return web.json_response(body)


async def logout(request: web.Request) -> web.Response:
    data = await json_body(request)
    token = _str(data, "refresh_token", max_len=200)
    pool = request.app[DB].pool
    async with pool.acquire() as conn, conn.transaction():
        row = await repo.refresh_by_hash(conn, hash_refresh_token(token))
        if row is not None:
            await _end_login(conn, row["family"])
            await repo.audit(conn, "auth.logout", actor_user_id=row["user_id"], actor=row["username"],
                             ip=client_ip(request))
    if row is not None:
        request.app[DIRECTORY].note_session_ended(str(row["family"]))
    return web.Response(status=204)


async def _end_login(conn: Any, family: Any) -> None:
    """Revoke the login's refresh tokens and tell every node (their
    directories reload on commit) that its access tokens are dead."""
    await repo.revoke_family(conn, family)
    await conn.execute("SELECT pg_notify($1, 'refresh_tokens')", DIRECTORY_CHANNEL)


async def me(request: web.Request) -> web.Response:
    p = await principal(request)
    if p.kind == "link":
        link = p.link
        assert link is not None
        return web.json_response({"kind": "link", "role": p.role, "stream": link.stream, "action": link.action,
                                  "production_id": link.production_id, "expires_at": link.expires_at})
    pool = request.app[DB].pool
    user = await repo.user_by_id(pool, p.user_id)
    if user is None:
        raise Unauthorized("user no longer exists")
    roles = await repo.user_production_roles(pool, p.user_id)
    return web.json_response({"kind": "user", **repo.user_json(user),
                              "productions": [{"id": k, "role": v} for k, v in roles.items()]})


# -- users ---------------------------------------------------------------------

async def create_user(request: web.Request) -> web.Response:
    p = await user_principal(request)
    require_roles(p, "admin")
    data = await json_body(request)
    username = _username(_str(data, "username", max_len=64))
    password = _str(data, "password", max_len=1024)
    role = _str(data, "role", max_len=16)
    if role not in ROLES:
        raise BadRequest(f"'role' must be one of {', '.join(ROLES)}")
    reason = validate_password_strength(password)
    if reason:
        raise BadRequest(reason)
    pool = request.app[DB].pool
    try:
        async with pool.acquire() as conn:
            row = await repo.create_user(conn, username, await _hash(password), role)
            await repo.audit(conn, "user.create", actor_user_id=p.user_id, actor=p.username,
                             target=username, detail={"role": role}, ip=client_ip(request))
    except asyncpg.UniqueViolationError:
        raise Conflict("a user with this name already exists") from None
    return web.json_response(repo.user_json(row), status=201)


async def list_users(request: web.Request) -> web.Response:
    p = await user_principal(request)
    require_roles(p, "admin")
    rows = await repo.list_users(request.app[DB].pool)
    return web.json_response({"users": [repo.user_json(r) for r in rows]})


# -- productions -----------------------------------------------------------------

async def _production(request: web.Request, ref: str | int) -> asyncpg.Record:
    row = await repo.find_production(request.app[DB].pool, ref)
    if row is None:
        raise NotFound("no such production")
    return row


async def create_production(request: web.Request) -> web.Response:
    p = await user_principal(request)
    require_roles(p, "admin", "director")
    data = await json_body(request)
    name = _display_name(_str(data, "name", max_len=200), "name")
    description = _str(data, "description", required=False, max_len=2000, default="")
    pool = request.app[DB].pool
    try:
        async with pool.acquire() as conn, conn.transaction():
            row = await repo.create_production(conn, name, description, p.user_id)
            await repo.set_member(conn, row["id"], p.user_id, "director", None)
            await repo.audit(conn, "production.create", actor_user_id=p.user_id, actor=p.username,
                             target=str(row["id"]), detail={"name": name}, ip=client_ip(request))
    except asyncpg.UniqueViolationError:
        raise Conflict("a production with this name already exists") from None
    await directory_changed(request.app)
    return web.json_response(repo.production_json(row, "director"), status=201)


async def list_productions(request: web.Request) -> web.Response:
    p = await user_principal(request)
    rows = await repo.list_productions(request.app[DB].pool, None if p.is_admin else p.user_id)
    return web.json_response({"productions": [repo.production_json(r, r["my_role"] or "admin") for r in rows]})


async def get_production(request: web.Request) -> web.Response:
    p = await principal(request)
    row = await _production(request, _path_int(request, "production_id"))
    role = await require_production_role(request, p, row["id"], *MEMBER_ROLES)
    body = repo.production_json(row, role)
    if role in ("admin", "director"):
        members = await repo.list_members(request.app[DB].pool, row["id"])
        body["members"] = [dict(m) for m in members]
    return web.json_response(body)


async def update_production(request: web.Request) -> web.Response:
    p = await user_principal(request)
    pid = _path_int(request, "production_id")
    await _production(request, pid)
    await require_production_role(request, p, pid, "director")
    data = await json_body(request)
    name = _str(data, "name", required=False, max_len=200)
    if name is not None:
        _display_name(name, "name")
    description = _str(data, "description", required=False, max_len=2000)
    try:
        row = await repo.update_production(request.app[DB].pool, pid, name, description)
    except asyncpg.UniqueViolationError:
        raise Conflict("a production with this name already exists") from None
    await directory_changed(request.app)
    return web.json_response(repo.production_json(row))


async def delete_production(request: web.Request) -> web.Response:
    p = await user_principal(request)
    pid = _path_int(request, "production_id")
    await _production(request, pid)
    await require_production_role(request, p, pid, "director")
    pool = request.app[DB].pool
    async with pool.acquire() as conn:
        await repo.delete_production(conn, pid)
        await repo.audit(conn, "production.delete", actor_user_id=p.user_id, actor=p.username,
                         target=str(pid), ip=client_ip(request))
    await directory_changed(request.app)
    return web.Response(status=204)


async def put_member(request: web.Request) -> web.Response:
    p = await user_principal(request)
    pid = _path_int(request, "production_id")
    await _production(request, pid)
    await require_production_role(request, p, pid, "director")
    data = await json_body(request)
    role = _str(data, "role", max_len=16)
    if role not in MEMBER_ROLES:
        raise BadRequest(f"'role' must be one of {', '.join(MEMBER_ROLES)}")
    camera_stream = _str(data, "camera_stream", required=False, max_len=64)
    pool = request.app[DB].pool
    user = await repo.user_by_name(pool, request.match_info["username"])
    if user is None:
        raise NotFound("no such user")
    if camera_stream is not None:
        s = await repo.stream_by_name(pool, camera_stream)
        if s is None or s["production_id"] != pid:
            raise BadRequest("'camera_stream' must name a stream of this production")
    async with pool.acquire() as conn:
        row = await repo.set_member(conn, pid, user["id"], role, camera_stream)
        await repo.audit(conn, "member.set", actor_user_id=p.user_id, actor=p.username,
                         target=f"{pid}/{user['username']}", detail={"role": role}, ip=client_ip(request))
    await directory_changed(request.app)
    return web.json_response({**dict(row), "username": user["username"]})


async def delete_member(request: web.Request) -> web.Response:
    p = await user_principal(request)
    pid = _path_int(request, "production_id")
    await require_production_role(request, p, pid, "director")
    pool = request.app[DB].pool
    user = await repo.user_by_name(pool, request.match_info["username"])
    if user is None or not await repo.remove_member(pool, pid, user["id"]):
        raise NotFound("no such member")
    await directory_changed(request.app)
    return web.Response(status=204)


# -- streams ---------------------------------------------------------------------

def _srt_host(request: web.Request) -> str:
    s = request.app[SETTINGS].srt
    if s.public_host:
        return s.public_host
    host = request.host
    if host.startswith("["):
        return host.split("]")[0] + "]"
    return host.rsplit(":", 1)[0] if ":" in host else host


#: Per-stream SRT latency bounds (ms), as the streams table checks them.
LATENCY_MIN_MS, LATENCY_MAX_MS = 20, 8000


def stream_latency_ms(request: web.Request, own: int | None) -> int:
    """The stream's own SRT latency, else the server's."""
    return own if own is not None else request.app[SETTINGS].srt.latency_ms


def srt_url(request: web.Request, streamid: str, passphrase: str, pbkeylen: int, latency_ms: int, *,
            latency_unit_us: bool = True) -> str:
    """A caller URL. libsrt agrees on the larger of both sides' latencies, so
    the URL asks for the stream's. FFmpeg (and OBS, which uses FFmpeg's SRT
    protocol) reads ``latency`` in microseconds; srt-live-transmit and
    GStreamer read it in milliseconds (``latency_unit_us=False``)."""
    s = request.app[SETTINGS].srt
    latency = latency_ms * 1000 if latency_unit_us else latency_ms
    q = urlencode({"streamid": streamid, "passphrase": passphrase, "pbkeylen": pbkeylen, "mode": "caller",
                   "latency": latency}, quote_via=quote, safe=":!=,")
    return f"srt://{_srt_host(request)}:{s.port}?{q}"


def srt_urls(request: web.Request, key: str, streamid: str, passphrase: str, pbkeylen: int,
             own_latency_ms: int | None) -> dict[str, str]:
    """``key`` (latency in µs, FFmpeg/OBS) and ``key + '_ms'`` (srt-live-transmit, GStreamer)."""
    latency = stream_latency_ms(request, own_latency_ms)
    return {key: srt_url(request, streamid, passphrase, pbkeylen, latency),
            key + "_ms": srt_url(request, streamid, passphrase, pbkeylen, latency, latency_unit_us=False)}


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
        "settings": redact_secrets(r["settings"] if isinstance(r["settings"], dict) else json.loads(r["settings"])),
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
    name = _str(data, "name", max_len=64)
    # Stream names travel in URL paths and SRT stream IDs: one rule for both.
    if not is_valid_stream_name(name):
        raise BadRequest("'name' must be 1–64 characters of letters, digits, '_', '.', '-', "
                         "starting with a letter or digit")
    prod_ref = data.get("production")
    if prod_ref is None:
        raise BadRequest("'production' is required (id or name)")
    if isinstance(prod_ref, bool) or not isinstance(prod_ref, (int, str)):
        raise BadRequest("'production' must be an id or a name")
    prod = await _production(request, prod_ref)
    await require_production_role(request, p, prod["id"], "director")
    label = _str(data, "label", required=False, max_len=200, default="")
    settings = data.get("settings", {})
    if not isinstance(settings, dict):
        raise BadRequest("'settings' must be an object")
    settings = keep_secrets(settings, {})  # "<key>_set" markers are answers, not settings
    pbkeylen = _int(data, "pbkeylen", default=request.app[SETTINGS].srt.pbkeylen)
    if pbkeylen not in (16, 24, 32):
        raise BadRequest("'pbkeylen' must be 16, 24 or 32")
    latency_ms = _int(data, "latency_ms", lo=LATENCY_MIN_MS, hi=LATENCY_MAX_MS)
    pool = request.app[DB].pool
    try:
        async with pool.acquire() as conn:
            row = await repo.create_stream(conn, name, prod["id"], pbkeylen, label, settings, latency_ms)
            await repo.audit(conn, "stream.create", actor_user_id=p.user_id, actor=p.username,
                             target=name, detail={"production": prod["id"]}, ip=client_ip(request))
    except asyncpg.UniqueViolationError:
        raise Conflict("a stream with this name already exists") from None
    await _notify_streams_changed(request.app)
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
    label = _str(data, "label", required=False, max_len=200)
    settings = data.get("settings")
    if settings is not None and not isinstance(settings, dict):
        raise BadRequest("'settings' must be an object")
    if settings is not None:
        # Settings read back (secrets as "<key>_set": true) keep the stored secrets.
        old = row["settings"] if isinstance(row["settings"], dict) else json.loads(row["settings"])
        settings = keep_secrets(settings, old)
    rotate = data.get("rotate_passphrase", False)
    if not isinstance(rotate, bool):
        raise BadRequest("'rotate_passphrase' must be a boolean")
    # null resets the stream to the server's default latency
    set_latency = "latency_ms" in data
    latency_ms = _int(data, "latency_ms", lo=LATENCY_MIN_MS, hi=LATENCY_MAX_MS)
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
    await _notify_streams_changed(request.app)
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
    await _notify_streams_changed(request.app)
    return web.Response(status=204)


#: Callbacks run after streams are created, changed or deleted (the SRT
#: listener's in-memory table subscribes here).
STREAMS_CHANGED = web.AppKey("streams_changed", list)


async def directory_changed(app: web.Application) -> None:
    """This node changed streams, productions or members: reload the
    in-memory directory before answering, so the caller's next request sees
    the change here (other nodes follow on the trigger's NOTIFY)."""
    try:
        await app[DIRECTORY].reload()
    except DatabaseUnavailable as exc:
        # Committed already; the reload after the database returns catches up.
        event(log, logging.WARNING, "directory.reload_deferred", detail=exc.detail)


async def _notify_streams_changed(app: web.Application) -> None:
    await directory_changed(app)
    for cb in app.get(STREAMS_CHANGED, []):
        await cb()


# -- signed links ------------------------------------------------------------------

def link_urls(request: web.Request, stream: StreamEntry, action: str, token: str, jti: str) -> dict[str, str]:
    base = base_url(request)
    name = quote(stream.name)
    q = urlencode({"token": token})
    if action == "publish":
        # The link's own SRT passphrase, not the stream's (issue 9 item 5):
        # it opens nothing without this link's token, and revoking the link
        # revokes it.
        passphrase = request.app[TOKENS].link_passphrase(jti, stream.passphrase)
        out = {
            "whip_url": f"{base}/whip/{name}?{q}",
            "camera_url": f"{base}/camera/{name}?{q}",
            **srt_urls(request, "srt_url", f"#!::r={stream.name},m=publish,s={token}", passphrase,
                       stream.pbkeylen, stream.latency_ms),
        }
    else:
        out = {"whep_url": f"{base}/whep/{name}?{q}", "watch_url": f"{base}/watch/{name}?{q}"}
    return out


async def create_link(request: web.Request) -> web.Response:
    """A live action (a director hands a camera its link mid-show): no
    database round trip; the audit row is written when the database can
    take it."""
    p = await user_principal(request)
    row = await stream_entry(request, request.match_info["name"])
    if row is None:
        raise NotFound("no such stream")
    await require_production_role(request, p, row.production_id, "director")
    data = await json_body(request)
    action = _str(data, "action", max_len=16)
    if action not in ("publish", "read"):
        raise BadRequest("'action' must be 'publish' or 'read'")
    auth = request.app[SETTINGS].auth
    ttl = _int(data, "ttl_s", default=auth.link_ttl_s, lo=10, hi=auth.max_link_ttl_s)
    token, claims = request.app[TOKENS].issue_link(row.name, action, row.production_id, ttl, stream_id=row.id)
    detail = {"action": action, "jti": claims.jti, "ttl_s": ttl}
    user_id, username, ip = p.user_id, p.username, client_ip(request)
    request.app[DB].deferred.put("audit link.create", lambda conn: repo.audit(
        conn, "link.create", actor_user_id=user_id, actor=username, target=row.name, detail=detail, ip=ip))
    body = {"token": token, "stream": row.name, "action": action, "jti": claims.jti,
            "expires_at": claims.expires_at, **link_urls(request, row, action, token, claims.jti)}
    return web.json_response(body, status=201)


async def revoke_link(request: web.Request) -> web.Response:
    p = await user_principal(request)
    data = await json_body(request)
    token = _str(data, "token", max_len=4096)
    try:
        claims = request.app[TOKENS].verify_link(token)
    except TokenError as exc:
        raise BadRequest(f"not a valid link: {exc}") from None
    await require_production_role(request, p, claims.production_id, "director")
    await repo.revoke_link(request.app[DB].pool, claims.jti,
                           datetime.fromtimestamp(claims.expires_at, timezone.utc), p.user_id)
    request.app[DIRECTORY].note_revoked(claims.jti)
    return web.Response(status=204)


async def purge_refresh_tokens(db: Any, keep_s: float) -> int | None:
    """One purge of dead refresh tokens; ``None`` when the database is away
    (the next round tries again)."""
    if not db.available:
        return None
    try:
        async with db.pool.acquire() as conn:
            # A background job: a longer budget than a request's, the table
            # may have grown for a long time.
            n = await repo.purge_refresh_tokens(conn, keep_s, timeout=10.0)
    except Exception as exc:
        event(log, logging.WARNING, "auth.refresh_purge_failed", error=type(exc).__name__)
        return None
    if n:
        event(log, logging.INFO, "auth.refresh_purged", rows=n)
    return n


async def _refresh_purge_loop(app: web.Application) -> None:
    auth = app[SETTINGS].auth
    while True:
        await purge_refresh_tokens(app[DB], auth.refresh_purge_after_s)
        await asyncio.sleep(auth.refresh_purge_interval_s)


_PURGE_TASK = web.AppKey("refresh_purge_task", asyncio.Task)


async def _start_purge(app: web.Application) -> None:
    app[_PURGE_TASK] = asyncio.get_running_loop().create_task(_refresh_purge_loop(app), name="refresh-purge")


async def _stop_purge(app: web.Application) -> None:
    task = app.get(_PURGE_TASK)
    if task is not None:
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass


def setup(app: web.Application) -> None:
    if STREAMS_CHANGED not in app:
        app[STREAMS_CHANGED] = []
    app.on_startup.append(_start_purge)
    app.on_cleanup.append(_stop_purge)
    r = app.router
    r.add_post("/api/v1/auth/login", login)
    r.add_post("/api/v1/auth/refresh", refresh)
    r.add_post("/api/v1/auth/logout", logout)
    r.add_get("/api/v1/auth/me", me)
    r.add_post("/api/v1/users", create_user)
    r.add_get("/api/v1/users", list_users)
    r.add_post("/api/v1/productions", create_production)
    r.add_get("/api/v1/productions", list_productions)
    r.add_get("/api/v1/productions/{production_id}", get_production)
    r.add_patch("/api/v1/productions/{production_id}", update_production)
    r.add_delete("/api/v1/productions/{production_id}", delete_production)
    r.add_put("/api/v1/productions/{production_id}/members/{username}", put_member)
    r.add_delete("/api/v1/productions/{production_id}/members/{username}", delete_member)
    r.add_post("/api/v1/streams", create_stream)
    r.add_get("/api/v1/streams", list_streams)
    r.add_get("/api/v1/streams/{name}", get_stream)
    r.add_patch("/api/v1/streams/{name}", update_stream)
    r.add_delete("/api/v1/streams/{name}", delete_stream)
    r.add_post("/api/v1/streams/{name}/links", create_link)
    r.add_post("/api/v1/links/revoke", revoke_link)
