"""What the caption tap produces (issue 13; DESIGN.md "Live captions").

These types are the contract between the caption engine (``live_qc.captions``,
in the caption worker process), the server's caption service, the
``/ws/events`` ``caption`` message, storage and the WebVTT/SRT exports.

Times are seconds on the stream's media timeline (the same clock as QC
markers' ``start``/``end``); the server adds wall-clock times when it maps
media time to wall clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Word", "Caption", "CaptionStats"]


@dataclass(slots=True, frozen=True)
class Word:
    text: str
    start: float
    end: float
    #: Whisper's word probability, 0..1.
    probability: float = 1.0
    #: Markedly louder than the speaker's running level (≥ 6 LU above the
    #: short-term loudness): WebVTT ``<b>``, the overlay's emphasis.
    emphasis: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, "start": round(self.start, 3), "end": round(self.end, 3),
                "probability": round(self.probability, 3), "emphasis": self.emphasis}


@dataclass(slots=True, frozen=True)
class Caption:
    """One caption event. ``final=False`` is a partial: it replaces the
    previous partial of the same stream and may still change. ``final=True``
    is committed text: never retracted, never repeated."""

    stream: str
    final: bool
    start: float
    end: float
    text: str
    words: tuple[Word, ...] = ()
    language: str = "en"

    def to_json(self) -> dict[str, Any]:
        return {"stream": self.stream, "final": self.final, "start": round(self.start, 3),
                "end": round(self.end, 3), "text": self.text, "language": self.language,
                "words": [w.to_json() for w in self.words]}


@dataclass(slots=True)
class CaptionStats:
    """Per-stream health of the caption tap, reported about once a second."""

    #: Seconds of audio decoded per second of wall time over the last report
    #: (< 1 keeps up).
    rtf: float = 0.0
    #: Media seconds between the newest audio received and the end of the
    #: newest committed (or skipped) audio.
    lag_s: float = 0.0
    #: Audio skipped to catch up with real time, in total.
    skipped_s: float = 0.0
    #: CPU seconds spent on this stream since the previous report.
    cpu_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
