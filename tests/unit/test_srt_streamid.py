"""Stream ID parsing: both syntaxes, layers, limits, errors, round trips, fuzz."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from media.errors import RemoteMediaError
from media.srt.streamid import (
    MAX_STREAM_ID_BYTES,
    StreamIdError,
    StreamIdRequest,
    is_valid_layer_name,
    is_valid_stream_name,
    parse_stream_id,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("publish:cam1", StreamIdRequest("cam1", "publish")),
        ("read:cam1", StreamIdRequest("cam1", "read")),
        ("publish:cam1/low", StreamIdRequest("cam1", "publish", layer="low")),
        ("publish:cam1:user:pass", StreamIdRequest("cam1", "publish", user="user", password="pass")),
        ("read:cam-2.b_x/high:alice:s3cret", StreamIdRequest("cam-2.b_x", "read", user="alice", password="s3cret", layer="high")),
        (r"publish:cam1:al\:ice:pa\:ss\\", StreamIdRequest("cam1", "publish", user="al:ice", password="pa:ss\\")),
        ("#!::r=cam1,m=publish", StreamIdRequest("cam1", "publish")),
        ("#!::r=cam1,m=publish,s=token,u=user", StreamIdRequest("cam1", "publish", token="token", user="user")),
        ("#!::r=cam1", StreamIdRequest("cam1", "read")),  # m defaults to request
        ("#!::m=request,r=cam1,h=example.org", StreamIdRequest("cam1", "read", host="example.org")),
        ("#!::r=cam1,m=publish,layer=low", StreamIdRequest("cam1", "publish", layer="low")),
        ("#!::r=cam1,m=publish,returnfeed_layer=low", StreamIdRequest("cam1", "publish", layer="low")),
        ("#!::r=cam1/low,m=publish,layer=low", StreamIdRequest("cam1", "publish", layer="low")),
        ("#!::r=cam1,m=publish,t=stream", StreamIdRequest("cam1", "publish")),
        # base64 padding and other '=' after the first one stay in the value
        ("#!::r=cam1,m=publish,s=YWJj==", StreamIdRequest("cam1", "publish", token="YWJj==")),
        # escaped comma in a value
        (r"#!::r=cam1,s=a\,b,m=publish", StreamIdRequest("cam1", "publish", token="a,b")),
        # unknown keys are ignored (access-control guidelines leave it to the app)
        ("#!::r=cam1,m=publish,acme_region=eu", StreamIdRequest("cam1", "publish")),
        # nested forms (guidelines, "General Syntax": '{' starts a nested block)
        ("#!:{r=cam1,m=publish}", StreamIdRequest("cam1", "publish")),
        ("#!:{r=cam1,{m=publish,{s=tok}},u=bob}", StreamIdRequest("cam1", "publish", token="tok", user="bob")),
        (r"#!:{r=cam1,s=a\}b}", StreamIdRequest("cam1", "read", token="a}b")),
    ],
)
def test_valid(raw: str, expected: StreamIdRequest) -> None:
    assert parse_stream_id(raw) == expected
    assert parse_stream_id(raw.encode()) == expected
    assert StreamIdRequest.parse(raw) == expected


@pytest.mark.parametrize(
    ("raw", "code", "fragment"),
    [
        ("", 1400, "empty"),
        ("cam1", 1400, "unrecognised"),
        ("write:cam1", 1405, "unknown action"),
        ("publish:", 1400, "missing stream name"),
        ("publish:cam 1", 1400, "invalid stream name"),
        ("publish:-cam", 1400, "invalid stream name"),
        ("publish:" + "a" * 65, 1400, "invalid stream name"),
        ("publish:cam1/", 1400, "invalid layer"),
        ("publish:cam1/lo/w", 1400, "invalid layer"),
        ("publish:cam1:user", 1400, "USER:PASSWORD"),
        ("publish:cam1:user:pass:more", 1400, "USER:PASSWORD"),
        ("publish:cam1::pass", 1400, "empty user"),
        ("publish:cam1:user:", 1400, "empty user"),
        ("publish:cam1:user:pa\\", 1400, "backslash"),
        ("publish:cam\x01", 1400, "control"),
        ("#!", 1400, "unsupported '#!' syntax"),
        ("#!:x", 1400, "unsupported '#!' syntax"),
        ("#!::", 1400, "empty item"),
        ("#!::m=publish", 1400, "no 'r'"),
        ("#!::r=", 1400, "missing stream name"),
        ("#!::r=cam1,,m=publish", 1400, "empty item"),
        ("#!::r=cam1,m", 1400, "has no '='"),
        ("#!::r=cam1,=x", 1400, "invalid key"),
        ("#!::r=cam1,1a=x", 1400, "invalid key"),
        ("#!::r=cam1,r=cam2", 1400, "twice"),
        ("#!::r=cam1,m=bidirectional", 1405, "bidirectional"),
        ("#!::r=cam1,m=push", 1405, "unknown mode"),
        ("#!::r=cam1,t=file", 1415, "only t=stream"),
        ("#!::r=cam1,s=", 1400, "empty session token"),
        ("#!::r=cam1,u=", 1400, "empty user"),
        ("#!::r=cam1/low,layer=high", 1400, "conflicting layers"),
        ("#!::r=cam1,layer=a/b", 1400, "invalid layer"),
        ("#!::r=cam1,s=x\\", 1400, "backslash"),
        ("#!:{r=cam1", 1400, "missing '}'"),
        ("#!:{r=cam1}x", 1400, "after the closing"),
        ("#!:{r=cam1,{m=publish}", 1400, "missing '}'"),
        ("#!:{r=cam1}}", 1400, "after the closing"),
        ("#!:{" * 5 + "r=a" + "}" * 5, 1400, "has no '='"),
        ("#!:{r=a," + "{" * 12 + "m=publish" + "}" * 12 + "}", 1400, "nested deeper"),
    ],
)
def test_invalid(raw: str, code: int, fragment: str) -> None:
    with pytest.raises(StreamIdError) as info:
        parse_stream_id(raw)
    assert info.value.reject_code == code
    assert fragment in info.value.reason
    assert isinstance(info.value, RemoteMediaError)


def test_length_limit_is_512_bytes() -> None:
    base = "#!::r=cam1,m=publish,s="
    ok = base + "x" * (MAX_STREAM_ID_BYTES - len(base))
    assert parse_stream_id(ok).token is not None
    with pytest.raises(StreamIdError, match="512"):
        parse_stream_id(ok + "x")
    # multi-byte UTF-8 counts in bytes, not characters
    with pytest.raises(StreamIdError, match="512"):
        parse_stream_id(base + "é" * 250)
    with pytest.raises(StreamIdError, match="512"):
        parse_stream_id((ok + "x").encode())


def test_bad_encodings() -> None:
    with pytest.raises(StreamIdError, match="UTF-8"):
        parse_stream_id(b"publish:cam1:\xff\xfe:pw")
    with pytest.raises(StreamIdError, match="surrogate"):
        parse_stream_id("publish:cam1:\udc80:pw")
    with pytest.raises(StreamIdError, match="str or bytes"):
        parse_stream_id(123)  # type: ignore[arg-type]


def test_utf8_credentials() -> None:
    req = parse_stream_id("#!::r=cam1,m=publish,u=zoë,s=ключ".encode())
    assert (req.user, req.token) == ("zoë", "ключ")


def test_request_validation_and_path() -> None:
    assert StreamIdRequest("cam1", "publish", layer="low").path == "cam1/low"
    with pytest.raises(ValueError):
        StreamIdRequest("cam1", "write")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        StreamIdRequest("cam/1", "read")
    with pytest.raises(ValueError):
        StreamIdRequest("cam1", "read", layer="")
    assert is_valid_stream_name("a" * 64) and not is_valid_stream_name("a" * 65)
    assert is_valid_layer_name("a" * 32) and not is_valid_layer_name("a" * 33)


@pytest.mark.parametrize(
    "req",
    [
        StreamIdRequest("cam1", "publish"),
        StreamIdRequest("cam1", "read", layer="low"),
        StreamIdRequest("cam1", "publish", user="a:b\\", password="p:w"),
        StreamIdRequest("cam1", "publish", token="t,o=k{}\\", user="bob"),
        StreamIdRequest("cam1", "read", token="tok", host="example.org", layer="hi"),
    ],
)
def test_serialize_round_trip(req: StreamIdRequest) -> None:
    assert parse_stream_id(req.serialize()) == req
    assert str(req) == req.serialize()


def test_serialize_refuses_what_no_syntax_carries() -> None:
    with pytest.raises(ValueError, match="password"):
        StreamIdRequest("cam1", "publish", token="t", user="u", password="p").serialize()
    with pytest.raises(ValueError, match="512"):
        StreamIdRequest("cam1", "publish", token="x" * 600).serialize()


_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True)
_free = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x2FF, exclude_characters="\x7f"), min_size=1, max_size=20)


@settings(max_examples=300, deadline=None)
@given(
    stream=_names,
    action=st.sampled_from(["publish", "read"]),
    layer=st.none() | _names,
    token=st.none() | _free,
    user=st.none() | _free,
    host=st.none() | _free,
    password=st.none() | _free,
)
def test_round_trip_property(
    stream: str, action: str, layer: str | None, token: str | None, user: str | None, host: str | None, password: str | None
) -> None:
    req = StreamIdRequest(stream, action, token=token, user=user, password=password, layer=layer, host=host)  # type: ignore[arg-type]
    try:
        text = req.serialize()
    except ValueError:
        return  # not representable (password with AC form)
    assert parse_stream_id(text) == req


_alphabet = st.sampled_from(list("#!:{}=,\\/ ") + ["r", "m", "s", "u", "h", "t", "publish", "read", "request", "cam1", "layer", "é", "\x00"])


@settings(max_examples=2000, deadline=None)
@given(st.one_of(st.binary(max_size=600), st.text(max_size=600), st.lists(_alphabet, max_size=60).map("".join)))
def test_fuzz_never_raises_anything_else(raw: bytes | str) -> None:
    """Fuzz target: any input either parses or raises StreamIdError."""
    try:
        result = parse_stream_id(raw)
    except StreamIdError as exc:
        assert exc.reason
        assert 1000 <= exc.reject_code < 2000
    else:
        assert isinstance(result, StreamIdRequest)
        assert is_valid_stream_name(result.stream)
        assert result.action in ("publish", "read")


def test_percent_encoded_access_control_stream_id() -> None:
    """'#' starts a URL fragment, so URLs carry the access-control form as
    %23!::…; callers that send it as written are understood."""
    req = parse_stream_id("%23!::r=cam1,m=publish,s=abc.def-_")
    assert (req.stream, req.action, req.token) == ("cam1", "publish", "abc.def-_")
    req = parse_stream_id(b"%23%21%3A%3Ar%3Dcam1%2Fl%C3%A9,m%3Dpublish".replace(b"l%C3%A9", b"low"))
    assert (req.stream, req.layer, req.action) == ("cam1", "low", "publish")
    for bad in ("%23!::r=cam1%", "%23!::r=cam1%zz", "%23!::r=%FF%FE"):
        with pytest.raises(StreamIdError):
            parse_stream_id(bad)
    # Only the %23 form is decoded: a '%' elsewhere is left to the syntax rules.
    with pytest.raises(StreamIdError):
        parse_stream_id("publish:cam%31")
