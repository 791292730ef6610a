"""Stream detectors through the real server: an ffmpeg SRT feed whose video
stops for 3 s while its audio carries on becomes a ``stall``/``video_stalled``
marker that opens and closes; TS packets with broken continuity counters
(relayed byte for byte by srt-live-transmit) become a ``transport``/
``cc_error`` marker; datagrams dropped between caller and server become a
``transport``/``srt_loss`` marker. All reach the QC events sink: the log
and the REST list read from the database."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from urllib.parse import quote

import pytest

from helpers import ServerProcess, http, login, stop_process, wait_until
from udp_relay import LossModel, LossyUdpRelay

pytestmark = pytest.mark.integration

MARKER = re.compile(r"qc\.marker stream=(\S+) event=(\w+) type=(\w+) subtype=(\S*) start=(\S+) end=(\S+)")
# Source seconds with no video frames (the audio carries on).
VIDEO_GAP = (3.0, 6.0)
SECONDS = 10

# Reads MPEG-TS on stdin and writes it on in whole 7-packet messages; from
# FROM to TO seconds after the first byte it moves the continuity_counter of
# every 25th packet on the video PID (0x100, FFmpeg's default) on by 5:
# packets lost on the way, as TR 101 290 1.4 sees them.
CORRUPT = r"""
import sys, time
FROM, TO = float(sys.argv[1]), float(sys.argv[2])
src, dst = sys.stdin.buffer.raw, sys.stdout.buffer
buf, n, t0 = b"", 0, None
while True:
    chunk = src.read(65536)
    if not chunk:
        break
    if t0 is None:
        t0 = time.monotonic()
    buf += chunk
    whole = len(buf) // 1316 * 1316
    out, buf = bytearray(buf[:whole]), buf[whole:]
    late = FROM <= time.monotonic() - t0 < TO
    for i in range(0, len(out), 188):
        if ((out[i + 1] & 0x1F) << 8 | out[i + 2]) == 0x100:
            n += 1
            if late and n % 25 == 0:
                out[i + 3] = (out[i + 3] & 0xF0) | ((out[i + 3] + 5) & 0x0F)
    dst.write(out)
    dst.flush()
"""


@pytest.fixture(scope="module")
def qc_env(module_db_url: str, tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("srv"), env={"DATABASE_URL": module_db_url,
                                                             "RETURNFEED_ADMIN_PASSWORD": "admin-password-1",
                                                             "RETURNFEED_QC__ENABLED": "true"})
    srv.start()
    try:
        base = srv.url
        admin = login(base, "admin", "admin-password-1")["access_token"]
        assert http("POST", f"{base}/api/v1/productions", {"name": "QC stream"}, token=admin).status == 201
        yield srv, admin
    finally:
        srv.stop()


def create(srv: ServerProcess, admin: str, name: str) -> tuple[str, str]:
    """The stream's SRT URL: µs latency form (FFmpeg), ms form (srt-live-transmit)."""
    r = http("POST", f"{srv.url}/api/v1/streams", {"name": name, "production": "QC stream"}, token=admin)
    assert r.status == 201, r.body
    s = r.json()
    base = (f"srt://127.0.0.1:{srv.srt_port}?streamid={quote('publish:' + name, safe=':')}"
            f"&passphrase={s['passphrase']}&pbkeylen={s['pbkeylen']}")
    return base + "&latency=120000", base + "&latency=120"


def markers(output: list[str], stream: str) -> list[tuple[str, str, str, float, float | None]]:
    out = []
    for line in list(output):
        m = MARKER.search(line)
        if m and m.group(1) == stream:
            end = None if m.group(6) == "None" else float(m.group(6))
            out.append((m.group(3), m.group(4), m.group(2), float(m.group(5)), end))
    return out


def stored(srv: ServerProcess, admin: str, stream: str, kind: str, subtype: str) -> list[dict] | None:
    r = http("GET", f"{srv.url}/api/v1/streams/{stream}/markers", token=admin)
    assert r.status == 200, r.body
    rows = [m for m in r.json()["markers"] if (m["kind"], m["subtype"]) == (kind, subtype) and m["end"] is not None]
    return rows or None


def wait_for_close(srv: ServerProcess, stream: str, subtype: str, proc: subprocess.Popen) -> list[tuple]:
    try:
        return wait_until(lambda: (lambda ms: ms if any(s == subtype and e == "close" for _, s, e, _, _ in ms)
                                   else None)(markers(srv.output, stream)), timeout=45, interval=0.2)
    except AssertionError:
        stop_process(proc)
        qc = [line for line in srv.output if "qc." in line or "srt." in line or "Error" in line]
        raise AssertionError(f"no {subtype} close marker; the server's QC lines:\n" + "\n".join(qc[-40:])
                             + "\npublisher: " + proc.stderr.read().decode(errors="replace")[-2000:]) from None


def test_video_that_stops_while_audio_continues_is_a_stall_marker(qc_env) -> None:
    srv, admin = qc_env
    url, _ = create(srv, admin, "stall-cam")
    video = (f"testsrc=s=320x180:r=25:d={SECONDS},"
             f"select='not(between(t,{VIDEO_GAP[0]},{VIDEO_GAP[1]}))',format=yuv420p")
    audio = f"sine=frequency=440:sample_rate=48000:duration={SECONDS}"
    # A small interleaving delta: FFmpeg's muxer would otherwise hold the
    # audio back until video comes again (up to 10 s), and both would stop.
    cmd = ["ffmpeg", "-nostdin", "-loglevel", "error", "-re", "-f", "lavfi", "-i", video,
           "-re", "-f", "lavfi", "-i", audio, "-fps_mode", "passthrough",
           "-c:v", "libx264", "-preset", "veryfast", "-tune", "zerolatency", "-g", "25", "-b:v", "300k",
           "-c:a", "aac", "-b:a", "64k", "-max_interleave_delta", "100000", "-f", "mpegts", url]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        seen = wait_for_close(srv, "stall-cam", "video_stalled", proc)
    finally:
        stop_process(proc)
    stall = [m for m in seen if m[1] == "video_stalled"]
    assert [m[2] for m in stall] == ["open", "close"], seen
    _, _, _, start, end = stall[-1]
    assert stall[0][0] == "stall"
    # Media time: from where the next frame was due to the first frame back.
    assert abs((end - start) - (VIDEO_GAP[1] - VIDEO_GAP[0])) <= 0.4, stall
    assert not [m for m in seen if m[1] == "audio_stalled"], seen
    rows = wait_until(lambda: stored(srv, admin, "stall-cam", "stall", "video_stalled"), timeout=15, interval=0.2)
    assert len(rows) == 1 and rows[0]["severity"] == "error"
    assert abs(rows[0]["start"] - start) < 1e-3 and abs(rows[0]["end"] - end) < 1e-3
    assert rows[0]["wall_end"] is not None


def test_broken_continuity_counters_on_the_wire_are_a_transport_marker(qc_env) -> None:
    srv, admin = qc_env
    _, url_ms = create(srv, admin, "cc-cam")
    encode = ["ffmpeg", "-nostdin", "-loglevel", "error", "-re", "-f", "lavfi", "-i",
              f"testsrc=s=320x180:r=25:d={SECONDS}", "-re", "-f", "lavfi", "-i",
              f"sine=frequency=440:sample_rate=48000:duration={SECONDS}",
              "-c:v", "libx264", "-preset", "veryfast", "-tune", "zerolatency", "-g", "25", "-b:v", "300k",
              "-c:a", "aac", "-b:a", "64k", "-f", "mpegts", "-"]
    corrupt = [sys.executable, "-c", CORRUPT, "4.0", "5.0"]
    pipeline = (" ".join(quote_arg(a) for a in encode) + " | " + " ".join(quote_arg(a) for a in corrupt)
                + f" | srt-live-transmit -q -chunk 1316 file://con {quote_arg(url_ms)}")
    proc = subprocess.Popen(pipeline, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        seen = wait_for_close(srv, "cc-cam", "cc_error", proc)
    finally:
        stop_process(proc)
    cc = [m for m in seen if m[1] == "cc_error"]
    assert cc[0][2] == "open" and cc[-1][2] == "close" and {m[2] for m in cc[1:-1]} <= {"update"}, seen
    assert cc[0][0] == "transport"
    # About one second of corrupted packets: the marker spans it (sampled
    # every 0.2 s), not the whole feed.
    assert 0.5 <= cc[-1][4] - cc[-1][3] <= 2.0, cc
    rows = wait_until(lambda: stored(srv, admin, "cc-cam", "transport", "cc_error"), timeout=15, interval=0.2)
    assert len(rows) == 1 and rows[0]["severity"] == "error"
    assert rows[0]["metadata"]["count"] >= 3


async def test_packet_loss_on_the_way_is_an_srt_loss_marker(qc_env) -> None:
    """ffmpeg → a relay dropping 10 % of the datagrams towards the server,
    in bursts too → libsrt's pktRcvLoss grows by tens a second: srt_loss."""
    srv, admin = qc_env
    url, _ = create(srv, admin, "lossy-cam")
    relay = LossyUdpRelay(("127.0.0.1", srv.srt_port),
                          LossModel(loss=0.10, burst_gap=(40, 80), burst_len=8, seed=5))
    relay_port = await relay.start()
    url = url.replace(f"127.0.0.1:{srv.srt_port}?", f"127.0.0.1:{relay_port}?")
    proc = await asyncio.create_subprocess_exec(
        "ffmpeg", "-nostdin", "-loglevel", "error", "-re", "-f", "lavfi", "-i", "testsrc=s=640x360:r=25:d=8",
        "-c:v", "libx264", "-preset", "veryfast", "-tune", "zerolatency", "-g", "25", "-b:v", "1500k",
        "-an", "-f", "mpegts", url, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        deadline = time.monotonic() + 45
        while not any(s == "srt_loss" and e == "close" for _, s, e, _, _ in markers(srv.output, "lossy-cam")):
            if time.monotonic() > deadline:
                qc = [line for line in srv.output if "qc." in line or "srt." in line]
                raise AssertionError(f"no srt_loss close marker; relay {relay.stats()}:\n" + "\n".join(qc[-30:]))
            await asyncio.sleep(0.2)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        relay_stats = relay.stats()
        await relay.close()
    assert relay_stats["to_target_dropped"] > 50, relay_stats
    loss = [m for m in markers(srv.output, "lossy-cam") if m[1] == "srt_loss"]
    assert loss[0][0] == "transport" and loss[0][2] == "open" and loss[-1][2] == "close", loss
    rows = await asyncio.to_thread(
        wait_until, lambda: stored(srv, admin, "lossy-cam", "transport", "srt_loss"), timeout=15, interval=0.2)
    assert rows[0]["severity"] == "warning" and rows[0]["metadata"]["lost"] > 0


def quote_arg(arg: str) -> str:
    import shlex

    return shlex.quote(arg)
