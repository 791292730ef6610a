"""SRT ingest through the real server: auth decisions, stream state, read:, simulcast."""

from __future__ import annotations

import json
import re
import subprocess
import time
from urllib.parse import quote

import pytest

from helpers import ffmpeg_publish, http, login, metrics_url, stop_process, wait_live, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def env(api_server):
    base = api_server.url
    admin = login(base, "admin", api_server.admin_password)["access_token"]
    assert http("POST", f"{base}/api/v1/productions", {"name": "SRT show"}, token=admin).status == 201
    streams = {}
    for name, pbk in (("s-aac", 16), ("s-opus", 32), ("s-sim", 16), ("s-layers", 16), ("s-tok", 16),
                      ("s-slt", 16), ("s-read", 16)):
        r = http("POST", f"{base}/api/v1/streams", {"name": name, "production": "SRT show", "pbkeylen": pbk},
                 token=admin)
        assert r.status == 201, r.body
        streams[name] = r.json()
    return {"base": base, "admin": admin, "streams": streams, "port": api_server.srt_port}


def _url(env, streamid: str, passphrase: str | None, pbkeylen: int = 16, latency_us: int = 120000) -> str:
    q = f"streamid={quote(streamid, safe=':#!=,/')}"
    if passphrase:
        q += f"&passphrase={passphrase}&pbkeylen={pbkeylen}"
    return f"srt://127.0.0.1:{env['port']}?{q}"


def _video_tracks(state: dict) -> list[dict]:
    return [t for t in state["tracks"] if t["kind"] == "video"]


@pytest.mark.parametrize("name, audio, latency", [("s-aac", "aac", 120000), ("s-opus", "opus", 20000)])
def test_publish_shows_live_tracks_and_stats(env, name, audio, latency) -> None:
    s = env["streams"][name]
    proc = ffmpeg_publish(_url(env, f"publish:{name}", s["passphrase"], s["pbkeylen"]), seconds=20, audio=audio,
                          latency_us=latency)
    try:
        state = wait_live(env["base"], name, env["admin"])
        state = wait_until(lambda: (lambda st: st if any(t["kind"] == "audio" for t in st["tracks"])
                                    and _video_tracks(st)[0].get("gop_frames") else None)(
            http("GET", f"{env['base']}/api/v1/streams/{name}", token=env["admin"]).json()), timeout=10)
        v = _video_tracks(state)[0]
        assert (v["codec"], v["width"], v["height"]) == ("h264", 640, 360)
        assert v["profile_level_id"].startswith("42") and v["fps"] == 25 and v["b_frames"] is False
        assert v["gop_frames"] == 25
        a = next(t for t in state["tracks"] if t["kind"] == "audio")
        assert a["codec"] == "opus"  # AAC is transcoded once per stream for WebRTC
        pub = state["source"]["publishers"][0]
        assert state["source"]["protocol"] == "srt"
        srt = pub["srt"]
        assert srt["latency_ms"] == max(latency // 1000, 120) or srt["latency_ms"] >= latency // 1000
        for key in ("msRTT", "pktRcvLoss", "pktRcvRetrans", "pktRcvDrop", "msRcvBuf"):
            assert key in srt
        assert pub["transport_errors"]["cc_error"] == 0
        m = http("GET", metrics_url(env['base'])).body.decode()
        assert f'returnfeed_stream_live{{stream="{name}"}} 1.0' in m
        assert "returnfeed_srt_link" in m
    finally:
        stop_process(proc)


def _local(env, url: str) -> str:
    """An API URL pointed at the test server's SRT port."""
    return re.sub(r"^srt://[^?]*\?", f"srt://127.0.0.1:{env['port']}?", url)


def _agreed_latency(env, name: str) -> dict:
    state = wait_live(env["base"], name, env["admin"])
    return state["source"]["publishers"][0]["srt"]


def test_stream_latency_is_served_per_connection(env, tmp_path) -> None:
    """A stream created with latency_ms 20 is served at 20 ms to callers that
    ask for 20 with the URL the API returned (FFmpeg: µs, srt-live-transmit:
    ms); the same FFmpeg asking for 20 ms on a stream at the default gets
    120 (SRT agrees on the larger)."""
    base = env["base"]
    r = http("POST", f"{base}/api/v1/streams", {"name": "s-lat20", "production": "SRT show", "latency_ms": 20},
             token=env["admin"])
    assert r.status == 201, r.body
    fast = r.json()
    assert "latency=20000" in fast["srt_url"] and fast["srt_url_ms"].endswith("latency=20")
    proc = ffmpeg_publish(_local(env, fast["srt_url"]), seconds=20, audio="none")
    try:
        srt = _agreed_latency(env, "s-lat20")
        assert (srt["latency_ms"], srt["peer_latency_ms"], srt["msRcvTsbPdDelay"]) == (20, 20, 20)
    finally:
        stop_process(proc)
    wait_until(lambda: not http("GET", f"{base}/api/v1/streams/s-lat20", token=env["admin"]).json()["source"],
               timeout=30)

    src = tmp_path / "src.ts"
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc=size=320x240:rate=25",
                    "-t", "20", "-c:v", "libx264", "-tune", "zerolatency", "-pix_fmt", "yuv420p", "-f", "mpegts",
                    str(src)], check=True)
    pacer = subprocess.Popen(["ffmpeg", "-nostdin", "-loglevel", "error", "-re", "-i", str(src), "-c", "copy",
                              "-f", "mpegts", "-"], stdout=subprocess.PIPE, start_new_session=True)
    slt = subprocess.Popen(["srt-live-transmit", "-q", "file://con", _local(env, fast["srt_url_ms"])],
                           stdin=pacer.stdout, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    try:
        srt = _agreed_latency(env, "s-lat20")
        assert (srt["latency_ms"], srt["msRcvTsbPdDelay"]) == (20, 20)
    finally:
        stop_process(slt)
        stop_process(pacer)

    r = http("POST", f"{base}/api/v1/streams", {"name": "s-latdef", "production": "SRT show"}, token=env["admin"])
    default = r.json()
    assert default["latency_ms"] == 120
    asks_20 = _local(env, default["srt_url"]).replace("latency=120000", "latency=20000")
    proc = ffmpeg_publish(asks_20, seconds=20, audio="none")
    try:
        srt = _agreed_latency(env, "s-latdef")
        assert (srt["latency_ms"], srt["msRcvTsbPdDelay"]) == (120, 120)
    finally:
        stop_process(proc)


def test_refusals(env) -> None:
    base = env["base"]
    s = env["streams"]["s-tok"]

    def refused(url: str) -> bool:
        p = subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc=size=160x120:rate=10",
                            "-t", "2", "-c:v", "libx264", "-tune", "zerolatency", "-f", "mpegts", url],
                           capture_output=True, text=True, timeout=30)
        return p.returncode != 0

    before = http("GET", metrics_url(base)).body.decode()
    assert refused(_url(env, "publish:s-tok", "wrong-passphrase-123"))
    assert refused(_url(env, "publish:no-such-stream", s["passphrase"]))
    assert refused(_url(env, "publish:s-tok", None))  # passphrase required
    assert refused(_url(env, "#!::r=s-tok,m=publish,s=not.a.token", s["passphrase"]))
    # a link for another stream, and an expired one
    other = http("POST", f"{base}/api/v1/streams/s-aac/links", {"action": "publish"}, token=env["admin"]).json()["token"]
    assert refused(_url(env, f"#!::r=s-tok,m=publish,s={other}", s["passphrase"]))
    short = http("POST", f"{base}/api/v1/streams/s-tok/links", {"action": "publish", "ttl_s": 10},
                 token=env["admin"]).json()["token"]
    time.sleep(16)  # past expiry and the 5 s clock-skew leeway
    assert refused(_url(env, f"#!::r=s-tok,m=publish,s={short}", s["passphrase"]))
    after = http("GET", metrics_url(base)).body.decode()
    assert 'returnfeed_srt_rejected_total{code="1404"}' in after
    assert 'returnfeed_srt_rejected_total{code="1401"}' in after
    assert before != after


def test_token_publish_and_second_publisher_refused(env) -> None:
    base = env["base"]
    s = env["streams"]["s-tok"]
    link = http("POST", f"{base}/api/v1/streams/s-tok/links", {"action": "publish"}, token=env["admin"]).json()
    assert "s=" in link["srt_url"]
    proc = ffmpeg_publish(link["srt_url"].replace("localhost:8890", f"127.0.0.1:{env['port']}")
                          .replace(":0?", f":{env['port']}?"), seconds=20, audio="none")
    try:
        wait_live(base, "s-tok", env["admin"])
        second = subprocess.run(
            ["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc=size=160x120:rate=10", "-t", "2",
             "-c:v", "libx264", "-f", "mpegts", _url(env, "publish:s-tok", s["passphrase"])],
            capture_output=True, timeout=30)
        assert second.returncode != 0
        m = http("GET", metrics_url(base)).body.decode()
        assert 'returnfeed_srt_rejected_total{code="1409"}' in m
        assert wait_live(base, "s-tok", env["admin"])["live"]  # the first publisher is unaffected
    finally:
        stop_process(proc)


def test_simulcast_two_pids_in_one_ts(env) -> None:
    s = env["streams"]["s-sim"]
    proc = ffmpeg_publish(_url(env, "publish:s-sim", s["passphrase"]), seconds=20, audio="aac", extra=[
        "-filter_complex", "[0:v]split=2[hi][lo0];[lo0]scale=320:180[lo]", "-map", "[hi]", "-map", "[lo]", "-map", "1:a"])
    try:
        state = wait_until(lambda: (lambda st: st if len(st.get("layers", [])) == 2 else None)(
            http("GET", f"{env['base']}/api/v1/streams/s-sim", token=env["admin"]).json()), timeout=15)
        assert sorted(state["layers"]) == ["high", "low"]
        sizes = {t["layer"]: t["width"] for t in _video_tracks(state)}
        assert sizes == {"high": 640, "low": 320}
    finally:
        stop_process(proc)


def test_simulcast_two_connections_named_layers(env) -> None:
    s = env["streams"]["s-layers"]
    hi = ffmpeg_publish(_url(env, "publish:s-layers/high", s["passphrase"]), seconds=20, audio="aac")
    lo = ffmpeg_publish(_url(env, "publish:s-layers/low", s["passphrase"]), seconds=20, size="320x180", audio="none")
    try:
        state = wait_until(lambda: (lambda st: st if len(st.get("layers", [])) == 2 else None)(
            http("GET", f"{env['base']}/api/v1/streams/s-layers", token=env["admin"]).json()), timeout=15)
        assert {t["layer"]: t["width"] for t in _video_tracks(state)} == {"high": 640, "low": 320}
        assert len(state["source"]["publishers"]) == 2
    finally:
        stop_process(hi)
        stop_process(lo)


def test_srt_live_transmit_caller_and_read_output_decodes(env, tmp_path) -> None:
    base = env["base"]
    s = env["streams"]["s-slt"]
    src = tmp_path / "src.ts"
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc=size=320x240:rate=25",
                    "-f", "lavfi", "-i", "sine=f=440:sample_rate=48000", "-t", "12", "-c:v", "libx264",
                    "-tune", "zerolatency", "-pix_fmt", "yuv420p", "-c:a", "aac", "-f", "mpegts", str(src)], check=True)
    # srt-live-transmit reads the file paced by ffmpeg -re and pushes 1316-byte messages.
    url = f"srt://127.0.0.1:{env['port']}?streamid=publish:s-slt&passphrase={s['passphrase']}&pbkeylen=16"
    pacer = subprocess.Popen(["ffmpeg", "-nostdin", "-loglevel", "error", "-re", "-i", str(src), "-c", "copy",
                              "-f", "mpegts", "-"], stdout=subprocess.PIPE, start_new_session=True)
    slt = subprocess.Popen(["srt-live-transmit", "-q", "file://con", url], stdin=pacer.stdout,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_live(base, "s-slt", env["admin"])
        out = tmp_path / "read.ts"
        # read: with the stream passphrase, and with a read link (no encryption)
        read_url = f"srt://127.0.0.1:{env['port']}?streamid=read:s-slt&passphrase={s['passphrase']}&pbkeylen=16"
        subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", read_url, "-t", "3", "-c", "copy",
                        "-f", "mpegts", str(out)], check=True, timeout=30)
        probe = json.loads(subprocess.run(["ffprobe", "-v", "error", "-show_streams", "-count_frames", "-of", "json",
                                           str(out)], capture_output=True, text=True, check=True).stdout)
        codecs = {st["codec_name"]: st for st in probe["streams"]}
        assert "h264" in codecs and "aac" in codecs  # original packets, passthrough
        assert int(codecs["h264"]["nb_read_frames"]) >= 40
        token = http("POST", f"{base}/api/v1/streams/s-slt/links", {"action": "read"}, token=env["admin"]).json()["token"]
        out2 = tmp_path / "read2.ts"
        subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i",
                        f"srt://127.0.0.1:{env['port']}?streamid=" + quote(f"#!::r=s-slt,m=request,s={token}", safe=":#!=,"),
                        "-t", "2", "-c", "copy", "-f", "mpegts", str(out2)], check=True, timeout=30)
        assert out2.stat().st_size > 10_000
    finally:
        stop_process(slt)
        stop_process(pacer)


def test_read_of_idle_stream_refused(env) -> None:
    s = env["streams"]["s-read"]
    p = subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i",
                        f"srt://127.0.0.1:{env['port']}?streamid=read:s-read&passphrase={s['passphrase']}",
                        "-t", "1", "-f", "null", "-"], capture_output=True, timeout=30)
    assert p.returncode != 0


def test_garbage_datagrams_do_not_disturb(env) -> None:
    import os
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for _ in range(2000):
        sock.sendto(os.urandom(int.from_bytes(os.urandom(1), "big") * 5 + 1), ("127.0.0.1", env["port"]))
    sock.close()
    s = env["streams"]["s-aac"]
    proc = ffmpeg_publish(_url(env, "publish:s-aac", s["passphrase"]), seconds=10, audio="none")
    try:
        assert wait_live(env["base"], "s-aac", env["admin"])["live"]
        assert http("GET", f"{env['base']}/healthz").status == 200
    finally:
        stop_process(proc)
