"""``GET /healthz`` (public port) and ``GET /metrics`` (metrics listener)."""

from __future__ import annotations

import sys
import time

import aiohttp
from aiohttp import web

from .keys import DB, METRICS, STARTED, TALLY
from .metrics import VERSION


async def healthz(request: web.Request) -> web.Response:
    """Answers from the database supervisor's cached verdict, never a round
    trip, so it answers at once and names the degraded part. 503 while any part
    is degraded; media and tally keep working and say so."""
    db = request.app[DB]
    ok = await db.ping()
    tally = request.app.get(TALLY)
    degraded = [] if ok else ["database"]
    body: dict = {
        "status": "ok" if ok else "degraded",
        "degraded": degraded,
        "database": "ok" if ok else "unavailable",
        "database_kind": db.kind,
        "media": "ok",
        "tally": "ok",
        "uptime_s": round(time.time() - request.app[STARTED], 3),
        "versions": {"returnfeed": VERSION, "python": sys.version.split()[0], "aiohttp": aiohttp.__version__},
    }
    if not ok:
        body["database_detail"] = db.problem
        if db.down_since is not None:
            body["database_down_s"] = round(time.monotonic() - db.down_since, 1)
    if db.embedded is not None and (db.restarts or db.restart_failures):
        body["database_restarts"] = db.restarts
        if db.last_restart_error:
            body["database_restart_error"] = db.last_restart_error
    pending, dropped = len(db.deferred), db.deferred.dropped
    if tally is not None:
        pending += tally.pending_writes()
        dropped += tally.dropped_writes()
    body["pending_writes"] = pending
    body["dropped_writes"] = dropped
    headers = {} if ok else {"Retry-After": str(db.retry_after)}
    return web.json_response(body, status=200 if ok else 503, headers=headers)


async def metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def setup(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)


def metrics_app(main: web.Application) -> web.Application:
    """The separate metrics listener's application (``metrics.host:port``):
    ``GET /metrics`` only, rendering the main application's registry."""
    app = web.Application()
    app[METRICS] = main[METRICS]
    app.router.add_get("/metrics", metrics)
    return app
