"""Real Chromium plays WHEP through the server's one ICE UDP port, on the
loopback candidate only (webrtc.ice_host_addresses = ["127.0.0.1"]: before
the mux, aioice never offered loopback)."""

from __future__ import annotations

import asyncio

import pytest

from helpers import CHROMIUM_ARGS, ServerProcess, chromium_whep_samples, live_stream

pytestmark = pytest.mark.browser

# The selected pair's remote candidate is the server's side of the path.
STATS = """async () => { const s = await window._pc.getStats(); const out = {framesDecoded: 0, remote: null};
  let pairId = null;
  s.forEach(r => { if (r.type === 'transport' && r.selectedCandidatePairId) pairId = r.selectedCandidatePairId; });
  s.forEach(r => {
    if (r.type === 'inbound-rtp' && r.kind === 'video') out.framesDecoded = r.framesDecoded || 0;
    if (r.type === 'candidate-pair' && r.id === pairId) {
      const rc = s.get(r.remoteCandidateId);
      out.remote = {address: rc.address || rc.ip, port: rc.port, protocol: rc.protocol, type: rc.candidateType}; } });
  return out; }"""


def test_chromium_plays_whep_through_the_shared_port(module_db_url, tmp_path_factory) -> None:
    srv = ServerProcess(tmp_path_factory.mktemp("muxchrome"), env={
        "DATABASE_URL": module_db_url, "RETURNFEED_ADMIN_PASSWORD": "muxchrome-admin",
        "RETURNFEED_WEBRTC__ICE_HOST_ADDRESSES": '["127.0.0.1"]'}).start()
    with live_stream(srv, "muxchrome-admin", "MuxChrome", "muxc", seconds=60) as admin:
        started, samples = asyncio.run(chromium_whep_samples(srv.url, "muxc", admin, 5, STATS, CHROMIUM_ARGS))
    cands = [ln.split() for ln in started["answer"].splitlines() if ln.startswith("a=candidate:")]
    ports = {int(c[5]) for c in cands}
    assert {c[4] for c in cands} == {"127.0.0.1"} and len(ports) == 1, cands
    last = samples[-1]
    print("chromium via the ICE mux:", samples)
    assert last["framesDecoded"] >= 50, samples  # 25 fps for the last seconds
    remote = last["remote"]
    # Our checks start as soon as we answer, so they often reach Chromium
    # before its answer is applied: it then knows our side as peer-reflexive
    # (and hides a prflx address in getStats); the port says it all.
    assert (remote["port"], remote["protocol"]) == (ports.pop(), "udp"), last
    assert remote["type"] in ("host", "prflx") and remote["address"] in ("127.0.0.1", ""), last
