"""Layer selector: each product rule, the cooldown, loss over time, probing,
backoff after failed up-switches, pinning, overflow — explicit clock.

Receiver reports are scripted as the counters a real receiver keeps
(extended highest sequence number, cumulative lost, RFC 3550 §6.4.1).
"""

from __future__ import annotations

import pytest

from media.rtp.layers import Action, LayerDecision, LayerPolicy, LayerSelector, Reason

GOOD_BW = 2_000_000
# Most tests here are about one rule at a time: a short up window lets one
# clean report satisfy it (the window itself has its own tests below).
QUICK = LayerPolicy(up_window=0.25)


class Receiver:
    """Counters of one viewer's video SSRC, advanced by packets and loss."""

    def __init__(self, sel: LayerSelector) -> None:
        self.sel = sel
        self.highest = 1000
        self.lost = 0

    def report(self, now: float, packets: int = 0, lost: int = 0, rtt: float | None = 0.05):
        self.highest += packets
        self.lost += lost
        return self.sel.on_receiver_report(self.highest, self.lost, rtt, now)


def good_network(sel: LayerSelector, rx: Receiver, now: float):
    """A clean REMB and a clean report; the decision either produced."""
    return sel.on_remb(GOOD_BW, now) or rx.report(now, packets=100)


def test_up_needs_loss_rtt_and_remb_without_probing() -> None:
    sel = LayerSelector(3, initial_layer=0, policy=QUICK)
    rx = Receiver(sel)
    assert rx.report(0.0, packets=100) is None  # bandwidth unknown (and loss not yet measured)
    assert rx.report(0.5, packets=100) is None
    assert sel.loss == 0.0
    assert sel.on_remb(1_400_000, 0.6) is None  # bandwidth not > 1.5 Mbit/s
    d = sel.on_remb(1_600_000, 1.0)
    assert d is not None and d.action is Action.SWITCH and (d.from_layer, d.to_layer) == (0, 1)
    assert d.reasons == (Reason.NETWORK_GOOD,) and d.bandwidth == 1_600_000 and d.rtt == 0.050
    assert sel.layer == 1


@pytest.mark.parametrize("lost, rtt", [(2, 0.050), (0, 0.100), (0, None)])
def test_up_blocked_by_loss_or_rtt(lost: int, rtt: float | None) -> None:
    sel = LayerSelector(2, initial_layer=0, policy=QUICK)
    rx = Receiver(sel)
    sel.on_remb(GOOD_BW, 0.0)
    rx.report(0.0, rtt=rtt)
    assert rx.report(0.5, packets=100, lost=lost, rtt=rtt) is None


@pytest.mark.parametrize(
    "feed, reason",
    [
        (lambda rx, t: rx.report(t, packets=100, lost=20), Reason.LOSS),
        (lambda rx, t: rx.report(t, packets=100, rtt=0.151), Reason.RTT),
        (lambda rx, t: rx.sel.on_remb(199_999, t), Reason.BANDWIDTH),
    ],
)
def test_each_down_rule(feed, reason: Reason) -> None:
    sel = LayerSelector(3, initial_layer=2, policy=QUICK)
    rx = Receiver(sel)
    rx.report(-1.0)  # outside the RTT window at 0.25
    d = feed(rx, 0.25)
    assert d is not None and d.action is Action.SWITCH
    assert (d.from_layer, d.to_layer) == (2, 1) and reason in d.reasons


def test_down_thresholds_are_strict() -> None:
    sel = LayerSelector(2, initial_layer=1, policy=QUICK)
    rx = Receiver(sel)
    rx.report(0.0)
    assert rx.report(0.5, packets=100, lost=3, rtt=0.150) is None  # exactly 3 %
    assert sel.loss == pytest.approx(0.03)
    assert sel.on_remb(200_000, 0.6) is None


def test_down_reports_every_reason_and_stops_at_lowest() -> None:
    sel = LayerSelector(3, initial_layer=2, policy=QUICK)
    rx = Receiver(sel)
    d = sel.on_remb(100_000, 0.0)
    assert d.reasons == (Reason.BANDWIDTH,) and sel.layer == 1
    rx.report(3.5)
    d = rx.report(5.0, packets=100, lost=50, rtt=0.5)
    assert d.reasons == (Reason.LOSS, Reason.RTT, Reason.BANDWIDTH) and sel.layer == 0
    assert rx.report(10.0, packets=100, lost=50, rtt=0.5) is None  # already on the lowest layer


def test_cooldown_five_seconds_between_switches_one_step_at_a_time() -> None:
    sel = LayerSelector(4, initial_layer=3, policy=QUICK)
    rx = Receiver(sel)
    rx.report(-1.0)
    assert rx.report(0.0, packets=100, lost=50, rtt=0.3).to_layer == 2
    assert rx.report(4.99, packets=100, lost=50, rtt=0.3) is None  # cooldown
    assert rx.report(5.0, packets=100, lost=50, rtt=0.3).to_layer == 1
    assert rx.report(10.0, packets=100, lost=50, rtt=0.3).to_layer == 0
    assert rx.report(20.0, packets=100, lost=50, rtt=0.3) is None  # lowest


@pytest.mark.parametrize("reports_per_second", [1, 4, 30])
def test_loss_is_measured_over_time_not_over_reports(reports_per_second: int) -> None:
    """The same network (6 % loss for 1 s, then clean) gives the same loss
    whether the viewer reports once or 30 times a second."""
    sel = LayerSelector(2, initial_layer=1, policy=LayerPolicy(cooldown=0.0, loss_window=2.0, up_window=0.25))
    rx = Receiver(sel)
    rate = 300  # packets/s
    n = rate // reports_per_second
    rx.report(0.0)
    for i in range(1, reports_per_second * 3 + 1):  # 3 s clean
        rx.report(i / reports_per_second, packets=n)
    assert sel.loss == 0.0
    lost_so_far = 0
    for k in range(1, reports_per_second + 1):  # 1 s at 6 % loss
        lost = round(0.06 * n * k) - lost_so_far
        lost_so_far += lost
        rx.report(3.0 + k / reports_per_second, packets=n, lost=lost)
    assert sel.loss == pytest.approx(0.03, abs=0.002)  # 1 s of 6 % in a 2 s window
    for k in range(1, reports_per_second * 2 + 1):  # 2 s clean: the window forgets
        rx.report(4.0 + k / reports_per_second, packets=n)
    assert sel.loss == 0.0


def test_burst_of_reports_under_loss_does_not_speed_up_recovery() -> None:
    """30 reports in 1 s after loss stops must not wash the loss out: the
    window still covers the lossy second."""
    sel = LayerSelector(2, initial_layer=0, policy=LayerPolicy(cooldown=0.0, loss_window=2.0, up_window=0.25))
    rx = Receiver(sel)
    rx.report(0.0)
    rx.report(1.0, packets=40, lost=20)  # 50 % loss on the low layer
    for k in range(30):
        rx.report(1.0 + (k + 1) / 30, packets=1)
    assert sel.loss is not None and sel.loss > 0.25


def test_rtt_is_the_smallest_sample_of_the_last_second() -> None:
    """One late report (a busy receiver) does not move the viewer; a queue,
    which delays every report, does within about a second."""
    sel = LayerSelector(2, initial_layer=1, policy=QUICK)
    rx = Receiver(sel)
    for k in range(8):
        rx.report(k * 0.25, packets=60, rtt=0.005)
    assert rx.report(2.0, packets=60, rtt=0.400) is None and sel.rtt == 0.005
    assert rx.report(2.25, packets=60, rtt=0.005) is None
    decisions = [rx.report(2.5 + k * 0.25, packets=60, rtt=0.200) for k in range(6)]
    first = next(k for k, d in enumerate(decisions) if d is not None)
    assert decisions[first].reasons == (Reason.RTT,) and 2.5 + first * 0.25 == pytest.approx(3.5)


def test_too_few_packets_leave_loss_unchanged() -> None:
    sel = LayerSelector(2, initial_layer=1, policy=QUICK)
    rx = Receiver(sel)
    rx.report(0.0)
    assert rx.report(0.25, packets=5, lost=3) is None  # 5 expected: not a measurement
    assert sel.loss is None


def test_pinned_layer_disables_automatic_switching() -> None:
    sel = LayerSelector(3, initial_layer=2, policy=QUICK)
    rx = Receiver(sel)
    d = sel.pin(0, 0.0)
    assert d is not None and d.reasons == (Reason.PINNED,) and sel.layer == 0
    rx.report(99.0)
    assert good_network(sel, rx, 100.0) is None and sel.layer == 0
    assert sel.pin(0, 101.0) is None
    sel.unpin()
    assert good_network(sel, rx, 102.0).to_layer == 1
    with pytest.raises(ValueError):
        sel.pin(3, 0.0)


def test_send_queue_overflow_steps_down_ignoring_cooldown_then_drops() -> None:
    sel = LayerSelector(3, initial_layer=2, policy=QUICK)
    sel.on_remb(100_000, 0.0)  # → 1, cooldown running
    d = sel.on_send_queue_overflow(0.1)
    assert d.action is Action.SWITCH and (d.from_layer, d.to_layer) == (1, 0)
    assert d.reasons == (Reason.SEND_QUEUE_OVERFLOW,)
    d = sel.on_send_queue_overflow(0.2)
    assert d.action is Action.DROP_VIEWER and d.to_layer == 0


def test_overflow_while_pinned_drops_viewer() -> None:
    sel = LayerSelector(2, initial_layer=1, policy=QUICK)
    sel.pin(1, 0.0)
    d = sel.on_send_queue_overflow(1.0)
    assert d.action is Action.DROP_VIEWER and Reason.PINNED in d.reasons and sel.layer == 1


def test_single_layer_and_validation() -> None:
    sel = LayerSelector(1, policy=QUICK, can_probe=True)
    rx = Receiver(sel)
    rx.report(0.0)
    assert good_network(sel, rx, 1.0) is None
    assert sel.on_send_queue_overflow(1.0).action is Action.DROP_VIEWER
    with pytest.raises(ValueError):
        LayerSelector(0)
    with pytest.raises(ValueError):
        LayerSelector(2, initial_layer=2, policy=QUICK)
    with pytest.raises(ValueError):
        LayerPolicy(loss_window=0.0)
    with pytest.raises(ValueError):
        LayerPolicy(up_backoff=60.0, up_backoff_max=30.0)


# -- failed up-switches back off ---------------------------------------------------


def test_failed_up_switch_backs_off_exponentially_to_a_minute() -> None:
    """A viewer that cannot be probed goes up on REMB; each up-switch that is
    followed by a down-switch within 10 s doubles the wait: 30, 60, 60 s."""
    sel = LayerSelector(2, initial_layer=0, policy=QUICK)
    rx = Receiver(sel)
    sel.on_remb(3_800_000, 0.0)  # a policer: REMB stays high, the loss is what tells
    t = 0.0
    rx.report(t)
    ups: list[float] = []
    downs: list[float] = []
    while t < 300.0:
        t = round(t + 0.25, 2)
        lossy = sel.layer == 1
        d = rx.report(t, packets=60, lost=55 if lossy else 0, rtt=0.001)
        if d is not None and d.action is Action.SWITCH:
            (ups if d.to_layer == 1 else downs).append(t)
    assert len(ups) >= 4
    waits = [round(u - d, 2) for d, u in zip(downs, ups[1:])]
    assert waits[0] == pytest.approx(30.0, abs=0.3) and waits[1] == pytest.approx(60.0, abs=0.3)
    assert all(w == pytest.approx(60.0, abs=0.3) for w in waits[2:])
    assert all(b - a >= 30.0 for a, b in zip(ups, ups[1:]))
    assert sel.up_failures_total == len(downs)


def test_up_switch_that_holds_resets_the_backoff() -> None:
    sel = LayerSelector(2, initial_layer=1, policy=QUICK)
    rx = Receiver(sel)
    sel.on_remb(GOOD_BW, 0.0)
    rx.report(0.0)
    assert rx.report(0.5, packets=100, lost=50).to_layer == 0
    assert rx.report(6.0, packets=100).to_layer == 1  # first up: no failure before it
    assert rx.report(7.0, packets=100, lost=50) is None  # cooldown
    assert rx.report(11.0, packets=100, lost=50).to_layer == 0  # failed within 10 s: 30 s
    assert sel.up_blocked_until == pytest.approx(41.0)
    assert rx.report(40.0, packets=100) is None
    assert rx.report(41.0, packets=100).to_layer == 1
    assert rx.report(64.0, packets=100, lost=50).to_layer == 0  # held 23 s: no backoff
    assert sel.up_blocked_until == pytest.approx(41.0)
    assert rx.report(69.0, packets=100).to_layer == 1


# -- probing ---------------------------------------------------------------------------


class Link:
    """A scripted viewer link: Chromium-like report rate (4/s clean, ~30/s
    under loss), the low layer at 40 packets/s, the high one at 250, and a
    per-time loss function that also sees the probe."""

    def __init__(self, sel: LayerSelector, loss) -> None:
        self.sel = sel
        self.rx = Receiver(sel)
        self.loss = loss
        self.t = 0.0
        self.decisions: list[LayerDecision] = []
        self._owed = 0.0  # fractional lost packets carried over

    def run(self, until: float, *, remb: float, rtt=lambda t, probing: 0.001) -> None:
        sel = self.sel
        sel.on_remb(remb, self.t)
        self.rx.report(self.t)
        next_remb = self.t + 0.5
        while self.t < until:
            probing = sel.probing is not None and sel.probe_window is not None and self.t < sel.probe_window[1]
            p = self.loss(self.t, sel.layer, probing)
            dt = 1 / 30 if p > 0.01 else 0.25
            self.t = round(self.t + dt, 6)
            rate = 250 if sel.layer == 1 else 40
            n = max(1, round(rate * dt))
            self._owed += n * p
            lost = int(self._owed)
            self._owed -= lost
            for d in (self.rx.report(self.t, packets=n, lost=lost, rtt=rtt(self.t, probing)),
                      sel.handle_timer(self.t) if sel.next_deadline() is not None
                      and self.t >= sel.next_deadline() else None):
                if d is not None:
                    self.decisions.append(d)
            if self.t >= next_remb:
                next_remb += 0.5
                d = sel.on_remb(remb, self.t)
                if d is not None:
                    self.decisions.append(d)

    def of(self, action: Action) -> list[LayerDecision]:
        return [d for d in self.decisions if d.action is action]


def policer(t: float, layer: int, probing: bool) -> float:
    """400 kbit/s policer: the low layer fits, the high one or a probe does not."""
    if layer == 1:
        return 0.85
    return 0.6 if probing else 0.0


def test_policer_no_flip_flop_probes_fail_and_stay_low() -> None:
    sel = LayerSelector(2, initial_layer=1, can_probe=True)
    link = Link(sel, policer)
    link.run(120.0, remb=3_800_000)  # Chromium's REMB stays high behind a policer
    switches = link.of(Action.SWITCH)
    assert [(d.from_layer, d.to_layer) for d in switches] == [(1, 0)]  # down once, never up
    assert switches[0].at <= 0.5 and switches[0].reasons == (Reason.LOSS,)
    probes, stops = link.of(Action.PROBE), link.of(Action.PROBE_STOP)
    assert len(probes) == len(stops) >= 10 and all(Reason.LOSS in d.reasons for d in stops)
    # Retried every 3 s, then every 6 s; each stopped at its first lossy reports.
    starts = [d.at for d in probes]
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert all(g >= 3.0 for g in gaps) and max(gaps) <= 6.5
    assert all(s.at - p.at < 0.2 for p, s in zip(probes, stops))
    assert sel.layer == 0 and sel.probes_failed == len(stops)


def test_probe_recovers_after_a_lifted_bottleneck_within_ten_seconds() -> None:
    """On the low layer Chromium's REMB stays near what it receives (~260 kbit/s);
    the probe, not the REMB, brings the viewer back up once the link is clean."""
    clean_at = 40.0

    def queue_then_clean(t: float, layer: int, probing: bool) -> float:
        if t >= clean_at:
            return 0.0
        return 0.9 if layer == 1 else (0.4 if probing else 0.0)

    sel = LayerSelector(2, initial_layer=1, can_probe=True)
    link = Link(sel, queue_then_clean)
    link.run(80.0, remb=260_000)
    ups = [d for d in link.of(Action.SWITCH) if d.to_layer == 1]
    assert len(ups) == 1 and ups[0].reasons == (Reason.PROBE_OK,)
    assert clean_at < ups[0].at <= clean_at + 9.0  # + ≤ 1 s to the next keyframe
    assert sel.layer == 1
    ok_probe = link.of(Action.PROBE)[-1]
    assert ups[0].at - ok_probe.at == pytest.approx(2.0, abs=0.3)  # 1.5 s probe + 0.5 s settle


def test_probe_fails_on_rtt_rise_behind_a_queue() -> None:
    sel = LayerSelector(2, initial_layer=0, can_probe=True)
    link = Link(sel, lambda t, layer, probing: 0.0)
    link.run(10.0, remb=260_000, rtt=lambda t, probing: 0.180 if probing else 0.005)
    stops = link.of(Action.PROBE_STOP)
    assert stops and all(d.reasons == (Reason.RTT,) for d in stops)
    assert sel.layer == 0


def test_probe_fails_when_remb_falls() -> None:
    sel = LayerSelector(2, initial_layer=0, policy=QUICK, can_probe=True)
    rx = Receiver(sel)
    sel.on_remb(1_000_000, 0.0)
    rx.report(0.0)
    d = rx.report(0.25, packets=40)
    assert d is not None and d.action is Action.PROBE and d.to_layer == 1
    assert sel.next_deadline() == pytest.approx(2.25)
    assert sel.handle_timer(1.0) is None
    d = sel.on_remb(700_000, 1.0)
    assert d.action is Action.PROBE_STOP and d.reasons == (Reason.BANDWIDTH,)
    assert sel.probing is None and sel.layer == 0
    assert rx.report(2.0, packets=40) is None  # retry in 3 s
    assert rx.report(4.1, packets=40).action is Action.PROBE


def test_probe_decision_on_timer_and_switch() -> None:
    sel = LayerSelector(3, initial_layer=0, policy=QUICK, can_probe=True)
    rx = Receiver(sel)
    rx.report(0.0)
    d = rx.report(0.25, packets=40)  # no REMB at all: a probe needs none
    assert d.action is Action.PROBE and (d.from_layer, d.to_layer) == (0, 1)
    assert rx.report(1.0, packets=40) is None
    assert sel.handle_timer(2.0) is None  # settle time not over
    d = sel.handle_timer(2.25)
    assert d.action is Action.SWITCH and d.to_layer == 1 and d.reasons == (Reason.PROBE_OK,)
    assert sel.next_deadline() is None
    assert rx.report(3.0, packets=40) is None  # cooldown before probing for layer 2
    assert rx.report(7.5, packets=40).action is Action.PROBE


def test_overflow_during_probe_stops_the_probe_not_the_viewer() -> None:
    sel = LayerSelector(2, initial_layer=0, policy=QUICK, can_probe=True)
    rx = Receiver(sel)
    rx.report(0.0)
    assert rx.report(0.25, packets=40).action is Action.PROBE
    d = sel.on_send_queue_overflow(0.5)
    assert d.action is Action.PROBE_STOP and d.reasons == (Reason.SEND_QUEUE_OVERFLOW,)
    assert sel.probing is None and sel.layer == 0


def test_pin_cancels_a_probe() -> None:
    sel = LayerSelector(2, initial_layer=0, policy=QUICK, can_probe=True)
    rx = Receiver(sel)
    rx.report(0.0)
    assert rx.report(0.25, packets=40).action is Action.PROBE
    assert sel.pin(0, 0.5) is None
    assert sel.probing is None and sel.handle_timer(3.0) is None


def test_random_loss_keeps_the_viewer_low_without_probing() -> None:
    """8 % random loss: down within 2 s, then no probe (loss ≥ 1 %) and no up."""
    sel = LayerSelector(2, initial_layer=1, can_probe=True)
    link = Link(sel, lambda t, layer, probing: 0.08 if t >= 5.0 else 0.0)
    link.run(60.0, remb=3_800_000)
    switches = link.of(Action.SWITCH)
    assert [(d.from_layer, d.to_layer) for d in switches] == [(1, 0)]
    assert 5.0 < switches[0].at <= 7.0
    assert not [d for d in link.of(Action.PROBE) if d.at > switches[0].at]


def test_nack_during_probe_fails_it_before_the_reports_show_loss() -> None:
    """A receiver repairs a loss by RTX within a round trip and then counts the
    packet received: the report blocks stay clean, the NACK does not."""
    sel = LayerSelector(2, initial_layer=0, policy=QUICK, can_probe=True)
    rx = Receiver(sel)
    rx.report(0.0)
    assert rx.report(0.25, packets=40).action is Action.PROBE  # highest seq 1040 at the start
    assert sel.on_nack([1030], 0.4) is None  # lost before the probe began: not its doing
    assert rx.report(0.5, packets=10) is None
    d = sel.on_nack([1045], 0.6)
    assert d is not None and d.action is Action.PROBE_STOP and d.reasons == (Reason.LOSS,)
    assert sel.on_nack([1046], 0.7) is None  # no probe running: NACKs are the retransmitter's business


def test_low_remb_on_the_lowest_layer_does_not_stop_probing() -> None:
    """After a queue is lifted Chromium's REMB sits near what it receives, or
    below the down threshold; on the lowest layer the probe still runs, and a
    rising REMB during it does not fail it."""
    sel = LayerSelector(2, initial_layer=0, policy=QUICK, can_probe=True)
    rx = Receiver(sel)
    sel.on_remb(150_000, 0.0)
    rx.report(0.0)
    d = rx.report(0.25, packets=40)
    assert d.action is Action.PROBE and Reason.NETWORK_GOOD in d.reasons
    assert sel.on_remb(180_000, 1.0) is None
    assert sel.handle_timer(2.25).reasons == (Reason.PROBE_OK,) and sel.layer == 1
    # On the higher layer a low REMB is a down reason again (after the cooldown).
    assert sel.on_remb(150_000, 7.5).to_layer == 0


def test_nacked_packets_count_as_loss_though_reports_show_them_repaired() -> None:
    """8 % random loss repaired by RTX: the report blocks stay near 0, the
    distinct NACKed numbers (repeats counted once) say 8 %."""
    sel = LayerSelector(2, initial_layer=1, policy=QUICK)
    rx = Receiver(sel)
    rx.report(0.0)
    seq = rx.highest
    d = None
    for k in range(1, 5):  # 0.25 s steps, 60 packets each, ~5 lost and repaired
        now = k * 0.25
        lost = [seq + i for i in range(0, 60, 12)]
        sel.on_nack(lost, now - 0.01)
        sel.on_nack(lost[:2], now - 0.005)  # the receiver asks again: not new loss
        seq += 60
        d = rx.report(now, packets=60) or d
    assert sel.loss == pytest.approx(20 / 240)
    assert d is not None and d.reasons == (Reason.LOSS,) and d.to_layer == 0


def test_one_late_report_does_not_fail_a_probe_two_do() -> None:
    sel = LayerSelector(2, initial_layer=0, policy=QUICK, can_probe=True)
    rx = Receiver(sel)
    rx.report(0.0, rtt=0.002)
    assert rx.report(0.25, packets=40, rtt=0.002).action is Action.PROBE
    assert rx.report(0.5, packets=10, rtt=0.090) is None  # one late report
    assert rx.report(0.75, packets=10, rtt=0.003) is None
    assert rx.report(1.0, packets=10, rtt=0.090) is None
    d = rx.report(1.1, packets=3, rtt=0.095)
    assert d.action is Action.PROBE_STOP and d.reasons == (Reason.RTT,)
    # One sample far above (a queue already 100 ms deep) is enough.
    sel = LayerSelector(2, initial_layer=0, policy=QUICK, can_probe=True)
    rx = Receiver(sel)
    rx.report(0.0, rtt=0.002)
    assert rx.report(0.25, packets=40, rtt=0.002).action is Action.PROBE
    assert rx.report(0.5, packets=10, rtt=0.110).action is Action.PROBE_STOP


def _lossy_reports(sel: LayerSelector, rx: Receiver, start: float, end: float, lost_every: int) -> list:
    """40 packets a second in reports every 0.25 s; one lost every *lost_every* reports."""
    out, now, i = [], start, 0
    while now < end:
        i += 1
        out.append(rx.report(now, packets=10, lost=1 if i % lost_every == 0 else 0, rtt=0.002))
        now += 0.25
    return out


def test_one_clean_second_in_a_lossy_stretch_starts_no_probe() -> None:
    # Random loss on a low layer leaves whole seconds without a lost packet
    # (the 1 s view reads 0 %); only the full up window (3 s) says the link
    # is clean. Here: 3 packets lost every 1.5 s, 5 % on average.
    sel = LayerSelector(2, initial_layer=0, can_probe=True)
    rx = Receiver(sel)
    seen_clean_second = False
    now, i = 0.0, 0
    while now < 10.0:
        i += 1
        assert rx.report(now, packets=10, lost=3 if i % 6 == 0 else 0, rtt=0.002) is None
        seen_clean_second = seen_clean_second or sel.loss == 0.0
        last_loss = now if i % 6 == 0 else locals().get("last_loss", 0.0)
        now += 0.25
    assert seen_clean_second
    first = None
    while first is None and now < 20.0:
        first = rx.report(now, packets=10, rtt=0.002)
        now += 0.25
    assert first is not None and first.action is Action.PROBE and Reason.NETWORK_GOOD in first.reasons
    assert first.at >= last_loss + 3.0 - 0.25


def test_up_window_must_be_spanned_by_reports() -> None:
    sel = LayerSelector(2, initial_layer=0, can_probe=True)
    rx = Receiver(sel)
    assert rx.report(0.0, rtt=0.002) is None
    for k in range(1, 12):  # clean, but only 2.75 s of reports
        assert rx.report(0.25 * k, packets=10, rtt=0.002) is None
    d = rx.report(3.0, packets=10, rtt=0.002)
    assert d is not None and d.action is Action.PROBE


def test_up_window_is_validated() -> None:
    with pytest.raises(ValueError):
        LayerPolicy(up_window=0.0)


def _random_loss_run(policy: LayerPolicy | None, seed: int) -> tuple[list[LayerDecision], float]:
    """Low layer, 40 packets/s in reports every 50 ms; 8 % random loss for
    the first 30 s, except while probing (the probe's RTX copies repair a lost
    packet before the receiver NACKs it); clean after."""
    import random

    rng = random.Random(seed)
    sel = LayerSelector(2, initial_layer=0, policy=policy, can_probe=True)
    rx = Receiver(sel)
    out: list[LayerDecision] = []
    t = 0.0
    while t < 50.0:
        t = round(t + 0.05, 6)
        rate = 250 if sel.layer == 1 else 40
        n = round(rate * 0.05)
        probing = sel.probing is not None
        lossy = t < 30.0 and not probing
        lost = sum(1 for _ in range(n) if lossy and rng.random() < 0.08)
        for d in (rx.report(t, packets=n, lost=lost, rtt=0.002),
                  sel.handle_timer(t) if sel.next_deadline() is not None and t >= sel.next_deadline() else None,
                  sel.on_remb(260_000, t) if round(t * 20) % 10 == 0 else None):
            if d is not None:
                out.append(d)
    return out, 30.0


@pytest.mark.parametrize("seed", range(8))
def test_random_loss_a_probe_cannot_hide_goes_up_only_once_clean(seed: int) -> None:
    decisions, clean_at = _random_loss_run(None, seed)
    ups = [d for d in decisions if d.action is Action.SWITCH and d.to_layer == 1]
    assert ups and all(d.at >= clean_at for d in ups), [(d.at, d.reasons) for d in ups]
    assert ups[0].at - clean_at <= 10.0
