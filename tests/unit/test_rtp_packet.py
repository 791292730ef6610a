"""RTP packet view (RFC 3550 §5.1) and header extensions (RFC 8285)."""

from __future__ import annotations

import struct

import pytest
from aiortc import rtp as aiortc_rtp
from hypothesis import given, settings
from hypothesis import strategies as st

from media.errors import RtpError
from media.rtp.packet import (
    ONE_BYTE_PROFILE,
    TWO_BYTE_PROFILE,
    LayerPacket,
    RtpPacket,
    SeqUnwrapper,
    abs_send_time,
    build_extensions,
    is_rtcp,
    parse_extensions,
    payload_bounds,
    peek_header,
    seq_newer,
    unwrap_rtx_payload,
    wrap_rtx_payload,
    write_header,
)

# RFC 3550 §5.1 layout, written out byte by byte:
# V=2 P=0 X=0 CC=0 | M=1 PT=96 | seq=0x1234 | ts=0xDEADBEEF | SSRC=0x11223344
PLAIN = bytes.fromhex("80e01234deadbeef11223344") + b"payload"

# V=2 P=1 X=1 CC=2, M=0 PT=111, seq=1, ts=2, SSRC=3, CSRC 0xA, 0xB,
# one-byte extension block (RFC 8285 §4.2): profile 0xBEDE, 2 words:
#   id 1 len 1 "\x05", padding byte, id 3 len 3 "\x01\x02\x03", padding
# payload "abc", 3 padding bytes (last = 3).
FULL = (
    bytes.fromhex("b26f0001" "00000002" "00000003" "0000000a" "0000000b")
    + bytes.fromhex("bede0002" "1005" "00" "32010203" "00")
    + b"abc"
    + b"\x00\x00\x03"
)


def test_parse_plain_fixture() -> None:
    p = RtpPacket.parse(PLAIN)
    assert (p.marker, p.payload_type, p.sequence_number, p.timestamp, p.ssrc) == (
        True, 96, 0x1234, 0xDEADBEEF, 0x11223344,
    )
    assert p.payload == b"payload" and p.csrc == () and p.extension_profile is None
    assert bytes(p) == PLAIN
    assert peek_header(PLAIN) == (True, 96, 0x1234, 0xDEADBEEF, 0x11223344)
    assert payload_bounds(PLAIN) == (12, len(PLAIN))


def test_parse_full_fixture_csrc_extension_padding() -> None:
    p = RtpPacket.parse(FULL)
    assert p.csrc == (10, 11)
    assert p.extension_profile == ONE_BYTE_PROFILE
    assert p.extensions == ((1, b"\x05"), (3, b"\x01\x02\x03"))
    assert p.extension(3) == b"\x01\x02\x03" and p.extension(2) is None
    assert p.payload == b"abc"
    start, end = payload_bounds(FULL)
    assert FULL[start:end] == b"abc"
    # Serialization drops the padding but keeps everything else.
    again = RtpPacket.parse(bytes(p))
    assert again == p


def test_two_byte_extensions_rfc8285_4_3() -> None:
    # profile 0x100 + appbits 0, id 20 len 0, id 1 len 17 (too long for one-byte form)
    value = bytes(range(17))
    profile, data = build_extensions([(20, b""), (1, value)])
    assert profile == TWO_BYTE_PROFILE
    assert data[:4] == b"\x14\x00\x01\x11" and len(data) % 4 == 0
    assert parse_extensions(0x1003, data) == ((20, b""), (1, value))
    with pytest.raises(RtpError):
        build_extensions([(20, b"x")], two_byte=False)


def test_one_byte_id15_stops_processing() -> None:
    data = bytes((0x10, 0x01, 0xF0, 0x20, 0x02))
    assert parse_extensions(ONE_BYTE_PROFILE, data) == ((1, b"\x01"),)


def test_unknown_profile_has_no_elements() -> None:
    assert parse_extensions(0x1234, b"\x10\x01\x00\x00") == ()


@pytest.mark.parametrize(
    "data",
    [
        b"",
        PLAIN[:11],
        b"\x40" + PLAIN[1:],  # version 1
        bytes.fromhex("82e01234deadbeef11223344"),  # CC=2, no CSRCs
        bytes.fromhex("90e01234deadbeef11223344" "bede"),  # extension header cut
        bytes.fromhex("90e01234deadbeef11223344" "bede0004" "00000000"),  # ext too long
        bytes.fromhex("a0e01234deadbeef11223344" "0000"),  # padding 0
        bytes.fromhex("a0e01234deadbeef11223344" "0009"),  # padding past header
        bytes.fromhex("90e01234deadbeef11223344" "bede0001" "3f000000"),  # elem truncated
    ],
)
def test_malformed_raises_rtp_error(data: bytes) -> None:
    with pytest.raises(RtpError):
        RtpPacket.parse(data)


def test_cross_check_with_aiortc() -> None:
    # aiortc serializes, we parse.
    theirs = aiortc_rtp.RtpPacket(payload_type=102, marker=1, sequence_number=65535,
                                  timestamp=4000000000, ssrc=0xCAFEBABE, payload=b"\x01" * 50)
    theirs.csrc = [7]
    theirs.extensions.abs_send_time = 0x123456
    ext_map = aiortc_rtp.HeaderExtensionsMap()
    from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters, RTCRtpParameters

    ext_map.configure(RTCRtpParameters(headerExtensions=[
        RTCRtpHeaderExtensionParameters(id=3, uri="http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time")
    ]))
    wire = theirs.serialize(ext_map)
    ours = RtpPacket.parse(wire)
    assert (ours.marker, ours.payload_type, ours.sequence_number, ours.timestamp, ours.ssrc) == (
        True, 102, 65535, 4000000000, 0xCAFEBABE,
    )
    assert ours.csrc == (7,) and ours.payload == b"\x01" * 50
    assert ours.extension(3) == b"\x12\x34\x56"
    # We serialize, aiortc parses.
    mine = RtpPacket(111, 42, 960, 0xABCDEF01, b"opus", marker=False).with_extensions([(3, b"\x00\x00\x01")])
    parsed = aiortc_rtp.RtpPacket.parse(bytes(mine), ext_map)
    assert (parsed.payload_type, parsed.sequence_number, parsed.timestamp, parsed.ssrc) == (111, 42, 960, 0xABCDEF01)
    assert parsed.payload == b"opus" and parsed.extensions.abs_send_time == 1


def test_write_header_in_place() -> None:
    buf = bytearray(PLAIN)
    write_header(buf, False, 100, 0x10001, 0x100000005)
    assert peek_header(buf) == (False, 100, 1, 5, 0x11223344)


def test_helpers() -> None:
    assert is_rtcp(b"\x80\xc8") and not is_rtcp(PLAIN) and not is_rtcp(b"\x80")
    assert abs_send_time(1.5) == (3 << 17) and abs_send_time(64.0) == 0
    assert seq_newer(0, 65535) and not seq_newer(65535, 0) and not seq_newer(5, 5)
    assert unwrap_rtx_payload(wrap_rtx_payload(0x1ABCD, b"xy")) == (0xABCD, b"xy")
    with pytest.raises(RtpError):
        unwrap_rtx_payload(b"\x01")
    u = SeqUnwrapper()
    assert [u.unwrap(s) for s in (65534, 65535, 0, 65533, 1)] == [65534, 65535, 65536, 65533, 65537]
    lp = LayerPacket(1, 2, True, b"x")
    assert not lp.keyframe_start and not lp.discontinuity


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80))
def test_fuzz_parse_only_raises_rtp_error(data: bytes) -> None:
    try:
        p = RtpPacket.parse(data)
    except RtpError:
        return
    assert RtpPacket.parse(bytes(p)) == p


@settings(max_examples=200, deadline=None)
@given(
    pt=st.integers(0, 127), seq=st.integers(0, 0xFFFF), ts=st.integers(0, 0xFFFFFFFF),
    ssrc=st.integers(0, 0xFFFFFFFF), marker=st.booleans(), payload=st.binary(max_size=40),
    csrc=st.lists(st.integers(0, 0xFFFFFFFF), max_size=15),
    ext=st.lists(st.tuples(st.integers(1, 14), st.binary(min_size=1, max_size=16)), max_size=4),
)
def test_roundtrip_property(pt, seq, ts, ssrc, marker, payload, csrc, ext) -> None:
    p = RtpPacket(pt, seq, ts, ssrc, payload, marker, tuple(csrc)).with_extensions(ext)
    wire = bytes(p)
    q = RtpPacket.parse(wire)
    assert q == p and q.extensions == tuple(ext)
    assert struct.unpack_from("!H", wire, 2)[0] == seq
