"""Retransmission budget, send-rate meter, probe pacing, and the rewriter's
RTX probe / budgeted retransmission paths — explicit clocks throughout."""

from __future__ import annotations

import pytest

from media.rtp.budget import RateMeter, RetransmitBudget
from media.rtp.history import PacketHistory
from media.rtp.packet import LayerPacket, RtpPacket, unwrap_rtx_payload
from media.rtp.probe import ProbePacer
from media.rtp.rewrite import Rewriter, TrackParams

RTX_PARAMS = TrackParams(ssrc=10, payload_type=102, clock_rate=90000, rtx_ssrc=11, rtx_payload_type=103)
PAYLOAD = 1100


def layer_packets(n: int, seq: int = 0, ts_step: int = 3000) -> list[LayerPacket]:
    """*n* single-packet frames; the first is a keyframe start."""
    return [LayerPacket(seq=(seq + k) & 0xFFFF, timestamp=k * ts_step, marker=True,
                        payload=bytes((k & 0xFF,)) * PAYLOAD, keyframe_start=k == 0, discontinuity=k == 0)
            for k in range(n)]


def feed(rw: Rewriter, history: PacketHistory, packets: list[LayerPacket], t0: float, rate_pps: float) -> float:
    t = t0
    for p in packets:
        history.put(p, t)
        assert rw.rewrite(0, p, t) is not None
        t += 1.0 / rate_pps
    return t


# -- rate meter ---------------------------------------------------------------------------


def test_rate_meter_over_a_window() -> None:
    m = RateMeter(window=1.0)
    assert m.update(0, 0.0) is None
    assert m.update(1000, 0.1) is None  # too short a span to say
    assert m.update(125_000, 1.0) == pytest.approx(1_000_000)
    for k in range(2, 6):  # the rate halves; the window follows within ~1 s
        m.update(125_000 + (k - 1) * 62_500, float(k))
    assert m.rate == pytest.approx(500_000)


# -- budget -----------------------------------------------------------------------------


def test_budget_rate_is_a_share_of_layer_rate_estimate_and_delivery() -> None:
    b = RetransmitBudget(0.25)
    assert b.update(2_500_000, None, None, 0.0) == pytest.approx(625_000)
    assert b.update(2_500_000, 400_000, 0.0, 0.0) == pytest.approx(100_000)  # a share of the estimate
    # A policer: REMB says 3.8 Mbit/s, 85 % is lost; only ~375 kbit/s gets through.
    assert b.update(2_500_000, 3_800_000, 0.85, 0.0) == pytest.approx(93_750)
    assert b.update(None, 100_000, 0.0, 0.0) == pytest.approx(93_750)  # no rate measured: unchanged


def test_budget_token_bucket_caps_a_nack_storm() -> None:
    """~1000 NACKed packets a second at 1.2 kB into a policed link (~375
    kbit/s get through): what is resent stays within a quarter of that, plus
    one bucket depth — well under the estimate in every second."""
    b = RetransmitBudget(0.25, burst=0.2)
    b.update(2_500_000, 3_800_000, 0.85, 0.0)
    per_second = [0] * 10
    for k in range(10_000):  # 10 s
        if b.take(1200, k / 1000):
            per_second[k // 1000] += 1200
    assert max(per_second) * 8 <= 375_000
    assert sum(per_second) * 8 / 10 <= 93_750 * 1.02 + b.depth * 8 / 10
    assert sum(per_second) * 8 / 10 >= 93_750 * 0.9  # and it does use the budget


def test_budget_depth_always_fits_a_packet_and_playout_age() -> None:
    b = RetransmitBudget(0.25, min_depth=3000, playout_allowance=0.3)
    b.update(20_000, None, None, 0.0)  # 5 kbit/s: depth would be 125 bytes
    assert b.depth == 3000
    assert b.take(1200, 0.0) and b.take(1200, 0.0) and not b.take(1200, 0.0)
    assert b.max_age(None) == pytest.approx(0.3) and b.max_age(0.1) == pytest.approx(0.4)
    with pytest.raises(ValueError):
        RetransmitBudget(0.0)


# -- rewriter: budgeted, age-limited retransmission --------------------------------------


def test_retransmit_skips_packets_past_the_playout_window_and_over_budget() -> None:
    rw = Rewriter(RTX_PARAMS, initial_seq=0, initial_ts=0, initial_rtx_seq=0)
    history = PacketHistory()
    feed(rw, history, layer_packets(100), 0.0, 100.0)  # seq k produced at k/100 s
    b = RetransmitBudget(0.25, burst=0.2, min_depth=3000)
    b.update(400_000, None, None, 1.0)  # 10 kB/s: depth 3000 B (two RTX packets)
    out = rw.retransmit(list(range(0, 100, 10)), {0: history}, 1.0, budget=b, max_age=0.35)
    # Seqs 0..60 are older than 0.35 s at t = 1.0; 70, 80, 90 are fresh; the budget pays for two.
    assert rw.rtx_too_old == 7 and rw.rtx_over_budget == 1
    assert [unwrap_rtx_payload(RtpPacket.parse(d).payload)[0] for d in out] == [70, 80]
    assert rw.retransmitted == 2 and rw.retransmitted_bytes == sum(len(d) for d in out)
    out = rw.retransmit([90], {0: history}, 1.3, budget=b, max_age=0.5)  # refilled in 0.3 s
    assert len(out) == 1


# -- probe pacing --------------------------------------------------------------------------


def test_probe_pacer_ramps_geometrically_to_the_target() -> None:
    p = ProbePacer(150_000, 2_400_000, start=10.0, duration=1.5, steps=4, interval=0.015)
    rates = [p.total_rate(10.0 + k * 0.375 + 0.01) for k in range(4)]
    assert rates == pytest.approx([300_000, 600_000, 1_200_000, 2_400_000])
    assert p.total_rate(9.9) == 0.0 and p.total_rate(11.5) == 0.0
    planned = p.planned_bytes(11.5)
    assert planned == pytest.approx(sum(r - 150_000 for r in rates) * 0.375 / 8)
    assert p.due(10.0) == 0
    due = p.due(10.2)
    assert due == pytest.approx(150_000 * 0.2 / 8, abs=1)
    p.sent(due + 500)  # sent a bit more (whole packets): the next call owes less
    assert p.due(10.2) == 0
    assert p.next_deadline(10.2) == pytest.approx(10.215) and p.next_deadline(11.49) == pytest.approx(11.5)
    assert p.next_deadline(11.5) is None and p.done(11.5)


def test_probe_pacer_target_below_base_is_clamped() -> None:
    p = ProbePacer(500_000, 100_000, start=0.0, duration=1.0)
    assert p.planned_bytes(1.0) == 0.0


# -- rewriter: RTX probe packets ------------------------------------------------------------


def test_probe_packets_are_rtx_copies_of_recent_packets() -> None:
    rw = Rewriter(RTX_PARAMS, initial_seq=1000, initial_ts=0, initial_rtx_seq=500)
    history = PacketHistory()
    sent = [RtpPacket.parse(rw.rewrite(0, p, 0.0)) for p in layer_packets(100)]
    for p in layer_packets(100):
        history.put(p, 0.0)
    by_seq = {p.sequence_number: p for p in sent}
    out = [RtpPacket.parse(d) for d in rw.probe(10_000, {0: history}, 0.1, span=16)]
    assert sum(len(p.serialize()) for p in out) >= 10_000 and len(out) == 9
    assert all(p.ssrc == 11 and p.payload_type == 103 for p in out)
    assert [p.sequence_number for p in out] == list(range(500, 509))
    osns = [unwrap_rtx_payload(p.payload)[0] for p in out]
    assert all(1099 - 15 <= s <= 1099 for s in osns)  # within the last 16 sent
    for p, osn in zip(out, osns):
        assert unwrap_rtx_payload(p.payload)[1] == by_seq[osn].payload and p.timestamp == by_seq[osn].timestamp
    wires = rw.probe(20_000, {0: history}, 0.1, span=16)
    more = [unwrap_rtx_payload(RtpPacket.parse(d).payload)[0] for d in wires]
    assert set(osns + more) == set(range(1084, 1100))  # the cursor cycles over the span
    assert rw.probe_bytes == sum(len(p.serialize()) for p in out) + sum(len(d) for d in wires)
    assert rw.retransmitted == 0  # probes are not NACK answers


def test_probe_needs_rtx_and_packets_in_the_history() -> None:
    plain = Rewriter(TrackParams(ssrc=10, payload_type=102, clock_rate=90000), initial_seq=0, initial_ts=0)
    history = PacketHistory()
    for p in layer_packets(10):
        history.put(p, 0.0)
        plain.rewrite(0, p, 0.0)
    assert not plain.can_probe and plain.probe(5000, {0: history}, 0.1) == []
    rw = Rewriter(RTX_PARAMS, initial_seq=0, initial_ts=0)
    assert rw.can_probe and rw.probe(5000, {0: history}, 0.0) == []  # nothing sent yet
    for p in layer_packets(10):
        rw.rewrite(0, p, 0.0)
    assert rw.probe(5000, {0: history}, 5.0) == []  # all aged out of the history


def test_history_age_and_recent_bytes() -> None:
    h = PacketHistory(capacity=64)
    for k, p in enumerate(layer_packets(20)):
        h.put(p, k * 0.1)
    assert h.age(5, 1.0) == pytest.approx(0.5) and h.age(99, 1.0) is None
    assert h.recent_bytes(1.9, 1.0) == 10 * PAYLOAD  # produced at 1.0 .. 1.9
