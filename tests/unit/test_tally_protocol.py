"""Tally WebSocket message schema: strict parsing and encoding."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tally.errors import MessageError
from tally.protocol import (
    MAX_MESSAGE_BYTES,
    PING,
    PONG,
    Cut,
    Ping,
    Pong,
    Preview,
    Take,
    encode_error,
    encode_pong,
    encode_snapshot,
    encode_tally,
    parse_client_message,
)
from tally.state import SourceConfig, TallyState


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"type":"cut","source":"cam2"}', Cut("cam2")),
        ('{"type":"preview","source":"cam3","id":"a1"}', Preview("cam3", "a1")),
        ('{"type":"take"}', Take()),
        ('{"type":"take","duration":0.5,"id":7}', Take(0.5, 7)),
        ('{"type":"take","duration":2}', Take(2.0)),
        ('{"type":"ping"}', Ping()),
        ('{"type":"ping","id":"x"}', Ping("x")),
        ('{"type":"pong"}', Pong()),
        (b'{"type":"cut","source":"k\xc3\xa4m"}', Cut("käm")),
    ],
)
def test_parse_valid(text, expected):
    assert parse_client_message(text) == expected


@pytest.mark.parametrize(
    "text, code",
    [
        ("", "bad_json"),
        ("not json", "bad_json"),
        ("[1,2]", "bad_json"),
        ('"cut"', "bad_json"),
        ('{"type":"cut","source":"a","source":"b"}', "bad_json"),
        ('{"type":"take","duration":NaN}', "bad_json"),
        ('{"type":"take","duration":Infinity}', "bad_json"),
        (b"\xff\xfe", "bad_json"),
        ("{}", "bad_field"),
        ('{"type":5}', "bad_field"),
        ('{"type":"explode"}', "unknown_type"),
        ('{"type":"snapshot"}', "unknown_type"),
        ('{"type":"cut"}', "bad_field"),
        ('{"type":"cut","source":5}', "bad_field"),
        ('{"type":"cut","source":""}', "bad_field"),
        ('{"type":"cut","source":"' + "x" * 65 + '"}', "bad_field"),
        ('{"type":"cut","source":"a","extra":1}', "bad_field"),
        ('{"type":"take","duration":"1"}', "bad_field"),
        ('{"type":"take","duration":true}', "bad_field"),
        ('{"type":"ping","id":true}', "bad_field"),
        ('{"type":"ping","id":1.5}', "bad_field"),
        ('{"type":"ping","id":"' + "i" * 65 + '"}', "bad_field"),
        ('{"type":"ping","id":' + str(2**60) + "}", "bad_field"),
        ("[" * 100000, "too_large"),
    ],
)
def test_parse_rejects(text, code):
    with pytest.raises(MessageError) as e:
        parse_client_message(text)
    assert e.value.code == code


def test_size_limit_is_in_utf8_bytes():
    base = '{"type":"ping","id":"%s"}'
    ok = base % ("a" * 60)
    assert parse_client_message(ok)
    padded = '{"type":"ping"}' + " " * (MAX_MESSAGE_BYTES - 15)
    assert len(padded.encode()) == MAX_MESSAGE_BYTES
    assert parse_client_message(padded) == Ping()
    # 2-byte characters: fewer than 4096 characters but more than 4096 bytes
    big = '{"type":"ping"}' + "\u00a0" * 2100
    assert len(big) < MAX_MESSAGE_BYTES < len(big.encode())
    with pytest.raises(MessageError) as e:
        parse_client_message(big)
    assert e.value.code == "too_large"
    with pytest.raises(MessageError) as e:
        parse_client_message(b" " * (MAX_MESSAGE_BYTES + 1))
    assert e.value.code == "too_large"


def test_parse_rejects_non_text():
    with pytest.raises(MessageError):
        parse_client_message(12)  # type: ignore[arg-type]


def test_deep_nesting_is_an_error_not_a_crash():
    text = '{"type":"ping","id":' + "[" * 2000 + "]" * 2000 + "}"
    with pytest.raises(MessageError):
        parse_client_message(text)


def test_encode_server_messages():
    state = TallyState("Show", [SourceConfig("cam1", "Cam ①"), SourceConfig("cam2", authority="vmix")])
    state.cut("cam1", now=0)
    snap = encode_snapshot(state.seq, state.production, state.states())
    assert snap.startswith('{"type":"snapshot","seq":1,')
    obj = json.loads(snap)
    assert obj == {
        "type": "snapshot",
        "seq": 1,
        "production": "Show",
        "sources": {
            "cam1": {"state": "program", "buses": ["program"], "aux": False, "label": "Cam ①", "authority": "director"},
            "cam2": {"state": "unknown", "buses": [], "aux": False, "label": "cam2", "authority": "vmix"},
        },
    }
    tally = encode_tally(7, {"cam1": state.source_state("cam1")})
    assert tally.startswith('{"type":"tally","seq":7,')
    assert json.loads(tally)["sources"]["cam1"]["state"] == "program"
    assert json.loads(encode_error("unknown_source", "no", "i1")) == {
        "type": "error",
        "code": "unknown_source",
        "detail": "no",
        "id": "i1",
    }
    assert json.loads(encode_error("bad_json", "x")) == {"type": "error", "code": "bad_json", "detail": "x"}
    assert encode_pong() == PONG and json.loads(encode_pong(3)) == {"type": "pong", "id": 3}
    assert json.loads(PING) == {"type": "ping"}


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=600), st.text(max_size=600)))
def test_fuzz_parser_only_raises_message_error(data):
    try:
        parse_client_message(data)
    except MessageError as exc:
        assert exc.code


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["type", "source", "duration", "id", "x"]),
        st.one_of(st.sampled_from(["cut", "preview", "take", "ping", "pong", "cam1"]), json_values),
        max_size=4,
    )
)
def test_fuzz_structured_messages(obj):
    try:
        msg = parse_client_message(json.dumps(obj))
    except MessageError:
        return
    assert isinstance(msg, Cut | Preview | Take | Ping | Pong)
