"""Third-party WHIP/WHEP peers against the real server (issue 10, items 7, 8, 10, 11).

Nobody here wrote these peers:

* ffmpeg n9.0.2's WHIP muxer, from the ``imageio-ffmpeg`` wheel
  (``-f whip``, ``-whip_flags dtls_active``, the token in the URL);
* in Chromium: ``@eyevinn/webrtc-player`` (WHEP), ``@eyevinn/whip-web-client``
  (WHIP) and medooze ``whip-whep`` (WHEP), pinned in ``config/peers/``,
  installed and bundled by ``config/bootstrap.sh`` into ``.peers/`` and
  served to the page by Playwright (``page.route``), never from ``web/``.

What each test holds the server to:

* a session opened with ``?token=`` is ended by the peer itself through its
  ``Location`` (ffmpeg's DELETE when it stops, the players' unload/destroy),
  which nobody else can (item 7);
* both of ffmpeg's DTLS modes and the browser publisher connect, with the
  answer's ``a=setup`` the role that lets the peer's own handshake timing
  lead (item 10; the connect times are measured by
  ``loadtests/whip_connect.py``);
* a High-profile WHIP source reaches a Chromium viewer under a High-capable
  payload type, never Constrained Baseline, and the WHIP log says what the
  publisher sends (item 11);
* a player joining a one-keyframe stream (ffmpeg ``-c copy``, whose offer
  has ``nack`` but not ``nack pli``) late plays at once and never stalls,
  and one joining a browser publisher (which accepts PLI and sends no
  periodic keyframes) starts at a fresh keyframe (item 8).

Third-party WHEP players give up on 409, so they are opened after the stream
is live (REFERENCES.md).
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from helpers import ffmpeg_publish, http, login, stop_process, wait_live, wait_until
from media.webrtc.sdp import h264_profile

pytestmark = [pytest.mark.integration, pytest.mark.browser]

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / ".peers" / "peers.bundle.js"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--autoplay-policy=no-user-gesture-required", "--disable-features=WebRtcHideLocalIpsWithMdns",
                 "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]

PAGE = ("<!doctype html><html><body><video id=v muted autoplay playsinline></video>"
        "<script src='/__peers__/peers.bundle.js'></script></body></html>")

# Keeps every RTCPeerConnection the third-party code creates, for getStats().
RECORD_PCS = """(() => { const Orig = window.RTCPeerConnection; window.__pcs = [];
  window.RTCPeerConnection = class extends Orig {
    constructor(...args) { super(...args); window.__pcs.push(this); } }; })();"""

VIDEO_STATS = """async () => { for (const pc of window.__pcs) { for (const r of (await pc.getStats()).values()) {
  if (r.type === 'inbound-rtp' && r.kind === 'video') return {framesDecoded: r.framesDecoded || 0,
    keyFramesDecoded: r.keyFramesDecoded || 0, freezeCount: r.freezeCount || 0, pliCount: r.pliCount || 0,
    nackCount: r.nackCount || 0, packetsLost: r.packetsLost || 0, frameWidth: r.frameWidth || 0,
    state: pc.connectionState}; } } return null; }"""


@pytest.fixture(scope="session")
def ffmpeg9() -> str:
    try:
        import imageio_ffmpeg
    except ImportError:
        pytest.skip("imageio-ffmpeg not installed (pip install -e '.[test]')")
    exe = imageio_ffmpeg.get_ffmpeg_exe()
    out = subprocess.run([exe, "-hide_banner", "-h", "muxer=whip"], capture_output=True, text=True).stdout
    assert "dtls_active" in out, "this ffmpeg has no WHIP muxer with dtls_active"
    return exe


@pytest.fixture(scope="session")
def bundle() -> str:
    if not BUNDLE.exists():
        pytest.skip("third-party WHIP/WHEP peers not installed (bash config/bootstrap.sh setup)")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no system Chromium at {CHROMIUM} (CI installs it)")
    return BUNDLE.read_text()


@pytest.fixture(scope="module")
def env(api_server) -> dict[str, Any]:
    base = api_server.url
    admin = login(base, "admin", api_server.admin_password)["access_token"]
    r = http("POST", f"{base}/api/v1/productions", {"name": "Peers show"}, token=admin)
    assert r.status == 201, r.body
    production = r.json()["id"]

    def stream(name: str) -> None:
        assert http("POST", f"{base}/api/v1/streams", {"name": name, "production": production},
                    token=admin).status == 201

    def srt_url(name: str) -> str:
        r = http("GET", f"{base}/api/v1/streams/{name}", token=admin)
        url = r.json()["srt_url"]
        return re.sub(r":(8890|0)\?", f":{api_server.srt_port}?", url)

    def link(name: str, action: str) -> str:
        r = http("POST", f"{base}/api/v1/streams/{name}/links", {"action": action}, token=admin)
        assert r.status == 201, r.body
        return r.json()["token"]

    return {"base": base, "admin": admin, "stream": stream, "link": link, "srt_url": srt_url, "server": api_server}


def ffmpeg_whip(exe: str, url: str, *, seconds: float, flags: list[str] | None = None,
                source: list[str] | None = None, video: list[str] | None = None) -> subprocess.Popen:
    """ffmpeg 9 publishing over WHIP (verbose: its log has the answer and the handshake times)."""
    src = source or ["-re", "-f", "lavfi", "-i", "testsrc2=size=640x360:rate=25",
                     "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000"]
    enc = video or ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-preset", "veryfast", "-tune", "zerolatency",
                    "-g", "50", "-b:v", "800k", "-c:a", "libopus", "-b:a", "64k", "-ac", "2"]
    cmd = [exe, "-nostdin", "-hide_banner", "-loglevel", "verbose", *src, "-t", str(seconds), *enc,
           *(flags or []), "-f", "whip", url]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 60) -> str:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process(proc)
        _, err = proc.communicate()
    return err


def log_lines(env: dict[str, Any], event: str, session: str | None = None) -> list[str]:
    return [ln for ln in list(env["server"].output) if f" {event} " in ln and (session is None or session in ln)]


def session_id(location: str) -> str:
    return location.rstrip("/").rsplit("/", 1)[1].split(".", 1)[0]


# --------------------------------------------------------------------------
# ffmpeg 9 WHIP
# --------------------------------------------------------------------------


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["default", "dtls_active"])
def test_ffmpeg9_whip_with_token_in_url_connects_and_deletes_its_own_session(env, ffmpeg9, mode) -> None:
    name = f"ff-{mode.replace('_', '')}"
    env["stream"](name)
    token = env["link"](name, "publish")
    flags = ["-whip_flags", "dtls_active"] if mode == "dtls_active" else []
    proc = ffmpeg_whip(ffmpeg9, f"{env['base']}/whip/{name}?token={token}", seconds=6, flags=flags)
    try:
        wait_live(env["base"], name, env["admin"], timeout=30)
    finally:
        err = finish(proc)
    assert proc.returncode == 0, err[-2000:]
    # ffmpeg offers a=setup:passive by default (it is the DTLS server) and
    # a=setup:active with dtls_active; the answer takes the other role.
    answer = err[err.index("answer: v=0"):]
    assert ("a=setup:active" if mode == "default" else "a=setup:passive") in answer
    assert re.search(r"Muxer state=10,.*dtls:[\d.]+", err), err[-2000:]
    # Its DELETE went to the Location as it was (the token is not repeated
    # there): the session URL's capability opened it.
    location = re.search(r"location=(\S+),", err).group(1)
    assert re.fullmatch(rf"http://127\.0\.0\.1:\d+/whip/{name}/[\w-]+\.[\w-]+", location)
    sid = session_id(location)
    deleted = wait_until(lambda: log_lines(env, "whip.deleted", sid), timeout=10)
    assert "who='session key'" in deleted[0]
    # The WHIP log states what ffmpeg sends (x264's default High profile).
    session_log = log_lines(env, "whip.session", sid)[0]
    assert "publisher sends high" in session_log and "lacks" not in session_log
    publishing = log_lines(env, "whip.publishing", sid)[0]
    assert f"dtls_role={'client' if mode == 'default' else 'server'}" in publishing


def test_session_capability_opens_only_its_own_session(env, ffmpeg9) -> None:
    """The capability works for its session and nothing else; a session
    opened with a bearer header gets no capability in its URL."""
    name = "ff-cap"
    env["stream"](name)
    base, token = env["base"], env["link"](name, "publish")
    proc = ffmpeg_whip(ffmpeg9, f"{base}/whip/{name}?token={token}", seconds=20)
    try:
        wait_live(base, name, env["admin"], timeout=30)
        viewer = env["link"](name, "read")
        offer = (ROOT / "tests" / "fixtures" / "sdp" / "chromium_whep_offer.sdp").read_bytes()
        r = http("POST", f"{base}/whep/{name}?token={viewer}", raw=offer, headers={"Content-Type": "application/sdp"})
        assert r.status == 201, r.body
        loc = r.headers["Location"]
        sid, key = loc.rsplit("/", 1)[1].split(".")
        other = http("POST", f"{base}/whep/{name}", raw=offer, token=viewer,
                     headers={"Content-Type": "application/sdp"})
        assert other.status == 201 and "." not in other.headers["Location"].rsplit("/", 1)[1]
        other_sid = session_id(other.headers["Location"])
        # Another session, with this key: refused; a forged key: refused; no
        # key and no token: 401.
        assert http("DELETE", f"{base}/whep/{name}/{other_sid}.{key}").status == 403
        assert http("DELETE", f"{base}/whep/{name}/{sid}.{key[:-2]}AA").status == 403
        assert http("DELETE", f"{base}/whep/{name}/{sid}").status == 401
        assert http("DELETE", f"{base}/whep/{name}/{sid}", token=env["link"](name, "read")).status == 403
        # The key is bound to the stream in the path, too.
        assert http("DELETE", f"{base}/whep/ff-default/{sid}.{key}").status == 404
        assert http("GET", base + loc).status == 200
        assert http("PATCH", base + loc, raw=b"a=end-of-candidates\r\n",
                    headers={"Content-Type": "application/trickle-ice-sdpfrag"}).status == 204
        assert http("DELETE", base + loc).status == 200
        assert http("DELETE", base + loc).status == 404
        assert http("DELETE", f"{base}/whep/{name}/{other_sid}", token=viewer).status == 200
        # Item 11: ffmpeg sends x264's High profile; a viewer offering only
        # Constrained Baseline is told why it cannot have it.
        only_cb = re.sub(rb"profile-level-id=(4d|f4)001f", b"profile-level-id=42e01f", offer)
        r = http("POST", f"{base}/whep/{name}", raw=only_cb, token=viewer, headers={"Content-Type": "application/sdp"})
        assert r.status == 422 and r.json()["error"] == "unprocessable", r.body
        assert "this stream is H.264 high" in r.json()["detail"] and "offered: baseline, constrained-baseline" \
            in r.json()["detail"]
    finally:
        stop_process(proc)


# --------------------------------------------------------------------------
# Chromium: Eyevinn's WHEP player and WHIP client, medooze's WHEP player
# --------------------------------------------------------------------------


async def _chromium(bundle: str, base: str, body: Any) -> Any:
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            await page.add_init_script(RECORD_PCS)

            async def serve(route: Any) -> None:
                if route.request.url.endswith("/peers.bundle.js"):
                    await route.fulfill(status=200, content_type="text/javascript", body=bundle)
                else:
                    await route.fulfill(status=200, content_type="text/html", body=PAGE)

            await page.route(f"{base}/__peers__/**", serve)
            await page.goto(f"{base}/__peers__/index.html")  # the server's origin: no CORS, secure context
            await page.wait_for_function("() => window.peers !== undefined")
            return await body(page)
        finally:
            await browser.close()


async def _video_stats(page: Any, seconds: float) -> list[dict]:
    samples = []
    for _ in range(int(seconds * 2)):
        await asyncio.sleep(0.5)
        samples.append(await page.evaluate(VIDEO_STATS))
    return samples


@pytest.mark.timeout(240)
def test_eyevinn_player_with_token_plays_high_profile_whip_source_and_deletes_its_session(env, ffmpeg9,
                                                                                           bundle) -> None:
    name = "eyevinn-high"
    env["stream"](name)
    base = env["base"]
    proc = ffmpeg_whip(ffmpeg9, f"{base}/whip/{name}", seconds=60,
                       flags=["-authorization", env["link"](name, "publish")],
                       video=["-c:v", "libx264", "-profile:v", "high", "-pix_fmt", "yuv420p", "-preset", "veryfast",
                              "-tune", "zerolatency", "-g", "50", "-b:v", "800k", "-an"],
                       source=["-re", "-f", "lavfi", "-i", "testsrc2=size=640x360:rate=25"])
    answers: list[str] = []

    async def body(page: Any) -> dict:
        async def on_response(resp: Any) -> None:
            if resp.request.method == "POST" and f"/whep/{name}" in resp.url and resp.status == 201:
                answers.append(await resp.text())

        page.on("response", on_response)
        await page.evaluate("""async (url) => {
          const player = new window.peers.WebRTCPlayer({video: document.getElementById('v'), type: 'whep',
                                                       timeoutThreshold: 60000});
          await player.load(new URL(url));
          window.__player = player; }""", f"{base}/whep/{name}?token={env['link'](name, 'read')}")
        samples = await _video_stats(page, 6)
        viewers = http("GET", f"{base}/api/v1/streams/{name}/viewers", token=env["admin"]).json()["viewers"]
        await page.evaluate("window.__player.unload()")
        return {"samples": samples, "viewers": viewers}

    try:
        info = wait_live(base, name, env["admin"], timeout=30)
        plid = next(t["profile_level_id"] for t in info["tracks"] if t["kind"] == "video")
        assert h264_profile(plid) == "high", info
        out = asyncio.run(_chromium(bundle, base, body))
        after = wait_until(lambda: not http("GET", f"{base}/api/v1/streams/{name}/viewers",
                                            token=env["admin"]).json()["viewers"] or None, timeout=10)
    finally:
        stop_process(proc)
    last = out["samples"][-1]
    assert last and last["framesDecoded"] > 50 and last["frameWidth"] == 640, out["samples"]
    # Item 11: the answer's H.264 profile decodes High; never Constrained Baseline.
    fmtp = re.findall(r"profile-level-id=([0-9a-fA-F]{6})", answers[0])
    assert fmtp and all(h264_profile(p) in ("high", "high-10", "high-422", "high-444") for p in fmtp), answers[0]
    assert plid[4:6] == fmtp[0][4:6].lower()  # and the source's level
    # Item 7: the player's DELETE (no Authorization header) reached its session.
    assert len(out["viewers"]) == 1 and after is True
    sid = out["viewers"][0]["id"]
    assert "who='session key'" in wait_until(lambda: log_lines(env, "whep.deleted", sid), timeout=10)[0]


@pytest.mark.timeout(240)
def test_eyevinn_whip_client_with_token_publishes_and_deletes_its_session(env, bundle) -> None:
    name = "eyevinn-whip"
    env["stream"](name)
    base = env["base"]
    url = f"{base}/whip/{name}?token={env['link'](name, 'publish')}"

    async def body(page: Any) -> dict:
        await page.evaluate("""async (url) => {
          const media = await navigator.mediaDevices.getUserMedia({video: {width: 640, height: 360}, audio: true});
          const client = new window.peers.EyevinnWHIPClient({endpoint: url,
            opts: {noTrickleIce: true, iceGatheringTimeout: 2000}});
          await client.ingest(media);
          window.__client = client; }""", url)
        live = await asyncio.to_thread(wait_live, base, name, env["admin"], 30)
        await asyncio.sleep(3)  # Chromium's encoder sends no periodic keyframes: the GOP grows
        await page.evaluate("""async ([url, token]) => {
          const pc = new RTCPeerConnection();
          pc.addTransceiver('video', {direction: 'recvonly'});
          pc.ontrack = (e) => { document.getElementById('v').srcObject = e.streams[0] || new MediaStream([e.track]); };
          await new window.peers.MedoozeWHEPClient().view(pc, url, token); }""",
                            [f"{base}/whep/{name}", env["link"](name, "read")])
        samples = await _video_stats(page, 4)
        source = (await asyncio.to_thread(http, "GET", f"{base}/api/v1/streams/{name}",
                                          token=env["admin"])).json()["source"]
        location = await page.evaluate("window.__client.getResourceUrl()")
        await page.evaluate("window.__client.destroy()")
        return {"live": live, "location": location, "samples": samples,
                "ingest": source["publishers"][0]["whip"]["stats"]}

    out = asyncio.run(_chromium(bundle, base, body))
    assert out["live"]["source"]["publishers"][0]["protocol"] == "whip"
    # Item 8, the other way: the browser's offer accepted ``nack pli`` and its
    # encoder sends no periodic keyframes, so a viewer joining seconds in got
    # a fresh keyframe (one PLI, sent and counted) instead of a replay.
    assert out["ingest"]["plis_sent"] >= 1 and out["ingest"]["keyframes"] >= 2, out["ingest"]
    decoded = [s["framesDecoded"] for s in out["samples"] if s]
    assert decoded and decoded[-1] > 0 and all(b > a for a, b in zip(decoded, decoded[1:])), out["samples"]
    assert out["samples"][-1]["pliCount"] == 0, out["samples"]
    assert re.fullmatch(rf"{re.escape(base)}/whip/{name}/[\w-]+\.[\w-]+", out["location"]), out["location"]
    sid = session_id(out["location"])
    assert "who='session key'" in wait_until(lambda: log_lines(env, "whip.deleted", sid), timeout=10)[0]
    # The browser offered actpass: the answer took the DTLS server role.
    assert "dtls_role=server" in log_lines(env, "whip.publishing", sid)[0]
    state = wait_until(lambda: (s := http("GET", f"{base}/api/v1/streams/{name}", token=env["admin"]).json())
                       ["state"] != "live" and s, timeout=10)
    assert state["state"] in ("reconnecting", "offline")


@pytest.mark.timeout(300)
def test_medooze_player_joins_one_keyframe_whip_stream_late_and_never_freezes(env, ffmpeg9, bundle,
                                                                                tmp_path) -> None:
    """Item 8: ffmpeg 9 WHIP ``-c copy`` of a clip with a single keyframe
    (its offer: ``nack`` but no ``nack pli``, so no fresh keyframe can be
    had); medooze's WHEP player joins 8 s in, when the cached GOP is seconds
    long. It must start at once and play on without a freeze or a PLI."""
    clip = tmp_path / "one-keyframe.mp4"
    subprocess.run([ffmpeg9, "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc2=size=640x360:rate=25",
                    "-t", "40", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-preset", "ultrafast", "-g", "100000",
                    "-keyint_min", "100000", "-sc_threshold", "0", "-bf", "0", "-b:v", "1500k", str(clip)],
                   check=True, timeout=120)
    name = "medooze-late"
    env["stream"](name)
    base = env["base"]
    proc = ffmpeg_whip(ffmpeg9, f"{base}/whip/{name}", seconds=40, flags=["-authorization", env["link"](name, "publish")],
                       source=["-re", "-i", str(clip)], video=["-c:v", "copy", "-an"])

    async def body(page: Any) -> dict:
        await page.evaluate("""async ([url, token]) => {
          const pc = new RTCPeerConnection();
          pc.addTransceiver('video', {direction: 'recvonly'});
          pc.ontrack = (e) => { document.getElementById('v').srcObject = e.streams[0] || new MediaStream([e.track]); };
          const whep = new window.peers.MedoozeWHEPClient();
          await whep.view(pc, url, token);
          window.__whep = whep; }""", [f"{base}/whep/{name}", env["link"](name, "read")])
        samples = await _video_stats(page, 8)
        await page.evaluate("window.__whep.stop()")
        source = (await asyncio.to_thread(http, "GET", f"{base}/api/v1/streams/{name}",
                                          token=env["admin"])).json()["source"]
        return {"samples": samples, "ingest": source["publishers"][0]["whip"]["stats"]}

    try:
        wait_live(base, name, env["admin"], timeout=30)
        joined_at = time.monotonic() + 8
        time.sleep(max(0.0, joined_at - time.monotonic()))
        out = asyncio.run(_chromium(bundle, base, body))
    finally:
        stop_process(proc)
    # The join asked for a keyframe; ffmpeg's offer did not accept PLI, so
    # none was sent (nor counted) and the viewer got the paced replay.
    assert out["ingest"]["keyframe_requests"] >= 1 and out["ingest"]["plis_sent"] == 0, out["ingest"]
    samples = [s for s in out["samples"] if s]
    assert samples, out
    # The stream has no keyframe after the first: decoding at all means the
    # viewer started from the replayed GOP.
    first = next(i for i, s in enumerate(samples) if s["framesDecoded"] > 0)
    last = samples[-1]
    assert last["keyFramesDecoded"] >= 1 and last["framesDecoded"] > samples[first]["framesDecoded"] + 50, samples
    # Never stuck: frames were decoded in every half second after the first
    # (the old burst stalled for 8 s+ on lost, unrecoverable packets), and the
    # player never had to ask for a picture.
    decoded = [s["framesDecoded"] for s in samples[first:]]
    assert all(b > a for a, b in zip(decoded, decoded[1:])), samples
    assert last["pliCount"] == 0 and last["packetsLost"] == 0, samples


@pytest.mark.timeout(240)
def test_eyevinn_player_joins_long_gop_srt_stream_late_and_never_stalls(env, bundle) -> None:
    """Item 8 for SRT (which cannot be asked for a keyframe): a 10 s GOP,
    Eyevinn's player joining 6 s in starts from the paced replay of the
    cached GOP at once (waiting for the next keyframe would leave it 4 s
    without a picture) and keeps decoding."""
    name = "srt-longgop"
    env["stream"](name)
    base = env["base"]
    proc = ffmpeg_publish(env["srt_url"](name), seconds=60, size="640x360", fps=25, bitrate="1500k", audio="none",
                          extra=["-g", "250", "-keyint_min", "250", "-sc_threshold", "0"])

    async def body(page: Any) -> dict:
        await page.evaluate("""async (url) => {
          const player = new window.peers.WebRTCPlayer({video: document.getElementById('v'), type: 'whep',
                                                       timeoutThreshold: 60000});
          await player.load(new URL(url));
          window.__player = player; }""", f"{base}/whep/{name}?token={env['link'](name, 'read')}")
        samples = await _video_stats(page, 5)
        await page.evaluate("window.__player.unload()")
        return {"samples": samples}

    try:
        wait_live(base, name, env["admin"], timeout=30)
        time.sleep(6)
        out = asyncio.run(_chromium(bundle, base, body))
    finally:
        stop_process(proc)
    samples = [s for s in out["samples"] if s]
    first = next(i for i, s in enumerate(samples) if s["framesDecoded"] > 0)
    decoded = [s["framesDecoded"] for s in samples[first:]]
    assert samples[first]["keyFramesDecoded"] >= 1 and decoded[-1] > decoded[0] + 50, samples
    assert all(b > a for a, b in zip(decoded, decoded[1:])), samples
    assert samples[-1]["pliCount"] == 0 and samples[-1]["packetsLost"] == 0, samples
