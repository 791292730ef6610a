"""Fuzz target for the WHIP RTP ingest (DESIGN.md: one fuzz target per parser).

Whatever a publisher sends after DTLS — garbage, truncated headers, wild
sequence numbers, bogus extensions — ``RtpIngest`` must neither raise nor
grow without bound.
"""

from __future__ import annotations

import struct

from hypothesis import given, settings, strategies as st

from media.webrtc.whip import IngestConfig, RtpIngest

VIDEO_PT, RTX_PT, AUDIO_PT, RID_EXT, RRID_EXT = 102, 103, 111, 10, 11


def _ingest() -> RtpIngest:
    return RtpIngest(IngestConfig(sender_ssrc=1, video_pt=VIDEO_PT, rtx_pt=RTX_PT, audio_pt=AUDIO_PT,
                                  rids=("high", "low"), rid_ext=RID_EXT, rrid_ext=RRID_EXT,
                                  nack=True, pli=True, remb=True))


rtp_like = st.builds(
    lambda pt, seq, ts, ssrc, marker, ext, payload: (
        struct.pack("!BBHII", 0x90 if ext else 0x80, (0x80 if marker else 0) | pt, seq, ts, ssrc)
        + (struct.pack("!HH", 0xBEDE, (len(ext) + 3) // 4) + ext.ljust((len(ext) + 3) // 4 * 4, b"\0") if ext else b"")
        + payload),
    st.sampled_from([VIDEO_PT, RTX_PT, AUDIO_PT, 96, 0]), st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF),
    st.sampled_from([1, 2, 3, 0xDEADBEEF]), st.booleans(), st.binary(max_size=12), st.binary(max_size=300))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(rtp_like, st.binary(max_size=64)), max_size=60))
def test_rtp_ingest_never_raises_and_stays_bounded(packets) -> None:
    ingest = _ingest()
    now = 0.0
    for p in packets:
        now += 0.003
        ingest.on_rtp(p, now)
        ingest.tick(now)
        ingest.take_rtcp()
    ingest.tick(now + 10)
    assert len(ingest.take_rtcp()) < 1000
