"""The README's nginx and Caddy configurations, taken from README.md as
written, in front of a real server with ``http.trusted_proxies``: WHIP
signalling (POST, PATCH, DELETE, OPTIONS; Location, ETag and Link headers),
WHEP's 409 + Retry-After, ``/ws/tally`` upgraded and carrying messages, the
API's URLs in https with the proxy's host and port, and client addresses —
what a client writes into X-Forwarded-For never becomes its address.

Only the site's address, certificate paths and upstream port are changed
(and nginx's pid and temp files moved into the test's directory)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import pytest

from helpers import ROOT, ServerProcess, wait_until

pytestmark = pytest.mark.integration

ADMIN_PASSWORD = "admin-password-1"
#: The test's own address towards the proxy: not a trusted one.
CLIENT_ADDR = "127.0.0.3"
STUN = "stun:127.0.0.1:3478"


def _readme_block(lang: str) -> str:
    text = (ROOT / "README.md").read_text()
    found = re.findall(rf"```{lang}\n(.*?)```", text, re.S)
    assert len(found) == 1, f"README.md should have one {lang} block"
    return found[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def backend(module_db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(tmp_path_factory.mktemp("proxied"), env={
        "DATABASE_URL": module_db_url, "RETURNFEED_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "RETURNFEED_HTTP__HOST": "127.0.0.1", "RETURNFEED_HTTP__TLS": "off",
        "RETURNFEED_HTTP__TRUSTED_PROXIES": "127.0.0.1/32",
        "RETURNFEED_WEBRTC__ICE_SERVERS": json.dumps([{"urls": STUN}]),
    })
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def _wait_listening(port: int, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"proxy exited: {proc.stdout.read() if proc.stdout else ''}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("proxy did not listen")


def _start_nginx(tmp: Path, port: int, upstream: int, cert: Path, key: Path) -> subprocess.Popen:
    if shutil.which("nginx") is None:
        pytest.skip("nginx not installed (the bootstrap installs it)")
    site = (_readme_block("nginx")
            .replace("listen 443 ssl;", f"listen 127.0.0.1:{port} ssl;")
            .replace("server_name feeds.example.com;", "server_name localhost;")
            .replace("/etc/ssl/feeds.example.com/fullchain.pem", str(cert))
            .replace("/etc/ssl/feeds.example.com/privkey.pem", str(key))
            .replace("http://127.0.0.1:8080", f"http://127.0.0.1:{upstream}"))
    temps = "\n".join(f"    {name}_temp_path {tmp / name};" for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf = tmp / "nginx.conf"
    conf.write_text(f"pid {tmp / 'nginx.pid'};\nerror_log {tmp / 'error.log'};\nevents {{}}\n"
                    f"http {{\n    access_log off;\n{temps}\n{site}\n}}\n")
    return subprocess.Popen(["nginx", "-c", str(conf), "-g", "daemon off;"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _start_caddy(tmp: Path, port: int, upstream: int, cert: Path, key: Path) -> subprocess.Popen:
    if shutil.which("caddy") is None:
        pytest.skip("caddy not installed (the bootstrap installs it)")
    site = (_readme_block("caddyfile")
            .replace("feeds.example.com {", f"https://localhost:{port} {{\n\ttls {cert} {key}", 1)
            .replace("127.0.0.1:8080", f"127.0.0.1:{upstream}"))
    caddyfile = tmp / "Caddyfile"
    caddyfile.write_text("{\n\tadmin off\n\tauto_https disable_redirects\n}\n\n" + site)
    env = {**os.environ, "HOME": str(tmp), "XDG_DATA_HOME": str(tmp / "data"), "XDG_CONFIG_HOME": str(tmp / "cfg")}
    return subprocess.Popen(["caddy", "run", "--config", str(caddyfile), "--adapter", "caddyfile"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.fixture(scope="module", params=["nginx", "caddy"])
def proxy(request: pytest.FixtureRequest, backend: ServerProcess,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from server.certs import make_local_certificates

    tmp = tmp_path_factory.mktemp(request.param)
    made = make_local_certificates(tmp, ["localhost"], include_host=False)
    port = _free_port()
    start = _start_nginx if request.param == "nginx" else _start_caddy
    proc = start(tmp, port, backend.port, made.server_cert, made.server_key)
    try:
        _wait_listening(port, proc)
        yield {"name": request.param, "port": port, "base": f"https://localhost:{port}",
               "ca": made.ca_cert, "backend": backend}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


def _session(px: dict[str, Any]) -> aiohttp.ClientSession:
    ctx = ssl.create_default_context(cafile=str(px["ca"]))
    connector = aiohttp.TCPConnector(ssl=ctx, family=socket.AF_INET, local_addr=(CLIENT_ADDR, 0))
    return aiohttp.ClientSession(connector=connector)


async def _offer() -> str:
    from aiortc import RTCPeerConnection

    pc = RTCPeerConnection()
    pc.addTransceiver("audio", direction="sendonly")
    pc.addTransceiver("video", direction="sendonly")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


def test_whip_whep_websocket_and_addresses_through_the_proxy(proxy) -> None:
    px, out = proxy, proxy["backend"].output
    base = px["base"]

    async def run() -> None:
        async with _session(px) as http:
            async with http.get(f"{base}/healthz") as r:
                assert r.status == 200
            # A forged X-Forwarded-For is prepended to, never believed.
            forged = "203.0.113.66" if px["name"] == "nginx" else "203.0.113.67"
            async with http.post(f"{base}/api/v1/auth/login", json={"username": "x", "password": "wrong-password"},
                                 headers={"X-Forwarded-For": forged}) as r:
                assert r.status == 401
            await asyncio.to_thread(wait_until, lambda: any(
                "auth.login_failed" in ln and f"ip={CLIENT_ADDR}" in ln for ln in out), 10)
            assert not any(forged in ln for ln in out)
            async with http.post(f"{base}/api/v1/auth/login",
                                 json={"username": "admin", "password": ADMIN_PASSWORD}) as r:
                assert r.status == 200
                token = (await r.json())["access_token"]
            auth = {"Authorization": f"Bearer {token}"}
            async with http.post(f"{base}/api/v1/productions", json={"name": f"Proxy {px['name']}"},
                                 headers=auth) as r:
                pid = (await r.json())["id"]
            stream = f"px-{px['name']}"
            async with http.post(f"{base}/api/v1/streams", json={"name": stream, "production": pid},
                                 headers=auth) as r:
                assert r.status == 201
                created = await r.json()
            # X-Forwarded-Proto and the Host with its port reach the URLs the API returns.
            assert created["whip_url"].startswith(f"https://localhost:{px['port']}/whip/{stream}")

            # WHEP: not live → 409 with Retry-After passed through.
            async with http.post(f"{base}/whep/{stream}", data=await _offer(),
                                 headers={**auth, "Content-Type": "application/sdp"}) as r:
                assert r.status == 409 and r.headers.get("Retry-After")
            # WHIP: OPTIONS, POST → 201 + Location/ETag/Link, PATCH, DELETE.
            async with http.options(f"{base}/whip/{stream}", headers={
                    "Origin": "https://phone.example", "Access-Control-Request-Method": "POST"}) as r:
                assert r.status == 204 and "Location" in r.headers["Access-Control-Expose-Headers"]
            offer = await _offer()
            async with http.post(f"{base}/whip/{stream}", data=offer,
                                 headers={**auth, "Content-Type": "application/sdp"}) as r:
                assert r.status == 201, await r.text()
                location, etag = r.headers["Location"], r.headers["ETag"]
                links = r.headers.getall("Link", [])
                assert (await r.text()).startswith("v=0")
            assert location.startswith(f"/whip/{stream}/") and etag
            assert any(STUN in link and 'rel="ice-server"' in link for link in links), links
            # A trickled candidate (RFC 8840) with the offer's own credentials.
            ufrag = re.search(r"a=ice-ufrag:(\S+)", offer).group(1)
            pwd = re.search(r"a=ice-pwd:(\S+)", offer).group(1)
            frag = (f"a=ice-ufrag:{ufrag}\r\na=ice-pwd:{pwd}\r\na=mid:0\r\n"
                    "a=candidate:1 1 udp 2122260223 127.0.0.1 9 typ host\r\n")
            async with http.patch(base + location, data=frag, headers={
                    **auth, "Content-Type": "application/trickle-ice-sdpfrag", "If-Match": etag}) as r:
                assert r.status == 204, (r.status, await r.text())
            async with http.delete(base + location, headers=auth) as r:
                assert r.status == 200
            async with http.delete(base + location, headers=auth) as r:
                assert r.status == 404

            # /ws/tally through the proxy: upgraded, both directions.
            async with http.ws_connect(f"wss://localhost:{px['port']}/ws/tally?production={pid}&token={token}") as ws:
                assert (await ws.receive_json(timeout=10))["type"] == "snapshot"
                await ws.send_json({"type": "ping", "id": 5})
                deadline = time.monotonic() + 10
                while (await ws.receive_json(timeout=max(0.1, deadline - time.monotonic())))["type"] != "pong":
                    pass

    asyncio.run(run())
