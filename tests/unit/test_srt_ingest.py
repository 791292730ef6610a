"""SRT ingest glue (server/media_service.py): the demuxer's QUIET deadline is
driven by an event-loop timer, and frames are timed from their first byte."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from helpers import udp_capture
from media.stream import Frame
from media.webrtc.fanout import PacketsEvent
from server.config import Settings
from server.media_service import MediaService, SrtIngest

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "ts"


class FakeConnection:
    """What SrtIngest uses of media.srt.listener.SrtConnection."""

    peer = ("192.0.2.7", 5000)
    raw_streamid = "publish:cam1"
    socket_id = 7
    bytes_received = 0

    def __init__(self) -> None:
        self.on_data = None
        self.on_close = None

    def receive_pending(self) -> bool:
        return False  # everything received has been handed to on_data


def last_video_packet_of_full_message(msgs: list[tuple[float, bytes]]) -> int:
    """Index of the full message whose last packet ends a video PES exactly
    (no adaptation field) and is followed by the next PES start."""
    for i, (_, msg) in enumerate(msgs[:-1]):
        last = msg[-188:]
        nxt = msgs[i + 1][1]
        video_starts = [k for k in range(0, len(nxt), 188)
                        if ((nxt[k + 1] & 0x1F) << 8 | nxt[k + 2]) == 0x100]
        if (len(msg) == 1316 and ((last[1] & 0x1F) << 8 | last[2]) == 0x100 and last[3] & 0x30 == 0x10
                and video_starts and nxt[video_starts[0] + 1] & 0x40):
            return i
    raise AssertionError("no exactly full frame end in the capture")


def test_quiet_timer_releases_a_frame_before_the_next_one_arrives() -> None:
    msgs = udp_capture("h264_udp_exact_full_message")
    exact = last_video_packet_of_full_message(msgs)

    async def run() -> tuple[list[tuple[int | None, int, Frame]], MediaService]:
        # The server process's own fan-out reports frames sent (egress
        # workers report theirs in their figures).
        service = MediaService(Settings(webrtc={"egress_workers": 0}), None, None)
        stream = service.hub.get_or_create("cam1")
        feeding: int | None = None  # the message being fed, None between feeds
        fed = -1  # the last message fed
        delivered: list[tuple[int | None, int, Frame]] = []

        def on_frames(reader) -> None:
            delivered.extend((feeding, fed, f) for f in reader.drain() if isinstance(f, Frame) and f.kind == "video")

        stream.subscribe(maxsize=1000, callback=on_frames)
        conn = FakeConnection()
        SrtIngest(service, conn, stream, None)
        t0 = time.monotonic()
        for i, (t, msg) in enumerate(msgs):
            await asyncio.sleep(max(0.0, t0 + t - time.monotonic()))
            feeding = i
            conn.on_data([msg], time.monotonic())
            feeding, fed = None, i
        await asyncio.sleep(0.05)
        for _, _, frame in delivered:  # as the WHEP fan-out reports each frame sent
            sent = PacketsEvent("cam1", frame.layer or "high", (), None, frame.arrival,
                                service.frame_first_byte(frame))
            service._frame_sent(sent, time.monotonic())
        conn.on_close("closed")
        return delivered, service

    delivered, service = asyncio.run(run())
    # Exactly one frame came out between feeds: the one ending in message
    # `exact`, released by the timer before the next message (which starts
    # the next frame) was fed. Every other frame came out with its data.
    between = [(fed, f) for feeding, fed, f in delivered if feeding is None]
    assert [fed for fed, _ in between] == [exact]
    # every delivered frame was timed from its first byte as well, never
    # less than from its completion; the held one 10 ms more
    first = {s.name: s.value for m in service.first_byte_latency.collect() for s in m.samples}
    complete = {s.name: s.value for m in service.forwarding_latency.collect() for s in m.samples}
    name = "returnfeed_forwarding_latency_from_first_byte_seconds"
    assert first[f"{name}_count"] == len(delivered) == complete["returnfeed_forwarding_latency_seconds_count"]
    assert first[f"{name}_sum"] >= complete["returnfeed_forwarding_latency_seconds_sum"] + 0.0099


def _video_pid(data: bytes) -> int:
    from media.mpegts.demux import TsDemuxer
    from media.mpegts.events import ProgramChanged

    for ev in TsDemuxer().feed(data[: 188 * 200], 0.0):
        if isinstance(ev, ProgramChanged):
            return next(t.pid for t in ev.pmt.tracks if t.kind == "video")
    raise AssertionError("no PMT in the capture")


def test_lost_video_packets_restart_the_layer_at_the_next_idr() -> None:
    """Every demux event reaches the stream: a continuity error on the video
    PID (a packet lost on the way) marks a discontinuity to every reader, and
    the next video frame it gets is a keyframe — never the broken frames in
    between."""
    from media.stream import Discontinuity

    data = (FIXTURES / "h264_aac_zerolatency.ts").read_bytes()
    pid = _video_pid(data)
    packets = [data[i : i + 188] for i in range(0, len(data) - len(data) % 188, 188)]
    video = [i for i, p in enumerate(packets) if ((p[1] & 0x1F) << 8 | p[2]) == pid]
    # Lose one video packet in the middle of the first GOP, away from a PES start.
    lost = next(i for i in video[len(video) // 4 :] if not packets[i][1] & 0x40 and not packets[i + 1][1] & 0x40)
    damaged = packets[:lost] + packets[lost + 1 :]

    async def run() -> tuple[list, MediaService]:
        service = MediaService(Settings(), None, None)
        stream = service.hub.get_or_create("cam1")
        got: list = []
        stream.subscribe(maxsize=10_000, callback=lambda reader: got.extend(reader.drain()))
        conn = FakeConnection()
        SrtIngest(service, conn, stream, None)
        now = time.monotonic()
        for i in range(0, len(damaged), 7):
            conn.on_data([b"".join(damaged[i : i + 7])], now)
            now += 0.001
        await asyncio.sleep(0)
        return got, service

    got, service = asyncio.run(run())
    assert service.ingest.discontinuities >= 1
    markers = [i for i, item in enumerate(got) if isinstance(item, Discontinuity) and item.reason == "source"]
    assert markers, "the continuity error reached the stream's readers"
    after = [item for item in got[markers[0] + 1 :] if isinstance(item, Frame) and item.kind == "video"]
    assert after and after[0].keyframe, "video resumes at an IDR"
    before = [item for item in got[: markers[0]] if isinstance(item, Frame) and item.kind == "video"]
    pes_starts = sum(1 for i in video if packets[i][1] & 0x40)
    assert before and len(before) + len(after) < pes_starts - 1, "the frames up to the IDR were withheld"
