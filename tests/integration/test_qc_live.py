"""Live QC through the real server: ffmpeg publishes over SRT a feed with
black video and silent audio at known times; the tap's markers open and
close in order (read from the server's ``qc.marker`` log lines until
/ws/events carries them), and the qc metrics count them."""

from __future__ import annotations

import re
import subprocess
from urllib.parse import quote

import pytest

from helpers import http, login, metrics_url, running_server, stop_process, wait_until

pytestmark = pytest.mark.integration

# Source time of the faults (the feed starts at 0): black 3.0–5.5 s, silence 6.5–9.0 s.
BLACK = (3.0, 5.5)
SILENCE = (6.5, 9.0)
SECONDS = 11
MARKER = re.compile(r"qc\.marker stream=(\S+) event=(\w+) type=(\w+) subtype=(\S*) start=(\S+) end=(\S+)")


def publish(url: str) -> subprocess.Popen:
    video = (f"testsrc=s=640x360:r=25:d={BLACK[0]}[a];"
             f"color=c=black:s=640x360:r=25:d={BLACK[1] - BLACK[0]}[b];"
             f"testsrc=s=640x360:r=25:d={SECONDS - BLACK[1]}[c];[a][b][c]concat=n=3:v=1:a=0,format=yuv420p[out0]")
    audio = (f"sine=frequency=440:sample_rate=48000:duration={SECONDS},"
             f"volume=volume=0:enable='between(t,{SILENCE[0]},{SILENCE[1]})',aformat=channel_layouts=stereo[out0]")
    cmd = ["ffmpeg", "-nostdin", "-loglevel", "error", "-re", "-f", "lavfi", "-i", video,
           "-re", "-f", "lavfi", "-i", audio,
           "-c:v", "libx264", "-preset", "veryfast", "-tune", "zerolatency", "-profile:v", "baseline", "-g", "25",
           "-b:v", "800k", "-c:a", "aac", "-b:a", "128k", "-f", "mpegts", url]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def markers(output: list[str], stream: str) -> list[tuple[str, str, float, float | None]]:
    out = []
    for line in list(output):
        m = MARKER.search(line)
        if m and m.group(1) == stream:
            end = None if m.group(6) == "None" else float(m.group(6))
            out.append((m.group(3), m.group(2), float(m.group(5)), end))
    return out


@pytest.fixture
def qc_server(module_db_url: str, tmp_path):
    """A server with the QC tap on (it is opt-in: ``qc.enabled``)."""
    with running_server(tmp_path / "srv", module_db_url, "admin-password-1",
                        env={"RETURNFEED_QC__ENABLED": "true"}) as srv:
        yield srv


def test_live_feed_faults_become_open_then_close_markers(qc_server) -> None:
    api_server = qc_server
    base = api_server.url
    admin = login(base, "admin", api_server.admin_password)["access_token"]
    assert http("POST", f"{base}/api/v1/productions", {"name": "QC show"}, token=admin).status == 201
    r = http("POST", f"{base}/api/v1/streams", {"name": "qc-cam", "production": "QC show"}, token=admin)
    assert r.status == 201, r.body
    s = r.json()
    url = (f"srt://127.0.0.1:{api_server.srt_port}?streamid={quote('publish:qc-cam', safe=':')}"
           f"&passphrase={s['passphrase']}&pbkeylen={s['pbkeylen']}&latency=120000")
    proc = publish(url)
    try:
        seen = wait_until(lambda: (lambda ms: ms if sum(1 for t, k, _, _ in ms if t == "silence" and k == "close")
                                   else None)(markers(api_server.output, "qc-cam")), timeout=45, interval=0.2)
    except AssertionError:
        stop_process(proc)
        qc = [line for line in api_server.output if "qc." in line or "srt." in line or "Error" in line]
        raise AssertionError("no silence close marker; the server's QC lines:\n" + "\n".join(qc[-40:])
                             + "\nffmpeg: " + proc.stderr.read().decode(errors="replace")[-2000:]) from None
    finally:
        stop_process(proc)
    faults = [(t, k) for t, k, _, _ in seen if t in ("black", "silence")]
    assert faults == [("black", "open"), ("black", "close"), ("silence", "open"), ("silence", "close")], seen
    black = next(m for m in seen if m[:2] == ("black", "close"))
    silence = next(m for m in seen if m[:2] == ("silence", "close"))
    # Media times: the faults' durations, and where they lie relative to each other.
    assert abs((black[3] - black[2]) - (BLACK[1] - BLACK[0])) <= 0.15
    assert abs((silence[3] - silence[2]) - (SILENCE[1] - SILENCE[0])) <= 0.15
    assert abs((silence[2] - black[2]) - (SILENCE[0] - BLACK[0])) <= 0.15
    # Nothing else went wrong on a clean feed: no decode errors.
    assert not [m for m in seen if m[0] == "transport"], seen
    metrics = http("GET", metrics_url(base)).body.decode()
    assert 'returnfeed_qc_markers_total{type="black"} 1.0' in metrics
    assert 'returnfeed_qc_markers_total{type="silence"} 1.0' in metrics
    cpu = re.search(r'returnfeed_qc_cpu_seconds_total\{stream="qc-cam"\} (\S+)', metrics)
    assert cpu and float(cpu.group(1)) > 0
    assert "returnfeed_qc_worker_restarts_total 0.0" in metrics
    assert any("qc.tap_state" in line and "stream=qc-cam" in line and "state=running" in line
               for line in api_server.output)
    # The tap's markers went through QC events into the database: the REST
    # list has both, closed, at the same media times as the log lines.
    def stored() -> list[dict] | None:
        r = http("GET", f"{base}/api/v1/streams/qc-cam/markers", token=admin)
        assert r.status == 200, r.body
        ms = [m for m in r.json()["markers"] if m["kind"] in ("black", "silence") and m["end"] is not None]
        return ms if len(ms) == 2 else None

    rows = wait_until(stored, timeout=15, interval=0.2)
    by_kind = {m["kind"]: m for m in rows}
    assert abs(by_kind["black"]["start"] - black[2]) < 1e-3 and abs(by_kind["black"]["end"] - black[3]) < 1e-3
    assert abs(by_kind["silence"]["start"] - silence[2]) < 1e-3
    assert all(m["wall_end"] is not None for m in rows)
