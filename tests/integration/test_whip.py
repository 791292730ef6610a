"""WHIP ingest (RFC 9725): sans-I/O RTP ingest, in-process aiortc publisher,
and the real server with aiortc publishers and WHEP viewers (and Chromium
simulcast when the system Chromium is there).

The sans-I/O part feeds :class:`media.webrtc.whip.RtpIngest` RTP packets
built from real x264 output (PyAV), with explicit clocks: simulcast by RID
(the extension only on the first packets), RID ranking by SPS size,
reordering, loss → NACK → RTX repair, unrecoverable loss → PLI and a wait
for the next IDR, receiver reports + REMB, keyframe requests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fractions
import random
import re
import shutil
import threading

import av
import numpy as np
import pytest

from helpers import aiortc_whep_receive, ffmpeg_publish, http, login, metrics_url, stop_process, wait_live, wait_until
from media.rtp.h264 import H264Packetizer, split_annexb
from media.rtp.packet import RtpPacket, wrap_rtx_payload
from media.rtp.rtcp import Nack, Pli, ReceiverReport, Remb, SenderReport, parse_rtcp
from media.stream import StreamHub, StreamState
from media.webrtc.sdp import SdpError, parse_offer
from media.webrtc.whip import IngestConfig, RtpIngest, WhipService, patch_answer, plan_offer

pytestmark = pytest.mark.integration

VIDEO_PT, RTX_PT, AUDIO_PT = 108, 109, 111
RID_EXT, RRID_EXT = 10, 11


# --------------------------------------------------------------------------
# Real H.264 and RTP packets
# --------------------------------------------------------------------------

_ENCODED: dict[tuple[int, int, int, int], list[tuple[bytes, bool]]] = {}


def encode(w: int, h: int, n: int, gop: int = 10) -> list[tuple[bytes, bool]]:
    """``n`` Annex-B access units from x264 (Constrained Baseline, no B-frames)."""
    key = (w, h, n, gop)
    if key not in _ENCODED:
        ctx = av.CodecContext.create("libx264", "w")
        ctx.width, ctx.height, ctx.pix_fmt = w, h, "yuv420p"
        ctx.time_base = fractions.Fraction(1, 30)
        ctx.gop_size = gop
        ctx.options = {"preset": "ultrafast", "tune": "zerolatency", "profile": "baseline"}
        out = []
        for i in range(n):
            img = np.full((h, w, 3), (i * 9) % 255, np.uint8)
            img[:, (i * 2) % w] = 0
            f = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv420p")
            f.pts = i
            out += [(bytes(p), p.is_keyframe) for p in ctx.encode(f)]
        out += [(bytes(p), p.is_keyframe) for p in ctx.encode(None)]
        _ENCODED[key] = out
    return _ENCODED[key]


def expected(au: bytes) -> bytes:
    """What the depacketizer rebuilds: the NAL units, AUD/filler dropped."""
    return b"".join(b"\x00\x00\x00\x01" + n for n in split_annexb(au) if n[0] & 0x1F not in (9, 12))


class Sender:
    """RTP packets of one simulcast encoding, as a browser sends them."""

    def __init__(self, ssrc: int, aus: list[tuple[bytes, bool]], rid: str | None = None, *, seq0: int = 0,
                 ts0: int = 0, rid_packets: int = 3, max_payload: int = 64) -> None:
        self.ssrc = ssrc
        self.rid = rid
        self.aus = aus
        self.frames: list[list[RtpPacket]] = []
        pk = H264Packetizer(max_payload=max_payload)
        n = 0
        for i, (au, _key) in enumerate(aus):
            frame = []
            for lp in pk.packetize(au, (ts0 + 3000 * i) & 0xFFFFFFFF):
                p = RtpPacket(VIDEO_PT, (seq0 + n) & 0xFFFF, lp.timestamp, ssrc, lp.payload, lp.marker)
                if rid is not None and n < rid_packets:
                    p = p.with_extensions(((RID_EXT, rid.encode()),))
                frame.append(p)
                n += 1
            self.frames.append(frame)

    def rtx(self, packet: RtpPacket, rtx_ssrc: int, rtx_seq: int, repaired: bool = True) -> bytes:
        p = RtpPacket(RTX_PT, rtx_seq, packet.timestamp, rtx_ssrc,
                      wrap_rtx_payload(packet.sequence_number, packet.payload), packet.marker)
        if repaired and self.rid is not None:
            p = p.with_extensions(((RRID_EXT, self.rid.encode()),))
        return bytes(p)


def config(**kw) -> IngestConfig:
    base = dict(sender_ssrc=0xABCD, video_pt=VIDEO_PT, rtx_pt=RTX_PT, audio_pt=AUDIO_PT, rids=("high", "low"),
                rid_ext=RID_EXT, rrid_ext=RRID_EXT, nack=True, pli=True, remb=True)
    base.update(kw)
    return IngestConfig(**base)


def rtcp_of(ingest: RtpIngest) -> list:
    return [p for data in ingest.take_rtcp() for p in parse_rtcp(data)]


# --------------------------------------------------------------------------
# RtpIngest (sans-I/O)
# --------------------------------------------------------------------------


def test_simulcast_demultiplexed_by_rid_learned_from_first_packets() -> None:
    high, low = encode(64, 48, 20), encode(32, 24, 20)
    a = Sender(0x1111, high, "high", seq0=65530, ts0=0xFFFFF000)  # both wrap inside the run
    b = Sender(0x2222, low, "low", seq0=100, ts0=77)
    ing = RtpIngest(config())
    units, now = [], 10.0
    for fa, fb in zip(a.frames, b.frames):
        now += 1 / 30
        for p in fa + fb:
            units += ing.on_rtp(bytes(p), now)
    by_layer = {name: [u for u in units if u.layer == name] for name in ("high", "low")}
    assert len(by_layer["high"]) == 20 and len(by_layer["low"]) == 20
    for name, src in (("high", high), ("low", low)):
        got = by_layer[name]
        assert [u.data for u in got] == [expected(au) for au, _ in src]
        assert [u.keyframe for u in got] == [k for _, k in src]
        assert all(u.codec == "h264" and u.clock_rate == 90000 and u.pts == u.dts for u in got)
        assert all(y.pts - x.pts == 3000 for x, y in zip(got, got[1:]))  # unwrapped across 2^32
    assert by_layer["high"][0].sps is not None
    assert ing.stats.frames_dropped == 0 and ing.stats.lost == 0
    assert not [p for p in rtcp_of(ing) if isinstance(p, (Nack, Pli))]
    layers = {d["rid"]: d for d in ing.layers()}
    assert (layers["high"]["width"], layers["high"]["height"]) == (64, 48)
    assert (layers["low"]["width"], layers["low"]["height"]) == (32, 24)


def test_other_rid_names_ranked_by_picture_size() -> None:
    small, big = encode(32, 24, 30), encode(64, 48, 30)
    s = Sender(0x1111, small, "q")  # offered first, smaller
    b = Sender(0x2222, big, "f")
    ing = RtpIngest(config(rids=("q", "f")))
    units, now = [], 1.0
    for i in range(30):
        now += 1 / 30
        for p in s.frames[i] + (b.frames[i - 5] if i >= 5 else []):  # 'f' starts later
            units += ing.on_rtp(bytes(p), now)
        units += ing.tick(now)
    origin = {expected(au): ("q", i) for i, (au, _) in enumerate(small)}
    origin.update({expected(au): ("f", i) for i, (au, _) in enumerate(big)})
    seen = [(origin[u.data], u.layer, u.keyframe) for u in units]
    f_start = next(k for k, ((rid, _i), _l, _k) in enumerate(seen) if rid == "f")
    # Alone, 'q' is the only (so the highest) layer.
    assert [(o, layer) for o, layer, _ in seen[:f_start]] == [(("q", i), "high") for i in range(6)]
    after = seen[f_start:]
    # 'f' (larger SPS) is 'high' from its first IDR, every frame of it.
    assert [o for o, layer, _ in after if layer == "high"] == [("f", i) for i in range(25)]
    # 'q' moved to 'low' and restarts there at its next IDR (frame 10).
    low = [(o, key) for o, layer, key in after if layer == "low"]
    assert low[0] == (("q", 10), True) and [o for o, _ in low] == [("q", i) for i in range(10, 30)]
    assert any(isinstance(p, Pli) and p.media_ssrc == 0x1111 for p in rtcp_of(ing))
    assert {d["rid"]: d["layer"] for d in ing.layers()} == {"q": "low", "f": "high"}


def test_reordering_is_repaired_without_loss() -> None:
    aus = encode(64, 48, 20)
    a = Sender(0x1111, aus, "high")
    packets = [p for f in a.frames for p in f]
    rng = random.Random(7)
    shuffled = []
    for i in range(0, len(packets), 4):
        chunk = packets[i:i + 4]
        rng.shuffle(chunk)
        shuffled += chunk
    ing = RtpIngest(config(rids=()))
    units, now = [], 0.0
    for p in shuffled:
        now += 0.002
        units += ing.on_rtp(bytes(p), now)
    assert [u.data for u in units] == [expected(au) for au, _ in aus]
    assert all(u.layer is None for u in units)  # no simulcast: the hub's single layer
    assert ing.stats.lost == 0 and ing.stats.frames_dropped == 0


def test_loss_is_nacked_and_repaired_over_rtx() -> None:
    aus = encode(64, 48, 20)
    a = Sender(0x1111, aus, "high")
    b = Sender(0x2222, encode(32, 24, 20), "low")
    ing = RtpIngest(config())
    units, now = [], 0.0
    victim = a.frames[4][1]  # second packet of a P-frame

    def frames(rng):
        nonlocal now
        out = []
        for i in rng:
            now += 0.01
            out += [u for p in a.frames[i] + b.frames[i] if p is not victim for u in ing.on_rtp(bytes(p), now)]
        return out

    units += frames(range(6))
    nacks = [p for p in rtcp_of(ing) if isinstance(p, Nack)]
    assert [(n.media_ssrc, n.lost) for n in nacks] == [(0x1111, (victim.sequence_number,))]
    assert [u.layer for u in units].count("high") == 4  # frames 4.. wait for the hole
    # Within the reorder window, Chromium's RTX: own SSRC, repaired-RID on its
    # first packets (RFC 4588 §4).
    units += ing.on_rtp(a.rtx(victim, 0x3333, 1), now + 0.005)
    units += frames(range(6, 8))
    high = [u for u in units if u.layer == "high"]
    assert [u.data for u in high] == [expected(au) for au, _ in aus[:8]]
    assert ing.stats.recovered == 1 and ing.stats.lost == 0 and ing.stats.frames_dropped == 0
    # The stream detectors see the hole on the wire, and that it was repaired.
    assert ing.source_counters() == {"rtpRecv": ing.stats.packets, "rtpGaps": 1, "rtpLost": 0}
    # A second copy (RTX payload padding) is redundant, not a new frame.
    assert ing.on_rtp(a.rtx(victim, 0x3333, 2), now + 0.02) == []
    assert ing.stats.rtx_redundant == 1


def test_rtx_tied_by_fid_group_without_simulcast() -> None:
    aus = encode(64, 48, 12)
    a = Sender(0x1111, aus)
    ing = RtpIngest(config(rids=(), fid=((0x9999, 0x1111),)))
    units, now = [], 0.0
    victim = a.frames[3][0]
    for f in a.frames[:6]:
        now += 0.01
        units += [u for p in f if p is not victim for u in ing.on_rtp(bytes(p), now)]
    units += ing.on_rtp(a.rtx(victim, 0x9999, 500, repaired=False), now)
    assert [u.data for u in units] == [expected(au) for au, _ in aus[:6]]


def test_unrecoverable_loss_drops_until_next_idr_and_sends_pli() -> None:
    aus = encode(64, 48, 25)  # IDR at 0, 10, 20
    a = Sender(0x1111, aus, "high")
    b = Sender(0x2222, encode(32, 24, 25), "low")
    ing = RtpIngest(config(reorder_window=0.05, nack_retry=0.02, max_nacks=2))
    units, now = [], 0.0
    victim = a.frames[3][0]
    counted_nacks = 0
    for i in range(25):
        now += 1 / 30
        for p in a.frames[i] + b.frames[i]:
            if p is not victim:
                units += ing.on_rtp(bytes(p), now)
        for t in (now + 0.01, now + 0.02):
            units += ing.tick(t)
        counted_nacks += sum(1 for p in rtcp_of(ing) if isinstance(p, Nack) and victim.sequence_number in p.lost)
        if i == 4:
            plis = [p for p in rtcp_of(ing) if isinstance(p, Pli)]
    assert counted_nacks == 2  # max_nacks, never more
    high = [u for u in units if u.layer == "high"]
    # frames 0-2 fine; 3 broken; 4-9 reference it: dropped; IDR 10 restarts the layer
    assert [u.data for u in high] == [expected(au) for au, _ in aus[:3] + aus[10:]]
    assert high[3].keyframe
    assert len([u for u in units if u.layer == "low"]) == 25  # the other layer is untouched
    assert ing.stats.lost == 1 and ing.stats.frames_dropped == 7
    assert ing.source_counters()["rtpGaps"] == 1 and ing.source_counters()["rtpLost"] == 1
    assert ing.stats.plis_sent >= 1 and ing.stats.plis_sent <= 3  # rate-limited (0.5 s)


def test_timer_deadlines_alone_drive_repair_give_up_and_reports() -> None:
    """The same loss as above, but ``tick`` runs only at ``get_timer()``'s
    deadlines (as the session's one timer does): NACKs are repeated
    ``nack_retry`` apart, the hole is given up ``reorder_window`` after the
    packet behind it arrived, and nothing is due without a reason."""
    aus = encode(64, 48, 25)
    a = Sender(0x1111, aus, "high")
    ing = RtpIngest(config(reorder_window=0.05, nack_retry=0.02, max_nacks=2, rr_interval=1.0))
    assert ing.get_timer() is None  # nothing received: nothing to do
    victim = a.frames[3][0]
    units, now, ticks, nack_times = [], 0.0, 0, []

    def run_timers_until(t_end: float) -> None:
        nonlocal units, ticks
        while True:
            at = ing.get_timer()
            if at is None or at > t_end:  # None only before the first packet
                return
            units += ing.tick(at)
            ticks += 1
            for p in rtcp_of(ing):
                if isinstance(p, Nack) and victim.sequence_number in p.lost:
                    nack_times.append(at)

    for i in range(25):
        run_timers_until(now + 1 / 30)
        now += 1 / 30
        for p in a.frames[i]:
            if p is not victim:
                units += ing.on_rtp(bytes(p), now)
        for p in rtcp_of(ing):
            if isinstance(p, Nack) and victim.sequence_number in p.lost:
                nack_times.append(now)
    run_timers_until(now + 0.5)
    assert len(nack_times) == 2 and abs((nack_times[1] - nack_times[0]) - 0.02) < 1e-6
    high = [u for u in units if u.layer == "high"]
    assert [u.data for u in high] == [expected(au) for au, _ in aus[:3] + aus[10:]]
    assert ing.stats.lost == 1
    # Between frames only the hole's deadlines and the reports were due:
    # far fewer wake-ups than a 20 ms ticker's ~43 over the same 0.86 s.
    assert ticks < 20, ticks


def test_receiver_reports_remb_and_lsr() -> None:
    a = Sender(0x1111, encode(64, 48, 20), "high")
    b = Sender(0x2222, encode(32, 24, 20), "low")
    ing = RtpIngest(config(nack=False, rr_interval=1.0))
    now = 100.0
    dropped = {a.frames[2][0].sequence_number, a.frames[6][1].sequence_number}
    sent = 0
    for i in range(20):
        now += 0.01
        for p in a.frames[i] + b.frames[i]:
            if p.sequence_number in dropped and p.ssrc == 0x1111:
                continue
            sent += p.ssrc == 0x1111
            ing.on_rtp(bytes(p), now)
    ing.on_rtcp(bytes(SenderReport(0x1111, 0x1234_5678_9ABC_DEF0, 0, 10, 1000)), now)
    ing.tick(now + 0.5)
    packets = rtcp_of(ing)
    rr = next(p for p in packets if isinstance(p, ReceiverReport) and p.reports)
    blocks = {blk.ssrc: blk for blk in rr.reports}
    assert rr.ssrc == 0xABCD
    total = sent + 2
    assert blocks[0x1111].packets_lost == 2
    assert blocks[0x1111].fraction_lost == (2 << 8) // total
    assert blocks[0x2222].packets_lost == 0 and blocks[0x2222].fraction_lost == 0
    assert blocks[0x1111].lsr == 0x5678_9ABC and blocks[0x1111].dlsr == int(0.5 * 65536)
    remb = next(p for p in packets if isinstance(p, Remb))
    assert set(remb.ssrcs) == {0x1111, 0x2222} and remb.bitrate >= 1_000_000


def test_keyframe_requests_are_rate_limited_per_layer() -> None:
    a = Sender(0x1111, encode(64, 48, 5), "high")
    b = Sender(0x2222, encode(32, 24, 5), "low")
    ing = RtpIngest(config(pli_interval=0.5))
    for f in a.frames + b.frames:
        for p in f:
            ing.on_rtp(bytes(p), 1.0)
    rtcp_of(ing)
    assert ing.request_keyframe(1.1) == 2
    assert ing.request_keyframe(1.3) == 0
    assert ing.request_keyframe(1.7) == 2
    plis = [p for p in rtcp_of(ing) if isinstance(p, Pli)]
    assert sorted(p.media_ssrc for p in plis) == [0x1111, 0x1111, 0x2222, 0x2222]
    assert all(p.sender_ssrc == 0xABCD for p in plis)


def test_padding_and_opus() -> None:
    aus = encode(64, 48, 6)
    a = Sender(0x1111, aus)
    ing = RtpIngest(config(rids=()))
    units, seq = [], 0
    for f in a.frames:
        for p in f:
            units += ing.on_rtp(bytes(RtpPacket(VIDEO_PT, seq, p.timestamp, p.ssrc, p.payload, p.marker)), 1.0)
            seq += 1
        # a padding-only packet (RFC 3550 §5.1: P bit, last byte = count) between frames
        pad = bytearray(RtpPacket(VIDEO_PT, seq, p.timestamp, p.ssrc, b"\x00" * 3 + b"\x04").serialize())
        pad[0] |= 0x20
        units += ing.on_rtp(bytes(pad), 1.0)
        seq += 1
    assert [u.data for u in units] == [expected(au) for au, _ in aus]
    assert ing.stats.padding == 6 and ing.stats.lost == 0
    audio = [RtpPacket(AUDIO_PT, 7 + i, 960 * i, 0x5555, bytes((0xF8, i))) for i in range(6)]
    order = [0, 2, 1, 3, 5, 4]
    out = []
    for k in order:
        out += ing.on_rtp(bytes(audio[k]), 2.0 + k / 1000)
    assert out == []  # a new SSRC's first packets wait (≤ reorder window) for stragglers
    out += ing.tick(2.06)
    assert [u.data for u in out] == [bytes((0xF8, i)) for i in range(6)]
    assert all(u.codec == "opus" and u.clock_rate == 48000 and u.layer is None for u in out)
    assert [u.pts for u in out] == [960 * i for i in range(6)]


# --------------------------------------------------------------------------
# SDP: what a Chromium WHIP offer asks for, what the answer grants
# --------------------------------------------------------------------------

# Captured from Chromium 156 (camera page's WhipClient: sendonly, simulcast
# RIDs high/low, H.264 first), trimmed to a few codecs.
CHROMIUM_OFFER = "\r\n".join([
    "v=0", "o=- 591906828753401779 2 IN IP4 127.0.0.1", "s=-", "t=0 0", "a=group:BUNDLE 0 1",
    "a=extmap-allow-mixed", "a=msid-semantic: WMS",
    "m=audio 9 UDP/TLS/RTP/SAVPF 111 63 0", "c=IN IP4 0.0.0.0", "a=rtcp:9 IN IP4 0.0.0.0",
    "a=ice-ufrag:xt/r", "a=ice-pwd:QRNL1ckgU1kzVfVyDjM/h8cX", "a=ice-options:trickle",
    "a=fingerprint:sha-256 EC:E0:40:96:50:74:D2:91:0A:BC:81:94:FC:B2:10:5A:7D:93:D7:0B:97:AB:DC:67:54:55:54:CF"
    ":52:92:98:51",
    "a=setup:actpass", "a=mid:0", "a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level",
    "a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid", "a=sendonly", "a=msid:- 75e9a558", "a=rtcp-mux",
    "a=rtcp-rsize", "a=rtpmap:111 opus/48000/2", "a=rtcp-fb:111 transport-cc",
    "a=fmtp:111 minptime=10;useinbandfec=1", "a=rtpmap:63 red/48000/2", "a=fmtp:63 111/111",
    "a=rtpmap:0 PCMU/8000", "a=ssrc:3538942284 cname:p2P3rb1xhxEwvcsi",
    "m=video 9 UDP/TLS/RTP/SAVPF 102 103 104 107 108 109 96 97", "c=IN IP4 0.0.0.0",
    "a=rtcp:9 IN IP4 0.0.0.0", "a=ice-ufrag:xt/r", "a=ice-pwd:QRNL1ckgU1kzVfVyDjM/h8cX",
    "a=ice-options:trickle",
    "a=fingerprint:sha-256 EC:E0:40:96:50:74:D2:91:0A:BC:81:94:FC:B2:10:5A:7D:93:D7:0B:97:AB:DC:67:54:55:54:CF"
    ":52:92:98:51",
    "a=setup:actpass", "a=mid:1", "a=extmap:14 urn:ietf:params:rtp-hdrext:toffset",
    "a=extmap:2 http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time",
    "a=extmap:3 http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01",
    "a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid",
    "a=extmap:10 urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id",
    "a=extmap:11 urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id",
    "a=sendonly", "a=msid:- 60ece6b9", "a=rtcp-mux", "a=rtcp-rsize",
    "a=rtpmap:102 H264/90000", "a=rtcp-fb:102 goog-remb", "a=rtcp-fb:102 transport-cc",
    "a=rtcp-fb:102 ccm fir", "a=rtcp-fb:102 nack", "a=rtcp-fb:102 nack pli",
    "a=fmtp:102 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42001f",
    "a=rtpmap:103 rtx/90000", "a=fmtp:103 apt=102",
    "a=rtpmap:104 H264/90000", "a=rtcp-fb:104 nack",
    "a=fmtp:104 level-asymmetry-allowed=1;packetization-mode=0;profile-level-id=42001f",
    "a=rtpmap:107 rtx/90000", "a=fmtp:107 apt=104",
    "a=rtpmap:108 H264/90000", "a=rtcp-fb:108 goog-remb", "a=rtcp-fb:108 transport-cc",
    "a=rtcp-fb:108 ccm fir", "a=rtcp-fb:108 nack", "a=rtcp-fb:108 nack pli",
    "a=fmtp:108 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f",
    "a=rtpmap:109 rtx/90000", "a=fmtp:109 apt=108",
    "a=rtpmap:96 VP8/90000", "a=rtcp-fb:96 nack", "a=rtpmap:97 rtx/90000", "a=fmtp:97 apt=96",
    "a=rid:high send", "a=rid:low send", "a=simulcast:send high;low", "",
])


def test_plan_of_chromium_simulcast_offer() -> None:
    plan = plan_offer(CHROMIUM_OFFER, parse_offer(CHROMIUM_OFFER))
    assert plan.video is not None and plan.video.codec.payload_type == 108  # Constrained Baseline
    assert plan.video.rtx is not None and plan.video.rtx.payload_type == 109
    assert plan.audio is not None and plan.audio.payload_type == 111
    assert plan.rids == ("high", "low") and plan.simulcast == "high;low"
    assert (plan.rid_ext, plan.rrid_ext) == (10, 11)
    assert plan.nack and plan.pli and plan.remb


@pytest.mark.parametrize("edit, reason", [
    (lambda s: s.replace("a=sendonly", "a=recvonly"), "sendonly"),
    (lambda s: s.replace("H264/90000", "H265/90000"), "H.264"),
    (lambda s: s.replace("opus/48000/2", "speex/48000"), "Opus"),
    (lambda s: s.replace("a=rid:low send\r\n", ""), "RID 'low'"),
    (lambda s: s.replace("a=extmap:10 urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id\r\n", ""), "RID header"),
    (lambda s: s.replace("a=group:BUNDLE 0 1", "a=group:BUNDLE 1"), "BUNDLE"),
    (lambda s: s.replace("a=simulcast:send high;low", "a=simulcast:send hi!gh;low"), "bad RID"),
])
def test_plan_refuses_what_cannot_be_ingested(edit, reason) -> None:
    offer = edit(CHROMIUM_OFFER)
    with pytest.raises(SdpError, match=reason):
        plan_offer(offer, parse_offer(offer))


async def test_answer_carries_simulcast_and_recvonly() -> None:
    svc = WhipService(StreamHub())
    session = await svc.create_session("cam", CHROMIUM_OFFER, parse_offer(CHROMIUM_OFFER), owner="t")
    try:
        answer = session.sdp_answer
        video = answer[answer.index("m=video"):]
        audio = answer[answer.index("m=audio"):answer.index("m=video")]
        assert video.split("\r\n")[0].split()[3:] == ["108", "109"]
        assert "a=recvonly" in video and "a=recvonly" in audio
        assert "packetization-mode=1" in video and "profile-level-id=42e01f" in video
        assert "a=rtcp-fb:108 nack pli" in video and "a=rtcp-fb:108 goog-remb" in video
        assert "transport-cc" not in video
        for line in ("a=extmap:10 urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id",
                     "a=extmap:11 urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id",
                     "a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid",
                     "a=rid:high recv", "a=rid:low recv", "a=simulcast:recv high;low"):
            assert line in video.split("\r\n"), line
        assert audio.split("\r\n")[0].split()[3:] == ["111"]
        # The patch is idempotent in shape: one simulcast line, one RID extension.
        assert video.count("a=simulcast:") == 1 and video.count("rtp-stream-id") == 2
        assert patch_answer(answer, dataclasses.replace(session.plan, rids=())) == answer
    finally:
        await svc.close()
    assert not svc.sessions


# --------------------------------------------------------------------------
# In-process: an aiortc publisher into WhipService; nothing is decoded
# --------------------------------------------------------------------------


def test_adapter_checks_the_internals_ingest_relies_on(monkeypatch) -> None:
    from aiortc.rtcdtlstransport import RTCDtlsTransport

    from media.webrtc import aiortc_adapter as adapter

    adapter.check_internals()
    monkeypatch.delattr(RTCDtlsTransport, "_handle_rtp_data")
    with pytest.raises(adapter.AiortcInternalsChanged, match="_handle_rtp_data"):
        adapter.check_internals()


def _pattern_track(w: int = 320, h: int = 240):
    from aiortc import VideoStreamTrack

    class Pattern(VideoStreamTrack):
        """A moving bar on a changing background (aiortc's H.264 encoder encodes it)."""

        def __init__(self) -> None:
            super().__init__()
            self.n = 0

        async def recv(self):
            pts, time_base = await self.next_timestamp()
            img = np.zeros((h, w, 3), np.uint8)
            img[..., 1] = (self.n * 3) % 256
            x = (self.n * 4) % (w - 16)
            img[:, x:x + 16] = 255
            self.n += 1
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts, frame.time_base = pts, time_base
            return frame

    return Pattern()


async def _publisher_offer():
    from aiortc import RTCPeerConnection
    from aiortc.mediastreams import AudioStreamTrack

    pc = RTCPeerConnection()
    pc.addTransceiver(_pattern_track(), direction="sendonly")
    pc.addTransceiver(AudioStreamTrack(), direction="sendonly")
    await pc.setLocalDescription(await pc.createOffer())
    return pc


async def test_aiortc_publisher_in_process_never_decodes(monkeypatch) -> None:
    import aiortc.codecs.h264 as aiortc_h264
    import aiortc.codecs.opus as aiortc_opus
    from aiortc import RTCSessionDescription

    built = []

    def refuse(name):
        def init(self, *a, **kw):
            built.append(name)
            raise AssertionError(f"aiortc {name} instantiated on the WHIP path")
        return init

    monkeypatch.setattr(aiortc_h264.H264Decoder, "__init__", refuse("H264Decoder"))
    monkeypatch.setattr(aiortc_opus.OpusDecoder, "__init__", refuse("OpusDecoder"))
    hub = StreamHub()
    svc = WhipService(hub)
    svc.start()
    pc = await _publisher_offer()
    try:
        offer = pc.localDescription.sdp
        session = await svc.create_session("cam", offer, parse_offer(offer), owner="t")
        assert session.plan.fid  # aiortc announces its RTX SSRC with a=ssrc-group:FID
        await pc.setRemoteDescription(RTCSessionDescription(session.sdp_answer, "answer"))
        for _ in range(100):
            stream = hub.get("cam")
            if stream is not None and "video:high" in stream.tracks and stream.tracks["video:high"].frames >= 10:
                break
            await asyncio.sleep(0.05)
        stream = hub.get("cam")
        assert stream is not None and stream.state == StreamState.LIVE
        assert stream.publishers[0].info.protocol == "whip"
        # The stream detectors (QC rtp_loss/rtp_drop) read the ingest's totals.
        counters = stream.publishers[0].source_counters()
        assert counters["rtpRecv"] > 0 and counters["rtpLost"] == 0
        reader = stream.subscribe(512)  # starts at the cached IDR
        await asyncio.sleep(1.0)
        frames = reader.drain()
        reader.close()
        video = [f for f in frames if getattr(f, "kind", None) == "video"]
        audio = [f for f in frames if getattr(f, "kind", None) == "audio"]
        assert video and video[0].keyframe and video[0].layer == "high"
        assert len(audio) >= 25 and all(f.codec == "opus" and f.clock_rate == 48000 for f in audio)
        ctx = av.CodecContext.create("h264", "r")  # the test decodes; the server never does
        decoded = [img for f in video for img in ctx.decode(av.Packet(f.data))]
        assert len(decoded) >= len(video) - 1 and (decoded[0].width, decoded[0].height) == (320, 240)
        info = stream.tracks["video:high"].info()
        assert (info.codec, info.width, info.height) == ("h264", 320, 240)

        keyframes = session.ingest.stats.keyframes
        svc.request_keyframe("cam")  # what a WHEP viewer's PLI turns into
        assert session.ingest.stats.plis_sent >= 1
        for _ in range(40):
            if session.ingest.stats.keyframes > keyframes:
                break
            await asyncio.sleep(0.05)
        assert session.ingest.stats.keyframes > keyframes  # aiortc's encoder answered the PLI
        assert session.ingest.stats.rtcp_sent >= 2  # receiver reports flow upstream
        threads = [t.name for t in threading.enumerate()]
        assert not [n for n in threads if n.endswith("-decoder")], threads
        # The publisher goes away (DTLS close_notify): the stream keeps its
        # readers for the grace period.
        await pc.close()
        for _ in range(100):
            if session.closed:
                break
            await asyncio.sleep(0.05)
        assert session.closed and "closed" in session.close_reason
        assert stream.state == StreamState.RECONNECTING and not svc.sessions
    finally:
        await pc.close()
        await svc.close()
    assert built == []


async def test_lost_packets_repaired_by_a_real_peer() -> None:
    """Every 10th video packet dropped on arrival: our NACKs make aiortc's
    sender retransmit over RTX, and the holes fill before the window ends."""
    from aiortc import RTCSessionDescription

    hub = StreamHub()
    svc = WhipService(hub)
    svc.start()
    pc = await _publisher_offer()
    try:
        offer = pc.localDescription.sdp
        session = await svc.create_session("cam", offer, parse_offer(offer), owner="t")
        await pc.setRemoteDescription(RTCSessionDescription(session.sdp_answer, "answer"))
        ingest = session.ingest
        video_pt = session.plan.video.codec.payload_type
        real_on_rtp = ingest.on_rtp
        seen = dropped = 0

        def lossy(data: bytes, now: float) -> list:
            nonlocal seen, dropped
            if data[1] & 0x7F == video_pt:
                seen += 1
                if seen > 20 and seen % 10 == 0 and dropped < 5:
                    # Five losses, then none: the checks below judge a
                    # fixed set, not one still growing while they wait.
                    dropped += 1
                    return []
            return real_on_rtp(data, now)

        ingest.on_rtp = lossy
        for _ in range(100):
            if dropped >= 5:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        st = ingest.stats
        assert dropped >= 5 and st.nacks_sent >= dropped
        assert st.recovered >= dropped - 1, st  # the last one may still be in flight
        assert st.lost <= 1 and st.frames_dropped <= 2, st
        assert hub.get("cam").tracks["video:high"].frames >= 20
    finally:
        await pc.close()
        await svc.close()


async def test_silent_publisher_times_out() -> None:
    from aiortc import RTCSessionDescription

    hub = StreamHub()
    svc = WhipService(hub, media_timeout=0.6)
    svc.start()
    pc = await _publisher_offer()
    try:
        offer = pc.localDescription.sdp
        session = await svc.create_session("cam", offer, parse_offer(offer), owner="t")
        await pc.setRemoteDescription(RTCSessionDescription(session.sdp_answer, "answer"))
        for _ in range(100):
            if session.attached and session.ingest.stats.frames > 3:
                break
            await asyncio.sleep(0.05)
        assert hub.get("cam").state == StreamState.LIVE
        for sender in pc.getSenders():  # a frozen phone: the connection stays, media stops
            sender.replaceTrack(None)
        for _ in range(60):
            if session.closed:
                break
            await asyncio.sleep(0.05)
        assert session.closed and session.close_reason.startswith("no media")
        assert hub.get("cam").state == StreamState.RECONNECTING
    finally:
        await pc.close()
        await svc.close()


# --------------------------------------------------------------------------
# The real server: HTTP semantics, aiortc publisher → WHEP viewer
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(api_server):
    base = api_server.url
    admin = login(base, "admin", api_server.admin_password)["access_token"]
    r = http("POST", f"{base}/api/v1/productions", {"name": "WHIP show"}, token=admin)
    assert r.status == 201, r.body
    pid = r.json()["id"]
    for name in ("whip1", "whip2", "whip3", "whip4"):
        assert http("POST", f"{base}/api/v1/streams", {"name": name, "production": pid},
                    token=admin).status == 201
    users = {}
    for name, role in (("cammy", "camera"), ("dora", "director")):
        assert http("POST", f"{base}/api/v1/users", {"username": name, "password": "pass-word-12345", "role": role},
                    token=admin).status == 201
        assert http("PUT", f"{base}/api/v1/productions/{pid}/members/{name}", {"role": role},
                    token=admin).status == 200
        users[name] = login(base, name, "pass-word-12345")["access_token"]

    def link(stream: str, action: str) -> str:
        r = http("POST", f"{base}/api/v1/streams/{stream}/links", {"action": action}, token=admin)
        assert r.status == 201, r.body
        return r.json()["token"]

    return {"base": base, "admin": admin, "users": users, "link": link}


def _post(env, stream, body=CHROMIUM_OFFER, token=None, ctype="application/sdp"):
    return http("POST", f"{env['base']}/whip/{stream}", raw=body.encode() if isinstance(body, str) else body,
                token=token, headers={"Content-Type": ctype})


def test_http_errors(env) -> None:
    pub = env["link"]("whip3", "publish")
    assert _post(env, "whip3").status == 401
    r = _post(env, "whip3", token=env["link"]("whip3", "read"))
    assert r.status == 403 and r.json()["error"] == "forbidden"
    assert _post(env, "whip3", token=env["link"]("whip2", "publish")).status == 403  # another stream's link
    assert _post(env, "whip3", token=env["users"]["cammy"]).status == 403  # camera user
    assert _post(env, "nosuchstream", token=pub).status == 404
    r = _post(env, "whip3", token=pub, ctype="text/plain")
    assert r.status == 415 and r.json()["error"] == "unsupported_media_type"
    r = _post(env, "whip3", token=pub, body="v=0\r\nthis is not sdp\r\n")
    assert r.status == 400 and "SDP" in r.json()["detail"]
    assert _post(env, "whip3", token=pub, body=CHROMIUM_OFFER + "a=x\r\n" * 40000).status == 413
    r = _post(env, "whip3", token=pub, body=CHROMIUM_OFFER.replace("H264/90000", "H265/90000"))
    assert r.status == 422 and "H.264" in r.json()["detail"]
    r = _post(env, "whip3", token=pub, body=CHROMIUM_OFFER.replace("a=sendonly", "a=recvonly"))
    assert r.status == 422 and "sendonly" in r.json()["detail"]
    r = http("OPTIONS", f"{env['base']}/whip/whip3")
    assert r.status == 204 and r.headers["Accept-Post"] == "application/sdp"
    r = http("OPTIONS", f"{env['base']}/whip/whip3", headers={
        "Origin": "https://phone.example", "Access-Control-Request-Method": "POST"})
    assert r.status == 204 and "Location" in r.headers["Access-Control-Expose-Headers"]
    # A director may publish; the session is a real resource even before media flows.
    r = _post(env, "whip3", token=env["users"]["dora"])
    assert r.status == 201 and r.headers["Content-Type"].startswith("application/sdp")
    loc = r.headers["Location"]
    assert loc.startswith("/whip/whip3/") and r.headers["ETag"].startswith('"')
    assert "a=simulcast:recv high;low" in r.body.decode()
    assert http("DELETE", env["base"] + loc, token=pub).status == 403  # not the link's session
    # A session that has not connected does not hold the stream: a publisher
    # with valid rights replaces it (issue 9 item 9).
    r2 = _post(env, "whip3", token=pub)
    assert r2.status == 201
    assert http("DELETE", env["base"] + loc, token=env["users"]["dora"]).status == 404
    assert http("DELETE", env["base"] + r2.headers["Location"], token=pub).status == 200
    assert http("DELETE", env["base"] + r2.headers["Location"], token=pub).status == 404


def test_srt_publisher_and_whip_exclude_each_other(env, api_server) -> None:
    base, admin = env["base"], env["admin"]
    url = http("GET", f"{base}/api/v1/streams/whip4", token=admin).json()["srt_url"]
    url = re.sub(r"^srt://[^?]+", f"srt://127.0.0.1:{api_server.srt_port}", url)
    proc = ffmpeg_publish(url, seconds=20, size="320x240")
    try:
        s = wait_live(base, "whip4", admin)
        assert s["source"]["protocol"] == "srt"
        r = _post(env, "whip4", token=env["link"]("whip4", "publish"))
        assert r.status == 409 and "srt" in r.json()["detail"] and int(r.headers["Retry-After"]) >= 1
    finally:
        stop_process(proc)


async def _publish_and_watch(env) -> dict:
    import aiohttp
    from aiortc import RTCPeerConnection, RTCSessionDescription

    base, admin = env["base"], env["admin"]
    token = env["link"]("whip1", "publish")
    out: dict = {}
    pc = await _publisher_offer()
    async with aiohttp.ClientSession() as client:
        async with client.post(f"{base}/whip/whip1?token={token}", data=pc.localDescription.sdp,
                               headers={"Content-Type": "application/sdp"}) as resp:
            out["status"] = resp.status
            out["headers"] = resp.headers.copy()  # case-insensitive
            answer = await resp.text()
        assert resp.status == 201, answer
        loc = base + out["headers"]["Location"]
        await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))

        def live() -> dict | None:
            s = http("GET", f"{base}/api/v1/streams/whip1", token=admin).json()
            tracks = {t["id"]: t for t in s.get("tracks", [])}
            return s if s.get("live") and tracks.get("video:high", {}).get("width") else None

        out["live"] = await asyncio.to_thread(wait_until, live, 20, 0.2)
        out["second"] = await asyncio.to_thread(_post, env, "whip1", CHROMIUM_OFFER, admin)
        etag = out["headers"]["ETag"]
        frag = b"a=candidate:1 1 udp 2130706431 127.0.0.1 9 typ host\r\n"
        async with client.patch(loc, data=frag, headers={"Content-Type": "application/trickle-ice-sdpfrag",
                                                         "If-Match": etag, "Authorization": f"Bearer {token}"}) as r:
            out["patch"] = r.status
        async with client.patch(loc, data=frag, headers={"Content-Type": "application/trickle-ice-sdpfrag",
                                                         "If-Match": "*", "Authorization": f"Bearer {token}"}) as r:
            out["restart"] = r.status
        # A WHEP viewer decodes what the WHIP publisher sends, passthrough.
        out["viewer"] = await aiortc_whep_receive(f"{base}/whep/whip1", admin, 3)
        out["viewer_pli"] = await _viewer_sends_pli(f"{base}/whep/whip1", admin)
        async with client.get(loc, headers={"Authorization": f"Bearer {token}"}) as r:
            out["session"] = await r.json()
        out["metrics"] = (await asyncio.to_thread(http, "GET", metrics_url(base))).body.decode()
        async with client.delete(loc, headers={"Authorization": f"Bearer {token}"}) as r:
            out["delete"] = r.status
        out["after"] = http("GET", f"{base}/api/v1/streams/whip1", token=admin).json()
    await pc.close()
    return out


async def _viewer_sends_pli(url: str, token: str) -> int:
    """A WHEP viewer asks for a keyframe (PLI); returns the SSRC it asked about."""
    import aiohttp
    from aiortc import RTCPeerConnection, RTCSessionDescription

    pc = RTCPeerConnection()
    tr = pc.addTransceiver("video", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    async with aiohttp.ClientSession() as client:
        async with client.post(url, data=pc.localDescription.sdp, headers={
                "Content-Type": "application/sdp", "Authorization": f"Bearer {token}"}) as resp:
            answer = await resp.text()
            loc = resp.headers["Location"]
        await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        ssrc = 0
        for _ in range(100):
            sources = tr.receiver.getSynchronizationSources()
            if sources:
                ssrc = sources[0].source
                break
            await asyncio.sleep(0.05)
        # aiortc's receiver API has no public "request keyframe"; its own PLI
        # sender is what it uses after a decode error.
        await tr.receiver._send_rtcp_pli(ssrc)
        await asyncio.sleep(0.3)
        async with client.delete(url.split("/whep/")[0] + loc, headers={"Authorization": f"Bearer {token}"}):
            pass
    await pc.close()
    return ssrc


def test_aiortc_publisher_to_whep_viewer_through_server(env) -> None:
    out = asyncio.run(_publish_and_watch(env))
    h = out["headers"]
    assert h["Location"].startswith("/whip/whip1/") and h["ETag"].startswith('"')
    assert h["Accept-Patch"] == "application/trickle-ice-sdpfrag"
    s = out["live"]
    assert s["source"]["protocol"] == "whip"
    pub = s["source"]["publishers"][0]
    assert pub["whip"]["layers"] and pub["whip"]["stats"]["frames"] > 0
    video = next(t for t in s["tracks"] if t["id"] == "video:high")
    assert (video["codec"], video["width"], video["height"]) == ("h264", 320, 240)
    assert any(t["id"] == "audio" and t["codec"] == "opus" for t in s["tracks"])
    assert out["second"].status == 409 and out["second"].json()["error"] == "conflict"
    assert out["patch"] == 204 and out["restart"] == 422
    v = out["viewer"]
    assert v["status"] == 201 and v["width"] == 320, v
    assert v["video"] >= 30 and v["audio"] >= 50, v  # ≈30 fps and 50 Opus packets/s for 3 s
    assert out["viewer_pli"]
    st = out["session"]["stats"]
    assert st["keyframe_requests"] >= 1 and st["plis_sent"] >= 1  # the viewer's PLI reached the publisher
    assert out["session"]["publishing"] is True
    assert "returnfeed_whip_packets_received" in out["metrics"]
    assert out["delete"] == 200
    assert out["after"]["state"] == "reconnecting" and out["after"]["live"] is False


# --------------------------------------------------------------------------
# Chromium simulcast through the real server
# --------------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"


@pytest.mark.browser
def test_chromium_simulcast_reaches_both_layers(env) -> None:
    if shutil.which(CHROMIUM) is None:
        pytest.skip(f"no system Chromium at {CHROMIUM} (CI installs it)")
    token = env["link"]("whip2", "publish")
    out = asyncio.run(_chromium_publish(env, token))
    layers = {d["rid"]: d for d in out["layers"] if d["kind"] == "video"}
    assert set(layers) == {"high", "low"}, out
    hi, lo = layers["high"], layers["low"]
    assert (hi["layer"], lo["layer"]) == ("high", "low")
    assert hi["width"] == 2 * lo["width"] and hi["height"] == 2 * lo["height"]  # scaleResolutionDownBy 2
    assert hi["frames"] > 10 and lo["frames"] > 10
    assert out["stream_layers"] == ["high", "low"]
    assert out["after"] == "reconnecting"


async def _chromium_publish(env, token: str) -> dict:
    from playwright.async_api import async_playwright

    base, admin = env["base"], env["admin"]
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            "--disable-features=WebRtcHideLocalIpsWithMdns"]
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            page = await browser.new_page()
            await page.goto(f"{base}/static/index.html")  # any page of this origin (secure context: loopback)
            await page.evaluate("""async ([url, token]) => {
              const media = await navigator.mediaDevices.getUserMedia(
                {video: {width: {ideal: 1280}, height: {ideal: 720}}, audio: true});
              const pc = new RTCPeerConnection();
              for (const track of media.getTracks()) {
                if (track.kind === "video") {
                  const t = pc.addTransceiver(track, {direction: "sendonly", sendEncodings: [
                    {rid: "high", maxBitrate: 2500000}, {rid: "low", scaleResolutionDownBy: 2, maxBitrate: 400000}]});
                  const caps = RTCRtpSender.getCapabilities("video").codecs;
                  const rank = (c) => (c.mimeType.toLowerCase() === "video/h264" ? 0 : 1);
                  t.setCodecPreferences([...caps].sort((a, b) => rank(a) - rank(b)));
                } else {
                  pc.addTransceiver(track, {direction: "sendonly"});
                }
              }
              await pc.setLocalDescription(await pc.createOffer());
              await new Promise((r) => { if (pc.iceGatheringState === "complete") r();
                pc.onicegatheringstatechange = () => pc.iceGatheringState === "complete" && r();
                setTimeout(r, 1500); });
              const resp = await fetch(url, {method: "POST", body: pc.localDescription.sdp,
                headers: {"Content-Type": "application/sdp", "Authorization": `Bearer ${token}`}});
              if (resp.status !== 201) throw new Error(`WHIP POST ${resp.status}: ${await resp.text()}`);
              window.whipLocation = resp.headers.get("Location");
              await pc.setRemoteDescription({type: "answer", sdp: await resp.text()});
              window.whipPc = pc;
            }""", [f"{base}/whip/whip2", token])

            def both() -> dict | None:
                s = http("GET", f"{base}/api/v1/streams/whip2", token=admin).json()
                src = s.get("source") or {}
                pubs = src.get("publishers") or [{}]
                layers = (pubs[0].get("whip") or {}).get("layers", [])
                video = [d for d in layers if d["kind"] == "video" and d["frames"] > 10]
                return {"layers": layers, "stream_layers": s["layers"]} if len(video) == 2 else None

            out = await asyncio.to_thread(wait_until, both, 20, 0.25)
            loc = await page.evaluate("window.whipLocation")
            assert http("DELETE", base + loc, token=token).status == 200
            out["after"] = http("GET", f"{base}/api/v1/streams/whip2", token=admin).json()["state"]
            await page.evaluate("window.whipPc.close()")
        finally:
            await browser.close()
    return out
