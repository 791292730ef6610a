"""HTTPS and WSS through a real server process with a certificate made by
`returnfeed cert`: one port for both, reload on SIGHUP under an open
WebSocket, a bad certificate on reload, the plain-HTTP redirect port, HSTS,
the local CA on the landing page, and client addresses behind trusted
proxies (spoofed headers from anyone else ignored)."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import pytest

from helpers import ROOT, ServerProcess, wait_until

pytestmark = pytest.mark.integration

ADMIN_PASSWORD = "admin-password-1"
#: The server trusts this address as a reverse proxy; 127.0.0.3 is any other
#: client (the whole 127/8 is this machine's loopback).
PROXY_ADDR, STRANGER_ADDR = "127.0.0.1", "127.0.0.3"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cert_cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.cli", "cert", "--data-dir", str(data_dir), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "RETURNFEED_LOG__FORMAT": "text"})


def _client_context(ca: Path) -> ssl.SSLContext:
    # Verifies the chain, the CA's name constraints and the host name.
    return ssl.create_default_context(cafile=str(ca))


def _leaf_sha256(port: int, ctx: ssl.SSLContext, host: str = "localhost") -> str:
    """The SHA-256 of the certificate a fresh handshake is given."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=host) as tls:
        der = tls.getpeercert(binary_form=True)
    return hashlib.sha256(der).hexdigest()


def _file_sha256(pem_path: Path) -> str:
    text = pem_path.read_text()
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(text)).hexdigest()


def _request(port: int, method: str, path: str, *, ctx: ssl.SSLContext | None, body: Any = None,
             headers: dict[str, str] | None = None, source: str | None = None, host: str = "localhost"
             ) -> tuple[int, dict[str, str], bytes]:
    h = dict(headers or {})
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        h["Content-Type"] = "application/json"
    src = (source, 0) if source else None
    conn: http.client.HTTPConnection
    if ctx is not None:
        conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=15, source_address=src)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=15, source_address=src)
    # "localhost" may resolve to ::1 first; the listener and the sources are IPv4.
    raw = socket.create_connection(("127.0.0.1", port), timeout=15, source_address=src)
    conn.sock = ctx.wrap_socket(raw, server_hostname=host) if ctx is not None else raw
    try:
        conn.request(method, path, body=data, headers=h)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def tls_server(module_db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    data_dir = tmp_path_factory.mktemp("tls")
    made = _cert_cli(data_dir, "--hosts", "localhost,127.0.0.1", "--no-host")
    assert made.returncode == 0, made.stderr
    redirect_port = _free_port()
    srv = ServerProcess(data_dir, env={
        "DATABASE_URL": module_db_url, "RETURNFEED_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "RETURNFEED_HTTP__REDIRECT_PORT": str(redirect_port),
        "RETURNFEED_HTTP__TRUSTED_PROXIES": f"{PROXY_ADDR}/32",
        "RETURNFEED_AUTH__LOGIN_FAILURES_PER_IP": "2",
        "RETURNFEED_HTTP__MAX_CONNECTIONS_PER_IP": "3",
    })
    srv.start()
    try:
        yield {"srv": srv, "port": srv.port, "redirect_port": redirect_port, "data_dir": data_dir,
               "ca": data_dir / "tls" / "ca.crt", "cert_output": made.stdout}
    finally:
        srv.stop()


def _login(env: dict[str, Any]) -> str:
    status, _, body = _request(env["port"], "POST", "/api/v1/auth/login",
                               ctx=_client_context(env["ca"]), body={"username": "admin", "password": ADMIN_PASSWORD})
    assert status == 200, body
    return json.loads(body)["access_token"]


def test_https_with_the_generated_ca_and_hsts(tls_server) -> None:
    env = tls_server
    ctx = _client_context(env["ca"])
    assert any("ReturnFeed is running: https://" in line for line in env["srv"].output)
    status, headers, body = _request(env["port"], "GET", "/healthz", ctx=ctx)
    assert status == 200 and json.loads(body)["status"] == "ok"
    # RFC 6797: a year, no includeSubDomains by default.
    assert headers["strict-transport-security"] == "max-age=31536000"
    # The certificate is valid for the IP literal too (SAN iPAddress).
    status, _, _ = _request(env["port"], "GET", "/healthz", ctx=ctx, host="127.0.0.1")
    assert status == 200
    # Without the CA the handshake fails: the certificate is really checked.
    with pytest.raises(ssl.SSLCertVerificationError):
        _request(env["port"], "GET", "/healthz", ctx=ssl.create_default_context())
    # Plain HTTP on the HTTPS port gets no answer it could use.
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        _request(env["port"], "GET", "/healthz", ctx=None)


def test_aiohttp_client_over_https_and_wss(tls_server) -> None:
    env = tls_server
    token = _login(env)
    ctx = _client_context(env["ca"])
    base = f"https://localhost:{env['port']}"

    async def run() -> None:
        connector = aiohttp.TCPConnector(ssl=ctx, family=socket.AF_INET)
        async with aiohttp.ClientSession(connector=connector) as session:
            async with session.post(f"{base}/api/v1/productions", json={"name": "TLS show"},
                                    headers={"Authorization": f"Bearer {token}"}) as resp:
                assert resp.status == 201
                pid = (await resp.json())["id"]
            async with session.ws_connect(f"wss://localhost:{env['port']}/ws/tally?production={pid}&token={token}") as ws:
                msg = await ws.receive_json(timeout=10)
                assert msg["type"] == "snapshot"

    asyncio.run(run())


def test_sighup_reload_keeps_open_websocket(tls_server) -> None:
    env = tls_server
    token = _login(env)
    ctx = _client_context(env["ca"])
    cert_file = env["data_dir"] / "tls" / "server.crt"
    old = _leaf_sha256(env["port"], ctx)
    assert old == _file_sha256(cert_file)

    async def run() -> None:
        connector = aiohttp.TCPConnector(ssl=ctx, family=socket.AF_INET)
        async with aiohttp.ClientSession(connector=connector) as session:
            async with session.post(f"https://localhost:{env['port']}/api/v1/productions", json={"name": "Reload"},
                                    headers={"Authorization": f"Bearer {token}"}) as resp:
                pid = (await resp.json())["id"]
            async with session.ws_connect(f"wss://localhost:{env['port']}/ws/tally?production={pid}&token={token}") as ws:
                assert (await ws.receive_json(timeout=10))["type"] == "snapshot"
                # Renew (same CA, new key) and tell the server.
                renewed = await asyncio.to_thread(_cert_cli, env["data_dir"], "--hosts", "localhost,127.0.0.1",
                                                  "--no-host")
                assert renewed.returncode == 0 and "local CA (reused)" in renewed.stdout
                os.kill(env["srv"].proc.pid, signal.SIGHUP)
                new = _file_sha256(cert_file)
                assert new != old
                await asyncio.to_thread(wait_until, lambda: _leaf_sha256(env["port"], ctx) == new, 10)
                # The socket opened before the reload still carries messages both ways.
                await ws.send_json({"type": "ping", "id": 1})
                deadline = time.monotonic() + 10
                while True:
                    msg = await ws.receive_json(timeout=max(0.1, deadline - time.monotonic()))
                    if msg["type"] == "pong":
                        break
                assert not ws.closed

    asyncio.run(run())
    assert any("tls.reloaded" in line for line in env["srv"].output)


def test_bad_certificate_on_reload_keeps_the_old(tls_server) -> None:
    env = tls_server
    ctx = _client_context(env["ca"])
    tls = env["data_dir"] / "tls"
    cert_file, key_file = tls / "server.crt", tls / "server.key"
    good_cert, good_key = cert_file.read_bytes(), key_file.read_bytes()
    serving = _leaf_sha256(env["port"], ctx)
    failures_before = sum("tls.reload_failed" in line for line in env["srv"].output)
    try:
        # A key that is not the certificate's: the pair is refused.
        other = env["data_dir"] / "other"
        assert _cert_cli(other, "--hosts", "localhost", "--no-host").returncode == 0
        key_file.write_bytes((other / "tls" / "server.key").read_bytes())
        os.kill(env["srv"].proc.pid, signal.SIGHUP)
        wait_until(lambda: sum("tls.reload_failed" in line for line in env["srv"].output) > failures_before, 10)
        assert _leaf_sha256(env["port"], ctx) == serving
        # Garbage instead of a certificate: same.
        key_file.write_bytes(good_key)
        cert_file.write_text("not a certificate\n")
        os.kill(env["srv"].proc.pid, signal.SIGHUP)
        wait_until(lambda: sum("tls.reload_failed" in line for line in env["srv"].output) > failures_before + 1, 10)
        status, _, _ = _request(env["port"], "GET", "/healthz", ctx=ctx)
        assert status == 200 and _leaf_sha256(env["port"], ctx) == serving
    finally:
        cert_file.write_bytes(good_cert)
        key_file.write_bytes(good_key)


def test_redirect_port(tls_server) -> None:
    env = tls_server
    rport, port = env["redirect_port"], env["port"]
    status, headers, _ = _request(rport, "GET", "/watch/cam1?token=a%2Bb&x=1", ctx=None, headers={"Host": f"localhost:{rport}"})
    # RFC 9110 §15.4.9: 308 keeps the method and body; path and query kept as sent.
    assert status == 308
    assert headers["location"] == f"https://localhost:{port}/watch/cam1?token=a%2Bb&x=1"
    status, headers, _ = _request(rport, "POST", "/whip/cam1", ctx=None, body={}, headers={"Host": f"192.0.2.9:{rport}"})
    assert status == 308 and headers["location"] == f"https://192.0.2.9:{port}/whip/cam1"
    # Health checks and the CA answer on plain HTTP, without HSTS (RFC 6797 §7.2).
    status, headers, body = _request(rport, "GET", "/healthz", ctx=None)
    assert status == 200 and json.loads(body)["status"] == "ok"
    # A Host header that is no host: 400, not a redirect built from it.
    status, _, body = _request(rport, "GET", "/", ctx=None, headers={"Host": "[bad:host"})
    assert status == 400 and json.loads(body)["error"] == "bad_request"
    assert "strict-transport-security" not in headers
    status, headers, body = _request(rport, "GET", "/ca.crt", ctx=None)
    assert status == 200 and body == env["ca"].read_bytes()


def test_local_ca_download_and_fingerprint(tls_server) -> None:
    env = tls_server
    ctx = _client_context(env["ca"])
    status, headers, body = _request(env["port"], "GET", "/ca.crt", ctx=ctx)
    assert status == 200 and headers["content-type"] == "application/x-x509-ca-cert"
    assert body == env["ca"].read_bytes()
    status, _, body = _request(env["port"], "GET", "/ca.json", ctx=ctx)
    summary = json.loads(body)
    der_sha = hashlib.sha256(ssl.PEM_cert_to_DER_cert(env["ca"].read_text())).hexdigest().upper()
    assert summary["fingerprint_sha256"].replace(":", "") == der_sha
    # The same fingerprint the operator saw in `returnfeed cert`'s output.
    assert summary["fingerprint_sha256"] in env["cert_output"]


def test_links_and_qr_urls_are_https(tls_server) -> None:
    env = tls_server
    token = _login(env)
    ctx = _client_context(env["ca"])
    auth = {"Authorization": f"Bearer {token}"}
    status, _, body = _request(env["port"], "POST", "/api/v1/productions", ctx=ctx, body={"name": "Links"},
                               headers=auth)
    pid = json.loads(body)["id"]
    status, _, body = _request(env["port"], "POST", "/api/v1/streams", ctx=ctx,
                               body={"name": "tlscam", "production": pid}, headers=auth)
    assert status == 201, body
    status, _, body = _request(env["port"], "POST", "/api/v1/streams/tlscam/links", ctx=ctx,
                               body={"action": "publish"}, headers=auth)
    link = json.loads(body)
    assert link["camera_url"].startswith(f"https://localhost:{env['port']}/camera/tlscam?")
    assert link["whip_url"].startswith("https://")


def _failed_login(env: dict[str, Any], *, source: str, xff: str | None) -> int:
    headers = {"X-Forwarded-For": xff} if xff else {}
    status, _, _ = _request(env["port"], "POST", "/api/v1/auth/login", ctx=_client_context(env["ca"]),
                            body={"username": "nobody", "password": "wrong-password"}, headers=headers, source=source)
    return status


def test_trusted_proxy_chain_and_spoofed_header(tls_server) -> None:
    env, out = tls_server, tls_server["srv"].output
    # From the trusted proxy: the client is the rightmost untrusted hop.
    assert _failed_login(env, source=PROXY_ADDR, xff="198.51.100.99, 203.0.113.7") == 401
    wait_until(lambda: any("auth.login_failed" in ln and "203.0.113.7" in ln for ln in out), 10)
    # From anyone else the header is ignored: the TCP peer is the client.
    assert _failed_login(env, source=STRANGER_ADDR, xff="203.0.113.50") == 401
    wait_until(lambda: any("auth.login_failed" in ln and STRANGER_ADDR in ln for ln in out), 10)
    assert not any("203.0.113.50" in ln for ln in out)
    # The rate limit (2 failures per address here) is keyed by that address:
    # 203.0.113.7 reaches it, another client behind the same proxy does not.
    assert _failed_login(env, source=PROXY_ADDR, xff="203.0.113.7") == 401
    assert _failed_login(env, source=PROXY_ADDR, xff="203.0.113.7") == 429
    assert _failed_login(env, source=PROXY_ADDR, xff="203.0.113.8") == 401
    # A spoofing stranger cannot use someone else's budget either way.
    assert _failed_login(env, source=STRANGER_ADDR, xff="203.0.113.8") == 401
    assert _failed_login(env, source=STRANGER_ADDR, xff="203.0.113.8") == 429
    assert _failed_login(env, source=PROXY_ADDR, xff="203.0.113.9") == 401


def test_connection_cap_spares_the_trusted_proxy(tls_server) -> None:
    """Every client behind a proxy shares its address: the per-address cap
    (3 here) holds for other addresses, not for the trusted proxy."""
    env = tls_server
    ctx = _client_context(env["ca"])

    def hold(source: str) -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", env["port"]), timeout=10, source_address=(source, 0))
        return ctx.wrap_socket(raw, server_hostname="localhost")

    held = [hold(PROXY_ADDR) for _ in range(5)]
    try:
        status, _, _ = _request(env["port"], "GET", "/healthz", ctx=ctx, source=PROXY_ADDR)
        assert status == 200
        held += [hold(STRANGER_ADDR) for _ in range(3)]
        extra = hold(STRANGER_ADDR)
        extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        answer = extra.recv(4096)
        extra.close()
        assert answer.startswith(b"HTTP/1.1 503") and b"too_many_connections" in answer
    finally:
        for sock in held:
            sock.close()
