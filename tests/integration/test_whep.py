"""WHEP egress end to end: ffmpeg → SRT → server → aiortc / Chromium viewers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from helpers import aiortc_whep_receive, ffmpeg_publish, http, login, stop_process, wait_live, wait_until

pytestmark = pytest.mark.integration

OFFER = (Path(__file__).parent.parent / "fixtures" / "sdp" / "chromium_whep_offer.sdp").read_text()


@pytest.fixture(scope="module")
def env(api_server):
    base = api_server.url
    admin = login(base, "admin", api_server.admin_password)["access_token"]
    assert http("POST", f"{base}/api/v1/productions", {"name": "WHEP show"}, token=admin).status == 201
    streams = {}
    for name in ("live1", "idle1", "high1", "bframes1"):
        r = http("POST", f"{base}/api/v1/streams", {"name": name, "production": "WHEP show"}, token=admin)
        assert r.status == 201, r.body
        streams[name] = r.json()
    srt = lambda name: streams[name]["srt_url"].replace("localhost:8890", f"127.0.0.1:{api_server.srt_port}").replace(
        ":0?", f":{api_server.srt_port}?")
    procs = [ffmpeg_publish(srt("live1"), seconds=120)]
    try:
        wait_live(base, "live1", admin)
        yield {"base": base, "admin": admin, "streams": streams, "srt": srt, "server": api_server}
    finally:
        for p in procs:
            stop_process(p)


def _post(env, stream, body=OFFER, token=None, ctype="application/sdp", query=""):
    return http("POST", f"{env['base']}/whep/{stream}{query}", raw=body.encode() if isinstance(body, str) else body,
                token=token or env["admin"], headers={"Content-Type": ctype})


def test_http_errors(env) -> None:
    base = env["base"]
    assert http("POST", f"{base}/whep/live1", raw=OFFER.encode(), headers={"Content-Type": "application/sdp"}).status == 401
    r = _post(env, "live1", ctype="text/plain")
    assert r.status == 415 and r.json()["error"] == "unsupported_media_type"
    assert _post(env, "nosuchstream").status == 404
    r = _post(env, "idle1")
    assert r.status == 409 and int(r.headers["Retry-After"]) >= 1 and r.json()["error"] == "conflict"
    r = _post(env, "live1", body="v=0\r\nthis is not sdp\r\n")
    assert r.status == 400 and "SDP" in r.json()["detail"]
    r = _post(env, "live1", body=OFFER.split("m=video")[0])
    assert r.status == 400
    r = _post(env, "live1", body=OFFER + "a=x\r\n" * 40000)
    assert r.status == 413
    many = OFFER.replace("a=mid:0", "a=mid:0\r\n" + "a=candidate:1 1 udp 1 192.0.2.9 9 typ host\r\n" * 500)
    assert _post(env, "live1", body=many).status == 400
    r = _post(env, "live1", body=OFFER.replace("H264/90000", "H265/90000"))
    assert r.status == 422 and "H.264" in r.json()["detail"]


def test_options_head_cors(env) -> None:
    base = env["base"]
    r = http("OPTIONS", f"{base}/whep/live1")
    assert r.status == 204 and r.headers["Accept-Post"] == "application/sdp"
    r = http("OPTIONS", f"{base}/whep/live1", headers={"Origin": "https://player.example",
                                                         "Access-Control-Request-Method": "POST",
                                                         "Access-Control-Request-Headers": "content-type,authorization"})
    assert r.status == 204
    for h in ("Location", "ETag", "Link"):
        assert h in r.headers["Access-Control-Expose-Headers"]
    for h in ("Authorization", "If-Match", "Content-Type"):
        assert h in r.headers["Access-Control-Allow-Headers"]
    assert http("HEAD", f"{base}/whep/live1", token=env["admin"]).status == 200
    assert http("HEAD", f"{base}/whep/idle1", token=env["admin"]).status == 409


def test_aiortc_client_decodes_video_and_audio(env) -> None:
    out = asyncio.run(aiortc_whep_receive(f"{env['base']}/whep/live1", env["admin"], 4))
    assert out["status"] == 201, out.get("body")
    assert out["location"].startswith("/whep/live1/") and out["etag"].startswith('"')
    assert out["video"] >= 40, out  # 25 fps for 4 s, GOP replay included
    assert out["audio"] >= 100, out  # 20 ms Opus frames transcoded from AAC
    assert out["width"] == 640
    assert out["delete_status"] == 200
    assert "profile-level-id=42" in out["answer"]  # the source's profile (Constrained Baseline)


def test_session_resource_semantics(env) -> None:
    base = env["base"]
    r = _post(env, "live1")
    assert r.status == 201
    loc, etag = r.headers["Location"], r.headers["ETag"]
    frag = "a=ice-ufrag:zzzz\r\na=ice-pwd:zzzzzzzzzzzzzzzzzzzzzzzz\r\na=mid:0\r\na=candidate:1 1 udp 2130706431 127.0.0.1 9 typ host\r\n"
    assert http("PATCH", base + loc, raw=frag.encode(), token=env["admin"],
                headers={"Content-Type": "application/json"}).status == 415
    assert http("PATCH", base + loc, raw=b"a=candidate:1 1 udp 2130706431 127.0.0.1 9 typ host\r\n",
                token=env["admin"], headers={"Content-Type": "application/trickle-ice-sdpfrag",
                                             "If-Match": '"stale"'}).status == 412
    assert http("PATCH", base + loc, raw=frag.encode(), token=env["admin"],
                headers={"Content-Type": "application/trickle-ice-sdpfrag", "If-Match": "*"}).status == 422
    assert http("PATCH", base + loc, raw=b"a=candidate:1 1 udp 2130706431 127.0.0.1 9 typ host\r\n",
                token=env["admin"], headers={"Content-Type": "application/trickle-ice-sdpfrag",
                                             "If-Match": etag}).status == 204
    # someone else's session
    other = http("POST", f"{base}/api/v1/streams/live1/links", {"action": "read"}, token=env["admin"]).json()["token"]
    assert http("DELETE", base + loc, token=other).status == 403
    assert http("DELETE", base + loc + "x", token=env["admin"]).status == 404
    assert http("DELETE", base + loc, token=env["admin"]).status == 200
    assert http("DELETE", base + loc, token=env["admin"]).status == 404


def test_read_link_scoped_to_its_stream(env) -> None:
    base = env["base"]
    link = http("POST", f"{base}/api/v1/streams/idle1/links", {"action": "read"}, token=env["admin"]).json()["token"]
    assert _post(env, "live1", token=link).status == 403
    pub = http("POST", f"{base}/api/v1/streams/live1/links", {"action": "publish"}, token=env["admin"]).json()["token"]
    assert _post(env, "live1", token=pub).status == 403
    ok = http("POST", f"{base}/api/v1/streams/live1/links", {"action": "read"}, token=env["admin"]).json()["token"]
    r = http("POST", f"{base}/whep/live1?token={ok}", raw=OFFER.encode(), headers={"Content-Type": "application/sdp"})
    assert r.status == 201
    assert http("DELETE", base + r.headers["Location"] + f"?token={ok}").status == 200


def test_bframe_source_refused_with_reason(env) -> None:
    proc = ffmpeg_publish(env["srt"]("bframes1"), seconds=30, profile="main", bframes=True, audio="none")
    try:
        wait_live(env["base"], "bframes1", env["admin"])
        # The server knows of B-frames once it has seen a B-slice (x264 sends
        # I and P first): an offer before that is answered.
        def warned() -> bool:
            s = http("GET", f"{env['base']}/api/v1/streams/bframes1", token=env["admin"]).json()
            return any("B-frames" in w for w in s["warnings"])

        wait_until(warned, timeout=10)
        r = _post(env, "bframes1")
        assert r.status == 422 and "B-frames" in r.json()["detail"]
    finally:
        stop_process(proc)


def test_viewers_visible_in_api_and_metrics(env) -> None:
    base = env["base"]
    r = _post(env, "live1")
    assert r.status == 201
    s = http("GET", f"{base}/api/v1/streams/live1", token=env["admin"]).json()
    assert s["viewers"] >= 1
    m = http("GET", f"{base}/metrics").body.decode()
    assert "returnfeed_forwarding_latency_seconds_bucket" in m and "returnfeed_stream_live" in m
    http("DELETE", base + r.headers["Location"], token=env["admin"])


def test_viewer_that_goes_away_without_delete_is_freed(env) -> None:
    """A viewer closing its peer connection (DTLS close, no DELETE) frees its session."""
    from aiortc import RTCPeerConnection, RTCSessionDescription

    base = env["base"]

    async def run() -> tuple[int, int]:
        pc = RTCPeerConnection()
        pc.addTransceiver("video", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        r = await asyncio.to_thread(http, "POST", f"{base}/whep/live1", None, token=env["admin"],
                                    raw=pc.localDescription.sdp.encode(), headers={"Content-Type": "application/sdp"})
        assert r.status == 201
        await pc.setRemoteDescription(RTCSessionDescription(r.body.decode(), "answer"))
        for _ in range(100):
            if pc.connectionState == "connected":
                break
            await asyncio.sleep(0.1)
        loc = r.headers["Location"]
        during = (await asyncio.to_thread(http, "GET", base + loc, None, token=env["admin"])).status
        await pc.close()  # no DELETE
        for _ in range(100):
            after = (await asyncio.to_thread(http, "GET", base + loc, None, token=env["admin"])).status
            if after == 404:
                break
            await asyncio.sleep(0.1)
        return during, after

    during, after = asyncio.run(run())
    assert during == 200 and after == 404


def _msids(answer: str) -> dict[str, str]:
    """The a=msid stream id of each m-section (RFC 8830 §2: ``a=msid:<stream> <track>``)."""
    out: dict[str, str] = {}
    kind = None
    for line in answer.splitlines():
        if line.startswith("m="):
            kind = line[2:].split(" ", 1)[0]
        elif line.startswith("a=msid:") and kind is not None:
            out[kind] = line[len("a=msid:"):].split(" ", 1)[0]
    return out


def test_lip_sync_is_a_per_session_choice_of_stream_id(env) -> None:
    """Browsers lip-sync only tracks of one MediaStream: by default the answer
    puts audio and video in one (same a=msid stream id, a fresh one per
    session); ?sync=0 (video first) gives each track its own."""
    base = env["base"]
    answers = []
    for query in ("", "?sync=1", "?sync=0"):
        r = _post(env, "live1", query=query)
        assert r.status == 201, r.body
        answers.append(_msids(r.body.decode()))
        state = http("GET", base + r.headers["Location"], token=env["admin"]).json()
        assert state["sync"] is (query != "?sync=0")
        assert http("DELETE", base + r.headers["Location"], token=env["admin"]).status == 200
    default, synced, video_first = answers
    for ids in answers:
        assert set(ids) == {"audio", "video"}, ids
    assert default["audio"] == default["video"]
    assert synced["audio"] == synced["video"] and synced["video"] != default["video"]
    assert video_first["audio"] != video_first["video"]
    r = _post(env, "live1", query="?sync=yes")
    assert r.status == 400 and r.json()["error"] == "bad_request" and "sync" in r.json()["detail"]
