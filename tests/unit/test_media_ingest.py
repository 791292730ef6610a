"""The MPEG-TS ingest core (media/ingest/ts.py) driven with captured and
crafted TS bytes and an explicit clock, and the SRT sessions around it
(media/srt/ingest.py, media/srt/read.py) with a stand-in connection."""

from __future__ import annotations

import asyncio
import time
import random
import typing
from pathlib import Path

import pytest

from helpers import udp_capture
from media.ingest.ts import IngestCounters, TsIngest
from media.mpegts import Pmt, PmtTrack
from media.mpegts.demux import TsDemuxer
from media.mpegts.events import (
    AccessUnit,
    Completion,
    DemuxError,
    DemuxEvent,
    DiscontinuityReason,
    ErrorKind,
    ProgramChanged,
    TsDiscontinuity,
)
from media.srt.ingest import SrtIngestSession
from media.srt.read import SrtReadSession
from media.stream import Discontinuity, Frame, SourceInfo, StreamHub

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "ts"
TS = 188


def load(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def packets_of(data: bytes) -> list[bytes]:
    return [data[i : i + TS] for i in range(0, len(data) - len(data) % TS, TS)]


def messages_of(packets: list[bytes], per_message: int = 7) -> list[bytes]:
    """SRT-sized messages (7 × 188 = 1316 bytes, as FFmpeg's SRT output)."""
    return [b"".join(packets[i : i + per_message]) for i in range(0, len(packets), per_message)]


def pid_of(packet: bytes) -> int:
    return (packet[1] & 0x1F) << 8 | packet[2]


def program_of(data: bytes) -> Pmt:
    for ev in TsDemuxer().feed(data[: TS * 200], 0.0):
        if isinstance(ev, ProgramChanged):
            return ev.pmt
    raise AssertionError("no PMT in the capture")


class Harness:
    """A stream with one publisher, one frame reader and one TS reader."""

    def __init__(self, *, transcode: bool = False) -> None:
        self.stream = StreamHub().get_or_create("cam1")
        self.publisher = self.stream.attach_publisher(SourceInfo("srt", "192.0.2.7:5000"), now=0.0)
        self.items: list[Frame | Discontinuity] = []
        self.reader = self.stream.subscribe(maxsize=100_000, callback=lambda r: self.items.extend(r.drain()))
        self.ts = self.stream.subscribe_ts(100_000)
        self.aac: list[AccessUnit] = []
        # (unit, video frames the reader had when the hook ran)
        self.video_seen: list[tuple[AccessUnit, int]] = []
        self.counters = IngestCounters()
        self.ingest = TsIngest(self.publisher, self.counters, transcode=self.aac.append if transcode else None,
                               on_video=lambda unit: self.video_seen.append((unit, len(self.video()))))

    def video(self) -> list[Frame]:
        return [i for i in self.items if isinstance(i, Frame) and i.kind == "video"]

    def audio(self) -> list[Frame]:
        return [i for i in self.items if isinstance(i, Frame) and i.kind == "audio"]

    def feed(self, messages: list[bytes], start: float = 0.0, step: float = 0.001) -> float:
        now = start
        for msg in messages:
            self.ingest.receive_messages([msg], now)
            now += step
        return now


def test_program_video_and_aac_reach_the_stream() -> None:
    """PAT/PMT map the PIDs (video layer, RAP scanner), H.264 access units
    start at an IDR, AAC goes to the transcoder hand-off, never to the
    stream, and the original bytes go to TS readers unchanged."""
    data = load("h264_aac_zerolatency.ts")
    pmt = program_of(data)
    video_pid = next(t.pid for t in pmt.tracks if t.kind == "video")
    audio_pid = next(t.pid for t in pmt.tracks if t.kind == "audio")
    h = Harness(transcode=True)
    h.feed(messages_of(packets_of(data)))

    assert h.publisher.layers == {video_pid: "high"}
    assert (h.ingest.rap.pmt_pid, h.ingest.rap.video_pids) == (pmt.pmt_pid, frozenset({video_pid}))
    video = h.video()
    assert len(video) > 10 and video[0].keyframe and video[0].codec == "h264"
    assert {f.layer for f in video} == {"high"}
    # the hook saw every video unit before any reader had it
    assert [unit.data for unit, _ in h.video_seen] == [f.data for f in video]
    assert [before for _, before in h.video_seen] == list(range(len(video)))
    assert h.aac and {u.codec for u in h.aac} == {"aac"} and {u.pid for u in h.aac} == {audio_pid}
    assert h.audio() == []
    assert h.counters.access_units == len(video) + len(h.aac)
    assert (h.counters.bytes, h.counters.demux_errors, h.counters.discontinuities) == (len(data) - len(data) % TS, 0, 0)
    assert b"".join(h.ts.drain()) == data[: len(data) - len(data) % TS]
    assert h.ingest.ts_counters.cc_error == 0 and h.ingest.ts_counters.access_units == h.counters.access_units


def test_aac_without_a_transcoder_is_published_as_it_is() -> None:
    data = load("h264_aac_zerolatency.ts")
    h = Harness(transcode=False)
    h.feed(messages_of(packets_of(data)))
    audio = h.audio()
    assert audio and {f.codec for f in audio} == {"aac"}
    assert h.counters.access_units == len(h.video()) + len(audio)


def test_lost_video_packet_is_a_discontinuity_and_video_restarts_at_an_idr() -> None:
    """A continuity-counter break on the video PID (TR 101 290 1.4): the
    readers get a 'source' marker for the layer and the next video frame
    they get is a keyframe."""
    data = load("h264_aac_zerolatency.ts")
    video_pid = next(t.pid for t in program_of(data).tracks if t.kind == "video")
    packets = packets_of(data)
    video = [i for i, p in enumerate(packets) if pid_of(p) == video_pid]
    lost = next(i for i in video[len(video) // 4 :] if not packets[i][1] & 0x40 and not packets[i + 1][1] & 0x40)
    h = Harness()
    h.feed(messages_of(packets[:lost] + packets[lost + 1 :]))

    assert h.counters.discontinuities >= 1 and h.ingest.ts_counters.cc_error >= 1
    markers = [i for i, item in enumerate(h.items) if isinstance(item, Discontinuity) and item.reason == "source"]
    assert markers and h.items[markers[0]].layer == "high"
    after = [i for i in h.items[markers[0] + 1 :] if isinstance(i, Frame) and i.kind == "video"]
    assert after and after[0].keyframe


def test_quiet_period_releases_a_frame_through_the_timer() -> None:
    """A frame whose last packet exactly fills a full message has no end
    marker: the ingest asks for a timer, and handle_timer at that time
    releases the frame, before the next message (which starts the next
    frame) arrives. An early call releases nothing."""
    msgs = udp_capture("h264_udp_exact_full_message")
    h = Harness()
    released_by_timer: list[tuple[int, AccessUnit]] = []
    early_calls = 0
    for i, (t, msg) in enumerate(msgs):
        deadline = h.ingest.get_timer()
        if deadline is not None and deadline <= t:
            seen = len(h.video_seen)
            h.ingest.handle_timer(deadline - 0.001)
            early_calls += 1
            assert len(h.video_seen) == seen, "released before its deadline"
            h.ingest.handle_timer(deadline)
            released_by_timer.extend((i - 1, unit) for unit, _ in h.video_seen[seen:])
        h.ingest.receive_messages([msg], t)
        # The deadline follows the last data: quiet_gap after this message.
        if (deadline := h.ingest.get_timer()) is not None:
            assert deadline == pytest.approx(t + 0.010)
    assert early_calls >= 1
    assert len(released_by_timer) == 1
    index, unit = released_by_timer[0]
    assert unit.completion == Completion.QUIET and unit.arrival == pytest.approx(msgs[index][0] + 0.010)
    assert len(msgs[index][1]) == 1316 and unit.arrival < msgs[index + 1][0]
    assert h.ingest.ts_counters.completed_quiet == 1


def test_garbage_is_counted_and_video_resumes_at_an_idr() -> None:
    """Bytes that are not TS (before the stream and in its middle) never
    raise: the demuxer resyncs, the lost sync is a discontinuity on every
    PID, and the readers' video restarts at a keyframe."""
    rng = random.Random(11)

    def garbage(n: int) -> bytes:
        return bytes(b if b != 0x47 else 0x46 for b in rng.randbytes(n))

    data = load("h264_aac_zerolatency.ts")
    msgs = messages_of(packets_of(data))
    half = len(msgs) // 2
    h = Harness()
    now = h.feed([garbage(1316) for _ in range(5)])
    assert h.items == [] and h.ingest.ts_counters.resync_skipped_bytes > 0
    now = h.feed(msgs[:half], now)
    frames_before = len(h.video())
    assert frames_before > 0
    now = h.feed([garbage(1316) for _ in range(3)], now)
    h.feed(msgs[half:], now)

    assert h.ingest.ts_counters.ts_sync_loss >= 1 and h.counters.discontinuities >= 1
    total = sum(len(m) for m in msgs) + 8 * 1316
    assert h.counters.bytes == total and h.counters.messages == len(msgs) + 8
    markers = [i for i, item in enumerate(h.items) if isinstance(item, Discontinuity) and item.reason == "source"]
    assert markers
    after = [i for i in h.items[markers[-1] + 1 :] if isinstance(i, Frame) and i.kind == "video"]
    assert after and after[0].keyframe


def _event(kind: type, pmt: Pmt) -> DemuxEvent:
    return {
        ProgramChanged: ProgramChanged(pmt, None, 0.0),
        AccessUnit: AccessUnit(0x100, "h264", 0, 0, True, b"\x00\x00\x00\x01\x65\x88", 0.0),
        TsDiscontinuity: TsDiscontinuity(None, DiscontinuityReason.SYNC_LOSS, 0.0),
        DemuxError: DemuxError(0x100, ErrorKind.PES_HEADER, "crafted", 0.0),
    }[kind]


@pytest.mark.parametrize("kind", typing.get_args(DemuxEvent), ids=lambda k: k.__name__)
def test_every_demux_event_kind_has_a_rule(kind: type) -> None:
    """Each kind in DemuxEvent is handled (a kind added there without a rule
    in TsIngest fails here: _event has no instance of it either)."""
    pmt = Pmt(program_number=1, version=0, pcr_pid=0x100, tracks=(PmtTrack(0x100, 0x1B, "h264", ()),), pmt_pid=0x1000)
    h = Harness()
    before = IngestCounters()
    h.ingest._dispatch([_event(kind, pmt)])
    assert h.counters != before or kind is ProgramChanged
    if kind is ProgramChanged:
        assert h.publisher.layers == {0x100: "high"} and h.ingest.rap.pmt_pid == 0x1000


def test_unknown_event_kind_is_a_programming_error() -> None:
    h = Harness()
    with pytest.raises(TypeError, match="no rule"):
        h.ingest._dispatch([object()])


def test_program_leaving_the_pat_unmaps_its_pids() -> None:
    data = load("h264_aac_zerolatency.ts")
    pmt = program_of(data)
    h = Harness()
    h.ingest._dispatch([ProgramChanged(pmt, None, 0.0)])
    assert h.publisher.layers and h.ingest.rap.video_pids
    h.ingest._dispatch([ProgramChanged(None, pmt, 1.0)])
    assert h.publisher.layers == {} and (h.ingest.rap.pmt_pid, h.ingest.rap.video_pids) == (None, frozenset())


class FakeConnection:
    """What the SRT sessions use of media.srt.listener.SrtConnection."""

    def __init__(self, accept_sends: bool = True) -> None:
        self.on_data = None
        self.on_close = None
        self.sent: list[bytes] = []
        self.closed = False
        self.accept_sends = accept_sends
        self.pending = False  # data still in libsrt's buffer or the bridge's hand-over

    def receive_pending(self) -> bool:
        return self.pending

    def send(self, data: bytes) -> bool:
        if self.accept_sends:
            self.sent.append(data)
        return self.accept_sends

    def close(self) -> None:
        self.closed = True


def test_srt_ingest_session_transcodes_aac_off_the_loop_and_closes() -> None:
    """The session wires the connection to the ingest: AAC becomes Opus on
    the executor's threads and is published as the stream's audio; a close
    cancels the timer and reports to the owner."""
    import concurrent.futures
    import threading

    data = load("h264_aac_zerolatency.ts")
    closed: list[str] = []

    async def run() -> tuple[list[Frame], set[str], str]:
        h = Harness()
        conn = FakeConnection()
        executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-transcode")
        session = SrtIngestSession(conn, h.publisher, h.counters, executor=executor, on_closed=closed.append)
        threads: set[str] = set()
        process = None
        for i, msg in enumerate(messages_of(packets_of(data))):
            conn.on_data([msg], i * 0.001)
            if session.transcoder is not None and process is None:
                transcoder = session.transcoder.transcoder
                process = transcoder.process

                def traced(batch, _process=process):
                    threads.add(threading.current_thread().name)
                    return _process(batch)

                transcoder.process = traced
        conn.on_close("peer_closed")
        assert session.transcoder is not None
        await session.transcoder.stop()
        executor.shutdown()
        return h.audio(), threads, threading.current_thread().name

    audio, threads, loop_thread = asyncio.run(run())
    assert audio and {f.codec for f in audio} == {"opus"}
    assert threads and all(name.startswith("test-transcode") for name in threads) and loop_thread not in threads
    assert closed == ["peer_closed"]


def test_srt_read_session_sends_the_original_bytes_and_counts_refusals() -> None:
    data = load("h264_aac_zerolatency.ts")
    msgs = messages_of(packets_of(data))
    h = Harness()
    conn = FakeConnection()
    closed: list[str] = []
    read = SrtReadSession(conn, h.stream, on_closed=closed.append)
    h.feed(msgs[:10])
    assert conn.sent == msgs[:10] and read.drops == 0
    conn.accept_sends = False  # libsrt's send buffer is full
    h.feed(msgs[10:13])
    assert read.drops == 3
    conn.on_close("peer_closed")
    assert read.reader.closed and closed == ["peer_closed"]
    h.feed(msgs[13:14])
    assert read.drops == 3 and len(conn.sent) == 10, "a closed session is no longer fed"


class _QuietIngest:
    """A TsIngest stand-in whose timer is a due quiet deadline."""

    def __init__(self) -> None:
        self.deadline: float | None = None
        self.fired: list[float] = []

    def receive_messages(self, messages, now) -> None:
        self.deadline = time.monotonic() + 0.005

    def get_timer(self) -> float | None:
        return self.deadline

    def handle_timer(self, now: float) -> None:
        self.fired.append(now)
        self.deadline = None


def test_quiet_deadline_waits_for_data_still_on_its_way() -> None:
    """The quiet timer completes a frame only when nothing more has arrived:
    data still in libsrt's buffer or the bridge's hand-over postpones it,
    a bounded number of times."""

    async def run(pending_for: float) -> tuple[_QuietIngest, SrtIngestSession, float]:
        h = Harness()
        conn = FakeConnection()
        session = SrtIngestSession(conn, h.publisher, h.counters, transcode=False)
        fake = session.ingest = _QuietIngest()  # type: ignore[assignment]
        conn.pending = True
        t0 = time.monotonic()
        conn.on_data([b"x"], t0)
        loop = asyncio.get_running_loop()
        loop.call_later(pending_for, setattr, conn, "pending", False)
        while not fake.fired and time.monotonic() - t0 < 1.0:
            await asyncio.sleep(0.002)
        return fake, session, time.monotonic() - t0

    fake, session, waited = asyncio.run(run(0.02))
    assert len(fake.fired) == 1 and session.postponed_total >= 1
    assert waited >= 0.02  # not before the pending data was gone
    # Data that never stops "arriving" (a loop far behind) holds the frame
    # at most the bounded number of postponements, then it completes.
    fake, session, waited = asyncio.run(run(5.0))
    assert len(fake.fired) == 1 and session.postponed_total == 25
