"""SRT ingest glue (server/media_service.py): the demuxer's QUIET deadline is
driven by an event-loop timer, and frames are timed from their first byte."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from media.stream import Frame
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


def capture(name: str) -> list[tuple[float, bytes]]:
    data = (FIXTURES / f"{name}.ts").read_bytes()
    out = []
    pos = 0
    for line in (FIXTURES / f"{name}.msgs").read_text().split("\n"):
        if line:
            t, n = line.split()
            out.append((float(t), data[pos : pos + int(n)]))
            pos += int(n)
    return out


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
    msgs = capture("h264_udp_exact_full_message")
    exact = last_video_packet_of_full_message(msgs)

    async def run() -> tuple[list[tuple[int | None, int, Frame]], MediaService]:
        service = MediaService(Settings(), None, None)
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
            service._frame_sent(frame, time.monotonic())
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
