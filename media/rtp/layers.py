"""Per-viewer simulcast layer selection (sans-I/O, explicit clock).

Layers are indexed ``0 .. num_layers-1`` in increasing bitrate — the
``index`` of a :class:`media.layer.Layer`; the selector only ever steps one
layer at a time. The product's rules:

* **down** one layer when the loss over the last ``loss_window`` seconds
  is > 3 % **or** RTT > 150 ms **or** estimated bandwidth (REMB) <
  200 kbit/s; at most one automatic switch per 5 s (cooldown);
* **up** one layer only on evidence that the viewer's link has room for it:
  loss < 1 % over the last ``up_window`` seconds (3 s: at 8 % random loss a
  1 s window of a low layer's ~40 packets is loss-free one time in thirty,
  3 s of them one time in four thousand) **and** RTT < 100 ms, then

  - a viewer that can be probed (RTX negotiated) is **probed** first
    (:attr:`Action.PROBE`): the sender adds RTX copies of recent packets,
    ramping the total up to the next layer's rate, while this object watches
    the reports. Loss, an RTT rise or a falling REMB during the probe or its
    settle time fails it (:attr:`Action.PROBE_STOP`); a clean probe switches
    up (:attr:`Reason.PROBE_OK`). The probe's RTX copies can repair a lost
    media packet before the receiver NACKs it, so a probe alone can look
    clean on a lossy link: that is why its start needs the longer loss-free
    window. Loss during a probe is also read from the
    viewer's NACKs (:meth:`LayerSelector.on_nack`): a receiver that repairs
    a loss by RTX counts the packet as received in its next report. A
    failed probe is retried after
    ``probe_retry`` seconds, doubling up to ``probe_retry_max``;
  - a viewer that cannot be probed goes up when its REMB is > 1.5 Mbit/s;

* an up-switch followed by a down-switch within ``up_hold`` seconds failed:
  the next up-switch waits ``up_backoff`` seconds, twice as long after each
  further failure, up to ``up_backoff_max``; an up-switch that holds resets it;
* a pinned layer disables automatic switching;
* a send-queue overflow (the viewer cannot keep up) moves down one layer at
  once, ignoring the cooldown; on the lowest layer — or while pinned, since a
  pinned viewer may not be moved — the decision is "drop viewer".

Why not REMB alone: behind a policer (no queue) Chromium's REMB stays at
several Mbit/s while 95 % of the high layer is dropped, and behind a lifted
queue its REMB stays near what it receives on the low layer — the REMB says
neither "no room" nor "room" there. Only sending more says it.

Measurements:

* Loss is computed from the report block's cumulative packets lost and
  extended highest sequence number (RFC 3550 §6.4.1): lost / expected
  between the newest report and the one at the start of the window, so the
  estimate depends on time, not on how many reports arrive (Chromium sends
  ~4 a second on a clean link, up to ~30 under loss). A receiver counts a
  packet repaired by RTX as received, so the lost count is also taken from
  the distinct sequence numbers NACKed in the window (:meth:`on_nack`),
  whichever is larger: that is the loss on the link. Fewer than
  ``loss_min_packets`` expected in the window leaves the estimate as it was.
* RTT (from the RR's LSR/DLSR) is the smallest sample of the last
  ``rtt_window`` seconds: a queue raises every sample, while one late
  report (a busy receiver or event loop) raises one; a probe fails on two
  samples in a row ``probe_rtt_rise`` (25 ms: an eighth of a typical 200 ms
  bottleneck queue, so the probe stops well before the queue overflows)
  above the one before it, or one ``probe_rtt_spike`` above. Bandwidth is the latest REMB.
* A value never reported is unknown: it cannot trigger a down-switch and it
  does not satisfy an up-switch condition.

Every decision carries its reasons and the values that led to it, for
metrics and logs. :meth:`LayerSelector.next_deadline` / :meth:`handle_timer`
let the caller arm one timer for the end of a probe (aioquic style).
"""

from __future__ import annotations

import collections
import enum
from dataclasses import dataclass
from typing import Iterable

__all__ = ["Action", "Reason", "LayerPolicy", "LayerDecision", "LayerSelector"]


class Action(str, enum.Enum):
    SWITCH = "switch"
    DROP_VIEWER = "drop_viewer"
    PROBE = "probe"  # start probing for room for ``to_layer``; the layer stays
    PROBE_STOP = "probe_stop"  # the probe failed: stop it; the layer stays


class Reason(str, enum.Enum):
    LOSS = "loss"  # loss above the down (or probe) threshold
    RTT = "rtt"  # RTT above the down threshold, or risen during a probe
    BANDWIDTH = "bandwidth"  # REMB below the down threshold, or fallen during a probe
    NETWORK_GOOD = "network_good"  # every up condition holds
    PROBE_OK = "probe_ok"  # a probe at the next layer's rate went through clean
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
    loss_window: float = 1.0
    loss_min_packets: int = 20
    up_window: float = 3.0
    rtt_window: float = 1.0
    up_hold: float = 10.0
    up_backoff: float = 30.0
    up_backoff_max: float = 60.0
    probe_duration: float = 1.5
    probe_settle: float = 0.5
    probe_loss: float = 0.02
    probe_rtt_rise: float = 0.025
    probe_rtt_spike: float = 0.100
    probe_remb_drop: float = 0.95
    probe_retry: float = 3.0
    probe_retry_max: float = 6.0

    def __post_init__(self) -> None:
        for name in ("cooldown", "up_hold", "up_backoff", "probe_settle"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        for name in ("loss_window", "rtt_window", "probe_duration", "probe_retry", "up_window"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.up_backoff_max < self.up_backoff or self.probe_retry_max < self.probe_retry:
            raise ValueError("a backoff maximum must be >= its start")
        if not 0.0 < self.probe_remb_drop <= 1.0:
            raise ValueError("probe_remb_drop must be in (0, 1]")
        if self.loss_min_packets < 1:
            raise ValueError("loss_min_packets must be >= 1")


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


@dataclass(slots=True)
class _Probe:
    to_layer: int
    started: float
    ends: float  # padding stops
    judged: float  # end + settle: reports up to here still count
    expected0: int | None  # counters at the start (None: no report yet)
    lost0: int
    rtt0: float | None
    remb0: float | None
    nacked: set[int]  # media sequence numbers NACKed since the start
    rtt_high: int = 0  # consecutive RTT samples above the probe's limit
    rtt_peak: float = 0.0  # largest RTT sample during the probe


class LayerSelector:
    """Layer choice for one viewer of a simulcast stream."""

    __slots__ = (
        "num_layers",
        "policy",
        "can_probe",
        "_layer",
        "_pinned",
        "_last_switch",
        "_last_up",
        "_up_failures",
        "_up_blocked_until",
        "_probe",
        "_probe_failures",
        "_next_probe",
        "_samples",
        "_nacked",
        "_nack_log",
        "_nack_total",
        "_remb_grace",
        "_last_counters",
        "_rtts",
        "_rtt_last",
        "loss",
        "rtt",
        "bandwidth",
        "probes",
        "probes_failed",
        "up_failures_total",
    )

    def __init__(
        self,
        num_layers: int,
        initial_layer: int = 0,
        policy: LayerPolicy | None = None,
        *,
        can_probe: bool = False,
    ) -> None:
        if num_layers < 1:
            raise ValueError("num_layers must be >= 1")
        if not 0 <= initial_layer < num_layers:
            raise ValueError("initial_layer out of range")
        self.num_layers = num_layers
        self.policy = policy or LayerPolicy()
        self.can_probe = can_probe
        self._layer = initial_layer
        self._pinned: int | None = None
        self._last_switch: float | None = None
        self._last_up: float | None = None
        self._up_failures = 0
        self._up_blocked_until = float("-inf")
        self._probe: _Probe | None = None
        self._probe_failures = 0
        self._next_probe = float("-inf")
        # (time, extended highest seq, cumulative lost); ~30 reports/s over
        # the window at most, bounded anyway.
        self._samples: collections.deque[tuple[float, int, int]] = collections.deque(maxlen=256)
        # Distinct NACKed sequence numbers: first NACK time per number (a
        # receiver repeats a NACK until repaired), and (time, total before,
        # total after) per NACK that added any.
        self._nacked: dict[int, float] = {}
        self._nack_log: collections.deque[tuple[float, int, int]] = collections.deque(maxlen=512)
        self._nack_total = 0
        # (until, REMB at the up-switch): a REMB still trailing the old
        # layer's rate right after a probed up-switch is no down reason.
        self._remb_grace: tuple[float, float] | None = None
        self._last_counters: tuple[int, int] | None = None
        self._rtts: collections.deque[tuple[float, float]] = collections.deque(maxlen=64)
        self._rtt_last: float | None = None
        self.loss: float | None = None
        self.rtt: float | None = None
        self.bandwidth: float | None = None
        self.probes = 0
        self.probes_failed = 0
        self.up_failures_total = 0

    @property
    def layer(self) -> int:
        """The layer the viewer should receive now."""
        return self._layer

    @property
    def pinned(self) -> int | None:
        return self._pinned

    @property
    def probing(self) -> int | None:
        """The layer being probed for, or None."""
        return self._probe.to_layer if self._probe is not None else None

    @property
    def probe_window(self) -> tuple[float, float] | None:
        """(start, end) of the padding of the running probe, or None."""
        p = self._probe
        return (p.started, p.ends) if p is not None else None

    @property
    def up_blocked_until(self) -> float:
        """No up-switch before this time (cooldown/backoff after a failed one)."""
        return self._up_blocked_until

    def recent_loss(self, seconds: float, now: float) -> float | None:
        """Loss over the last *seconds* (≤ the loss window) from the reports
        and NACKs held: a faster, noisier view than :attr:`loss`, for
        estimating what gets through the link now (once per RTCP packet, a
        short scan)."""
        return self._loss_since(now - seconds)

    def _loss_since(self, horizon: float) -> float | None:
        """Loss between the newest report and the newest one at or before
        *horizon* (the oldest held if none is); None on too few packets."""
        samples = self._samples
        if len(samples) < 2:
            return None
        _t1, h1, l1 = samples[-1]
        base = samples[0]
        for sample in reversed(samples):
            if sample[0] <= horizon:
                base = sample
                break
        expected = (h1 - base[1]) & 0xFFFFFFFF
        if expected < self.policy.loss_min_packets or expected >= 0x80000000:
            return None
        lost = max(l1 - base[2], self._nacked_since(base[0]))
        return min(max(lost / expected, 0.0), 1.0)

    def _up_loss(self) -> float | None:
        """Loss over reports spanning the whole up window (back from the
        newest); None until they do."""
        samples = self._samples
        if len(samples) < 2:
            return None
        horizon = samples[-1][0] - self.policy.up_window
        if samples[0][0] > horizon:
            return None
        return self._loss_since(horizon)

    def _nacked_since(self, t0: float) -> int:
        """Distinct sequence numbers first NACKed after *t0*."""
        log = self._nack_log
        if not log or log[-1][0] <= t0:
            return 0
        base = log[0][1]
        for t, _before, after in reversed(log):
            if t <= t0:
                base = after
                break
        return self._nack_total - base

    # -- control ---------------------------------------------------------------

    def pin(self, layer: int, now: float) -> LayerDecision | None:
        """Fix the viewer on *layer*; returns the switch if it changes the layer."""
        if not 0 <= layer < self.num_layers:
            raise ValueError("layer out of range")
        self._pinned = layer
        self._probe = None
        if layer == self._layer:
            return None
        return self._switch(layer, (Reason.PINNED,), now)

    def unpin(self) -> None:
        """Return to automatic switching (the cooldown still applies)."""
        self._pinned = None

    # -- inputs ----------------------------------------------------------------

    def on_receiver_report(
        self, highest_seq: int, cumulative_lost: int, rtt: float | None, now: float
    ) -> LayerDecision | None:
        """A report block about this viewer's track (RFC 3550 §6.4.1): the
        extended highest sequence number received, the cumulative number of
        packets lost, and the RTT in s (None without LSR)."""
        highest = int(highest_seq)
        lost = int(cumulative_lost)
        self._last_counters = (highest, lost)
        samples = self._samples
        samples.append((now, highest, lost))
        p = self.policy
        horizon = now - max(p.loss_window, p.up_window)
        while len(samples) > 2 and samples[1][0] <= horizon:
            samples.popleft()
        loss = self._loss_since(now - p.loss_window)
        if loss is not None:
            self.loss = loss
        if rtt is not None:
            sample = max(0.0, float(rtt))
            self._rtt_last = sample
            probe = self._probe
            if probe is not None:
                base = probe.rtt0 if probe.rtt0 is not None else 0.0
                limit = min(base + self.policy.probe_rtt_rise, self.policy.down_rtt)
                probe.rtt_high = probe.rtt_high + 1 if sample > limit else 0
                probe.rtt_peak = max(probe.rtt_peak, sample - base)
            rtts = self._rtts
            rtts.append((now, sample))
            horizon = now - self.policy.rtt_window
            while len(rtts) > 1 and rtts[0][0] < horizon:
                rtts.popleft()
            self.rtt = min(r for _t, r in rtts)
        if self._probe is not None:
            return self._judge_probe(now)
        return self._evaluate(now)

    def on_remb(self, bps: float, now: float) -> LayerDecision | None:
        """Receiver-estimated maximum bitrate for this viewer, bit/s."""
        self.bandwidth = max(0.0, float(bps))
        if self._probe is not None:
            return self._judge_probe(now)
        return self._evaluate(now)

    def on_nack(self, lost: Iterable[int], now: float) -> LayerDecision | None:
        """Media sequence numbers a Generic NACK (RFC 4585 §6.2.1) asks for.

        A receiver repairs a lost packet with RTX within a round trip and
        then counts it received, so behind a fast link the report blocks show
        loss only once repair fails; the NACK shows it at once. Distinct
        numbers count towards the loss window; while probing, one NACKed
        packet sent during the probe fails it.
        """
        nacked = self._nacked
        horizon = now - 2.0 * self.policy.loss_window
        before = self._nack_total
        for seq in lost:
            seq &= 0xFFFF
            first = nacked.get(seq)
            if first is None or first < horizon:
                nacked[seq] = now
                self._nack_total += 1
        if self._nack_total != before:
            self._nack_log.append((now, before, self._nack_total))
        if len(nacked) > 4096:
            for seq in [q for q, t in nacked.items() if t < horizon]:
                del nacked[seq]
            if len(nacked) > 4096:
                nacked.clear()
        probe = self._probe
        if probe is None or probe.expected0 is None:
            return None
        start = probe.expected0 & 0xFFFF
        for seq in lost:
            if 0 < ((seq - start) & 0xFFFF) < 0x8000 and len(probe.nacked) < 4096:
                probe.nacked.add(seq & 0xFFFF)
        return self._judge_probe(now)

    def on_send_queue_overflow(self, now: float) -> LayerDecision:
        """The viewer's send queue overflowed: step down now, or drop the viewer."""
        reasons: tuple[Reason, ...] = (Reason.SEND_QUEUE_OVERFLOW,)
        if self._probe is not None:
            # The probe's own padding filled the queue: it found no room.
            to_layer = self._probe.to_layer
            self._probe_failed(now)
            return self._decision(Action.PROBE_STOP, to_layer, reasons, now)
        if self._pinned is not None:
            return self._decision(Action.DROP_VIEWER, self._layer, reasons + (Reason.PINNED,), now)
        if self._layer == 0:
            return self._decision(Action.DROP_VIEWER, self._layer, reasons, now)
        return self._switch(self._layer - 1, reasons, now)

    # -- timer -----------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timer` has something to decide (a probe's end)."""
        return self._probe.judged if self._probe is not None else None

    def handle_timer(self, now: float) -> LayerDecision | None:
        if self._probe is not None:
            return self._judge_probe(now)
        return None

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
        grace = self._remb_grace
        if grace is not None and (now >= grace[0] or (bw is not None and bw < p.probe_remb_drop * grace[1])):
            grace = self._remb_grace = None
        if bw is not None and bw < p.down_bandwidth and grace is None:
            down.append(Reason.BANDWIDTH)
        if down:
            if self._layer > 0:
                return self._switch(self._layer - 1, tuple(down), now)
            if down != [Reason.BANDWIDTH] or not self.can_probe:
                return None
            # On the lowest layer a low REMB alone does not stop a probe:
            # the receiver's estimate trails the rate it receives, and only
            # a probe raises that.
        if (
            self._layer >= self.num_layers - 1
            or now < self._up_blocked_until
            or loss is None
            or loss >= p.up_loss
            or rtt is None
            or rtt >= p.up_rtt
        ):
            return None
        up_loss = self._up_loss()
        if up_loss is None or up_loss >= p.up_loss:
            return None
        if self.can_probe:
            if now < self._next_probe:
                return None
            return self._start_probe(now)
        if bw is not None and bw > p.up_bandwidth:
            return self._switch(self._layer + 1, (Reason.NETWORK_GOOD,), now)
        return None

    def _start_probe(self, now: float) -> LayerDecision:
        p = self.policy
        counters = self._last_counters
        self._probe = _Probe(
            to_layer=self._layer + 1,
            started=now,
            ends=now + p.probe_duration,
            judged=now + p.probe_duration + p.probe_settle,
            expected0=counters[0] if counters is not None else None,
            lost0=counters[1] if counters is not None else 0,
            rtt0=self._rtt_last,
            remb0=self.bandwidth,
            nacked=set(),
        )
        self.probes += 1
        return self._decision(Action.PROBE, self._layer + 1, (Reason.NETWORK_GOOD,), now)

    def _judge_probe(self, now: float) -> LayerDecision | None:
        probe = self._probe
        assert probe is not None
        p = self.policy
        failed: list[Reason] = []
        counters = self._last_counters
        if counters is not None and probe.expected0 is not None:
            # Loss since the probe began, from the cumulative counters: the
            # probe displaces media packets behind a policer or a full queue.
            expected = (counters[0] - probe.expected0) & 0xFFFFFFFF
            if expected >= 0x80000000:
                expected = 0
            lost = counters[1] - probe.lost0
            if lost >= 2 and lost > p.probe_loss * max(expected, 1):
                failed.append(Reason.LOSS)
        if probe.nacked and Reason.LOSS not in failed:
            # A NACKed packet is loss seen as it happens; stopping at the
            # first one keeps the overshoot — and the media it cost — small.
            failed.append(Reason.LOSS)
        if probe.rtt_high >= 2 or probe.rtt_peak > p.probe_rtt_spike:
            # Two reports in a row: a queue delays every one, a busy
            # receiver or event loop one now and then — by less than this.
            failed.append(Reason.RTT)
        if (
            self.bandwidth is not None
            and probe.remb0 is not None
            and self.bandwidth < p.probe_remb_drop * probe.remb0
        ):
            # The receiver's delay-based estimate fell: the probe built a queue.
            failed.append(Reason.BANDWIDTH)
        if failed:
            self._probe_failed(now)
            return self._decision(Action.PROBE_STOP, probe.to_layer, tuple(failed), now)
        if now < probe.judged:
            return None
        self._probe = None
        self._probe_failures = 0
        if self._pinned is not None or now < self._up_blocked_until:
            return None
        if self.bandwidth is not None:
            # The receiver's REMB follows the rate it receives up slowly
            # (~8 %/s); low but not falling, it is no reason to go back down.
            self._remb_grace = (now + p.up_hold, self.bandwidth)
        return self._switch(probe.to_layer, (Reason.PROBE_OK,), now)

    def _probe_failed(self, now: float) -> None:
        if self._probe is None:
            return
        p = self.policy
        self._probe = None
        self._probe_failures += 1
        self.probes_failed += 1
        wait = min(p.probe_retry * 2.0 ** (self._probe_failures - 1), p.probe_retry_max)
        self._next_probe = now + wait
        # The loss the probe caused says nothing about the layer itself:
        # restart the window from the newest report (unknown until it fills).
        if self._samples:
            newest = self._samples[-1]
            self._samples.clear()
            self._samples.append(newest)
        self.loss = None

    def _switch(self, to_layer: int, reasons: tuple[Reason, ...], now: float) -> LayerDecision:
        decision = self._decision(Action.SWITCH, to_layer, reasons, now)
        p = self.policy
        if to_layer > self._layer:
            if self._last_up is not None and now - self._last_up >= p.up_hold:
                self._up_failures = 0  # the previous up-switch held
            self._last_up = now
        elif to_layer < self._layer and Reason.PINNED not in reasons:
            if self._last_up is not None and now - self._last_up < p.up_hold:
                # The last up-switch did not hold: back off exponentially.
                self._up_failures += 1
                self.up_failures_total += 1
                wait = min(p.up_backoff * 2.0 ** (self._up_failures - 1), p.up_backoff_max)
                self._up_blocked_until = now + wait
            elif self._last_up is not None:
                self._up_failures = 0
            self._last_up = None
            self._next_probe = max(self._next_probe, now + p.cooldown)
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
