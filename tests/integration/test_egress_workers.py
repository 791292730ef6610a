"""Issue 15: WHEP viewers served by two egress worker processes, end to end:
ffmpeg → SRT → server (packetizes once) → worker processes → real viewers."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from helpers import ServerProcess, ffmpeg_publish, http, login, metrics_url, stop_process, wait_live, wait_until

pytestmark = pytest.mark.integration

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent / "loadtests"))

OFFER = (Path(__file__).parent.parent / "fixtures" / "sdp" / "chromium_whep_offer.sdp").read_text()
STARTED = re.compile(r"egress\.worker_started.*?worker=(\d+).*?pid=(\d+)")


@pytest.fixture(scope="module")
def env(module_db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    srv = ServerProcess(tmp_path_factory.mktemp("srv"), env={
        "DATABASE_URL": module_db_url, "RETURNFEED_ADMIN_PASSWORD": "admin-password-1",
        "RETURNFEED_WEBRTC__EGRESS_WORKERS": "2", "RETURNFEED_HTTP__MAX_CONNECTIONS_PER_IP": "0",
        # The test's viewers gather only 127.0.0.1: offered the same address,
        # each checks the address the server's route back to it leaves from,
        # and its worker can take its datagrams directly (ice_direct_to_workers).
        "RETURNFEED_WEBRTC__ICE_HOST_ADDRESSES": '["127.0.0.1"]'})
    srv.admin_password = "admin-password-1"
    srv.start()
    procs = []
    try:
        base = srv.url
        admin = login(base, "admin", srv.admin_password)["access_token"]
        assert http("POST", f"{base}/api/v1/productions", {"name": "Egress show"}, token=admin).status == 201
        streams = {}
        for name in ("live1", "whip1"):
            r = http("POST", f"{base}/api/v1/streams", {"name": name, "production": "Egress show"}, token=admin)
            assert r.status == 201, r.body
            streams[name] = r.json()
        srt = streams["live1"]["srt_url"].replace("localhost:8890", f"127.0.0.1:{srv.srt_port}").replace(
            ":0?", f":{srv.srt_port}?")
        procs.append(ffmpeg_publish(srt, seconds=300))
        wait_live(base, "live1", admin)
        wait_until(lambda: len(worker_pids(srv)) >= 2, timeout=60, interval=0.2)
        yield {"base": base, "admin": admin, "srv": srv}
    finally:
        for p in procs:
            stop_process(p)
        srv.stop()


def worker_pids(srv: ServerProcess) -> dict[int, int]:
    """Worker index → pid of its latest start (from the server's log)."""
    out: dict[int, int] = {}
    for line in list(srv.output):
        m = STARTED.search(line)
        if m:
            out[int(m.group(1))] = int(m.group(2))
    return out


def metrics(base: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in http("GET", metrics_url(base)).body.decode().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def _connect(base: str, admin: str, n: int, **kw: Any) -> list[Any]:
    from whep_client import WhepViewer

    viewers = [WhepViewer(f"{base}/whep/live1", token=admin, **kw) for _ in range(n)]
    await asyncio.gather(*(v.connect() for v in viewers))
    return viewers


def udp_ports(pid: int) -> set[int]:
    """Local ports of the UDP sockets process ``pid`` holds (from /proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("udp", "udp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            next(f)
            for row in f:
                cols = row.split()
                if cols[9] in inodes:
                    ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def _video_packets(v: Any) -> int:
    return v.stats.video.packets if v.stats.video is not None else 0


def test_viewers_spread_over_both_workers_and_play(env) -> None:
    base, admin = env["base"], env["admin"]

    async def main() -> dict:
        viewers = await _connect(base, admin, 4)
        try:
            await asyncio.sleep(3)
            out: dict[str, Any] = {"packets": [_video_packets(v) for v in viewers],
                                   "audio": [v.stats.audio.packets if v.stats.audio else 0 for v in viewers]}
            out["metrics"] = await asyncio.to_thread(metrics, base)
            out["state"] = http("GET", f"{base}/api/v1/streams/live1", token=admin).json()
            out["listed"] = http("GET", f"{base}/api/v1/streams/live1/viewers", token=admin).json()
            out["sessions"] = [http("GET", v.stats.location, token=admin) for v in viewers]
            # Layer control is a call to the viewer's worker: its answers and refusals.
            first = viewers[0].stats.location
            current = http("GET", first, token=admin).json()["layer"]
            out["pin"] = [http("POST", first.split("?")[0] + "/layer", {"layer": name}, token=admin)
                          for name in (current, "auto", "nope")]
            return out
        finally:
            for v in viewers:
                await v.close()

    out = asyncio.run(main())
    assert all(p >= 100 for p in out["packets"]), out["packets"]  # ≈3 s of 800 kbit/s, GOP replay included
    assert all(p >= 50 for p in out["audio"]), out["audio"]
    m = out["metrics"]
    assert m['returnfeed_egress_worker_viewers{worker="0"}'] == 2
    assert m['returnfeed_egress_worker_viewers{worker="1"}'] == 2
    assert m['returnfeed_egress_worker_up{worker="0"}'] == m['returnfeed_egress_worker_up{worker="1"}'] == 1
    assert sum(v for k, v in m.items() if k.startswith("returnfeed_viewers{")) == 4
    assert m["returnfeed_webrtc_packets_sent_total"] >= sum(out["packets"])
    assert m["returnfeed_forwarding_latency_seconds_count"] > 0
    assert m["returnfeed_webrtc_ice_relay_packets_total"] > 0  # ICE checks and DTLS came through main's port
    # Once connected, each viewer's datagrams (its RTCP) reach its worker on a
    # socket connected to it, past the server process (webrtc.ice_direct_to_workers).
    assert m["returnfeed_webrtc_ice_direct_sockets"] == 4
    assert m["returnfeed_webrtc_ice_direct_packets_total"] > 0
    assert m["returnfeed_webrtc_ice_direct_refused_total"] == 0
    # Garbage-collector pauses, the server's and the workers' (young collections happen within seconds).
    assert m['returnfeed_gc_pause_seconds_count{generation="0",process="server"}'] > 0
    assert m['returnfeed_gc_pause_seconds_count{generation="0",process="egress_worker"}'] > 0
    assert 'returnfeed_gc_pause_seconds_bucket{generation="2",le="0.05",process="egress_worker"}' in m
    # One family per name in a scrape (Prometheus refuses a second TYPE line
    # for a name): the workers' figures are merged into the server's families.
    types = [line.split()[2] for line in http("GET", metrics_url(base)).body.decode().splitlines()
             if line.startswith("# TYPE ")]
    assert len(types) == len(set(types)), sorted(t for t in set(types) if types.count(t) > 1)
    assert out["state"]["viewers"] == 4 and sum(out["state"]["viewers_by_layer"].values()) == 4
    assert len(out["listed"]["viewers"]) == 4
    assert all(v["packets_sent"] > 0 for v in out["listed"]["viewers"])
    for r in out["sessions"]:
        assert r.status == 200, r.body
        assert r.json()["state"] == "connected" and r.json()["stats"]["packets_sent"] > 0
    pinned, auto, nope = out["pin"]
    assert pinned.status == 200 and pinned.json()["pinned"] is True, pinned.body
    assert auto.status == 200 and auto.json() == {"layer": auto.json()["layer"], "pinned": False}
    assert nope.status == 400 and nope.json()["error"] == "bad_request", nope.body


def test_every_viewer_is_on_the_one_ice_port_of_the_server(env) -> None:
    base, admin, srv = env["base"], env["admin"], env["srv"]
    offer = (Path(__file__).parent.parent / "fixtures" / "sdp" / "chromium_whep_offer.sdp").read_text()
    answers = [http("POST", f"{base}/whep/live1", raw=offer.encode(), token=admin,
                    headers={"Content-Type": "application/sdp"}) for _ in range(4)]
    try:
        assert all(r.status == 201 for r in answers), [r.body for r in answers]
        ports = {int(line.split()[5]) for r in answers for line in r.body.decode().splitlines()
                 if line.startswith("a=candidate:") and " udp " in line.lower()}
        m = metrics(base)
        assert m['returnfeed_egress_worker_viewers{worker="0"}'] == 2  # answered by both workers
        assert m['returnfeed_egress_worker_viewers{worker="1"}'] == 2
    finally:
        for r in answers:
            if r.status == 201:
                http("DELETE", base + r.headers["Location"], token=admin)
    assert len(ports) == 1, ports
    assert ports <= udp_ports(srv.proc.pid)  # the server's own shared socket


def test_nacks_are_answered_with_rtx_by_each_worker(env) -> None:
    from media.rtp.rtcp import build_nack

    base, admin = env["base"], env["admin"]

    async def main() -> list[dict]:
        viewers = await _connect(base, admin, 2)
        try:
            await asyncio.sleep(1.5)
            for v in viewers:
                st = v.stats.video
                # A packet it has (sent a moment ago, well inside the history):
                # the server resends it on the RTX stream whatever we claim.
                seqs = [(st.last_seq - i) & 0xFFFF for i in (3, 4, 5)]
                assert v._send_rtcp(bytes(build_nack(v._rtcp_ssrc, st.ssrc, seqs)))
            await asyncio.sleep(1.5)  # past a stats period
            return [http("GET", v.stats.location, token=admin).json() for v in viewers]
        finally:
            for v in viewers:
                await v.close()

    before = metrics(base)
    sessions = asyncio.run(main())
    after = metrics(base)
    for s in sessions:
        assert s["stats"]["nacks"] >= 1 and s["stats"]["retransmits"] >= 1, s
    assert after["returnfeed_webrtc_retransmits_total"] - before.get("returnfeed_webrtc_retransmits_total", 0) >= 2


def test_a_viewers_pli_reaches_the_whip_publisher(env) -> None:
    import aiohttp
    import av
    import numpy as np
    from aiortc import RTCPeerConnection, RTCSessionDescription, VideoStreamTrack

    base, admin = env["base"], env["admin"]
    token = http("POST", f"{base}/api/v1/streams/whip1/links", {"action": "publish"}, token=admin).json()["token"]

    class Pattern(VideoStreamTrack):
        async def recv(self):  # type: ignore[no-untyped-def]
            pts, time_base = await self.next_timestamp()
            img = np.zeros((240, 320, 3), np.uint8)
            img[..., 1] = pts % 256
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts, frame.time_base = pts, time_base
            return frame

    async def main() -> dict:
        from whep_client import WhepViewer
        from media.rtp.rtcp import build_pli

        pub = RTCPeerConnection()
        pub.addTransceiver(Pattern(), direction="sendonly")
        await pub.setLocalDescription(await pub.createOffer())
        async with aiohttp.ClientSession() as client:
            async with client.post(f"{base}/whip/whip1?token={token}", data=pub.localDescription.sdp,
                                   headers={"Content-Type": "application/sdp"}) as resp:
                answer = await resp.text()
                assert resp.status == 201, answer
                loc = base + resp.headers["Location"]
            await pub.setRemoteDescription(RTCSessionDescription(answer, "answer"))
            await asyncio.to_thread(wait_live, base, "whip1", admin, 30)
            # One viewer on each worker; both ask for a keyframe.
            viewers = [WhepViewer(f"{base}/whep/whip1", token=admin) for _ in range(2)]
            await asyncio.gather(*(v.connect() for v in viewers))
            try:
                await asyncio.sleep(1.0)
                for v in viewers:
                    assert v._send_rtcp(bytes(build_pli(v._rtcp_ssrc, v.stats.video.ssrc)))
                await asyncio.sleep(1.0)
                async with client.get(loc, headers={"Authorization": f"Bearer {token}"}) as r:
                    whip = await r.json()
                m = await asyncio.to_thread(metrics, base)
            finally:
                for v in viewers:
                    await v.close()
                async with client.delete(loc, headers={"Authorization": f"Bearer {token}"}):
                    pass
        await pub.close()
        return {"whip": whip, "metrics": m}

    out = asyncio.run(main())
    st = out["whip"]["stats"]
    assert st["keyframe_requests"] >= 1 and st["plis_sent"] >= 1, st
    assert out["metrics"]["returnfeed_webrtc_plis_total"] >= 2


def test_a_killed_worker_takes_only_its_viewers_and_comes_back(env) -> None:
    base, admin, srv = env["base"], env["admin"], env["srv"]
    pids = worker_pids(srv)

    async def main() -> dict:
        viewers = await _connect(base, admin, 2)
        out: dict[str, Any] = {}
        try:
            await asyncio.sleep(1.0)
            m = await asyncio.to_thread(metrics, base)
            assert m['returnfeed_egress_worker_viewers{worker="0"}'] == 1, m
            # Which viewer lives on worker 0: the one whose session the
            # worker's death ends.
            os.kill(pids[0], signal.SIGKILL)
            gone = await asyncio.to_thread(wait_until, lambda: [
                v for v in viewers if http("GET", v.stats.location, token=admin).status == 404], 10, 0.1)
            assert len(gone) == 1
            survivor = next(v for v in viewers if v not in gone)
            before = _video_packets(survivor)
            await asyncio.sleep(2.0)
            out["survivor_gain"] = _video_packets(survivor) - before
            out["survivor_session"] = http("GET", survivor.stats.location, token=admin)
            out["restarted"] = await asyncio.to_thread(
                wait_until, lambda: worker_pids(srv).get(0) not in (None, pids[0]) and metrics(base).get(
                    'returnfeed_egress_worker_up{worker="0"}') == 1, 30, 0.2)
            late = (await _connect(base, admin, 1))[0]
            viewers.append(late)
            await asyncio.sleep(2.0)
            out["late_packets"] = _video_packets(late)
            out["metrics"] = await asyncio.to_thread(metrics, base)
        finally:
            for v in viewers:
                await v.close()
        return out

    out = asyncio.run(main())
    assert out["survivor_gain"] >= 50, out  # the other worker's viewer never noticed
    assert out["survivor_session"].status == 200
    m = out["metrics"]
    assert m['returnfeed_webrtc_sessions_closed_total{reason="worker_died"}'] >= 1
    assert m['returnfeed_egress_worker_restarts_total{worker="0"}'] == 1
    assert m['returnfeed_egress_worker_viewers{worker="0"}'] == 1  # the new viewer went to the emptier worker
    assert out["late_packets"] >= 50, out
    assert not alive(pids[0])


def test_shutdown_is_ordered_and_leaves_no_worker_behind(env) -> None:
    srv = env["srv"]
    pids = list(worker_pids(srv).values())
    assert pids and all(alive(p) for p in pids)
    assert srv.stop() == 0
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in pids)
    assert not [line for line in srv.output if "Traceback" in line], "\n".join(srv.output[-60:])
    # The workers' own log lines reach the server's log, tagged with the worker.
    assert [line for line in srv.output if "webrtc.viewer_started" in line and " worker=" in line]
    # Start-up's objects are out of the full collections' way, in both kinds of process.
    assert [line for line in srv.output if "server.heap_frozen" in line]
    assert len([line for line in srv.output if "egress.heap_frozen" in line and " worker=" in line]) >= 2


def test_workers_exit_when_the_server_process_is_killed(db_url: str, tmp_path_factory) -> None:
    srv = ServerProcess(tmp_path_factory.mktemp("srv-kill"), env={
        "DATABASE_URL": db_url, "RETURNFEED_ADMIN_PASSWORD": "admin-password-1",
        "RETURNFEED_WEBRTC__EGRESS_WORKERS": "2"})
    srv.start()
    try:
        pids = wait_until(lambda: list(worker_pids(srv).values()) if len(worker_pids(srv)) == 2 else None, 60, 0.2)
        assert all(alive(p) for p in pids)
        os.kill(srv.proc.pid, signal.SIGKILL)  # no ordered stop: the workers find out by themselves
        srv.proc.wait(10)
        deadline = time.monotonic() + 10
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(p) for p in pids)
    finally:
        srv.kill()


def tcp_listen_ports(pid: int) -> set[int]:
    """Local ports of the listening TCP sockets process ``pid`` holds."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            next(f)
            for row in f:
                cols = row.split()
                if cols[9] in inodes and cols[3] == "0A":  # LISTEN
                    ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def test_answers_from_workers_offer_the_servers_ice_tcp_port(db_url: str, tmp_path_factory) -> None:
    srv = ServerProcess(tmp_path_factory.mktemp("srv-tcp"), env={
        "DATABASE_URL": db_url, "RETURNFEED_ADMIN_PASSWORD": "admin-password-1",
        "RETURNFEED_WEBRTC__EGRESS_WORKERS": "2", "RETURNFEED_WEBRTC__ICE_TCP": "true",
        "RETURNFEED_WEBRTC__ICE_TCP_PORT": "0"})
    srv.start()
    proc = None
    try:
        base = srv.url
        admin = login(base, "admin", "admin-password-1")["access_token"]
        assert http("POST", f"{base}/api/v1/productions", {"name": "TCP show"}, token=admin).status == 201
        r = http("POST", f"{base}/api/v1/streams", {"name": "tcp1", "production": "TCP show"}, token=admin)
        srt = r.json()["srt_url"].replace("localhost:8890", f"127.0.0.1:{srv.srt_port}").replace(
            ":0?", f":{srv.srt_port}?")
        proc = ffmpeg_publish(srt, seconds=60)
        wait_live(base, "tcp1", admin)
        offer = (Path(__file__).parent.parent / "fixtures" / "sdp" / "chromium_whep_offer.sdp").read_text()
        answers = [http("POST", f"{base}/whep/tcp1", raw=offer.encode(), token=admin,
                        headers={"Content-Type": "application/sdp"}) for _ in range(2)]
        assert all(a.status == 201 for a in answers), [a.body for a in answers]
        m = metrics(base)
        tcp = {int(line.split()[5]) for a in answers for line in a.body.decode().splitlines()
               if line.startswith("a=candidate:") and " tcp " in line.lower() and "tcptype passive" in line}
        listening = tcp_listen_ports(srv.proc.pid)
    finally:
        if proc is not None:
            stop_process(proc)
        srv.stop()
    assert m['returnfeed_egress_worker_viewers{worker="0"}'] == 1
    assert m['returnfeed_egress_worker_viewers{worker="1"}'] == 1
    assert len(tcp) == 1 and tcp <= listening, (tcp, listening)  # main's own ICE-TCP listener


def test_without_the_shared_ice_port_workers_use_a_socket_per_session(db_url: str, tmp_path_factory) -> None:
    """Also: the viewer limit across workers is a 503 that says so."""
    srv = ServerProcess(tmp_path_factory.mktemp("srv-nomux"), env={
        "DATABASE_URL": db_url, "RETURNFEED_ADMIN_PASSWORD": "admin-password-1",
        "RETURNFEED_WEBRTC__EGRESS_WORKERS": "1", "RETURNFEED_WEBRTC__ICE_MUX": "false",
        "RETURNFEED_WEBRTC__MAX_VIEWERS": "1"})
    srv.start()
    proc = None
    try:
        base = srv.url
        admin = login(base, "admin", "admin-password-1")["access_token"]
        assert http("POST", f"{base}/api/v1/productions", {"name": "No mux"}, token=admin).status == 201
        r = http("POST", f"{base}/api/v1/streams", {"name": "nomux1", "production": "No mux"}, token=admin)
        srt = r.json()["srt_url"].replace("localhost:8890", f"127.0.0.1:{srv.srt_port}").replace(
            ":0?", f":{srv.srt_port}?")
        proc = ffmpeg_publish(srt, seconds=60)
        wait_live(base, "nomux1", admin)

        async def main() -> int:
            from whep_client import WhepViewer

            async with WhepViewer(f"{base}/whep/nomux1", token=admin) as v:
                await asyncio.sleep(2)
                full = await asyncio.to_thread(
                    http, "POST", f"{base}/whep/nomux1", token=admin, raw=OFFER.encode(),
                    headers={"Content-Type": "application/sdp"})
                return _video_packets(v), full

        packets, full = asyncio.run(main())
        m = metrics(base)
    finally:
        if proc is not None:
            stop_process(proc)
        srv.stop()
    assert packets >= 50
    assert full.status == 503 and full.headers["Retry-After"] == "10", full.body
    assert full.json() == {"error": "unavailable", "detail": "viewer limit reached"}
    assert "returnfeed_webrtc_ice_relay_packets_total" not in m  # nothing relayed: no shared port
    assert m["returnfeed_webrtc_packets_sent_total"] >= packets
