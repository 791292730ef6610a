"""The one tally command path: ``parse_command`` checks a decoded body as the
WebSocket parser checks a message, ``TallyHub.command`` applies it for REST
and WebSocket alike, and the tally package's log events carry their fields
into the server's JSON log lines."""

from __future__ import annotations

import io
import json
import logging

import pytest

from server.log import setup_logging
from tally.errors import CommandRejected, MessageError
from tally.hub import TallyHub
from tally.protocol import Cut, Preview, Take, parse_client_message, parse_command
from tally.state import SourceConfig, TallyState
from tally.tsl import TslInput

BODIES = [
    {"type": "cut", "source": "a"},
    {"type": "preview", "source": "b", "id": 3},
    {"type": "take"},
    {"type": "take", "duration": 0.5, "id": "x"},
    {"type": "explode"},
    {"type": 7},
    {"type": "cut"},
    {"type": "cut", "source": ""},
    {"type": "cut", "source": "s" * 65},
    {"type": "cut", "source": "a", "more": 1},
    {"type": "take", "duration": "1"},
    {"type": "take", "duration": False},
    {"type": "cut", "source": "a", "id": [1]},
]


def _text(frame: bytes) -> dict:
    """The JSON of one unmasked server text frame (RFC 6455 §5.2: 7-bit length, or 126 + 16-bit)."""
    size = frame[1] & 0x7F
    return json.loads(frame[4:] if size == 126 else frame[2:])


def _outcome(fn, arg):
    try:
        return fn(arg)
    except MessageError as exc:
        return (exc.code, exc.detail)


@pytest.mark.parametrize("body", BODIES, ids=lambda b: json.dumps(b))
def test_parse_command_checks_a_body_as_the_websocket_checks_a_message(body) -> None:
    assert _outcome(parse_command, body) == _outcome(parse_client_message, json.dumps(body))


@pytest.mark.parametrize("kind", ["ping", "pong"])
def test_heartbeats_are_no_commands(kind) -> None:
    with pytest.raises(MessageError) as info:
        parse_command({"type": kind})
    assert info.value.code == "unknown_type"


def _hub() -> TallyHub:
    state = TallyState("Show", [SourceConfig("a"), SourceConfig("b")])
    return TallyHub(state, clock=lambda: 100.0)


def test_command_applies_through_the_state_with_who_and_the_hub_clock() -> None:
    hub = _hub()
    change = hub.command(Cut("a"), who="rest-user")
    assert change is not None and change.who == "rest-user" and change.at == 100.0
    assert hub.state.program == "a"
    hub.command(Preview("b"), who="rest-user")
    hub.command(Take(0.0), who="rest-user", now=101.0)
    assert (hub.state.program, hub.state.preview) == ("b", "a")


def test_command_refusal_is_the_websocket_error() -> None:
    hub = _hub()
    with pytest.raises(CommandRejected) as info:
        hub.command(Cut("nope"), who="d")
    sent: list[bytes] = []

    class Sink:
        def write(self, frame: bytes) -> None:
            sent.append(frame)

        def get_write_buffer_size(self) -> int:
            return 0

        def close(self, code: int, reason: str) -> None:
            pass

    client = hub.connect(Sink(), director=True, who="d", now=100.0)
    hub.receive(client, json.dumps({"type": "cut", "source": "nope"}), now=100.0)
    error = _text(sent[-1])
    assert (error["code"], error["detail"]) == (info.value.code, info.value.detail)
    assert hub.state.seq == 0


def test_command_leaves_delivery_to_the_hub_flush() -> None:
    """No loop here: the change is accumulated for the owner's flush, not sent from ``command``."""
    hub = _hub()
    sent: list[bytes] = []

    class Sink:
        def write(self, frame: bytes) -> None:
            sent.append(frame)

        def get_write_buffer_size(self) -> int:
            return 0

        def close(self, code: int, reason: str) -> None:
            pass

    hub.connect(Sink(), now=100.0)
    hub.command(Cut("a"), who="d")
    assert len(sent) == 1  # the snapshot only
    assert hub.flush() == 1 and _text(sent[-1])["sources"]["a"]["state"] == "program"


def test_tally_log_events_reach_the_json_output_as_fields() -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    out = io.StringIO()
    setup_logging("INFO", "json", out)
    try:
        state = TallyState("Show", [SourceConfig("a", authority="tsl:desk", tsl_address=1)])
        tsl = TslInput(state, authority="tsl:desk", version=5)
        tsl.feed_datagram(b"\x01", now=1.0)
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    malformed = [line for line in lines if line["event"] == "tsl.input_malformed"]
    assert malformed and malformed[0]["authority"] == "tsl:desk" and malformed[0]["error"]
    assert malformed[0]["level"] == "warning" and malformed[0]["logger"] == "tally.tsl.transports"
