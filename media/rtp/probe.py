"""Bandwidth probe pacing for one viewer (sans-I/O, explicit clock).

To learn whether a viewer's link has room for the next simulcast layer, the
sender adds probe bytes — RTX copies of recent packets (RFC 4588 §4), which
a receiver discards as duplicates after counting them — on top of the media
it already sends, for ``duration`` seconds, while
:class:`media.rtp.layers.LayerSelector` watches loss, RTT and REMB.

The total rate (media + probe) ramps geometrically from the current layer's
rate ``base_bps`` to the next layer's ``target_bps`` in ``steps`` equal
steps, the last one at the target: behind a policer or a short queue the
first step that does not fit shows loss while the overshoot is still small,
and the probe is stopped there, before it hurts the media it rides with.

:meth:`ProbePacer.due` says how many probe bytes should have been sent by
``now`` and are not yet; the caller sends about that much (whole packets)
and reports it with :meth:`ProbePacer.sent`. A timer every ``interval``
seconds (:meth:`next_deadline`) keeps the bursts short.
"""

from __future__ import annotations

__all__ = ["ProbePacer"]


class ProbePacer:
    __slots__ = ("base_bps", "target_bps", "start", "duration", "steps", "interval", "_rates", "_sent")

    def __init__(
        self,
        base_bps: float,
        target_bps: float,
        start: float,
        duration: float,
        *,
        steps: int = 8,
        interval: float = 0.015,
    ) -> None:
        if duration <= 0 or steps < 1 or interval <= 0:
            raise ValueError("duration, steps and interval must be positive")
        base = max(float(base_bps), 1.0)
        target = max(float(target_bps), base)
        self.base_bps = base
        self.target_bps = target
        self.start = start
        self.duration = duration
        self.steps = steps
        self.interval = interval
        ratio = target / base
        # Probe (not media) bit/s of each step: total base·ratio^((k+1)/steps) minus the media.
        self._rates = tuple(base * ratio ** ((k + 1) / steps) - base for k in range(steps))
        self._sent = 0

    @property
    def end(self) -> float:
        return self.start + self.duration

    @property
    def bytes_sent(self) -> int:
        return self._sent

    def total_rate(self, now: float) -> float:
        """Media + probe bit/s aimed at, at *now* (0 outside the probe)."""
        if now < self.start or now >= self.end:
            return 0.0
        k = min(int((now - self.start) / self.duration * self.steps), self.steps - 1)
        return self.base_bps + self._rates[k]

    def planned_bytes(self, now: float) -> float:
        """Probe bytes the ramp has called for from the start up to *now*."""
        elapsed = min(max(now - self.start, 0.0), self.duration)
        step = self.duration / self.steps
        full = int(elapsed / step)
        bits = sum(self._rates[:full]) * step
        if full < self.steps:
            bits += self._rates[full] * (elapsed - full * step)
        return bits / 8.0

    def due(self, now: float) -> int:
        """Probe bytes to send now (0 when ahead of the ramp or after the end)."""
        return max(0, int(self.planned_bytes(now)) - self._sent)

    def sent(self, nbytes: int) -> None:
        self._sent += nbytes

    def done(self, now: float) -> bool:
        return now >= self.end

    def next_deadline(self, now: float) -> float | None:
        return None if self.done(now) else min(now + self.interval, self.end)
