"""Per-viewer retransmission budget and send-rate meter (sans-I/O).

A Generic NACK (RFC 4585 §6.2.1) names packets the viewer is missing. Behind
a congested link answering all of them multiplies the congestion: a viewer
behind a 0.4 Mbit/s policer on a 2.5 Mbit/s layer asked for ~1000
retransmissions a second. So retransmissions draw from a token bucket:

* rate (bytes/s) = ``share`` × min(the layer's send rate, the viewer's
  estimated bandwidth) / 8 — never more than that share of what the link
  is believed to carry, so media keeps the rest. The estimate is the
  caller's (REMB and what gets through while the viewer loses packets);
  while the loss is above ``loss_threshold`` the layer's rate × (1 − loss)
  caps it too;
* depth = ``burst`` seconds at that rate, at least ``min_depth`` bytes (one
  large packet must always fit, else nothing could ever be resent);
* a packet produced more than the viewer's playout window ago — RTT +
  ``playout_allowance`` (jitter) — is not resent: by the time it arrives the
  viewer's jitter buffer has moved past it.

The rate is recomputed per RTCP packet (:meth:`RetransmitBudget.update`),
never per media packet; :meth:`take` is called per retransmitted packet.

:class:`RateMeter` turns a monotonically growing byte counter, sampled per
RTCP packet, into bit/s over about ``window`` seconds.
"""

from __future__ import annotations

import collections

__all__ = ["RateMeter", "RetransmitBudget"]


class RateMeter:
    __slots__ = ("window", "_samples")

    def __init__(self, window: float = 1.0) -> None:
        if window <= 0:
            raise ValueError("window must be positive")
        self.window = window
        self._samples: collections.deque[tuple[float, int]] = collections.deque(maxlen=256)

    def update(self, total_bytes: int, now: float) -> float | None:
        """Record the counter at *now*; the rate in bit/s, or None until known."""
        samples = self._samples
        samples.append((now, total_bytes))
        horizon = now - self.window
        while len(samples) > 2 and samples[1][0] <= horizon:
            samples.popleft()
        return self.rate

    @property
    def rate(self) -> float | None:
        samples = self._samples
        if len(samples) < 2:
            return None
        t0, b0 = samples[0]
        t1, b1 = samples[-1]
        if t1 - t0 < 0.2 * self.window:
            return None
        return max(0, b1 - b0) * 8.0 / (t1 - t0)


class RetransmitBudget:
    __slots__ = (
        "share",
        "burst",
        "min_depth",
        "playout_allowance",
        "loss_threshold",
        "rate_bps",
        "_tokens",
        "_last",
    )

    def __init__(
        self,
        share: float = 0.25,
        *,
        burst: float = 0.1,
        min_depth: int = 6000,
        playout_allowance: float = 0.5,
        loss_threshold: float = 0.03,
    ) -> None:
        if not 0.0 < share <= 1.0:
            raise ValueError("share must be in (0, 1]")
        if burst <= 0 or min_depth < 1 or playout_allowance <= 0:
            raise ValueError("burst, min_depth and playout_allowance must be positive")
        self.share = share
        self.burst = burst
        self.min_depth = min_depth
        self.playout_allowance = playout_allowance
        self.loss_threshold = loss_threshold
        self.rate_bps: float | None = None  # None: no rate measured yet
        self._tokens = float(min_depth)
        self._last: float | None = None

    def update(
        self, layer_bps: float | None, estimate_bps: float | None, loss: float | None, now: float
    ) -> float | None:
        """Recompute the rate from the layer's send rate, the REMB and the loss."""
        if layer_bps is None:
            return self.rate_bps
        self._refill(now)
        link = layer_bps
        if estimate_bps is not None:
            link = min(link, estimate_bps)
        if loss is not None and loss > self.loss_threshold:
            link = min(link, layer_bps * (1.0 - loss))
        self.rate_bps = max(self.share * link, 0.0)
        return self.rate_bps

    @property
    def depth(self) -> float:
        if self.rate_bps is None:
            return float(self.min_depth)
        return max(self.rate_bps / 8.0 * self.burst, float(self.min_depth))

    def _refill(self, now: float) -> None:
        last = self._last
        self._last = now
        if last is None or self.rate_bps is None or now <= last:
            return
        self._tokens = min(self._tokens + (now - last) * self.rate_bps / 8.0, self.depth)

    def take(self, nbytes: int, now: float) -> bool:
        """Spend *nbytes* if the bucket holds them."""
        self._refill(now)
        if self._tokens < nbytes:
            return False
        self._tokens -= nbytes
        return True

    def max_age(self, rtt: float | None) -> float:
        """Oldest packet age (s) still worth resending."""
        return self.playout_allowance + (rtt if rtt is not None else 0.0)
