"""``GET /healthz`` and ``GET /metrics``."""

from __future__ import annotations

import sys
import time

import aiohttp
from aiohttp import web

from .app import DB, METRICS, STARTED
from .metrics import VERSION


async def healthz(request: web.Request) -> web.Response:
    db = request.app[DB]
    ok = await db.ping()
    body = {
        "status": "ok" if ok else "degraded",
        "database": "ok" if ok else "unavailable",
        "database_kind": db.kind,
        "uptime_s": round(time.time() - request.app[STARTED], 3),
        "versions": {"returnfeed": VERSION, "python": sys.version.split()[0], "aiohttp": aiohttp.__version__},
    }
    return web.json_response(body, status=200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def setup(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
