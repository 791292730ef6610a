"""Issue 14: every WHIP and WHEP session on one UDP port, host candidates
from config, announced addresses (media/webrtc/icemux.py)."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from helpers import ServerProcess, http, live_stream, metrics_url, wait_live

pytestmark = pytest.mark.integration

WHEP_OFFER = (Path(__file__).parent.parent / "fixtures" / "sdp" / "chromium_whep_offer.sdp").read_text()
ANNOUNCED = "203.0.113.7"  # RFC 5737 TEST-NET-3: never a local address


def candidates(sdp: str, section: int | None = None) -> list[tuple[str, int, str, str]]:
    """(address, port, transport, type) of each a=candidate line, of every
    media section or of the ``section``-th one (aiortc repeats the bundle's
    candidates in each m-line)."""
    out: list[list[tuple[str, int, str, str]]] = [[]]
    for line in sdp.splitlines():
        if line.startswith("m="):
            out.append([])
        elif line.startswith("a=candidate:"):
            f = line.split()
            out[-1].append((f[4], int(f[5]), f[2].lower(), f[7]))
    return out[section + 1] if section is not None else [c for sec in out for c in sec]


def udp_ports(pid: int) -> list[int]:
    """Local ports of the UDP sockets process ``pid`` holds (from /proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = []
    for table in ("udp", "udp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            next(f)
            for row in f:
                cols = row.split()
                if cols[9] in inodes:
                    ports.append(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def _server(tmp_path_factory, db_url: str, name: str, **webrtc: str) -> ServerProcess:
    env = {"DATABASE_URL": db_url, "RETURNFEED_ADMIN_PASSWORD": "icemux-admin-pw"}
    env.update({f"RETURNFEED_WEBRTC__{k.upper()}": v for k, v in webrtc.items()})
    return ServerProcess(tmp_path_factory.mktemp(name), env=env).start()


@pytest.fixture(scope="module")
def env(module_db_url, tmp_path_factory):  # type: ignore[no-untyped-def]
    # "add": the host addresses and loopback, then the announced one (which
    # leads nowhere here: the viewers connect on the others).
    srv = _server(tmp_path_factory, module_db_url, "icemux", ice_loopback="true",
                  ice_announce=f'["{ANNOUNCED}"]', ice_announce_mode="add")
    with live_stream(srv, "icemux-admin-pw", "Mux", "mux1", seconds=120) as admin:
        yield {"base": srv.url, "admin": admin, "server": srv}


def test_twenty_viewers_on_one_server_port(env) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent / "loadtests"))
    from whep_client import WhepViewer

    base, admin, pid = env["base"], env["admin"], env["server"].proc.pid
    before = sorted(udp_ports(pid))

    async def watch() -> tuple[list[str], list[int], list[int]]:
        viewers = [WhepViewer(f"{base}/whep/mux1", token=admin) for _ in range(20)]
        try:
            await asyncio.gather(*(v.connect() for v in viewers))
            during = sorted(udp_ports(pid))
            await asyncio.sleep(2.0)
            return ([v._pc.remoteDescription.sdp for v in viewers], during,
                    [v.stats.video.packets if v.stats.video else 0 for v in viewers])
        finally:
            await asyncio.gather(*(v.close() for v in viewers), return_exceptions=True)

    answers, during, packets = asyncio.run(watch())
    ports = {c[1] for sdp in answers for c in candidates(sdp)}
    assert len(ports) == 1, ports
    (port,) = ports
    assert port in before and port != 8189  # the test server's ephemeral ICE port
    # Twenty sessions, not one socket more in the server.
    assert during == before, (before, during)
    assert all(p > 0 for p in packets), packets
    for sdp in answers:
        cands = candidates(sdp, 0)
        assert cands == candidates(sdp, 1)  # the audio m-line: the same bundle transport
        assert len(cands) == len(set(cands)), cands  # no duplicate candidate
        addrs = [c[0] for c in cands]
        assert "127.0.0.1" in addrs and addrs[-1] == ANNOUNCED, addrs
        assert all(c[2] == "udp" and c[3] == "host" for c in cands), cands
    text = http("GET", metrics_url(base)).body.decode()
    registered = next(float(ln.split()[1]) for ln in text.splitlines()
                      if ln.startswith("returnfeed_webrtc_ice_mux_sessions_registered_total "))
    assert registered >= 20


def test_whip_publisher_and_whep_viewer_share_the_port(env) -> None:
    """An aiortc publisher over WHIP and a decoding aiortc viewer of it, both
    on the server's one ICE port."""
    import aiohttp
    from aiortc import RTCPeerConnection, RTCSessionDescription, VideoStreamTrack

    from helpers import aiortc_whep_receive

    base, admin = env["base"], env["admin"]
    r = http("POST", f"{base}/api/v1/streams", {"name": "cammux", "production": "Mux"}, token=admin)
    assert r.status == 201, r.body

    async def run() -> tuple[str, dict]:
        pc = RTCPeerConnection()
        pc.addTransceiver(VideoStreamTrack(), direction="sendonly")  # aiortc encodes its frames as H.264
        await pc.setLocalDescription(await pc.createOffer())
        try:
            async with aiohttp.ClientSession() as client:
                async with client.post(f"{base}/whip/cammux", data=pc.localDescription.sdp, headers={
                        "Content-Type": "application/sdp", "Authorization": f"Bearer {admin}"}) as resp:
                    answer = await resp.text()
                assert resp.status == 201, answer
                await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
                await asyncio.to_thread(wait_live, base, "cammux", admin)
                viewer = await aiortc_whep_receive(f"{base}/whep/cammux", admin, 3, kinds=("video",))
        finally:
            await pc.close()
        return answer, viewer

    whip_answer, viewer = asyncio.run(run())
    assert viewer["status"] == 201 and viewer["video"] > 0, viewer
    whip_ports = {c[1] for c in candidates(whip_answer)}
    whep_ports = {c[1] for c in candidates(viewer["answer"])}
    assert len(whip_ports) == 1 and whip_ports == whep_ports, (whip_ports, whep_ports)
    assert whip_ports <= set(udp_ports(env["server"].proc.pid))


def test_replace_mode_answers_only_the_announced_address(module_db_url, tmp_path_factory) -> None:
    srv = _server(tmp_path_factory, module_db_url, "announce", ice_announce=f'["{ANNOUNCED}"]')
    with live_stream(srv, "icemux-admin-pw", "Nat", "nat1", seconds=30) as admin:
        r = http("POST", f"{srv.url}/whep/nat1", raw=WHEP_OFFER.encode(), token=admin,
                 headers={"Content-Type": "application/sdp"})
        assert r.status == 201, r.body
        cands = candidates(r.body.decode(), 0)
        assert len(cands) == 1 and cands[0][0] == ANNOUNCED and cands[0][2:] == ("udp", "host"), cands
        assert cands[0][1] in udp_ports(srv.proc.pid)


def test_an_announced_name_that_does_not_resolve_stops_the_server(tmp_path) -> None:
    import subprocess

    root = Path(__file__).resolve().parent.parent.parent
    r = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--data-dir", str(tmp_path), "--http-port", "0"],
                       cwd=root, capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, RETURNFEED_WEBRTC__ICE_ANNOUNCE='["no-such-host.invalid"]',
                                RETURNFEED_WEBRTC__ICE_UDP_PORT="0",
                                RETURNFEED_DATABASE__URL="postgresql://x@127.0.0.1:1/x"))
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "no-such-host.invalid" in r.stderr and "does not resolve" in r.stderr, r.stderr[-2000:]


def test_dual_stack_socket_forwards_to_viewers(module_db_url, tmp_path_factory) -> None:
    """bind "::": the fast path sends to an IPv4 viewer (IPv4-mapped on the
    wire) and to a viewer that checks in both families, from the one socket."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent / "loadtests"))
    from whep_client import WhepViewer

    from helpers import aiortc_whep_receive

    srv = _server(tmp_path_factory, module_db_url, "dualstack", ice_bind_address="::", ice_loopback="true",
                  ice_host_addresses='["127.0.0.1", "::1"]')
    base = srv.url
    with live_stream(srv, "icemux-admin-pw", "Dual", "dual1", seconds=30) as admin:

        async def watch() -> tuple[int, str, dict]:
            async with WhepViewer(f"{base}/whep/dual1", token=admin) as v4:  # 127.0.0.1 only
                # aiortc's own client offers the host's IPv4 and IPv6
                # addresses: checks in both families on the one socket.
                decoded = await aiortc_whep_receive(f"{base}/whep/dual1", admin, 2, kinds=("video",))
                return (v4.stats.video.packets if v4.stats.video else 0), v4._pc.remoteDescription.sdp, decoded

        packets, answer, decoded = asyncio.run(watch())
    cands = candidates(answer, 0)
    assert [c[0] for c in cands] == ["127.0.0.1", "::1"] and len({c[1] for c in cands}) == 1, cands
    assert packets > 0
    assert decoded["status"] == 201 and decoded["video"] > 0, decoded
