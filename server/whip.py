"""WHIP endpoints (RFC 9725).

=========================================  =====================================
``POST /whip/{stream}``                    ``application/sdp`` offer → 201 +
                                           answer, ``Location``, strong
                                           ``ETag``, ``Link: rel=ice-server``
                                           (§4.2, §4.6)
``PATCH /whip/{stream}/{session}``         ``application/trickle-ice-sdpfrag``
                                           → 204 (§4.3.1); ICE restart → 422
                                           (§4.3.2: not supported); wrong
                                           ``If-Match`` → 412
``DELETE /whip/{stream}/{session}``        ends publishing → 200 (§4.2); the
                                           stream keeps its viewers for the
                                           reconnect grace period
``GET /whip/{stream}/{session}``           JSON session state and ingest stats
``OPTIONS /whip/{stream}``                 204, ``Accept-Post: application/sdp``,
                                           ICE servers (not on CORS preflight)
=========================================  =====================================

Authentication (§4.5 bearer token, or ``?token=``): a ``publish`` link for
this stream, or a user who is director of the stream's production (or
admin). Camera and viewer users and read links get 403. A session opened
with ``?token=`` carries its own capability in the ``Location``
(``/whip/{stream}/{session}.{key}``), which is how ffmpeg's WHIP muxer
DELETEs it without repeating the token.

Errors, all JSON ``{error, detail}``: 400 malformed SDP, 401/403 auth, 404
unknown stream or session, 409 + ``Retry-After`` the stream is already being
published (unless ``srt.takeover`` is set, which lets the newest publisher
take over — the same rule as SRT), 413 offer too large, 415 wrong content
type, 422 offer that cannot be ingested passthrough (no H.264
packetization-mode 1 / Opus, not sendonly, not BUNDLEd, bad simulcast),
503 + ``Retry-After`` session limit.

Wiring: the :class:`~media.webrtc.whip.WhipService` belongs to the media
service (``app[MEDIA].whip``, started and stopped with it, WHEP viewers'
keyframe requests routed to it); :func:`setup` adds the routes, the
per-publisher ingest stats to the streams API's live state (a
``LIVE_STATE_HOOKS`` hook) and the ``returnfeed_whip_*`` metrics.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from aiohttp import web
from prometheus_client.core import GaugeMetricFamily, Metric

from media.errors import NoCapacity, UnsupportedMedia
from media.stream import StreamBusy
from media.webrtc.sdp import SdpError
from media.webrtc.whip import WhipService, WhipSession

from .access import (
    PUBLISH_ROLES, authorize_stream, client_ip, owner_key, register_grant, session_access, session_location,
)
from .errors import Conflict, ServiceUnavailable, Unprocessable
from .keys import LIVE_STATE_HOOKS, MEDIA, METRICS, SETTINGS
from .log import event
from .media_metrics import counters
from .webrtc_http import check_offer_headers, may_see_ice_credentials, patch_trickle, read_offer, with_ice_links

log = logging.getLogger("returnfeed.whip")


async def whip_post(request: web.Request) -> web.StreamResponse:
    name = request.match_info["stream"]
    settings = request.app[SETTINGS]
    limit = check_offer_headers(request)
    p, _row = await authorize_stream(request, name, "publish")
    offer_sdp, offer = await read_offer(request, limit)
    service = request.app[MEDIA].whip
    try:
        session = await service.create_session(name, offer_sdp, offer, owner=owner_key(p),
                                               remote=client_ip(request), label=p.label)
    except StreamBusy as exc:
        raise Conflict(str(exc), headers={"Retry-After": str(settings.webrtc.retry_after_s)}) from None
    except (SdpError, UnsupportedMedia) as exc:
        raise Unprocessable(f"cannot ingest this offer: {exc}") from None
    except NoCapacity as exc:
        raise ServiceUnavailable(str(exc), headers={"Retry-After": "10"}) from None
    await register_grant(request, "whip", p, _row, PUBLISH_ROLES, session,
                         lambda reason: session.close_soon(f"access ended: {reason}"))
    plan = session.plan
    event(log, logging.INFO, "whip.session", stream=name, session=session.id, who=p.label,
          video=plan.video.reason if plan and plan.video else None, rids=list(plan.rids) if plan else [])
    resp = web.Response(status=201, text=session.sdp_answer, content_type="application/sdp",
                        headers={"Location": session_location(request, "whip", name, session.id, session.owner),
                                 "ETag": session.etag,
                                 "Accept-Patch": "application/trickle-ice-sdpfrag"})
    return with_ice_links(resp, request)


async def _session(request: web.Request) -> tuple[str, WhipSession]:
    return await session_access(request, "whip", request.app[MEDIA].whip.sessions)


async def whip_patch(request: web.Request) -> web.StreamResponse:
    _who, session = await _session(request)
    return await patch_trickle(request, session, "DELETE this session and POST a new offer")


async def whip_delete(request: web.Request) -> web.StreamResponse:
    who, session = await _session(request)
    await session.close("deleted by " + who)
    event(log, logging.INFO, "whip.deleted", stream=session.stream_name, session=session.id, who=who)
    return web.Response(status=200)


async def whip_get(request: web.Request) -> web.StreamResponse:
    _who, session = await _session(request)
    info = session.info()
    return web.json_response({"id": info.id, "stream": info.stream, "state": info.state,
                              "publishing": info.attached, "remote": info.remote, "stats": info.stats,
                              "layers": info.layers})


async def whip_options(request: web.Request) -> web.StreamResponse:
    resp = web.Response(status=204, headers={"Accept-Post": "application/sdp", "Allow": "OPTIONS, POST"})
    if not request.headers.get("Access-Control-Request-Method"):
        # RFC 9725 §4.6: not on CORS preflight; TURN credentials only for a caller
        # who may publish this stream (issue 9 item 6)
        with_ice_links(resp, request, authenticated=await may_see_ice_credentials(request, "publish"))
    return resp


async def whip_session_options(request: web.Request) -> web.StreamResponse:
    return web.Response(status=204, headers={"Accept-Patch": "application/trickle-ice-sdpfrag",
                                             "Allow": "OPTIONS, PATCH, DELETE, GET"})


def _publisher_stats(service: WhipService) -> Callable[[str, dict[str, Any]], None]:
    """Adds to the streams API's live state the ingest stats of a WHIP publisher."""

    def add(name: str, out: dict[str, Any]) -> None:
        source = out.get("source")
        session = service.publishing(name)
        if source and session is not None:
            for pub in source.get("publishers", []):
                if pub.get("protocol") == "whip":
                    info = session.info()
                    pub["whip"] = {"session": info.id, "state": info.state, "stats": info.stats,
                                   "layers": info.layers}

    return add


def _collector(service: WhipService) -> Callable[[], Any]:
    def collect() -> Any:
        g = GaugeMetricFamily("returnfeed_whip_sessions", "WHIP sessions (connecting or publishing)")
        g.add_metric([], len(service.sessions))
        out: list[Metric] = [g]
        c = service.counters()
        out += counters((
            ("returnfeed_whip_sessions_started", service.sessions_total, "WHIP sessions created"),
            ("returnfeed_whip_packets_received", c.packets, "RTP packets received from WHIP publishers"),
            ("returnfeed_whip_bytes_received", c.bytes, "RTP bytes received from WHIP publishers"),
            ("returnfeed_whip_packets_lost", c.lost, "RTP packets from WHIP publishers given up on"),
            ("returnfeed_whip_packets_recovered", c.recovered, "Holes filled by retransmissions"),
            ("returnfeed_whip_nacks_sent", c.nacks_sent, "NACK packets sent to WHIP publishers"),
            ("returnfeed_whip_plis_sent", c.plis_sent, "PLIs sent to WHIP publishers"),
            ("returnfeed_whip_frames_dropped", c.frames_dropped,
             "Access units from WHIP publishers dropped (broken, or waiting for a keyframe)"),
        ))
        return out

    return collect


def setup(app: web.Application) -> None:
    """Routes, live-state hook and metrics of ``app[MEDIA].whip``."""
    service = app[MEDIA].whip
    app[LIVE_STATE_HOOKS].append(_publisher_stats(service))
    app[METRICS].add_collector(_collector(service))

    r = app.router
    r.add_route("POST", "/whip/{stream}", whip_post)
    r.add_route("OPTIONS", "/whip/{stream}", whip_options)
    r.add_route("PATCH", "/whip/{stream}/{session}", whip_patch)
    r.add_route("DELETE", "/whip/{stream}/{session}", whip_delete)
    r.add_route("GET", "/whip/{stream}/{session}", whip_get)
    r.add_route("OPTIONS", "/whip/{stream}/{session}", whip_session_options)
