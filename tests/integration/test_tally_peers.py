"""Tally against real third-party peers (issue 10, items 1-3).

Peers (installed by ``bash config/bootstrap.sh setup``, never at test time):
``wscat`` 6.1.0 (a standard WebSocket client: it answers RFC 6455 pings and
sends nothing else) and ``tsl-umd-v5`` 1.0.7 (TSL 5.0 sender: over TCP it
connects, sends one packet and closes), both from npm into ``.peers/``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import time
from pathlib import Path

import pytest
import websockets
from aiohttp import web
from aiohttp.test_utils import TestServer

from helpers import http, login
from tally.hub import TallyHub, aiohttp_sink, serve_aiohttp
from tally.state import SourceConfig, TallyState

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
NODE_MODULES = ROOT / ".peers" / "node_modules"


def _wscat() -> str:
    path = NODE_MODULES / ".bin" / "wscat"
    if not path.exists() or not shutil.which("node"):
        pytest.skip("wscat not installed (bash config/bootstrap.sh setup)")
    return str(path)


def _node_peer(package: str) -> None:
    if not (NODE_MODULES / package).is_dir() or not shutil.which("node"):
        pytest.skip(f"{package} not installed (bash config/bootstrap.sh setup)")


class Wscat:
    """``wscat --connect`` left alone: stdin stays open and unused, so it only
    listens (and answers pings, as every RFC 6455 client must)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.lines: list[str] = []
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task | None = None

    async def __aenter__(self) -> "Wscat":
        self.proc = await asyncio.create_subprocess_exec(
            _wscat(), "--no-color", "--show-ping-pong", "--connect", self.url,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.lines.append(line.decode(errors="replace").strip())

    def messages(self) -> list[dict]:
        out = []
        for line in self.lines:
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def pings(self) -> int:
        return sum(1 for line in self.lines if line.startswith("Received ping"))

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def wait_for(self, pred, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not pred(self.messages()):
            assert self.running, f"wscat exited: {self.lines[-5:]}"
            assert time.monotonic() < deadline, f"wscat never saw it: {self.lines[-5:]}"
            await asyncio.sleep(0.02)

    async def __aexit__(self, *exc) -> None:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.terminate()
        await self.proc.wait()
        if self._reader is not None:
            await self._reader


class Recorder:
    """A ``websockets`` client that records every message and how it ended."""

    def __init__(self, url: str, token: str) -> None:
        self.url, self.token = url, token
        self.messages: list[dict] = []
        self.closed: tuple[int | None, str] | None = None
        self._task: asyncio.Task | None = None
        self._ws = None

    async def __aenter__(self) -> "Recorder":
        self._ws = await websockets.connect(self.url, additional_headers={"Authorization": f"Bearer {self.token}"})
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        try:
            async for raw in self._ws:
                msg = json.loads(raw)
                if msg["type"] == "ping":
                    await self._ws.send('{"type":"pong"}')
                else:
                    self.messages.append(msg)
        except websockets.ConnectionClosed:
            pass
        self.closed = (self._ws.close_code, self._ws.close_reason or "")

    def state(self) -> dict[str, str]:
        """Snapshot + deltas applied, as a client does."""
        out: dict[str, str] = {}
        for m in self.messages:
            if m["type"] == "snapshot":
                out = {k: v["state"] for k, v in m["sources"].items()}
            elif m["type"] == "tally":
                out.update({k: v["state"] for k, v in m["sources"].items()})
        return out

    async def wait_state(self, name: str, state: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.state().get(name) != state:
            assert self.closed is None, f"closed: {self.closed}"
            assert time.monotonic() < deadline, f"{name} is {self.state().get(name)}, expected {state}"
            await asyncio.sleep(0.01)

    def seqs(self) -> list[int]:
        return [m["seq"] for m in self.messages if m["type"] in ("snapshot", "tally")]

    async def __aexit__(self, *exc) -> None:
        await self._ws.close()
        if self._task is not None:
            await self._task


def _free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _tsl5_send(transport: str, port: int, index: int, rh_tally: int, text: str = "CAM") -> None:
    """One message with the real npm peer: ``sendTallyTCP`` connects, writes
    the DLE/STX-wrapped packet and closes; ``sendTallyUDP`` sends one raw
    datagram."""
    _node_peer("tsl-umd-v5")
    fn = "sendTallyTCP" if transport == "tcp" else "sendTallyUDP"
    tally = {"screen": 0, "index": index,
             "display": {"rh_tally": rh_tally, "text_tally": 0, "lh_tally": 0, "brightness": 3, "text": text}}
    script = (f"const T = require('tsl-umd-v5'); new T().{fn}('127.0.0.1', {port}, {json.dumps(tally)});")
    proc = await asyncio.create_subprocess_exec("node", "-e", script, env={**os.environ, "NODE_PATH": str(NODE_MODULES)},
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode()


# ------------------------------------------------ item 1: standard clients


async def test_passive_wscat_survives_many_heartbeat_windows():
    """The heartbeat scaled down (ping every 0.2 s, dropped after 0.8 s of
    silence): a passive wscat stays for 6 s — 7.5 windows, and ~30 pings
    answered — and gets every change in order. A client that does not
    answer protocol pings is dropped within one window (see
    tests/unit/test_tally_hub.py). Only wscat's automatic Pongs keep it."""
    state = TallyState("show", [SourceConfig("cam1"), SourceConfig("cam2")])
    hub = TallyHub(state, heartbeat_interval=0.2, missing_after=0.8)
    hub.start()

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(compress=False, autoping=False)
        await ws.prepare(request)
        await serve_aiohttp(hub, hub.connect(aiohttp_sink(ws)), ws)
        return ws

    app = web.Application()
    app.router.add_get("/ws/tally", handler)
    async with TestServer(app) as server:
        url = str(server.make_url("/ws/tally")).replace("http://", "ws://")
        async with Wscat(url) as wscat:
            await wscat.wait_for(lambda ms: any(m["type"] == "snapshot" for m in ms))
            t_end = time.monotonic() + 6.0
            cuts = 0
            while time.monotonic() < t_end:
                state.cut(("cam1", "cam2")[cuts % 2], now=time.monotonic())
                cuts += 1
                await asyncio.sleep(0.25)
            await wscat.wait_for(lambda ms: sum(m["type"] == "tally" for m in ms) == cuts)
            assert wscat.running and len(hub.clients) == 1 and hub.stats.missing_closed == 0
            assert [m["seq"] for m in wscat.messages() if m["type"] == "tally"] == list(range(1, cuts + 1))
            assert wscat.pings() >= 20  # RFC 6455 pings arrive (and are answered by wscat)
    hub.close()


@pytest.fixture(scope="module")
def env(api_server):
    base = api_server.url
    admin = login(base, "admin", api_server.admin_password)["access_token"]
    prod = http("POST", f"{base}/api/v1/productions", {"name": "Peer show"}, token=admin).json()
    for n in ("pcam1", "pcam2"):
        r = http("POST", f"{base}/api/v1/streams", {"name": n, "production": prod["id"]}, token=admin)
        assert r.status == 201, r.body
    return {"base": base, "admin": admin, "pid": prod["id"],
            "ws": base.replace("http://", "ws://") + f"/ws/tally?production={prod['id']}"}


def test_passive_wscat_on_the_real_server_default_heartbeat(env):
    """Default heartbeat (1 s ping, 3 s timeout): wscat used to be closed with
    4001 at 3.2 s. It stays for 8 s and gets every change."""
    base, pid = env["base"], env["pid"]

    async def run():
        url = env["ws"] + f"&token={env['admin']}"
        async with Wscat(url) as wscat:
            await wscat.wait_for(lambda ms: any(m["type"] == "snapshot" for m in ms))
            seqs = []
            for i in range(8):
                r = await asyncio.to_thread(http, "POST", f"{base}/api/v1/productions/{pid}/tally",
                                            {"type": "cut", "source": ("pcam1", "pcam2")[i % 2]}, token=env["admin"])
                assert r.status == 200, r.body
                seqs.append(r.json()["seq"])
                await asyncio.sleep(1.0)
            await wscat.wait_for(lambda ms: [m["seq"] for m in ms if m["type"] == "tally"][-1:] == seqs[-1:])
            assert wscat.running, wscat.lines[-5:]
            assert [m["seq"] for m in wscat.messages() if m["type"] == "tally"] == seqs
            assert wscat.pings() >= 6

    asyncio.run(run())


# ------------------------------------------------ item 2: config applied in place


def test_config_put_keeps_clients_and_state_and_sends_sequenced_deltas(env):
    base, pid, admin = env["base"], env["pid"], env["admin"]
    config_url = f"{base}/api/v1/productions/{pid}/tally/config"
    udp_port, tcp_port = _free_port(socket.SOCK_DGRAM), _free_port()
    cfg = {"transition_s": 1.0,
           "sources": {"desk1": {"authority": "tsl:udp", "tsl_address": 1},
                       "desk2": {"authority": "tsl:tcp", "tsl_address": 2}},
           "adapters": [{"type": "tsl_in", "version": 5, "transport": "udp", "host": "127.0.0.1",
                         "port": udp_port, "authority": "tsl:udp"},
                        {"type": "tsl_in", "version": 5, "transport": "tcp", "host": "127.0.0.1",
                         "port": tcp_port, "authority": "tsl:tcp"}]}

    async def put(body) -> dict:
        r = await asyncio.to_thread(http, "PUT", config_url, body, token=admin)
        assert r.status == 200, r.body
        return r.json()

    async def run():
        await put(cfg)
        async with Recorder(env["ws"], admin) as a, Recorder(env["ws"], admin) as b, \
                Wscat(env["ws"] + f"&token={admin}") as wscat:
            await wscat.wait_for(lambda ms: any(m["type"] == "snapshot" for m in ms))
            await a.wait_state("desk1", "unknown")
            await _tsl5_send("udp", udp_port, 1, 1)   # desk1 red
            await _tsl5_send("tcp", tcp_port, 2, 2)   # desk2 green
            await a.wait_state("desk1", "program")
            await a.wait_state("desk2", "preview")
            await asyncio.to_thread(http, "POST", f"{base}/api/v1/productions/{pid}/tally",
                                    {"type": "cut", "source": "pcam1"}, token=admin)
            await a.wait_state("pcam1", "program")
            before = a.state()
            n_msgs, seq = len(a.messages), a.seqs()[-1]

            # 1. the same configuration again: nothing happens at all
            snap = await put(cfg)
            await asyncio.sleep(0.5)
            assert snap["seq"] == seq and len(a.messages) == n_msgs and a.state() == before
            assert {k: v["state"] for k, v in snap["sources"].items()} == before

            # 2. a changed configuration: the UDP input is unchanged (kept,
            # desk1 stays red), the TCP input changes (restarted: desk2 is
            # unknown until its desk speaks again), a label changes, a source
            # is added and one removed
            changed = json.loads(json.dumps(cfg))
            changed["sources"]["pcam2"] = {"label": "Camera Two"}
            changed["sources"]["gfx"] = {}
            del changed["sources"]["desk2"]
            changed["sources"]["desk3"] = {"authority": "tsl:tcp", "tsl_address": 3}
            changed["adapters"][1]["lost_after"] = 30
            snap = await put(changed)
            await a.wait_state("gfx", "off")
            await a.wait_state("desk3", "unknown")
            await _tsl5_send("tcp", tcp_port, 3, 1)   # the restarted input works
            await a.wait_state("desk3", "program")
            await b.wait_state("desk3", "program")
            await wscat.wait_for(lambda ms: any(m.get("sources", {}).get("desk3", {}).get("state") == "program"
                                                for m in ms))
            final = a.state()
            assert final["desk1"] == "program" and final["pcam1"] == "program"
            deltas = [m for m in a.messages[n_msgs:] if m["type"] == "tally"]
            assert deltas and all(m["type"] != "snapshot" for m in a.messages[1:])
            touched = {n for m in deltas for n in m["sources"]}
            assert "desk1" not in touched and "pcam1" not in touched  # untouched by the change
            removed = [m["sources"]["desk2"] for m in deltas if "desk2" in m["sources"]]
            assert removed[-1]["state"] == "unknown" and removed[-1]["removed"] is True
            labels = [m["sources"]["pcam2"]["label"] for m in deltas if "pcam2" in m["sources"]]
            assert labels == ["Camera Two"]
            for rec in (a, b):
                seqs = rec.seqs()
                assert seqs == sorted(set(seqs)), seqs  # strictly increasing
                assert rec.closed is None
            assert b.state() == final
            ws_seqs = [m["seq"] for m in wscat.messages() if m["type"] in ("snapshot", "tally")]
            assert ws_seqs == a.seqs() and wscat.running
            # a new client's snapshot agrees, without the removed source
            rest = await asyncio.to_thread(http, "GET", f"{base}/api/v1/productions/{pid}/tally", token=admin)
            assert {k: v["state"] for k, v in rest.json()["sources"].items()} == {
                k: v for k, v in final.items() if k != "desk2"}
        await put({})

    asyncio.run(run())


# ------------------------------------------------ item 3: TSL 5.0 over TCP


def test_tsl5_tcp_one_shot_sender_drives_tally_and_only_silence_loses_it(env):
    base, pid, admin = env["base"], env["pid"], env["admin"]
    config_url = f"{base}/api/v1/productions/{pid}/tally/config"
    port = _free_port()

    def cfg(lost_after):
        return {"sources": {"umd": {"authority": "tsl:v5", "tsl_address": 7}},
                "adapters": [{"type": "tsl_in", "version": 5, "transport": "tcp", "host": "127.0.0.1",
                              "port": port, "authority": "tsl:v5", "lost_after": lost_after}]}

    async def run():
        for bad in (0, -1, "5", True):
            r = await asyncio.to_thread(http, "PUT", config_url, cfg(bad), token=admin)
            assert r.status == 400 and "lost_after" in r.json()["detail"], r.body
        r = await asyncio.to_thread(http, "PUT", config_url, cfg(None), token=admin)
        assert r.status == 200, r.body
        async with Recorder(env["ws"], admin) as ws:
            await ws.wait_state("umd", "unknown")
            await _tsl5_send("tcp", port, 7, 1)  # connect, send red, close
            await ws.wait_state("umd", "program")
            await asyncio.sleep(2.0)  # the connection closed long ago: still program
            assert ws.state()["umd"] == "program"
            await _tsl5_send("tcp", port, 7, 2)
            await ws.wait_state("umd", "preview")
            assert [m["sources"]["umd"]["state"] for m in ws.messages if m["type"] == "tally"
                    and "umd" in m["sources"]] == ["program", "preview"]

            # with lost_after, silence (and only silence) loses the source
            r = await asyncio.to_thread(http, "PUT", config_url, cfg(1.0), token=admin)
            assert r.status == 200, r.body
            await ws.wait_state("umd", "unknown")  # restarted input: nothing heard yet
            await _tsl5_send("tcp", port, 7, 1)
            await ws.wait_state("umd", "program")
            t0 = time.monotonic()
            await ws.wait_state("umd", "unknown", timeout=5)
            assert 0.8 <= time.monotonic() - t0 <= 3.0
            await _tsl5_send("tcp", port, 7, 1)
            await ws.wait_state("umd", "program")
            seqs = ws.seqs()
            assert seqs == sorted(set(seqs)) and ws.closed is None
        await asyncio.to_thread(http, "PUT", config_url, {}, token=admin)

    asyncio.run(run())


# ------------------------------------------------ item 2 with real OBS Studio


class ObsControl:
    """A second obs-websocket session, playing the OBS operator."""

    def __init__(self, url: str, password: str) -> None:
        self.url, self.password = url, password
        self.ws = None
        self._n = 0

    async def open(self, timeout: float = 60.0) -> None:
        from tally.obs import obs_authentication

        deadline = time.monotonic() + timeout
        while True:
            try:
                self.ws = await websockets.connect(self.url, subprotocols=["obswebsocket.json"], open_timeout=5)
                hello = json.loads(await asyncio.wait_for(self.ws.recv(), 5))
                break
            except (OSError, websockets.WebSocketException, asyncio.TimeoutError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)
        auth = hello["d"]["authentication"]
        await self.ws.send(json.dumps({"op": 1, "d": {"rpcVersion": 1, "eventSubscriptions": 0, "authentication":
                                                       obs_authentication(self.password, auth["salt"], auth["challenge"])}}))
        assert json.loads(await asyncio.wait_for(self.ws.recv(), 5))["op"] == 2

    async def request(self, kind: str, **data) -> dict:
        self._n += 1
        rid = str(self._n)
        await self.ws.send(json.dumps({"op": 6, "d": {"requestType": kind, "requestId": rid, "requestData": data}}))
        while True:
            msg = json.loads(await asyncio.wait_for(self.ws.recv(), 10))
            if msg["op"] == 7 and msg["d"]["requestId"] == rid:
                assert msg["d"]["requestStatus"]["result"], msg
                return msg["d"].get("responseData", {})


def test_config_put_keeps_real_obs_adapter_and_its_tally(env):
    """Issue 10 item 2 with OBS Studio 29 / obs-websocket 5: PUTting the
    same configuration (or one that leaves OBS alone) never shows TALLY
    LOST, and the kept adapter keeps following OBS."""
    import obs_peer

    why = obs_peer.missing()
    if why:
        pytest.skip(why)
    base, pid, admin = env["base"], env["pid"], env["admin"]
    config_url = f"{base}/api/v1/productions/{pid}/tally/config"

    async def put(body) -> dict:
        r = await asyncio.to_thread(http, "PUT", config_url, body, token=admin)
        assert r.status == 200, r.body
        return r.json()

    async def run():
        async with obs_peer.ObsStudio() as obs:
            ctl = ObsControl(obs.url, obs_peer.PASSWORD)
            try:
                await ctl.open()
            except Exception:
                pytest.fail(f"OBS did not come up: {obs.log()}")
            for scene in ("Cam A", "Cam B"):
                await ctl.request("CreateScene", sceneName=scene)
            await ctl.request("SetCurrentProgramScene", sceneName="Cam A")
            cfg = {"sources": {"obsA": {"authority": "obs", "obs_scenes": ["Cam A"]},
                               "obsB": {"authority": "obs", "obs_scenes": ["Cam B"]}},
                   "adapters": [{"type": "obs", "url": obs.url, "password": obs_peer.PASSWORD}]}
            await put(cfg)
            async with Recorder(env["ws"], admin) as ws:
                await ws.wait_state("obsA", "program", timeout=20)
                assert ws.state()["obsB"] == "off"
                n, seq = len(ws.messages), ws.seqs()[-1]
                snap = await put(cfg)  # the same again
                changed = json.loads(json.dumps(cfg))
                changed["sources"]["gfx"] = {}
                await asyncio.sleep(1.0)
                assert len(ws.messages) == n and snap["seq"] == seq
                assert snap["adapters"] == [{"type": "obs", "authority": "obs", "connected": True}]
                await put(changed)  # OBS untouched
                await ws.wait_state("gfx", "off")
                await ctl.request("SetCurrentProgramScene", sceneName="Cam B")
                await ws.wait_state("obsB", "program")
                await ws.wait_state("obsA", "off")  # after OBS's default fade (both on air during it)
                seen = [st["state"] for m in ws.messages if m["type"] == "tally"
                        for name, st in m["sources"].items() if name in ("obsA", "obsB")]
                assert "unknown" not in seen, seen  # never TALLY LOST
                seqs = ws.seqs()
                assert seqs == sorted(set(seqs)) and ws.closed is None
            await put({})
            await ctl.ws.close()

    asyncio.run(run())


# ------------------------------------------------ item 3: a repeating UDP sender


async def test_tslumd_udp_sender_is_never_lost_while_it_repeats_and_is_lost_after_silence():
    """``tslumd`` (PyPI) 0.0.7 ``UmdSender`` resends its full state every
    0.3 s: with ``lost_after=1`` the source stays known as long as it runs
    and turns unknown ~1 s after it stops."""
    tslumd = pytest.importorskip("tslumd", reason="tslumd not installed (bash config/bootstrap.sh setup)")
    from tally.state import Tally
    from tally.tsl import TslInput

    state = TallyState("show", [SourceConfig("desk", authority="tsl", tsl_address=4)])
    inp = TslInput(state, authority="tsl", version=5, lost_after=1.0)
    _, port = await inp.listen_udp("127.0.0.1", 0)
    history: list[str] = []
    state.add_listener(lambda ch: history.extend(st.state.value for n, st in ch.sources.items() if n == "desk"))
    sender = tslumd.UmdSender(clients=[("127.0.0.1", port)])
    await sender.open()
    try:
        sender.set_tally_color((0, 4), "rh_tally", "red")
        deadline = time.monotonic() + 5
        while state.source_state("desk").state is not Tally.PROGRAM:
            assert time.monotonic() < deadline, history
            await asyncio.sleep(0.01)
        await asyncio.sleep(2.5)  # 2.5 × lost_after of repeats
        assert history == ["program"] and inp.packets >= 6
        sender.set_tally_color((0, 4), "rh_tally", "green")
        while state.source_state("desk").state is not Tally.PREVIEW:
            assert time.monotonic() < deadline + 3, history
            await asyncio.sleep(0.01)
    finally:
        await sender.close()
    stopped = time.monotonic()
    while state.source_state("desk").state is not Tally.UNKNOWN:
        assert time.monotonic() - stopped < 3, history
        await asyncio.sleep(0.01)
    assert 0.6 <= time.monotonic() - stopped <= 2.0
    assert history == ["program", "preview", "unknown"]
    await inp.close()


# ------------------------------------------------ TSL 3.1 output to a real display listener


async def test_tsl31_output_drives_the_tsl_umd_listener():
    """npm ``tsl-umd`` 1.1.2 (a TSL 3.1 UDP listener) decodes what TslOutput
    sends: tally 1 = program, tally 2 = preview, the label as text."""
    _node_peer("tsl-umd")
    from tally.tsl import TslOutput

    script = ("const T = require('tsl-umd'); const u = new T(0);"
              "u.server.on('listening', () => console.log('PORT ' + u.server.address().port));"
              "u.on('message', m => console.log(JSON.stringify(m)));")
    proc = await asyncio.create_subprocess_exec("node", "-e", script, env={**os.environ, "NODE_PATH": str(NODE_MODULES)},
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    state = TallyState("show", [SourceConfig("cam1", "Cam One", tsl_address=1), SourceConfig("cam2", tsl_address=2)])
    out = TslOutput(state, version=3, refresh_interval=10)
    try:
        port = 0
        while not port:
            line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode()
            assert line, "tsl-umd exited"
            if line.startswith("PORT "):
                port = int(line.split()[1])
        await out.start_udp("127.0.0.1", port)
        state.cut("cam1", now=0)
        state.set_preview("cam2", now=0)
        got: dict[int, dict] = {}
        while not (got.get(1, {}).get("tally1") == 1 and got.get(2, {}).get("tally2") == 1):
            line = (await asyncio.wait_for(proc.stdout.readline(), 5)).decode()
            if line.startswith("{"):
                m = json.loads(line)
                got[m["address"]] = m
        assert got[1]["tally2"] == 0 and got[2]["tally1"] == 0
        assert got[1]["label"].strip() == "Cam One"
    finally:
        await out.close()
        proc.terminate()
        await proc.wait()
