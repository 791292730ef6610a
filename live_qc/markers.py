"""Marker model and the open/close state machine every detector shares.

Sans-I/O: a tracker is fed observations with explicit media time and returns
marker events; it never reads a clock. The rule (DESIGN "Live QC"): a marker
opens when a fault has lasted its minimum duration, with ``start`` back-dated
to where the fault began, and closes when the fault has been gone for the
hysteresis time, with ``end`` at the first clean observation.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

TYPES = (
    "black", "freeze", "silence", "clipping", "phase", "loudness", "channel",
    "tone", "bars", "blur", "shake", "scene", "transport", "stall",
)


@dataclass(slots=True)
class Marker:
    type: str
    subtype: str
    start: float
    end: float | None = None
    severity: str = "warning"
    confidence: float = 1.0
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        # The CLI's field names (issue 12: start_s / end_s on the file's timeline).
        return {
            "type": self.type,
            "subtype": self.subtype,
            "start_s": round(self.start, 3),
            "end_s": None if self.end is None else round(self.end, 3),
            "severity": self.severity,
            "confidence": round(self.confidence, 3),
            "metadata": self.metadata,
        }


@dataclass(slots=True, frozen=True)
class MarkerEvent:
    kind: str  # "open" | "update" | "close"
    marker: Marker


@dataclass(slots=True)
class FaultTracker:
    """One fault kind on one stream: candidate → open → clearing → closed.

    ``min_duration``: how long the fault must last before the marker opens.
    ``clear_duration``: how long it must be gone before the marker closes
    (hysteresis against a fault that flickers at its threshold); a candidate
    that has not opened yet is dropped at the first clean observation, as
    FFmpeg's blackdetect/silencedetect do.
    """

    type: str
    subtype: str
    min_duration: float
    clear_duration: float = 0.0
    severity: str = "warning"
    _since: float | None = None
    _clear_since: float | None = None
    _open: Marker | None = None
    _confidence_sum: float = 0.0
    _count: int = 0

    @property
    def is_open(self) -> bool:
        return self._open is not None

    def observe(self, t0: float, t1: float, faulty: bool, confidence: float = 1.0,
                metadata: dict[str, Any] | None = None) -> list[MarkerEvent]:
        """One observation covering media time [t0, t1)."""
        events: list[MarkerEvent] = []
        if faulty:
            self._clear_since = None
            if self._since is None:
                self._since = t0
                self._confidence_sum = 0.0
                self._count = 0
            self._confidence_sum += confidence
            self._count += 1
            if self._open is None and t1 - self._since >= self.min_duration - 1e-9:
                self._open = Marker(self.type, self.subtype, self._since, None, self.severity,
                                    self._confidence_sum / self._count, dict(metadata or {}))
                events.append(MarkerEvent("open", replace(self._open, metadata=dict(self._open.metadata))))
            elif self._open is not None and metadata:
                self._open.metadata.update(metadata)
            return events
        if self._open is None:
            self._since = None
            return events
        if self._clear_since is None:
            self._clear_since = t0
        if t1 - self._clear_since >= self.clear_duration - 1e-9:
            events.append(self._close(self._clear_since))
        return events

    def backdate(self, t: float) -> None:
        """Move a pending (not yet open) candidate's start earlier, e.g. to where
        a codec's decay tail began."""
        if self._open is None and self._since is not None and t < self._since:
            self._since = t

    @property
    def pending_since(self) -> float | None:
        return self._since if self._open is None else None

    def flush(self, t: float) -> list[MarkerEvent]:
        """End of input: close an open marker where the input (or its clean run) ended."""
        if self._open is None:
            self._since = None
            return []
        return [self._close(self._clear_since if self._clear_since is not None else t)]

    def _close(self, end: float) -> MarkerEvent:
        marker = self._open
        assert marker is not None
        marker.end = end
        marker.confidence = self._confidence_sum / max(self._count, 1)
        self._open = None
        self._since = None
        self._clear_since = None
        return MarkerEvent("close", marker)
