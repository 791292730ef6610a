"""HTTPS and WSS on the one HTTP port: the server's TLS context, its reload
on SIGHUP, HSTS, and the plain-HTTP redirect port.

::

    config http.tls / tls_cert / tls_key ──▶ tls_files() ──▶ TlsCertificate
        (or <data_dir>/tls/server.{crt,key}        │ .context: ONE ssl.SSLContext
         written by `returnfeed cert`)             ▼        given to the listener
                                           TCPSite(ssl_context=context)
    SIGHUP ──▶ TlsCertificate.reload(): read both files once, load them into
               a scratch context (a bad pair stops here, the old one stays),
               then into the live context.

Why the live context is changed in place rather than swapped: asyncio (and
uvloop) wrap every accepted connection with ``context.wrap_bio()``, and
``SSL_new`` copies the context's certificate and key into the connection at
that moment. So a connection keeps the certificate it was accepted with (an
open WebSocket is not disturbed) and every later handshake gets the new one.
An SNI callback that hands out the current context works too (OpenSSL 3
calls it with ``server_name=None`` for a client that sends no SNI, as one
that opens ``https://192.168.1.20:8080/`` does, RFC 6066 §3), but it adds a
second context and a callback on every handshake for the same effect.
Reloading runs on the event loop thread, where every handshake runs too,
so no handshake ever sees the new certificate with the old key.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

from aiohttp import web

from .errors import ApiError, json_error
from .log import event

log = logging.getLogger("returnfeed.tls")

#: ``returnfeed cert`` writes here, under the data directory (server.certs).
TLS_DIR = "tls"
CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"


class TlsConfigError(Exception):
    """TLS is asked for but cannot be set up (missing or unreadable files)."""


@dataclass(frozen=True, slots=True)
class TlsFiles:
    cert: Path
    key: Path
    #: "config" (http.tls_cert/tls_key) or "data_dir" (made by returnfeed cert).
    source: str


def tls_dir(data_dir: Path) -> Path:
    return Path(data_dir) / TLS_DIR


def tls_files(http: Any, data_dir: Path) -> TlsFiles | None:
    """Which certificate the server uses, following ``http.tls``; None: plain HTTP."""
    if http.tls == "off":
        return None
    if http.tls_cert:
        return TlsFiles(Path(http.tls_cert), Path(http.tls_key), "config")
    local = tls_dir(data_dir)
    cert, key = local / SERVER_CERT, local / SERVER_KEY
    if cert.is_file() and key.is_file():
        return TlsFiles(cert, key, "data_dir")
    if http.tls == "on":
        raise TlsConfigError("http.tls = \"on\" but neither http.tls_cert/tls_key are set nor "
                             f"{cert} exists (run `returnfeed cert`)")
    return None


def _server_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # TLS 1.2 is the floor of every browser and phone still in use (RFC 8996
    # deprecates 1.0 and 1.1).
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # The server speaks HTTP/1.1 only (WebSockets upgrade over it); saying so
    # in ALPN keeps an h2-preferring client from guessing.
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    return ctx


def _load_pair(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    """``load_cert_chain`` reads paths only: load one snapshot of both files
    from a private directory, so a renewal that rewrites them meanwhile
    cannot mix an old key with a new certificate."""
    with tempfile.TemporaryDirectory(prefix="rf-tls-") as tmp:  # mode 0700
        cert_path, key_path = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        cert_path.write_bytes(cert_pem)
        key_path.touch(mode=0o600)
        key_path.write_bytes(key_pem)
        # Also checks that the key belongs to the certificate
        # (SSL_CTX_check_private_key): "key values mismatch".
        ctx.load_cert_chain(cert_path, key_path)


def _leaf_fingerprint(cert_pem: bytes) -> str:
    start = cert_pem.find(b"-----BEGIN CERTIFICATE-----")
    end = cert_pem.find(b"-----END CERTIFICATE-----", start)
    if start < 0 or end < 0:
        raise ssl.SSLError("no PEM certificate in the file")
    der = ssl.PEM_cert_to_DER_cert(cert_pem[start:end + len(b"-----END CERTIFICATE-----")].decode("ascii"))
    return hashlib.sha256(der).hexdigest()


class TlsCertificate:
    """The listener's one :class:`ssl.SSLContext` and the files behind it."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self.context = _server_context()
        self.fingerprint = ""
        self.reloads = 0
        self.reload_failures = 0
        try:
            self._load(self.context)
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise TlsConfigError(f"cannot use {files.cert} / {files.key}: {exc}") from None

    def _load(self, live: ssl.SSLContext) -> None:
        cert_pem = self.files.cert.read_bytes()
        key_pem = self.files.key.read_bytes()
        fingerprint = _leaf_fingerprint(cert_pem)
        _load_pair(_server_context(), cert_pem, key_pem)  # a bad pair stops here
        _load_pair(live, cert_pem, key_pem)
        self.fingerprint = fingerprint

    def reload(self) -> bool:
        """Re-read the files into the live context (SIGHUP). On any error the
        context keeps the certificate it had, and the error is logged."""
        try:
            self._load(self.context)
        except (OSError, ssl.SSLError, ValueError) as exc:
            self.reload_failures += 1
            event(log, logging.ERROR, "tls.reload_failed", cert=str(self.files.cert), key=str(self.files.key),
                  error=f"{type(exc).__name__}: {exc}", kept_sha256=self.fingerprint)
            return False
        self.reloads += 1
        event(log, logging.INFO, "tls.reloaded", cert=str(self.files.cert), sha256=self.fingerprint)
        return True


# -- the listener --------------------------------------------------------------

class TlsSite(web.TCPSite):
    """aiohttp's TCP site with a bound on the TLS handshake. The connection
    limits of server.http_guard start only once the handshake is done (the
    HTTP protocol sees the connection then), and asyncio's own default
    bound is 60 s: a client that opens connections and never finishes
    its handshake is held to the header timeout instead."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *, ssl_context: ssl.SSLContext,
                 handshake_timeout_s: float, reuse_address: bool = True) -> None:
        super().__init__(runner, host, port, ssl_context=ssl_context, reuse_address=reuse_address)
        self._rf_handshake_timeout = handshake_timeout_s

    async def start(self) -> None:
        # TCPSite.start with ssl_handshake_timeout added: BaseSite.start
        # registers the site with its runner, then the one create_server.
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            server, self._host, self._port, ssl=self._ssl_context, backlog=self._backlog,
            reuse_address=self._reuse_address, reuse_port=self._reuse_port,
            ssl_handshake_timeout=self._rf_handshake_timeout)
        self._bound_port = self._server.sockets[0].getsockname()[1] if self._server.sockets else self._port


# -- HSTS ----------------------------------------------------------------------

def install_hsts(app: web.Application, max_age_s: int) -> None:
    """``Strict-Transport-Security`` on every response sent over TLS.
    RFC 6797 §7.2: never over plain HTTP (the redirect port sends none);
    §6.1.2 includeSubDomains is left out: on a LAN the name's siblings are
    other people's plain-HTTP devices."""
    if max_age_s <= 0:
        return
    value = f"max-age={max_age_s}"

    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        if request.transport is not None and request.transport.get_extra_info("sslcontext") is not None:
            response.headers.setdefault("Strict-Transport-Security", value)

    app.on_response_prepare.append(on_prepare)


# -- the plain-HTTP redirect port ------------------------------------------------

def redirect_app(https_port: Callable[[], int], public_url: str,
                 direct: dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]]) -> web.Application:
    """A plain-HTTP application that sends every request to the HTTPS port
    with 308 (RFC 9110 §15.4.9: method and body kept, so a WHIP POST that
    lands here is retried as a POST). ``direct`` paths answer here: the
    health check (probes that speak plain HTTP) and the local CA, which a
    phone must fetch before it can trust the HTTPS port."""

    async def redirect(request: web.Request) -> web.StreamResponse:
        handler = direct.get(request.path)
        if handler is not None and request.method in ("GET", "HEAD"):
            try:
                return await handler(request)
            except ApiError as exc:  # this app has no error middleware
                return exc.response()
        if public_url:
            base = public_url.rstrip("/")
        else:
            try:
                host = request.url.host or "localhost"
            except ValueError:  # yarl refuses the Host header
                return json_error(400, {"error": "bad_request", "detail": "invalid Host header"})
            if ":" in host:  # an IPv6 literal
                host = f"[{host}]"
            port = https_port()
            base = f"https://{host}" + ("" if port == 443 else f":{port}")
        # The request target as sent: path and query kept byte for byte.
        target = request.raw_path if request.raw_path.startswith("/") else request.rel_url.raw_path_qs
        raise web.HTTPPermanentRedirect(base + target)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", redirect)
    return app
