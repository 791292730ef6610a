"""``/api/v1/users``: create (admin) and list (admin) server users."""

from __future__ import annotations

import asyncpg
from aiohttp import web

from .. import repo
from ..access import client_ip, json_body, require_roles, user_principal
from ..auth import ROLES, validate_password_strength
from ..errors import BadRequest, Conflict
from ..keys import DB
from .common import hash_off_loop, str_field, valid_username


async def create_user(request: web.Request) -> web.Response:
    p = await user_principal(request)
    require_roles(p, "admin")
    data = await json_body(request)
    username = valid_username(str_field(data, "username", max_len=64))
    password = str_field(data, "password", max_len=1024)
    role = str_field(data, "role", max_len=16)
    if role not in ROLES:
        raise BadRequest(f"'role' must be one of {', '.join(ROLES)}")
    reason = validate_password_strength(password)
    if reason:
        raise BadRequest(reason)
    pool = request.app[DB].pool
    try:
        async with pool.acquire() as conn:
            row = await repo.create_user(conn, username, await hash_off_loop(password), role)
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


def setup(app: web.Application) -> None:
    r = app.router
    r.add_post("/api/v1/users", create_user)
    r.add_get("/api/v1/users", list_users)
