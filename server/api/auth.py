"""``/api/v1/auth``: login, refresh (rotating, reuse ends the login),
logout, who am I; and the periodic purge of dead refresh tokens.

=================================  ==========================================
``POST /api/v1/auth/login``        ``{username, password}`` → access and
                                   refresh tokens (429 + ``Retry-After``
                                   after too many failures)
``POST /api/v1/auth/refresh``      ``{refresh_token}`` → a new pair
``POST /api/v1/auth/logout``       ``{refresh_token}`` → 204, every token of
                                   the login ends on every node
``GET /api/v1/auth/me``            the caller (user or signed link)
=================================  ==========================================
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import datetime, timezone
from typing import Any

from aiohttp import web

from .. import repo
from ..access import client_ip, json_body, principal
from ..auth import hash_refresh_token, needs_rehash, new_refresh_token, verify_password
from ..config import AuthSettings
from ..directory import CHANNEL as DIRECTORY_CHANNEL
from ..errors import TooManyRequests, Unauthorized
from ..keys import DB, DIRECTORY, LIMITER, METRICS, SETTINGS, TOKENS
from ..log import event
from .common import hash_off_loop, str_field
from ..tasks import cancel_and_wait

log = logging.getLogger("returnfeed.api")


async def _verify(password_hash: str | None, password: str) -> bool:
    return await asyncio.get_running_loop().run_in_executor(None, verify_password, password_hash, password)


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
    username = str_field(data, "username", max_len=200)
    password = str_field(data, "password", max_len=1024)
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
            await repo.set_password(conn, user["id"], await hash_off_loop(password))
        body = await _issue_session(request, conn, user["id"], user["username"], user["role"])
        await repo.audit(conn, "auth.login", actor_user_id=user["id"], actor=user["username"], ip=ip)
    return web.json_response(body)


async def refresh(request: web.Request) -> web.Response:
    data = await json_body(request)
    token = str_field(data, "refresh_token", max_len=200)
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
    token = str_field(data, "refresh_token", max_len=200)
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


class RefreshPurge:
    """Deletes dead refresh tokens every ``auth.refresh_purge_interval_s``:
    one task, started and stopped with the app (``app.Lifecycle``)."""

    __slots__ = ("db", "auth", "_task")

    def __init__(self, db: Any, auth: AuthSettings) -> None:
        self.db = db
        self.auth = auth
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="refresh-purge")

    async def _run(self) -> None:
        while True:
            await purge_refresh_tokens(self.db, self.auth.refresh_purge_after_s)
            await asyncio.sleep(self.auth.refresh_purge_interval_s)

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)


def setup(app: web.Application) -> None:
    r = app.router
    r.add_post("/api/v1/auth/login", login)
    r.add_post("/api/v1/auth/refresh", refresh)
    r.add_post("/api/v1/auth/logout", logout)
    r.add_get("/api/v1/auth/me", me)
