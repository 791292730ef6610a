"""Issue 15: real Chromium plays WHEP from a server whose viewers live in two
egress worker processes (``webrtc.egress_workers = 2``), fed by ffmpeg over SRT."""

from __future__ import annotations

import asyncio

import pytest

from helpers import (CHROMIUM_ARGS, FAKE_MEDIA_ARGS, ServerProcess, chromium_whep_samples, ffmpeg_publish, http,
                     login, metrics_url, stop_process, wait_live)

pytestmark = pytest.mark.browser

STATS = """async () => { const out = {}; (await window._pc.getStats()).forEach(r => {
  if (r.type === 'inbound-rtp') out[r.kind] = {framesDecoded: r.framesDecoded || 0, freezeCount: r.freezeCount || 0,
    totalFreezesDuration: r.totalFreezesDuration || 0, nackCount: r.nackCount || 0,
    framesDropped: r.framesDropped || 0, jitterBufferDelay: r.jitterBufferDelay || 0,
    jitterBufferEmittedCount: r.jitterBufferEmittedCount || 0,
    packetsReceived: r.packetsReceived, frameWidth: r.frameWidth || 0}; }); return out; }"""


def test_chromium_plays_whep_served_by_egress_workers(module_db_url, tmp_path_factory) -> None:
    srv = ServerProcess(tmp_path_factory.mktemp("srv"), env={
        "DATABASE_URL": module_db_url, "RETURNFEED_ADMIN_PASSWORD": "admin-password-1",
        "RETURNFEED_WEBRTC__EGRESS_WORKERS": "2"})
    srv.start()
    proc = None
    try:
        base = srv.url
        admin = login(base, "admin", "admin-password-1")["access_token"]
        assert http("POST", f"{base}/api/v1/productions", {"name": "Chromium"}, token=admin).status == 201
        r = http("POST", f"{base}/api/v1/streams", {"name": "chrome-egress", "production": "Chromium"}, token=admin)
        assert r.status == 201, r.body
        url = r.json()["srt_url"].replace(":8890?", f":{srv.srt_port}?").replace(":0?", f":{srv.srt_port}?")
        proc = ffmpeg_publish(url, seconds=60)
        wait_live(base, "chrome-egress", admin)
        _, samples = asyncio.run(chromium_whep_samples(base, "chrome-egress", admin, 6, STATS,
                                                       [*CHROMIUM_ARGS, *FAKE_MEDIA_ARGS]))
        metrics = http("GET", metrics_url(base)).body.decode()
    finally:
        if proc is not None:
            stop_process(proc)
        assert srv.stop() == 0
    video = [s["video"] for s in samples if "video" in s]
    decoded = [v["framesDecoded"] for v in video]
    print(f"framesDecoded per second {decoded}, freezeCount per second {[v['freezeCount'] for v in video]}, "
          f"last {video[-1]}")
    assert decoded[-1] >= 80, decoded  # 25 fps for ~6 s
    assert all(b > a for a, b in zip(decoded[1:], decoded[2:])), decoded  # keeps growing
    egress = [line for line in metrics.splitlines() if line.startswith(("returnfeed_egress_worker_feed_drops",
                                                                        "returnfeed_webrtc_plis_total"))]
    # One freeze is tolerated, and not for the worker hop: measured per frame
    # (issue 15: 18 runs with 2 workers, 10 with one process, alternating, on
    # a 2-core machine shared with other CPU-bound jobs), the worker forwards
    # a frame 1.2-1.7 ms (median) after the server's ingest stamped it; every
    # loop lag > 20 ms came with < 6 ms of the loop's own CPU, at the same
    # instant in the server and the worker (the machine, not the process); no
    # NACK, no dropped frame. The freezes seen (3 of 18; 0 of 10 in one
    # process, p ≈ 0.25) all fell in the first second; the two logged per
    # frame came 0.2-0.3 s after the join, after the *ingest* (ffmpeg → SRT
    # → demux) had delivered no frame for 137-170 ms, just after the join
    # replay, which Chromium renders at once: its interframe
    # average is then low and so its freeze threshold (max(3 × average,
    # average + 150 ms)). An ffmpeg paused (SIGSTOP) 250 ms in the steady
    # state freezes both modes alike, 170 ms neither.
    # More than one is a failure.
    assert video[-1]["freezeCount"] <= 1 and video[-1]["frameWidth"] == 640, (video[-1], egress)
    assert samples[-1].get("audio", {}).get("packetsReceived", 0) > 100
    # The viewer was served by a worker process, not the server's own loop.
    assert 'returnfeed_egress_worker_up{worker="0"} 1.0' in metrics
    assert 'returnfeed_egress_worker_up{worker="1"} 1.0' in metrics
    # Every packet counted here was sent by a worker (the host sums theirs),
    # and they are the packets Chromium received: at least as many, less
    # what the workers' last 0.5 s report may not hold yet (a fixed 1000
    # failed at 992 on a loaded machine, where ffmpeg sends fewer).
    sent = next(float(line.split()[-1]) for line in metrics.splitlines()
                if line.startswith("returnfeed_webrtc_packets_sent_total "))
    received = sum(samples[-1].get(kind, {}).get("packetsReceived") or 0 for kind in ("audio", "video"))
    assert received > 300 and sent >= 0.8 * received, (sent, received)
    # Chromium's RTCP reached its worker on a socket connected to it, past the
    # server process (webrtc.ice_direct_to_workers), unless the server's route
    # to Chromium's address leaves from another address than the one Chromium
    # checked (a host with several interfaces): then through the relay.
    direct = {line.split()[0]: float(line.split()[-1]) for line in metrics.splitlines()
              if line.startswith("returnfeed_webrtc_ice_direct_")}
    assert direct["returnfeed_webrtc_ice_direct_sockets"] + direct["returnfeed_webrtc_ice_direct_refused_total"] == 1
    if direct["returnfeed_webrtc_ice_direct_sockets"]:
        assert direct["returnfeed_webrtc_ice_direct_packets_total"] > 0, direct
