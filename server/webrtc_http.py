"""HTTP rules WHIP and WHEP share (RFC 9725; draft-ietf-wish-whep reuses them).

* reading an SDP offer: ``Content-Type: application/sdp`` (else 415), at
  most ``http.max_sdp_bytes`` (413), parsed and checked by
  :func:`media.webrtc.sdp.parse_offer` (400 with the reason);
* ``Link: <url>; rel="ice-server"`` headers from ``webrtc.ice_servers``
  (§4.6), with time-limited TURN credentials minted per answer from a TURN
  server's shared secret (:func:`turn_rest_credentials`);
* ``PATCH`` of a session resource with ``application/trickle-ice-sdpfrag``
  (§4.3): trickled candidates 204, an ICE restart (``If-Match: *`` or a new
  ufrag) 422 because aiortc cannot restart ICE on a live connection, a
  stale ``If-Match`` 412.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from typing import Any

from aiohttp import web

from media.webrtc.sdp import Offer, SdpError, parse_offer

from .access import authorize_stream, bearer_token
from .errors import ApiError, BadRequest, PayloadTooLarge, PreconditionFailed, Unprocessable, UnsupportedMediaType
from .keys import SETTINGS

MAX_TRICKLE_CANDIDATES = 64


def turn_rest_credentials(secret: str, user: str, now: float, ttl_s: int) -> tuple[str, str]:
    """Time-limited TURN credentials (the "TURN REST API" scheme coturn
    checks with ``use-auth-secret``): username ``EXPIRY:USER`` with EXPIRY in
    unix seconds, credential base64(HMAC-SHA1(secret, username)). The TURN
    server needs no call back to us: it recomputes the HMAC and refuses an
    expired timestamp."""
    username = f"{int(now) + ttl_s}:{user}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode("ascii")


def _turn_user(request: web.Request) -> str:
    # The part after the colon is only a label in the TURN server's logs and
    # quotas: the stream, kept to characters no header or log parser trips on.
    return re.sub(r"[^A-Za-z0-9_.-]", "_", request.match_info.get("stream", "returnfeed"))[:64] or "returnfeed"


def ice_links(request: web.Request, *, authenticated: bool = True, now: float | None = None) -> list[str]:
    """RFC 9725 §4.6 ``Link`` header values for the configured ICE servers.

    A TURN server's username and credential let whoever holds them relay
    traffic through it, so they go only to requests that proved the right to
    use this stream (issue 9 item 6); an unauthenticated OPTIONS gets only
    the servers that need no credential. A server configured with a shared
    secret gets fresh credentials that expire after its ``ttl_s``."""
    out = []
    for s in request.app[SETTINGS].webrtc.ice_servers:
        link = f'<{s.urls}>; rel="ice-server"'
        if s.secret is not None:
            if not authenticated:
                continue
            username, credential = turn_rest_credentials(
                s.secret, _turn_user(request), time.time() if now is None else now, s.ttl_s)
            link += f'; username="{username}"; credential="{credential}"; credential-type="password"'
        elif s.username is not None:
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
