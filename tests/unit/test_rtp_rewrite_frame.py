"""Rewriter.rewrite_frame (media/rtp/rewrite.py): one call per viewer per
frame must give exactly the bytes and the state that rewrite() per packet
gives — across gaps, duplicates, late packets, restarts mid-frame, layer
switches, jumps beyond max_gap, transport-cc and abs-send-time."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from media.rtp.packet import LayerPacket
from media.rtp.rewrite import Rewriter, TrackParams, TransportSeq

PARAMS = TrackParams(ssrc=0xAAAA0001, payload_type=102, clock_rate=90000, mid="0", mid_id=1,
                     abs_send_time_id=2, transport_cc_id=3, rtx_ssrc=0xAAAA0002, rtx_payload_type=103)

_STATE = ("_layer", "_target", "_lseq", "_vseq", "_ts_off", "_last_vts", "_last_now", "packets_sent",
          "octets_sent", "switches", "rebases", "dropped_late", "unrecoverable")


def _pair(max_gap: int) -> tuple[Rewriter, TransportSeq, Rewriter, TransportSeq]:
    ta, tb = TransportSeq(65530), TransportSeq(65530)
    kw = dict(initial_layer=0, initial_seq=65500, initial_ts=0xFFFFF000, initial_rtx_seq=7, max_gap=max_gap)
    return (Rewriter(PARAMS, transport_seq=ta, **kw), ta, Rewriter(PARAMS, transport_seq=tb, **kw), tb)


# A frame: its layer, a switch request before it (or none), then per packet
# (seq step, keyframe start, discontinuity, marker).
_packet = st.tuples(st.sampled_from([1, 1, 1, 1, 2, 0, -3, 90, 40000]), st.booleans(), st.booleans(), st.booleans())
_frame = st.tuples(st.integers(0, 2), st.integers(-1, 2), st.booleans(), st.lists(_packet, min_size=1, max_size=12))


@settings(max_examples=300, deadline=None)
@given(st.lists(_frame, min_size=1, max_size=40), st.sampled_from([64, 128]))
def test_rewrite_frame_is_rewrite_per_packet(frames, max_gap) -> None:
    per_packet, tw_a, per_frame, tw_b = _pair(max_gap)
    seqs = [0, 1000, 2000]
    ts = [0, 5000, 10000]
    now = 10.0
    for layer, switch, stop, spec in frames:
        now += 0.033
        if switch >= 0:
            per_packet.request_switch(switch, stop_current=stop)
            per_frame.request_switch(switch, stop_current=stop)
        ts[layer] = (ts[layer] + 3000) & 0xFFFFFFFF
        packets = []
        for step, key, disc, marker in spec:
            seqs[layer] = (seqs[layer] + step) & 0xFFFF
            packets.append(LayerPacket(seqs[layer], ts[layer], marker, bytes((seqs[layer] & 0xFF,)) * 30,
                                       keyframe_start=key, discontinuity=disc))
        want = [d for p in packets if (d := per_packet.rewrite(layer, p, now)) is not None]
        got = per_frame.rewrite_frame(layer, packets, now)
        assert got == want
        assert tw_a.value == tw_b.value
        for name in _STATE:
            assert getattr(per_frame, name) == getattr(per_packet, name), name
        assert per_frame._map == per_packet._map
    # The NACK path sees the same history of what was sent.
    lost = [(per_packet.last_seq - k) & 0xFFFF for k in range(8)]
    assert per_frame.translate_nack(lost) == per_packet.translate_nack(lost)


def test_an_in_order_frame_is_sent_in_one_call_with_consecutive_numbers() -> None:
    rw, tw, _, _ = _pair(128)
    key = [LayerPacket(10 + i, 9000, i == 4, b"k" * 100, keyframe_start=i == 0) for i in range(5)]
    out = rw.rewrite_frame(0, key, 1.0)
    assert len(out) == 5 and rw.packets_sent == 5 and rw.octets_sent == 500
    seqs = [int.from_bytes(d[2:4], "big") for d in out]
    assert seqs == [(65500 + i) & 0xFFFF for i in range(5)]
    assert out[-1][1] & 0x80 and not out[0][1] & 0x80  # marker on the last only
    assert rw.rewrite_frame(1, key, 1.1) == []  # another layer: nothing
