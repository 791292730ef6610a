"""``/api/v1/productions`` and their members.

Any user with the director role may create a production (and becomes its
director); its directors (and admins) change it and its members; members
read it (directors also see the member list).
"""

from __future__ import annotations

import asyncpg
from aiohttp import web

from .. import repo
from ..access import client_ip, json_body, principal, require_production_role, require_roles, user_principal
from ..auth import MEMBER_ROLES
from ..errors import BadRequest, Conflict, NotFound
from ..keys import DB
from .common import directory_changed, display_name, path_int, production_or_404, str_field


async def create_production(request: web.Request) -> web.Response:
    p = await user_principal(request)
    require_roles(p, "admin", "director")
    data = await json_body(request)
    name = display_name(str_field(data, "name", max_len=200), "name")
    description = str_field(data, "description", required=False, max_len=2000, default="")
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
    row = await production_or_404(request, path_int(request, "production_id"))
    role = await require_production_role(request, p, row["id"], *MEMBER_ROLES)
    body = repo.production_json(row, role)
    if role in ("admin", "director"):
        members = await repo.list_members(request.app[DB].pool, row["id"])
        body["members"] = [dict(m) for m in members]
    return web.json_response(body)


async def update_production(request: web.Request) -> web.Response:
    p = await user_principal(request)
    pid = path_int(request, "production_id")
    await production_or_404(request, pid)
    await require_production_role(request, p, pid, "director")
    data = await json_body(request)
    name = str_field(data, "name", required=False, max_len=200)
    if name is not None:
        display_name(name, "name")
    description = str_field(data, "description", required=False, max_len=2000)
    try:
        row = await repo.update_production(request.app[DB].pool, pid, name, description)
    except asyncpg.UniqueViolationError:
        raise Conflict("a production with this name already exists") from None
    await directory_changed(request.app)
    return web.json_response(repo.production_json(row))


async def delete_production(request: web.Request) -> web.Response:
    p = await user_principal(request)
    pid = path_int(request, "production_id")
    await production_or_404(request, pid)
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
    pid = path_int(request, "production_id")
    await production_or_404(request, pid)
    await require_production_role(request, p, pid, "director")
    data = await json_body(request)
    role = str_field(data, "role", max_len=16)
    if role not in MEMBER_ROLES:
        raise BadRequest(f"'role' must be one of {', '.join(MEMBER_ROLES)}")
    camera_stream = str_field(data, "camera_stream", required=False, max_len=64)
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
    pid = path_int(request, "production_id")
    await require_production_role(request, p, pid, "director")
    pool = request.app[DB].pool
    user = await repo.user_by_name(pool, request.match_info["username"])
    if user is None or not await repo.remove_member(pool, pid, user["id"]):
        raise NotFound("no such member")
    await directory_changed(request.app)
    return web.Response(status=204)


def setup(app: web.Application) -> None:
    r = app.router
    r.add_post("/api/v1/productions", create_production)
    r.add_get("/api/v1/productions", list_productions)
    r.add_get("/api/v1/productions/{production_id}", get_production)
    r.add_patch("/api/v1/productions/{production_id}", update_production)
    r.add_delete("/api/v1/productions/{production_id}", delete_production)
    r.add_put("/api/v1/productions/{production_id}/members/{username}", put_member)
    r.add_delete("/api/v1/productions/{production_id}/members/{username}", delete_member)
