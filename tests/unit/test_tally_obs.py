"""OBS WebSocket v5 tally: tracker (sans-I/O) and the real client against a fake OBS."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os

import pytest
from websockets.asyncio.server import ServerConnection, serve

from tally.errors import ConfigError, HandshakeFailed, ObsError
from tally.obs import (
    TALLY_SUBSCRIPTIONS,
    ObsClient,
    ObsTallyTracker,
    OpCode,
    obs_authentication,
)
from tally.state import Bus, SourceConfig, Tally, TallyState

# ------------------------------------------------------------- fake OBS


def expected_auth(password: str, salt: str, challenge: str) -> str:
    # Written out step by step from the protocol document, independently of
    # tally.obs: sha256(password + salt) -> base64 secret; sha256(secret +
    # challenge) -> base64.
    step1 = hashlib.sha256()
    step1.update(password.encode())
    step1.update(salt.encode())
    secret = base64.b64encode(step1.digest()).decode()
    step2 = hashlib.sha256()
    step2.update(secret.encode())
    step2.update(challenge.encode())
    return base64.b64encode(step2.digest()).decode()


class FakeObs:
    def __init__(self, password: str | None = None) -> None:
        self.password = password
        self.program = "Wide"
        self.preview = "Close"
        self.studio = False
        self.conns: list[ServerConnection] = []
        self.identifies: list[dict] = []
        self.requests: list[str] = []
        self.close_code_on_identify: int | None = None
        self.server = None

    async def start(self) -> str:
        self.server = await serve(self._handler, "127.0.0.1", 0, subprotocols=["obswebsocket.json"])
        port = self.server.sockets[0].getsockname()[1]
        return f"ws://127.0.0.1:{port}"

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def event(self, kind: str, data: dict) -> None:
        msg = json.dumps({"op": 5, "d": {"eventType": kind, "eventIntent": 4, "eventData": data}})
        for ws in list(self.conns):
            with contextlib.suppress(Exception):
                await ws.send(msg)

    async def _handler(self, ws: ServerConnection) -> None:
        assert ws.subprotocol == "obswebsocket.json"
        hello: dict = {"obsStudioVersion": "31.0.0", "obsWebSocketVersion": "5.5.4", "rpcVersion": 1}
        salt = challenge = ""
        if self.password is not None:
            salt = base64.b64encode(os.urandom(32)).decode()
            challenge = base64.b64encode(os.urandom(32)).decode()
            hello["authentication"] = {"challenge": challenge, "salt": salt}
        await ws.send(json.dumps({"op": 0, "d": hello}))
        identify = json.loads(await ws.recv())
        self.identifies.append(identify)
        assert identify["op"] == 1 and identify["d"]["rpcVersion"] == 1
        if self.close_code_on_identify is not None:
            await ws.close(self.close_code_on_identify, "go away")
            return
        if self.password is not None and identify["d"].get("authentication") != expected_auth(
            self.password, salt, challenge
        ):
            await ws.close(4009, "Authentication failed.")
            return
        await ws.send(json.dumps({"op": 2, "d": {"negotiatedRpcVersion": 1}}))
        self.conns.append(ws)
        try:
            async for raw in ws:
                msg = json.loads(raw)
                assert msg["op"] == 6
                d = msg["d"]
                kind = d["requestType"]
                self.requests.append(kind)
                status: dict = {"result": True, "code": 100}
                data: dict = {}
                if kind == "GetCurrentProgramScene":
                    data = {"sceneName": self.program, "sceneUuid": "u1", "currentProgramSceneName": self.program}
                elif kind == "GetStudioModeEnabled":
                    data = {"studioModeEnabled": self.studio}
                elif kind == "GetCurrentPreviewScene":
                    if self.studio:
                        data = {"sceneName": self.preview, "currentPreviewSceneName": self.preview}
                    else:
                        status = {"result": False, "code": 506, "comment": "Studio mode is not active."}
                resp = {"requestType": kind, "requestId": d["requestId"], "requestStatus": status}
                if data:
                    resp["responseData"] = data
                await ws.send(json.dumps({"op": 7, "d": resp}))
        finally:
            self.conns.remove(ws)


def obs_state() -> TallyState:
    return TallyState(
        "p",
        [
            SourceConfig("cam1", authority="obs", obs_scenes=("Wide", "Two Shot")),
            SourceConfig("cam2", authority="obs", obs_scenes=("Close", "Two Shot")),
            SourceConfig("cam3", authority="obs", obs_scenes=("Guest",)),
            SourceConfig("local"),
        ],
    )


def states(s: TallyState) -> dict[str, str]:
    return {n: st.state.value for n, st in s.states().items() if n != "local"}


async def wait_for(pred, timeout: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def obs_session(fake: FakeObs, **kw):
    url = await fake.start()
    s = obs_state()
    client = ObsClient(s, url, backoff_initial=0.01, backoff_max=0.05, **kw)
    client.start()
    try:
        yield s, client
    finally:
        await client.close()
        await fake.stop()


# ------------------------------------------------------------- client tests


async def test_auth_identify_and_initial_state():
    fake = FakeObs(password="supersecretpassword")
    async with obs_session(fake, password="supersecretpassword") as (s, client):
        await asyncio.wait_for(client.wait_synced(), 3)
        ident = fake.identifies[0]["d"]
        assert ident["eventSubscriptions"] == TALLY_SUBSCRIPTIONS == (1 << 0) | (1 << 2) | (1 << 4) | (1 << 10)
        assert fake.requests[:3] == ["GetCurrentProgramScene", "GetStudioModeEnabled", "GetCurrentPreviewScene"]
        assert states(s) == {"cam1": "program", "cam2": "off", "cam3": "off"}
        assert s.source_state("cam1").authority == "obs"


async def test_wrong_password_is_refused_and_stays_unknown():
    fake = FakeObs(password="right")
    async with obs_session(fake, password="wrong") as (s, client):
        await wait_for(lambda: len(fake.identifies) >= 2)
        assert client.errors >= 1 and not client.synced
        assert states(s) == {"cam1": "unknown", "cam2": "unknown", "cam3": "unknown"}


async def test_missing_password_fails_handshake():
    fake = FakeObs(password="right")
    async with obs_session(fake) as (s, client):
        await wait_for(lambda: client.errors >= 2)
        assert fake.identifies == []  # never identifies without a password
        assert s.source_state("cam1").state is Tally.UNKNOWN


async def test_program_changes_and_studio_mode_preview():
    fake = FakeObs()
    async with obs_session(fake) as (s, client):
        await asyncio.wait_for(client.wait_synced(), 3)
        await fake.event("CurrentProgramSceneChanged", {"sceneName": "Two Shot", "sceneUuid": "x"})
        await wait_for(lambda: s.source_state("cam2").state is Tally.PROGRAM)
        assert states(s) == {"cam1": "program", "cam2": "program", "cam3": "off"}
        # Outside studio mode the preview scene means nothing.
        await fake.event("CurrentPreviewSceneChanged", {"sceneName": "Guest"})
        await asyncio.sleep(0.05)
        assert s.source_state("cam3").state is Tally.OFF
        fake.studio, fake.preview = True, "Guest"
        await fake.event("StudioModeStateChanged", {"studioModeEnabled": True})
        await wait_for(lambda: s.source_state("cam3").state is Tally.PREVIEW)
        await fake.event("CurrentPreviewSceneChanged", {"sceneName": "Close"})
        await wait_for(lambda: s.source_state("cam3").state is Tally.OFF)
        assert s.source_state("cam2").buses == (Bus.PROGRAM, Bus.PREVIEW)
        await fake.event("StudioModeStateChanged", {"studioModeEnabled": False})
        await wait_for(lambda: s.source_state("cam2").buses == (Bus.PROGRAM,))


async def test_transition_studio_mode_both_on_air():
    fake = FakeObs()
    fake.studio, fake.preview = True, "Guest"
    async with obs_session(fake) as (s, client):
        await asyncio.wait_for(client.wait_synced(), 3)
        assert states(s) == {"cam1": "program", "cam2": "off", "cam3": "preview"}
        await fake.event("SceneTransitionStarted", {"transitionName": "Fade", "transitionUuid": "t"})
        await wait_for(lambda: s.source_state("cam3").state is Tally.PROGRAM)
        assert s.source_state("cam1").state is Tally.PROGRAM  # outgoing still on air
        await fake.event("CurrentProgramSceneChanged", {"sceneName": "Guest"})
        await fake.event("CurrentPreviewSceneChanged", {"sceneName": "Wide"})
        await asyncio.sleep(0.05)
        assert s.source_state("cam1").state is Tally.PROGRAM  # until the end
        await fake.event("SceneTransitionEnded", {"transitionName": "Fade", "transitionUuid": "t"})
        await wait_for(lambda: s.source_state("cam1").state is Tally.PREVIEW)
        assert s.source_state("cam3").state is Tally.PROGRAM


async def test_transition_without_studio_mode_learns_target_from_program_change():
    fake = FakeObs()
    async with obs_session(fake) as (s, client):
        await asyncio.wait_for(client.wait_synced(), 3)
        await fake.event("SceneTransitionStarted", {"transitionName": "Fade"})
        await fake.event("CurrentProgramSceneChanged", {"sceneName": "Guest"})
        await wait_for(lambda: s.source_state("cam3").state is Tally.PROGRAM)
        assert s.source_state("cam1").state is Tally.PROGRAM
        await fake.event("SceneTransitionEnded", {"transitionName": "Fade"})
        await wait_for(lambda: s.source_state("cam1").state is Tally.OFF)
        assert s.source_state("cam3").state is Tally.PROGRAM


async def test_disconnect_goes_unknown_and_reconnects():
    fake = FakeObs()
    async with obs_session(fake) as (s, client):
        await asyncio.wait_for(client.wait_synced(), 3)
        assert s.source_state("cam1").state is Tally.PROGRAM
        fake.program = "Close"
        fake.conns[0].transport.abort()
        await wait_for(lambda: s.source_state("cam1").state is Tally.UNKNOWN)
        await wait_for(lambda: s.source_state("cam2").state is Tally.PROGRAM)
        assert s.source_state("cam1").state is Tally.OFF
        assert client.connects == 2
        assert s.source_state("local").state is Tally.OFF


async def test_session_invalidated_stops_reconnecting():
    fake = FakeObs()
    fake.close_code_on_identify = 4011
    async with obs_session(fake) as (s, client):
        await wait_for(lambda: client.stopped_reason is not None)
        await asyncio.sleep(0.1)
        assert len(fake.identifies) == 1
        assert s.source_state("cam1").state is Tally.UNKNOWN


async def test_transition_timeout_when_end_never_comes():
    fake = FakeObs()
    async with obs_session(fake, max_transition=0.1) as (s, client):
        await asyncio.wait_for(client.wait_synced(), 3)
        await fake.event("SceneTransitionStarted", {"transitionName": "Fade"})
        await fake.event("CurrentProgramSceneChanged", {"sceneName": "Close"})
        await wait_for(lambda: s.source_state("cam2").state is Tally.PROGRAM)
        assert s.source_state("cam1").state is Tally.PROGRAM
        await wait_for(lambda: s.source_state("cam1").state is Tally.OFF, 2)


def test_mapping_must_match_authority():
    s = obs_state()
    with pytest.raises(ConfigError):
        ObsClient(s, scenes={"Wide": "local"})


# ------------------------------------------------------------- tracker


def hello(auth: dict | None = None) -> dict:
    d: dict = {"obsWebSocketVersion": "5.5.4", "rpcVersion": 1}
    if auth:
        d["authentication"] = auth
    return {"op": 0, "d": d}


def synced_tracker(program="A", studio=False, preview=None, **kw) -> ObsTallyTracker:
    t = ObsTallyTracker(**kw)
    t.receive(hello(), 0)
    step = t.receive({"op": 2, "d": {"negotiatedRpcVersion": 1}}, 0)
    ids = {m["d"]["requestType"]: m["d"]["requestId"] for m in step.send}
    ok = {"result": True, "code": 100}
    t.receive({"op": 7, "d": {"requestId": ids["GetCurrentProgramScene"], "requestStatus": ok, "responseData": {"sceneName": program}}}, 0)
    t.receive({"op": 7, "d": {"requestId": ids["GetStudioModeEnabled"], "requestStatus": ok, "responseData": {"studioModeEnabled": studio}}}, 0)
    pv = {"requestId": ids["GetCurrentPreviewScene"]}
    if studio:
        pv.update(requestStatus=ok, responseData={"sceneName": preview})
    else:
        pv.update(requestStatus={"result": False, "code": 506})
    step = t.receive({"op": 7, "d": pv}, 0)
    assert t.synced and step.changed
    return t


def ev(kind: str, **data) -> dict:
    return {"op": 5, "d": {"eventType": kind, "eventIntent": 4, "eventData": data}}


def test_tracker_identify_with_auth():
    t = ObsTallyTracker("pw")
    step = t.receive(hello({"challenge": "c", "salt": "s"}), 0)
    (identify,) = step.send
    assert identify["op"] == OpCode.IDENTIFY
    assert identify["d"]["authentication"] == expected_auth("pw", "s", "c") == obs_authentication("pw", "s", "c")
    assert not step.changed


def test_tracker_reverse_order_program_change_before_start():
    t = synced_tracker("A")
    assert t.receive(ev("CurrentProgramSceneChanged", sceneName="B"), 10.0).changed
    assert t.program_scenes() == {"B"}
    step = t.receive(ev("SceneTransitionStarted", transitionName="Fade"), 10.05)
    assert step.changed and t.program_scenes() == {"A", "B"}
    t.receive(ev("SceneTransitionEnded", transitionName="Fade"), 11)
    assert t.program_scenes() == {"B"}
    # A start long after a change does not resurrect the old scene.
    t.receive(ev("CurrentProgramSceneChanged", sceneName="C"), 20.0)
    t.receive(ev("SceneTransitionStarted"), 25.0)
    assert t.program_scenes() == {"C"}


def test_tracker_tick_and_deadline():
    t = synced_tracker("A", max_transition=2.0)
    t.receive(ev("SceneTransitionStarted"), 5.0)
    t.receive(ev("CurrentProgramSceneChanged", sceneName="B"), 5.0)
    assert t.deadline() == 7.0 and t.program_scenes() == {"A", "B"}
    assert not t.tick(6.9)
    assert t.tick(7.0) and t.program_scenes() == {"B"} and t.deadline() is None


@pytest.mark.parametrize(
    "msg",
    [
        [],
        {"op": "5", "d": {}},
        {"op": 5},
        {"op": 0, "d": {"rpcVersion": "1"}},
        {"op": 5, "d": {"eventType": 3}},
        {"op": 5, "d": {"eventType": "CurrentProgramSceneChanged", "eventData": {"sceneName": 4}}},
        {"op": 5, "d": {"eventType": "StudioModeStateChanged", "eventData": {"studioModeEnabled": "yes"}}},
        {"op": 0, "d": {"rpcVersion": 1, "authentication": "x"}},
    ],
)
def test_tracker_rejects_malformed(msg):
    t = ObsTallyTracker("pw")
    with pytest.raises(ObsError):
        t.receive(msg, 0)


def test_tracker_handshake_failures():
    with pytest.raises(HandshakeFailed):
        ObsTallyTracker().receive(hello({"challenge": "c", "salt": "s"}), 0)
    with pytest.raises(HandshakeFailed):
        ObsTallyTracker().receive({"op": 0, "d": {"rpcVersion": 0}}, 0)


def test_tracker_ignores_unrelated_traffic():
    t = synced_tracker("A")
    assert not t.receive(ev("InputMuteStateChanged", inputName="Mic", inputMuted=True), 1).changed
    assert not t.receive({"op": 7, "d": {"requestId": "not-ours", "requestStatus": {"result": True}}}, 1).changed
    assert not t.receive({"op": 9, "d": {}}, 1).changed


def test_client_under_uvloop():
    """The server runs on uvloop: the same scenarios must hold there."""
    uvloop = pytest.importorskip("uvloop", reason="uvloop is a declared dependency")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(test_auth_identify_and_initial_state())
        runner.run(test_transition_studio_mode_both_on_air())
        runner.run(test_disconnect_goes_unknown_and_reconnects())
        runner.run(test_transition_timeout_when_end_never_comes())
