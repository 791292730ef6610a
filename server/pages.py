"""The browser pages: control room, camera operator, viewer.

``setup(app)`` adds

* ``GET /control`` — the director's control room (``web/control.html``);
* ``GET /camera/{stream}`` — the camera operator's phone page;
* ``GET /watch/{stream}`` — the viewer's WHEP player;
* ``GET /ca.crt``, ``GET /ca.json`` — the local CA made by ``returnfeed
  cert`` and its SHA-256 fingerprint, for the landing page (404 without one).

The pages are static HTML + ES modules under ``web/`` (served at
``/static/`` by :func:`server.app.create_app`); a query string such as
``?token=<signed link>`` is read by the page's JavaScript, never by the
server. Stream names in page paths follow the API's rule (``STREAM_NAME``);
anything else is a JSON 404 like every other unknown path.

Headers on every page (and on ``/``, the landing page):

* ``Content-Security-Policy``: scripts, styles, fetches and WebSockets from
  this origin only, no inline script or style, media from this origin or
  ``blob:``, images also ``data:``/``blob:`` (QR codes are drawn on a
  canvas), no framing, no plugins, no ``<base>``;
* ``Cache-Control: no-cache`` — always revalidated, so a deploy is seen at
  once (``/static/`` assets get the same, answered with 304 when unchanged);
* ``Referrer-Policy: no-referrer`` — signed links carry a token in the query
  string; it must never leak in a ``Referer`` header;
* ``X-Content-Type-Options: nosniff``.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from .certs import ca_summary
from .errors import NotFound
from .keys import SETTINGS
from .tls import CA_CERT, TLS_DIR

WEB_DIR = Path(__file__).resolve().parent.parent / "web"

#: Same rule as server.api.STREAM_NAME, as an aiohttp route pattern.
STREAM_PATTERN = r"{stream:[A-Za-z0-9][A-Za-z0-9_.~-]{0,63}}"

CSP = "; ".join([
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data: blob:",
    "media-src 'self' blob:",
    "connect-src 'self'",
    "font-src 'self'",
    "manifest-src 'self'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
    "object-src 'none'",
])

PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "Cache-Control": "no-cache",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}


def _page(filename: str) -> web.RequestHandler:
    path = WEB_DIR / filename

    async def handler(request: web.Request) -> web.StreamResponse:
        if not path.is_file():
            raise web.HTTPNotFound(text=f"{filename} is missing from the installation")
        return web.FileResponse(path, headers={**PAGE_HEADERS, "Content-Type": "text/html; charset=utf-8"})

    handler.__name__ = f"page_{filename.split('.')[0]}"
    return handler


async def _on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """Page headers on the landing page; revalidation and nosniff on assets."""
    path = request.path
    if path == "/" and response.status < 400:
        for key, value in PAGE_HEADERS.items():
            response.headers.setdefault(key, value)
    elif path.startswith("/static/") and response.status < 400:
        response.headers.setdefault("Cache-Control", "no-cache")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")


def local_ca_handlers(data_dir: Path) -> dict[str, web.RequestHandler]:
    """``GET /ca.crt`` and ``GET /ca.json`` for the local CA that ``returnfeed
    cert`` made (server.certs), or a JSON 404 when there is none: a phone
    downloads and installs it before it trusts the HTTPS port, and compares
    the fingerprint the landing page shows with the one the operator's
    terminal printed."""
    path = Path(data_dir) / TLS_DIR / CA_CERT

    def read() -> bytes:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise NotFound("this server has no local CA (see `returnfeed cert`)") from None

    async def ca_crt(request: web.Request) -> web.StreamResponse:
        # PEM: iOS and Android install either form from a download, and PEM
        # can be checked by eye. x-x509-ca-cert is what makes a phone offer
        # "install CA certificate" instead of saving a file.
        return web.Response(body=read(), headers={
            "Content-Type": "application/x-x509-ca-cert",
            "Content-Disposition": 'attachment; filename="returnfeed-ca.crt"',
            "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})

    async def ca_json(request: web.Request) -> web.StreamResponse:
        return web.json_response(ca_summary(read()), headers={"Cache-Control": "no-cache"})

    return {"/ca.crt": ca_crt, "/ca.json": ca_json}


def setup(app: web.Application) -> None:
    r = app.router
    r.add_get("/control", _page("control.html"), name="page_control")
    r.add_get(f"/camera/{STREAM_PATTERN}", _page("camera.html"), name="page_camera")
    r.add_get(f"/watch/{STREAM_PATTERN}", _page("watch.html"), name="page_watch")
    settings = app.get(SETTINGS)
    if settings is not None:  # a bare app serving the pages alone has no data dir
        for route, handler in local_ca_handlers(settings.data_dir).items():
            r.add_get(route, handler)
    app.on_response_prepare.append(_on_prepare)
