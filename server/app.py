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
from aiohttp.web_protocol import RequestHandler

from . import repo
from .auth import LinkClaims, LoginLimiter, TokenError, TokenService
from .config import Settings
from .db import Database
from .directory import Directory, StreamEntry
from .errors import ApiError, BadRequest, Forbidden, NotFound, Unauthorized, json_error
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
    except TokenError as exc:
        access_error = exc
    else:
        # From memory, shared through NOTIFY: a logout ends its access tokens
        # on every node before they expire (issue 9, item 14).
        if c.session is not None and request.app[DIRECTORY].session_ended(c.session):
            raise Unauthorized("logged out; please log in again")
        return Principal("user", c.role, c.user_id, c.username)
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
    data = parse_json_object(raw)
    if not isinstance(data, dict):
        raise BadRequest("JSON body must be an object")
    return data


#: Deepest nesting a JSON body may have; every API object is a few levels deep.
MAX_JSON_DEPTH = 32


def _no_constant(name: str) -> Any:
    # RFC 8259 §6: "Numeric values that cannot be represented ... such as
    # Infinity and NaN are not permitted"; PostgreSQL's jsonb refuses them too.
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number out of range: {text[:40]}")
    return value


def parse_json_object(raw: bytes) -> Any:
    """Decode a request body as strict JSON (RFC 8259) that PostgreSQL can
    store: no NaN/Infinity, no NUL character and no lone surrogate in any
    string (text and jsonb refuse both), at most ``MAX_JSON_DEPTH`` levels.
    Anything else is a 400, never a 500."""
    try:
        data = json.loads(raw, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise BadRequest(f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise BadRequest(f"malformed JSON: {exc}") from None
    # Iterative walk: a body nested just under the recursion limit must not
    # recurse again here.
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise BadRequest(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str):
                    _check_text(key)
                stack.append((item, depth + 1))
        elif isinstance(value, str):
            _check_text(value)
    return data


def _check_text(value: str) -> None:
    if "\x00" in value:
        raise BadRequest("JSON strings must not contain the NUL character (\\u0000)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("JSON strings must not contain lone surrogates (\\ud800-\\udfff)") from None


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


def check_url(request: web.Request) -> None:
    """A NUL in a decoded path segment or query value reaches PostgreSQL as
    text it refuses (lone surrogates are not decoded by yarl, and invalid
    UTF-8 becomes U+FFFD); refuse it up front for every route."""
    if "\x00" in request.path or any("\x00" in k or "\x00" in v for k, v in request.query.items()):
        raise BadRequest("the URL must not contain NUL characters (%00)")


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        check_url(request)
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


class JsonErrorRequestHandler(RequestHandler):
    """aiohttp answers what its parser refuses (URL over 8190 bytes, an
    oversized header, Content-Length with Transfer-Encoding, RFC 9112 §6.3;
    a bad method) itself, in text/plain, before any middleware runs. Same
    status, same logging, same forced close; the body becomes the
    ``{error, detail}`` JSON that every other error is."""

    __slots__ = ()

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        plain = super().handle_error(request, status, exc, message)
        if status >= 500:
            # 500: a handler bug; 504: aiohttp's own handler timeout.
            body = {"error": "internal" if status == 500 else "unavailable",
                    "detail": "internal server error" if status == 500 else plain.reason}
        else:
            # The parser's message quotes the offending bytes: first line, bounded.
            first = (message or plain.reason or "").strip().splitlines()
            body = {"error": _HTTP_CODES.get(status, "bad_request"),
                    "detail": (first[0] if first else plain.reason)[:200]}
        resp = json_error(status, body)
        resp.force_close()
        return resp
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
    a = settings.auth
    app[LIMITER] = LoginLimiter(a.login_failures_per_user, a.login_failures_per_ip, a.login_window_s,
                                per_user_ip=a.login_failures_per_user_ip, backoff_s=a.login_backoff_s)
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
            return web.FileResponse(_web_file("index.html"))

        app.router.add_get("/", index)
        app.router.add_get("/static/{filename:.*}", static_file)
    return app


def _web_file(relative: str) -> Path:
    """A file under ``web/``, or a JSON 404: aiohttp's static route answers a
    missing file with an empty ``application/octet-stream`` 404 that no
    middleware sees. Like ``follow_symlinks=False``, nothing that resolves
    outside ``web/`` is served."""
    root = WEB_DIR.resolve()
    try:
        path = (root / relative).resolve()
        found = path.is_relative_to(root) and path.is_file()
    except (OSError, ValueError):  # a name too long for the file system, ...
        found = False
    if not found:
        raise NotFound("no such file")
    return path


async def static_file(request: web.Request) -> web.FileResponse:
    return web.FileResponse(_web_file(request.match_info["filename"]))

