"""Real Chromium plays WHEP through the server's one ICE UDP port, on the
loopback candidate only (webrtc.ice_host_addresses = ["127.0.0.1"]: before
the mux, aioice never offered loopback)."""

from __future__ import annotations

import asyncio

import pytest

from helpers import ServerProcess, ffmpeg_publish, http, login, stop_process, wait_live

pytestmark = pytest.mark.browser

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--autoplay-policy=no-user-gesture-required", "--disable-features=WebRtcHideLocalIpsWithMdns"]

PLAY = """async ([url, token]) => {
  const pc = new RTCPeerConnection();
  pc.addTransceiver('video', {direction: 'recvonly'});
  pc.addTransceiver('audio', {direction: 'recvonly'});
  const v = document.createElement('video'); v.muted = true; v.autoplay = true; document.body.appendChild(v);
  pc.ontrack = e => { v.srcObject = e.streams[0] || new MediaStream([e.track]); };
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise(r => { if (pc.iceGatheringState === 'complete') r();
    pc.onicegatheringstatechange = () => pc.iceGatheringState === 'complete' && r(); setTimeout(r, 2000); });
  const res = await fetch(url, {method: 'POST', body: pc.localDescription.sdp,
    headers: {'Content-Type': 'application/sdp', 'Authorization': 'Bearer ' + token}});
  const answer = await res.text();
  if (res.status !== 201) return {status: res.status, body: answer};
  await pc.setRemoteDescription({type: 'answer', sdp: answer});
  window._pc = pc;
  return {status: 201, answer};
}"""

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
    from playwright.async_api import async_playwright

    srv = ServerProcess(tmp_path_factory.mktemp("muxchrome"), env={
        "DATABASE_URL": module_db_url, "RETURNFEED_ADMIN_PASSWORD": "muxchrome-admin",
        "RETURNFEED_WEBRTC__ICE_HOST_ADDRESSES": '["127.0.0.1"]'}).start()
    proc = None
    try:
        base = srv.url
        admin = login(base, "admin", "muxchrome-admin")["access_token"]
        assert http("POST", f"{base}/api/v1/productions", {"name": "MuxChrome"}, token=admin).status == 201
        r = http("POST", f"{base}/api/v1/streams", {"name": "muxc", "production": "MuxChrome"}, token=admin)
        assert r.status == 201, r.body
        url = r.json()["srt_url"].replace(":8890?", f":{srv.srt_port}?").replace(":0?", f":{srv.srt_port}?")
        proc = ffmpeg_publish(url, seconds=60)
        wait_live(base, "muxc", admin)

        async def play() -> tuple[dict, list[dict]]:
            async with async_playwright() as p:
                browser = await p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
                try:
                    page = await browser.new_page()
                    await page.goto(base + "/healthz")
                    started = await page.evaluate(PLAY, [f"{base}/whep/muxc", admin])
                    assert started["status"] == 201, started
                    samples = []
                    for _ in range(5):
                        await asyncio.sleep(1)
                        samples.append(await page.evaluate(STATS))
                    return started, samples
                finally:
                    await browser.close()

        started, samples = asyncio.run(play())
    finally:
        if proc is not None:
            stop_process(proc)
        srv.stop()
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
