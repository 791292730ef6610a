"""Fuzz target for OBS WebSocket v5 messages (issue 9, "Tests and done"):
whatever a peer claiming to be OBS sends, the sans-I/O tracker raises only
ProtocolError subclasses (the client's reconnect path) and its views stay
well-formed."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tally.errors import ObsError, ProtocolError
from tally.obs import ObsTallyTracker, OpCode, parse_frame

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                     st.text(max_size=20))
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                       max_leaves=12)
_scene = st.one_of(st.sampled_from(["Cam 1", "Cam 2", "VT"]), _values)
_request_types = st.sampled_from(["GetCurrentProgramScene", "GetStudioModeEnabled", "GetCurrentPreviewScene", "x"])
_event_types = st.sampled_from(["CurrentProgramSceneChanged", "CurrentPreviewSceneChanged", "StudioModeStateChanged",
                                "SceneTransitionStarted", "SceneTransitionEnded", "ExitStarted", "Other"])


def _d(draw) -> dict:
    """A ``d`` object with the fields the tracker reads, each sometimes wrong."""
    pick = lambda strategy: draw(st.one_of(strategy, _values))  # noqa: E731
    d = {
        "rpcVersion": pick(st.just(1)),
        "authentication": pick(st.fixed_dictionaries({"challenge": _scene, "salt": _scene})),
        "negotiatedRpcVersion": pick(st.just(1)),
        "requestType": pick(_request_types),
        "requestId": pick(st.sampled_from([str(i) for i in range(6)])),
        "requestStatus": pick(st.fixed_dictionaries({"result": _values, "code": _values, "comment": _values})),
        "responseData": pick(st.fixed_dictionaries({
            "currentProgramSceneName": _scene, "currentPreviewSceneName": _scene, "studioModeEnabled": _values,
            "sceneName": _scene})),
        "eventType": pick(_event_types),
        "eventData": pick(st.fixed_dictionaries({
            "sceneName": _scene, "studioModeEnabled": _values, "toScene": _scene, "fromScene": _scene,
            "transitionName": _scene})),
    }
    return {k: v for k, v in d.items() if draw(st.booleans())}


@st.composite
def obs_messages(draw):
    if draw(st.integers(0, 9)) == 0:
        return draw(_values)  # not even an object
    op = draw(st.one_of(st.sampled_from([int(o) for o in OpCode]), _values))
    return {"op": op, "d": _d(draw) if draw(st.integers(0, 9)) else draw(_values)}


@settings(max_examples=150, deadline=None)
@given(st.lists(obs_messages(), max_size=12), st.one_of(st.none(), st.text(max_size=10)))
def test_fuzz_tracker_only_raises_protocol_errors(messages, password) -> None:
    t = ObsTallyTracker(password)
    now = 0.0
    for msg in messages:
        now += 0.1
        # The client decodes text frames with json.loads first: what gets here
        # is what JSON can carry.
        try:
            msg = json.loads(json.dumps(msg))
        except ValueError:
            continue
        try:
            t.receive(msg, now)
        except ProtocolError:
            t = ObsTallyTracker(password)  # the client reconnects with a fresh session
            continue
        t.tick(now + 11)
        for view in (t.program_scenes(), t.preview_scenes()):
            assert isinstance(view, frozenset) and all(isinstance(s, str) for s in view)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=400), st.binary(max_size=100),
                 st.integers(1, 100_000).map(lambda n: "[" * n), st.integers(1, 100_000).map(lambda n: '{"a":' * n)))
def test_fuzz_frames_only_raise_obs_error(raw) -> None:
    try:
        message = parse_frame(raw)
    except ObsError:
        return
    try:
        ObsTallyTracker("pw").receive(message, 0.0)
    except ProtocolError:
        pass


def test_deeply_nested_frame_is_an_obs_error() -> None:
    with pytest.raises(ObsError):
        parse_frame("[" * 200_000)
