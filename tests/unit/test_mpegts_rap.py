from pathlib import Path

from media.mpegts.demux import TsDemuxer
from media.mpegts.events import AccessUnit, ProgramChanged
from media.mpegts.rap import RandomAccessScanner
from media.stream import SourceInfo, StreamHub

FIX = Path(__file__).parent.parent / "fixtures" / "ts"


def _chunks(data: bytes, size: int = 1316) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def test_scanner_finds_each_idr_start_and_keeps_psi() -> None:
    data = (FIX / "h264_aac_zerolatency.ts").read_bytes()
    demux, scan = TsDemuxer(), RandomAccessScanner()
    raps = 0
    keyframes = 0
    for i, chunk in enumerate(_chunks(data)):
        for ev in demux.feed(chunk, float(i)):
            if isinstance(ev, ProgramChanged):
                scan.configure(ev.pmt.pmt_pid, frozenset(t.pid for t in ev.pmt.tracks if t.kind == "video"))
            elif isinstance(ev, AccessUnit) and ev.codec == "h264" and ev.keyframe:
                keyframes += 1
        off = scan.scan(chunk)
        if off is not None:
            raps += 1
            assert off % 188 == 0 and chunk[off] == 0x47
    for ev in demux.flush(float(len(data))):
        if isinstance(ev, AccessUnit) and ev.codec == "h264" and ev.keyframe:
            keyframes += 1
    assert raps == keyframes >= 2
    assert len(scan.psi) == 376 and scan.psi[0] == 0x47


def test_scanner_ignores_garbage_and_misalignment() -> None:
    scan = RandomAccessScanner(pmt_pid=4096, video_pids=frozenset({256}))
    assert scan.scan(b"") is None
    assert scan.scan(b"\x00" * 1000) is None
    assert scan.scan(b"\x47\x41\x00\x10" + b"\xff" * 184) is None  # PUSI on PID 256, no PES header


def test_new_ts_reader_starts_at_last_keyframe_with_psi() -> None:
    data = (FIX / "h264_aac_zerolatency.ts").read_bytes()
    hub = StreamHub()
    stream = hub.get_or_create("x")
    pub = stream.attach_publisher(SourceInfo("srt"), now=0.0)
    demux, scan = TsDemuxer(), RandomAccessScanner()
    chunks = _chunks(data)
    for i, chunk in enumerate(chunks[: len(chunks) * 2 // 3]):
        for ev in demux.feed(chunk, float(i)):
            if isinstance(ev, ProgramChanged):
                pub.set_program(ev.pmt)
                scan.configure(ev.pmt.pmt_pid, frozenset(t.pid for t in ev.pmt.tracks if t.kind == "video"))
        pub.publish_ts(chunk, rap_offset=scan.scan(chunk), psi=scan.psi)
    reader = stream.subscribe_ts(4096)
    got = reader.drain()
    assert got and len(got[0]) == 376 and got[0][1] & 0x1F == 0 and got[0][2] == 0  # PAT then PMT
    # what the reader got demuxes from its first byte: PAT/PMT, then a keyframe first
    d2 = TsDemuxer()
    first_video = None
    for i, chunk in enumerate(got):
        for ev in d2.feed(chunk, float(i)):
            if isinstance(ev, AccessUnit) and ev.codec == "h264" and first_video is None:
                first_video = ev
    assert first_video is not None and first_video.keyframe and first_video.sps
