"""MPEG-TS demuxer: captured ffmpeg streams, crafted streams, TR 101 290."""

from __future__ import annotations

import random
from pathlib import Path

import av
import pytest

from media.h264 import Sps
from media.mpegts import (
    AccessUnit,
    Completion,
    DemuxError,
    Descriptor,
    DiscontinuityReason,
    ErrorKind,
    Pat,
    PesHeader,
    Pmt,
    PmtTrack,
    ProgramChanged,
    TsCounters,
    TsDemuxer,
    TsDiscontinuity,
    packetize_pes,
    packetize_section,
    ts_packet,
)
from media.mpegts.crc import crc32_mpeg2

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "ts"
ALL_FIXTURES = ["h264_aac_zerolatency.ts", "h264_aac_bframes.ts", "h264_opus.ts", "simulcast.ts", "h264_aac_udp.ts"]


def load(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def demux_all(data: bytes, chunk: int = 1316, demux: TsDemuxer | None = None, **kw) -> tuple[list, TsDemuxer]:
    demux = demux or TsDemuxer(**kw)
    events: list = []
    for i in range(0, len(data), chunk):
        events += demux.feed(data[i : i + chunk], 0.0)
    events += demux.flush(0.0)
    return events, demux


def units(events: list, codec: str | None = None) -> list[AccessUnit]:
    return [e for e in events if isinstance(e, AccessUnit) and (codec is None or e.codec == codec)]


def key(au: AccessUnit) -> tuple:
    return (au.pid, au.codec, au.pts, au.dts, au.keyframe, au.data, au.corrupt)


def by_pid(aus: list[AccessUnit]) -> dict[int, list[tuple]]:
    """Per-PID sequences (early completion changes the interleaving across PIDs)."""
    out: dict[int, list[tuple]] = {}
    for au in aus:
        out.setdefault(au.pid, []).append(key(au))
    return out


# --------------------------------------------------------------- crafting


class Mux:
    """A minimal TS muxer for crafted streams (PSI + PES, per-PID CC)."""

    def __init__(self) -> None:
        self.cc: dict[int, int] = {}

    def section(self, pid: int, section: bytes) -> list[bytes]:
        pkts = packetize_section(pid, section, self.cc.get(pid, 0))
        self.cc[pid] = (self.cc.get(pid, 0) + len(pkts)) & 15
        return pkts

    def pes(self, pid: int, stream_id: int, payload: bytes, pts: int, *, bounded: bool, random_access=False) -> list[bytes]:
        header = PesHeader(stream_id, pts).serialize(len(payload) if bounded else None)
        pkts, cc = packetize_pes(pid, header + payload, self.cc.get(pid, 0), random_access=random_access)
        self.cc[pid] = cc
        return pkts


def pmt_v(version: int, tracks: list[tuple[int, int]], descriptors=None) -> Pmt:
    return Pmt(
        program_number=1,
        version=version,
        pcr_pid=tracks[0][0],
        tracks=tuple(PmtTrack(pid, st, None, tuple(descriptors or ())) for pid, st in tracks),
    )


PAT = Pat(transport_stream_id=1, version=0, programs=((1, 0x1000),))


def real_video_units(n: int) -> list[AccessUnit]:
    events, _ = demux_all(load("h264_aac_zerolatency.ts"))
    return units(events, "h264")[:n]


# ------------------------------------------------------- captured streams


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_matches_ffmpeg_demuxer(name):
    """Every access unit equals what FFmpeg's own demuxer returns."""
    events, demux = demux_all(load(name))
    ours: dict[int, list[AccessUnit]] = {}
    for au in units(events):
        ours.setdefault(au.pid, []).append(au)
    ref: dict[int, list] = {}
    with av.open(str(FIXTURES / name)) as container:
        for p in container.demux():
            if p.size:
                ref.setdefault(p.stream.id, []).append((bytes(p), p.pts, p.dts, p.is_keyframe))
    assert set(ours) == set(ref)
    for pid, expected in ref.items():
        got = ours[pid]
        assert len(got) == len(expected)
        for au, (data, pts, dts, kf) in zip(got, expected):
            assert au.data == data
            # FFmpeg's parser rounds per-frame AAC timestamps at 44.1 kHz
            # from a fractional origin; allow one 90 kHz tick there.
            assert abs(au.pts - pts) <= 1 and abs(au.dts - dts) <= 1
            assert au.keyframe == kf
            assert not au.corrupt
    c = demux.counters()
    assert c.cc_error == c.pes_errors == c.psi_errors == c.ts_sync_loss == 0


def test_program_h264_aac():
    events, demux = demux_all(load("h264_aac_zerolatency.ts"))
    changes = [e for e in events if isinstance(e, ProgramChanged)]
    assert len(changes) == 1 and changes[0].previous is None
    pmt = changes[0].pmt
    assert [(t.pid, t.stream_type, t.codec, t.kind) for t in pmt.tracks] == [
        (0x100, 0x1B, "h264", "video"),
        (0x101, 0x0F, "aac", "audio"),
    ]
    assert pmt.pcr_pid == 0x100 and pmt.pmt_pid == 0x1000
    assert demux.pmt == pmt
    video = units(events, "h264")
    assert len(video) == 50 and video[0].keyframe
    assert sum(au.keyframe for au in video) == 2  # GOP 25 at 25 fps, 2 s
    assert Sps.parse(video[0].sps).profile_level_id.startswith("64")
    audio = units(events, "aac")
    assert all(a.data[0] == 0xFF and a.keyframe for a in audio)
    # AAC PTS advance by 1024 samples at 48 kHz = 1920 ticks.
    assert {b.pts - a.pts for a, b in zip(audio, audio[1:])} == {1920}


def test_program_opus():
    events, _ = demux_all(load("h264_opus.ts"))
    pmt = next(e.pmt for e in events if isinstance(e, ProgramChanged))
    opus = pmt.track(0x101)
    assert opus.stream_type == 0x06 and opus.codec == "opus"
    assert opus.registration == b"Opus"
    assert opus.opus_channel_config == 2
    packets = units(events, "opus")
    assert len(packets) > 90
    # libopus 20 ms packets: PTS advance 1800 ticks, TOC says 960 samples
    from media.opus import packet_samples

    assert {packet_samples(p.data) for p in packets} == {960}
    assert {b.pts - a.pts for a, b in zip(packets, packets[1:])} == {1800}


def test_simulcast_two_video_pids():
    events, _ = demux_all(load("simulcast.ts"))
    pmt = next(e.pmt for e in events if isinstance(e, ProgramChanged))
    assert [t.pid for t in pmt.video_tracks] == [0x100, 0x101]
    sizes = {}
    for au in units(events, "h264"):
        sps = Sps.parse(au.sps)
        sizes[au.pid] = (sps.width, sps.height, sps.profile_level_id[:2])
    assert sizes == {0x100: (320, 240, "64"), 0x101: (160, 120, "42")}


# ------------------------------------------------------- early completion


@pytest.mark.parametrize("name", ["h264_aac_zerolatency.ts", "h264_aac_bframes.ts", "simulcast.ts"])
def test_video_frames_complete_early(name):
    data = load(name)
    early_events, early = demux_all(data)
    late_events, _ = demux_all(data, early_completion=False)
    early_video = units(early_events, "h264")
    late_video = units(late_events, "h264")
    assert [key(a) for a in early_video] == [key(a) for a in late_video]
    # ffmpeg pads the last packet of every video PES: all frames end early.
    assert all(a.completion == Completion.STUFFING for a in early_video)
    assert all(a.completion in (Completion.NEXT_START, Completion.FLUSH) for a in late_video)
    assert early.counters().early_overrun == 0


def test_early_completion_is_emitted_before_next_pes_arrives():
    """Fed packet by packet, an early frame appears at its last packet."""
    data = load("h264_aac_zerolatency.ts")
    demux = TsDemuxer()
    emitted_at = {}
    for i in range(0, len(data), 188):
        for e in demux.feed(data[i : i + 188], float(i // 188)):
            if isinstance(e, AccessUnit) and e.codec == "h264":
                emitted_at[e.pts] = i // 188
    # the packet index that completed each frame is the frame's last packet
    pids = [((data[i + 1] & 0x1F) << 8) | data[i + 2] for i in range(0, len(data), 188)]
    for idx in emitted_at.values():
        nxt = [j for j in range(idx + 1, len(pids)) if pids[j] == 0x100]
        assert not nxt or data[nxt[0] * 188 + 1] & 0x40  # the next video packet starts a new PES


def test_message_rule_on_live_udp_capture():
    """Real datagram boundaries: end_of_message never mis-fires."""
    data = load("h264_aac_udp.ts")
    lines = (FIXTURES / "h264_aac_udp.msgs").read_text().split("\n")
    msgs = [(float(t), int(n)) for t, n in (line.split() for line in lines if line)]
    assert sum(n for _, n in msgs) == len(data)
    demux = TsDemuxer()
    pos = 0
    got = []
    for t, n in msgs:
        got += demux.feed(data[pos : pos + n], t, end_of_message=True)
        pos += n
    got += demux.flush(msgs[-1][0])
    reference, _ = demux_all(data, early_completion=False)
    assert by_pid(units(got)) == by_pid(units(reference))
    assert demux.counters().early_overrun == 0
    video = units(got, "h264")
    assert all(a.early for a in video)


def load_capture(name: str) -> tuple[bytes, list[tuple[float, int]]]:
    """A live UDP capture: the bytes and (arrival seconds, length) per datagram."""
    lines = (FIXTURES / f"{name}.msgs").read_text().split("\n")
    msgs = [(float(t), int(n)) for t, n in (line.split() for line in lines if line)]
    data = load(f"{name}.ts")
    assert sum(n for _, n in msgs) == len(data)
    return data, msgs


def replay(data: bytes, msgs: list[tuple[float, int]], demux: TsDemuxer) -> list[tuple[object, int, float]]:
    """Feed datagrams at their arrival times and call poll() at every
    deadline the demuxer asks for, as the SRT ingest does. Returns (event,
    index of the last datagram received before it, time it came out)."""
    out: list[tuple[object, int, float]] = []
    pos = 0
    for i, (t, n) in enumerate(msgs):
        deadline = demux.next_deadline()
        if deadline is not None and deadline <= t:
            out += [(e, i - 1, deadline) for e in demux.poll(deadline)]
        out += [(e, i, t) for e in demux.feed(data[pos : pos + n], t, end_of_message=True)]
        pos += n
    out += [(e, len(msgs) - 1, msgs[-1][0]) for e in demux.flush(msgs[-1][0])]
    return out


def video_pes_ends(data: bytes, msgs: list[tuple[float, int]], pid: int = 0x100) -> list[tuple[int, bytes]]:
    """For every video PES followed by another: the index of the datagram
    carrying its last packet, and that packet."""
    starts = []
    pos = 0
    for _, n in msgs:
        starts.append(pos // 188)
        pos += n
    ends = []
    last = None
    for i in range(len(data) // 188):
        p = data[i * 188 : i * 188 + 188]
        if ((p[1] & 0x1F) << 8 | p[2]) != pid or not p[3] & 0x10:
            continue
        if p[1] & 0x40 and last is not None:
            msg = max(j for j, s in enumerate(starts) if s <= last)
            ends.append((msg, data[last * 188 : last * 188 + 188]))
        last = i
    return ends


def _ends_full_message(msgs, ends, index: int) -> bool:
    msg, _ = ends[index]
    return msgs[msg][1] == 1316


def test_two_byte_padding_completes_at_its_last_packet():
    """FFmpeg pads a PES's last packet with the 2-byte adaptation field
    `01 00` when two bytes are left over; that frame ends there, even when
    its last packet also fills a 1316-byte message exactly."""
    data, msgs = load_capture("h264_udp_pad2_full_message")
    ends = video_pes_ends(data, msgs)
    padded = [k for k, (_, pkt) in enumerate(ends) if pkt[3] & 0x20 and pkt[4:6] == b"\x01\x00"]
    assert padded and _ends_full_message(msgs, ends, padded[0])
    out = replay(data, msgs, TsDemuxer())
    video = [(e, i, t) for e, i, t in out if isinstance(e, AccessUnit) and e.codec == "h264"]
    reference, _ = demux_all(data, early_completion=False)
    assert [key(e) for e, _, _ in video] == [key(a) for a in units(reference, "h264")]
    # every frame comes out with the datagram that carries its last packet
    assert [i for _, i, _ in video[: len(ends)]] == [msg for msg, _ in ends]
    assert video[padded[0]][0].completion == Completion.STUFFING
    assert all(e.early for e, _, _ in video[: len(ends)])


def test_exactly_full_last_packet_completes_when_the_sender_goes_quiet():
    """A frame whose last packet is exactly full and fills its 1316-byte
    message: no stuffing, no short message. It comes out when nothing more
    arrived for quiet_gap, long before the next frame starts."""
    data, msgs = load_capture("h264_udp_exact_full_message")
    ends = video_pes_ends(data, msgs)
    exact = [k for k, (_, pkt) in enumerate(ends) if not pkt[3] & 0x20]
    assert exact and _ends_full_message(msgs, ends, exact[0])
    demux = TsDemuxer()
    out = replay(data, msgs, demux)
    video = [(e, i, t) for e, i, t in out if isinstance(e, AccessUnit) and e.codec == "h264"]
    reference, _ = demux_all(data, early_completion=False)
    assert [key(e) for e, _, _ in video] == [key(a) for a in units(reference, "h264")]
    assert [i for _, i, _ in video[: len(ends)]] == [msg for msg, _ in ends]
    au, last_msg, out_at = video[exact[0]]
    assert au.completion == Completion.QUIET
    assert out_at == au.arrival == pytest.approx(msgs[last_msg][0] + 0.010)
    assert au.arrival < msgs[last_msg + 1][0]  # the next frame was still on its way
    assert all(e.early for e, _, _ in video[: len(ends)])
    assert demux.counters().completed_quiet == 1 and demux.counters().early_overrun == 0


def test_quiet_rule_off_waits_for_next_frame():
    """The same capture without the rule: the frame waits for the next PES."""
    data, msgs = load_capture("h264_udp_exact_full_message")
    ends = video_pes_ends(data, msgs)
    exact = next(k for k, (_, pkt) in enumerate(ends) if not pkt[3] & 0x20)
    out = replay(data, msgs, TsDemuxer(quiet_gap=None))
    video = [(e, i) for e, i, _ in out if isinstance(e, AccessUnit) and e.codec == "h264"]
    au, msg = video[exact]
    assert au.completion == Completion.NEXT_START and msg > ends[exact][0]
    assert au.arrival - msgs[ends[exact][0]][0] > 0.030


def test_first_arrival_is_when_the_frame_started():
    """first_arrival: the feed that carried the PES start; a frame held until
    the next PES start shows a whole frame interval from it."""
    data, msgs = load_capture("h264_aac_udp")
    starts = []
    pos = 0
    for t, n in msgs:
        for k in range(n // 188):
            o = pos + k * 188
            if data[o + 1] & 0x40 and ((data[o + 1] & 0x1F) << 8 | data[o + 2]) == 0x100:
                starts.append(t)
        pos += n
    early = [e for e, _, _ in replay(data, msgs, TsDemuxer()) if isinstance(e, AccessUnit) and e.codec == "h264"]
    late = [e for e, _, _ in replay(data, msgs, TsDemuxer(early_completion=False))
            if isinstance(e, AccessUnit) and e.codec == "h264"]
    assert [a.first_arrival for a in early] == starts[: len(early)]
    assert [a.first_arrival for a in late] == starts[: len(late)]
    held = sorted(a.arrival - a.first_arrival for a in late[:-1])
    assert held[len(held) // 2] > 0.030  # 25 fps: each waits for the next frame
    assert max(a.arrival - a.first_arrival for a in early) < 0.005


def _filler_nal(size: int) -> bytes:
    # filler_data_rbsp (§7.3.2.7): 0xFF bytes then rbsp_trailing_bits.
    return b"\x00\x00\x01\x0c" + b"\xff" * (size - 5) + b"\x80"


def _exact_fit_stream(frames: list[AccessUnit]) -> tuple[list[bytes], list[int]]:
    """A crafted stream whose video PES fill their last packet exactly (no
    stuffing); returns packets and the index of each frame's last packet."""
    mux = Mux()
    packets = mux.section(0, PAT.serialize()) + mux.section(0x1000, pmt_v(0, [(0x100, 0x1B)]).serialize())
    last = []
    for au in frames:
        header = PesHeader(0xE0, au.pts).serialize(None)
        body = au.data
        total = len(header) + len(body)
        pad = (-total) % 184
        if pad and pad < 6:
            pad += 184
        if pad:
            body += _filler_nal(pad)
        pkts, cc = packetize_pes(0x100, header + body, mux.cc.get(0x100, 0))
        mux.cc[0x100] = cc
        assert all(p[3] & 0x30 == 0x10 for p in pkts)  # no adaptation field anywhere
        packets += pkts
        last.append(len(packets) - 1)
    return packets, last


def _as_messages(packets: list[bytes], last: list[int]) -> list[tuple[bytes, int | None]]:
    """Datagrams the way FFmpeg writes them: 7 packets per message, and a
    flush (short message) at the end of each frame. Returns (message, index
    of the frame it ends or None)."""
    msgs = []
    start = 0
    for frame, end in enumerate(last):
        group = packets[start : end + 1]
        for i in range(0, len(group), 7):
            chunk = group[i : i + 7]
            msgs.append((b"".join(chunk), frame if i + 7 >= len(group) else None))
        start = end + 1
    return msgs


def test_message_rule_exact_fit():
    frames = real_video_units(8)
    packets, last = _exact_fit_stream(frames)
    msgs = _as_messages(packets, last)
    demux = TsDemuxer()
    out = []
    expected = []
    for msg, ends in msgs:
        got = demux.feed(msg, 0.0, end_of_message=True)
        out += got
        if ends is not None:
            if len(msg) < 1316:
                # a short message ending a frame completes it at once
                assert [a.pts for a in units(got)] == [frames[ends].pts]
                expected.append(Completion.MESSAGE)
            else:
                expected.append(Completion.NEXT_START)
    out += demux.flush(0.0)
    video = units(out)
    assert [v.completion for v in video] == expected[:-1] + [expected[-1] if expected[-1] == Completion.MESSAGE else Completion.FLUSH]
    assert expected.count(Completion.MESSAGE) >= 4
    assert [v.data[: len(f.data)] for v, f in zip(video, frames)] == [f.data for f in frames]
    assert demux.counters().early_overrun == 0
    # Without the hint the same stream completes only at the next PES start.
    plain, _ = demux_all(b"".join(packets), chunk=188)
    assert [v.completion for v in units(plain)] == [Completion.NEXT_START] * 7 + [Completion.FLUSH]


def _timed(msgs: list[tuple[bytes, int | None]], frame_interval: float = 0.040) -> tuple[bytes, list[tuple[float, int]]]:
    """Datagrams of one frame 20 µs apart, frames frame_interval apart."""
    out = []
    t = frame = 0.0
    for msg, ends in msgs:
        out.append((t, len(msg)))
        t += 0.00002
        if ends is not None:
            frame += frame_interval
            t = frame
    return b"".join(m for m, _ in msgs), out


def test_quiet_rule_on_crafted_exact_fit():
    frames = real_video_units(12)
    packets, last = _exact_fit_stream(frames)
    msgs = _as_messages(packets, last)
    data, timed = _timed(msgs)
    demux = TsDemuxer()
    out = replay(data, timed, demux)
    video = [(e, t) for e, _, t in out if isinstance(e, AccessUnit)]
    expected = []
    seen_short = False
    for (msg, ends), (t, _) in zip(msgs, timed):
        seen_short |= len(msg) < 1316
        if ends is not None and ends < len(frames) - 1:
            if len(msg) < 1316:
                expected.append((Completion.MESSAGE, t))
            elif seen_short:
                expected.append((Completion.QUIET, pytest.approx(t + 0.010)))
            else:  # no flush seen yet: the sender's framing is unknown
                expected.append((Completion.NEXT_START, pytest.approx((ends + 1) * 0.040)))
    assert [(v.completion, t) for v, t in video[:-1]] == expected
    assert sum(c == Completion.QUIET for c, _ in expected) >= 2
    assert [v.data[: len(f.data)] for (v, _), f in zip(video, frames)] == [f.data for f in frames]
    assert demux.counters().early_overrun == 0


def test_quiet_rule_wrong_guess_disarms_it():
    """A sender that stalls mid-frame after a full message fools the rule
    once: the frame comes out cut (once, never twice), the rest of it is
    dropped and counted, and the rule stays off for the connection."""
    frames = real_video_units(12)
    packets, last = _exact_fit_stream(frames)
    msgs = _as_messages(packets, last)
    data, timed = _timed(msgs)
    # Stall 25 ms after the first full message inside a frame (not its last),
    # once a short message has armed the rule.
    short_seen = next(i for i, (m, _) in enumerate(msgs) if len(m) < 1316)
    stall = next(i for i, (m, ends) in enumerate(msgs) if i > short_seen and ends is None and len(m) == 1316)
    timed = [(t + (0.025 if i > stall else 0.0), n) for i, (t, n) in enumerate(timed)]
    cut_frame = sum(1 for _, ends in msgs[:stall] if ends is not None)
    demux = TsDemuxer()
    out = replay(data, timed, demux)
    video = [e for e, _, _ in out if isinstance(e, AccessUnit)]
    assert len(video) == len(frames)
    assert video[cut_frame].completion == Completion.QUIET
    assert len(video[cut_frame].data) < len(frames[cut_frame].data)
    assert [e.kind for e, _, _ in out if isinstance(e, DemuxError)] == [ErrorKind.EARLY_OVERRUN]
    assert demux.counters().early_overrun == 1
    assert all(v.completion != Completion.QUIET for v in video[cut_frame + 1 :])
    assert [v.data[: len(f.data)] for v, f in zip(video[cut_frame + 1 :], frames[cut_frame + 1 :])] == [
        f.data for f in frames[cut_frame + 1 :]]


def test_message_rule_wrong_guess_disarms_quiet_too():
    """A short message that was not a flush shows the sender does not frame
    by frame: QUIET, which trusts the same framing, goes off with MESSAGE."""
    frames = real_video_units(12)
    packets, last = _exact_fit_stream(frames)
    msgs = _as_messages(packets, last)
    idx = next(i for i, (m, ends) in enumerate(msgs) if ends == 2)
    m = msgs[idx][0]
    cut = next(k * 188 for k in range(1, len(m) // 188) if m[k * 188 - 1] != 0)
    msgs[idx : idx + 1] = [(m[:cut], None), (m[cut:], 2)]
    data, timed = _timed(msgs)
    demux = TsDemuxer()
    out = replay(data, timed, demux)
    video = [e for e, _, _ in out if isinstance(e, AccessUnit)]
    assert demux.counters().early_overrun == 1 and video[2].completion == Completion.MESSAGE
    later = [v.completion for v in video[3:-1]]
    assert Completion.NEXT_START in later and set(later) == {Completion.NEXT_START}
    assert demux.next_deadline() is None


def test_message_rule_needs_full_messages_first():
    """A sender that never fills a message (e.g. 4 packets per datagram)
    never arms the rule, so short messages are not taken as flushes."""
    frames = real_video_units(4)
    packets, _ = _exact_fit_stream(frames)
    demux = TsDemuxer()
    out = []
    for i in range(0, len(packets), 4):
        out += demux.feed(b"".join(packets[i : i + 4]), 0.0, end_of_message=True)
    out += demux.flush(0.0)
    assert [v.completion for v in units(out)] == [Completion.NEXT_START] * 3 + [Completion.FLUSH]
    assert demux.counters().early_overrun == 0


def test_message_rule_wrong_guess_disarms_it():
    frames = real_video_units(6)
    packets, last = _exact_fit_stream(frames)
    msgs = _as_messages(packets, last)
    # split the 3rd frame's last message in two: the first half looks like a flush
    idx = next(i for i, (m, ends) in enumerate(msgs) if ends == 2)
    m = msgs[idx][0]
    # cut where the payload so far ends in a non-zero byte (looks complete)
    cut = next(k * 188 for k in range(1, len(m) // 188) if m[k * 188 - 1] != 0)
    msgs[idx : idx + 1] = [(m[:cut], None), (m[cut:], 2)]
    demux = TsDemuxer()
    out = []
    for msg, _ in msgs:
        out += demux.feed(msg, 0.0, end_of_message=True)
    out += demux.flush(0.0)
    assert demux.counters().early_overrun == 1
    assert [e.kind for e in out if isinstance(e, DemuxError)] == [ErrorKind.EARLY_OVERRUN]
    video = units(out)
    assert len(video) == 6  # never twice
    assert len(video[2].data) < len(frames[2].data)  # the one wrong guess
    # the rule is off from then on; frames stay whole
    assert [v.completion for v in video[3:]] == [Completion.NEXT_START] * 2 + [Completion.FLUSH]
    assert [v.data[: len(f.data)] for v, f in zip(video[3:], frames[3:])] == [f.data for f in frames[3:]]


def test_wrong_early_guess_counted_and_rule_disabled():
    """A muxer that stuffs in the middle of a PES fools the rule once."""
    frames = real_video_units(5)[1:]  # P frames: AUD + slice
    mux = Mux()
    packets = mux.section(0, PAT.serialize()) + mux.section(0x1000, pmt_v(0, [(0x100, 0x1B)]).serialize())
    for n, au in enumerate(frames):
        pes = PesHeader(0xE0, au.pts).serialize(None) + au.data
        # the first packet carries only part of the PES, padded with stuffing
        cut = next(c for c in range(100, 150) if pes[c - 1] != 0)
        head, rest = pes[:cut], pes[cut:]
        cc = mux.cc.get(0x100, 0)
        packets.append(ts_packet(0x100, head, cc=cc, pusi=True))
        more, cc = packetize_pes(0x100, rest, (cc + 1) & 15)
        more[0] = more[0][:1] + bytes((more[0][1] & 0xBF,)) + more[0][2:]  # not a PES start
        mux.cc[0x100] = cc
        packets += more
    events, demux = demux_all(b"".join(packets), chunk=188)
    video = units(events)
    errors = [e for e in events if isinstance(e, DemuxError)]
    assert demux.counters().early_overrun == 1
    assert [e.kind for e in errors] == [ErrorKind.EARLY_OVERRUN]
    # First frame emitted truncated (once, never again), later ones whole.
    assert len(video) == 4
    assert video[0].completion == Completion.STUFFING and len(video[0].data) < len(frames[0].data)
    assert [v.data for v in video[1:]] == [f.data for f in frames[1:]]
    assert [v.completion for v in video[1:]] == [Completion.NEXT_START] * 2 + [Completion.FLUSH]


# ------------------------------------------------------- robustness


def test_random_chunking_gives_identical_units():
    data = load("h264_aac_bframes.ts")
    reference, _ = demux_all(data)
    rng = random.Random(1234)
    demux = TsDemuxer()
    got = []
    pos = 0
    while pos < len(data):
        n = rng.choice([1, 2, 7, 100, 187, 188, 189, 500, 1316, 3000])
        got += demux.feed(data[pos : pos + n], 0.0)
        pos += n
    got += demux.flush(0.0)
    assert [key(a) for a in units(got)] == [key(a) for a in units(reference)]
    assert demux.counters().sync_byte_error == 0


def test_byte_by_byte_prefix():
    data = load("h264_aac_zerolatency.ts")[: 188 * 120]
    reference, _ = demux_all(data)
    demux = TsDemuxer()
    got = []
    for i in range(len(data)):
        got += demux.feed(data[i : i + 1], 0.0)
    got += demux.flush(0.0)
    assert [key(a) for a in units(got)] == [key(a) for a in units(reference)]


@pytest.mark.parametrize("cut", [1, 187, 188 * 50 + 77, 188 * 300 + 5, 188 * 400])
def test_truncated_file(cut):
    data = load("h264_aac_zerolatency.ts")
    full, _ = demux_all(data)
    part, demux = demux_all(data[:cut])
    got = [key(a) for a in units(part) if a.completion != Completion.FLUSH]
    assert got == [key(a) for a in units(full)][: len(got)]
    assert demux.buffered_bytes() == 0


def test_corrupted_bytes_never_raise_and_are_counted():
    data = bytearray(load("h264_aac_bframes.ts"))
    rng = random.Random(99)
    for _ in range(200):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    events, demux = demux_all(bytes(data))
    c = demux.counters()
    assert c.cc_error + c.sync_byte_error + c.pes_errors + c.psi_errors + c.transport_error > 0
    assert len(units(events, "h264")) > 30  # most frames still come through


def test_garbage_between_packets_resyncs():
    data = load("h264_aac_zerolatency.ts")
    clean, _ = demux_all(data)
    cut = 188 * 200
    noisy = b"\x47garbage\x47" * 30 + data[:cut] + b"\x01\x47\x02" * 50 + data[cut:]
    events, demux = demux_all(noisy, chunk=1000)
    c = demux.counters()
    assert c.ts_sync_loss == 1
    assert c.resync_skipped_bytes >= 150 + 9 * 30
    assert any(isinstance(e, TsDiscontinuity) and e.reason == DiscontinuityReason.SYNC_LOSS for e in events)
    assert [key(a) for a in units(events)] == [key(a) for a in units(clean)]


def test_sync_acquisition_needs_five_packets():
    data = load("h264_aac_zerolatency.ts")
    demux = TsDemuxer()
    assert demux.feed(data[: 188 * 4], 0.0) == []
    assert not demux.counters().sync_acquired
    events = demux.feed(data[188 * 4 : 188 * 5], 0.0)
    assert demux.counters().sync_acquired
    assert any(isinstance(e, ProgramChanged) for e in events)  # PAT/PMT in the first packets


def test_single_corrupted_sync_byte_keeps_sync():
    data = bytearray(load("h264_aac_zerolatency.ts"))
    data[188 * 100] = 0x46
    _, demux = demux_all(bytes(data))
    c = demux.counters()
    assert (c.sync_byte_error, c.ts_sync_loss) == (1, 0)
    assert c.resync_skipped_bytes == 188


def test_oversize_pes_dropped():
    events, demux = demux_all(load("h264_aac_zerolatency.ts"), max_pes_size=4096)
    c = demux.counters()
    video = units(events, "h264")
    assert c.pes_oversize > 0
    assert all(len(v.data) <= 4096 for v in video)
    assert len(video) + c.pes_oversize == 50
    assert any(isinstance(e, DemuxError) and e.kind == ErrorKind.PES_OVERSIZE for e in events)


# ------------------------------------------------------- continuity


def packets_of(data: bytes) -> list[bytes]:
    return [data[i : i + 188] for i in range(0, len(data), 188)]


def pid_of(pkt: bytes) -> int:
    return ((pkt[1] & 0x1F) << 8) | pkt[2]


def test_one_lost_packet_one_cc_error():
    pkts = packets_of(load("h264_aac_zerolatency.ts"))
    # drop a video continuation packet in the middle of a PES
    idx = next(i for i in range(100, len(pkts)) if pid_of(pkts[i]) == 0x100 and not pkts[i][1] & 0x40 and pkts[i][3] & 0x30 == 0x10)
    lost = pkts[:idx] + pkts[idx + 1 :]
    events, demux = demux_all(b"".join(lost))
    assert demux.counters().cc_error == 1
    disc = [e for e in events if isinstance(e, TsDiscontinuity)]
    assert [(d.pid, d.reason) for d in disc] == [(0x100, DiscontinuityReason.CC_ERROR)]
    corrupt = [a for a in units(events) if a.corrupt]
    assert len(corrupt) == 1 and corrupt[0].codec == "h264"


def test_lost_pes_start_after_early_completion_is_not_an_overrun():
    pkts = packets_of(load("h264_aac_zerolatency.ts"))
    # the 10th video PES start: its frame is lost, the previous one was already emitted early
    starts = [i for i, p in enumerate(pkts) if pid_of(p) == 0x100 and p[1] & 0x40]
    idx = starts[10]
    events, demux = demux_all(b"".join(pkts[:idx] + pkts[idx + 1 :]))
    c = demux.counters()
    assert (c.cc_error, c.early_overrun) == (1, 0)
    video = units(events, "h264")
    assert len(video) == 49 and all(v.completion == Completion.STUFFING for v in video)
    assert not any(v.corrupt for v in video)


def test_duplicate_packet_allowed_once():
    pkts = packets_of(load("h264_aac_zerolatency.ts"))
    clean, _ = demux_all(b"".join(pkts))
    idx = next(i for i in range(100, len(pkts)) if pid_of(pkts[i]) == 0x100 and not pkts[i][1] & 0x40)
    dup = pkts[: idx + 1] + [pkts[idx]] + pkts[idx + 1 :]
    events, demux = demux_all(b"".join(dup))
    assert demux.counters().cc_error == 0
    assert [key(a) for a in units(events)] == [key(a) for a in units(clean)]
    triple = pkts[: idx + 1] + [pkts[idx], pkts[idx]] + pkts[idx + 1 :]
    _, demux = demux_all(b"".join(triple))
    assert demux.counters().cc_error >= 1


def test_adaptation_only_packets_do_not_advance_cc():
    mux = Mux()
    pkts = mux.section(0, PAT.serialize()) + mux.section(0x1000, pmt_v(0, [(0x100, 0x1B)]).serialize())
    frames = real_video_units(3)
    for au in frames:
        pkts += mux.pes(0x100, 0xE0, au.data, au.pts, bounded=False)
        # PCR-only packet with the CC of the previous packet (as FFmpeg writes)
        cc = (mux.cc[0x100] - 1) & 15
        pkts.append(ts_packet(0x100, b"", cc=cc, adaptation=b"\x10" + (1000 << 15 | 0x3F << 9).to_bytes(6, "big")))
    events, demux = demux_all(b"".join(pkts), chunk=188)
    assert demux.counters().cc_error == 0
    assert [a.data for a in units(events)] == [f.data for f in frames]


# ------------------------------------------------------- PSI


def test_pmt_version_change_switches_pids():
    frames = real_video_units(6)
    mux = Mux()
    opus_desc = [Descriptor(0x05, b"Opus")]
    v0 = pmt_v(0, [(0x100, 0x1B), (0x101, 0x0F)])
    v1 = pmt_v(1, [(0x200, 0x1B), (0x101, 0x06)], opus_desc)
    pkts = mux.section(0, PAT.serialize()) + mux.section(0x1000, v0.serialize())
    for au in frames[:3]:
        pkts += mux.pes(0x100, 0xE0, au.data, au.pts, bounded=False)
    # a PES left open on 0x100 when the PMT changes: dropped, never emitted
    half = mux.pes(0x100, 0xE0, frames[3].data, frames[3].pts, bounded=False)
    pkts += half[: len(half) // 2] if len(half) > 1 else []
    pkts += mux.section(0x1000, v1.serialize())
    for au in frames[3:]:
        pkts += mux.pes(0x200, 0xE0, au.data, au.pts, bounded=False)
        pkts += mux.pes(0x100, 0xE0, au.data, au.pts, bounded=False)  # stale PID: ignored
    events, demux = demux_all(b"".join(pkts), chunk=188 * 3)
    changes = [e for e in events if isinstance(e, ProgramChanged)]
    assert [c.pmt.version for c in changes] == [0, 1]
    assert changes[1].previous.version == 0
    assert changes[1].removed_pids == {0x100, 0x101}
    assert changes[1].added_pids == {0x200, 0x101}
    assert changes[1].pmt.track(0x101).codec == "opus"
    video = units(events)
    assert [(v.pid, v.data) for v in video] == [(0x100, f.data) for f in frames[:3]] + [(0x200, f.data) for f in frames[3:]]
    assert demux.pmt.version == 1


def test_pmt_content_change_same_version_from_concatenated_captures():
    a = load("h264_aac_zerolatency.ts")
    b = load("h264_opus.ts")
    events, _ = demux_all(a + b)
    changes = [e for e in events if isinstance(e, ProgramChanged)]
    assert [c.pmt.track(0x101).codec for c in changes] == ["aac", "opus"]
    assert len(units(events, "opus")) > 90


def test_pmt_crc_error_counted_and_ignored():
    pkts = packets_of(load("h264_aac_zerolatency.ts"))
    bad = list(pkts)
    idx = next(i for i, p in enumerate(pkts) if pid_of(p) == 0x1000)
    p = bytearray(bad[idx])
    p[20] ^= 0x01  # inside the first PMT section
    bad[idx] = bytes(p)
    events, demux = demux_all(b"".join(bad))
    c = demux.counters()
    assert c.crc_error == 1 and c.psi_errors == 1
    assert any(isinstance(e, DemuxError) and e.kind == ErrorKind.PSI_CRC for e in events)
    assert len([e for e in events if isinstance(e, ProgramChanged)]) == 1  # from the next PMT


def test_section_spanning_packets():
    tracks = [(0x100 + i, 0x1B) for i in range(40)]
    big = Pmt(1, 0, 0x100, (Descriptor(0x05, b"TEST"),), tuple(PmtTrack(p, s, None, (Descriptor(0x0A, b"eng\x00"),)) for p, s in tracks))
    mux = Mux()
    pkts = mux.section(0, PAT.serialize()) + mux.section(0x1000, big.serialize())
    assert len(pkts) > 3
    pkts += [ts_packet(0x1FFF, b"", cc=0)] * 2  # null packets: 5 syncs to acquire
    events, _ = demux_all(b"".join(pkts), chunk=188)
    pmt = next(e.pmt for e in events if isinstance(e, ProgramChanged))
    assert len(pmt.tracks) == 40 and pmt.tracks[0].language == "eng"


def test_psi_serialize_round_trip_and_crc():
    pmt = pmt_v(3, [(0x100, 0x1B), (0x101, 0x06)], [Descriptor(0x05, b"Opus")])
    sec = pmt.serialize()
    assert crc32_mpeg2(sec) == 0
    back = Pmt.parse(sec)
    assert back.version == 3 and [t.codec for t in back.tracks] == ["h264", "opus"]
    assert Pat.parse(PAT.serialize()) == PAT


# ------------------------------------------------------- TR 101 290


def test_counters_snapshot_is_frozen():
    _, demux = demux_all(load("h264_aac_zerolatency.ts"))
    c = demux.counters()
    assert isinstance(c, TsCounters)
    with pytest.raises(AttributeError):
        c.cc_error = 5  # type: ignore[misc]
    assert c.packets == len(load("h264_aac_zerolatency.ts")) // 188


def test_pat_pmt_pid_timeouts():
    pkts = packets_of(load("h264_aac_zerolatency.ts"))
    demux = TsDemuxer(pid_timeout=2.0)
    for i, p in enumerate(pkts[:60]):
        demux.feed(p, i * 0.001)
    assert demux.counters().pat_error == 0
    # only video packets from t = 0.06 .. 3.0 s: no PAT, PMT, audio
    video = [p for p in pkts[60:] if pid_of(p) == 0x100]
    t = 0.06
    for p in video[:300]:
        t += 0.01
        demux.feed(p, t)
    c = demux.counters()
    assert t > 2.5
    assert c.pat_error == 1  # one episode, counted once
    assert c.pmt_error == 1
    assert c.pid_error == 1  # the audio PID, absent > 2 s
    # PAT comes back: no new error for the same episode
    demux.feed(next(p for p in pkts if pid_of(p) == 0), t + 0.01)
    assert demux.counters().pat_error == 1
    # a second gap is a second episode
    demux.poll(t + 1.0)
    assert demux.counters().pat_error == 2


def test_pcr_and_pts_repetition():
    pkts = packets_of(load("h264_aac_zerolatency.ts"))
    demux = TsDemuxer()
    t = 0.0
    for i, p in enumerate(pkts):
        t += 0.0005 if i < 300 else 0.01  # the second half arrives 20x slower
        demux.feed(p, t)
    c = demux.counters()
    assert c.pcr_repetition_error > 0
    assert c.pts_error > 0  # audio PES every ~100 packets → ~1 s apart slowed down
    fast = TsDemuxer()
    for i, p in enumerate(pkts):
        fast.feed(p, i * 0.0005)
    assert fast.counters().pcr_repetition_error == 0 and fast.counters().pts_error == 0


def test_transport_error_and_scrambling():
    pkts = packets_of(load("h264_aac_zerolatency.ts"))
    idx = next(i for i in range(50, len(pkts)) if pid_of(pkts[i]) == 0x100 and not pkts[i][1] & 0x40)
    tei = bytearray(pkts[idx])
    tei[1] |= 0x80
    pat_idx = next(i for i in range(50, len(pkts)) if pid_of(pkts[i]) == 0)
    scr = bytearray(pkts[pat_idx])
    scr[3] |= 0x80
    mod = list(pkts)
    mod[idx] = bytes(tei)
    mod[pat_idx] = bytes(scr)
    events, demux = demux_all(b"".join(mod))
    c = demux.counters()
    assert c.transport_error == 1
    assert c.pat_error == 1 and c.scrambled_packets == 1
    assert sum(a.corrupt for a in units(events)) == 1


def test_wrong_table_id_on_pat_pid():
    bad = Pmt(1, 0, 0x100, (), ()).serialize()  # table_id 2 on PID 0
    pkts = [packetize_section(0, bad, cc)[0] for cc in range(6)]
    demux = TsDemuxer()
    events = demux.feed(b"".join(pkts), 0.0)
    assert demux.counters().pat_error == 6  # every occurrence
    assert all(isinstance(e, DemuxError) for e in events)


def test_pes_header_round_trip():
    for pts, dts in ((None, None), (0, None), ((1 << 33) - 1, None), (900_000, 896_400)):
        raw = PesHeader(0xE0, pts, dts).serialize(1000)
        back = PesHeader.parse(raw)
        assert (back.pts, back.dts, back.header_length) == (pts, dts, len(raw))
        assert back.packet_length == len(raw) - 6 + 1000
    assert PesHeader(0xE0, 5).serialize(None)[4:6] == b"\x00\x00"  # unbounded (video)


def test_discontinuity_indicator_allows_cc_jump():
    frames = real_video_units(3)
    mux = Mux()
    pkts = mux.section(0, PAT.serialize()) + mux.section(0x1000, pmt_v(0, [(0x100, 0x1B)]).serialize())
    pkts += mux.pes(0x100, 0xE0, frames[0].data, frames[0].pts, bounded=False)
    # next PES starts with a jumped CC, signalled by discontinuity_indicator
    pes = PesHeader(0xE0, frames[1].pts).serialize(None) + frames[1].data
    first = ts_packet(0x100, pes[:182], cc=9, pusi=True, adaptation=b"\x80")  # full: no stuffing
    rest, cc = packetize_pes(0x100, pes[182:], 10)
    rest[0] = rest[0][:1] + bytes((rest[0][1] & 0xBF,)) + rest[0][2:]
    pkts += [first] + rest
    mux.cc[0x100] = cc
    pkts += mux.pes(0x100, 0xE0, frames[2].data, frames[2].pts, bounded=False)
    events, demux = demux_all(b"".join(pkts), chunk=188)
    assert demux.counters().cc_error == 0
    assert [(e.pid, e.reason) for e in events if isinstance(e, TsDiscontinuity)] == [(0x100, DiscontinuityReason.INDICATOR)]
    assert [a.data for a in units(events)] == [f.data for f in frames]
