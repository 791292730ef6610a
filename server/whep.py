"""WHEP endpoints (draft-ietf-wish-whep, sharing RFC 9725's rules).

==========================================  ====================================
``POST /whep/{stream}[?layer=low|high]``    ``application/sdp`` offer → 201 +
``[&sync=0|1]``                             answer, ``Location``, strong
                                            ``ETag``, ``Link: rel=ice-server``;
                                            ``sync=0``: video first, no lip
                                            sync (one a=msid per track)
``PATCH /whep/{stream}/{session}``          ``application/trickle-ice-sdpfrag``
                                            → 204; ICE restart → 422 (not
                                            supported); wrong ``If-Match`` → 412
``DELETE /whep/{stream}/{session}``         ends the session → 200
``POST /whep/{stream}/{session}/layer``     ``{"layer": "low"|"high"|"auto"}``
                                            pins a layer at runtime
``GET /whep/{stream}/{session}``            JSON session state
``OPTIONS /whep/{stream}``                  204, ``Accept-Post:
                                            application/sdp``, ICE servers
``HEAD /whep/{stream}``                     200 when live, 409 when not
==========================================  ====================================

Authentication: ``Authorization: Bearer`` or ``?token=`` — a read link for
the stream, or a user token of a member of the stream's production. The
session URL works with the same credential; a session opened with
``?token=`` also carries its own capability in the ``Location``
(``/whep/{stream}/{session}.{key}``, :func:`.access.session_location`).
Errors: 400 malformed SDP, 401/403 auth, 404 unknown stream or session, 409 +
``Retry-After`` stream not live, 413 offer too large, 415 wrong content type,
422 offer that cannot be served passthrough (no H.264/Opus, B-frame source),
503 + ``Retry-After`` viewer limit. All JSON ``{error, detail}``.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from aiohttp import web

from media.errors import NoCapacity, UnsupportedMedia
from media.webrtc.sdp import SdpError

from . import repo
from .access import (
    authorize_stream, owner_key, principal, register_grant, require_production_role, session_access,
    session_location,
)
from .auth import MEMBER_ROLES
from .errors import BadRequest, Conflict, NotFound, ServiceUnavailable, Unprocessable
from .keys import DB, MEDIA, SETTINGS
from .log import event
from .webrtc_http import check_offer_headers, may_see_ice_credentials, patch_trickle, read_offer, with_ice_links

log = logging.getLogger("returnfeed.whep")


def _not_live(request: web.Request) -> Conflict:
    retry = request.app[SETTINGS].webrtc.retry_after_s
    return Conflict("stream is not live", headers={"Retry-After": str(retry)})


async def whep_post(request: web.Request) -> web.StreamResponse:
    name = request.match_info["stream"]
    limit = check_offer_headers(request)
    p, _row = await authorize_stream(request, name, "read")
    offer_sdp, offer = await read_offer(request, limit)
    media = request.app[MEDIA]
    stream = media.hub.get(name)
    if stream is None or not stream.live:
        raise _not_live(request)
    video_tracks = [t for t in stream.tracks.values() if t.kind == "video"]
    if not video_tracks and not any(t.kind == "audio" for t in stream.tracks.values()):
        raise _not_live(request)
    plid = next((t.info().profile_level_id for t in video_tracks if t.info().profile_level_id), None)
    b_frames = any(t.info().b_frames for t in video_tracks)
    pin = request.query.get("layer")
    if pin in ("", "auto"):
        pin = None
    if pin is not None and pin not in ("high", "mid", "low"):
        raise BadRequest("layer must be high, mid, low or auto")
    sync = request.query.get("sync", "1")
    if sync not in ("0", "1"):
        raise BadRequest("sync must be 1 (audio and video lip-synced, the default) or 0 (video first)")
    try:
        session = await media.whep.create_session(stream, offer_sdp, offer, owner=owner_key(p), pin=pin,
                                                  source_plid=plid, b_frames=b_frames, sync=sync == "1")
    except UnsupportedMedia as exc:
        raise Unprocessable(str(exc)) from None
    except SdpError as exc:
        raise Unprocessable(f"cannot serve this offer: {exc}") from None
    except NoCapacity as exc:
        raise ServiceUnavailable(str(exc), headers={"Retry-After": "10"}) from None
    await register_grant(request, "whep", p, _row, MEMBER_ROLES, session,
                         lambda reason: session.close_soon("access ended", reason))
    event(log, logging.INFO, "whep.session", stream=name, session=session.id, who=p.label,
          codec_note=session.answer_note)
    location = session_location(request, "whep", name, session.id, session.owner)
    resp = web.Response(status=201, text=session.sdp_answer, content_type="application/sdp",
                        headers={"Location": location, "ETag": session.etag,
                                 "Accept-Patch": "application/trickle-ice-sdpfrag"})
    return with_ice_links(resp, request)


async def _session(request: web.Request) -> tuple[str, Any]:
    return await session_access(request, "whep", request.app[MEDIA].whep.sessions)


async def whep_patch(request: web.Request) -> web.StreamResponse:
    _who, session = await _session(request)
    return await patch_trickle(request, session, "start a new session")


async def whep_delete(request: web.Request) -> web.StreamResponse:
    who, session = await _session(request)
    await session.close()
    event(log, logging.INFO, "whep.deleted", session=session.id, who=who)
    return web.Response(status=200)


async def whep_get(request: web.Request) -> web.StreamResponse:
    _who, session = await _session(request)
    info = session.info()
    return web.json_response({"id": info.id, "stream": info.stream, "layer": info.layer,
                              "pinned": info.pinned, "sync": session.sync, "state": info.state,
                              "stats": info.stats})


async def whep_layer(request: web.Request) -> web.StreamResponse:
    _who, session = await _session(request)
    try:
        data = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise BadRequest("body must be JSON {\"layer\": ...}") from None
    layer = data.get("layer") if isinstance(data, dict) else None
    if not isinstance(layer, str):
        raise BadRequest("'layer' must be a layer name or 'auto'")
    try:
        await session.pin(None if layer == "auto" else layer)
    except KeyError:
        raise NotFound("no such session") from None
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    return web.json_response({"layer": session.layer_name, "pinned": layer != "auto"})


async def whep_options(request: web.Request) -> web.StreamResponse:
    resp = web.Response(status=204, headers={"Accept-Post": "application/sdp",
                                             "Allow": "OPTIONS, POST, HEAD"})
    if not request.headers.get("Access-Control-Request-Method"):
        # RFC 9725 §4.4: not on CORS preflight; TURN credentials only for a caller
        # who may read this stream (issue 9 item 6)
        with_ice_links(resp, request, authenticated=await may_see_ice_credentials(request, "read"))
    return resp


async def whep_head(request: web.Request) -> web.StreamResponse:
    name = request.match_info["stream"]
    await authorize_stream(request, name, "read")
    stream = request.app[MEDIA].hub.get(name)
    live = stream is not None and stream.live
    headers = {"Accept-Post": "application/sdp"}
    if not live:
        headers["Retry-After"] = str(request.app[SETTINGS].webrtc.retry_after_s)
    return web.Response(status=200 if live else 409, headers=headers)


async def stream_viewers(request: web.Request) -> web.StreamResponse:
    """``GET /api/v1/streams/{name}/viewers``: every WHEP viewer of a stream
    with its layer, loss, RTT, bandwidth estimate, freezes, send errors and
    retransmissions (directors of the stream's production)."""
    p = await principal(request)
    name = request.match_info["name"]
    row = await repo.stream_by_name(request.app[DB].pool, name)
    if row is None:
        raise NotFound("no such stream")
    await require_production_role(request, p, row["production_id"], "director")
    viewers = await request.app[MEDIA].whep.snapshots(name)
    by_layer: dict[str, int] = {}
    for v in viewers:
        by_layer[v.layer or "starting"] = by_layer.get(v.layer or "starting", 0) + 1
    return web.json_response({"stream": name, "viewers": [v.as_json() for v in viewers],
                              "by_layer": by_layer, "struggling": sum(v.struggling for v in viewers)})


def setup(app: web.Application) -> None:
    r = app.router
    r.add_route("GET", "/api/v1/streams/{name}/viewers", stream_viewers)
    r.add_route("POST", "/whep/{stream}", whep_post)
    r.add_route("OPTIONS", "/whep/{stream}", whep_options)
    r.add_route("HEAD", "/whep/{stream}", whep_head)
    r.add_route("PATCH", "/whep/{stream}/{session}", whep_patch)
    r.add_route("DELETE", "/whep/{stream}/{session}", whep_delete)
    r.add_route("GET", "/whep/{stream}/{session}", whep_get)
    r.add_route("POST", "/whep/{stream}/{session}/layer", whep_layer)
    r.add_route("OPTIONS", "/whep/{stream}/{session}", whep_options)
