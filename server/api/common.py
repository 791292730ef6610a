"""What the resource modules share: JSON field checks, the production
lookup, password hashing off the event loop, and the reloads after a change.

Every check raises a 4xx :class:`~server.errors.ApiError` (400 for a bad
field, 404 for an unknown path id), never lets a wrong type through.
"""

from __future__ import annotations

import asyncio
import logging
import unicodedata
from typing import Any

import asyncpg
from aiohttp import web

from .. import repo
from ..auth import hash_password
from ..errors import BadRequest, DatabaseUnavailable, NotFound
from ..keys import DB, DIRECTORY, STREAMS_CHANGED
from ..log import event

log = logging.getLogger("returnfeed.api")


def str_field(data: dict[str, Any], key: str, *, required: bool = True, max_len: int = 200,
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


def display_name(value: str, key: str) -> str:
    """Free text names: any Unicode, but no control characters, not blank."""
    if not value.strip():
        raise BadRequest(f"'{key}' must not be blank")
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in value):
        raise BadRequest(f"'{key}' must not contain control characters")
    return value


def valid_username(value: str) -> str:
    display_name(value, "username")
    if any(ch.isspace() for ch in value):
        raise BadRequest("'username' must not contain spaces")
    return value


def int_field(data: dict[str, Any], key: str, *, required: bool = False, default: int | None = None,
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


def path_int(request: web.Request, key: str) -> int:
    raw = request.match_info[key]
    if not raw.isdigit() or len(raw) > 18:
        raise NotFound(f"no such {key.removesuffix('_id')}")
    return int(raw)


async def hash_off_loop(password: str) -> str:
    return await asyncio.get_running_loop().run_in_executor(None, hash_password, password)


async def production_or_404(request: web.Request, ref: str | int) -> asyncpg.Record:
    row = await repo.find_production(request.app[DB].pool, ref)
    if row is None:
        raise NotFound("no such production")
    return row


async def directory_changed(app: web.Application) -> None:
    """This node changed streams, productions or members: reload the
    in-memory directory before answering, so the caller's next request sees
    the change here (other nodes follow on the trigger's NOTIFY)."""
    try:
        await app[DIRECTORY].reload()
    except DatabaseUnavailable as exc:
        # Committed already; the reload after the database returns catches up.
        event(log, logging.WARNING, "directory.reload_deferred", detail=exc.detail)


async def notify_streams_changed(app: web.Application) -> None:
    await directory_changed(app)
    for cb in app.get(STREAMS_CHANGED, []):
        await cb()
