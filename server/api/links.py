"""Signed stream links: ``POST /api/v1/streams/{name}/links`` (a director
hands a camera or a viewer one stream, one action, for a while) and
``POST /api/v1/links/revoke``."""

from __future__ import annotations

from datetime import datetime, timezone
from urllib.parse import quote, urlencode

from aiohttp import web

from .. import repo
from ..access import base_url, client_ip, json_body, require_production_role, stream_entry, user_principal
from ..auth import TokenError
from ..directory import StreamEntry
from ..errors import BadRequest, NotFound
from ..keys import DB, DIRECTORY, SETTINGS, TOKENS
from .common import int_field, str_field
from .srt_urls import srt_urls


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
    action = str_field(data, "action", max_len=16)
    if action not in ("publish", "read"):
        raise BadRequest("'action' must be 'publish' or 'read'")
    auth = request.app[SETTINGS].auth
    ttl = int_field(data, "ttl_s", default=auth.link_ttl_s, lo=10, hi=auth.max_link_ttl_s)
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
    token = str_field(data, "token", max_len=4096)
    try:
        claims = request.app[TOKENS].verify_link(token)
    except TokenError as exc:
        raise BadRequest(f"not a valid link: {exc}") from None
    await require_production_role(request, p, claims.production_id, "director")
    await repo.revoke_link(request.app[DB].pool, claims.jti,
                           datetime.fromtimestamp(claims.expires_at, timezone.utc), p.user_id)
    request.app[DIRECTORY].note_revoked(claims.jti)
    return web.Response(status=204)


def setup(app: web.Application) -> None:
    r = app.router
    r.add_post("/api/v1/streams/{name}/links", create_link)
    r.add_post("/api/v1/links/revoke", revoke_link)
