"""SRT caller URLs for a stream (the streams API and publish links)."""

from __future__ import annotations

from urllib.parse import quote, urlencode

from aiohttp import web

from ..keys import SETTINGS


def srt_host(request: web.Request) -> str:
    s = request.app[SETTINGS].srt
    if s.public_host:
        return s.public_host
    host = request.host
    if host.startswith("["):
        return host.split("]")[0] + "]"
    return host.rsplit(":", 1)[0] if ":" in host else host


#: Per-stream SRT latency bounds (ms), as the streams table checks them.
LATENCY_MIN_MS, LATENCY_MAX_MS = 20, 8000


def stream_latency_ms(request: web.Request, own: int | None) -> int:
    """The stream's own SRT latency, else the server's."""
    return own if own is not None else request.app[SETTINGS].srt.latency_ms


def srt_url(request: web.Request, streamid: str, passphrase: str, pbkeylen: int, latency_ms: int, *,
            latency_unit_us: bool = True) -> str:
    """A caller URL. libsrt agrees on the larger of both sides' latencies, so
    the URL asks for the stream's. FFmpeg (and OBS, which uses FFmpeg's SRT
    protocol) reads ``latency`` in microseconds; srt-live-transmit and
    GStreamer read it in milliseconds (``latency_unit_us=False``)."""
    s = request.app[SETTINGS].srt
    latency = latency_ms * 1000 if latency_unit_us else latency_ms
    q = urlencode({"streamid": streamid, "passphrase": passphrase, "pbkeylen": pbkeylen, "mode": "caller",
                   "latency": latency}, quote_via=quote, safe=":!=,")
    return f"srt://{srt_host(request)}:{s.port}?{q}"


def srt_urls(request: web.Request, key: str, streamid: str, passphrase: str, pbkeylen: int,
             own_latency_ms: int | None) -> dict[str, str]:
    """``key`` (latency in µs, FFmpeg/OBS) and ``key + '_ms'`` (srt-live-transmit, GStreamer)."""
    latency = stream_latency_ms(request, own_latency_ms)
    return {key: srt_url(request, streamid, passphrase, pbkeylen, latency),
            key + "_ms": srt_url(request, streamid, passphrase, pbkeylen, latency, latency_unit_us=False)}
