"""Stream detectors (live_qc/stream.py) driven by scripted frames and
counters with explicit ``now``: each opens at its threshold with the start
back-dated, closes with hysteresis, and stays quiet on a healthy stream
(network jitter, keyframe bursts, a single missing frame)."""

from __future__ import annotations

import random

import pytest

from live_qc.markers import MarkerEvent
from live_qc.stream import TR101290_P1, TR101290_P2, StreamMonitor
from live_qc.thresholds import Thresholds

FPS = 30.0
# The wall clock runs this far ahead of media time (the monitor must not care).
OFFSET = 1000.0


def snap(t: float, rate: float) -> float:
    """``t`` on the grid of ``rate`` when it is there but for float error (so
    a frame due at 10.0 is not at 9.9999999)."""
    k = round(t * rate)
    return k / rate if abs(t * rate - k) < 1e-6 else t


class Feed:
    """A 30 fps video + 50 packets/s audio source with a scripted timeline.

    ``video_gaps`` / ``audio_gaps``: media-time ranges with no frames of that
    kind; ``fps_at(t)``: the video frame rate at ``t``; ``size_at(t, key)``:
    a video frame's bytes. The monitor's timer is honoured between frames,
    as the server's loop does."""

    def __init__(self, mon: StreamMonitor, *, jitter: float = 0.0, seed: int = 1) -> None:
        self.mon = mon
        self.events: list[tuple[float, MarkerEvent]] = []
        self.rng = random.Random(seed)
        self.jitter = jitter
        self.counter_sources: dict = {}

    def run(self, until: float, *, start: float = 0.0, video_gaps=(), audio_gaps=(), fps_at=lambda t: FPS,
            size_at=lambda t, key: 40000 if key else 8000, gop: float = 1.0, video: bool = True,
            audio: bool = True, counters=None, pts_of=None, data_of=None, sample_every: float = 0.1) -> None:
        schedule: list[tuple[float, str]] = []
        if video:
            t = start
            while t < until:
                if not any(a <= t < b for a, b in video_gaps):
                    schedule.append((t, "video"))
                t = snap(t + 1.0 / fps_at(t), fps_at(t))
        if audio:
            t = start
            while t < until:
                if not any(a <= t < b for a, b in audio_gaps):
                    schedule.append((t, "audio"))
                t = snap(t + 0.02, 50)
        if counters is not None:
            t = start
            while t < until:
                schedule.append((t, "counters"))
                t = snap(t + sample_every, 1 / sample_every)
        schedule.sort()
        last_key = None
        for t, kind in schedule:
            now = OFFSET + t + (self.rng.uniform(0, self.jitter) if kind != "counters" else 0.0)
            self.timers(now)
            if kind == "counters":
                self.add(now, self.mon.on_counters(now, counters(t)))
            elif kind == "audio":
                self.add(now, self.mon.on_frame("audio", now, t, 300))
            else:
                key = last_key is None or t - last_key >= gop - 1e-9
                if key:
                    last_key = t
                pts, dts = pts_of(t) if pts_of else (round(t * 90000), round(t * 90000))
                data = data_of(t) if (data_of and key) else None
                self.add(now, self.mon.on_frame("video", now, t, size_at(t, key), key, pts, dts, data,
                                                "h264" if data else None))
        self.timers(OFFSET + until)

    def timers(self, now: float) -> None:
        for _ in range(100):
            deadline = self.mon.get_timer()
            if deadline is None or deadline > now:
                return
            self.add(deadline, self.mon.handle_timer(deadline))
        raise AssertionError("the monitor's timer does not move forward")

    def idle(self, start: float, until: float, step: float = 0.05) -> None:
        """Wall clock passes with no frames (only the timer)."""
        t = start
        while t < until:
            self.timers(OFFSET + t)
            t += step

    def add(self, now: float, events: list[MarkerEvent]) -> None:
        self.events += [(now - OFFSET, e) for e in events]

    def of(self, subtype: str) -> list[tuple[float, MarkerEvent]]:
        return [(t, e) for t, e in self.events if e.marker.subtype == subtype]


def kinds(events) -> list[str]:
    return [e.kind for _, e in events]


def test_healthy_stream_with_jitter_keyframe_bursts_and_one_missing_frame_is_quiet():
    mon = StreamMonitor()
    feed = Feed(mon, jitter=0.15)
    missing = 12.0 + 5 / FPS
    feed.run(30.0, video_gaps=[(missing - 1e-6, missing + 1e-6)], size_at=lambda t, key: 120000 if key else 6000)
    assert feed.events == []
    assert mon.flush(OFFSET + 30.0) == []


def test_video_stall_while_audio_continues_opens_at_threshold_back_dated_and_closes_on_return():
    feed = Feed(StreamMonitor(Thresholds(stall_d=2.0)))
    feed.run(20.0, video_gaps=[(10.0, 14.0)])
    stall = feed.of("video_stalled")
    assert kinds(stall) == ["open", "close"]
    (t_open, opened), (t_close, closed) = stall
    # Raised on the wall clock once the gap reaches stall_d, not at the next frame.
    assert t_open == pytest.approx(10.0 + 2.0, abs=1 / FPS + 1e-6)
    assert opened.marker.type == "stall" and opened.marker.severity == "error"
    assert closed.marker.start == pytest.approx(10.0, abs=0.01)  # where the next frame was due
    assert closed.marker.end == pytest.approx(14.0, abs=0.03)
    assert t_close == pytest.approx(14.0, abs=0.03)
    assert feed.of("audio_stalled") == []


def test_audio_stall_while_video_continues():
    feed = Feed(StreamMonitor())
    feed.run(15.0, audio_gaps=[(5.0, 9.5)])
    stall = feed.of("audio_stalled")
    assert kinds(stall) == ["open", "close"]
    assert stall[1][1].marker.start == pytest.approx(5.0, abs=0.01)
    assert stall[1][1].marker.end == pytest.approx(9.5, abs=0.04)


def test_gap_shorter_than_the_threshold_is_no_stall():
    feed = Feed(StreamMonitor(Thresholds(stall_d=2.0)))
    feed.run(12.0, video_gaps=[(5.0, 6.8)])
    assert feed.of("video_stalled") == []


def test_source_gone_is_not_a_stall_but_a_connected_source_without_frames_is():
    mon = StreamMonitor()
    feed = Feed(mon)
    feed.run(5.0, counters=lambda t: {"srt": {"packets": int(t * 100)}})
    t = 5.0
    while t < 10.0:  # the publisher left: no source any more, no frames
        feed.timers(OFFSET + t)
        feed.add(OFFSET + t, mon.on_counters(OFFSET + t, {}))
        t = snap(t + 0.1, 10)
    assert feed.events == []
    # Frames again, then both tracks stop while the source stays connected
    # and its counters stand still: a hung encoder.
    feed.run(15.0, start=10.0, counters=lambda t: {"srt2": {"packets": int(t * 100)}})
    while t < 19.0:
        t = snap(t + 0.1, 10)
        if t < 15.0:
            continue
        now = OFFSET + t
        feed.timers(now)
        feed.add(now, mon.on_counters(now, {"srt2": {"packets": 1500}}))
    assert kinds(feed.of("video_stalled")) == ["open"]
    assert kinds(feed.of("audio_stalled")) == ["open"]
    assert feed.of("video_stalled")[0][0] == pytest.approx(17.0, abs=0.11)
    closing = mon.flush(OFFSET + 19.0)
    assert sorted(e.marker.subtype for e in closing if e.kind == "close") == ["audio_stalled", "video_stalled"]


def test_a_source_that_leaves_ends_its_open_stall():
    """A hung encoder (connected, nothing flowing) opens a stall; when its
    connection finally drops (peer-idle timeout) the stall ends there, not
    when — or if — the stream's publisher reconnects."""
    mon = StreamMonitor()
    feed = Feed(mon)
    feed.run(5.0, counters=lambda t: {"srt": {"packets": int(t * 100)}})
    t = 5.0
    while t < 12.0:  # connected, nothing arrives
        now = OFFSET + t
        feed.timers(now)
        feed.add(now, mon.on_counters(now, {"srt": {"packets": 500}}))
        t = snap(t + 0.1, 10)
    assert kinds(feed.of("video_stalled")) == ["open"]
    while t < 20.0:  # the caller is gone; the stream waits for it
        now = OFFSET + t
        feed.timers(now)
        feed.add(now, mon.on_counters(now, {}))
        t = snap(t + 0.1, 10)
    for sub in ("video_stalled", "audio_stalled"):
        assert kinds(feed.of(sub)) == ["open", "close"]
        closed_at, ev = feed.of(sub)[1]
        assert closed_at == pytest.approx(12.0, abs=0.01)
        assert ev.marker.end == pytest.approx(12.0, abs=0.11)
    assert mon.flush(OFFSET + 20.0) == []


def test_reconnect_ends_an_open_stall():
    mon = StreamMonitor()
    feed = Feed(mon)
    feed.run(10.0, video_gaps=[(5.0, 10.0)])
    assert kinds(feed.of("video_stalled")) == ["open"]
    events = mon.on_discontinuity(OFFSET + 10.0, "reconnect")
    assert [(e.kind, e.marker.subtype) for e in events] == [("close", "video_stalled")]


def test_frame_rate_drop_against_the_streams_own_rate():
    feed = Feed(StreamMonitor(Thresholds(fps_ratio=0.8, fps_d=2.0)))
    feed.run(30.0, fps_at=lambda t: 12.0 if 15.0 <= t < 21.0 else FPS)
    drop = feed.of("fps_drop")
    assert kinds(drop) == ["open", "close"]
    opened, closed = drop[0][1].marker, drop[1][1].marker
    assert opened.type == "stall" and opened.severity == "warning"
    assert opened.start == pytest.approx(15.0, abs=0.1)  # back-dated past the measuring window's lag
    assert drop[0][0] == pytest.approx(17.0, abs=0.15)
    assert closed.end == pytest.approx(21.0, abs=1.1)  # the window refills within fps_window_s
    assert closed.metadata["baseline_fps"] == pytest.approx(30.0, abs=1.0)
    assert closed.metadata["fps"] < 24


def test_a_stream_that_always_ran_slow_has_no_frame_rate_drop():
    feed = Feed(StreamMonitor())
    feed.run(30.0, fps_at=lambda t: 12.0)
    assert feed.events == []


def test_short_frame_rate_dip_below_the_duration_is_quiet():
    feed = Feed(StreamMonitor(Thresholds(fps_d=2.0)))
    feed.run(30.0, fps_at=lambda t: 10.0 if 15.0 <= t < 15.8 else FPS)
    assert feed.of("fps_drop") == []


def test_bitrate_collapse_opens_and_closes():
    feed = Feed(StreamMonitor(Thresholds(bitrate_ratio=0.25, bitrate_d=2.0)))
    feed.run(40.0, size_at=lambda t, key: (4000 if key else 500) if 15.0 <= t < 25.0 else (60000 if key else 10000))
    br = feed.of("bitrate_collapse")
    assert kinds(br) == ["open", "close"]
    closed = br[1][1].marker
    assert 15.0 <= closed.start <= 17.0
    assert 25.0 <= closed.end <= 27.5
    assert closed.metadata["baseline_bps"] > 4 * closed.metadata["bitrate_bps"]
    assert feed.of("fps_drop") == []


def test_b_frames_appearing_open_an_error_that_closes_after_they_stop():
    def pts_of(t):
        i = round(t * FPS)
        dts = round(i * 3000)
        if 10.0 <= t < 13.0:
            return dts + 6000, dts  # reordered: display runs two frames behind decode
        return dts, dts
    feed = Feed(StreamMonitor(Thresholds(transport_clear_s=2.0)))
    feed.run(20.0, pts_of=pts_of)
    b = feed.of("b_frames")
    assert kinds(b) == ["open", "close"]
    assert b[0][1].marker.type == "transport" and b[0][1].marker.severity == "error"
    assert b[0][1].marker.start == pytest.approx(10.0, abs=0.04)
    assert b[1][1].marker.end == pytest.approx(13.0, abs=0.04)
    assert b[1][0] == pytest.approx(15.0, abs=0.05)  # hysteresis
    # 90 with pts ≠ dts, and the first in-order frame, shown before the last of them
    assert b[1][1].marker.metadata == {"reordered_frames": 91}


def test_pts_going_back_without_dts_is_reordering_too():
    mon = StreamMonitor()
    for i, pts in enumerate([0, 3000, 9000, 6000, 12000]):
        events = mon.on_frame("video", float(i), i / 30, 1000, i == 0, pts, None)
        if pts == 6000:
            assert [(e.kind, e.marker.subtype) for e in events] == [("open", "b_frames")]
        else:
            assert events == []


def _sps_au(width: int, height: int, profile_idc: int = 66, level_idc: int = 30) -> bytes:
    """An IDR access unit whose SPS says ``width``×``height`` (baseline-style
    fields, exp-Golomb coded by hand; ITU-T H.264 §7.3.2.1.1)."""
    bits = []

    def u(n, v):
        bits.extend((v >> (n - 1 - i)) & 1 for i in range(n))

    def ue(v):
        v += 1
        n = v.bit_length()
        bits.extend([0] * (n - 1))
        u(n, v)
    u(8, profile_idc)
    u(8, 0xC0)
    u(8, level_idc)
    ue(0)  # sps id
    if profile_idc in (100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135):
        ue(1)  # chroma_format_idc 4:2:0
        ue(0)
        ue(0)
        u(1, 0)
        u(1, 0)
    ue(0)  # log2_max_frame_num - 4
    ue(2)  # poc type 2
    ue(1)  # max_num_ref_frames
    u(1, 0)
    ue(width // 16 - 1)
    ue(height // 16 - 1)
    u(1, 1)  # frame_mbs_only
    u(1, 1)  # direct_8x8
    u(1, 0)  # no cropping
    u(1, 0)  # no VUI
    u(1, 1)  # rbsp stop bit
    while len(bits) % 8:
        bits.append(0)
    payload = bytes(int("".join(map(str, bits[i:i + 8])), 2) for i in range(0, len(bits), 8))
    return b"\x00\x00\x00\x01\x67" + payload + b"\x00\x00\x00\x01\x68\xce\x38\x80\x00\x00\x01\x65\x88\x84\x21"


def test_the_hand_made_sps_parses_as_intended():
    from media import h264

    sps = h264.Sps.parse(h264.scan_access_unit(_sps_au(640, 368, 100, 31)).sps)
    assert (sps.width, sps.height, sps.profile_idc, sps.level_idc) == (640, 368, 100, 31)


def test_resolution_and_profile_changes_open_markers_with_from_and_to():
    feed = Feed(StreamMonitor(Thresholds(transport_clear_s=2.0)))
    feed.run(30.0, data_of=lambda t: (_sps_au(1280, 720) if t < 10.0 else _sps_au(640, 368) if t < 20.0
                                      else _sps_au(640, 368, 100, 31)))
    res = feed.of("resolution_change")
    assert kinds(res) == ["open", "close"]
    assert res[0][1].marker.start == pytest.approx(10.0, abs=0.04)
    assert res[0][1].marker.metadata == {"from": "1280x720", "to": "640x368"}
    assert res[1][0] == pytest.approx(12.0, abs=0.05)
    prof = feed.of("profile_change")
    assert kinds(prof) == ["open", "close"]
    assert prof[0][1].marker.start == pytest.approx(20.0, abs=0.04)
    assert prof[0][1].marker.metadata == {"from_profile_idc": 66, "to_profile_idc": 100,
                                         "from_level_idc": 30, "to_level_idc": 31}
    # The same SPS repeated at every keyframe is no change.
    assert len(feed.events) == 4


def _counter_run(schedule: dict[float, dict[str, int]]):
    """TsCounters-like running totals, incremented at the scheduled media times."""
    totals = dict.fromkeys(("packets",) + TR101290_P1 + TR101290_P2, 0)

    def sample(t):
        totals["packets"] += 50
        for at, bumps in schedule.items():
            if at <= t < at + 0.1 - 1e-9:
                for k, v in bumps.items():
                    totals[k] = totals.get(k, 0) + v
        return {"ts": dict(totals)}
    return sample


def test_every_tr101290_counter_opens_a_transport_marker_with_its_priority():
    names = TR101290_P1 + TR101290_P2
    schedule = {5.0 + i: {name: 1} for i, name in enumerate(names)}
    feed = Feed(StreamMonitor(Thresholds(transport_clear_s=0.5, pcr_repetition_min=1)))
    feed.run(20.0, counters=_counter_run(schedule))
    for i, name in enumerate(names):
        ev = feed.of(name)
        assert kinds(ev) == ["open", "close"], name
        m = ev[1][1].marker
        assert m.type == "transport"
        assert m.severity == ("error" if name in TR101290_P1 else "warning")
        assert m.metadata == {"count": 1, "total": 1}, name
        assert 4.85 <= m.start <= 5.0 + i + 0.05
        assert ev[0][0] == pytest.approx(5.0 + i, abs=0.11)
        assert ev[1][0] == pytest.approx(5.5 + i, abs=0.11)


def test_cc_errors_extend_one_marker_and_close_after_the_quiet_period():
    schedule = {5.0: {"cc_error": 3}, 5.5: {"cc_error": 1}, 6.6: {"cc_error": 2}, 7.0: {"cc_error": 1}}
    feed = Feed(StreamMonitor(Thresholds(transport_clear_s=2.0)))
    feed.run(15.0, counters=_counter_run(schedule))
    cc = feed.of("cc_error")
    assert kinds(cc)[0] == "open" and kinds(cc)[-1] == "close"
    assert set(kinds(cc)[1:-1]) <= {"update"}
    assert "update" in kinds(cc)  # the counts reach the control room while it is open
    closed = cc[-1][1].marker
    assert closed.start == pytest.approx(4.9, abs=0.11)
    assert closed.end == pytest.approx(7.0, abs=0.11)
    assert cc[-1][0] == pytest.approx(9.0, abs=0.11)
    assert closed.metadata == {"count": 7, "total": 7}


def test_a_lone_late_pcr_is_jitter_but_late_pcrs_in_a_row_are_a_marker():
    schedule = {3.0: {"pcr_repetition_error": 1}, 5.0: {"pcr_repetition_error": 1},
                10.0: {"pcr_repetition_error": 2}, 10.3: {"pcr_repetition_error": 1},
                10.6: {"pcr_repetition_error": 2}}
    feed = Feed(StreamMonitor(Thresholds(pcr_repetition_min=3, pcr_repetition_window_s=1.0,
                                         transport_clear_s=1.0)))
    feed.run(15.0, counters=_counter_run(schedule))
    pcr = feed.of("pcr_repetition_error")
    assert kinds(pcr)[0] == "open" and kinds(pcr)[-1] == "close"
    assert pcr[0][0] == pytest.approx(10.3, abs=0.01)
    assert pcr[-1][1].marker.metadata["count"] == 5  # the ones that made it a fault count too
    assert pcr[-1][1].marker.severity == "warning"


def test_first_sample_and_a_restarted_source_are_baselines_not_errors():
    feed = Feed(StreamMonitor())
    state = {"n": 0}

    def sample(t):
        state["n"] += 1
        # Already 40 CC errors when the tap attached; a new session at 5 s starts from zero.
        return {"ts": {"cc_error": 40 if t < 5.0 else 0, "packets": state["n"] * 10}}
    feed.run(10.0, counters=sample)
    assert feed.events == []


@pytest.mark.parametrize("link,recv_key,loss_key,drop_key", [
    ("srt", "pktRecv", "pktRcvLoss", "pktRcvDrop"),  # libsrt's totals
    ("rtp", "rtpRecv", "rtpGaps", "rtpLost"),  # a WHIP publisher's RTP (rtp_ingest.source_counters)
])
def test_link_loss_burst_and_drop(link, recv_key, loss_key, drop_key):
    state = {"recv": 0, "loss": 0, "drop": 0}

    def sample(t):
        state["recv"] += 40
        if 5.0 <= t < 6.0:
            state["loss"] += 5  # 50 lost of 450 in a second
        if 6.0 <= t < 6.1:
            state["drop"] += 3
        if 12.0 <= t < 13.0 and round(t * 10) % 3 == 0:
            state["loss"] += 1  # a trickle below srt_loss_min: repaired by retransmission
        return {link: {recv_key: state["recv"], loss_key: state["loss"], drop_key: state["drop"]}}
    feed = Feed(StreamMonitor(Thresholds(srt_loss_min=10, srt_loss_ratio=0.02, transport_clear_s=1.0)))
    feed.run(16.0, counters=sample)
    other = "rtp" if link == "srt" else "srt"
    assert not feed.of(f"{other}_loss") and not feed.of(f"{other}_drop")
    loss = feed.of(f"{link}_loss")
    assert kinds(loss) == ["open", "update", "close"]
    assert loss[1][1].marker.metadata["lost"] == 45
    assert loss[0][0] == pytest.approx(5.1, abs=0.01)  # the window reached srt_loss_min
    assert loss[0][1].marker.start == pytest.approx(5.0, abs=0.01)
    assert loss[2][1].marker.end == pytest.approx(5.9, abs=0.11)
    drop = feed.of(f"{link}_drop")
    assert kinds(drop) == ["open", "close"]
    assert drop[0][1].marker.severity == "error"
    assert drop[1][1].marker.metadata["dropped"] == 3


def test_timer_never_spins_on_a_deadline_it_cannot_act_on():
    mon = StreamMonitor()
    mon.on_frame("audio", 0.0, 0.0, 100)  # audio-only stream, then silence on the wire
    deadline = mon.get_timer()
    assert deadline == pytest.approx(2.0)
    assert mon.handle_timer(deadline) == []
    assert mon.get_timer() is None


def test_flush_closes_everything_open():
    mon = StreamMonitor()
    feed = Feed(mon)
    feed.run(9.0, video_gaps=[(6.0, 9.0)], counters=_counter_run({8.0: {"pat_error": 1}}))
    assert sorted(e.marker.subtype for _, e in feed.events if e.kind == "open") == ["pat_error", "video_stalled"]
    closed = mon.flush(OFFSET + 9.0)
    assert sorted(e.marker.subtype for e in closed if e.kind == "close") == ["pat_error", "video_stalled"]
    assert all(e.marker.end is not None for e in closed)


def test_frames_lost_before_the_monitor_are_no_rate_drop_and_an_open_drop_survives_them():
    mon = StreamMonitor(Thresholds(fps_d=2.0))
    feed = Feed(mon)
    feed.run(15.0)
    # The reader overflowed: 0.8 s of frames never reached the monitor.
    feed.add(OFFSET + 15.0, mon.on_discontinuity(OFFSET + 15.0, "overflow"))
    feed.run(25.0, start=15.8)
    assert feed.events == []
    # A real drop, then packets lost mid-drop: the marker stays open through it.
    feed.run(30.0, start=25.0, fps_at=lambda t: 10.0)
    assert kinds(feed.of("fps_drop")) == ["open"]
    feed.add(OFFSET + 30.0, mon.on_discontinuity(OFFSET + 30.0, "source"))
    feed.run(34.0, start=30.0, fps_at=lambda t: 10.0)
    assert kinds(feed.of("fps_drop")) == ["open"]
    feed.run(40.0, start=34.0)
    assert kinds(feed.of("fps_drop")) == ["open", "close"]
    assert feed.of("fps_drop")[-1][1].marker.start == pytest.approx(25.0, abs=0.15)
