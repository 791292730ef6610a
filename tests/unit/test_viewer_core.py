"""The viewer's sans-I/O core (media/webrtc/viewer.py), explicit clock, no
sockets: a real stream and fan-out feed it; what it would send is recorded.

Receiver reports → layer down; NACK → RTX within the budget; probe start,
pacing and stop; sender reports from the timer; send failures → close after
``send_failure_timeout``; a send-queue overflow → down, then ``slow_viewer``.
"""

from __future__ import annotations

import ast
import pathlib
import time

import pytest
from viewer_harness import RTX_SSRC, VIDEO_SSRC, WALL0, Studio, Viewer

from media.rtp.layers import Action, LayerPolicy, Reason
from media.rtp.packet import RtpPacket
from media.rtp.rtcp import Nack, Pli, SenderReport, parse_rtcp
from media.webrtc.viewer import (
    TIMER_GRID_S, CloseWanted, KeyframeWanted, LayerSwitched, ProbeFailed, ProbeStarted, SendKind, ViewerDropped,
    ViewerEgress, on_timer_grid,
)

VIEWER = pathlib.Path(__file__).resolve().parents[2] / "media" / "webrtc" / "viewer.py"


def test_the_core_imports_no_clock_loop_socket_or_aiortc() -> None:
    tree = ast.parse(VIEWER.read_text(encoding="utf-8"))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    assert not roots & {"time", "asyncio", "socket", "aiortc", "aioice", "selectors"}, roots


def test_the_core_never_reads_a_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    studio = Studio()
    studio.run_frames(30)
    viewer = Viewer(studio)
    viewer.attach()

    def no_clock() -> float:
        raise AssertionError("the core read a clock")

    # Only the core's calls run under the patch: frames, reports, NACKs, timers.
    core = viewer.core
    packets = studio.fanout.gop_packets(1)[:3]
    with monkeypatch.context() as m:
        m.setattr(time, "monotonic", no_clock)
        m.setattr(time, "time", no_clock)
        now = studio.clock.now + 1.0
        core.on_packets(1, packets, now)
        viewer.report()
        core.on_rtcp("video", Nack(9, VIDEO_SSRC, (0, 1)), now, 0)
        core.handle_timer(now, WALL0 + now)
        core.get_timer()


def test_receiver_reports_with_loss_move_the_viewer_down_a_layer() -> None:
    studio = Studio()
    studio.run_frames(30)
    viewer = Viewer(studio)
    viewer.attach()
    assert viewer.core.layer_name == "high"
    studio.run_frames(13)
    viewer.report()
    assert viewer.events() == []
    studio.run_frames(13)  # ~0.5 s of the high layer: 5 packets a frame
    viewer.report(lost=20)  # 20 of ~65: far over 3 %
    (switched,) = viewer.events()
    assert isinstance(switched, LayerSwitched) and (switched.frm, switched.to) == ("high", "low")
    assert Reason.LOSS in switched.decision.reasons
    assert viewer.video.target_layer == 0 and viewer.core.stats.switches == 1
    # Down from congestion: the old layer stops at once, the new one starts
    # at its keyframe.
    t = studio.clock.now
    studio.run_frames(GOP_FRAMES)
    assert set(viewer.layers_sent(since=t + 1e-6)) == {"low"}
    assert viewer.core.layer_name == "low"


GOP_FRAMES = 26


def test_nacks_are_answered_by_rtx_within_the_budget() -> None:
    studio = Studio()
    studio.run_frames(30)
    viewer = Viewer(studio)
    viewer.attach()
    studio.run_frames(10)
    viewer.report()
    sent = [RtpPacket.parse(d) for _, d in viewer.sent if RtpPacket.parse(d).ssrc == VIDEO_SSRC]
    wanted = tuple(p.sequence_number for p in sent[-3:])
    out = viewer.core.on_rtcp("video", Nack(9, VIDEO_SSRC, wanted), studio.clock.now, 0)
    assert [RtpPacket.parse(d).ssrc for d in out] == [RTX_SSRC] * 3
    # RFC 4588 §4: the RTX payload starts with the original sequence number.
    assert [int.from_bytes(RtpPacket.parse(d).payload[:2], "big") for d in out] == list(wanted)
    viewer.core.on_sent(SendKind.RETRANSMIT, len(out), 3000, False, None, studio.clock.now)
    stats = viewer.core.stats
    assert (stats.nacks, stats.retransmits, stats.retransmit_bytes, stats.retransmits_dropped) == (1, 3, 3000, 0)
    # A storm: everything of the last frames at once. The budget (a share
    # of the layer's rate, at least one burst) pays for part of it; the
    # rest is counted, not sent.
    storm = tuple(p.sequence_number for p in sent[-53:-3])
    out = viewer.core.on_rtcp("video", Nack(9, VIDEO_SSRC, storm), studio.clock.now, 0)
    assert 0 < len(out) < len(storm)
    assert stats.retransmits_dropped == len(storm) - len(out)
    # A NACK for another SSRC is not ours.
    assert viewer.core.on_rtcp("video", Nack(9, 4242, wanted), studio.clock.now, 0) == []
    assert stats.nacks == 2


def test_a_picture_request_freezes_the_viewer_until_its_next_keyframe() -> None:
    studio = Studio()
    studio.run_frames(30)
    viewer = Viewer(studio)
    viewer.attach()
    studio.run_frames(5)
    viewer.core.on_rtcp("video", Pli(9, VIDEO_SSRC), studio.clock.now, 0)
    assert viewer.events() == [KeyframeWanted()]
    assert viewer.core.frozen and viewer.core.struggling(False)
    studio.run_frames(GOP_FRAMES)  # the layer's next keyframe
    assert not viewer.core.frozen and viewer.core.stats.freezes == 1 and viewer.core.stats.plis == 1
    # From the PLI (after frame 35) to the keyframe at frame 50 (published at step 51).
    assert viewer.core.stats.frozen_s == pytest.approx(16 * 0.04)


def _clean_until(viewer: Viewer, studio: Studio, seconds: float) -> list:
    """Clean reports four times a second, the core's timer fired as it asks."""
    events = []
    end = studio.clock.now + seconds
    while studio.clock.now < end:
        studio.step()
        if studio.frame % 6 == 0:
            viewer.report()
        viewer.timers()
        events += viewer.events()
    return events


def test_probe_starts_on_a_clean_link_is_paced_by_the_timer_and_stops_on_loss() -> None:
    studio = Studio()
    studio.run_frames(30)
    viewer = Viewer(studio, pin="low")
    viewer.attach()
    viewer.core.pin(None, studio.clock.now)  # automatic from the lowest layer
    events = _clean_until(viewer, studio, 3.5)
    started = [e for e in events if isinstance(e, ProbeStarted)]
    assert len(started) == 1 and started[0].to == "high" and started[0].decision.action is Action.PROBE
    assert viewer.core.probing and viewer.core.stats.probes == 1
    # The pacer's next batch is the timer, well before the next sender report.
    now = studio.clock.now
    assert viewer.core.get_timer() <= now + 0.015
    # What the timer sent since the start: RTX copies of recent packets.
    events += _clean_until(viewer, studio, 0.5)
    probe = [at for at, d in viewer.sent if at >= started[0].decision.at and RtpPacket.parse(d).ssrc == RTX_SSRC]
    assert len(probe) > 5 and viewer.core.stats.probe_bytes > 0
    assert viewer.core.stats.retransmits == 0  # probe bytes are not retransmissions
    # While probing a sender report goes out every 100 ms (the RTT then
    # follows the queue the probe builds).
    assert any(isinstance(p, SenderReport) and p.ssrc == VIDEO_SSRC
               for _, d in viewer.rtcp for p in parse_rtcp(d))
    # Loss during the probe fails it: the pacer stops, only the report timer is left.
    studio.run_frames(3)
    viewer.report(lost=30)
    failed = [e for e in viewer.events() if isinstance(e, ProbeFailed)]
    assert len(failed) == 1 and failed[0].probe_bytes > 0
    assert not viewer.core.probing and viewer.core.stats.probes_failed == 1
    assert viewer.core.get_timer() > studio.clock.now + 0.1
    assert viewer.core.layer_name == "low"


def test_sender_reports_come_from_the_timer_once_a_second() -> None:
    studio = Studio()
    studio.run_frames(30)
    viewer = Viewer(studio)
    t0 = studio.clock.now
    assert viewer.core.get_timer() is None  # nothing before the viewer is attached
    viewer.attach()
    assert viewer.core.get_timer() == pytest.approx(t0 + 1.0)
    studio.clock.now = t0 + 1.0
    viewer.timers()
    (sr_compound,) = [d for _, d in viewer.rtcp]
    sr = parse_rtcp(sr_compound)[0]
    # Only the track that has sent reports (no audio was published).
    assert isinstance(sr, SenderReport) and sr.ssrc == VIDEO_SSRC
    assert viewer.core.get_timer() == pytest.approx(t0 + 2.0)


def test_sender_report_and_failure_deadlines_fall_on_one_grid_for_every_viewer() -> None:
    """Viewers attached at different moments share their timer's points
    (one event-loop wake-up serves them all); a probe's pace stays exact
    (the probe test above)."""
    for at in (0.0, 0.013, 1001.0, 1001.02, 1234.5678, 86400.019999):
        slot = on_timer_grid(at)
        assert at <= slot < at + TIMER_GRID_S + 1e-9
        assert abs(slot / TIMER_GRID_S - round(slot / TIMER_GRID_S)) < 1e-6
    studio = Studio()
    studio.run_frames(30)
    first = Viewer(studio)
    studio.clock.now += 0.003
    first.attach()
    t0 = studio.clock.now
    studio.clock.now += 0.011
    second = Viewer(studio)
    second.attach()
    due = first.core.get_timer()
    assert due == second.core.get_timer() == on_timer_grid(t0 + 1.0) == on_timer_grid(t0 + 1.011)
    assert t0 + 1.0 <= due < t0 + 1.0 + TIMER_GRID_S
    for viewer in (first, second):
        studio.clock.now = due
        viewer.timers()
        assert [type(parse_rtcp(d)[0]) for _, d in viewer.rtcp] == [SenderReport]  # due at the grid point
    # The send-failure limit too (once no sender report comes before it).
    core = first.core
    t1 = due + 0.007
    core.on_sent(SendKind.MEDIA, 1, 0, False, t1, t1)
    limit = t1 + core.send_failure_timeout
    while (at := core.get_timer()) < limit:
        core.handle_timer(at, WALL0 + at)
    assert at == on_timer_grid(limit) and limit <= at < limit + TIMER_GRID_S
    core.handle_timer(at, WALL0 + at)
    assert [type(e) for e in first.events()] == [CloseWanted]


def test_every_send_failing_closes_the_viewer_after_the_timeout_not_before() -> None:
    studio = Studio()
    studio.run_frames(30)
    viewer = Viewer(studio, send_failure_timeout=5.0)
    viewer.attach()
    core = viewer.core
    t0 = studio.clock.now
    # A transient failure, then a success: nothing pending.
    core.on_sent(SendKind.MEDIA, 1, 0, False, t0, t0)
    assert core.get_timer() == pytest.approx(t0 + 1.0)  # the sender report is sooner
    core.on_sent(SendKind.MEDIA, 1, 1200, False, None, t0 + 0.04)
    assert core.get_timer() == pytest.approx(t0 + 1.0)
    # Then every send fails from t1 on; with no frames flowing the timer
    # still ends it at t1 + 5 s.
    t1 = t0 + 0.08
    core.on_sent(SendKind.MEDIA, 1, 0, False, t1, t1)
    for at in (t0 + 1.0, t0 + 2.0, t0 + 3.0, t0 + 4.0, t0 + 5.0):
        assert core.get_timer() == pytest.approx(at)
        core.handle_timer(at, WALL0 + at)
    assert viewer.events() == []
    assert core.get_timer() == pytest.approx(t1 + 5.0)
    core.handle_timer(t1 + 5.0, WALL0 + t1 + 5.0)
    (close,) = viewer.events()
    assert isinstance(close, CloseWanted) and close.reason == "send_failed"
    assert close.detail.startswith("every send failed for 5.0 s")
    assert core.get_timer() is None  # closing: nothing more to do
    core.handle_timer(t1 + 6.0, WALL0 + t1 + 6.0)
    assert viewer.events() == []  # asked once


def test_send_queue_overflow_moves_down_then_drops_the_slow_viewer() -> None:
    studio = Studio()
    studio.run_frames(30)
    viewer = Viewer(studio)
    viewer.attach()
    viewer.overflow = True
    studio.step()
    (down,) = viewer.events()
    assert isinstance(down, LayerSwitched) and (down.frm, down.to) == ("high", "low")
    assert down.decision.reasons == (Reason.SEND_QUEUE_OVERFLOW,)
    viewer.overflow = False
    studio.run_frames(GOP_FRAMES)  # onto the low layer at its keyframe
    assert viewer.core.layer_name == "low"
    viewer.overflow = True
    studio.step()
    events = viewer.events()
    assert [type(e) for e in events] == [ViewerDropped, CloseWanted]
    assert events[1].reason == "slow_viewer"
    assert viewer.core.stats.backlog_events == 2


def test_pin_validates_the_layer_and_switches_at_the_next_keyframe() -> None:
    studio = Studio()
    studio.run_frames(30)
    viewer = Viewer(studio)
    viewer.attach()
    with pytest.raises(ValueError, match="no layer 'mid'"):
        viewer.core.pin("mid", studio.clock.now)
    studio.run_frames(5)
    t = studio.clock.now
    viewer.core.pin("low", t)
    assert viewer.core.pinned
    studio.run_frames(10)
    # Pinned (not congested): the old layer flows until the new one's keyframe.
    assert set(viewer.layers_sent(since=t + 1e-6)) == {"high"}
    studio.run_frames(15)
    tail = viewer.layers_sent(since=t + 1e-6)
    first_low = tail.index("low")
    assert set(tail[:first_low]) == {"high"} and set(tail[first_low:]) == {"low"}


def test_a_fresh_core_has_no_layers_and_starts_high() -> None:
    core = ViewerEgress(Studio().fanout, object(), cname=b"x", policy=LayerPolicy())
    assert core.layer is None and core.initial_layer() == 0 and core.get_timer() is None
