"""RTCP parsing/building (RFC 3550 §6, RFC 4585, RFC 5104, REMB), cross-checked with aiortc."""

from __future__ import annotations

import pytest
from aiortc import rtp as artp
from hypothesis import given, settings
from hypothesis import strategies as st

from media.errors import RtpError
from media.rtp.rtcp import (
    NTP_UNIX_OFFSET,
    Bye,
    Fir,
    FirEntry,
    Nack,
    Pli,
    ReceiverReport,
    Remb,
    ReportBlock,
    Sdes,
    SdesChunk,
    SenderReport,
    UnknownRtcp,
    build_nack,
    build_pli,
    build_remb,
    build_rr,
    build_sr,
    ntp_from_unix,
    ntp_middle32,
    parse_rtcp,
    rtt_from_report,
    serialize_rtcp,
)

# Byte fixtures written from the RFC layouts.
RR = bytes.fromhex(
    "81c90007" "11111111"  # V=2 RC=1 PT=201 length=7, reporter SSRC
    "22222222" "40" "fffffe"  # source, fraction 64/256, cumulative lost -2
    "0001ffff" "00000010" "aabbccdd" "00010000"  # highest, jitter, LSR, DLSR
)
SR = bytes.fromhex(
    "80c80006" "33333333" "e1b2c3d4" "80000000"  # NTP seconds . 0.5
    "00015f90" "0000000a" "000003e8"  # RTP ts 90000, 10 packets, 1000 octets
)
SDES = bytes.fromhex("81ca0006" "33333333" "0110") + b"abcdefghijklmnop" + b"\x00\x00"
BYE = bytes.fromhex("81cb0003" "33333333" "04") + b"bye!" + b"\x00\x00\x00"
NACK = bytes.fromhex("81cd0003" "44444444" "33333333" "0064" "8001")
PLI = bytes.fromhex("81ce0002" "44444444" "33333333")
FIR = bytes.fromhex("84ce0004" "44444444" "00000000" "33333333" "05000000")
REMB = bytes.fromhex("8fce0005" "44444444" "00000000") + b"REMB" + bytes.fromhex("010bd090" "33333333")
TRANSPORT_CC = bytes.fromhex("8fcd0005" "44444444" "33333333" "0001000a" "20000a00" "00040000")
APP = bytes.fromhex("80cc0003" "44444444") + b"name" + b"data"


def test_receiver_report_fixture() -> None:
    (rr,) = parse_rtcp(RR)
    assert isinstance(rr, ReceiverReport) and rr.ssrc == 0x11111111
    (b,) = rr.reports
    assert (b.ssrc, b.fraction_lost, b.packets_lost, b.highest_seq, b.jitter, b.lsr, b.dlsr) == (
        0x22222222, 64, -2, 0x1FFFF, 16, 0xAABBCCDD, 0x10000,
    )
    assert b.loss_fraction == 0.25
    assert bytes(rr) == RR


def test_sender_report_fixture() -> None:
    (sr,) = parse_rtcp(SR)
    assert isinstance(sr, SenderReport)
    assert (sr.ssrc, sr.ntp_timestamp >> 32, sr.ntp_timestamp & 0xFFFFFFFF) == (0x33333333, 0xE1B2C3D4, 1 << 31)
    assert (sr.rtp_timestamp, sr.packet_count, sr.octet_count, sr.reports) == (90000, 10, 1000, ())
    assert bytes(sr) == SR


def test_sdes_bye_fixtures() -> None:
    (sdes,) = parse_rtcp(SDES)
    assert sdes == Sdes((SdesChunk(0x33333333, ((1, b"abcdefghijklmnop"),)),))
    assert bytes(sdes) == SDES
    (bye,) = parse_rtcp(BYE)
    assert bye == Bye((0x33333333,), b"bye!") and bytes(bye) == BYE


def test_feedback_fixtures() -> None:
    (nack,) = parse_rtcp(NACK)
    assert nack == Nack(0x44444444, 0x33333333, (100, 101, 116))
    assert bytes(nack) == NACK
    (pli,) = parse_rtcp(PLI)
    assert pli == Pli(0x44444444, 0x33333333) and bytes(pli) == PLI
    (fir,) = parse_rtcp(FIR)
    assert fir == Fir(0x44444444, (FirEntry(0x33333333, 5),)) and bytes(fir) == FIR
    (remb,) = parse_rtcp(REMB)
    assert remb == Remb(0x44444444, 1_000_000, (0x33333333,)) and bytes(remb) == REMB


def test_compound_with_unknown_types_skipped_not_broken() -> None:
    data = RR + SDES + REMB + TRANSPORT_CC + APP + NACK
    kinds = [type(p) for p in parse_rtcp(data)]
    assert kinds == [ReceiverReport, Sdes, Remb, UnknownRtcp, UnknownRtcp, Nack]
    cc = parse_rtcp(data)[3]
    assert (cc.packet_type, cc.count) == (205, 15)
    assert serialize_rtcp(parse_rtcp(data)) == data


def test_padding_on_last_packet() -> None:
    padded = bytes.fromhex("a1ce0003" "44444444" "33333333" "00000004")  # PLI + 4 padding bytes
    assert parse_rtcp(RR + padded)[1] == Pli(0x44444444, 0x33333333)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        RR[:3],
        b"\x41" + RR[1:],  # version 1
        RR[:-4],  # length runs past the datagram
        RR + b"\x81",  # trailing garbage
        bytes.fromhex("a1ce0002" "44444444" "33333333") + RR,  # padding not on last packet
        bytes.fromhex("a1ce0002" "44444444" "33333300"),  # padding count 0
        bytes.fromhex("a1ce0002" "44444444" "333333ff"),  # padding count too large
        bytes.fromhex("82c90007") + RR[4:],  # RC=2 but one block
        bytes.fromhex("81c80001" "33333333"),  # SR without sender info
        bytes.fromhex("81ca0002" "33333333" "01050000"),  # SDES item truncated
        bytes.fromhex("81ca0001" "33333333"),  # SDES without terminator
        bytes.fromhex("82cb0001" "33333333"),  # BYE SC=2, one SSRC
        bytes.fromhex("81cb0002" "33333333" "05000000"),  # BYE reason truncated
        bytes.fromhex("81cd0002" "44444444" "33333333"),  # NACK without FCI
        bytes.fromhex("a1cd0004" "44444444" "33333333" "00640000" "00000001"),  # NACK odd len
        bytes.fromhex("81ce0003" "44444444" "33333333" "00000000"),  # PLI with FCI
        bytes.fromhex("84ce0003" "44444444" "00000000" "33333333"),  # FIR entry truncated
        bytes.fromhex("8fce0005" "44444444" "00000000") + b"REMB" + bytes.fromhex("020bd090" "33333333"),
        bytes.fromhex("81cd0001" "44444444"),  # feedback without media SSRC
    ],
)
def test_malformed(data: bytes) -> None:
    with pytest.raises(RtpError):
        parse_rtcp(data)


def test_nack_builder_wraps_and_groups() -> None:
    nack = build_nack(1, 2, [65534, 65535, 0, 1, 17, 40])
    wire = bytes(nack)
    assert wire[12:] == bytes.fromhex("fffe" "0007" "0011" "0000" "0028" "0000")
    assert parse_rtcp(wire)[0].lost == (65534, 65535, 0, 1, 17, 40)
    with pytest.raises(RtpError):
        bytes(build_nack(1, 2, []))


def test_remb_encoding_limits() -> None:
    for bps in (0, 1, 262143, 262144, 1_500_000, 10**9, 123_456_789_012):
        got = parse_rtcp(bytes(build_remb(7, bps, [1, 2])))[0]
        assert got.ssrcs == (1, 2)
        assert got.bitrate <= bps and (bps - got.bitrate) <= bps / (1 << 17)
    with pytest.raises(RtpError):
        bytes(Remb(1, -1))


# -- cross-checks with aiortc's own RTCP classes --------------------------------


def test_aiortc_builds_we_parse() -> None:
    block = artp.RtcpReceiverInfo(ssrc=5, fraction_lost=12, packets_lost=-7, highest_sequence=70000,
                                  jitter=33, lsr=0x12345678, dlsr=655)
    packets = [
        artp.RtcpSrPacket(ssrc=9, sender_info=artp.RtcpSenderInfo(
            ntp_timestamp=0x0102030405060708, rtp_timestamp=11, packet_count=12, octet_count=13),
            reports=[block]),
        artp.RtcpRrPacket(ssrc=9, reports=[block, block]),
        artp.RtcpRtpfbPacket(fmt=1, ssrc=9, media_ssrc=5, lost=[10, 12, 30, 31, 65535]),
        artp.RtcpPsfbPacket(fmt=1, ssrc=9, media_ssrc=5),
        artp.RtcpPsfbPacket(fmt=15, ssrc=9, media_ssrc=0, fci=artp.pack_remb_fci(2_345_678, [5, 6])),
        artp.RtcpSdesPacket(chunks=[artp.RtcpSourceInfo(ssrc=9, items=[(1, b"cname-x")])]),
        artp.RtcpByePacket(sources=[9]),
    ]
    parsed = parse_rtcp(b"".join(bytes(p) for p in packets))
    sr, rr, nack, pli, remb, sdes, bye = parsed
    ours_block = ReportBlock(5, 12, -7, 70000, 33, 0x12345678, 655)
    assert sr == SenderReport(9, 0x0102030405060708, 11, 12, 13, (ours_block,))
    assert rr == ReceiverReport(9, (ours_block, ours_block))
    assert set(nack.lost) == {10, 12, 30, 31, 65535}
    assert pli == Pli(9, 5)
    assert isinstance(remb, Remb) and remb.ssrcs == (5, 6)
    assert remb.bitrate == artp.unpack_remb_fci(bytes(packets[4].fci))[0]
    assert sdes.chunks[0].items == ((1, b"cname-x"),)
    assert bye.ssrcs == (9,)


def test_we_build_aiortc_parses() -> None:
    block = ReportBlock(5, 200, 1234, 99999, 7, 1, 2)
    data = serialize_rtcp([
        build_sr(9, 1_700_000_000.25, 1000, 3, 4, [block]),
        build_rr(9, [block]),
        build_nack(9, 5, [1, 2, 3, 40]),
        build_pli(9, 5),
        build_remb(9, 750_000, [5]),
        Sdes((SdesChunk(9, ((1, b"rf"),)),)),
        Bye((9,)),
    ])
    sr, rr, nack, pli, remb, sdes, bye = artp.RtcpPacket.parse(data)
    assert sr.ssrc == 9 and sr.sender_info.rtp_timestamp == 1000 and sr.sender_info.packet_count == 3
    assert sr.sender_info.ntp_timestamp == ((1_700_000_000 + NTP_UNIX_OFFSET) << 32) | (1 << 30)
    assert sr.reports[0].packets_lost == 1234 and sr.reports[0].fraction_lost == 200
    assert rr.reports[0].highest_sequence == 99999
    assert nack.fmt == 1 and nack.lost == [1, 2, 3, 40]
    assert pli.fmt == 1 and pli.media_ssrc == 5
    assert remb.fmt == 15 and artp.unpack_remb_fci(remb.fci) == (750_000, [5])
    assert sdes.chunks[0].items == [(1, b"rf")]
    assert bye.sources == [9]


# -- NTP / RTT -------------------------------------------------------------------


def test_ntp_and_rtt_from_receiver_report() -> None:
    sent_at = 1_700_000_123.5
    lsr = ntp_middle32(ntp_from_unix(sent_at))
    held = 0.25  # the receiver held the SR for 250 ms before reporting
    dlsr = int(held * 65536)
    now = sent_at + 0.080 + held  # 80 ms round trip
    rtt = rtt_from_report(lsr, dlsr, ntp_middle32(ntp_from_unix(now)))
    assert rtt == pytest.approx(0.080, abs=1e-4)
    assert rtt_from_report(0, dlsr, 12345) is None  # no SR received yet
    assert rtt_from_report(lsr, dlsr, lsr) == 0.0  # negative → clamped


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=120))
def test_fuzz_parse_rtcp(data: bytes) -> None:
    try:
        packets = parse_rtcp(data)
    except RtpError:
        return
    _assert_reserializes(packets)


def _assert_reserializes(packets: list) -> None:
    """Whatever parses serializes again and parses back to the same values."""
    for p in packets:
        (again,) = parse_rtcp(p.serialize())
        if isinstance(p, Nack):
            assert set(again.lost) == set(p.lost)  # canonical PID/BLP grouping
        else:
            assert again == p


VALID = RR + SDES + REMB + TRANSPORT_CC + NACK + PLI + FIR + BYE + SR


@settings(max_examples=400, deadline=None)
@given(cut=st.integers(0, len(VALID)), flips=st.lists(st.tuples(st.integers(0, len(VALID) - 1),
                                                             st.integers(0, 255)), max_size=4))
def test_fuzz_mutated_compound(cut: int, flips: list[tuple[int, int]]) -> None:
    data = bytearray(VALID)
    for pos, value in flips:
        data[pos] = value
    try:
        packets = parse_rtcp(bytes(data[:cut]))
    except RtpError:
        return
    _assert_reserializes(packets)


def test_unaligned_bodies_reserialize_with_padding() -> None:
    # A padded APP packet: 3 padding bytes leave a body of 9 bytes.
    padded = bytes.fromhex("a0cc0003" "44444444") + b"name" + b"d\x00\x00\x03"
    (app,) = parse_rtcp(padded)
    assert app == UnknownRtcp(204, 0, bytes.fromhex("44444444") + b"named")
    assert parse_rtcp(bytes(app)) == [app]
