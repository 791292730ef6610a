"""server.tls in-process: the live context reloaded in place under both
event loops the server runs on (new handshakes get the new certificate, an
open connection keeps working), a refused reload, which files are used,
HSTS only over TLS, and the redirect application."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import ssl
from pathlib import Path
from typing import Any

import pytest
import uvloop
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from server.certs import make_local_certificates
from server.config import HttpSettings
from server.errors import NotFound
from server.tls import TlsCertificate, TlsConfigError, TlsFiles, install_hsts, redirect_app, tls_files


class Echo(asyncio.Protocol):
    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


def _sha256(pem: Path) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem.read_text())).hexdigest()


async def _handshake(port: int, ca: Path) -> tuple[str, asyncio.StreamReader, asyncio.StreamWriter]:
    client = ssl.create_default_context(cafile=str(ca))
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname="localhost")
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return hashlib.sha256(der).hexdigest(), reader, writer


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> bytes:
    writer.write(data)
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(len(data)), 5)


async def _reload_scenario(tmp: Path) -> None:
    made = make_local_certificates(tmp, ["localhost"], include_host=False)
    tls = TlsCertificate(TlsFiles(made.server_cert, made.server_key, "data_dir"))
    old = _sha256(made.server_cert)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, "127.0.0.1", 0, ssl=tls.context)
    port = server.sockets[0].getsockname()[1]
    try:
        seen, reader, writer = await _handshake(port, made.ca_cert)
        assert seen == old and tls.fingerprint == old
        # Renew: same CA, new key and certificate.
        make_local_certificates(tmp, ["localhost"], include_host=False)
        new = _sha256(made.server_cert)
        assert new != old and tls.reload() and tls.fingerprint == new
        seen2, reader2, writer2 = await _handshake(port, made.ca_cert)
        assert seen2 == new
        # The connection made before the reload still works both ways.
        assert await _echo(reader, writer, b"still here") == b"still here"
        assert await _echo(reader2, writer2, b"new one") == b"new one"
        # A key that is not the certificate's: refused, the current pair stays.
        other = make_local_certificates(tmp / "other", ["localhost"], include_host=False)
        good_key = made.server_key.read_bytes()
        shutil.copyfile(other.server_key, made.server_key)
        assert not tls.reload() and tls.reload_failures == 1 and tls.fingerprint == new
        seen3, reader3, writer3 = await _handshake(port, made.ca_cert)
        assert seen3 == new
        # A missing file: refused the same way.
        made.server_key.unlink()
        assert not tls.reload() and tls.reload_failures == 2
        made.server_key.write_bytes(good_key)
        assert tls.reload() and tls.reloads == 2
        for w in (writer, writer2, writer3):
            w.close()
    finally:
        server.close()
        await server.wait_closed()


def test_reload_in_place_asyncio(tmp_path: Path) -> None:
    asyncio.run(_reload_scenario(tmp_path))


def test_reload_in_place_uvloop(tmp_path: Path) -> None:
    # `returnfeed serve` runs on uvloop, whose SSL layer is its own.
    uvloop.run(_reload_scenario(tmp_path))


def test_which_files(tmp_path: Path) -> None:
    assert tls_files(HttpSettings(), tmp_path) is None
    with pytest.raises(TlsConfigError, match="returnfeed cert"):
        tls_files(HttpSettings(tls="on"), tmp_path)
    made = make_local_certificates(tmp_path, ["localhost"], include_host=False)
    found = tls_files(HttpSettings(), tmp_path)
    assert found == TlsFiles(made.server_cert, made.server_key, "data_dir")
    assert tls_files(HttpSettings(tls="off"), tmp_path) is None
    explicit = HttpSettings(tls_cert="/etc/x/fullchain.pem", tls_key="/etc/x/key.pem")
    assert tls_files(explicit, tmp_path) == TlsFiles(Path("/etc/x/fullchain.pem"), Path("/etc/x/key.pem"), "config")
    with pytest.raises(ValueError, match="together"):
        HttpSettings(tls_cert="/etc/x/fullchain.pem")


def test_unusable_files_refuse_to_start(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("nope\n")
    with pytest.raises(TlsConfigError, match="cannot use"):
        TlsCertificate(TlsFiles(bad, bad, "config"))


async def _hsts_headers(tmp: Path, *, over_tls: bool, max_age: int) -> dict[str, str]:
    made = make_local_certificates(tmp, ["localhost"], include_host=False)
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", ok)
    install_hsts(app, max_age)
    server_ctx = TlsCertificate(TlsFiles(made.server_cert, made.server_key, "data_dir")).context if over_tls else None
    server = TestServer(app, scheme="https" if over_tls else "http", host="127.0.0.1")
    await server.start_server(ssl=server_ctx)
    try:
        client_ctx = ssl.create_default_context(cafile=str(made.ca_cert))
        client_ctx.check_hostname = False  # the test server is reached by address
        async with TestClient(server) as client:
            resp = await client.get("/", ssl=client_ctx if over_tls else None)
            return dict(resp.headers)
    finally:
        await server.close()


def test_hsts_only_over_tls(tmp_path: Path) -> None:
    assert asyncio.run(_hsts_headers(tmp_path, over_tls=True, max_age=31536000))[
        "Strict-Transport-Security"] == "max-age=31536000"
    assert "Strict-Transport-Security" not in asyncio.run(_hsts_headers(tmp_path, over_tls=False, max_age=31536000))
    assert "Strict-Transport-Security" not in asyncio.run(_hsts_headers(tmp_path, over_tls=True, max_age=0))


async def _redirects(public_url: str) -> list[tuple[int, str]]:
    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def no_ca(request: web.Request) -> web.Response:
        raise NotFound("this server has no local CA")

    app = redirect_app(lambda: 8443, public_url, {"/healthz": health, "/ca.crt": no_ca})
    out = []
    async with TestClient(TestServer(app)) as client:
        for method, path, host in (("GET", "/camera/cam1?token=x%2By&a=1", "studio.lan:8080"),
                                   ("POST", "/whip/cam1", "[fd00::2]:8080"), ("GET", "/healthz", "studio.lan"),
                                   ("POST", "/healthz", "studio.lan"), ("GET", "/ca.crt", "studio.lan")):
            resp = await client.request(method, path, headers={"Host": host}, allow_redirects=False)
            out.append((resp.status, resp.headers.get("Location", "")))
    return out


def test_redirect_app() -> None:
    assert asyncio.run(_redirects("")) == [
        (308, "https://studio.lan:8443/camera/cam1?token=x%2By&a=1"),
        (308, "https://[fd00::2]:8443/whip/cam1"),
        (200, ""),
        (308, "https://studio.lan:8443/healthz"),
        (404, ""),  # the JSON 404 of a server without a local CA, not a 500
    ]
    assert asyncio.run(_redirects("https://feeds.example.com/"))[0] == \
        (308, "https://feeds.example.com/camera/cam1?token=x%2By&a=1")


async def _stalled_handshake(tmp: Path) -> tuple[bytes, int]:
    from server.tls import TlsSite

    made = make_local_certificates(tmp, ["localhost"], include_host=False)
    tls = TlsCertificate(TlsFiles(made.server_cert, made.server_key, "data_dir"))

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", ok)
    runner = web.AppRunner(app)
    await runner.setup()
    site = TlsSite(runner, "127.0.0.1", 0, ssl_context=tls.context, handshake_timeout_s=0.5)
    await site.start()
    try:
        # A client that connects and never says hello is closed by the server.
        reader, writer = await asyncio.open_connection("127.0.0.1", site.port)
        eof = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        # One that handshakes is served.
        client = ssl.create_default_context(cafile=str(made.ca_cert))
        reader, writer = await asyncio.open_connection("127.0.0.1", site.port, ssl=client,
                                                       server_hostname="localhost")
        writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        status = int((await reader.readline()).split()[1])
        writer.close()
        return eof, status
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_tls_handshake_is_bounded(tmp_path: Path, run: Any) -> None:
    eof, status = run(_stalled_handshake(tmp_path))
    assert eof == b"" and status == 200


def test_serve_refuses_to_start_without_a_certificate_when_tls_is_on(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "RETURNFEED_HTTP__TLS": "on", "RETURNFEED_LOG__FORMAT": "text"}
    env.pop("DATABASE_URL", None)
    run = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--data-dir", str(tmp_path), "--http-port", "0"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "returnfeed cert" in run.stderr
    assert not (tmp_path / "pg").exists()  # refused before the database was started
