"""loadtests/whep_client.py: the light WHEP viewer.

Two layers:

* ``RtpCounter`` (sans-I/O) with hand-built RTP headers: continuity,
  wrap-around, reordering, duplicates, backwards jumps, RTX repair,
  frame-end log with abs-send-time, receiver-report arithmetic.
* ``WhepViewer`` against a real aiortc sender peer answering through a tiny
  in-test aiohttp WHEP endpoint on 127.0.0.1: packets are counted, an
  injected gap is seen (and repaired over NACK/RTX when asked), the session
  resource is DELETEd, our RR/REMB/NACK decrypt and parse at the peer, and
  no aiortc decoder is ever constructed (H264Decoder/OpusDecoder patched to
  raise; no ``*-decoder`` thread).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import struct
import threading

import numpy as np
import pytest
from aiohttp import web

from loadtests import whep_client as wc
from media.rtp.packet import RtpPacket
from media.rtp.rtcp import ReceiverReport, Remb, parse_rtcp

VIDEO_PT = 102
RTX_PT = 103
AUDIO_PT = 111


def rtp(seq: int, ts: int = 0, ssrc: int = 0x1234, pt: int = VIDEO_PT, marker: bool = False,
        payload: bytes = b"\x41\x00\x00", ext: tuple = ()) -> bytes:
    p = RtpPacket(payload_type=pt, sequence_number=seq & 0xFFFF, timestamp=ts & 0xFFFFFFFF, ssrc=ssrc,
                  payload=payload, marker=marker)
    if ext:
        p = p.with_extensions(ext)
    return bytes(p)


def counter(**kw) -> wc.RtpCounter:
    return wc.RtpCounter({VIDEO_PT: ("video", 90000), AUDIO_PT: ("audio", 48000), RTX_PT: ("rtx", 90000)},
                         {RTX_PT: VIDEO_PT}, **kw)


# --------------------------------------------------------------------------
# RtpCounter
# --------------------------------------------------------------------------


def test_continuous_sequence_across_wrap() -> None:
    c = counter()
    now = 10**9
    for i, seq in enumerate(range(65530, 65530 + 20)):
        c.on_rtp(rtp(seq, ts=i * 3000), now + i * 1000)
    s = c.ssrcs[0x1234]
    assert (s.packets, s.gaps, s.skipped, s.lost, s.duplicates, s.backwards) == (20, 0, 0, 0, 0, 0)
    assert s.kind == "video"
    assert s.extended_highest == 65530 + 19  # one wrap counted
    assert s.expected == 20
    assert s.bytes == 20 * len(rtp(0))


def test_first_packet_seq_zero() -> None:
    c = counter()
    c.on_rtp(rtp(0), 1)
    c.on_rtp(rtp(1), 2)
    s = c.ssrcs[0x1234]
    assert s.extended_highest == 1 and s.expected == 2 and s.lost == 0


def test_gap_then_late_arrival_and_duplicate() -> None:
    gaps = []
    c = counter(on_gap=lambda st, holes: gaps.append(list(holes)))
    for seq in (100, 101, 104, 102, 105, 105, 101):
        c.on_rtp(rtp(seq), 1)
    s = c.ssrcs[0x1234]
    assert gaps == [[102, 103]]
    assert s.gaps == 1 and s.skipped == 2
    assert s.late == 1  # 102 came late
    assert s.lost == 1  # 103 never came
    assert s.duplicates == 2  # 105 again, 101 again
    assert s.backwards == 0
    assert s.missing == {103}


def test_gap_across_wrap() -> None:
    c = counter()
    for seq in (65534, 1, 2):
        c.on_rtp(rtp(seq), 1)
    s = c.ssrcs[0x1234]
    assert s.skipped == 2 and s.missing == {65535, 0}
    assert s.extended_highest == 65536 + 2


def test_backwards_jump_counted_and_rebased() -> None:
    c = counter()
    for seq in (5000, 5001, 5002, 1000, 1001, 1002):
        c.on_rtp(rtp(seq), 1)
    s = c.ssrcs[0x1234]
    assert s.backwards == 1
    assert s.skipped == 0 and s.duplicates == 0  # counting continued from 1000


def test_rtx_repairs_a_hole() -> None:
    c = counter()
    for seq in (10, 11, 13):
        c.on_rtp(rtp(seq), 1)
    # RFC 4588 §4: RTX payload = original sequence number + original payload.
    c.on_rtp(rtp(500, ssrc=0x9999, pt=RTX_PT, payload=struct.pack("!H", 12) + b"\x41"), 2)
    c.on_rtp(rtp(501, ssrc=0x9999, pt=RTX_PT, payload=struct.pack("!H", 11) + b"\x41"), 3)
    s = c.ssrcs[0x1234]
    r = c.ssrcs[0x9999]
    assert r.kind == "rtx" and r.packets == 2
    assert s.recovered == 1 and s.lost == 0
    assert r.rtx_useless == 1  # 11 had arrived


def test_frame_log_and_abs_send_time() -> None:
    c = counter(abs_send_time_id=3, frame_log=4)
    c.on_rtp(rtp(1, ts=9000), 100)
    c.on_rtp(rtp(2, ts=9000, marker=True, ext=((1, b"0"), (3, b"\x12\x34\x56"))), 200)
    c.on_rtp(rtp(3, ts=12000, marker=True), 300)
    s = c.ssrcs[0x1234]
    assert s.frames == 2
    assert list(s.frame_log) == [(9000, 200, 0x123456, 2), (12000, 300, -1, 3)]
    assert s.last_abs_send_time == 0x123456


def test_unknown_and_invalid() -> None:
    c = counter()
    c.on_rtp(b"\x00" * 12, 1)  # version 0
    c.on_rtp(b"\x80", 1)  # too short
    c.on_rtp(rtp(1, pt=77), 1)
    assert c.invalid == 2
    assert c.ssrcs[0x1234].kind == "unknown"


def test_report_block_interval_loss() -> None:
    c = counter()
    for seq in range(0, 100):
        if seq not in (10, 11, 12, 13, 14, 15, 16, 17, 18, 19):
            c.on_rtp(rtp(seq), 1)
    s = c.ssrcs[0x1234]
    b = s.report_block(lsr=0x11112222, dlsr=65536)
    assert b.fraction_lost == (10 << 8) // 100
    assert b.packets_lost == 10 and b.highest_seq == 99
    assert (b.lsr, b.dlsr) == (0x11112222, 65536)
    for seq in range(100, 200):
        c.on_rtp(rtp(seq), 1)
    b2 = s.report_block(0, 0)
    assert b2.fraction_lost == 0 and b2.packets_lost == 10


def test_jitter_zero_for_perfect_pacing() -> None:
    c = counter()
    for i in range(50):
        c.on_rtp(rtp(i, ts=i * 3000), 1_000_000_000 + i * 33_333_333)
    assert c.ssrcs[0x1234].jitter < 1.0


def test_percentile() -> None:
    assert wc.percentile([], 50) is None
    assert wc.percentile([3, 1, 2], 50) == 2
    assert wc.percentile(range(1, 101), 99) == 99
    assert wc.percentile(range(1, 101), 100) == 100


def test_internals_present() -> None:
    wc.check_internals()


def test_prepare_aiortc_offers_profiles_idempotent() -> None:
    from aiortc.codecs import CODECS

    wc.prepare_aiortc()
    wc.prepare_aiortc()
    plids = [c.parameters.get("profile-level-id") for c in CODECS["video"] if c.mimeType.lower() == "video/h264"]
    for p in wc.H264_PROFILES:
        assert plids.count(p) == 1


# --------------------------------------------------------------------------
# WhepViewer against an aiortc sender peer
# --------------------------------------------------------------------------


class PatternTrack:
    """Builds a moving 160x120 test pattern (aiortc encodes it: the *sender* encodes)."""

    @staticmethod
    def make():
        from aiortc import VideoStreamTrack
        from av import VideoFrame

        class _Track(VideoStreamTrack):
            def __init__(self) -> None:
                super().__init__()
                self.n = 0

            async def recv(self):
                pts, time_base = await self.next_timestamp()
                img = np.zeros((120, 160, 3), np.uint8)
                img[:, (self.n * 4) % 160:(self.n * 4) % 160 + 16] = 255
                self.n += 1
                frame = VideoFrame.from_ndarray(img, format="rgb24")
                frame.pts, frame.time_base = pts, time_base
                return frame

        return _Track()


class SenderPeer:
    """A tiny WHEP endpoint: each POST gets an aiortc sendonly peer (video+audio).

    ``drop_video``: video RTP packet indices (0-based, first transmission
    only) the sender's DTLS transport silently drops — an injected gap.
    Records the RTCP it receives (parsed with media.rtp.rtcp) and DELETEs.
    """

    def __init__(self, drop_video: set[int] | None = None) -> None:
        self.drop_video = set(drop_video or ())
        self.pcs: dict[str, object] = {}
        self.deleted: list[str] = []
        self.rtcp_types: dict[str, int] = {}
        self.nacked: list[int] = []
        self.auth_seen: list[str | None] = []
        self.queries: list[dict] = []
        self.delete_queries: list[dict] = []
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/whep/{stream}", self.post)
        app.router.add_delete("/whep/{stream}/{sid}", self.delete)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        for pc in list(self.pcs.values()):
            await pc.close()
        if self._runner is not None:
            await self._runner.cleanup()

    def url(self, stream: str = "cam1") -> str:
        return f"http://127.0.0.1:{self.port}/whep/{stream}"

    async def post(self, request: web.Request) -> web.Response:
        from aiortc import AudioStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription

        self.auth_seen.append(request.headers.get("Authorization"))
        self.queries.append(dict(request.query))
        if request.content_type != "application/sdp":
            return web.Response(status=415)
        if request.match_info["stream"] == "offline":
            return web.Response(status=409, headers={"Retry-After": "1"}, text="not live")
        offer = await request.text()
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTrack(PatternTrack.make())
        pc.addTrack(AudioStreamTrack())
        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        video_sender = next(t.sender for t in pc.getTransceivers() if t.kind == "video")
        self._tap(video_sender)
        sid = str(next(self._ids))
        self.pcs[sid] = pc
        return web.Response(status=201, text=pc.localDescription.sdp, content_type="application/sdp",
                            headers={"Location": f"/whep/{request.match_info['stream']}/{sid}"})

    def _tap(self, sender) -> None:
        dtls = sender.transport
        orig_send = dtls._send_rtp
        orig_rtcp = dtls._handle_rtcp_data
        state = {"n": 0, "dropped": set()}
        video_ssrc = sender._ssrc

        async def send(data: bytes) -> None:
            if 192 <= data[1] <= 223 or struct.unpack_from("!I", data, 8)[0] != video_ssrc:
                return await orig_send(data)
            seq = struct.unpack_from("!H", data, 2)[0]
            if seq not in state["dropped"]:
                i = state["n"]
                state["n"] += 1
                if i in self.drop_video:
                    state["dropped"].add(seq)
                    return None
            return await orig_send(data)

        async def on_rtcp(data: bytes) -> None:
            for p in parse_rtcp(data):
                name = type(p).__name__
                self.rtcp_types[name] = self.rtcp_types.get(name, 0) + 1
                if name == "Nack":
                    self.nacked.extend(p.lost)
                if isinstance(p, ReceiverReport):
                    self.rtcp_types.setdefault("rr_blocks", 0)
                    self.rtcp_types["rr_blocks"] += len(p.reports)
                if isinstance(p, Remb):
                    self.rtcp_types["remb_bps"] = p.bitrate
            await orig_rtcp(data)

        dtls._send_rtp = send
        dtls._handle_rtcp_data = on_rtcp

    async def delete(self, request: web.Request) -> web.Response:
        sid = request.match_info["sid"]
        self.delete_queries.append(dict(request.query))
        pc = self.pcs.pop(sid, None)
        if pc is None:
            return web.Response(status=404)
        self.deleted.append(sid)
        await pc.close()
        return web.Response(status=200)


@pytest.fixture
def no_decoders(monkeypatch):
    """Any attempt to construct an aiortc decoder fails the test loudly."""
    from aiortc.codecs import h264, opus

    made = []

    def boom(self, *a, **k):
        made.append(type(self).__name__)
        raise AssertionError(f"{type(self).__name__} instantiated: the light viewer must not decode")

    monkeypatch.setattr(h264.H264Decoder, "__init__", boom)
    monkeypatch.setattr(opus.OpusDecoder, "__init__", boom)
    yield made


@pytest.fixture
async def peer():
    wc.use_loopback_candidates(True)
    p = SenderPeer()
    await p.start()
    try:
        yield p
    finally:
        await p.stop()
        wc.use_loopback_candidates(False)


def _decoder_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.endswith("-decoder")]


async def _wait_for(pred, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        if loop.time() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


@pytest.mark.timeout(60)
async def test_viewer_counts_without_decoding(peer: SenderPeer, no_decoders) -> None:
    async with wc.WhepViewer(peer.url(), token="tok123", layer="low", rtcp_interval=0.3,
                             remb_bps=3_000_000, frame_log=1000) as v:
        assert v.connected
        await _wait_for(lambda: (v.stats.video is not None and v.stats.video.frames >= 40
                                 and v.stats.audio is not None and v.stats.rr_sent >= 2), 20)
        assert not _decoder_threads()
        video, audio = v.stats.video, v.stats.audio
    st = v.stats
    assert no_decoders == []
    assert peer.auth_seen == ["Bearer tok123"]
    assert peer.queries == [{"layer": "low"}]
    assert st.status == 201 and st.location == peer.url() + "/1"
    assert st.delete_status == 200 and peer.deleted == ["1"]
    assert st.codecs["video"] == "H264 42e01f" and st.codecs["audio"].lower() == "opus"
    assert video.packets >= 40 and video.bytes > video.packets * 12
    assert audio.packets >= 50
    assert (video.skipped, video.duplicates, video.backwards) == (0, 0, 0)
    assert st.srtp_auth == st.srtp_replay == st.srtp_replay_old == 0
    assert st.queued_packets <= 5  # (almost) everything took the fast path
    assert st.setup_ms is not None and st.ice_dtls_ms is not None and st.first_packet_ms is not None
    # frame ends: timestamps advance, arrival times increase, abs-send-time present
    log = list(video.frame_log)
    assert len(log) == video.frames
    assert all(b[1] >= a[1] for a, b in zip(log, log[1:]))
    assert all(((b[0] - a[0]) & 0xFFFFFFFF) < 0x80000000 for a, b in zip(log, log[1:]))
    assert any(e[2] >= 0 for e in log)
    # our RTCP decrypted and parsed at the peer; aiortc's sender sent SRs back
    assert peer.rtcp_types.get("ReceiverReport", 0) >= 2 and peer.rtcp_types["rr_blocks"] >= 2
    assert peer.rtcp_types.get("Remb", 0) >= 2 and peer.rtcp_types["remb_bps"] == 3_000_000
    assert not _decoder_threads()


@pytest.mark.timeout(60)
async def test_injected_gap_is_seen(peer: SenderPeer, no_decoders) -> None:
    peer.drop_video = {20, 21, 35}
    async with wc.WhepViewer(peer.url()) as v:
        await _wait_for(lambda: v.stats.video is not None and v.stats.video.packets >= 60, 20)
        video = v.stats.video
        assert video.gaps == 2 and video.skipped == 3 and video.lost == 3
        assert video.duplicates == 0 and video.backwards == 0
        assert v.stats.nack_sent == 0
    assert no_decoders == []


@pytest.mark.timeout(60)
async def test_nack_gets_rtx_repair(peer: SenderPeer, no_decoders) -> None:
    peer.drop_video = {25}
    async with wc.WhepViewer(peer.url(), nack=True) as v:
        await _wait_for(lambda: v.stats.video is not None and v.stats.video.packets >= 50
                        and v.stats.video.recovered >= 1, 20)
        video = v.stats.video
        assert video.skipped == 1 and video.recovered == 1 and video.lost == 0
        assert v.stats.nack_sent == 1
        rtx = [s for s in v.stats.ssrcs.values() if s.kind == "rtx"]
        assert len(rtx) == 1 and rtx[0].packets >= 1
    assert len(peer.nacked) == 1
    assert no_decoders == []


@pytest.mark.timeout(60)
async def test_link_token_carried_to_delete(peer: SenderPeer) -> None:
    async with wc.WhepViewer(peer.url() + "?token=abc", layer="high") as v:
        assert v.stats.location == peer.url() + "/1?token=abc"
    assert peer.queries == [{"token": "abc", "layer": "high"}]
    assert peer.delete_queries == [{"token": "abc"}] and v.stats.delete_status == 200


@pytest.mark.timeout(30)
async def test_not_live_is_a_clear_error(peer: SenderPeer) -> None:
    v = wc.WhepViewer(peer.url("offline"), connect_timeout=5)
    with pytest.raises(wc.WhepError) as err:
        async with v:
            pass
    assert err.value.status == 409 and err.value.retry_after == 1.0
    assert "not live" in err.value.detail


@pytest.mark.timeout(30)
async def test_not_live_retry_gives_up_at_deadline(peer: SenderPeer) -> None:
    v = wc.WhepViewer(peer.url("offline"), connect_timeout=3, retry_not_live=2.5)
    loop = asyncio.get_running_loop()
    t = loop.time()
    with pytest.raises(wc.WhepError) as err:
        async with v:
            pass
    assert err.value.status == 409
    assert 1.5 <= loop.time() - t < 4.0
    assert len(peer.queries) >= 2


def test_url_helpers() -> None:
    # an existing ?token= (signed link) is kept and ?layer= appended
    assert wc._with_query("http://h/whep/a?token=x", layer="low") == "http://h/whep/a?token=x&layer=low"
    assert wc._parse_retry_after("2") == 2.0 and wc._parse_retry_after("soon") is None


@pytest.mark.timeout(60)
@pytest.mark.parametrize("every", [0, 3])
async def test_sampled_srtp_verification_counts_the_same(peer: SenderPeer, no_decoders, every: int) -> None:
    peer.drop_video = {30}
    async with wc.WhepViewer(peer.url(), srtp_verify_every=every) as v:
        await _wait_for(lambda: v.stats.video is not None and v.stats.video.packets >= 50, 20)
        video = v.stats.video
        assert video.skipped == 1 and video.lost == 1
        assert video.duplicates == 0 and video.backwards == 0
        # bytes exclude the SRTP trailer: same per-packet size as the plain RTP would give
        assert video.bytes > 12 * video.packets
    assert v.stats.srtp_auth == v.stats.srtp_replay == 0


def test_trailer_left_out_of_bytes() -> None:
    c = counter()
    pkt = rtp(7, payload=b"\x41" * 100)
    c.on_rtp(pkt + b"\xee" * 10, 1, trailer=10)  # an SRTP packet read in the clear
    assert c.ssrcs[0x1234].bytes == len(pkt)


# --------------------------------------------------------------------------
# latency probe helpers (loadtests/latency_probe.py)
# --------------------------------------------------------------------------


def test_probe_ts_muxer_round_trips_through_our_demuxer() -> None:
    from loadtests import latency_probe as lp
    from media.mpegts.demux import TsDemuxer
    from media.mpegts.events import AccessUnit

    sps, pps = b"\x00\x00\x00\x01\x67\x42\xc0\x1e\xda\x02\x80", b"\x00\x00\x00\x01\x68\xce\x3c\x80"
    idr = sps + pps + b"\x00\x00\x00\x01\x65" + bytes(range(1, 200)) * 20
    p = b"\x00\x00\x00\x01\x41" + bytes(range(1, 250)) * 3
    mux = lp.TsMuxer()
    demux = TsDemuxer()
    got = []
    pts0 = (1 << 33) - 6000  # crosses the 33-bit wrap
    for i, au in enumerate([idr, p, p, idr, p]):
        data = mux.frame(au, pts0 + i * 3000, lp.is_idr(au), i / 30)
        assert len(data) % 188 == 0
        for off in range(0, len(data), lp.MESSAGE):
            for ev in demux.feed(data[off:off + lp.MESSAGE], i / 30, end_of_message=True):
                if isinstance(ev, AccessUnit):
                    got.append(ev)
    got += [ev for ev in demux.flush(1.0) if isinstance(ev, AccessUnit)]
    assert [g.pts for g in got] == [(pts0 + i * 3000) & lp.PTS_MASK for i in range(5)]
    assert [g.keyframe for g in got] == [True, False, False, True, False]
    assert got[1].data.endswith(p[4:]) and demux.counters().cc_error == 0


def test_probe_offset_and_latency_matching() -> None:
    from loadtests import latency_probe as lp

    rng = random.Random(3)
    pts, sent = 123456, {}
    for i in range(300):
        sent[pts] = 1_000_000_000 + i * 33_333_333
        pts += 3000 + rng.randint(-3, 3)
    offset = 0x9ABCDEF0
    arrivals = {((p + offset) & 0xFFFFFFFF): t + 120_000_000 + 2_000_000 for p, t in sent.items()}
    order = sorted(arrivals, key=arrivals.get)
    found, votes = lp.find_offset(list(sent), order)
    assert found == offset and votes >= 40
    st = lp.latency_stats(sent, arrivals, (0, 1 << 62), 120_000_000, offset)
    assert st["frames_matched"] == 300 and st["frames_missing"] == 0
    assert abs(st["added_ms"]["p50"] - 2.0) < 1e-6 and abs(st["added_ms"]["max"] - 2.0) < 1e-6


def test_probe_srt_url_and_histogram() -> None:
    from loadtests import latency_probe as lp

    t = lp.SrtTarget.parse("srt://127.0.0.1:8890?streamid=%23%21%3A%3Ar%3Dcam1%2Cm%3Dpublish&passphrase=abcdefghijk"
                           "&pbkeylen=16&mode=caller")
    assert (t.host, t.port, t.streamid, t.passphrase, t.pbkeylen) == ("127.0.0.1", 8890, "#!::r=cam1,m=publish",
                                                                     "abcdefghijk", 16)
    h = lp.histogram_window({'x_bucket{le="0.001"}': 10, 'x_bucket{le="+Inf"}': 10},
                            {'x_bucket{le="0.001"}': 60, 'x_bucket{le="+Inf"}': 110}, "x")
    assert h == {"frames": 100, "p50_le_ms": 1.0, "p90_le_ms": "> 1", "p99_le_ms": "> 1"}


# --------------------------------------------------------------------------
# browser_rtcp: what the viewer sends back, like Chromium (no network)
# --------------------------------------------------------------------------


def _browser_viewer() -> tuple[wc.WhepViewer, list]:
    v = wc.WhepViewer("http://127.0.0.1:9/whep/x", browser_rtcp=True, remb_bps=10_000_000)
    c = v.stats.counter
    c.payload_types = {VIDEO_PT: ("video", 90000), AUDIO_PT: ("audio", 48000)}
    c.on_gap = v._on_gap
    sent: list = []
    v._send_rtcp = lambda packet: sent.append(parse_rtcp(packet)) or True  # type: ignore[method-assign]
    return v, sent


def test_browser_rtcp_reports_per_track_with_remb_at_the_received_rate() -> None:
    v, sent = _browser_viewer()
    c = v.stats.counter
    t = 1_000_000_000
    for i in range(100):
        c.on_rtp(rtp(i, ssrc=0xA1, payload=b"\x41" + b"\x00" * 1199), t)
        c.on_rtp(rtp(i, ssrc=0xB2, pt=AUDIO_PT, payload=b"\x00" * 99), t)
    v.send_reports("video")
    (rr, remb), = sent
    assert isinstance(rr, ReceiverReport) and [b.ssrc for b in rr.reports] == [0xA1]
    assert isinstance(remb, Remb) and remb.bitrate == 10_000_000  # nothing measured yet: the configured value
    v._remb_mark = (v.stats.video.bytes - 150_000, v._remb_mark[1] - 1_000_000_000)  # 150 kB in the last second
    v.send_reports("video")
    remb = sent[-1][1]
    assert abs(remb.bitrate - 150_000 * 8 * 1.05) < 0.01 * remb.bitrate  # near what it receives, +5 %
    v.send_reports("audio")
    (rr,), = sent[-1:]
    assert [b.ssrc for b in rr.reports] == [0xB2]  # audio alone, no REMB


def test_browser_rtcp_nacks_a_gap_again_while_open_then_asks_for_a_picture() -> None:
    from media.rtp.rtcp import Nack, Pli

    v, sent = _browser_viewer()
    c = v.stats.counter
    t = 5_000_000_000
    c.on_rtp(rtp(10, ssrc=0xA1), t)
    c.on_rtp(rtp(13, ssrc=0xA1), t)  # 11 and 12 missing: NACKed at once
    assert isinstance(sent[-1][0], Nack) and sent[-1][0].lost == (11, 12)
    c.on_rtp(rtp(11, ssrc=0xA1), t + 10_000_000)  # 11 repaired
    v._repair_requests(t + 50_000_000)
    assert len(sent) == 1  # too early to ask again
    v._repair_requests(t + 200_000_000)
    assert sent[-1][0].lost == (12,)  # still open past nack_retry: again, 11 no longer
    v._repair_requests(t + 1_200_000_000)
    assert isinstance(sent[-1][0], Pli) and v.stats.pli_sent == 1
    v._repair_requests(t + 1_300_000_000)
    assert v.stats.pli_sent == 1 and not v._holes  # one PLI, the hole forgotten
