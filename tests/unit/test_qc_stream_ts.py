"""TR 101 290 and B-frame markers from captured ffmpeg MPEG-TS with injected
corruption, through the real ingest path: TsIngest (demuxer counters) →
Publisher.source_counters() and the stream's frames → StreamMonitor."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from live_qc.markers import MarkerEvent
from live_qc.stream import StreamMonitor
from live_qc.thresholds import Thresholds
from media.ingest.ts import TsIngest
from media.stream import Discontinuity, Frame, SourceInfo, StreamHub

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "ts"
SECONDS = 6.0
PKT = 188
MSG = 7 * PKT  # one SRT/UDP payload


@pytest.fixture(scope="module")
def clean_ts(tmp_path_factory) -> bytes:
    """6 s of x264 (zerolatency, GOP 1 s) + AAC in MPEG-TS, as ffmpeg muxes
    it. A PCR every 40 ms: at ffmpeg's default 80 ms the 7-packet message
    granularity of the pacing below would put some PCRs just over TR 101
    290's 100 ms apart."""
    path = tmp_path_factory.mktemp("ts") / "clean.ts"
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y",
                    "-f", "lavfi", "-i", f"testsrc=s=320x180:r=25:d={SECONDS}",
                    "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={SECONDS}",
                    "-c:v", "libx264", "-preset", "veryfast", "-tune", "zerolatency", "-g", "25", "-b:v", "300k",
                    "-c:a", "aac", "-b:a", "64k", "-pcr_period", "40", "-f", "mpegts", str(path)], check=True)
    return path.read_bytes()


def packets(data: bytes) -> list[bytearray]:
    assert len(data) % PKT == 0
    return [bytearray(data[i:i + PKT]) for i in range(0, len(data), PKT)]


def pid(p: bytes) -> int:
    return ((p[1] & 0x1F) << 8) | p[2]


def table_id(p: bytes) -> int | None:
    """table_id of a section starting in this packet (PSI packets carry no adaptation field here)."""
    if not p[1] & 0x40 or p[3] & 0x30 != 0x10:
        return None
    return p[5 + p[4]]


def pcr_times(data: bytes) -> list[float]:
    """Arrival time of each 7-packet message as a real-time sender paces it:
    the PCR (ISO/IEC 13818-1 §2.4.3.5) of a message that carries one, else
    its last packet's time interpolated between two PCRs; 0 at the first."""
    stamps: list[tuple[int, float]] = []
    for i in range(0, len(data), PKT):
        p = data[i:i + PKT]
        if p[3] & 0x20 and p[4] >= 7 and p[5] & 0x10:
            base = (p[6] << 25) | (p[7] << 17) | (p[8] << 9) | (p[9] << 1) | (p[10] >> 7)
            stamps.append((i // PKT, base / 90000))
    assert len(stamps) >= 2
    t0 = stamps[0][1]
    exact = dict(stamps)
    total = len(data) // PKT
    out: list[float] = []
    j = 0
    for first in range(0, total, 7):
        last = min(first + 6, total - 1)
        carried = [exact[k] for k in range(first, last + 1) if k in exact]
        if carried:
            t = carried[-1] - t0
        else:
            while j + 2 < len(stamps) and stamps[j + 1][0] <= last:
                j += 1
            (a, ta), (b, tb) = stamps[j], stamps[j + 1]
            t = ta - t0 + (last - a) * (tb - ta) / (b - a)
        out.append(max(t, out[-1] if out else 0.0))
    return out


def run(data: bytes, th: Thresholds | None = None) -> list[tuple[float, MarkerEvent]]:
    """Feed ``data`` as 7-packet messages at their PCR-paced arrival times,
    frames and counters to a monitor as the server does."""
    hub = StreamHub()
    stream = hub.get_or_create("cam")
    pub = stream.attach_publisher(SourceInfo("srt"))
    ingest = TsIngest(pub)
    reader = stream.subscribe(100000)
    mon = StreamMonitor(th or Thresholds(transport_clear_s=1.0))
    out: list[tuple[float, MarkerEvent]] = []
    last_sample = -1.0
    arrivals = pcr_times(data)
    now = 0.0
    for i, now in enumerate(arrivals):
        deadline = mon.get_timer()
        if deadline is not None and deadline <= now:
            out += [(now, e) for e in mon.handle_timer(now)]
        ingest.receive_messages([data[i * MSG:(i + 1) * MSG]], now)
        for item in reader.drain():
            if isinstance(item, Discontinuity):
                out += [(now, e) for e in mon.on_discontinuity(now, item.reason)]
            elif isinstance(item, Frame) and item.pts is not None:
                out += [(now, e) for e in mon.on_frame(item.kind, item.arrival, item.pts / item.clock_rate,
                                                       len(item.data), item.keyframe, item.pts, item.dts,
                                                       item.data, item.codec)]
        if now - last_sample >= 0.1:
            last_sample = now
            out += [(now, e) for e in mon.on_counters(now, sources(stream))]
    # The caller leaves (its publisher detaches): what is open closes.
    stream.detach_publisher(pub, now)
    end = now + 5.0
    t = now
    while t < end:
        t += 0.1
        out += [(t, e) for e in mon.on_counters(t, sources(stream))]
        out += [(t, e) for e in mon.handle_timer(t)]
    return out + [(t, e) for e in mon.flush(t)]


def sources(stream) -> dict:
    """What QcService samples: each attached publisher's counters."""
    return {(p.layer, p.epoch): p.source_counters() for p in stream.publishers}


def subtypes(events, kind: str = "open") -> set[str]:
    return {e.marker.subtype for _, e in events if e.kind == kind}


def at_fraction(pkts: list, fraction: float, want) -> int:
    start = int(len(pkts) * fraction)
    return next(i for i in range(start, len(pkts)) if want(pkts[i]))


def test_the_captured_stream_as_it_is_raises_no_marker(clean_ts) -> None:
    events = run(clean_ts)
    assert events == []


def test_a_flipped_continuity_counter_opens_a_cc_error_marker(clean_ts) -> None:
    pkts = packets(clean_ts)
    video = pid(pkts[at_fraction(pkts, 0.5, lambda p: table_id(p) is None and pid(p) not in (0, 0x11)
                                 and p[1] & 0x40)])
    i = at_fraction(pkts, 0.5, lambda p: pid(p) == video and p[3] & 0x10 and not p[1] & 0x40)
    pkts[i][3] = (pkts[i][3] & 0xF0) | ((pkts[i][3] + 5) & 0x0F)
    events = run(b"".join(pkts))
    cc = [(t, e) for t, e in events if e.marker.subtype == "cc_error"]
    assert [e.kind for _, e in cc] == ["open", "close"]
    opened = cc[0][1].marker
    assert opened.type == "transport" and opened.severity == "error"
    assert cc[0][0] == pytest.approx(pcr_times(b"".join(pkts))[i // 7], abs=0.15)
    assert cc[-1][1].marker.metadata["count"] >= 1
    # The lost picture data may also cut a PES short, nothing else.
    assert subtypes(events) == {"cc_error"}


def test_pat_missing_for_over_half_a_second_opens_a_pat_error_marker(clean_ts) -> None:
    pkts = packets(clean_ts)
    first = int(len(pkts) * 0.4)
    last = int(len(pkts) * 0.6)  # 1.2 s without a PAT (ffmpeg repeats it every 0.1 s or so)
    kept = [p for i, p in enumerate(pkts) if not (first <= i < last and pid(p) == 0)]
    assert len(kept) < len(pkts)
    # A muxer that stopped sending the PAT, not packets lost: PID 0's
    # continuity_counter carries on unbroken (else that is a cc_error too).
    cc = 0
    for p in kept:
        if pid(p) == 0:
            p[3] = (p[3] & 0xF0) | cc
            cc = (cc + 1) & 0x0F
    data = b"".join(kept)
    events = run(data)
    arrivals = pcr_times(data)
    gap_from, gap_to = arrivals[first // 7], arrivals[(last - (len(pkts) - len(kept))) // 7]
    pat = [(t, e) for t, e in events if e.marker.subtype == "pat_error"]
    assert [e.kind for _, e in pat] == ["open", "close"]
    assert pat[0][1].marker.severity == "error"
    assert gap_from + 0.5 - 0.15 <= pat[0][0] <= gap_to + 0.15
    assert subtypes(events) == {"pat_error"}


def test_a_corrupted_pmt_crc_opens_a_crc_error_warning(clean_ts) -> None:
    pkts = packets(clean_ts)
    i = at_fraction(pkts, 0.5, lambda p: table_id(p) == 0x02)
    pkts[i][5 + pkts[i][4] + 10] ^= 0x01  # inside the section: its CRC_32 no longer matches
    events = run(b"".join(pkts))
    crc = [e for _, e in events if e.marker.subtype == "crc_error"]
    assert [e.kind for e in crc] == ["open", "close"]
    assert crc[0].marker.severity == "warning"  # TR 101 290 priority 2
    assert "crc_error" in subtypes(events)
    assert subtypes(events) <= {"crc_error", "pmt_error"}


def test_transport_error_indicator_opens_a_transport_error_warning(clean_ts) -> None:
    pkts = packets(clean_ts)
    i = at_fraction(pkts, 0.3, lambda p: pid(p) not in (0, 0x11) and table_id(p) is None)
    pkts[i][1] |= 0x80
    events = run(b"".join(pkts))
    te = [e for _, e in events if e.marker.subtype == "transport_error"]
    assert [e.kind for e in te] == ["open", "close"]
    assert te[0].marker.severity == "warning"
    assert subtypes(events) <= {"transport_error", "cc_error"}


def test_sync_bytes_destroyed_open_priority_one_markers(clean_ts) -> None:
    pkts = packets(clean_ts)
    start = int(len(pkts) * 0.5)
    for p in pkts[start:start + 10]:
        p[0] = 0x00
    events = run(b"".join(pkts))
    opened = subtypes(events)
    assert {"ts_sync_loss", "sync_byte_error"} & opened
    for _, e in events:
        if e.marker.subtype in ("ts_sync_loss", "sync_byte_error"):
            assert e.marker.severity == "error"


def test_captured_b_frames_open_a_b_frames_marker() -> None:
    data = (FIXTURES / "h264_aac_bframes.ts").read_bytes()
    events = run(data)
    b = [e for _, e in events if e.marker.subtype == "b_frames"]
    assert b and b[0].kind == "open" and b[-1].kind == "close"
    assert b[0].marker.severity == "error"
    assert b[0].marker.start < 2.0  # the first reordered frame (the file's timeline begins at 1.4 s)
    zerolatency = run((FIXTURES / "h264_aac_zerolatency.ts").read_bytes())
    assert "b_frames" not in subtypes(zerolatency)


# -- returnfeed qc FILE: the same monitor over a recording's packets ----------------


def test_file_scan_finds_cc_errors_and_b_frames_and_nothing_on_a_clean_file(clean_ts, tmp_path) -> None:
    import av

    from live_qc.filescan import analyse_file, scan_ts

    clean = tmp_path / "clean.ts"
    clean.write_bytes(clean_ts)
    assert not [m for m in analyse_file(str(clean)).markers if m.type in ("transport", "stall")]
    pkts = packets(clean_ts)
    i = at_fraction(pkts, 0.5, lambda p: pid(p) == 0x100 and p[3] & 0x10 and not p[1] & 0x40)
    pkts[i][3] = (pkts[i][3] & 0xF0) | ((pkts[i][3] + 5) & 0x0F)
    broken = tmp_path / "broken.ts"
    broken.write_bytes(b"".join(pkts))
    with av.open(str(broken)) as c:
        origin = c.start_time / 1e6
    # The picture the lost packets belonged to: the PTS of the PES that packet is in.
    start = next(p for p in reversed(pkts[:i + 1]) if pid(p) == 0x100 and p[1] & 0x40)
    pes = 4 + (1 + start[4] if start[3] & 0x20 else 0)
    h = start[pes + 9:pes + 14]
    pts = ((h[0] >> 1) & 7) << 30 | h[1] << 22 | (h[2] >> 1) << 15 | h[3] << 7 | h[4] >> 1
    report = analyse_file(str(broken))
    cc = [m for m in report.markers if (m.type, m.subtype) == ("transport", "cc_error")]
    assert len(cc) == 1 and cc[0].severity == "error" and cc[0].end is not None
    # On the file's timeline (media time, like every marker): at the damaged
    # picture, from the counter sample before it (0.1 s apart).
    assert cc[0].start == pytest.approx(pts / 90000 - origin, abs=0.2)
    assert report.to_json()["markers"]  # the CLI's JSON carries it
    b = scan_ts(str(FIXTURES / "h264_aac_bframes.ts"))
    assert [(m.type, m.subtype, m.severity) for m in b] == [("transport", "b_frames", "error")]


@pytest.fixture(scope="module")
def resized_ts(tmp_path_factory) -> bytes:
    """An encoder restarted at another picture size mid-stream: two ffmpeg
    encodes (640x360, then 320x180 with timestamps carrying on) joined at a
    packet boundary, continuity counters carried on too (nothing was lost)."""
    tmp = tmp_path_factory.mktemp("resize")

    def encode(name: str, size: str, offset: float) -> list[bytearray]:
        path = tmp / name
        subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y",
                        "-f", "lavfi", "-i", f"testsrc=s={size}:r=25:d=3,format=yuv420p",
                        "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000:duration=3",
                        "-c:v", "libx264", "-preset", "veryfast", "-tune", "zerolatency", "-profile:v", "high",
                        "-level", "3.0", "-g", "25", "-b:v", "300k", "-c:a", "aac", "-b:a", "64k",
                        "-pcr_period", "40", "-output_ts_offset", str(offset), "-f", "mpegts", str(path)], check=True)
        return packets(path.read_bytes())

    first, second = encode("a.ts", "640x360", 0.0), encode("b.ts", "320x180", 3.0)
    last_cc = {pid(p): p[3] & 0x0F for p in first if p[3] & 0x10}
    shift: dict[int, int] = {}
    for p in second:
        if p[3] & 0x10:  # only packets with payload advance the counter (ISO/IEC 13818-1 §2.4.3.3)
            q = pid(p)
            shift.setdefault(q, (last_cc.get(q, 15) + 1 - (p[3] & 0x0F)) & 0x0F)
            p[3] = (p[3] & 0xF0) | ((p[3] + shift[q]) & 0x0F)
    return b"".join(first + second)


def test_captured_resolution_change_opens_one_marker_with_from_and_to(resized_ts, tmp_path) -> None:
    from live_qc.filescan import scan_ts

    events = run(resized_ts)
    assert subtypes(events) == {"resolution_change"}, [(e.kind, e.marker) for _, e in events]
    res = [e for _, e in events if e.marker.subtype == "resolution_change"]
    assert [e.kind for e in res] == ["open", "close"]
    assert res[0].marker.metadata == {"from": "640x360", "to": "320x180"}
    assert res[0].marker.severity == "warning"
    path = tmp_path / "resized.ts"
    path.write_bytes(resized_ts)
    found = scan_ts(str(path), origin=1.4)  # FFmpeg's default start: 1.4 s
    assert [(m.subtype, m.metadata["to"]) for m in found] == [("resolution_change", "320x180")]
    assert found[0].start == pytest.approx(3.0, abs=0.05)
