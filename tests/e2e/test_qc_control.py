"""Live QC driven from the control room, real Chromium against the real
server: ffmpeg publishes over SRT a feed that goes black and silent for 6 s
of every 14 s; QC is off (the default) until the director presses the
tile's QC button; then the tile shows a moving audio meter and a fault
badge, the marker appears in the QC panel and closes when the fault ends,
and a marker flagged false positive in one director's room shows flagged
in a second director's room. The settings dialog is reachable and driven
from the keyboard."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from helpers import (
    Console, ServerProcess, free_udp_port, http, login, open_control_room, running_server, wait_until,
)

pytestmark = pytest.mark.browser

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
ADMIN_PASSWORD = "admin-password-1"
DIRECTOR_PASSWORD = "qc-director-password"
STREAM = "qccam"
# Feed time of the faults in each cycle: black and silence from 4 s to 10 s
# of every 14 s (black_d and silence_d are 2 s: each marker is open 4 s).
CYCLE, FAULT = 14, (4, 10)


@pytest.fixture(scope="module")
def server(e2e_db_url, tmp_path_factory) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("qc-srv"), e2e_db_url, ADMIN_PASSWORD,
                        env={"RETURNFEED_SRT__LATENCY_MS": "40"}, args=["--srt-port", str(free_udp_port())]) as srv:
        yield srv


@pytest.fixture(scope="module")
def show(server) -> dict[str, Any]:
    """One production with one stream; a second director as a member."""
    base = server.url
    admin = login(base, "admin", ADMIN_PASSWORD)["access_token"]
    r = http("POST", f"{base}/api/v1/productions", {"name": "QC room"}, token=admin)
    assert r.status == 201, r.body
    pid = r.json()["id"]
    r = http("POST", f"{base}/api/v1/streams", {"name": STREAM, "production": pid, "label": "QC camera"},
             token=admin)
    assert r.status == 201, r.body
    stream = r.json()
    r = http("POST", f"{base}/api/v1/users", {"username": "qcdir", "password": DIRECTOR_PASSWORD,
                                              "role": "director"}, token=admin)
    assert r.status == 201, r.body
    r = http("PUT", f"{base}/api/v1/productions/{pid}/members/qcdir", {"role": "director"}, token=admin)
    assert r.status == 200, r.body
    return {"base": base, "production": pid, "stream": stream, "admin": admin}


@pytest.fixture(scope="module")
def feed(show) -> Iterator[subprocess.Popen]:
    ffmpeg = shutil.which("ffmpeg")
    assert ffmpeg, "ffmpeg is required"
    fault = f"between(mod(t,{CYCLE}),{FAULT[0]},{FAULT[1]})"
    # The tone's level swings, so the loudness meter moves between the faults.
    audio = (f"sine=frequency=600:sample_rate=48000,"
             f"volume=volume='if({fault},0,0.35+0.3*sin(2*PI*t*0.7))':eval=frame,aformat=channel_layouts=stereo")
    video = f"testsrc2=size=640x360:rate=25,drawbox=x=0:y=0:w=iw:h=ih:color=black:t=fill:enable='{fault}'"
    srt = show["stream"]["srt_url"].replace("localhost", "127.0.0.1")
    proc = subprocess.Popen(
        [ffmpeg, "-hide_banner", "-loglevel", "error", "-re", "-f", "lavfi", "-i", video,
         "-re", "-f", "lavfi", "-i", audio,
         "-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency", "-g", "25", "-bf", "0",
         "-pix_fmt", "yuv420p", "-b:v", "600k", "-c:a", "aac", "-b:a", "96k", "-f", "mpegts", srt],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        def live() -> bool:
            r = http("GET", f"{show['base']}/api/v1/streams/{STREAM}", token=show["admin"])
            return r.status == 200 and bool(r.json().get("live"))

        wait_until(live, timeout=20, interval=0.25)
        yield proc
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def open_room(browser, base: str, user: str, password: str) -> tuple[Any, Any, Console]:
    return open_control_room(browser, base, user, password, STREAM, name=f"control ({user})")


TILE = f".tile[data-name={STREAM}]"
HAS_MARKER = """([kind, open]) => [...document.querySelectorAll('#qc-list li.qc-marker')].some(
    (li) => li.querySelector('.qc-type').textContent === kind && (open === null || li.dataset.open === open))"""
BADGE = """([sel, shown]) => [...document.querySelectorAll(sel)].some(
    (b) => b.textContent.startsWith('BLACK')) === shown"""
FLAGGED = """(kind) => [...document.querySelectorAll('#qc-list li.qc-marker')].some(
    (li) => li.querySelector('.qc-type').textContent === kind && li.dataset.fp === '1')"""


def test_director_enables_qc_and_sees_meters_faults_and_markers(browser, server, show, feed) -> None:
    ctx_a, a, console_a = open_room(browser, server.url, "admin", ADMIN_PASSWORD)
    ctx_b = None
    try:
        qc_button = f"{TILE} .tile-qc"
        a.wait_for_selector(f'{qc_button}[aria-pressed="false"]:not([disabled])', timeout=10000)
        # QC is off by default: a live tile without meter readings.
        time.sleep(1.5)
        assert a.is_hidden(f"{TILE} .tile-meter")
        assert not [line for line in server.output if "qc.attached" in line or "qc.worker_started" in line]
        a.click(qc_button)
        a.wait_for_selector(f'{qc_button}[aria-pressed="true"]', timeout=10000)
        # The server took it: the stream's effective setting says so.
        r = http("GET", f"{show['base']}/api/v1/streams/{STREAM}/settings", token=show["admin"])
        assert r.json()["effective"]["qc"]["enabled"] is True and r.json()["stored"] == {"qc": {"enabled": True}}
        # Meters arrive and move (the tone's level swings).
        a.wait_for_selector(f"{TILE} .tile-meter:not([hidden])", timeout=20000)
        readings = set()
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline and len(readings) < 3:
            readings.add(a.text_content(f"{TILE} .meter-text"))
            time.sleep(0.3)
        assert len(readings) >= 3, readings
        # Black (and silence) opens a badge on the tile and a marker in the panel ...
        a.wait_for_function(BADGE, arg=[f"{TILE} .tile-faults .b-fault", True], timeout=CYCLE * 1000 + 10000)
        a.wait_for_function(HAS_MARKER, arg=["black", "1"], timeout=10000)
        ARTIFACTS.mkdir(exist_ok=True)
        a.screenshot(path=str(ARTIFACTS / "control-qc-fault.png"))
        # ... which close when the picture and sound come back.
        a.wait_for_function(HAS_MARKER, arg=["black", "0"], timeout=15000)
        a.wait_for_function(HAS_MARKER, arg=["silence", "0"], timeout=15000)
        a.wait_for_function(BADGE, arg=[f"{TILE} .tile-faults .b-fault", False], timeout=10000)
        # The timeline strip draws the closed marker; picking its block (by
        # keyboard) brings the marker's entry into focus.
        block = a.locator("#qc-timeline .qct-row[data-kind='black'] .qct-block[data-open='0']").first
        block.wait_for(state="visible", timeout=10000)
        block.focus()
        a.keyboard.press("Enter")
        a.wait_for_function("""() => document.activeElement && document.activeElement.matches('#qc-list li.qc-marker')
            && document.activeElement.querySelector('.qc-type').textContent === 'black'""", timeout=5000)
        # A second director's room lists the same marker.
        ctx_b, b, console_b = open_room(browser, server.url, "qcdir", DIRECTOR_PASSWORD)
        b.wait_for_function(HAS_MARKER, arg=["black", "0"], timeout=15000)
        assert not b.evaluate(FLAGGED, "black")
        # Flag it a false positive in the first room: the second shows it at once.
        closed_black = a.locator("#qc-list li.qc-marker[data-open='0']").filter(
            has=a.locator(".qc-type", has_text="black")).first
        fp = closed_black.locator(".qc-fp")
        fp.wait_for(state="visible")
        wait_until(lambda: fp.is_enabled(), timeout=10, interval=0.1)  # its row id has come back
        fp.click()
        a.wait_for_function(FLAGGED, arg="black", timeout=10000)
        b.wait_for_function(FLAGGED, arg="black", timeout=10000)
        console_a.assert_clean()
        console_b.assert_clean()
    finally:
        if ctx_b is not None:
            ctx_b.close()
        ctx_a.close()


def test_settings_dialog_by_keyboard(browser, server, show) -> None:
    ctx, page, console = open_room(browser, server.url, "qcdir", DIRECTOR_PASSWORD)
    try:
        settings = f"{TILE} .tile-settings"
        page.wait_for_selector(f"{TILE} .tile-qc:not([disabled])", timeout=10000)
        page.focus(settings)
        page.keyboard.press("Enter")
        dialog = page.wait_for_selector("#qc-settings-dialog[open]", timeout=10000)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "control-qc-settings.png"))
        # The room's shortcuts stay out of the dialog: Space toggles a checkbox, not CUT.
        assert page.evaluate("document.activeElement.name") == "qc_enabled"
        page.fill("#qc-settings-dialog input[name=black_d]", "3.5")
        page.fill("#qc-settings-dialog input[name=target_lufs]", "-24")
        page.select_option("#qc-settings-dialog select[name=language]", "es")
        page.focus("#qc-settings-dialog input[name=captions_enabled]")
        page.keyboard.press("Space")
        page.focus("#qc-settings-dialog button[type=submit]")
        page.keyboard.press("Enter")
        page.wait_for_selector("#qc-settings-dialog", state="detached", timeout=10000)
        assert dialog is not None
        r = http("GET", f"{show['base']}/api/v1/streams/{STREAM}/settings", token=show["admin"])
        stored = r.json()["stored"]
        assert stored["qc"]["thresholds"] == {"black_d": 3.5, "target_lufs": -24}, stored
        assert stored["captions"] == {"enabled": True, "language": "es"}, stored
        page.wait_for_selector(f'{TILE} .tile-cc[aria-pressed="true"]', timeout=10000)
        # Focus is back on the button that opened it; an out-of-range value is refused in the dialog.
        assert page.evaluate("document.activeElement.classList.contains('tile-settings')")
        page.keyboard.press("Enter")
        page.wait_for_selector("#qc-settings-dialog[open]", timeout=10000)
        assert page.input_value("#qc-settings-dialog input[name=black_d]") == "3.5"
        page.fill("#qc-settings-dialog input[name=black_d]", "500")
        page.click("#qc-settings-dialog button[type=submit]")
        page.wait_for_function("() => document.querySelector('#qc-settings-dialog .error').textContent !== ''",
                               timeout=10000)
        page.keyboard.press("Escape")
        page.wait_for_selector("#qc-settings-dialog", state="detached", timeout=10000)
        r = http("GET", f"{show['base']}/api/v1/streams/{STREAM}/settings", token=show["admin"])
        assert r.json()["stored"]["qc"]["thresholds"]["black_d"] == 3.5
        console.assert_clean()
    finally:
        ctx.close()
