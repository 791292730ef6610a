"""Connection-level limits of the HTTP server (issue 9 item 10).

aiohttp bounds a request's size but not its time, nor how many connections
one address holds. :class:`GuardedRunner` serves the app with:

* an idle (keep-alive) timeout: a connection with no request under way is
  closed ``http.keepalive_timeout_s`` after it opened or its last response
  (aiohttp's own keep-alive timer; its default is an hour);
* a header-read timeout: a request head (request line and headers) must be
  complete ``http.header_timeout_s`` after its first byte, or the connection
  gets 408 and is closed — a client dribbling header bytes (slowloris) no
  longer holds a connection for ever;
* a per-IP cap: over ``http.max_connections_per_ip`` open connections from
  one address, a new one is answered 503 and closed;
* what aiohttp's parser refuses answered in JSON like every other error
  (:class:`JsonErrorRequestHandler`).

Refusals are written as plain HTTP/1.1 responses with a JSON ``{error,
detail}`` body: no request object exists yet to go through the middlewares.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Sequence

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from .errors import HTTP_CODES, json_error
from .limits import ConnectionCaps
from .log import event
from .proxy import is_trusted, trusted_networks

log = logging.getLogger("returnfeed.http")


def raw_json_response(status: int, reason: str, error: str, detail: str,
                      headers: dict[str, str] | None = None) -> bytes:
    body = json.dumps({"error": error, "detail": detail}).encode()
    head = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/json; charset=utf-8",
            f"Content-Length: {len(body)}", "Connection: close"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def _log_now(count: int) -> bool:
    """Log the 1st, 2nd, 4th, 8th… occurrence: a flood cannot flood the log."""
    return count & (count - 1) == 0


class HttpGuard:
    """Limits shared by every connection of one server."""

    def __init__(self, *, header_timeout_s: float, max_connections_per_ip: int,
                 trusted_proxies: Sequence[str] = ()) -> None:
        self.header_timeout_s = header_timeout_s
        self.caps = ConnectionCaps({"ip": max_connections_per_ip})
        #: A trusted reverse proxy carries every client's connections: the
        #: per-IP cap applies to the clients behind it (WebSocket caps, login
        #: limits), not to the proxy's own address.
        self.uncapped = trusted_networks(tuple(trusted_proxies))
        self.refused = 0
        self.header_timeouts = 0


class JsonErrorRequestHandler(RequestHandler):
    """aiohttp answers what its parser refuses (URL over 8190 bytes, an
    oversized header, Content-Length with Transfer-Encoding, RFC 9112 §6.3;
    a bad method) itself, in text/plain, before any middleware runs. Same
    status, same logging, same forced close; the body becomes the
    ``{error, detail}`` JSON that every other error is."""

    __slots__ = ()

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        plain = super().handle_error(request, status, exc, message)
        if status >= 500:
            # 500: a handler bug; 504: aiohttp's own handler timeout.
            body = {"error": "internal" if status == 500 else "unavailable",
                    "detail": "internal server error" if status == 500 else plain.reason}
        else:
            # The parser's message quotes the offending bytes: first line, bounded.
            first = (message or plain.reason or "").strip().splitlines()
            body = {"error": HTTP_CODES.get(status, "bad_request"),
                    "detail": (first[0] if first else plain.reason)[:200]}
        resp = json_error(status, body)
        resp.force_close()
        return resp


class GuardedHandler(JsonErrorRequestHandler):
    """Parser errors answered in JSON (:class:`JsonErrorRequestHandler`),
    plus the header timeout and the per-IP connection cap."""

    __slots__ = ("_rf_ip", "_rf_header_timer")

    def __init__(self, manager: "GuardedServer", **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._rf_ip: str | None = None
        self._rf_header_timer: asyncio.TimerHandle | None = None

    @property
    def _guard(self) -> HttpGuard:
        return self._manager.guard  # type: ignore[union-attr]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        ip = str(peer[0]) if peer else "unknown"
        guard = self._guard
        if guard.uncapped and is_trusted(ip, guard.uncapped):
            return
        if guard.caps.acquire({"ip": ip}) is not None:
            guard.refused += 1
            cap = guard.caps.caps["ip"]
            if _log_now(guard.refused):
                event(log, logging.WARNING, "http.connection_refused", ip=ip, cap=cap, total=guard.refused)
            self._refuse(503, "Service Unavailable", "too_many_connections",
                         f"more than {cap} open connections from this address", {"Retry-After": "5"})
            return
        self._rf_ip = ip

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_header_timer()
        if self._rf_ip is not None:
            self._guard.caps.release({"ip": self._rf_ip})
            self._rf_ip = None
        super().connection_lost(exc)

    def _awaiting_head(self) -> bool:
        return not self._upgraded and not self._request_in_progress and not self._messages

    def data_received(self, data: bytes) -> None:
        head_pending = self._awaiting_head()
        super().data_received(data)
        if self._messages or not head_pending:
            self._cancel_header_timer()  # the head is complete (or no head was awaited)
        elif data and self._rf_header_timer is None and not self._force_close:
            self._rf_header_timer = self._loop.call_later(self._guard.header_timeout_s, self._on_header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._rf_header_timer is not None:
            self._rf_header_timer.cancel()
            self._rf_header_timer = None

    def _on_header_timeout(self) -> None:
        self._rf_header_timer = None
        if not self._awaiting_head() or self.transport is None:
            return
        guard = self._guard
        guard.header_timeouts += 1
        if _log_now(guard.header_timeouts):
            event(log, logging.INFO, "http.header_timeout", ip=self._rf_ip, total=guard.header_timeouts)
        self._refuse(408, "Request Timeout", "request_timeout",
                     f"request headers not complete within {guard.header_timeout_s:g} s")

    def _refuse(self, status: int, reason: str, error: str, detail: str,
                headers: dict[str, str] | None = None) -> None:
        transport = self.transport
        if transport is not None:
            transport.write(raw_json_response(status, reason, error, detail, headers))
        self.force_close()
        if transport is not None:
            transport.close()


class GuardedServer(web.Server):
    guard: HttpGuard

    def __call__(self) -> JsonErrorRequestHandler:
        return GuardedHandler(self, loop=self._loop, **self._kwargs)


class GuardedRunner(web.AppRunner):
    """An :class:`aiohttp.web.AppRunner` whose connections obey ``guard``."""

    def __init__(self, app: web.Application, *, guard: HttpGuard, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._rf_guard = guard

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()
        server = GuardedServer(plain.request_handler, request_factory=plain.request_factory,
                               handler_cancellation=plain.handler_cancellation, loop=plain._loop,
                               **plain._kwargs)
        server.guard = self._rf_guard
        return server
