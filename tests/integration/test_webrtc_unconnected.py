"""Issue 9 item 9: WHEP and WHIP sessions that never complete ICE+DTLS are
freed, and a WHIP session that never connected does not lock its stream."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from helpers import ServerProcess, ffmpeg_publish, http, login, metrics_url, stop_process, wait_live, wait_until

pytestmark = pytest.mark.integration

WHEP_OFFER = (Path(__file__).parent.parent / "fixtures" / "sdp" / "chromium_whep_offer.sdp").read_text()


@pytest.fixture(scope="module")
def env(module_db_url, tmp_path_factory):  # type: ignore[no-untyped-def]
    srv = ServerProcess(tmp_path_factory.mktemp("unconnected"), env={
        "DATABASE_URL": module_db_url, "RETURNFEED_ADMIN_PASSWORD": "unconn-admin-pw",
        "RETURNFEED_WEBRTC__CONNECT_TIMEOUT_S": "2"}).start()
    try:
        base = srv.url
        admin = login(base, "admin", "unconn-admin-pw")["access_token"]
        assert http("POST", f"{base}/api/v1/productions", {"name": "Unconnected"}, token=admin).status == 201
        streams = {}
        for name in ("v1", "w1"):
            r = http("POST", f"{base}/api/v1/streams", {"name": name, "production": "Unconnected"}, token=admin)
            assert r.status == 201, r.body
            streams[name] = r.json()
        yield {"base": base, "admin": admin, "streams": streams, "server": srv}
    finally:
        srv.stop()


def _metric(base: str, name: str) -> float:
    text = http("GET", metrics_url(base)).body.decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def test_whep_sessions_that_never_connect_are_freed(env) -> None:
    base, admin = env["base"], env["admin"]
    srt = env["streams"]["v1"]["srt_url"].replace("localhost:8890", f"127.0.0.1:{env['server'].srt_port}").replace(
        ":0?", f":{env['server'].srt_port}?")
    proc = ffmpeg_publish(srt, seconds=30)
    try:
        wait_live(base, "v1", admin)
        locations = []
        for _ in range(5):  # offers whose candidates lead nowhere: ICE never completes
            r = http("POST", f"{base}/whep/v1", raw=WHEP_OFFER.encode(), token=admin,
                     headers={"Content-Type": "application/sdp"})
            assert r.status == 201, r.body
            locations.append(r.headers["Location"])
        assert _metric(base, "returnfeed_viewers") == 5
        started = time.monotonic()
        wait_until(lambda: all(http("GET", base + loc, token=admin).status == 404 for loc in locations),
                   timeout=15, interval=0.25)
        assert time.monotonic() - started < 10
        assert _metric(base, "returnfeed_viewers") == 0
    finally:
        stop_process(proc)


def test_whip_session_that_never_connects_is_replaced_then_freed(env) -> None:
    from test_whip import CHROMIUM_OFFER

    base, admin = env["base"], env["admin"]

    def post() -> object:
        return http("POST", f"{base}/whip/w1", raw=CHROMIUM_OFFER.encode(), token=admin,
                    headers={"Content-Type": "application/sdp"})

    first = post()
    assert first.status == 201, first.body
    second = post()  # the first never connected: it does not lock the stream
    assert second.status == 201, second.body
    assert http("GET", base + first.headers["Location"], token=admin).status == 404
    assert http("GET", base + second.headers["Location"], token=admin).status == 200
    wait_until(lambda: http("GET", base + second.headers["Location"], token=admin).status == 404,
               timeout=10, interval=0.25)
    assert _metric(base, "returnfeed_whip_sessions") == 0
