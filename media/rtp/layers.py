"""Per-viewer simulcast layer selection (sans-I/O, explicit clock).

Layers are indexed ``0 .. num_layers-1`` in increasing bitrate; the selector
only ever steps one layer at a time. The product's rules:

* **down** one layer when smoothed loss > 3 % **or** RTT > 150 ms **or**
  estimated bandwidth (REMB) < 200 kbit/s;
* **up** one layer when smoothed loss < 1 % **and** RTT < 100 ms **and**
  estimated bandwidth > 1.5 Mbit/s;
* at most one automatic switch per 5 s (cooldown);
* a pinned layer disables automatic switching;
* a send-queue overflow (the viewer cannot keep up) moves down one layer at
  once, ignoring the cooldown; on the lowest layer — or while pinned, since a
  pinned viewer may not be moved — the decision is "drop viewer".

Measurements:

* Loss is ``fraction_lost`` from receiver reports (RFC 3550 §6.4.1), smoothed
  with an exponentially weighted moving average, ``loss = α·sample +
  (1−α)·loss`` with α = 0.3, seeded by the first report. Receivers report
  about once a second, so the time constant is ≈ 3 reports: one report at
  10 % loss after clean ones gives 3 % (not above the threshold), two in a
  row give 5.1 % (down); a single report at ≥ 20 % is enough. Going back
  under 1 % from 5 % takes 5 clean reports, about the cooldown.
* RTT and bandwidth are used as last reported (RTT from the RR's LSR/DLSR,
  bandwidth from the latest REMB); the cooldown already damps flapping.
* A value never reported is unknown: it cannot trigger a down-switch and it
  does not satisfy an up-switch condition (a viewer that never sends REMB is
  never moved up automatically).

Every decision carries its reasons and the values that led to it, for
metrics and logs.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["Action", "Reason", "LayerPolicy", "LayerDecision", "LayerSelector"]


class Action(str, enum.Enum):
    SWITCH = "switch"
    DROP_VIEWER = "drop_viewer"


class Reason(str, enum.Enum):
    LOSS = "loss"  # smoothed loss above the down threshold
    RTT = "rtt"  # RTT above the down threshold
    BANDWIDTH = "bandwidth"  # REMB below the down threshold
    NETWORK_GOOD = "network_good"  # every up condition holds
    SEND_QUEUE_OVERFLOW = "send_queue_overflow"
    PINNED = "pinned"


@dataclass(frozen=True, slots=True)
class LayerPolicy:
    """Thresholds (fractions, seconds, bit/s) of the product rules."""

    down_loss: float = 0.03
    down_rtt: float = 0.150
    down_bandwidth: float = 200_000.0
    up_loss: float = 0.01
    up_rtt: float = 0.100
    up_bandwidth: float = 1_500_000.0
    cooldown: float = 5.0
    loss_alpha: float = 0.3

    def __post_init__(self) -> None:
        if not 0.0 < self.loss_alpha <= 1.0:
            raise ValueError("loss_alpha must be in (0, 1]")
        if self.cooldown < 0:
            raise ValueError("cooldown must be >= 0")


@dataclass(frozen=True, slots=True)
class LayerDecision:
    """What the selector decided, why, and on which measurements."""

    action: Action
    from_layer: int
    to_layer: int
    reasons: tuple[Reason, ...]
    at: float
    loss: float | None = None
    rtt: float | None = None
    bandwidth: float | None = None


class LayerSelector:
    """Layer choice for one viewer of a simulcast stream."""

    __slots__ = (
        "num_layers",
        "policy",
        "_layer",
        "_pinned",
        "_last_switch",
        "loss",
        "rtt",
        "bandwidth",
    )

    def __init__(
        self,
        num_layers: int,
        initial_layer: int = 0,
        policy: LayerPolicy | None = None,
    ) -> None:
        if num_layers < 1:
            raise ValueError("num_layers must be >= 1")
        if not 0 <= initial_layer < num_layers:
            raise ValueError("initial_layer out of range")
        self.num_layers = num_layers
        self.policy = policy or LayerPolicy()
        self._layer = initial_layer
        self._pinned: int | None = None
        self._last_switch: float | None = None
        self.loss: float | None = None
        self.rtt: float | None = None
        self.bandwidth: float | None = None

    @property
    def layer(self) -> int:
        """The layer the viewer should receive now."""
        return self._layer

    @property
    def pinned(self) -> int | None:
        return self._pinned

    # -- control ---------------------------------------------------------------

    def pin(self, layer: int, now: float) -> LayerDecision | None:
        """Fix the viewer on *layer*; returns the switch if it changes the layer."""
        if not 0 <= layer < self.num_layers:
            raise ValueError("layer out of range")
        self._pinned = layer
        if layer == self._layer:
            return None
        return self._switch(layer, (Reason.PINNED,), now)

    def unpin(self) -> None:
        """Return to automatic switching (the cooldown still applies)."""
        self._pinned = None

    # -- inputs ----------------------------------------------------------------

    def on_receiver_report(
        self, fraction_lost: float, rtt: float | None, now: float
    ) -> LayerDecision | None:
        """A report block about this viewer's track: loss fraction in [0, 1], RTT in s."""
        sample = min(max(float(fraction_lost), 0.0), 1.0)
        if self.loss is None:
            self.loss = sample
        else:
            a = self.policy.loss_alpha
            self.loss = a * sample + (1.0 - a) * self.loss
        if rtt is not None:
            self.rtt = max(0.0, float(rtt))
        return self._evaluate(now)

    def on_remb(self, bps: float, now: float) -> LayerDecision | None:
        """Receiver-estimated maximum bitrate for this viewer, bit/s."""
        self.bandwidth = max(0.0, float(bps))
        return self._evaluate(now)

    def on_send_queue_overflow(self, now: float) -> LayerDecision:
        """The viewer's send queue overflowed: step down now, or drop the viewer."""
        reasons: tuple[Reason, ...] = (Reason.SEND_QUEUE_OVERFLOW,)
        if self._pinned is not None:
            return self._decision(Action.DROP_VIEWER, self._layer, reasons + (Reason.PINNED,), now)
        if self._layer == 0:
            return self._decision(Action.DROP_VIEWER, self._layer, reasons, now)
        return self._switch(self._layer - 1, reasons, now)

    # -- rules -----------------------------------------------------------------

    def _evaluate(self, now: float) -> LayerDecision | None:
        if self._pinned is not None:
            return None
        p = self.policy
        if self._last_switch is not None and now - self._last_switch < p.cooldown:
            return None
        loss, rtt, bw = self.loss, self.rtt, self.bandwidth
        down: list[Reason] = []
        if loss is not None and loss > p.down_loss:
            down.append(Reason.LOSS)
        if rtt is not None and rtt > p.down_rtt:
            down.append(Reason.RTT)
        if bw is not None and bw < p.down_bandwidth:
            down.append(Reason.BANDWIDTH)
        if down:
            if self._layer > 0:
                return self._switch(self._layer - 1, tuple(down), now)
            return None
        if (
            self._layer < self.num_layers - 1
            and loss is not None
            and loss < p.up_loss
            and rtt is not None
            and rtt < p.up_rtt
            and bw is not None
            and bw > p.up_bandwidth
        ):
            return self._switch(self._layer + 1, (Reason.NETWORK_GOOD,), now)
        return None

    def _switch(self, to_layer: int, reasons: tuple[Reason, ...], now: float) -> LayerDecision:
        decision = self._decision(Action.SWITCH, to_layer, reasons, now)
        self._layer = to_layer
        self._last_switch = now
        return decision

    def _decision(
        self, action: Action, to_layer: int, reasons: tuple[Reason, ...], now: float
    ) -> LayerDecision:
        return LayerDecision(
            action=action,
            from_layer=self._layer,
            to_layer=to_layer,
            reasons=reasons,
            at=now,
            loss=self.loss,
            rtt=self.rtt,
            bandwidth=self.bandwidth,
        )
