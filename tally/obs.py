"""OBS WebSocket v5 tally client.

Protocol facts (obs-websocket 5.x ``docs/generated/protocol.md``):

* Messages are ``{"op": N, "d": {...}}`` JSON text frames (subprotocol
  ``obswebsocket.json``). Hello (op 0) → Identify (op 1) → Identified
  (op 2); Event (op 5); Request (op 6) / RequestResponse (op 7).
* Authentication ("Creating an authentication string"): Hello carries
  ``authentication: {challenge, salt}``; the Identify ``authentication`` is
  ``b64(sha256(b64(sha256(password + salt)) + challenge))``. A wrong or
  missing string closes the connection with 4009 AuthenticationFailed; 4010
  is UnsupportedRpcVersion; 4011 SessionInvalidated ("you must not
  automatically reconnect": the client stops).
* ``eventSubscriptions`` bitmask: General 1<<0, Scenes 1<<2 (program and
  preview scene changes), Transitions 1<<4, Ui 1<<10 (StudioModeStateChanged
  is a Ui event). We ask for General | Scenes | Transitions | Ui.
* Initial state after Identified: ``GetCurrentProgramScene``,
  ``GetStudioModeEnabled``, ``GetCurrentPreviewScene`` (the last fails with
  a status code when studio mode is off: then there is no preview).
* Events used: ``CurrentProgramSceneChanged`` and
  ``CurrentPreviewSceneChanged`` (``sceneName``; the preview only means
  something in studio mode), ``StudioModeStateChanged``
  (``studioModeEnabled``), ``SceneTransitionStarted`` / ``Ended``.

Transitions (reasoning)
-----------------------
During a transition both the outgoing and the incoming scene are on air, so
both must be red. ``SceneTransitionStarted`` only names the *transition*
(``transitionName``), not the scenes, so:

* the outgoing scene is the program scene known when the transition starts;
* the incoming scene is, in studio mode, the preview scene (a studio-mode
  transition takes preview to program); outside studio mode it is unknown
  until the ``CurrentProgramSceneChanged`` that OBS emits as the transition
  begins — from then on both are on air;
* if ``CurrentProgramSceneChanged`` arrives *before* the start event (the
  order of the frontend's scene-changed event and libobs' transition signal
  is not documented), a start within ``order_window`` seconds of a program
  change takes the scene that was replaced as the outgoing one;
* ``SceneTransitionEnded`` leaves only the program scene on air. The docs
  note that it "does not appear to trigger when the transition is
  interrupted by the user", so a transition also ends after
  ``max_transition`` seconds, and a new start replaces a running one.

Scenes map to sources (a scene may map to several sources, and a source may
appear in several scenes); the client reports the full set on every change.
``ObsTallyTracker`` is the sans-I/O part (messages in, messages out, explicit
``now``); ``ObsClient`` moves the JSON over ``websockets`` and reconnects with
capped exponential backoff; a disconnect → ``authority_lost``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from typing import Any

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, WebSocketException
from websockets.typing import Subprotocol

from tally.adapter import ReconnectingClient
from tally.errors import HandshakeFailed, ObsError
from tally.log import event
from tally.state import Bus, TallyChange, TallyState

log = logging.getLogger(__name__)

RPC_VERSION = 1
DEFAULT_URL = "ws://127.0.0.1:4455"
SUBPROTOCOL = "obswebsocket.json"


class OpCode(IntEnum):
    HELLO = 0
    IDENTIFY = 1
    IDENTIFIED = 2
    REIDENTIFY = 3
    EVENT = 5
    REQUEST = 6
    REQUEST_RESPONSE = 7


class EventSubscription(IntFlag):
    GENERAL = 1 << 0
    SCENES = 1 << 2
    TRANSITIONS = 1 << 4
    UI = 1 << 10


TALLY_SUBSCRIPTIONS = EventSubscription.GENERAL | EventSubscription.SCENES | EventSubscription.TRANSITIONS | EventSubscription.UI


class ObsCloseCode(IntEnum):
    AUTHENTICATION_FAILED = 4009
    UNSUPPORTED_RPC_VERSION = 4010
    SESSION_INVALIDATED = 4011


def obs_authentication(password: str, salt: str, challenge: str) -> str:
    """b64(sha256(b64(sha256(password + salt)) + challenge))."""
    secret = base64.b64encode(hashlib.sha256((password + salt).encode("utf-8")).digest())
    return base64.b64encode(hashlib.sha256(secret + challenge.encode("utf-8")).digest()).decode("ascii")


@dataclass(slots=True)
class ObsTransition:
    from_scene: str | None
    to_scene: str | None
    started: float


@dataclass(frozen=True, slots=True)
class ObsStep:
    """Result of one received message: what to send back, and whether the
    on-air/preview scene sets changed."""

    send: list[dict[str, Any]] = field(default_factory=list)
    changed: bool = False


def _str_field(data: Mapping[str, Any], *names: str) -> str:
    for name in names:
        value = data.get(name)
        if isinstance(value, str):
            return value
    raise ObsError(f"missing string field {names[0]!r}")


def parse_frame(raw: str | bytes) -> Any:
    """Decode one frame of the ``obswebsocket.json`` subprotocol; anything
    that is not a JSON text frame is an :class:`ObsError` (the session is
    dropped and reconnected), never another exception: a frame nested
    deeper than the recursion limit raises RecursionError in ``json``."""
    if not isinstance(raw, str):
        raise ObsError("binary frame on the obswebsocket.json subprotocol")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ObsError(f"invalid JSON from OBS: {type(exc).__name__}") from None


class ObsTallyTracker:
    """Sans-I/O OBS WebSocket v5 session tracking program/preview scenes."""

    def __init__(
        self,
        password: str | None = None,
        *,
        event_subscriptions: int = TALLY_SUBSCRIPTIONS,
        order_window: float = 0.5,
        max_transition: float = 10.0,
    ) -> None:
        self.password = password
        self.event_subscriptions = int(event_subscriptions)
        self.order_window = order_window
        self.max_transition = max_transition
        self.identified = False
        self.synced = False
        self.program: str | None = None
        self.preview: str | None = None
        self.studio = False
        self.transition: ObsTransition | None = None
        self.obs_version: str | None = None
        self._recent_change: tuple[str | None, float] | None = None
        self._pending: dict[str, str] = {}
        self._next_id = 0

    # views ---------------------------------------------------------------

    def program_scenes(self) -> frozenset[str]:
        t = self.transition
        if t is not None:
            return frozenset(s for s in (t.from_scene, t.to_scene, self.program) if s is not None)
        return frozenset({self.program}) if self.program is not None else frozenset()

    def preview_scenes(self) -> frozenset[str]:
        if self.studio and self.preview is not None:
            return frozenset({self.preview})
        return frozenset()

    def deadline(self) -> float | None:
        return self.transition.started + self.max_transition if self.transition else None

    # input ---------------------------------------------------------------

    def tick(self, now: float) -> bool:
        """End a transition whose Ended event never came; True if changed."""
        if self.transition is not None and now - self.transition.started >= self.max_transition:
            before = self._snapshot()
            self.transition = None
            return self.synced and before != self._snapshot()
        return False

    def receive(self, message: Any, now: float) -> ObsStep:
        if not isinstance(message, dict):
            raise ObsError("OBS message must be a JSON object")
        op = message.get("op")
        d = message.get("d")
        if isinstance(op, bool) or not isinstance(op, int) or not isinstance(d, dict):
            raise ObsError("OBS message needs an integer op and an object d")
        before = self._snapshot()
        was_synced = self.synced
        send: list[dict[str, Any]] = []
        if op == OpCode.HELLO:
            send.append(self._on_hello(d))
        elif op == OpCode.IDENTIFIED:
            if self.identified:
                raise ObsError("second Identified")
            self.identified = True
            send += [
                self._request("GetCurrentProgramScene"),
                self._request("GetStudioModeEnabled"),
                self._request("GetCurrentPreviewScene"),
            ]
        elif op == OpCode.REQUEST_RESPONSE:
            send += self._on_response(d)
        elif op == OpCode.EVENT:
            send += self._on_event(d, now)
        # Other opcodes (Reidentify answers, batches) carry nothing we use.
        changed = self.synced and (not was_synced or before != self._snapshot())
        return ObsStep(send, changed)

    # internals -----------------------------------------------------------

    def _snapshot(self) -> tuple[frozenset[str], frozenset[str]]:
        return self.program_scenes(), self.preview_scenes()

    def _request(self, request_type: str) -> dict[str, Any]:
        self._next_id += 1
        request_id = f"returnfeed-{self._next_id}"
        self._pending[request_id] = request_type
        return {"op": int(OpCode.REQUEST), "d": {"requestType": request_type, "requestId": request_id}}

    def _on_hello(self, d: Mapping[str, Any]) -> dict[str, Any]:
        rpc = d.get("rpcVersion")
        if isinstance(rpc, bool) or not isinstance(rpc, int):
            raise ObsError("Hello without an integer rpcVersion")
        if rpc < RPC_VERSION:
            raise HandshakeFailed(f"OBS offers RPC version {rpc}, we need {RPC_VERSION}")
        version = d.get("obsWebSocketVersion")
        self.obs_version = version if isinstance(version, str) else None
        identify: dict[str, Any] = {"rpcVersion": RPC_VERSION, "eventSubscriptions": self.event_subscriptions}
        auth = d.get("authentication")
        if auth is not None:
            if not isinstance(auth, dict):
                raise ObsError("Hello authentication must be an object")
            if self.password is None:
                raise HandshakeFailed("OBS requires a password and none is configured")
            identify["authentication"] = obs_authentication(
                self.password, _str_field(auth, "salt"), _str_field(auth, "challenge")
            )
        return {"op": int(OpCode.IDENTIFY), "d": identify}

    def _on_response(self, d: Mapping[str, Any]) -> list[dict[str, Any]]:
        request_id = d.get("requestId")
        kind = self._pending.pop(request_id, None) if isinstance(request_id, str) else None
        if kind is None:
            return []
        status = d.get("requestStatus")
        if not isinstance(status, dict) or not isinstance(status.get("result"), bool):
            raise ObsError("RequestResponse without requestStatus.result")
        data = d.get("responseData") or {}
        if not isinstance(data, dict):
            raise ObsError("responseData must be an object")
        ok = status["result"]
        if kind == "GetCurrentProgramScene":
            if not ok:
                raise ObsError(f"GetCurrentProgramScene failed: {status.get('comment')!r}")
            self.program = _str_field(data, "sceneName", "currentProgramSceneName")
        elif kind == "GetStudioModeEnabled":
            if ok:
                enabled = data.get("studioModeEnabled")
                if not isinstance(enabled, bool):
                    raise ObsError("studioModeEnabled must be a boolean")
                self.studio = enabled
        elif kind == "GetCurrentPreviewScene":
            # Fails (NotStudioMode) when studio mode is off: no preview.
            self.preview = _str_field(data, "sceneName", "currentPreviewSceneName") if ok else None
        if not self.synced and not self._pending and self.program is not None:
            self.synced = True
        return []

    def _on_event(self, d: Mapping[str, Any], now: float) -> list[dict[str, Any]]:
        kind = d.get("eventType")
        data = d.get("eventData") or {}
        if not isinstance(kind, str) or not isinstance(data, dict):
            raise ObsError("Event needs a string eventType and an object eventData")
        if kind == "CurrentProgramSceneChanged":
            name = _str_field(data, "sceneName")
            if self.transition is not None:
                self.transition.to_scene = name
            elif name != self.program:
                self._recent_change = (self.program, now)
            self.program = name
        elif kind == "CurrentPreviewSceneChanged":
            self.preview = _str_field(data, "sceneName")
        elif kind == "StudioModeStateChanged":
            enabled = data.get("studioModeEnabled")
            if not isinstance(enabled, bool):
                raise ObsError("studioModeEnabled must be a boolean")
            self.studio = enabled
            if enabled:
                return [self._request("GetCurrentPreviewScene")]
            self.preview = None
        elif kind == "SceneTransitionStarted":
            recent = self._recent_change
            self._recent_change = None
            if recent is not None and recent[0] is not None and now - recent[1] <= self.order_window:
                # The program change came first: it replaced recent[0].
                self.transition = ObsTransition(recent[0], self.program, now)
            else:
                to = self.preview if self.studio and self.preview != self.program else None
                self.transition = ObsTransition(self.program, to, now)
        elif kind == "SceneTransitionEnded":
            self.transition = None
            self._recent_change = None
        return []


def _normalise(mapping: Mapping[str, str | Sequence[str]]) -> dict[str, tuple[str, ...]]:
    return {scene: (names,) if isinstance(names, str) else tuple(names) for scene, names in mapping.items()}


class ObsClient(ReconnectingClient):
    """Keeps an OBS WebSocket v5 session and reports tally to a ``TallyState``."""

    def __init__(
        self,
        state: TallyState,
        url: str = DEFAULT_URL,
        *,
        password: str | None = None,
        authority: str = "obs",
        scenes: Mapping[str, str | Sequence[str]] | None = None,
        backoff_initial: float = 0.5,
        backoff_max: float = 10.0,
        open_timeout: float = 3.0,
        ping_interval: float | None = 1.0,
        ping_timeout: float | None = 2.0,
        order_window: float = 0.5,
        max_transition: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(state, authority, backoff_initial=backoff_initial, backoff_max=backoff_max, clock=clock)
        self.url = url
        self._task_name = f"obs-{url}"
        self.password = password
        self.scenes = state.obs_scenes(authority) if scenes is None else _normalise(scenes)
        state.check_mapping(authority, self.scenes, "OBS scene")
        self.open_timeout = open_timeout
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.order_window = order_window
        self.max_transition = max_transition
        self._timer: asyncio.TimerHandle | None = None
        self.tracker: ObsTallyTracker | None = None
        self._got_state = False
        self.connects = 0
        self.errors = 0
        self.stopped_reason: str | None = None

    def report(self, tracker: ObsTallyTracker, now: float) -> TallyChange | None:
        """Map the tracker's scenes to sources and report the full set."""
        program = tracker.program_scenes()
        preview = tracker.preview_scenes()
        buses: dict[str, set[Bus]] = {}
        for scene, names in self.scenes.items():
            for name in names:
                b = buses.setdefault(name, set())
                if scene in program:
                    b.add(Bus.PROGRAM)
                if scene in preview:
                    b.add(Bus.PREVIEW)
        return self.state.report(self.authority, buses, full=True, now=now)

    def _lost(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super()._lost()

    async def _run(self) -> None:
        delay = self.backoff_initial
        while not self._closing:
            self._got_state = False
            try:
                await self._session()
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd is not None else None
                if code == ObsCloseCode.SESSION_INVALIDATED:
                    self.stopped_reason = "session invalidated by OBS (4011); not reconnecting"
                    event(log, logging.ERROR, "obs.stopped", url=self.url, reason=self.stopped_reason)
                    self._lost()
                    return
                if code in (ObsCloseCode.AUTHENTICATION_FAILED, ObsCloseCode.UNSUPPORTED_RPC_VERSION):
                    self.errors += 1
                    event(log, logging.ERROR, "obs.refused", url=self.url, close_code=code)
                else:
                    event(log, logging.WARNING, "obs.closed", url=self.url, close_code=code)
            except HandshakeFailed as exc:
                self.errors += 1
                event(log, logging.ERROR, "obs.handshake_failed", url=self.url, error=str(exc))
            except ObsError as exc:
                self.errors += 1
                event(log, logging.WARNING, "obs.protocol_error", url=self.url, error=str(exc))
            except (OSError, TimeoutError, WebSocketException) as exc:
                event(log, logging.WARNING, "obs.connection_failed", url=self.url, error=str(exc) or type(exc).__name__)
            finally:
                self._lost()
            if self._got_state:
                delay = self.backoff_initial
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff_max)

    async def _session(self) -> None:
        async with connect(
            self.url,
            subprotocols=[Subprotocol(SUBPROTOCOL)],
            open_timeout=self.open_timeout,
            ping_interval=self.ping_interval,
            ping_timeout=self.ping_timeout,
            max_size=1 << 20,
            compression=None,
        ) as ws:
            self.connects += 1
            tracker = ObsTallyTracker(
                self.password, order_window=self.order_window, max_transition=self.max_transition
            )
            self.tracker = tracker
            async for raw in ws:
                if self._closing:
                    return
                message = parse_frame(raw)
                now = self._clock()
                step = tracker.receive(message, now)
                for out in step.send:
                    await ws.send(json.dumps(out, separators=(",", ":")))
                if step.changed:
                    self.report(tracker, now)
                    self._got_state = True
                    self._synced.set()
                self._arm_timer(tracker)

    def _arm_timer(self, tracker: ObsTallyTracker) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = tracker.deadline()
        if deadline is None:
            return
        delay = max(0.0, deadline - self._clock()) + 0.001
        self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer, tracker)

    def _on_timer(self, tracker: ObsTallyTracker) -> None:
        self._timer = None
        now = self._clock()
        if tracker is not self.tracker:
            return
        if tracker.tick(now):
            event(log, logging.WARNING, "obs.transition_overdue", url=self.url, max_transition=tracker.max_transition)
            self.report(tracker, now)
        elif tracker.deadline() is not None:
            self._arm_timer(tracker)  # fired early (millisecond loop clocks): re-arm
