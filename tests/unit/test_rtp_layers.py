"""Layer selector: each product rule, the cooldown, pinning, overflow — explicit clock."""

from __future__ import annotations

import pytest

from media.rtp.layers import Action, LayerPolicy, LayerSelector, Reason

GOOD_BW = 2_000_000


def good_network(sel: LayerSelector, now: float):
    """Feed a clean REMB and RR; return the decision either produced."""
    return sel.on_remb(GOOD_BW, now) or sel.on_receiver_report(0.0, 0.050, now)


def test_up_needs_all_three_conditions() -> None:
    sel = LayerSelector(3, initial_layer=0)
    assert sel.on_receiver_report(0.0, 0.050, 0.0) is None  # bandwidth unknown
    assert sel.on_remb(1_400_000, 0.5) is None  # bandwidth not > 1.5 Mbit/s
    d = sel.on_remb(1_600_000, 1.0)
    assert d is not None and d.action is Action.SWITCH and (d.from_layer, d.to_layer) == (0, 1)
    assert d.reasons == (Reason.NETWORK_GOOD,) and d.bandwidth == 1_600_000 and d.rtt == 0.050
    assert sel.layer == 1


@pytest.mark.parametrize("loss, rtt", [(0.015, 0.050), (0.0, 0.100), (0.0, None)])
def test_up_blocked_by_loss_or_rtt(loss: float, rtt: float | None) -> None:
    sel = LayerSelector(2, initial_layer=0)
    sel.on_remb(GOOD_BW, 0.0)
    assert sel.on_receiver_report(loss, rtt, 0.0) is None


@pytest.mark.parametrize(
    "feed, reason",
    [
        (lambda s, t: s.on_receiver_report(0.20, 0.050, t), Reason.LOSS),
        (lambda s, t: s.on_receiver_report(0.0, 0.151, t), Reason.RTT),
        (lambda s, t: s.on_remb(199_999, t), Reason.BANDWIDTH),
    ],
)
def test_each_down_rule(feed, reason: Reason) -> None:
    sel = LayerSelector(3, initial_layer=2)
    d = feed(sel, 0.0)
    assert d is not None and d.action is Action.SWITCH
    assert (d.from_layer, d.to_layer) == (2, 1) and reason in d.reasons


def test_down_thresholds_are_strict() -> None:
    sel = LayerSelector(2, initial_layer=1)
    assert sel.on_receiver_report(0.03, 0.150, 0.0) is None
    assert sel.on_remb(200_000, 0.1) is None


def test_down_reports_every_reason_and_stops_at_lowest() -> None:
    sel = LayerSelector(3, initial_layer=2)
    d = sel.on_remb(100_000, 0.0)
    assert d.reasons == (Reason.BANDWIDTH,) and sel.layer == 1
    d = sel.on_receiver_report(0.5, 0.5, 5.0)
    assert d.reasons == (Reason.LOSS, Reason.RTT, Reason.BANDWIDTH) and sel.layer == 0
    assert sel.on_receiver_report(0.5, 0.5, 10.0) is None  # already on the lowest layer


def test_cooldown_five_seconds_between_switches_one_step_at_a_time() -> None:
    sel = LayerSelector(4, initial_layer=3)
    assert sel.on_receiver_report(0.5, 0.3, 0.0).to_layer == 2
    assert sel.on_receiver_report(0.5, 0.3, 4.99) is None  # cooldown
    assert sel.on_receiver_report(0.5, 0.3, 5.0).to_layer == 1
    assert sel.on_receiver_report(0.5, 0.3, 10.0).to_layer == 0
    assert sel.on_receiver_report(0.5, 0.3, 20.0) is None  # lowest


def test_loss_is_smoothed_with_ewma() -> None:
    sel = LayerSelector(2, initial_layer=1, policy=LayerPolicy(cooldown=0.0))
    sel.on_receiver_report(0.0, 0.05, 0.0)
    assert sel.on_receiver_report(0.10, 0.05, 1.0) is None  # one 10 % report → 3.0 %
    assert sel.loss == pytest.approx(0.03)
    d = sel.on_receiver_report(0.10, 0.05, 2.0)  # two in a row → 5.1 %
    assert d is not None and d.reasons == (Reason.LOSS,) and d.loss == pytest.approx(0.051)
    # coming back: loss must decay under 1 % before going up again
    sel.on_remb(GOOD_BW, 2.0)
    ups = [sel.on_receiver_report(0.0, 0.05, 3.0 + k) for k in range(6)]
    first_up = next(k for k, d in enumerate(ups) if d is not None)
    assert first_up == 4 and ups[first_up].to_layer == 1  # 0.051·0.7^5 < 1 %


def test_pinned_layer_disables_automatic_switching() -> None:
    sel = LayerSelector(3, initial_layer=2)
    d = sel.pin(0, 0.0)
    assert d is not None and d.reasons == (Reason.PINNED,) and sel.layer == 0
    assert good_network(sel, 100.0) is None and sel.layer == 0
    assert sel.pin(0, 101.0) is None
    sel.unpin()
    assert good_network(sel, 102.0).to_layer == 1
    with pytest.raises(ValueError):
        sel.pin(3, 0.0)


def test_send_queue_overflow_steps_down_ignoring_cooldown_then_drops() -> None:
    sel = LayerSelector(3, initial_layer=2)
    sel.on_remb(100_000, 0.0)  # → 1, cooldown running
    d = sel.on_send_queue_overflow(0.1)
    assert d.action is Action.SWITCH and (d.from_layer, d.to_layer) == (1, 0)
    assert d.reasons == (Reason.SEND_QUEUE_OVERFLOW,)
    d = sel.on_send_queue_overflow(0.2)
    assert d.action is Action.DROP_VIEWER and d.to_layer == 0


def test_overflow_while_pinned_drops_viewer() -> None:
    sel = LayerSelector(2, initial_layer=1)
    sel.pin(1, 0.0)
    d = sel.on_send_queue_overflow(1.0)
    assert d.action is Action.DROP_VIEWER and Reason.PINNED in d.reasons and sel.layer == 1


def test_single_layer_and_validation() -> None:
    sel = LayerSelector(1)
    assert good_network(sel, 0.0) is None
    assert sel.on_send_queue_overflow(0.0).action is Action.DROP_VIEWER
    with pytest.raises(ValueError):
        LayerSelector(0)
    with pytest.raises(ValueError):
        LayerSelector(2, initial_layer=2)
    with pytest.raises(ValueError):
        LayerPolicy(loss_alpha=0.0)
