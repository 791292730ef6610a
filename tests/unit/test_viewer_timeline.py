"""The adaptive-quality rules on synthetic timelines (tests/viewer_timeline.py):
each rule passes on a well-behaved viewer and fails on the misbehaviour it
exists to catch."""

from __future__ import annotations

from viewer_timeline import Phase, Probe, Sample, ServerView, Switch, Timeline

C0, C1, END = 10.0, 50.0, 65.0  # constraint from C0 to C1, clean until END


def timeline(heights: list[tuple[float, int]], *, stall: tuple[float, float] | None = None,
             switches: list[Switch] | None = None, retransmits_per_s: int = 0,
             server_fields: dict | None = None, keyframes_at_change: bool = True) -> Timeline:
    """Samples every 0.25 s from 0 to END; ``heights`` = (from time, height)."""
    tl = Timeline(high=720, low=180)
    tl.phases = [Phase(0.0, C0, "clean", True), Phase(C0, C1, "policer 400 kbit/s", False, 400_000.0),
                 Phase(C1, END, "clean", True)]
    frames = keys = 0
    height_prev = None
    t = 0.0
    while t <= END:
        height = [h for start, h in heights if start <= t][-1]
        if stall is None or not stall[0] <= t < stall[1]:
            frames += 6
        if t % 1.0 == 0 or (keyframes_at_change and height != height_prev):
            keys += 1
        tl.samples.append(Sample(t, height, frames, keys, 0, 0.0))
        height_prev = height
        t = round(t + 0.25, 2)
    tl.switches = switches or []
    for i in range(int(END) + 1):
        fields = {"stats": {"retransmits": retransmits_per_s * i}}
        fields.update(server_fields or {})
        tl.server.append(ServerView(float(i), fields))
    return tl


GOOD = [(0.0, 720), (C0 + 1.25, 180), (C1 + 3.0, 720)]
# The viewer's REMB, logged with the down-switch: 400 kbit/s = 50,000 B/s =
# 40 retransmitted packets of 1,250 B a second.
GOOD_SWITCHES = [Switch(C0 + 0.5, "high", "low", ("loss",), bandwidth=400_000.0),
                 Switch(C1 + 2.0, "low", "high", ("network_good",), bandwidth=3_000_000.0)]


def test_a_well_behaved_viewer_passes_every_rule() -> None:
    tl = timeline(GOOD, switches=GOOD_SWITCHES, retransmits_per_s=10)
    assert [c for c in tl.checks() if not c.ok] == []


def test_slow_down_switch_fails() -> None:
    check = timeline([(0.0, 720), (C0 + 2.5, 180), (C1 + 3.0, 720)], switches=GOOD_SWITCHES).check_down()
    assert not check.ok and "2.50 s" in check.detail


def test_down_switch_without_a_keyframe_fails() -> None:
    check = timeline(GOOD, switches=GOOD_SWITCHES, keyframes_at_change=False).check_down()
    # Keyframes come once a second here; C0 + 1.25 is not on one.
    assert not check.ok and "no keyframe" in check.detail


def test_flip_flop_under_constraint_fails_and_spaced_probes_pass() -> None:
    flip = [Switch(C0 + 0.5, "high", "low")]
    for k in range(3):
        flip += [Switch(C0 + 5 + 10 * k, "low", "high"), Switch(C0 + 7 + 10 * k, "high", "low")]
    check = timeline(GOOD, switches=flip + GOOD_SWITCHES[1:]).check_up_attempts()
    assert not check.ok and "gaps after the first failure [10.0, 10.0] s" in check.detail
    spaced = [Switch(C0 + 0.5, "high", "low"), Switch(C0 + 5, "low", "high"), Switch(C0 + 7, "high", "low"),
              Switch(C0 + 36, "low", "high"), Switch(C0 + 38, "high", "low")]
    assert timeline(GOOD, switches=spaced + GOOD_SWITCHES[1:]).check_up_attempts().ok


def test_frozen_more_than_a_tenth_of_the_constraint_fails() -> None:
    assert timeline(GOOD, switches=GOOD_SWITCHES, stall=(C0 + 2, C0 + 5)).check_frozen().ok  # 3 of 39.5 s
    check = timeline(GOOD, switches=GOOD_SWITCHES, stall=(C0 + 2, C0 + 8)).check_frozen()
    assert not check.ok and "no frame decoded 6.0 s" in check.detail


def test_not_back_to_high_in_time_fails_and_leaving_high_again_fails() -> None:
    late = timeline([(0.0, 720), (C0 + 1.25, 180), (C1 + 11.0, 720)], switches=GOOD_SWITCHES)
    assert not late.check_back_up().ok
    never = timeline([(0.0, 720), (C0 + 1.25, 180)], switches=GOOD_SWITCHES[:1])
    assert not never.check_back_up().ok and not never.check_stays_high().ok
    flop = timeline([(0.0, 720), (C0 + 1.25, 180), (C1 + 3.0, 720), (C1 + 9.0, 180), (C1 + 11.0, 720)],
                    switches=GOOD_SWITCHES + [Switch(C1 + 8.5, "high", "low")])
    assert flop.check_back_up().ok and not flop.check_stays_high().ok


def test_retransmissions_over_the_viewers_remb_fail() -> None:
    assert timeline(GOOD, switches=GOOD_SWITCHES, retransmits_per_s=40).check_retransmissions().ok
    check = timeline(GOOD, switches=GOOD_SWITCHES, retransmits_per_s=41).check_retransmissions()
    assert not check.ok and "the viewer's last logged REMB" in check.detail
    # Judged from the first REMB on: C0 + 0.5 → END, one interval a second.
    assert "55 intervals" in check.detail


def test_a_probes_remb_counts_and_the_link_share_is_reported() -> None:
    probes = [Probe(C0 + 0.2, "started", bandwidth=200_000.0), Probe(C0 + 0.4, "failed", bandwidth=200_000.0)]
    switches = [Switch(C0 + 0.5, "high", "low", ("loss",)), GOOD_SWITCHES[1]]
    tl = timeline(GOOD, switches=switches, retransmits_per_s=30)
    tl.probes = probes
    check = tl.check_retransmissions()
    # 30 × 1,250 B × 8 = 300 kbit/s: over the 200 kbit/s REMB, 75 % of the 400 kbit/s link.
    assert not check.ok and "of the link's capacity" in check.detail and "75%" in check.detail


def test_retransmissions_are_judged_on_the_servers_estimate_when_it_has_one() -> None:
    fields = {"estimate_bps": 2_000_000}
    check = timeline(GOOD, switches=GOOD_SWITCHES, retransmits_per_s=100, server_fields=fields).check_retransmissions()
    assert check.ok and "the server's estimate" in check.detail and "65 intervals" in check.detail
    fields = {"estimate_bps": 500_000}
    assert not timeline(GOOD, switches=GOOD_SWITCHES, retransmits_per_s=100,
                        server_fields=fields).check_retransmissions().ok


def test_retransmitted_bytes_come_from_the_servers_counter_when_it_has_one() -> None:
    tl = timeline(GOOD, switches=GOOD_SWITCHES)
    tl.server = [ServerView(float(i), {"stats": {"retransmits": 1000 * i},
                                       "stream_metrics": {"returnfeed_webrtc_retransmit_bytes_total": 40_000.0 * i}})
                 for i in range(int(END) + 1)]
    # 1,000 packets a second would be 10 Mbit/s at 1,250 B; the byte counter says 320 kbit/s.
    assert tl.check_retransmissions().ok


def test_no_retransmission_count_is_a_failure_not_a_pass() -> None:
    tl = timeline(GOOD, switches=GOOD_SWITCHES)
    tl.server = [ServerView(float(i), {"stats": {}}) for i in range(10)]
    check = tl.check_retransmissions()
    assert not check.ok and "no retransmission count" in check.detail


def test_probes_are_reported_but_only_up_switches_count_as_up_attempts() -> None:
    probes = []
    for k in range(4):
        probes += [Probe(C0 + 5 + 7 * k, "started"), Probe(C0 + 6 + 7 * k, "failed")]
    tl = timeline(GOOD, switches=GOOD_SWITCHES)
    tl.probes = probes
    check = tl.check_up_attempts()
    assert check.ok and "gaps after the first failed one [7.0, 7.0, 7.0] s" in check.detail
    attempts = tl.up_attempts(C0, C1, probes=True)
    assert [(kind, failed) for _, kind, failed in attempts] == [("probe", True)] * 4
    # A probe that succeeds and the up-switch it leads to are one attempt.
    tl.probes = [Probe(C0 + 5, "started"), Probe(C0 + 6, "failed"), Probe(C0 + 36, "started")]
    tl.switches = GOOD_SWITCHES[:1] + [Switch(C0 + 37, "low", "high", ("probe_ok",))]
    assert [kind for _, kind, _ in tl.up_attempts(C0, C1, probes=True)] == ["probe", "probe"]
    assert [kind for _, kind, _ in tl.up_attempts(C0, C1)] == ["switch"]


def test_frame_callbacks_time_the_changes_more_precisely_than_samples() -> None:
    # Samples say low at C0 + 2.25 (too late); the video element showed it at C0 + 1.9.
    tl = timeline([(0.0, 720), (C0 + 2.25, 180), (C1 + 3.0, 720)], switches=GOOD_SWITCHES)
    assert not tl.check_down().ok
    tl.shown = [(0.5, 720), (C0 + 1.9, 180), (C1 + 2.9, 720)]
    check = tl.check_down()
    assert check.ok and "1.90 s" in check.detail
    assert tl.check_back_up().detail.startswith("high layer shown 2.90 s")


def test_the_servers_estimate_is_averaged_over_each_interval() -> None:
    tl = timeline(GOOD, switches=GOOD_SWITCHES, retransmits_per_s=100)
    # 100 × 1,250 B × 8 = 1 Mbit/s; the estimate falls from 3 Mbit/s to 0 at 20 s.
    for view in tl.server:
        view.fields["estimate_bps"] = 3_000_000 if view.t < 20 else 0
    check = tl.check_retransmissions()
    # 19 → 20 s: mean 1.5 Mbit/s, fine; from 20 s on the estimate is 0: over.
    assert not check.ok and "over in 45" in check.detail
