"""SRT callers nobody here wrote, with the URLs the API hands out: FFmpeg 5.1
(Debian), FFmpeg n9 (the imageio-ffmpeg wheel), srt-live-transmit and
GStreamer's srtsink. Key lengths, and why a refused encoder was refused."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest

from helpers import http, login, wait_live, wait_until

pytestmark = pytest.mark.integration

SOURCE = ["-re", "-f", "lavfi", "-i", "testsrc=size=320x240:rate=25", "-f", "lavfi", "-i",
          "sine=frequency=440:sample_rate=48000", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-tune", "zerolatency",
          "-bf", "0", "-g", "25", "-c:a", "aac"]


def _ffmpeg9() -> str:
    try:
        import imageio_ffmpeg
    except ImportError:
        pytest.skip("imageio-ffmpeg (ffmpeg n9) not installed")
    return imageio_ffmpeg.get_ffmpeg_exe()


@pytest.fixture(scope="module")
def env(api_server):
    base = api_server.url
    admin = login(base, "admin", api_server.admin_password)["access_token"]
    assert http("POST", f"{base}/api/v1/productions", {"name": "Interop"}, token=admin).status == 201
    port = api_server.srt_port

    def local(url: str) -> str:
        return url.replace("localhost:8890", f"127.0.0.1:{port}").replace(":8890?", f":{port}?").replace(
            ":0?", f":{port}?")

    def stream(name: str, **extra) -> dict:
        r = http("POST", f"{base}/api/v1/streams", {"name": name, "production": "Interop", **extra}, token=admin)
        assert r.status == 201, r.body
        return r.json()

    return {"base": base, "admin": admin, "local": local, "stream": stream}


def _publish(cmd: list[str], *, shell: bool = False) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True, shell=shell)


def _stop(proc: subprocess.Popen) -> str:
    import os
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=10)
    return (err or b"").decode(errors="replace")[-2000:]


def _state(env, name: str) -> dict:
    return http("GET", f"{env['base']}/api/v1/streams/{name}", token=env["admin"]).json()


PEERS = ["ffmpeg5", "ffmpeg9", "srt-live-transmit", "gstreamer"]


def _caller(peer: str, url_us: str, url_ms: str) -> subprocess.Popen:
    """A real caller publishing 20 s of H.264 + AAC in MPEG-TS to the URL the
    API gave (µs latency form for FFmpeg, ms form for the others)."""
    if peer == "ffmpeg5":
        return _publish(["ffmpeg", "-nostdin", "-loglevel", "error", *SOURCE, "-t", "20", "-f", "mpegts", url_us])
    if peer == "ffmpeg9":
        return _publish([_ffmpeg9(), "-nostdin", "-loglevel", "error", *SOURCE, "-t", "20", "-f", "mpegts", url_us])
    encode = " ".join(["ffmpeg", "-nostdin", "-loglevel", "error", *SOURCE, "-t", "20", "-f", "mpegts", "-"])
    if peer == "srt-live-transmit":
        return _publish(f"{encode} | srt-live-transmit -q file://con '{url_ms}'", shell=True)
    assert shutil.which("gst-launch-1.0"), "GStreamer (gstreamer1.0-tools) missing"
    return _publish(f"{encode} | gst-launch-1.0 -q fdsrc fd=0 ! srtsink uri='{url_ms}'", shell=True)


@pytest.mark.parametrize("peer", PEERS)
def test_signed_link_srt_url_works_in_every_caller(env, peer) -> None:
    """The publish link's stream ID starts with '#', which a URL would take as
    its fragment: the API writes it %23, and the server decodes it for the
    callers that send it as written (FFmpeg 5.1, srt-live-transmit)."""
    name = f"link-{peer}"
    env["stream"](name)
    link = http("POST", f"{env['base']}/api/v1/streams/{name}/links", {"action": "publish"},
                token=env["admin"]).json()
    assert "#" not in link["srt_url"] and "streamid=%23!::r=" in link["srt_url"]
    proc = _caller(peer, env["local"](link["srt_url"]), env["local"](link["srt_url_ms"]))
    try:
        state = wait_live(env["base"], name, env["admin"], timeout=20)
        assert state["source"]["protocol"] == "srt"
    finally:
        err = _stop(proc)
    assert _state(env, name)["connection_failures"] == [], err


@pytest.mark.parametrize("peer", ["ffmpeg5", "srt-live-transmit"])
def test_any_key_length_at_or_above_the_streams_minimum(env, peer) -> None:
    """A default stream (AES-128 minimum) takes an encoder set to AES-256 —
    the caller's key length wins in libsrt 1.5."""
    name = f"aes-{peer}"
    s = env["stream"](name)
    assert s["pbkeylen"] == 16
    us = env["local"](s["srt_url"]).replace("pbkeylen=16", "pbkeylen=32")
    ms = env["local"](s["srt_url_ms"]).replace("pbkeylen=16", "pbkeylen=32")
    proc = _caller(peer, us, ms)
    try:
        wait_live(env["base"], name, env["admin"], timeout=20)
        pub = _state(env, name)["source"]["publishers"][0]
        assert pub["srt"] is not None
    finally:
        _stop(proc)


def test_refused_encoders_are_explained_to_the_director(env) -> None:
    s = env["stream"]("aes256", pbkeylen=32)
    url = env["local"](s["srt_url"])
    short_key = _publish(["ffmpeg", "-nostdin", "-loglevel", "error", *SOURCE, "-t", "3", "-f", "mpegts",
                          url.replace("pbkeylen=32", "pbkeylen=16")])
    _stop_when_done(short_key)
    no_key = _publish(["ffmpeg", "-nostdin", "-loglevel", "error", *SOURCE, "-t", "3", "-f", "mpegts",
                       url.replace("&pbkeylen=32", "")])
    _stop_when_done(no_key)
    wrong = _publish(["ffmpeg", "-nostdin", "-loglevel", "error", *SOURCE, "-t", "3", "-f", "mpegts",
                      url.replace(s["passphrase"], "not-the-passphrase-0")])
    _stop_when_done(wrong)
    failures = wait_until(lambda: (lambda f: f if len(f) >= 3 else None)(_state(env, "aes256")["connection_failures"]),
                          timeout=15)
    reasons = [f["reason"] for f in failures]
    assert sum("key too short" in r and "AES-128" in r for r in reasons) >= 2, reasons  # no pbkeylen = AES-128
    assert any("passphrase" in r for r in reasons), reasons
    assert all(f["peer"].startswith("127.0.0.1:") and f["protocol"] == "srt" and f["at"] for f in failures)
    assert not _state(env, "aes256")["live"]
    # Camera and viewer links do not see them.
    read = http("POST", f"{env['base']}/api/v1/streams/aes256/links", {"action": "read"},
                token=env["admin"]).json()["token"]
    assert "connection_failures" not in http("GET", f"{env['base']}/api/v1/streams/aes256", token=read).json()
    # An unknown stream and a bad token are explained too (the token never is).
    link = http("POST", f"{env['base']}/api/v1/streams/aes256/links", {"action": "publish"},
                token=env["admin"]).json()
    forged = env["local"](link["srt_url"]).replace("s=eyJ", "s=eyX")
    _stop_when_done(_publish(["ffmpeg", "-nostdin", "-loglevel", "error", *SOURCE, "-t", "2", "-f", "mpegts", forged]))
    latest = wait_until(lambda: (lambda f: f if any(x["code"] == 1401 for x in f) else None)(
        _state(env, "aes256")["connection_failures"]), timeout=15)
    assert "eyX" not in str(latest)


def _stop_when_done(proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    _stop(proc)
