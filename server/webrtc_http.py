"""HTTP rules WHIP and WHEP share (RFC 9725; draft-ietf-wish-whep reuses them).

* reading an SDP offer: ``Content-Type: application/sdp`` (else 415), at
  most ``http.max_sdp_bytes`` (413), parsed and checked by
  :func:`media.webrtc.sdp.parse_offer` (400 with the reason);
* ``Link: <url>; rel="ice-server"`` headers from ``webrtc.ice_servers``
  (§4.6);
* who owns a session (the user, or the signed link it was created with),
  and the session URL's capability for sessions opened with ``?token=``
  (:func:`session_location`, :func:`session_access`);
* ``PATCH`` of a session resource with ``application/trickle-ice-sdpfrag``
  (§4.3): trickled candidates 204, an ICE restart (``If-Match: *`` or a new
  ufrag) 422 because aiortc cannot restart ICE on a live connection, a
  stale ``If-Match`` 412.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any, Callable, Mapping

from aiohttp import web

from media.webrtc.sdp import Offer, SdpError, parse_offer

from .app import DIRECTORY, SETTINGS, Principal, bearer_token, principal, production_role, stream_entry
from .grants import Grant
from .errors import (
    ApiError, BadRequest, Forbidden, NotFound, PayloadTooLarge, PreconditionFailed, Unauthorized, Unprocessable,
    UnsupportedMediaType,
)

MAX_TRICKLE_CANDIDATES = 64


def ice_links(request: web.Request, *, authenticated: bool = True) -> list[str]:
    """RFC 9725 §4.6 ``Link`` header values for the configured ICE servers.

    A TURN server's username and credential let whoever holds them relay
    traffic through it, so they go only to requests that proved the right to
    use this stream (issue 9 item 6); an unauthenticated OPTIONS gets only
    the servers that need no credential."""
    out = []
    for s in request.app[SETTINGS].webrtc.ice_servers:
        link = f'<{s.urls}>; rel="ice-server"'
        if s.username is not None:
            if not authenticated:
                continue
            link += f'; username="{s.username}"; credential="{s.credential or ""}"; credential-type="password"'
        out.append(link)
    return out


def with_ice_links(resp: web.StreamResponse, request: web.Request, *,
                   authenticated: bool = True) -> web.StreamResponse:
    for link in ice_links(request, authenticated=authenticated):
        resp.headers.add("Link", link)
    return resp


async def may_see_ice_credentials(request: web.Request, action: str) -> bool:
    """Whether an OPTIONS request proves the right to read/publish its stream
    (OPTIONS itself stays open: it answers 204 either way)."""
    if bearer_token(request) is None:
        return False
    try:
        await authorize_stream(request, request.match_info["stream"], action)
    except (ApiError, web.HTTPException):
        return False
    return True


#: Production roles that may publish (WHIP) a stream without a publish link.
PUBLISH_ROLES = ("admin", "director")


async def authorize_stream(request: web.Request, name: str, action: str) -> tuple[Principal, Any]:
    """Who may read (WHEP) or publish (WHIP) stream ``name``: a signed link
    for that stream and action, or a user of its production — any member to
    read, a director (or admin) to publish. Returns the principal and the
    directory entry."""
    p = await principal(request)
    row = await stream_entry(request, name)
    if row is None:
        raise NotFound("no such stream")
    if p.kind == "link":
        assert p.link is not None
        if p.link.stream != name or p.link.action != action:
            verb = "watching" if action == "read" else "publishing"
            raise Forbidden(f"this link is not for {verb} this stream")
        return p, row
    role = await production_role(request, p, row.production_id)
    if action == "read" and role is None:
        raise Forbidden("not a member of this stream's production")
    if action == "publish" and role not in PUBLISH_ROLES:
        raise Forbidden("publishing needs a publish link or the director role in this stream's production")
    return p, row


async def register_grant(request: web.Request, what: str, p: Principal, entry: Any, roles: tuple[str, ...],
                         session: Any, close: Callable[[str], None]) -> None:
    """Keep what a new WHEP/WHIP ``session`` was admitted with, so revoking
    the link, deleting the stream or taking the user's role away ends it
    (issue 9 item 5; :mod:`server.grants`)."""
    role = None if p.kind == "link" else await production_role(request, p, entry.production_id)
    request.app[DIRECTORY].grants.add(session, Grant(
        what, entry.production_id, close, lambda: not session.closed, stream=entry.name, stream_id=entry.id,
        link=p.link, user_id=p.user_id, roles=() if role in (None, "admin") else roles))


def owner_key(p: Principal) -> str:
    """Who a session belongs to: a user, or the signed link that created it."""
    return f"user:{p.user_id}" if p.kind == "user" else f"link:{p.link.jti if p.link else ''}"


#: Per-process secret the session URLs' capabilities are derived from
#: (sessions live in this process only, so the secret need not outlive it).
SESSION_SECRET = web.AppKey("webrtc_session_secret", bytes)

#: Separates a session id from its capability in the session URL's last
#: segment (neither contains it: both are URL-safe base64).
_KEY_SEP = "."


def _capability(request: web.Request, kind: str, session_id: str, owner: str) -> str:
    mac = hmac.new(request.app[SESSION_SECRET], f"{kind}\0{session_id}\0{owner}".encode(), hashlib.sha256)
    return base64.urlsafe_b64encode(mac.digest()[:24]).decode()  # 192 bits: unguessable


def session_location(request: web.Request, kind: str, stream: str, session_id: str, owner: str) -> str:
    """The ``Location`` of a new session (RFC 9725 §4.2).

    A client that authenticated with ``?token=`` (Eyevinn's player, ffmpeg's
    WHIP muxer given a URL with the token) sends its later DELETE/PATCH to
    this URL as it is, without the token. Such sessions get a capability URL
    instead (knowing the URL is the authority to act on the session, as
    with the token it was created with): a key in the last path segment
    (``/whep/s/<id>.<key>``), an HMAC of the session and its owner, valid
    for that session only. In the path, not the query, because clients
    append their own ``?token=`` to it. A client that sent
    ``Authorization: Bearer`` keeps using its header (no capability in the
    URL, where it would end up in access logs)."""
    path = f"/{kind}/{stream}/{session_id}"
    if request.headers.get("Authorization") or not request.query.get("token"):
        return path
    return f"{path}{_KEY_SEP}{_capability(request, kind, session_id, owner)}"


async def session_access(request: web.Request, kind: str, sessions: Mapping[str, Any]) -> tuple[str, Any]:
    """The session a request to a session URL names, if the caller may act
    on it: the holder of its URL capability, or a principal that owns it
    (or an admin; for WHIP also a director of the stream's production).
    Returns a label for the logs and the session; raises 401/403/404."""
    session_id, sep, key = request.match_info["session"].partition(_KEY_SEP)
    has_token = bearer_token(request) is not None
    if not sep and not has_token:
        raise Unauthorized()
    session = sessions.get(session_id)
    if session is None or session.stream_name != request.match_info["stream"]:
        raise NotFound("no such session")
    if sep and hmac.compare_digest(key.encode(), _capability(request, kind, session.id, session.owner).encode()):
        return "session key", session
    if not has_token:
        raise Forbidden("the key does not open this session")
    p = await principal(request)
    if session.owner == owner_key(p) or p.is_admin:
        return p.label, session
    if kind == "whip":
        # A director of the stream's production may end anyone's publishing.
        row = await stream_entry(request, session.stream_name)
        role = None if row is None or p.kind != "user" else await production_role(request, p, row.production_id)
        if role in PUBLISH_ROLES:
            return p.label, session
    raise Forbidden("this session belongs to someone else")


def check_offer_headers(request: web.Request) -> int:
    """Content type and declared size of an offer; returns the size limit."""
    if request.content_type != "application/sdp":
        raise UnsupportedMediaType("Content-Type must be application/sdp")
    limit = request.app[SETTINGS].http.max_sdp_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"SDP offer larger than {limit} bytes")
    return limit


async def read_offer(request: web.Request, limit: int) -> tuple[str, Offer]:
    """Read and check the offer body (after authorisation)."""
    body = await request.read()
    if len(body) > limit:
        raise PayloadTooLarge(f"SDP offer larger than {limit} bytes")
    try:
        offer = parse_offer(body, max_bytes=limit)
    except SdpError as exc:
        raise BadRequest(f"bad SDP offer: {exc}") from None
    return body.decode(), offer


def _changes_ufrag(frag: str, remote_sdp: str | None) -> bool:
    if remote_sdp is None:
        return False
    current = [ln.split(":", 1)[1].strip() for ln in remote_sdp.splitlines() if ln.startswith("a=ice-ufrag:")]
    new = [ln.split(":", 1)[1].strip() for ln in frag.splitlines() if ln.startswith("a=ice-ufrag:")]
    return bool(new) and bool(current) and new[0] != current[0]


async def patch_trickle(request: web.Request, session: Any, restart_hint: str) -> web.StreamResponse:
    """Handle a PATCH on a session that has ``etag``, ``pc`` and
    ``add_remote_candidates(frag)``."""
    if request.content_type != "application/trickle-ice-sdpfrag":
        raise UnsupportedMediaType("Content-Type must be application/trickle-ice-sdpfrag")
    body = await request.read()
    if len(body) > request.app[SETTINGS].http.max_sdp_bytes:
        raise PayloadTooLarge("fragment too large")
    try:
        frag = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("fragment is not UTF-8") from None
    if_match = request.headers.get("If-Match")
    remote = session.pc.remoteDescription
    if if_match == "*" or ("a=ice-ufrag:" in frag and _changes_ufrag(frag, remote.sdp if remote else None)):
        # RFC 9725 §4.3.2: ICE restart; aiortc cannot restart ICE on a live connection.
        raise Unprocessable(f"ICE restart is not supported; {restart_hint}")
    if if_match is not None and if_match != session.etag:
        raise PreconditionFailed("ETag does not match the session")
    if sum(1 for ln in frag.splitlines() if ln.startswith("a=candidate:")) > MAX_TRICKLE_CANDIDATES:
        raise BadRequest("too many candidates in one fragment")
    try:
        await session.add_remote_candidates(frag)
    except (SdpError, ValueError, IndexError) as exc:
        raise BadRequest(f"bad candidate: {exc}") from None
    return web.Response(status=204)
