"""The aiohttp application: keys, middlewares, principals, metrics.

Shared state lives under :class:`aiohttp.web.AppKey`s (DESIGN.md
conventions): settings, database, token service, login limiter, metrics.
Every response to an error is JSON ``{error, detail}`` (see errors.py),
including aiohttp's own 404/405/413.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

import asyncpg
from aiohttp import web

from . import repo
from .auth import LinkClaims, LoginLimiter, TokenError, TokenService
from .config import Settings
from .db import Database
from .directory import Directory, StreamEntry
from .errors import ApiError, BadRequest, Forbidden, Unauthorized, json_error
from .log import event
from .metrics import Metrics

log = logging.getLogger("returnfeed.http")

SETTINGS = web.AppKey("settings", Settings)
DB = web.AppKey("db", Database)
TOKENS = web.AppKey("tokens", TokenService)
LIMITER = web.AppKey("limiter", LoginLimiter)
METRICS = web.AppKey("metrics", Metrics)
STARTED = web.AppKey("started", float)
DIRECTORY = web.AppKey("directory", Directory)

WEB_DIR = Path(__file__).resolve().parent.parent / "web"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a logged-in user, or the holder of a stream link."""

    kind: str  # "user" | "link"
    role: str  # admin | director | camera | viewer
    user_id: int | None = None
    username: str = ""
    link: LinkClaims | None = None

    @property
    def is_admin(self) -> bool:
        return self.kind == "user" and self.role == "admin"

    @property
    def label(self) -> str:
        return self.username if self.kind == "user" else f"link:{self.link.jti if self.link else ''}"


def bearer_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise Unauthorized("Authorization header must be 'Bearer <token>'")
        return value.strip()
    return request.query.get("token") or None


async def principal(request: web.Request, *, allow_link: bool = True) -> Principal:
    """Authenticate the request or raise 401."""
    token = bearer_token(request)
    if not token:
        raise Unauthorized()
    tokens = request.app[TOKENS]
    try:
        c = tokens.verify_access(token)
        return Principal("user", c.role, c.user_id, c.username)
    except TokenError as exc:
        access_error = exc
    if allow_link:
        try:
            link = tokens.verify_link(token)
        except TokenError as exc:
            # Report the more specific reason (expired beats wrong audience).
            reason = str(access_error) if "expired" in str(access_error) else str(exc)
            raise Unauthorized(reason) from None
        # From memory (DESIGN.md invariant 1): a WHEP join or tally socket with a signed
        # link must not wait for the database.
        if request.app[DIRECTORY].is_revoked(link.jti):
            raise Unauthorized("link revoked")
        # Bound to its stream's id and production (issue 9 item 2), for every
        # route that takes a link: REST, WHIP, WHEP, /ws/tally.
        problem = request.app[DIRECTORY].link_problem(link, await stream_entry(request, link.stream))
        if problem is not None:
            raise Unauthorized(problem)
        return Principal("link", link.role, link=link)
    raise Unauthorized(str(access_error))


async def user_principal(request: web.Request) -> Principal:
    return await principal(request, allow_link=False)


def require_roles(p: Principal, *roles: str) -> None:
    if p.role not in roles:
        raise Forbidden(f"requires role {' or '.join(roles)}")


async def production_role(request: web.Request, p: Principal, production_id: int) -> str | None:
    """The caller's role in a production: 'admin', a member role, or None."""
    if p.is_admin:
        return "admin"
    if p.kind == "link":
        return p.role if p.link and p.link.production_id == production_id else None
    assert p.user_id is not None
    role = request.app[DIRECTORY].member_role(production_id, p.user_id)
    db = request.app[DB]
    if role is None and db.available:
        # Not in this node's copy: maybe added a moment ago on another node
        # (its NOTIFY still on the way). The database is authoritative when up.
        role = await repo.member_role(db.pool, production_id, p.user_id)
    return role


async def stream_entry(request: web.Request, name: str) -> StreamEntry | None:
    """The stream from the in-memory directory: a WHEP join or WHIP publish
    never waits for the database. Only a name this node has not
    heard of yet is looked up, and only while the database is up."""
    entry = request.app[DIRECTORY].stream(name)
    db = request.app[DB]
    if entry is None and db.available:
        row = await repo.stream_by_name(db.pool, name)
        if row is not None:
            entry = StreamEntry(row["id"], row["name"], row["production_id"], row["production_name"],
                                row["passphrase"], row["pbkeylen"], row["label"] or "", row["latency_ms"])
    return entry


async def require_production_role(request: web.Request, p: Principal, production_id: int,
                                  *roles: str) -> str:
    role = await production_role(request, p, production_id)
    if role is None:
        raise Forbidden("not a member of this production")
    if role != "admin" and role not in roles:
        raise Forbidden(f"requires production role {' or '.join(roles)}")
    return role


async def json_body(request: web.Request, max_bytes: int | None = None) -> dict[str, Any]:
    if request.content_type != "application/json":
        from .errors import UnsupportedMediaType

        raise UnsupportedMediaType("Content-Type must be application/json")
    limit = max_bytes or request.app[SETTINGS].http.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        from .errors import PayloadTooLarge

        raise PayloadTooLarge(f"body larger than {limit} bytes")
    raw = await request.read()
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest("JSON body must be an object")
    return data


def client_ip(request: web.Request) -> str:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return peer[0] if peer else "unknown"


def base_url(request: web.Request) -> str:
    configured = request.app[SETTINGS].http.public_url
    if configured:
        return configured.rstrip("/")
    return f"{request.scheme}://{request.host}"


# -- middlewares ------------------------------------------------------------

_DB_LOST = (asyncpg.InterfaceError, asyncpg.PostgresConnectionError, asyncpg.exceptions.CannotConnectNowError,
            asyncpg.exceptions.OperatorInterventionError, asyncpg.exceptions.TooManyConnectionsError,
            asyncpg.exceptions.InternalClientError)

_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 409: "conflict", 413: "payload_too_large",
               415: "unsupported_media_type", 422: "unprocessable", 429: "too_many_requests"}


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "error")
        detail = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        return json_error(exc.status, {"error": code, "detail": detail}, headers)
    except (ConnectionResetError, web.HTTPClientError):
        raise
    except _DB_LOST as exc:
        # A driver error that got past the guarded pool still means "the
        # database is away", not a server bug: 503, never 500.
        event(log, logging.WARNING, "http.database_error", path=request.path, error=type(exc).__name__)
        return request.app[DB].unavailable().response()
    except Exception:
        log.exception("http.unhandled", extra={"fields": {"path": request.path, "method": request.method}})
        return json_error(500, {"error": "internal", "detail": "internal server error"})


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    start = time.perf_counter()
    status = 500
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        route = request.match_info.route.resource
        name = route.canonical if route is not None else "unmatched"
        request.app[METRICS].observe_http(request.method, name, status, time.perf_counter() - start)


def cors_middleware_factory(origins: list[str]) -> Any:
    allow_all = "*" in origins

    @web.middleware
    async def cors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        allowed = origin is not None and (allow_all or origin in origins)
        if request.method == "OPTIONS" and allowed and request.headers.get("Access-Control-Request-Method"):
            resp: web.StreamResponse = web.Response(status=204)
        else:
            try:
                resp = await handler(request)
            except web.HTTPException as exc:
                resp = exc
                if allowed:
                    _cors_headers(resp, origin, allow_all)
                raise
        if allowed:
            _cors_headers(resp, origin, allow_all)
        return resp

    return cors_middleware


def _cors_headers(resp: web.StreamResponse, origin: str | None, allow_all: bool) -> None:
    resp.headers["Access-Control-Allow-Origin"] = "*" if allow_all else (origin or "")
    if not allow_all:
        resp.headers["Vary"] = "Origin"
    resp.headers["Access-Control-Allow-Methods"] = "GET, POST, PATCH, PUT, DELETE, OPTIONS, HEAD"
    resp.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type, If-Match"
    resp.headers["Access-Control-Expose-Headers"] = "Location, ETag, Link, Accept-Post, Accept-Patch, Retry-After"
    resp.headers["Access-Control-Max-Age"] = "600"


def access_log_middleware() -> Any:
    @web.middleware
    async def mw(request: web.Request, handler: Handler) -> web.StreamResponse:
        start = time.perf_counter()
        resp = await handler(request)
        if log.isEnabledFor(logging.DEBUG) or resp.status >= 500:
            event(log, logging.DEBUG if resp.status < 500 else logging.ERROR, "http.request",
                  method=request.method, path=request.path, status=resp.status,
                  ms=round((time.perf_counter() - start) * 1000, 2), ip=client_ip(request))
        return resp

    return mw


def create_app(settings: Settings, db: Database, tokens: TokenService, media: Any = None,
               tally: Any = None, directory: Directory | None = None) -> web.Application:
    from . import api, health, pages, tally_routes, whep, whip

    metrics = Metrics(db)
    app = web.Application(
        client_max_size=settings.http.max_body_bytes,
        middlewares=[
            cors_middleware_factory(settings.http.cors_origins),
            metrics_middleware,
            error_middleware,
            access_log_middleware(),
        ],
    )
    app[SETTINGS] = settings
    app[DB] = db
    app[TOKENS] = tokens
    app[LIMITER] = LoginLimiter(settings.auth.login_failures_per_user, settings.auth.login_failures_per_ip,
                                settings.auth.login_window_s)
    app[METRICS] = metrics
    app[STARTED] = time.time()
    if directory is None:
        # Fail closed: without the loaded directory, revoked links would pass.
        raise TypeError("create_app needs the server's loaded Directory")
    app[DIRECTORY] = directory
    health.setup(app)
    api.setup(app)
    if media is not None:
        app[whep.MEDIA] = media
        app[api.LIVE_STATE] = media.live_state
        metrics.add_collector(media.collect)
        whep.setup(app)
        whip.setup(app)
    if tally is not None:
        tally_routes.setup(app, tally)
        app[api.STREAMS_CHANGED].append(tally.on_streams_changed)
        metrics.add_collector(tally.collect)

        async def close_tally(app: web.Application) -> None:
            await tally.stop()  # closes every tally socket with 1001 before the runner waits on handlers

        app.on_shutdown.append(close_tally)
    pages.setup(app)
    if WEB_DIR.is_dir():
        async def index(request: web.Request) -> web.FileResponse:
            return web.FileResponse(WEB_DIR / "index.html")

        app.router.add_get("/", index)
        app.router.add_static("/static/", WEB_DIR, show_index=False, follow_symlinks=False)
    return app

