"""The aiohttp application factory: middlewares, routes, static files, and
the one order services start and stop in.

    create_app(settings, db, tokens, media, tally, directory)
      keys         server.keys: SETTINGS DB TOKENS LIMITER METRICS STARTED
                   DIRECTORY MEDIA TALLY LIVE_STATE STREAMS_CHANGED …
      middlewares  CORS → metrics → errors as JSON {error, detail} → access log
      routes       health, api (auth, users, productions, streams, links),
                   whep, whip, tally_routes, pages, ``/`` and ``/static/``
      services     one ``app.cleanup_ctx`` (:class:`Lifecycle`)

Services start while the runner sets up (before the site listens), in this
order, and the started ones stop in reverse, each once:

    start                                stop
    1. refresh-token purge (database)    5. taps      ─┐
    2. media: SRT, WHEP and WHIP         4. QC events  │ on_shutdown
    3. tally                             3. tally     ─┘
    4. QC events (/ws/events, markers)   2. media  ─┐ cleanup, after the
    5. taps (live QC worker → QC events) 1. purge  ─┘ in-flight requests

Live captions (``captions``, after the taps) start last and stop first,
before QC events, which still broadcast their last finals.

Just before the taps, ``stream_settings`` starts following the directory's
reloads (per-stream QC/captions settings, which the taps listen to) and
stops following them after the taps have stopped.

Tally stops at ``on_shutdown``: its WebSocket handlers end only when the
service closes them (1001 going away), and aiohttp waits for handlers
between ``on_shutdown`` and cleanup (aiohttp's documented place for closing
WebSockets). Being the last one started, it is still the first one stopped.

The database and the directory come before all of this: ``main.Server``
brings them up before the app exists (the keys hold the token service, whose
secret lives in the database, and the loaded directory, without which
revoked links would pass) and closes them after the HTTP runner has
stopped. ``/healthz`` answers from the database supervisor's verdict, so it
answers while the database is down.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

import asyncpg
from aiohttp import web

from . import api, health, pages, qc_routes, tally_routes, whep, whip
from . import caption_routes
from .access import client_ip
from .api.auth import RefreshPurge
from .auth import LoginLimiter, TokenService
from .config import Settings
from .db import Database
from .directory import Directory
from .errors import HTTP_CODES, ApiError, BadRequest, NotFound, json_error
from .keys import (
    DB, DIRECTORY, LIMITER, LIVE_STATE, LIVE_STATE_HOOKS, MEDIA, METRICS, QC, SESSION_SECRET, SETTINGS, STARTED,
    STREAMS_CHANGED, TOKENS,
)
from .keys import STREAM_SETTINGS
from .log import event
from .metrics import Metrics
from .qc_events import QcEvents
from .qc_service import QcService
from .caption_service import CaptionService, CaptionStore, default_options_for
from .keys import CAPTIONS
from .stream_settings import StreamSettings

log = logging.getLogger("returnfeed.http")
#: Start/stop steps log under the process's logger, next to main.Server's.
lifecycle_log = logging.getLogger("returnfeed")

WEB_DIR = Path(__file__).resolve().parent.parent / "web"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# -- middlewares ------------------------------------------------------------

_DB_LOST = (asyncpg.InterfaceError, asyncpg.PostgresConnectionError, asyncpg.exceptions.CannotConnectNowError,
            asyncpg.exceptions.OperatorInterventionError, asyncpg.exceptions.TooManyConnectionsError,
            asyncpg.exceptions.InternalClientError)


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
        code = HTTP_CODES.get(exc.status, "error")
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
        event(log, logging.ERROR, "http.unhandled", exc_info=True, path=request.path, method=request.method)
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


# -- services ----------------------------------------------------------------

@dataclass(slots=True)
class Service:
    """One service in the start order."""

    name: str
    start: Callable[[], Awaitable[Any]]
    stop: Callable[[], Awaitable[Any]]
    #: Stops at ``on_shutdown``, before aiohttp waits for the handlers: its
    #: handlers (WebSockets) end only when the service closes them.
    holds_handlers: bool = False


@dataclass(slots=True)
class Lifecycle:
    """Starts services in order and stops the started ones in reverse order,
    each once: from ``on_shutdown`` those at the top of the stack that hold
    handlers, from cleanup the rest. A start that fails stops what started."""

    services: Sequence[Service]
    started: list[Service] = field(default_factory=list)

    def install(self, app: web.Application) -> None:
        app.cleanup_ctx.append(self._context)
        app.on_shutdown.append(self._on_shutdown)

    async def _context(self, app: web.Application) -> AsyncIterator[None]:
        try:
            for service in self.services:
                await service.start()
                self.started.append(service)
            yield
        finally:
            await self._stop(lambda service: True)

    async def _on_shutdown(self, app: web.Application) -> None:
        await self._stop(lambda service: service.holds_handlers)

    async def _stop(self, which: Callable[[Service], bool]) -> None:
        while self.started and which(self.started[-1]):
            service = self.started.pop()
            began = time.monotonic()
            event(lifecycle_log, logging.DEBUG, "server.stop_step", step=service.name)
            await service.stop()
            seconds = round(time.monotonic() - began, 3)
            if seconds >= 2.0:  # a slow step is named, not guessed at
                event(lifecycle_log, logging.WARNING, "server.stop_step_slow", step=service.name, seconds=seconds)


def _live_state(app: web.Application, media: Any) -> Callable[[str], dict[str, Any]]:
    """The streams API's live state: the hub's, plus what each hook adds."""
    hooks = app[LIVE_STATE_HOOKS]

    def live_state(name: str) -> dict[str, Any]:
        out = media.live_state(name)
        for hook in hooks:
            hook(name, out)
        return out

    return live_state


# -- the factory ---------------------------------------------------------------

def create_app(settings: Settings, db: Database, tokens: TokenService, media: Any = None,
               tally: Any = None, directory: Directory | None = None,
               qc_events: QcEvents | None = None) -> web.Application:
    """The application around constructed, not yet started, services;
    :class:`Lifecycle` starts and stops them with the app (module docstring)."""
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
    app[STREAMS_CHANGED] = []
    app[LIVE_STATE_HOOKS] = []
    purge = RefreshPurge(db, settings.auth)
    services = [Service("refresh_purge", purge.start, purge.stop)]
    health.setup(app)
    api.setup(app)
    if media is not None:
        app[MEDIA] = media
        app[LIVE_STATE] = _live_state(app, media)
        app[SESSION_SECRET] = secrets.token_bytes(32)
        metrics.add_collector(media.collect)
        if media.egress is not None:
            metrics.add_gc_source("egress_worker", media.egress.gc_pauses)
        whep.setup(app)
        whip.setup(app)
        services.append(Service("media", media.start, media.stop))
    if tally is not None:
        tally_routes.setup(app, tally)
        app[STREAMS_CHANGED].append(tally.on_streams_changed)
        metrics.add_collector(tally.collect)
        # Closes every tally socket with 1001 before the runner waits on handlers.
        services.append(Service("tally", tally.start, tally.stop, holds_handlers=True))
    # Live QC markers, notes and meters (/ws/events); the QC tap feeds app[QC_EVENTS].
    qc = qc_events or QcEvents(db, directory, queue_max=settings.database.write_queue_max)
    qc_routes.setup(app, qc)
    metrics.add_collector(qc.collect)
    services.append(Service("qc_events", qc.start, qc.stop, holds_handlers=True))
    # Per-stream QC/captions settings in memory, current with every directory
    # reload (the streams trigger's NOTIFY: a change on any node).
    stream_settings = StreamSettings(settings.qc, getattr(settings, "captions", None))
    app[STREAM_SETTINGS] = stream_settings

    async def follow_settings() -> None:
        stream_settings.update(directory.stream_settings)
        directory.on_settings.append(stream_settings.update)

    async def unfollow_settings() -> None:
        if stream_settings.update in directory.on_settings:
            directory.on_settings.remove(stream_settings.update)

    services.append(Service("stream_settings", follow_settings, unfollow_settings))
    if media is not None:
        # The tap hands markers, meters and tap states to QC events; it stops
        # first (its last markers are flushed into a still-running QC events).
        # It always runs: a stream's settings may enable QC at any time
        # (``[qc] enabled`` is only the default); its workers start with the
        # first enabled stream.
        tap = QcService(settings.qc, media.hub, qc, qc_for=stream_settings.qc_for)
        stream_settings.listeners.append(tap.settings_changed)
        app[QC] = tap
        metrics.add_collector(tap.collect)
        services.append(Service("taps", tap.start, tap.stop, holds_handlers=True))
    # Live captions (issue 13): stored transcripts are readable with or
    # without media; the service taps the audio of streams whose captions
    # are on (workers start with the first such stream) and hands captions
    # to QC events (/ws/events) and finals to the captions table. It stops
    # before QC events, so its last finals are still broadcast and queued.
    caption_routes.setup(app)
    qc.caption_partial_hz = settings.captions.partial_hz
    if media is not None:
        store = CaptionStore(db, directory, queue_max=settings.captions.write_queue_max)
        captions = CaptionService(settings.captions, media.hub, qc, store,
                                  options_for=default_options_for(settings.captions, settings.data_dir,
                                                                  stream_settings.captions_for))
        app[CAPTIONS] = captions
        metrics.add_collector(captions.collect)
        services.append(Service("captions", captions.start, captions.stop, holds_handlers=True))
    Lifecycle(services).install(app)
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

