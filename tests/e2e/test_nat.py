"""The server behind a NAT that publishes only its ports, every client on the
public side (ReturnFeed issue 14, "Tests").

tests/natnet.py builds the three namespaces::

    server 10.77.0.2 ── NAT (10.77.0.1 | 203.0.113.1) ── client 203.0.113.2
                        DNAT tcp/8443 (HTTPS, WSS), udp/8890 (SRT),
                        udp/8189 + tcp/8189 (ICE); masquerade out; drop the rest

One server for the module, in the server namespace, with its own embedded
PostgreSQL (a Unix socket inside its data dir: no TCP, so it works in a
namespace whose only route leads to the NAT), HTTPS from ``returnfeed cert
--hosts 203.0.113.1`` and WebRTC configured as behind a 1:1 NAT: one ICE
port (8189, UDP and TCP), the NAT's public address announced in place of
the host's own (``ice_announce_mode = "replace"``). Every peer runs in the
client namespace, which has no route to 10/8: what works, works through the
NAT's published ports. Chromium (inside, driven by Playwright over a pipe)
trusts the certificate by its SPKI hash, as tests/e2e/test_tls_camera.py
does; the test's own API calls verify it against the generated CA.

Checked: an SRT caller publishes through the NAT; the watch page plays it
over WHEP (frames decoded, the selected pair's remote candidate is the
announced address and the one ICE port); the camera page is a secure
context (getUserMedia, wake lock), publishes over WHIP and gets a CUT over
WSS; every WHIP/WHEP answer lists only the announced address and the one
ICE port, no candidate twice; with UDP dropped between client and NAT the
watch page plays over ICE-TCP (passive, RFC 6544) on the same port number.
The namespaces (and with them every rule)
are removed when the module ends, also after a failure, and leftovers of a
crashed run at its start.
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from helpers import (CHROMIUM, CHROMIUM_ARGS, FAKE_MEDIA_ARGS, ServerProcess, ffmpeg_publish, grant_wake_lock,
                     launched_chromium, stop_process, track_pcs_script, wait_until)
from natnet import CLIENT_ADDR, PUBLIC_ADDR, SERVER_ADDR, NatNetwork, Published, netns_unavailable, remove_leftovers
from netns import module_network
from test_tls_camera import PHONE, _spki_sha256

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
ADMIN_PASSWORD = "admin-password-1"
HTTPS_PORT = 8443
SRT_PORT = 8890
ICE_PORT = 8189
PUBLISHED = (Published("tcp", HTTPS_PORT), Published("udp", SRT_PORT), Published("udp", ICE_PORT),
             Published("tcp", ICE_PORT))
BASE = f"https://{PUBLIC_ADDR}:{HTTPS_PORT}"
# The server's configuration as behind a 1:1 NAT (issue 14, "ICE on one UDP port").
CONFIG = f"""
[http]
tls = "on"

[webrtc]
ice_udp_port = {ICE_PORT}
ice_announce = ["{PUBLIC_ADDR}"]
ice_announce_mode = "replace"
ice_tcp = true
ice_tcp_port = {ICE_PORT}
"""

# Every RTCPeerConnection a page makes (the pages own theirs), and the text of
# every WHIP/WHEP answer it receives (a POST's 201 body, read from a clone in
# the page itself: Playwright's response events come asynchronously and may
# miss a body the page has already consumed).
TRACK_PCS = track_pcs_script("__natPcs") + """
(() => { const nativeFetch = window.fetch; window.__natAnswers = [];
  window.fetch = async (input, init) => {
    const res = await nativeFetch(input, init);
    const url = String(input && input.url || input);
    const post = ((init && init.method) || 'GET').toUpperCase() === 'POST';
    if (post && (url.includes('/whip/') || url.includes('/whep/')) && res.status === 201)
      window.__natAnswers.push(await res.clone().text());
    return res;
  };
})();"""

# The newest open peer connection's selected candidate pair and its inbound video.
PAIR_STATS = """async () => {
  const pcs = (window.__natPcs || []).filter((pc) => pc.connectionState !== 'closed');
  const pc = pcs[pcs.length - 1];
  if (!pc) return null;
  const byId = {}; const stats = await pc.getStats();
  stats.forEach((r) => { byId[r.id] = r; });
  let pair = null, video = null, sent = null;
  stats.forEach((r) => {
    if (r.type === 'transport' && r.selectedCandidatePairId) pair = byId[r.selectedCandidatePairId];
    if (r.type === 'inbound-rtp' && r.kind === 'video') video = r;
    if (r.type === 'outbound-rtp' && r.kind === 'video') sent = r;
  });
  const cand = (id) => { const c = id && byId[id];
    return c ? {address: c.address, port: c.port, protocol: c.protocol, type: c.candidateType} : null; };
  return {state: pc.connectionState, framesDecoded: video ? (video.framesDecoded || 0) : 0,
          framesSent: sent ? (sent.framesSent || 0) : 0,
          remote: pair ? cand(pair.remoteCandidateId) : null, local: pair ? cand(pair.localCandidateId) : null};
}"""


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def net() -> Iterator[NatNetwork]:
    with module_network(NatNetwork.for_this_process(PUBLISHED), netns_unavailable, remove_leftovers) as network:
        yield network


@pytest.fixture(scope="module")
def server(net: NatNetwork) -> Iterator[dict[str, Any]]:
    # Not under pytest's basetemp: every pytest run of the machine's user
    # resets pytest-of-<user> to 0700, which locks the embedded PostgreSQL's
    # user (returnfeed-pg, when the server runs as root) out of its socket.
    data_dir = Path(tempfile.mkdtemp(prefix="rfx-srv-"))
    srv: ServerProcess | None = None
    try:
        config = data_dir / "returnfeed.toml"
        config.write_text(CONFIG)
        # `returnfeed cert` inside the server's namespace: its own addresses
        # (the private one) plus the public one the clients use.
        cert = subprocess.run(net.command(net.server, [
            sys.executable, "-m", "server.cli", "cert", "--config", str(config), "--data-dir", str(data_dir),
            "--hosts", PUBLIC_ADDR]), cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert cert.returncode == 0, cert.stderr
        tls = data_dir / "tls"
        # ServerProcess puts test servers on an ephemeral ICE port (they
        # share the host's namespace); this one has a namespace of its own
        # and the NAT forwards the fixed port.
        srv = ServerProcess(data_dir, env={"RETURNFEED_ADMIN_PASSWORD": ADMIN_PASSWORD,
                                           "RETURNFEED_WEBRTC__ICE_UDP_PORT": str(ICE_PORT)},
                            args=["--config", str(config), "--http-port", str(HTTPS_PORT),
                                  "--srt-port", str(SRT_PORT)])
        # Started from a thread inside the server namespace: its child is there.
        net.call(net.server, lambda: srv.start(timeout=110))
        assert any("https://" in line and "ReturnFeed is running" in line for line in srv.output), srv.output[-20:]
        yield {"srv": srv, "ca": tls / "ca.crt", "spki": _spki_sha256(tls / "server.crt")}
    finally:
        try:
            if srv is not None and srv.proc is not None:
                srv.stop()
        finally:
            shutil.rmtree(data_dir, ignore_errors=True)


class Client:
    """HTTPS API calls from the client namespace, through the NAT, verified
    against the generated CA (the certificate names 203.0.113.1)."""

    def __init__(self, net: NatNetwork, ca: Path) -> None:
        self.net = net
        self.ctx = ssl.create_default_context(cafile=str(ca))
        self.token = ""

    def __call__(self, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
        token = token if token is not None else self.token
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(BASE + path, method=method, headers=headers,
                                     data=json.dumps(body).encode() if body is not None else None)

        def send() -> Any:
            with urllib.request.urlopen(req, context=self.ctx, timeout=15) as resp:
                return json.loads(resp.read() or b"null")

        return self.net.call(self.net.client, send, timeout=30)


@pytest.fixture(scope="module")
def stack(net: NatNetwork, server: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A production with cameras ``srtcam`` (fed by ffmpeg in the client
    namespace over SRT, through the NAT) and ``phone`` (for the camera page)."""
    api = Client(net, server["ca"])
    api.token = api("POST", "/api/v1/auth/login", {"username": "admin", "password": ADMIN_PASSWORD})["access_token"]
    pid = api("POST", "/api/v1/productions", {"name": "Behind NAT"})["id"]
    srt = api("POST", "/api/v1/streams", {"name": "srtcam", "production": pid})
    api("POST", "/api/v1/streams", {"name": "phone", "production": pid})
    source = net.call(net.client, lambda: ffmpeg_publish(srt["srt_url"], seconds=600, size="640x360"))
    try:
        yield {"api": api, "production": pid, "srt_url": srt["srt_url"], "source": source}
    finally:
        stop_process(source)


@pytest.fixture(scope="module")
def chromium(net: NatNetwork, server: dict[str, Any]) -> Iterator[Any]:
    """Chromium inside the client namespace (``ip netns exec`` wrapper;
    Playwright's pipe crosses namespaces, a CDP port would not)."""
    args = [*CHROMIUM_ARGS, *FAKE_MEDIA_ARGS, f"--ignore-certificate-errors-spki-list={server['spki']}"]
    with launched_chromium(args, wrap=lambda d: net.wrapper(d, net.client, CHROMIUM)) as browser:
        yield browser


# ---------------------------------------------------------------- helpers

def candidates(sdp: str) -> list[list[tuple[str, str, int, str]]]:
    """Per media section, (component, transport, port, address) of each
    ``a=candidate`` line (RFC 8839 §5.1: foundation component transport
    priority address port typ …). With BUNDLE every section repeats the one
    transport's candidates (RFC 8843 §7.1.3), so a duplicate is one within a
    section."""
    sections: list[list[tuple[str, str, int, str]]] = []
    for line in sdp.splitlines():
        if line.startswith("m="):
            sections.append([])
        elif line.startswith("a=candidate:") and sections:
            f = line[len("a=candidate:"):].split()
            sections[-1].append((f[1], f[2].lower(), int(f[5]), f[4]))
    return sections


def assert_only_announced(sdp: str) -> None:
    """Only the announced address and the one ICE port, UDP (and passive
    TCP), no candidate twice."""
    sections = candidates(sdp)
    cands = [c for section in sections for c in section]
    assert cands, sdp
    assert {c[3] for c in cands} == {PUBLIC_ADDR}, cands
    assert {c[2] for c in cands} == {ICE_PORT}, cands
    assert "udp" in {c[1] for c in cands}, cands
    for section in sections:
        assert len(section) == len(set(section)), f"duplicate candidates: {section}"
    assert SERVER_ADDR not in sdp, sdp


def answers(page: Any) -> list[str]:
    """The WHIP/WHEP answers the page has received so far."""
    return page.evaluate("window.__natAnswers")


def watch(chromium: Any, stack: dict[str, Any], stream: str = "srtcam") -> tuple[Any, Any]:
    """A fresh /watch page on ``stream``; returns (context, page)."""
    link = stack["api"]("POST", f"/api/v1/streams/{stream}/links", {"action": "read"})
    assert link["watch_url"].startswith(f"{BASE}/"), link["watch_url"]
    ctx = chromium.new_context()
    page = ctx.new_page()
    page.add_init_script(TRACK_PCS)
    page.goto(link["watch_url"])
    return ctx, page


def playing(page: Any, timeout: float = 30) -> dict[str, Any]:
    """Stats once the page has decoded frames for a while."""
    last: list[Any] = [None]

    def decoded() -> dict[str, Any] | None:
        st = last[0] = page.evaluate(PAIR_STATS)
        return st if st and st["framesDecoded"] > 25 and st["remote"] else None

    try:
        return wait_until(decoded, timeout=timeout, interval=0.5)
    except AssertionError:
        raise AssertionError(f"no playback in {timeout} s; last stats {last[0]}, "
                             f"page: {page.text_content('body')[:500]!r}") from None


# ---------------------------------------------------------------- tests

def test_the_nat_publishes_only_its_ports(net: NatNetwork, server: dict[str, Any]) -> None:
    """The harness: the client reaches the server only through the public
    address's published ports; what the server opens leaves masqueraded."""

    def listen() -> tuple[socket.socket, socket.socket]:
        tcp = socket.create_server(("0.0.0.0", 9443))
        tcp.settimeout(3)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("0.0.0.0", 9189))
        udp.settimeout(1)
        return tcp, udp

    tcp, udp = net.call(net.server, listen)
    before = net.counters()

    def from_client() -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, addr in (("published", (PUBLIC_ADDR, HTTPS_PORT)), ("unpublished", (PUBLIC_ADDR, 9443)),
                           ("private", (SERVER_ADDR, HTTPS_PORT))):
            try:
                socket.create_connection(addr, timeout=2).close()
                out[name] = "connected"
            except OSError as exc:
                out[name] = type(exc).__name__
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.sendto(b"unpublished", (PUBLIC_ADDR, 9189))
        probe.close()
        back = socket.create_server(("0.0.0.0", 7000))
        back.settimeout(5)
        out["back"] = back
        return out

    reach = net.call(net.client, from_client)
    try:
        assert reach["published"] == "connected", reach
        assert reach["unpublished"] != "connected" and reach["private"] != "connected", reach
        with pytest.raises(socket.timeout):
            udp.recvfrom(100)
        after = net.counters()
        assert after["input-dropped"] >= before.get("input-dropped", 0) + 2, (before, after)
        # The server's outbound connection arrives from the NAT's public address.
        net.call(net.server, lambda: socket.create_connection((CLIENT_ADDR, 7000), timeout=3).close())
        conn, peer = reach["back"].accept()
        conn.close()
        assert peer[0] == PUBLIC_ADDR, peer
    finally:
        for s in (tcp, udp, reach["back"]):
            s.close()


def test_srt_caller_publishes_through_the_nat(stack: dict[str, Any]) -> None:
    # The API hands out the SRT URL of the host it was asked on: the public one.
    assert stack["srt_url"].startswith(f"srt://{PUBLIC_ADDR}:{SRT_PORT}?"), stack["srt_url"]
    api = stack["api"]

    def live() -> dict[str, Any] | None:
        body = api("GET", "/api/v1/streams/srtcam")
        kinds = {t["kind"] for t in body.get("tracks", [])}
        return body if body.get("live") and kinds >= {"video", "audio"} else None

    try:
        body = wait_until(live, timeout=30, interval=0.5)
    except AssertionError:
        err = stack["source"].stderr.read1(4000).decode(errors="replace") if stack["source"].poll() is not None else ""
        pytest.fail(f"srtcam did not go live through the NAT in 30 s; ffmpeg: {err}")
    assert body["tracks"], body


def test_watch_page_plays_whep_through_the_nat(chromium: Any, stack: dict[str, Any]) -> None:
    wait_until(lambda: stack["api"]("GET", "/api/v1/streams/srtcam").get("live"), timeout=30, interval=0.5)
    ctx, page = watch(chromium, stack)
    try:
        st = playing(page)
        # The pair that carries the media: the announced address, the one ICE
        # port, UDP, reached at its published port through the DNAT.
        assert st["remote"]["address"] == PUBLIC_ADDR and st["remote"]["port"] == ICE_PORT, st
        assert st["remote"]["protocol"] == "udp", st
        sdps = answers(page)
        assert sdps, "no WHEP answer recorded"
        for sdp in sdps:
            assert_only_announced(sdp)
    finally:
        ctx.close()


def test_camera_page_publishes_and_gets_tally_over_wss(chromium: Any, stack: dict[str, Any]) -> None:
    api, pid = stack["api"], stack["production"]
    link = api("POST", "/api/v1/streams/phone/links", {"action": "publish"})
    assert link["camera_url"].startswith(f"{BASE}/camera/phone?"), link["camera_url"]
    ctx = chromium.new_context(**PHONE, permissions=["camera", "microphone"])
    try:
        page = ctx.new_page()
        grant_wake_lock(ctx, page, BASE)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.add_init_script(TRACK_PCS)
        page.goto(link["camera_url"])
        assert page.evaluate("window.isSecureContext") is True
        assert page.evaluate("""async () => {
            const s = await navigator.mediaDevices.getUserMedia({ video: true, audio: true });
            const kinds = s.getTracks().map((t) => t.kind).sort().join(',');
            s.getTracks().forEach((t) => t.stop());
            const lock = await navigator.wakeLock.request('screen');
            const ok = lock.type === 'screen' && !lock.released;
            await lock.release();
            return kinds === 'audio,video' && ok;
        }""") is True
        # Tally over WSS through the NAT: a CUT to this camera turns it red.
        page.wait_for_function("() => ['off', 'preview', 'program'].includes(document.body.dataset.tally)",
                               timeout=15000)
        api("POST", f"/api/v1/productions/{pid}/tally", {"type": "cut", "source": "srtcam"})
        api("POST", f"/api/v1/productions/{pid}/tally", {"type": "cut", "source": "phone"})
        page.wait_for_function("() => document.body.dataset.tally === 'program'", timeout=10000)
        # "Send my camera": WHIP through the NAT, the stream goes live.
        page.click("#btn-send")
        wait_until(lambda: api("GET", "/api/v1/streams/phone").get("live"), timeout=30, interval=0.5)
        st = wait_until(lambda: (s := page.evaluate(PAIR_STATS)) and s["framesSent"] > 25 and s["remote"] and s,
                        timeout=20, interval=0.5)
        assert st["remote"]["address"] == PUBLIC_ADDR and st["remote"]["port"] == ICE_PORT, st
        sdps = answers(page)
        assert sdps, "no WHIP answer recorded"
        for sdp in sdps:
            assert_only_announced(sdp)
        page.click("#btn-send")
        assert not errors, errors
    finally:
        ctx.close()


def test_ice_tcp_when_udp_is_blocked(net: NatNetwork, chromium: Any, stack: dict[str, Any]) -> None:
    # Blocking UDP would cut srtcam's SRT too: this stream comes from an
    # encoder on the server's side of the NAT (its loopback).
    api = stack["api"]
    lan = api("POST", "/api/v1/streams", {"name": "lancam", "production": stack["production"]})
    url = lan["srt_url"].replace(f"srt://{PUBLIC_ADDR}:", "srt://127.0.0.1:")
    source = net.call(net.server, lambda: ffmpeg_publish(url, seconds=300, size="640x360"))
    net.block_udp(True)
    try:
        wait_until(lambda: api("GET", "/api/v1/streams/lancam").get("live"), timeout=30, interval=0.5)
        ctx, page = watch(chromium, stack, "lancam")
        try:
            st = playing(page, timeout=45)
            assert st["remote"]["protocol"] == "tcp", st
            assert st["remote"]["address"] == PUBLIC_ADDR and st["remote"]["port"] == ICE_PORT, st
            sdps = answers(page)
            assert sdps, "no WHEP answer recorded"
            for sdp in sdps:
                assert_only_announced(sdp)
                assert ("1", "tcp", ICE_PORT, PUBLIC_ADDR) in candidates(sdp)[0], sdp
            dropped = net.counters()
            assert dropped.get("udp-in", 0) + dropped.get("udp-out", 0) > 0, dropped  # UDP was tried and dropped
        finally:
            ctx.close()
    finally:
        net.block_udp(False)
        stop_process(source)
