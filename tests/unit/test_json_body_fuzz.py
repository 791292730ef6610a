"""Fuzz target for JSON request bodies (issue 9, items 15 and "Tests and
done"): ``parse_json_object`` either raises BadRequest or returns a value
PostgreSQL can store as text/jsonb (no NaN/Infinity, no NUL, no lone
surrogate, bounded depth)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.access import MAX_JSON_DEPTH, parse_json_object
from server.errors import BadRequest

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(10**40), 10**40), st.floats(),
                     st.text(max_size=12), st.sampled_from(["\u0000", "\ud800", "a\udfffb", "\x07", "NaN"]))
_json = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                     max_leaves=20)


def _storable(value) -> None:
    text = json.dumps(value, allow_nan=False)  # raises on NaN/Infinity
    assert "\\u0000" not in text
    text.encode("utf-8")
    json.dumps(value, ensure_ascii=False).encode("utf-8")  # raises on a lone surrogate


def _depth(value, depth: int = 1) -> int:
    if isinstance(value, dict):
        return max([depth, *(_depth(v, depth + 1) for v in value.values())])
    if isinstance(value, list):
        return max([depth, *(_depth(v, depth + 1) for v in value)])
    return depth - 1


@settings(max_examples=400, deadline=None)
@given(_json)
def test_fuzz_structured(value) -> None:
    raw = json.dumps(value).encode()  # NaN and surrogates as JSON escapes
    try:
        out = parse_json_object(raw)
    except BadRequest:
        return
    _storable(out)
    assert _depth(out) <= MAX_JSON_DEPTH


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode),
                 st.integers(1, 300_000).map(lambda n: b"[" * n), st.integers(1, 100_000).map(lambda n: b'{"a":' * n)))
def test_fuzz_raw_bytes(raw: bytes) -> None:
    try:
        out = parse_json_object(raw)
    except BadRequest:
        return
    _storable(out)


@pytest.mark.parametrize("raw", [b"[" * 200_000, b'{"x": NaN}', b'{"x": -Infinity}', b'{"x": 1e999}',
                                 b'{"x": "\\u0000"}', b'{"\\ud800": 1}', b'{"x": ["\\udfff"]}',
                                 b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1), b"\xff"])
def test_named_hostile_bodies_are_bad_requests(raw: bytes) -> None:
    with pytest.raises(BadRequest):
        parse_json_object(raw)
