"""Typed application state: every :class:`aiohttp.web.AppKey` of the server.

A leaf (aiohttp's habit: ``web.AppKey("name", Type)``): route modules,
middlewares and the factory read state through these keys, so none of them
imports another to reach a key. The types are imported for the type checker
only; at run time this module imports aiohttp and nothing of the server.

    app.create_app ──sets──▶ keys ◀──reads── route modules, access, health
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Awaitable, Callable

from aiohttp import web

if TYPE_CHECKING:
    from .auth import LoginLimiter, TokenService
    from .config import Settings
    from .db import Database
    from .directory import Directory
    from .limits import ConnectionCaps
    from .media_service import MediaService
    from .metrics import Metrics
    from .qc_events import QcEvents
    from .qc_service import QcService
    from .caption_service import CaptionService
    from .stream_settings import StreamSettings
    from .tally_service import TallyService

SETTINGS: web.AppKey[Settings] = web.AppKey("settings")
DB: web.AppKey[Database] = web.AppKey("db")
TOKENS: web.AppKey[TokenService] = web.AppKey("tokens")
LIMITER: web.AppKey[LoginLimiter] = web.AppKey("limiter")
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
#: Wall-clock start of the application (``/healthz`` uptime).
STARTED: web.AppKey[float] = web.AppKey("started", float)
DIRECTORY: web.AppKey[Directory] = web.AppKey("directory")

#: The media service: stream hub, SRT listener, WHEP (``.whep``) and WHIP
#: (``.whip``) services.
MEDIA: web.AppKey[MediaService] = web.AppKey("media")
TALLY: web.AppKey[TallyService] = web.AppKey("tally")
#: The live QC tap (hub readers → QC worker process → sink).
QC: web.AppKey[QcService] = web.AppKey("qc")
#: Live captions (hub audio → caption worker → QC events and the captions table).
CAPTIONS: web.AppKey[CaptionService] = web.AppKey("captions")
#: Per-stream QC/captions settings in memory (``qc_for``, ``captions_for``,
#: ``caption_options``), kept current by the directory.
STREAM_SETTINGS: web.AppKey[StreamSettings] = web.AppKey("stream_settings")
#: Tally WebSocket caps per link, address and production.
WS_CAPS: web.AppKey[ConnectionCaps] = web.AppKey("ws_caps")

#: Live QC events: the tap's markers/meters to /ws/events and the markers table.
QC_EVENTS: web.AppKey[QcEvents] = web.AppKey("qc_events")
#: /ws/events caps per link (or user) and address.
QC_WS_CAPS: web.AppKey[ConnectionCaps] = web.AppKey("qc_ws_caps")

#: A stream's live state for the streams API, supplied by the media layer.
LIVE_STATE: web.AppKey[Callable[[str], dict[str, Any]]] = web.AppKey("live_state")
#: Additions to a stream's live state: ``hook(name, state)`` adds what one
#: service knows beyond the hub (WHIP: its publisher's ingest stats).
LIVE_STATE_HOOKS: web.AppKey[list[Callable[[str, dict[str, Any]], None]]] = web.AppKey("live_state_hooks")
#: Callbacks run after streams are created, changed or deleted (the tally
#: service's source list follows them).
STREAMS_CHANGED: web.AppKey[list[Callable[[], Awaitable[None]]]] = web.AppKey("streams_changed")

#: Per-process secret the WHIP/WHEP session URLs' capabilities are derived
#: from (sessions live in this process only, so it need not outlive it).
SESSION_SECRET: web.AppKey[bytes] = web.AppKey("webrtc_session_secret", bytes)
