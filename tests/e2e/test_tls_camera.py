"""The camera page over HTTPS on an address that is not loopback — the case
of a phone on a LAN — with the server's certificate from `returnfeed cert`.

Chromium treats ``localhost`` and 127/8 as secure even over plain HTTP, so
the page is opened on this machine's first non-loopback IPv4 address (the
listener is on 0.0.0.0), or, on a machine without one, on a host name that
``--host-resolver-rules`` maps to 127.0.0.1 (a name is judged by the URL,
not by where it resolves). The certificate is trusted the way a test can
without touching the system store: ``--ignore-certificate-errors-spki-list``
with its public key's SHA-256. Checked: ``isSecureContext``, getUserMedia
(fake devices) and the screen wake lock succeed, "Send my camera" makes the
stream live over WHIP, and a CUT arrives over WSS.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import ssl
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from helpers import CHROMIUM_ARGS, FAKE_MEDIA_ARGS, ServerProcess, grant_wake_lock, launched_chromium, wait_until

pytestmark = pytest.mark.browser

ADMIN_PASSWORD = "admin-password-1"
PHONE = {"viewport": {"width": 390, "height": 844}, "device_scale_factor": 2, "is_mobile": True, "has_touch": True}
FALLBACK_NAME = "returnfeed-e2e.lan"


def _lan_host() -> tuple[str, list[str]]:
    """A host for the page's URL that Chromium does not treat as loopback,
    and the Chromium flags it needs."""
    from server.certs import host_addresses

    for addr in host_addresses():
        if addr.version == 4:
            return str(addr), []
    return FALLBACK_NAME, [f"--host-resolver-rules=MAP {FALLBACK_NAME} 127.0.0.1"]


def _spki_sha256(cert_pem: Path) -> str:
    cert = x509.load_pem_x509_certificate(cert_pem.read_bytes())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


# A TURN server with coturn's shared secret (nothing listens there: Chromium's
# relay gathering gives up and the session goes over host candidates).
TURN_URL = "turn:127.0.0.1:9?transport=udp"
ICE_SERVERS = json.dumps([{"urls": TURN_URL, "secret": "e2e-turn-static-auth-secret", "ttl_s": 600}])
# Every RTCPeerConnection's configuration, in creation order.
RECORD_PC_CONFIGS = """(() => { const Orig = window.RTCPeerConnection; window.__pcConfigs = [];
  window.RTCPeerConnection = class extends Orig {
    constructor(config, ...rest) { super(config, ...rest); window.__pcConfigs.push(JSON.parse(JSON.stringify(config || {}))); } };
})();"""


@pytest.fixture(scope="module")
def https_server(e2e_db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from server.certs import make_local_certificates

    host, flags = _lan_host()
    data_dir = tmp_path_factory.mktemp("tls-e2e")
    made = make_local_certificates(data_dir, [host, "127.0.0.1"], include_host=False)
    srv = ServerProcess(data_dir, env={"DATABASE_URL": e2e_db_url, "RETURNFEED_ADMIN_PASSWORD": ADMIN_PASSWORD,
                                       "RETURNFEED_WEBRTC__ICE_SERVERS": ICE_SERVERS})
    srv.start()
    ctx = ssl.create_default_context(cafile=str(made.ca_cert))
    ctx.check_hostname = False  # reached by 127.0.0.1; the Host header names the LAN host
    try:
        yield {"srv": srv, "host": host, "flags": flags, "base": f"https://{host}:{srv.port}",
               "local": f"https://127.0.0.1:{srv.port}", "ctx": ctx, "spki": _spki_sha256(made.server_cert)}
    finally:
        srv.stop()


def _api(env: dict[str, Any], method: str, path: str, body: Any = None, token: str | None = None) -> Any:
    headers = {"Host": f"{env['host']}:{env['srv'].port}", "Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(env["local"] + path, method=method, headers=headers,
                                 data=json.dumps(body).encode() if body is not None else None)
    with urllib.request.urlopen(req, context=env["ctx"], timeout=15) as resp:
        return json.loads(resp.read() or b"null")


@pytest.fixture(scope="module")
def chromium(https_server: dict[str, Any]) -> Iterator[Any]:
    args = [*CHROMIUM_ARGS, *FAKE_MEDIA_ARGS, *https_server["flags"],
            f"--ignore-certificate-errors-spki-list={https_server['spki']}"]
    with launched_chromium(args) as browser:
        yield browser


def test_camera_page_is_a_secure_context_over_https(chromium, https_server) -> None:
    env = https_server
    token = _api(env, "POST", "/api/v1/auth/login", {"username": "admin", "password": ADMIN_PASSWORD})["access_token"]
    pid = _api(env, "POST", "/api/v1/productions", {"name": "HTTPS show"}, token)["id"]
    for name in ("cam1", "cam2"):
        _api(env, "POST", "/api/v1/streams", {"name": name, "production": pid}, token)
    link = _api(env, "POST", "/api/v1/streams/cam1/links", {"action": "publish"}, token)
    # The link (and the control room's QR code) carries the HTTPS URL of the host the API was asked on.
    assert link["camera_url"].startswith(f"{env['base']}/camera/cam1?"), link["camera_url"]

    ctx = chromium.new_context(**PHONE, permissions=["camera", "microphone"])
    try:
        page = ctx.new_page()
        grant_wake_lock(ctx, page, env["base"])
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.add_init_script(RECORD_PC_CONFIGS)
        page.goto(link["camera_url"])
        assert page.evaluate("location.protocol") == "https:"
        assert page.evaluate("window.isSecureContext") is True
        tracks = page.evaluate("""async () => {
            const s = await navigator.mediaDevices.getUserMedia({ video: true, audio: true });
            const kinds = s.getTracks().map((t) => t.kind).sort();
            s.getTracks().forEach((t) => t.stop());
            return kinds;
        }""")
        assert tracks == ["audio", "video"]
        assert page.evaluate("""async () => {
            const lock = await navigator.wakeLock.request("screen");
            const ok = lock.type === "screen" && !lock.released;
            await lock.release();
            return ok;
        }""") is True
        # The page's own wake lock and its tally socket (wss://, same port).
        page.wait_for_function("() => document.getElementById('status-line').textContent.includes('Screen: stays on')",
                               timeout=10000)
        page.wait_for_function("() => ['off', 'preview', 'program'].includes(document.body.dataset.tally)",
                               timeout=15000)
        _api(env, "POST", f"/api/v1/productions/{pid}/tally", {"type": "cut", "source": "cam2"}, token)
        _api(env, "POST", f"/api/v1/productions/{pid}/tally", {"type": "cut", "source": "cam1"}, token)
        page.wait_for_function("() => document.body.dataset.tally === 'program'", timeout=10000)
        # "Send my camera": getUserMedia → WHIP over HTTPS → the stream is live.
        page.click("#btn-send")
        wait_until(lambda: _api(env, "GET", "/api/v1/streams/cam1", token=token).get("live"), timeout=30,
                   interval=0.25)
        # RFC 9725 §4.6: the publisher asked for its ICE servers (OPTIONS with
        # its publish link) before its first peer connection, so the one that
        # went live already had the TURN relay with credentials minted for
        # cam1 (the answer's Link headers alone would only serve a retry).
        # The return feed's reads with this publish link get no TURN
        # credentials: read is not publish.
        configs = page.evaluate("window.__pcConfigs")
        assert configs, "no RTCPeerConnection was made"
        turn = [srv for c in configs for srv in c.get("iceServers", []) if srv.get("urls") == TURN_URL]
        assert turn, configs
        assert all(re.fullmatch(r"\d+:cam1", t["username"]) and t["credential"] for t in turn), turn
        page.click("#btn-send")
        assert not errors, errors
    finally:
        ctx.close()


def test_landing_page_offers_the_local_ca(chromium, https_server) -> None:
    env = https_server
    ca = _api(env, "GET", "/ca.json")
    ctx = chromium.new_context(**PHONE)
    try:
        page = ctx.new_page()
        page.goto(env["base"] + "/")
        page.wait_for_selector("#local-ca:not([hidden])", timeout=10000)
        assert page.text_content("#ca-fingerprint") == ca["fingerprint_sha256"]
        assert page.get_attribute("#local-ca a[href='/ca.crt']", "download") == "returnfeed-ca.crt"
    finally:
        ctx.close()
