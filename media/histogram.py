"""Histograms that cross process boundaries, and this process's garbage
collector pauses as one."""

from __future__ import annotations

import bisect
import gc
import time
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["GC_PAUSE_BUCKETS", "GcPauses", "LatencyCounts", "gc_pause_counts"]


@dataclass(slots=True)
class LatencyCounts:
    """A histogram as bucket counts (``buckets`` upper bounds, the last
    count is +Inf), picklable and summable across processes."""

    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value

    def add(self, other: "LatencyCounts") -> None:
        for i, n in enumerate(other.counts):
            self.counts[i] += n
        self.total += other.total

    def copy(self) -> "LatencyCounts":
        return LatencyCounts(self.buckets, list(self.counts), self.total)

    def cumulative(self) -> list[tuple[str, int]]:
        """Prometheus histogram buckets: (``le`` bound, count at or below)."""
        running = 0
        out = []
        for bound, n in zip((*self.buckets, float("inf")), self.counts):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
        return out


#: Pause bounds (s): a young collection takes tens of µs; a full one of a
#: process holding hundreds of viewers, tens of ms — every viewer of the
#: process waits that long for its next packet.
GC_PAUSE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25)


def gc_pause_counts(buckets: tuple[float, ...] = GC_PAUSE_BUCKETS) -> list[LatencyCounts]:
    """Empty pause counts for the collector's three generations."""
    return [LatencyCounts(buckets) for _ in range(3)]


class GcPauses:
    """The cycle collector's pauses in this process, per generation (0, 1,
    2 = full), wall-clock from the collector's start callback to its stop:
    what the process's event loop, and so its viewers, waited."""

    def __init__(self, buckets: tuple[float, ...] = GC_PAUSE_BUCKETS,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.by_generation = gc_pause_counts(buckets)
        self._clock = clock
        self._started = 0.0

    def install(self) -> "GcPauses":
        if self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)
        return self

    def uninstall(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = self._clock()
        else:
            self.by_generation[info["generation"]].observe(self._clock() - self._started)

    def snapshot(self) -> list[LatencyCounts]:
        return [c.copy() for c in self.by_generation]
