"""Fuzz target for the TS demuxer: feed() never raises, memory stays bounded."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from media.mpegts import AccessUnit, TsCounters, TsDemuxer

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "ts"
SEED = (FIXTURES / "h264_aac_zerolatency.ts").read_bytes()[: 188 * 60]
SEED_OPUS = (FIXTURES / "h264_opus.ts").read_bytes()[: 188 * 60]
CAP = 64 * 1024


def _check(demux: TsDemuxer, events: list) -> None:
    assert isinstance(demux.counters(), TsCounters)
    # tail < 5 packets, each PES <= cap (+ one packet), sections <= 4 KiB
    assert demux.buffered_bytes() <= 8192 * (CAP + 188 + 4096)
    assert len(demux._tail) < 5 * 188
    for st in demux._pids.values():
        assert sum(len(p) for p in st.parts) <= CAP + 188
        assert st.sec_buf is None or len(st.sec_buf) <= 4096 + 188
    for e in events:
        if isinstance(e, AccessUnit):
            assert len(e.data) <= CAP


@st.composite
def mutated(draw, seed: bytes = SEED):
    data = bytearray(draw(st.sampled_from([SEED, SEED_OPUS])))
    for _ in range(draw(st.integers(0, 40))):
        kind = draw(st.integers(0, 3))
        pos = draw(st.integers(0, len(data) - 1))
        if kind == 0:
            data[pos] = draw(st.integers(0, 255))
        elif kind == 1:
            del data[pos : pos + draw(st.integers(1, 400))]
        elif kind == 2:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=300))
        elif len(data) > 188:
            # header-targeted: PUSI/AFC/CC/PID bits of some packet
            p = (pos // 188) * 188
            if p + 5 <= len(data):
                data[p + draw(st.integers(1, 4))] ^= draw(st.integers(1, 255))
    if draw(st.booleans()):
        # SRT-sized messages, so the message-boundary rules (MESSAGE, QUIET) run
        cuts = list(range(1316, len(data), 1316))
    else:
        cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=30)))
    return bytes(data), cuts


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_feed_never_raises_on_mutated_streams(case):
    data, cuts = case
    demux = TsDemuxer(max_pes_size=CAP)
    events: list = []
    prev = 0
    now = 0.0
    for cut in cuts + [len(data)]:
        deadline = demux.next_deadline()
        if deadline is not None:
            events += demux.poll(deadline)
        now += 0.02
        events += demux.feed(data[prev:cut], now, end_of_message=True)
        _check(demux, events)
        prev = cut
    events += demux.flush(now + 1)
    demux.poll(now + 10)
    _check(demux, events)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=1500), max_size=12))
def test_feed_never_raises_on_random_bytes(chunks):
    demux = TsDemuxer(max_pes_size=CAP)
    events: list = []
    for i, chunk in enumerate(chunks):
        # sprinkle sync bytes at packet spacing so the parser gets past sync
        if i % 2 and len(chunk) > 188:
            b = bytearray(chunk)
            b[0 : len(b) : 188] = b"\x47" * len(b[0 : len(b) : 188])
            chunk = bytes(b)
        events += demux.feed(chunk, float(i))
        _check(demux, events)
    events += demux.flush(100.0)
    _check(demux, events)
