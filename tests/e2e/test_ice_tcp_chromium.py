"""WHEP playback and WHIP publishing over ICE-TCP only: Chromium in a
network namespace whose UDP to and from the server is dropped, so the only
path that can work is a TCP connection to the server's passive candidate
(RFC 6544)::

    server (root ns, ICE-TCP on)  ── veth 10.213.x.1/30 ──►  namespace rfn-t<pid>: Chromium
                                                             nft: drop UDP to/from .1

The watch page plays the stream (frames decoded) and the camera page's
fake camera goes live; in both the selected candidate pair's local candidate
is TCP on Chromium's side, and the server counts the connections. The namespace, veth pair and nft table are removed when the
module ends, also after a failure.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from helpers import (CHROMIUM, CHROMIUM_ARGS, FAKE_MEDIA_ARGS, ServerProcess, http, launched_chromium, live_stream,
                     metric_value, metrics_url, track_pcs_script, wait_until, watch_url)
from netns import ViewerNetwork, module_network

pytestmark = pytest.mark.browser

ADMIN_PASSWORD = "admin-password-1"
STREAM = "tcpcam"
NFT_TABLE = "rfn_icetcp"

TRACK_PCS = track_pcs_script()

# The newest peer connection's decoded video frames and the selected pair's
# candidates (RTCTransportStats.selectedCandidatePairId, W3C webrtc-stats §7).
PATH_STATS = """async () => {
  const pcs = (window.__rfnPcs || []).filter(pc => pc.connectionState !== 'closed');
  const pc = pcs[pcs.length - 1];
  if (!pc) return null;
  const stats = await pc.getStats();
  let frames = 0, pairId = null;
  stats.forEach(r => {
    if (r.type === 'inbound-rtp' && r.kind === 'video') frames = r.framesDecoded || 0;
    if (r.type === 'transport' && r.selectedCandidatePairId) pairId = r.selectedCandidatePairId;
  });
  const pair = pairId ? stats.get(pairId) : null;
  const local = pair ? stats.get(pair.localCandidateId) : null;
  const remote = pair ? stats.get(pair.remoteCandidateId) : null;
  return {frames, state: pc.connectionState,
          local: local ? {protocol: local.protocol, tcpType: local.tcpType || null} : null,
          remote: remote ? {protocol: remote.protocol, address: remote.address, port: remote.port,
                            type: remote.candidateType} : null};
}"""


# The publishing peer connection (the one sending video) and its selected pair.
PUBLISH_STATS = """async () => {
  for (const pc of (window.__rfnPcs || []).filter(pc => pc.connectionState !== 'closed')) {
    const stats = await pc.getStats();
    let sent = 0, pairId = null;
    stats.forEach(r => {
      if (r.type === 'outbound-rtp' && r.kind === 'video') sent += r.packetsSent || 0;
      if (r.type === 'transport' && r.selectedCandidatePairId) pairId = r.selectedCandidatePairId;
    });
    if (!sent) continue;
    const pair = pairId ? stats.get(pairId) : null;
    const local = pair ? stats.get(pair.localCandidateId) : null;
    return {sent, local: local ? {protocol: local.protocol} : null};
  }
  return null;
}"""


def _nft(namespace: str, script: str) -> None:
    subprocess.run(["ip", "netns", "exec", namespace, "nft", "-f", "-"], input=script, text=True,
                   check=True, capture_output=True, timeout=30)


def block_udp(net: ViewerNetwork) -> None:
    """Drop every UDP datagram between the namespace and the server's veth
    address, both ways (its own table; the namespace's removal deletes it)."""
    _nft(net.namespace, f"""table inet {NFT_TABLE} {{
  chain from_server {{
    type filter hook input priority -300; policy accept;
    ip saddr {net.host_addr} meta l4proto udp counter drop
  }}
  chain to_server {{
    type filter hook output priority -300; policy accept;
    ip daddr {net.host_addr} meta l4proto udp counter drop
  }}
}}
""")


def udp_dropped(net: ViewerNetwork) -> int:
    out = subprocess.run(["ip", "netns", "exec", net.namespace, "nft", "list", "table", "inet", NFT_TABLE],
                         text=True, capture_output=True, timeout=30).stdout
    return sum(int(line.split("counter packets")[1].split()[0]) for line in out.splitlines()
               if "counter packets" in line)


@pytest.fixture(scope="module")
def net() -> Iterator[ViewerNetwork]:
    with module_network(ViewerNetwork(f"t{os.getpid()}")) as viewer:
        block_udp(viewer)
        yield viewer


@pytest.fixture(scope="module")
def stack(net: ViewerNetwork, e2e_db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    srv = ServerProcess(tmp_path_factory.mktemp("srv"), env={
        "DATABASE_URL": e2e_db_url, "RETURNFEED_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "RETURNFEED_WEBRTC__ICE_TCP": "true", "RETURNFEED_WEBRTC__ICE_TCP_PORT": "0"})
    srv.start()
    with live_stream(srv, ADMIN_PASSWORD, "TCP", STREAM, seconds=300) as token:
        base = f"http://{net.host_addr}:{srv.port}"
        yield {"server": srv, "base": base, "token": token, "watch_url": watch_url(base, STREAM, token)}


@pytest.fixture(scope="module")
def ns_browser(net: ViewerNetwork, stack: dict) -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.skip("no system Chromium")
    with launched_chromium([*CHROMIUM_ARGS, *FAKE_MEDIA_ARGS,
                            f"--unsafely-treat-insecure-origin-as-secure={stack['base']}"],
                           wrap=lambda d: net.wrapper(d, CHROMIUM)) as browser:
        yield browser


def test_whep_plays_over_ice_tcp_when_udp_is_blocked(net: ViewerNetwork, stack: dict, ns_browser: Any) -> None:
    # The harness first: UDP from the namespace to the server really is gone.
    probe = subprocess.run(["ip", "netns", "exec", net.namespace, "python3", "-c",
                            "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM);"
                            f"s.sendto(b'x', ('{net.host_addr}', 9))"],
                           capture_output=True, text=True, timeout=30)
    assert probe.returncode != 0 and "Operation not permitted" in probe.stderr, probe

    page = ns_browser.new_page()
    page.add_init_script(TRACK_PCS)
    try:
        page.goto(stack["watch_url"])
        last: dict | None = None
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline:
            last = page.evaluate(PATH_STATS)
            if last and last["frames"] > 10 and last["local"] is not None:
                break
            time.sleep(0.5)
        assert last is not None and last["frames"] > 10, f"no video decoded over ICE-TCP: {last}"
        # Chromium's side of the selected pair is its active TCP candidate,
        # and the server's side the passive one at its veth address.
        assert last["local"]["protocol"] == "tcp", last
        assert last["remote"]["protocol"] == "tcp" and last["remote"]["address"] == net.host_addr, last
        assert udp_dropped(net) > 0  # Chromium did try UDP first, and it went nowhere

        # An egress worker reports its handed-over connections and its
        # packet counts every 0.5 s: the figures may trail the picture by a
        # report, more on a busy machine, and the first report with the
        # connection open may come before its first media packet (the DTLS
        # handshake) — so wait for one report that shows both.
        def open_connection_counted() -> str | None:
            text = http("GET", metrics_url(stack["server"].url)).body.decode()
            both = (metric_value(text, "returnfeed_webrtc_ice_tcp_connections") >= 1
                    and metric_value(text, "returnfeed_webrtc_packets_sent_total") > 0)
            return text if both else None

        metrics = wait_until(open_connection_counted, timeout=10, interval=0.2)
        assert metric_value(metrics, "returnfeed_webrtc_ice_tcp_accepted_total") >= 1
    finally:
        page.close()

    def closed() -> bool:
        text = http("GET", metrics_url(stack["server"].url)).body.decode()
        return metric_value(text, "returnfeed_webrtc_ice_tcp_connections") == 0

    # Leaving the page ends the session and its TCP connection.
    wait_until(closed, timeout=30, interval=0.5)


def test_whip_camera_publishes_over_ice_tcp_when_udp_is_blocked(net: ViewerNetwork, stack: dict,
                                                                ns_browser: Any) -> None:
    srv, token = stack["server"], stack["token"]
    r = http("POST", f"{srv.url}/api/v1/streams", {"name": "tcppub", "production": "TCP"}, token=token)
    assert r.status == 201, r.body
    link = http("POST", f"{stack['base']}/api/v1/streams/tcppub/links", {"action": "publish"}, token=token)
    assert link.status == 201, link.body
    ctx = ns_browser.new_context(permissions=["camera", "microphone"])
    try:
        page = ctx.new_page()
        page.add_init_script(TRACK_PCS)
        page.goto(link.json()["camera_url"])
        page.click("#btn-send")
        wait_until(lambda: http("GET", f"{srv.url}/api/v1/streams/tcppub", token=token).json().get("live"),
                   timeout=45, interval=0.5)
        last = None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            last = page.evaluate(PUBLISH_STATS)
            if last and last["local"] is not None and last["sent"] > 50:
                break
            time.sleep(0.5)
        assert last is not None and last["local"] is not None, last
        assert last["local"]["protocol"] == "tcp", last
    finally:
        ctx.close()
