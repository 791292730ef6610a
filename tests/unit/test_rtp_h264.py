"""H.264 RTP packetizer / depacketizer (RFC 6184), cross-checked with aiortc and FFmpeg."""

from __future__ import annotations

import fractions
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from media.errors import RtpError, UnsupportedMedia
from media.rtp.h264 import H264Depacketizer, H264Packetizer, split_annexb
from media.rtp.packet import LayerPacket

SC4 = b"\x00\x00\x00\x01"
SC3 = b"\x00\x00\x01"
SPS = bytes.fromhex("6742c01e") + b"\x11" * 8
PPS = bytes.fromhex("68ce3c80")
SEI = bytes.fromhex("0605") + b"\x22" * 10
AUD = bytes.fromhex("09f0")
FILLER = bytes.fromhex("0cffffff80")


def nal(header: int, size: int, fill: int = 0x5A) -> bytes:
    return bytes((header,)) + bytes((fill,)) * (size - 1)


def annexb(*nals: bytes) -> bytes:
    return b"".join((SC4 if i % 2 else SC3) + n for i, n in enumerate(nals))


def roundtrip(pk: H264Packetizer, packets: list[LayerPacket]):
    dp = H264Depacketizer()
    aus = []
    for p in packets:
        aus += dp.push(p.seq, p.timestamp, p.marker, p.payload)
    return aus + dp.flush()


# -- Annex-B -------------------------------------------------------------------


def test_split_annexb_start_codes_and_trailing_zeros() -> None:
    data = b"\x00" + SC4 + SPS + b"\x00\x00" + SC3 + PPS + SC3 + SC3 + nal(0x65, 10)
    assert split_annexb(data) == [SPS, PPS, nal(0x65, 10)]
    assert split_annexb(b"") == [] and split_annexb(b"\x00\x00") == []
    with pytest.raises(RtpError):
        split_annexb(b"\x12" + SC3 + SPS)
    with pytest.raises(RtpError):
        split_annexb(b"\x67\x42")


# -- packetizer: RFC 6184 layouts ----------------------------------------------


def test_stap_a_layout_rfc6184_5_7_1() -> None:
    pk = H264Packetizer()
    idr = nal(0x65, 300)
    packets = pk.packetize(annexb(AUD, SPS, PPS, idr), 90000)
    assert len(packets) == 1
    p = packets[0]
    # STAP-A header: F=0, NRI=max(3,3,3)=3, type 24; then size-prefixed NALs.
    expected = bytes((0x78,)) + b"".join(struct.pack("!H", len(n)) + n for n in (SPS, PPS, idr))
    assert p.payload == expected
    assert p.marker and p.keyframe_start and p.discontinuity and p.timestamp == 90000


def test_stap_a_nri_is_max_and_f_is_or() -> None:
    pk = H264Packetizer()
    a = nal(0x06, 5)  # NRI 0
    b = nal(0xC1, 5)  # F=1, NRI 2
    payload = pk.payloads([a, b])[0]
    assert payload[0] == 0x80 | 0x40 | 24


def test_single_nal_and_fu_a_layout_rfc6184_5_8() -> None:
    pk = H264Packetizer(max_payload=100)
    big = bytes((0x65,)) + bytes(range(256)) * 2  # 513 bytes
    small = nal(0x41, 90)
    payloads = pk.payloads([big, small])
    fus, single = payloads[:-1], payloads[-1]
    assert single == small
    assert all(len(p) <= 100 for p in payloads)
    assert fus[0][0] == 0x7C  # FU indicator: NRI 3, type 28
    assert fus[0][1] == 0x80 | 5 and fus[-1][1] == 0x40 | 5
    assert all(f[1] == 5 for f in fus[1:-1])
    assert b"".join(f[2:] for f in fus) == big[1:]
    sizes = [len(f) for f in fus]
    assert max(sizes) - min(sizes) <= 1  # near-equal fragments


def test_marker_on_last_packet_only_and_sequence() -> None:
    pk = H264Packetizer(max_payload=200, initial_seq=65534)
    pkts = pk.packetize(annexb(nal(0x41, 1000)), 3000)
    assert [p.seq for p in pkts] == [65534, 65535, 0, 1, 2, 3]
    assert [p.marker for p in pkts] == [False] * 5 + [True]
    assert not any(p.keyframe_start for p in pkts)
    assert pkts[0].discontinuity and not any(p.discontinuity for p in pkts[1:])
    more = pk.packetize(annexb(nal(0x41, 10)), 6000)
    assert more[0].seq == 4 and not more[0].discontinuity
    pk.restart()
    assert pk.packetize(annexb(nal(0x41, 10)), 9000)[0].discontinuity


def test_aud_and_filler_stripped_sps_pps_prepended_to_bare_idr() -> None:
    pk = H264Packetizer()
    idr = nal(0x65, 2000)
    first = roundtrip(pk, pk.packetize(annexb(AUD, SPS, PPS, SEI, idr), 0))
    assert first[0].nals == (SPS, PPS, SEI, idr)
    p_frame = nal(0x41, 50)
    assert roundtrip(pk, pk.packetize(annexb(AUD, p_frame, FILLER), 3000))[0].nals == (p_frame,)
    # A later IDR without parameter sets gets the cached ones in front.
    bare = roundtrip(pk, pk.packetize(annexb(AUD, SEI, idr), 6000))[0]
    assert bare.nals == (SPS, PPS, SEI, idr) and bare.keyframe
    # An IDR with only a new PPS gets the cached SPS only.
    pps2 = bytes.fromhex("68ee3c80")
    assert roundtrip(pk, pk.packetize(annexb(pps2, idr), 9000))[0].nals == (SPS, pps2, idr)


def test_empty_access_unit_produces_nothing() -> None:
    pk = H264Packetizer()
    assert pk.packetize(annexb(AUD), 0) == []
    assert pk.packetize(b"", 0) == []


def test_max_payload_validation() -> None:
    with pytest.raises(ValueError):
        H264Packetizer(max_payload=10)


# -- depacketizer --------------------------------------------------------------


def test_depacketizer_detects_gap_and_broken_fu() -> None:
    pk = H264Packetizer(max_payload=100)
    au1 = pk.packetize(annexb(nal(0x65, 450)), 0)  # 5 FU-A
    au2 = pk.packetize(annexb(nal(0x41, 60), nal(0x41, 30)), 3000)  # one STAP-A
    dp = H264Depacketizer()
    out = []
    for p in au1[:2] + au1[3:] + au2:  # lose the middle fragment
        out += dp.push(p.seq, p.timestamp, p.marker, p.payload)
    assert len(out) == 2
    assert out[0].lost and out[0].nals == () and out[0].complete and out[0].keyframe is False
    assert not out[1].lost and len(out[1].nals) == 2


def test_depacketizer_lost_marker_packet_flags_both_units() -> None:
    pk = H264Packetizer(max_payload=100)
    a = pk.packetize(annexb(nal(0x41, 150)), 0)
    b = pk.packetize(annexb(nal(0x41, 50)), 3000)
    dp = H264Depacketizer()
    out = []
    for p in a[:-1] + b:
        out += dp.push(p.seq, p.timestamp, p.marker, p.payload)
    assert [(u.timestamp, u.lost, u.complete) for u in out] == [(0, True, False), (3000, True, True)]


def test_depacketizer_ignores_late_and_duplicate() -> None:
    pk = H264Packetizer()
    pkts = pk.packetize(annexb(nal(0x41, 10)), 0) + pk.packetize(annexb(nal(0x41, 10)), 10)
    dp = H264Depacketizer()
    assert len(dp.push(pkts[0].seq, 0, True, pkts[0].payload)) == 1
    assert dp.push(pkts[0].seq, 0, True, pkts[0].payload) == []
    assert dp.late == 1
    assert len(dp.push(pkts[1].seq, 10, True, pkts[1].payload)) == 1


@pytest.mark.parametrize(
    "payload, error",
    [
        (b"", RtpError),
        (b"\x78\x00", RtpError),  # STAP-A size truncated
        (b"\x78\x00\x05\x41", RtpError),  # STAP-A NAL past the end
        (b"\x78\x00\x00", RtpError),  # zero-size NAL
        (b"\x78", RtpError),  # STAP-A without NALs
        (b"\x7c", RtpError),  # FU-A header missing
        (b"\x7c\xc5\x00", RtpError),  # FU-A with S and E
        (b"\x79\x00", UnsupportedMedia),  # STAP-B
        (b"\x7a\x00", UnsupportedMedia),  # MTAP16
        (b"\x7d\x85\x00\x00", UnsupportedMedia),  # FU-B
    ],
)
def test_depacketizer_malformed(payload: bytes, error: type) -> None:
    with pytest.raises(error):
        H264Depacketizer().push(1, 0, True, payload)


def test_depacketizer_ignores_unspecified_types() -> None:
    dp = H264Depacketizer()
    assert dp.push(1, 0, False, b"\x1e\x00") == [] and dp.ignored == 1


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(2, 3000), min_size=1, max_size=8),
    mtu=st.integers(64, 1400),
    headers=st.lists(st.sampled_from([0x41, 0x65, 0x06, 0x67, 0x68, 0x01, 0x21, 0xE1]), min_size=8, max_size=8),
)
def test_roundtrip_property(sizes: list[int], mtu: int, headers: list[int]) -> None:
    nals = [nal(headers[i], s, fill=(i * 37) % 250 + 1) for i, s in enumerate(sizes)]
    pk = H264Packetizer(max_payload=mtu)
    prepared, _ = pk.prepare(nals)
    packets = pk.packetize(nals, 1234)
    assert all(len(p.payload) <= mtu for p in packets)
    aus = roundtrip(pk, packets)
    assert len(aus) == 1 and aus[0].nals == tuple(prepared) and not aus[0].lost and aus[0].complete


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.booleans(), st.binary(max_size=40)), max_size=12))
def test_fuzz_depacketizer(packets: list[tuple[int, bool, bytes]]) -> None:
    dp = H264Depacketizer()
    seq = 0
    for step, marker, payload in packets:
        seq += step
        try:
            for au in dp.push(seq, seq // 3, marker, payload):
                assert all(isinstance(n, bytes) and n for n in au.nals)
        except (RtpError, UnsupportedMedia):
            pass
    dp.flush()


# -- real encoder output, checked by aiortc's depacketizer and FFmpeg ----------


@pytest.fixture(scope="module")
def x264_access_units() -> list[bytes]:
    av = pytest.importorskip("av")
    np = pytest.importorskip("numpy")
    try:
        codec = av.CodecContext.create("libx264", "w")
    except Exception as exc:  # PyAV wheels ship libx264; a system build may not
        pytest.skip(f"libx264 encoder unavailable: {exc}")
    codec.width, codec.height, codec.pix_fmt = 192, 144, "yuv420p"
    codec.time_base = fractions.Fraction(1, 30)
    codec.options = {"bf": "0", "g": "8", "preset": "ultrafast", "tune": "zerolatency",
                     "x264-params": "slice-max-size=1500"}
    rng = np.random.default_rng(3)
    aus = []
    for i in range(12):
        img = rng.integers(0, 256, (144, 192, 3), dtype=np.uint8)
        frame = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv420p")
        frame.pts = i
        aus += [bytes(p) for p in codec.encode(frame)]
    aus += [bytes(p) for p in codec.encode(None)]
    assert len(aus) == 12
    return aus


def test_real_stream_roundtrip_and_aiortc_accepts(x264_access_units: list[bytes]) -> None:
    av = pytest.importorskip("av")
    from aiortc.codecs.h264 import H264PayloadDescriptor

    pk = H264Packetizer()
    ours = av.CodecContext.create("h264", "r")
    reference = av.CodecContext.create("h264", "r")
    kinds = set()
    dp = H264Depacketizer()
    keyframes = 0
    for i, au in enumerate(x264_access_units):
        packets = pk.packetize(au, i * 3000)
        assert packets[-1].marker and sum(p.marker for p in packets) == 1
        # aiortc's depacketizer (independent implementation) accepts every payload.
        rebuilt = b""
        for p in packets:
            kinds.add(p.payload[0] & 0x1F)
            _, data = H264PayloadDescriptor.parse(p.payload)
            rebuilt += data
        # Our depacketizer gives back exactly the prepared NAL list.
        aus = []
        for p in packets:
            aus += dp.push(p.seq, p.timestamp, p.marker, p.payload)
        assert len(aus) == 1 and not aus[0].lost
        expected = [n for n in split_annexb(au) if n[0] & 0x1F not in (9, 12)]
        if i == 0:
            params = [n for n in expected if n[0] & 0x1F in (7, 8)]
        elif aus[0].keyframe and not any(n[0] & 0x1F == 7 for n in expected):
            expected = params + expected  # cached SPS/PPS put before a bare IDR
        assert list(aus[0].nals) == expected
        assert split_annexb(rebuilt) == list(aus[0].nals)
        keyframes += aus[0].keyframe
        assert packets[0].keyframe_start == aus[0].keyframe
        # FFmpeg decodes what aiortc reassembled to the same picture as the original.
        got = ours.decode(av.Packet(rebuilt))
        want = reference.decode(av.Packet(au))
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.to_ndarray().tobytes() == w.to_ndarray().tobytes()
    assert keyframes == 2
    assert {24, 28} <= kinds  # STAP-A (SPS+PPS...) and FU-A were both exercised
