"""Per-viewer rewriting: continuity, switching, NACK/RTX, SRTP, and the packet history."""

from __future__ import annotations

import os

import pylibsrtp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from media.rtp.history import PacketHistory
from media.rtp.packet import LayerPacket, RtpPacket, unwrap_rtx_payload
from media.rtp.rewrite import Rewriter, TrackParams, TransportSeq

VIDEO = TrackParams(ssrc=0xAAAA0001, payload_type=102, clock_rate=90000)


class Layer:
    """Generates the layer packets of one simulcast layer (gapless, like the packetizer)."""

    def __init__(self, seq: int = 0, ts: int = 0, restarted: bool = True) -> None:
        self.seq = seq
        self.ts = ts
        self.restarted = restarted

    def frame(self, packets: int = 3, key: bool = False, step: int = 3000) -> list[LayerPacket]:
        out = []
        for k in range(packets):
            out.append(LayerPacket(
                seq=self.seq & 0xFFFF, timestamp=self.ts & 0xFFFFFFFF, marker=k == packets - 1,
                payload=bytes((k,)) * 20, keyframe_start=key and k == 0,
                discontinuity=self.restarted and k == 0,
            ))
            self.seq += 1
        self.restarted = False
        self.ts += step
        return out

    def restart(self, seq: int, ts: int) -> None:
        self.seq, self.ts, self.restarted = seq, ts, True


def send(rw: Rewriter, layer: int, packets: list[LayerPacket], now: float) -> list[RtpPacket]:
    out = []
    for p in packets:
        wire = rw.rewrite(layer, p, now)
        if wire is not None:
            out.append(RtpPacket.parse(wire))
    return out


def test_basic_rewrite_header_fields_and_waiting_for_keyframe() -> None:
    rw = Rewriter(VIDEO, initial_layer=0, initial_seq=100, initial_ts=5000)
    layer = Layer(seq=40000, ts=123456)
    assert rw.waiting_for_keyframe
    assert send(rw, 0, layer.frame(), 0.0) == []  # no keyframe yet
    out = send(rw, 0, layer.frame(key=True), 0.1) + send(rw, 0, layer.frame(), 0.133)
    assert not rw.waiting_for_keyframe and rw.current_layer == 0
    assert [p.sequence_number for p in out] == list(range(100, 106))
    assert [p.timestamp for p in out] == [5000] * 3 + [8000] * 3
    assert [p.marker for p in out] == [False, False, True] * 2
    assert {(p.ssrc, p.payload_type) for p in out} == {(VIDEO.ssrc, 102)}
    assert out[1].payload == b"\x01" * 20 and out[0].extension_profile is None


def test_header_extensions_negotiated_ids() -> None:
    tseq = TransportSeq(65535)
    params = TrackParams(ssrc=1, payload_type=96, clock_rate=90000, mid="video0", mid_id=9,
                         abs_send_time_id=3, transport_cc_id=5)
    audio = TrackParams(ssrc=2, payload_type=111, clock_rate=48000, mid="1", mid_id=9, transport_cc_id=5)
    v = Rewriter(params, transport_seq=tseq, initial_seq=0, initial_ts=0)
    a = Rewriter(audio, transport_seq=tseq, initial_seq=0, initial_ts=0)
    vp = send(v, 0, Layer().frame(1, key=True), 2.5)[0]
    ap = send(a, 0, Layer().frame(1, key=True), 2.6)[0]
    assert vp.extension(9) == b"video0" and ap.extension(9) == b"1"
    assert vp.extension(3) == int(2.5 * 262144).to_bytes(3, "big")
    assert ap.extension(3) is None  # not negotiated for audio
    # one transport-wide counter across tracks, wrapping at 16 bits
    assert vp.extension(5) == b"\xff\xff" and ap.extension(5) == b"\x00\x00"
    # long mid or id > 14 → two-byte form (RFC 8285 §4.3)
    long = TrackParams(ssrc=3, payload_type=96, clock_rate=90000, mid="m" * 20, mid_id=20)
    lp = send(Rewriter(long), 0, Layer().frame(1, key=True), 0.0)[0]
    assert lp.extension_profile == 0x1000 and lp.extension(20) == b"m" * 20


def test_params_validation() -> None:
    with pytest.raises(ValueError):
        TrackParams(ssrc=1, payload_type=200, clock_rate=90000)
    with pytest.raises(ValueError):
        TrackParams(ssrc=1, payload_type=96, clock_rate=90000, rtx_ssrc=5)
    with pytest.raises(ValueError):
        TrackParams(ssrc=1, payload_type=96, clock_rate=90000, mid="0", mid_id=3, abs_send_time_id=3)
    with pytest.raises(ValueError):
        Rewriter(TrackParams(ssrc=1, payload_type=96, clock_rate=90000, transport_cc_id=3))


def test_switch_only_at_target_keyframe_old_layer_flows_until_then() -> None:
    rw = Rewriter(VIDEO, initial_layer=0, initial_seq=65534, initial_ts=0xFFFFF000)
    low, high = Layer(seq=10, ts=0), Layer(seq=5000, ts=777777)
    out = send(rw, 0, low.frame(key=True), 0.0)
    send(rw, 1, high.frame(key=True), 0.0)  # not requested: ignored
    rw.request_switch(1)
    assert rw.target_layer == 1
    out += send(rw, 1, high.frame(), 0.033)  # target delta frame: ignored
    out += send(rw, 0, low.frame(), 0.033)  # old layer keeps flowing
    assert rw.current_layer == 0 and len(out) == 6
    last_ts = out[-1].timestamp
    switched = send(rw, 1, high.frame(key=True), 0.100)  # 67 ms after the last sent
    out += switched
    assert rw.current_layer == 1 and rw.target_layer is None and rw.switches == 1
    assert send(rw, 0, low.frame(), 0.100) == []  # old layer no longer forwarded
    out += send(rw, 1, high.frame(), 0.133)
    seqs = [p.sequence_number for p in out]
    assert seqs == [(65534 + i) & 0xFFFF for i in range(len(out))]  # +1, across the wrap
    assert switched[0].timestamp == (last_ts + round(0.067 * 90000)) & 0xFFFFFFFF
    assert out[-1].timestamp == (switched[0].timestamp + 3000) & 0xFFFFFFFF


def test_request_switch_back_cancels_pending() -> None:
    rw = Rewriter(VIDEO, initial_seq=0, initial_ts=0)
    send(rw, 0, Layer().frame(key=True), 0.0)
    rw.request_switch(1)
    rw.request_switch(0)
    assert rw.target_layer is None
    assert send(rw, 1, Layer().frame(key=True), 0.1) == []


def test_publisher_restart_rebases_seq_and_ts() -> None:
    rw = Rewriter(VIDEO, initial_seq=1000, initial_ts=0)
    layer = Layer(seq=30000, ts=90000)
    out = send(rw, 0, layer.frame(key=True), 0.0) + send(rw, 0, layer.frame(), 0.033)
    layer.restart(seq=7, ts=42)  # reconnect: unrelated seq/ts
    out += send(rw, 0, layer.frame(key=True), 1.033)
    assert [p.sequence_number for p in out] == list(range(1000, 1009))
    assert out[6].timestamp == 3000 + 90000  # last ts + 1 s of 90 kHz
    # restart mid-GOP: dropped until the next keyframe
    layer.restart(seq=60000, ts=1)
    assert send(rw, 0, layer.frame(), 2.0) == [] and rw.waiting_for_keyframe
    assert send(rw, 0, layer.frame(), 2.033) == []
    again = send(rw, 0, layer.frame(key=True), 2.066)
    assert again[0].sequence_number == 1009 and again[0].timestamp == out[-1].timestamp + round(1.033 * 90000)
    assert rw.rebases == 3


def test_restart_of_current_layer_keeps_pending_switch() -> None:
    rw = Rewriter(VIDEO, initial_seq=0, initial_ts=0)
    low, high = Layer(), Layer(seq=500)
    send(rw, 0, low.frame(key=True), 0.0)
    rw.request_switch(1)
    low.restart(seq=9000, ts=1)
    assert len(send(rw, 0, low.frame(key=True), 0.1)) == 3  # rebased, still layer 0
    assert rw.current_layer == 0 and rw.target_layer == 1
    assert send(rw, 1, high.frame(key=True), 0.2)[0].sequence_number == 6
    assert rw.current_layer == 1


def test_gap_kept_late_packet_fills_hole_once_duplicates_dropped() -> None:
    rw = Rewriter(VIDEO, initial_seq=0, initial_ts=0)
    pkts = Layer(seq=100).frame(6, key=True)
    out = send(rw, 0, pkts[:2] + pkts[3:], 0.0)  # seq 102 lost upstream
    assert [p.sequence_number for p in out] == [0, 1, 3, 4, 5]
    late = send(rw, 0, [pkts[2]], 0.01)
    assert [p.sequence_number for p in late] == [2] and late[0].payload == pkts[2].payload
    assert send(rw, 0, [pkts[2], pkts[4]], 0.02) == []  # duplicates
    nxt = send(rw, 0, Layer(seq=106, ts=3000, restarted=False).frame(1), 0.03)
    assert nxt[0].sequence_number == 6


def test_jump_beyond_max_gap_is_a_rebase() -> None:
    rw = Rewriter(VIDEO, initial_seq=0, initial_ts=0, max_gap=10)
    send(rw, 0, Layer(seq=0).frame(2, key=True), 0.0)
    assert send(rw, 0, Layer(seq=50, ts=3000, restarted=False).frame(2), 0.03) == []  # mid-GOP
    out = send(rw, 0, Layer(seq=52, ts=6000, restarted=False).frame(2, key=True), 0.06)
    assert [p.sequence_number for p in out] == [2, 3]
    # too-old packets of the previous run cannot take a sequence number
    assert send(rw, 0, Layer(seq=1, restarted=False).frame(1), 0.07) == [] and rw.dropped_late == 1


def test_nack_translation_and_plain_retransmission() -> None:
    histories = [PacketHistory(), PacketHistory()]
    rw = Rewriter(VIDEO, initial_seq=65533, initial_ts=0)
    low, high = Layer(seq=10), Layer(seq=900)
    sent = []
    for layer_index, layer, key in ((0, low, True), (0, low, False), (1, high, True), (1, high, False)):
        if layer_index == 1:
            rw.request_switch(1)
        pkts = layer.frame(key=key)
        for p in pkts:
            histories[layer_index].put(p, 0.0)
        sent += send(rw, layer_index, pkts, 0.05)
    by_seq = {p.sequence_number: p for p in sent}
    targets = rw.translate_nack([65533, 2, 5, 40000])
    assert [(t.viewer_seq, t.layer, t.layer_seq) for t in targets] == [(65533, 0, 10), (2, 0, 15), (5, 1, 902)]
    again = [RtpPacket.parse(b) for b in rw.retransmit([2, 5], histories, 0.2)]
    assert again == [by_seq[2], by_seq[5]]  # identical packets (same seq, ts, payload)
    assert rw.retransmit([2], histories, 0.205) == []  # within nack_min_interval
    assert len(rw.retransmit([2], histories, 0.3)) == 1
    assert rw.retransmit([2], histories, 5.0) == [] and rw.unrecoverable == 1  # aged out


def test_rtx_retransmission_rfc4588() -> None:
    params = TrackParams(ssrc=10, payload_type=102, clock_rate=90000, rtx_ssrc=11, rtx_payload_type=103,
                         abs_send_time_id=2)
    rw = Rewriter(params, initial_seq=500, initial_ts=9, initial_rtx_seq=65535)
    history = PacketHistory()
    pkts = Layer(seq=1).frame(3, key=True)
    for p in pkts:
        history.put(p, 0.0)
    sent = send(rw, 0, pkts, 0.0)
    rtx = [RtpPacket.parse(b) for b in rw.retransmit([502, 500], {0: history}, 0.1)]
    assert [(p.ssrc, p.payload_type, p.sequence_number) for p in rtx] == [(11, 103, 65535), (11, 103, 0)]
    assert [unwrap_rtx_payload(p.payload) for p in rtx] == [(502, sent[2].payload), (500, sent[0].payload)]
    assert rtx[0].timestamp == sent[2].timestamp and rtx[0].marker
    assert rtx[0].extension(2) == int(0.1 * 262144).to_bytes(3, "big")


def test_stale_mapping_after_publisher_restart_is_not_served() -> None:
    history = PacketHistory()
    rw = Rewriter(VIDEO, initial_seq=0, initial_ts=0)
    layer = Layer(seq=10, ts=1000)
    for p in layer.frame(key=True):
        history.put(p, 0.0)
        rw.rewrite(0, p, 0.0)
    layer.restart(seq=10, ts=99999)  # same seq space by chance, different ts
    for p in layer.frame(key=True):
        history.put(p, 0.1)
        rw.rewrite(0, p, 0.1)
    old = rw.translate_nack([0])
    assert old[0].layer_seq == 10 and old[0].layer_ts == 1000
    assert rw.retransmit([0], [history], 0.2) == [] and rw.unrecoverable == 1
    assert len(rw.retransmit([3], [history], 0.2)) == 1


def test_sender_report_counts_and_timestamp_mapping() -> None:
    rw = Rewriter(VIDEO, initial_seq=0, initial_ts=1000)
    before = rw.sender_report(0.0, 1_700_000_000.0)
    assert before.rtp_timestamp == 1000 and before.packet_count == 0
    send(rw, 0, Layer().frame(4, key=True), 10.0)
    sr = rw.sender_report(10.5, 1_700_000_000.5)
    assert (sr.ssrc, sr.packet_count, sr.octet_count) == (VIDEO.ssrc, 4, 80)
    assert sr.rtp_timestamp == 1000 + 45000
    assert sr.ntp_timestamp & 0xFFFFFFFF == 1 << 31


def _srtp_pair() -> tuple[pylibsrtp.Session, pylibsrtp.Session]:
    key = os.urandom(30)
    tx = pylibsrtp.Policy(key=key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND,
                          srtp_profile=pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80)
    tx.allow_repeat_tx = True  # as aiortc configures its sender
    rx = pylibsrtp.Policy(key=key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND,
                          srtp_profile=pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80)
    return pylibsrtp.Session(tx), pylibsrtp.Session(rx)


def test_srtp_accepts_every_packet_across_switches_restarts_and_wrap() -> None:
    """libsrtp on both ends: no index is ever reused or too old, and the
    plain retransmission of a packet lost on the way is accepted."""
    tx, rx = _srtp_pair()
    rw = Rewriter(VIDEO, initial_seq=65500, initial_ts=0)
    layers = [Layer(seq=65000), Layer(seq=3)]
    history = [PacketHistory(), PacketHistory()]
    now = 0.0
    current = 0
    received = 0
    repaired = 0
    total_lost = 0
    for i in range(120):
        now += 0.033
        if i % 25 == 10:
            current ^= 1
            rw.request_switch(current)
        if i == 60:
            layers[current].restart(seq=12345, ts=5)
        lost = []
        for index, layer in enumerate(layers):
            for p in layer.frame(key=i % 10 == 0):
                history[index].put(p, now)
                wire = rw.rewrite(index, p, now)
                if wire is None:
                    continue
                protected = tx.protect(wire)
                if received % 7 == 3:
                    lost.append(rw.last_seq)  # lost on the network
                else:
                    assert rx.unprotect(protected) == wire
                received += 1
        total_lost += len(lost)
        for wire in rw.retransmit(lost, history, now + 0.01):
            assert rx.unprotect(tx.protect(wire)) == wire
            repaired += 1
    assert received > 300 and rw.switches >= 3
    assert repaired == total_lost > 40


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.booleans(), st.booleans(), st.integers(0, 3),
                          st.integers(1, 4)), min_size=1, max_size=60))
def test_property_seq_plus_one_and_ts_monotonic(events) -> None:
    """Gapless layers: every packet sent is +1; timestamps never go backwards."""
    rw = Rewriter(VIDEO, initial_layer=0, initial_seq=65530, initial_ts=0xFFFFFF00)
    layers = [Layer(seq=100 * i, ts=1000 * i) for i in range(3)]
    now = 0.0
    last_seq = None
    last_ts = None
    for layer_index, key, restart, switch_to, count in events:
        now += 0.02
        if switch_to < 3:
            rw.request_switch(switch_to)
        layer = layers[layer_index]
        if restart:
            layer.restart(seq=layer.seq + 30000, ts=layer.ts + 123456789)
        for p in layer.frame(count, key=key):
            wire = rw.rewrite(layer_index, p, now)
            if wire is None:
                continue
            out = RtpPacket.parse(wire)
            assert rw.current_layer == layer_index
            if last_seq is not None:
                assert out.sequence_number == (last_seq + 1) & 0xFFFF
                assert 0 <= (out.timestamp - last_ts) & 0xFFFFFFFF < 0x80000000
            last_seq, last_ts = out.sequence_number, out.timestamp


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(-40, 200), st.booleans(), st.booleans(),
                          st.booleans()), min_size=1, max_size=80))
def test_property_lossy_reordered_input_never_reuses_a_viewer_seq(events) -> None:
    """Arbitrary layer seq jumps (loss, reordering, duplicates, restarts): a
    viewer sequence number is never sent twice, and nothing older than the
    replay window is ever sent."""
    from media.rtp.packet import SeqUnwrapper

    rw = Rewriter(VIDEO, initial_seq=65000, initial_ts=0, max_gap=64)
    seqs = [0, 0]
    sent: set[int] = set()
    unwrap = SeqUnwrapper()
    now = 0.0
    for layer_index, delta, key, disc, switch in events:
        now += 0.01
        if switch:
            rw.request_switch(layer_index)
        seqs[layer_index] = (seqs[layer_index] + delta) & 0xFFFF
        p = LayerPacket(seqs[layer_index], int(now * 90000), False, b"x", key, disc)
        wire = rw.rewrite(layer_index, p, now)
        if wire is None:
            continue
        ext = unwrap.unwrap(RtpPacket.parse(wire).sequence_number)
        assert ext not in sent
        assert ext > unwrap.highest - 1024
        sent.add(ext)


# -- history ---------------------------------------------------------------------


def test_history_bounds_age_and_discontinuity() -> None:
    h = PacketHistory(capacity=16, max_age=1.0)
    layer = Layer(seq=65530)
    pkts = layer.frame(20)
    for i, p in enumerate(pkts):
        h.put(p, i * 0.01)
    assert len(h) == 16
    assert h.get(pkts[0].seq, 0.5) is None  # overwritten by a newer packet
    assert h.get(pkts[19].seq, 0.5) is pkts[19]
    assert h.get(pkts[19].seq, 0.5, timestamp=pkts[19].timestamp + 1) is None
    assert h.get(pkts[19].seq, 2.0) is None  # too old
    layer.restart(seq=0, ts=0)
    h.put(layer.frame(1)[0], 3.0)
    assert len(h) == 1 and h.get(pkts[19].seq, 3.0) is None
    with pytest.raises(ValueError):
        PacketHistory(capacity=1000)


def test_switch_away_from_congestion_stops_the_current_layer_at_once() -> None:
    """A down-switch for congestion: the old layer stops now (its packets only
    feed the loss and crowd out the target's keyframe); the target starts at
    its keyframe with the next sequence number; NACKs for the old layer's
    packets are still answered."""
    history = PacketHistory()
    rw = Rewriter(VIDEO, initial_layer=1, initial_seq=10, initial_ts=0)
    high, low = Layer(seq=500), Layer(seq=70)
    pkts = high.frame(key=True)
    for p in pkts:
        history.put(p, 0.0)
    sent = send(rw, 1, pkts, 0.0)
    rw.request_switch(0, stop_current=True)
    assert rw.current_layer is None and rw.target_layer == 0 and rw.switches == 1
    assert send(rw, 1, high.frame(), 0.04) == []  # the congested layer stops now
    assert send(rw, 0, low.frame(), 0.05) == []  # the target waits for its keyframe
    after = send(rw, 0, low.frame(key=True), 0.08)
    assert [p.sequence_number for p in sent + after] == list(range(10, 16))
    assert rw.current_layer == 0 and rw.switches == 1
    assert len(rw.retransmit([11], {1: history}, 0.1)) == 1
