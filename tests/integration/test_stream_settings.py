"""Per-stream QC/captions settings through the real server: GET/PATCH
/api/v1/streams/{name}/settings (who may, every bad input a 4xx JSON, the
audit row), and the live effect: an SRT feed is tapped only once its
director enables QC, and a change written by another node (straight into
the streams table) reaches this server through the directory's NOTIFY."""

from __future__ import annotations

import asyncio
import json
import subprocess
from urllib.parse import quote

import asyncpg
import pytest

from helpers import http, login, running_server, stop_process, wait_until

pytestmark = pytest.mark.integration

ADMIN_PASSWORD = "admin-password-1"


@pytest.fixture(scope="module")
def server(module_db_url: str, tmp_path_factory):
    """QC at its default: off for every stream."""
    with running_server(tmp_path_factory.mktemp("srv"), module_db_url, ADMIN_PASSWORD) as srv:
        yield srv


@pytest.fixture(scope="module")
def world(server) -> dict:
    base = server.url
    admin = login(base, "admin", ADMIN_PASSWORD)["access_token"]
    tokens = {"admin": admin}
    for name, role in (("sdir", "director"), ("sview", "viewer"), ("sother", "director")):
        r = http("POST", f"{base}/api/v1/users", {"username": name, "password": f"{name}-password", "role": role},
                 token=admin)
        assert r.status == 201, r.body
        tokens[name] = login(base, name, f"{name}-password")["access_token"]
    r = http("POST", f"{base}/api/v1/productions", {"name": "Settings show"}, token=tokens["sdir"])
    assert r.status == 201, r.body
    prod = r.json()
    r = http("PUT", f"{base}/api/v1/productions/{prod['id']}/members/sview", {"role": "viewer"}, token=tokens["sdir"])
    assert r.status == 200, r.body
    streams = {}
    for name in ("set-cam", "set-live"):
        r = http("POST", f"{base}/api/v1/streams", {"name": name, "production": prod["id"]}, token=tokens["sdir"])
        assert r.status == 201, r.body
        streams[name] = r.json()
    return {"base": base, "tokens": tokens, "streams": streams}


def url(world: dict, name: str = "set-cam") -> str:
    return f"{world['base']}/api/v1/streams/{name}/settings"


def run_sql(db_url: str, sql: str, *args):
    async def go():
        conn = await asyncpg.connect(db_url)
        try:
            return await conn.fetch(sql, *args)
        finally:
            await conn.close()
    return asyncio.run(go())


def test_get_shows_stored_and_effective_settings(world) -> None:
    t = world["tokens"]
    r = http("GET", url(world), token=t["sview"])  # any member reads
    assert r.status == 200, r.body
    body = r.json()
    assert body["stream"] == "set-cam" and body["stored"] == {}
    assert body["effective"]["qc"]["enabled"] is False  # [qc] enabled defaults to false
    assert body["effective"]["qc"]["thresholds"]["black_d"] == 2.0
    # [captions] defaults: off, language detected, the bundled tiny.en.
    assert body["effective"]["captions"] == {"enabled": False, "language": None, "translate": False,
                                             "model": "tiny.en"}
    assert body["limits"]["qc.thresholds"]["silence_d"] == {"min": 0.1, "max": 60.0}
    assert http("GET", url(world), token=t["sother"]).status == 403  # not a member
    assert http("GET", url(world)).status == 401
    r = http("GET", url(world, "no-such-stream"), token=t["admin"])
    assert r.status == 404 and r.json()["error"] == "not_found"


def test_directors_patch_and_the_change_is_audited(world, module_db_url) -> None:
    t = world["tokens"]
    patch = {"qc": {"thresholds": {"black_d": 3.5, "target_lufs": -24}},
             "captions": {"enabled": True, "language": "ko", "translate": True}}
    for who in ("sview", "sother"):
        r = http("PATCH", url(world), patch, token=t[who])
        assert r.status == 403 and r.json()["error"] == "forbidden", (who, r.body)
    r = http("PATCH", url(world), patch, token=t["sdir"])
    assert r.status == 200, r.body
    body = r.json()
    assert body["stored"] == patch
    eff = body["effective"]
    assert eff["qc"]["thresholds"]["black_d"] == 3.5 and eff["qc"]["thresholds"]["target_lufs"] == -24.0
    assert eff["qc"]["thresholds"]["freeze_d"] == 2.0 and eff["qc"]["enabled"] is False
    assert eff["captions"] == {"enabled": True, "language": "ko", "translate": True, "model": "tiny.en"}
    # Merge patch: keys absent stay, null goes back to the default.
    r = http("PATCH", url(world), {"qc": {"enabled": True, "thresholds": {"black_d": None}}}, token=t["sdir"])
    assert r.status == 200, r.body
    assert r.json()["stored"]["qc"] == {"enabled": True, "thresholds": {"target_lufs": -24}}
    assert r.json()["effective"]["qc"]["thresholds"]["black_d"] == 2.0
    # The stream's other settings survive, and the stream itself shows what is in force.
    s = http("GET", f"{world['base']}/api/v1/streams/set-cam", token=t["sdir"]).json()
    assert s["effective_settings"]["qc"]["enabled"] is True
    assert s["settings"]["captions"]["language"] == "ko"
    rows = run_sql(module_db_url, "SELECT actor, detail FROM audit_log WHERE action = 'stream.settings' "
                                  "AND target = 'set-cam' ORDER BY id")
    assert [r["actor"] for r in rows] == ["sdir", "sdir"]
    assert json.loads(rows[0]["detail"])["patch"] == patch
    r = http("PATCH", url(world), {"qc": None, "captions": None}, token=t["admin"])
    assert r.status == 200 and r.json()["stored"] == {}


@pytest.mark.parametrize("body, where", [
    ({"qc": {"enabled": "true"}}, "qc.enabled"),
    ({"qc": {"thresholds": {"black_d": -1}}}, "black_d"),
    ({"qc": {"thresholds": {"black_d": 1e9}}}, "black_d"),
    ({"qc": {"thresholds": {"silence_d": "2"}}}, "silence_d"),
    ({"qc": {"thresholds": {"tolerance_lu": False}}}, "tolerance_lu"),
    ({"qc": {"thresholds": {"drop_tables": 1}}}, "drop_tables"),
    ({"qc": {"enabled": True, "extra": 1}}, "extra"),
    ({"captions": {"language": "klingon"}}, "language"),
    ({"captions": {"model": "../../etc/passwd"}}, "model"),
    ({"subtitles": {}}, "subtitles"),
    ({}, "nothing to change"),
])
def test_bad_settings_are_400_naming_the_field(world, body, where) -> None:
    r = http("PATCH", url(world), body, token=world["tokens"]["sdir"])
    assert r.status == 400, r.body
    out = r.json()
    assert out["error"] == "bad_request" and where in out["detail"], out


def test_bad_bodies_are_4xx_json(world) -> None:
    t = world["tokens"]["sdir"]
    cases = [
        (b"[1, 2]", "application/json", 400),
        (b"{\"qc\": ", "application/json", 400),
        (b"{\"qc\": {\"enabled\": NaN}}", "application/json", 400),
        (b"qc=on", "application/x-www-form-urlencoded", 415),
        (json.dumps({"qc": {"enabled": True}, "pad": "x" * 20000}).encode(), "application/json", 413),
    ]
    for raw, ctype, status in cases:
        r = http("PATCH", url(world), raw=raw, headers={"Content-Type": ctype}, token=t)
        assert r.status == status, (raw[:40], r.status, r.body[:200])
        assert set(r.json()) >= {"error", "detail"}
    # The whole-settings routes keep the same schema for these sections.
    r = http("PATCH", f"{world['base']}/api/v1/streams/set-cam", {"settings": {"qc": {"enabled": 2}}}, token=t)
    assert r.status == 400 and "qc.enabled" in r.json()["detail"]
    r = http("POST", f"{world['base']}/api/v1/streams",
             {"name": "set-bad", "production": "Settings show", "settings": {"captions": {"model": "huge"}}}, token=t)
    assert r.status == 400 and "captions.model" in r.json()["detail"]


def publish(srt_url: str, seconds: int) -> subprocess.Popen:
    cmd = ["ffmpeg", "-nostdin", "-loglevel", "error", "-re", "-f", "lavfi", "-i",
           f"testsrc=s=320x180:r=25:d={seconds}", "-re", "-f", "lavfi", "-i",
           f"sine=frequency=440:sample_rate=48000:duration={seconds}",
           "-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency", "-g", "25", "-bf", "0",
           "-c:a", "aac", "-b:a", "64k", "-f", "mpegts", srt_url]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def lines(server, *words: str) -> list[str]:
    return [line for line in list(server.output) if all(w in line for w in words)]


def test_qc_follows_the_streams_setting_live_and_across_nodes(server, world, module_db_url) -> None:
    s = world["streams"]["set-live"]
    srt = (f"srt://127.0.0.1:{server.srt_port}?streamid={quote('publish:set-live', safe=':')}"
           f"&passphrase={s['passphrase']}&pbkeylen={s['pbkeylen']}&latency=120000")
    proc = publish(srt, 40)
    try:
        wait_until(lambda: http("GET", f"{world['base']}/api/v1/streams/set-live",
                                token=world["tokens"]["sdir"]).json().get("live"), timeout=20, interval=0.2)
        # Live, but QC is off by default: no tap, no worker process.
        assert not lines(server, "qc.attached", "stream=set-live")
        assert not lines(server, "qc.worker_started")
        r = http("PATCH", url(world, "set-live"), {"qc": {"enabled": True}}, token=world["tokens"]["sdir"])
        assert r.status == 200, r.body
        wait_until(lambda: lines(server, "qc.tap_state", "stream=set-live", "state=running"), timeout=20,
                   interval=0.1)
        assert lines(server, "qc.worker_started")
        # Another node (here: SQL straight into the table) changes a threshold
        # and then switches QC off; the streams trigger's NOTIFY brings both here.
        run_sql(module_db_url, """UPDATE streams SET settings = jsonb_set(settings, '{qc,thresholds}',
                                  '{"black_d": 4}'::jsonb) WHERE name = 'set-live'""")
        wait_until(lambda: lines(server, "qc.thresholds", "stream=set-live"), timeout=10, interval=0.1)
        run_sql(module_db_url, """UPDATE streams SET settings = jsonb_set(settings, '{qc,enabled}', 'false')
                                  WHERE name = 'set-live'""")
        wait_until(lambda: lines(server, "qc.detached", "stream=set-live", "reason=disabled"), timeout=10,
                   interval=0.1)
        wait_until(lambda: lines(server, "qc.tap_state", "stream=set-live", "state=stopped"), timeout=10,
                   interval=0.1)
    finally:
        stop_process(proc)
