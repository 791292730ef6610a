"""QcEngine: one stream's detectors behind two calls, audio() and video().

The same object serves the live tap (a later round runs it in a worker
process) and ``returnfeed qc FILE``: it is fed decoded data with explicit
media time and returns marker events; it holds no clock and does no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .audio import (BLOCK, ClippingDetector, LoudnessDetector, PeakHistory, SilenceDetector, StereoDetector,
                    ToneDetector)
from .loudness import RATE, LoudnessMeter, LoudnessSummary
from .markers import Marker, MarkerEvent
from .thresholds import Thresholds
from .video import (BarsDetector, BlackDetector, BlurDetector, Frame, FreezeDetector, Pyramid, SceneDetector,
                    ShakeDetector)

# Frames kept between two analysed frames to place an edge exactly: a 60 fps
# source at 10 fps analysis skips 5; anything beyond this is dropped (bounded).
_MAX_HELD = 16
# Audio whose stated time is further than this from where the samples so far
# end is a discontinuity (decoder frames jitter by far less).
_AUDIO_SLACK_S = 0.2


@dataclass(slots=True)
class Meters:
    """The latest read-out for a tile: momentary/short-term loudness, channel peaks."""

    t: float = 0.0
    momentary: float = float("-inf")
    short_term: float = float("-inf")
    peaks_dbfs: list[float] = field(default_factory=list)


class _AudioChain:
    def __init__(self, th: Thresholds, channels: int, histogram: bool) -> None:
        self.channels = channels
        self.meter = LoudnessMeter(channels, histogram=histogram)
        self.history = PeakHistory()
        self.detectors(th)
        self.pending = np.zeros((channels, 0), dtype=np.float32)
        self.t = 0.0  # media time of pending[:, 0]

    def detectors(self, th: Thresholds) -> None:
        """(Re)build the detectors; the meter (integrated loudness, LRA) and
        the peak history are the programme's and stay."""
        self.silence = SilenceDetector(th, self.history)
        self.clipping = ClippingDetector(th)
        self.stereo = StereoDetector(th, self.history) if self.channels >= 2 else None
        self.tone = ToneDetector(th)
        self.loudness = LoudnessDetector(th)

    def close_detectors(self, end: float) -> list[MarkerEvent]:
        ev = self.silence.tracker.flush(end) + self.clipping.tracker.flush(end) + self.tone.tracker.flush(end)
        if self.stereo is not None:
            st = self.stereo
            for tr in (st.phase, *st.dead, st.dup, st.imbalance):
                ev += tr.flush(end)
        return ev + self.loudness.flush(end)


class QcEngine:
    def __init__(self, thresholds: Thresholds | None = None, histogram: bool = True) -> None:
        self._histogram = histogram
        self._audio: _AudioChain | None = None
        self._summaries: list[LoudnessSummary] = []
        self.meters = Meters()
        self._video_detectors(thresholds or Thresholds())
        self._due: float | None = None
        self._held: list[Frame] = []
        self._before: list[Frame] = []
        self._last_t = 0.0

    def _video_detectors(self, th: Thresholds) -> None:
        self.th = th
        self._dt = 1.0 / th.analysis_fps
        self.black = BlackDetector(th)
        self.freeze = FreezeDetector(th)
        self.bars = BarsDetector(th)
        self.blur = BlurDetector(th)
        self.shake = ShakeDetector(th)
        self.scene = SceneDetector(th)

    def _video_trackers(self) -> tuple:
        return (self.black.tracker, self.freeze.tracker, self.bars.tracker, self.blur.tracker,
                self.shake.tracker, self.scene.tracker)

    def retune(self, thresholds: Thresholds) -> list[MarkerEvent]:
        """New thresholds mid-programme: the open markers close here and
        detection starts over with the new values, but the loudness meter
        carries on — the programme's integrated loudness and loudness range
        do not restart because an engineer moved a threshold."""
        t = self._last_t
        ev: list[MarkerEvent] = []
        for tr in self._video_trackers():
            ev += tr.flush(t)
        self._video_detectors(thresholds)
        if self._audio is not None:
            ev += self._audio.close_detectors(self._audio.t)
            self._audio.detectors(thresholds)
        return ev

    # -- audio ---------------------------------------------------------------
    def audio(self, t0: float, samples: np.ndarray) -> list[MarkerEvent]:
        """``samples``: channels × n float32 at 48 kHz; ``t0``: media time of the first.

        Consecutive calls are contiguous unless ``t0`` says otherwise by more
        than 0.2 s."""
        chain = self._audio
        if chain is None or chain.channels != samples.shape[0]:
            events = self._close_audio(t0)
            chain = self._audio = _AudioChain(self.th, samples.shape[0], self._histogram)
            chain.t = t0
            chain.meter.t0 = t0
        else:
            events = []
            expected = chain.t + chain.pending.shape[1] / RATE
            if abs(t0 - expected) > _AUDIO_SLACK_S:
                # A gap or a jump in the source's timeline: restart the block
                # grid there (a meter's windows simply see the splice).
                chain.pending = np.zeros((chain.channels, 0), dtype=np.float32)
                chain.t = t0
        chain.pending = np.concatenate((chain.pending, samples.astype(np.float32, copy=False)), axis=1)
        whole = chain.pending.shape[1] // BLOCK * BLOCK
        for off in range(0, whole, BLOCK):
            events += self._audio_block(chain, chain.t, chain.pending[:, off:off + BLOCK])
            chain.t += BLOCK / RATE
        chain.pending = chain.pending[:, whole:]
        self._last_t = max(self._last_t, chain.t)
        return events

    def _audio_block(self, chain: _AudioChain, t0: float, x: np.ndarray) -> list[MarkerEvent]:
        ev: list[MarkerEvent] = []
        chain.history.add(t0, x)
        ev += chain.silence.block(t0, x)
        ev += chain.clipping.block(t0, x)
        ev += chain.tone.block(t0, x)
        if chain.stereo is not None:
            ev += chain.stereo.block(t0, x, chain.tone.present)
        step = chain.meter.step / RATE
        for r in chain.meter.feed(x):
            ev += chain.loudness.reading(r, chain.meter.short_valid and r.t - chain.meter.t0 >= 3.0, step)
            self.meters.t, self.meters.momentary, self.meters.short_term = r.t, r.momentary, r.short_term
        peaks = np.max(np.abs(x), axis=1)
        self.meters.peaks_dbfs = [round(float(20 * np.log10(p)), 1) if p > 0 else float("-inf") for p in peaks]
        return ev

    def _close_audio(self, t: float) -> list[MarkerEvent]:
        chain = self._audio
        if chain is None:
            return []
        ev: list[MarkerEvent] = []
        if chain.pending.shape[1]:
            ev += self._audio_tail(chain)
        ev += chain.close_detectors(chain.t)
        self._summaries.append(chain.meter.summary())
        self._audio = None
        return ev

    def _audio_tail(self, chain: _AudioChain) -> list[MarkerEvent]:
        x = chain.pending
        chain.pending = np.zeros((chain.channels, 0), dtype=np.float32)
        ev = chain.silence.block(chain.t, x) + chain.clipping.block(chain.t, x)
        chain.meter.feed(x)
        chain.t += x.shape[1] / RATE
        return ev

    # -- video ---------------------------------------------------------------
    def video(self, pts: float, luma: np.ndarray) -> list[MarkerEvent]:
        """Every decoded frame's luma; analysed at ``analysis_fps``."""
        self._last_t = max(self._last_t, pts + self._dt)
        if self._due is not None and self._due - self._dt - 1e-6 < pts < self._due - 1e-6:
            if len(self._held) < _MAX_HELD:
                self._held.append((pts, luma))
            return []
        self._due = (pts if self._due is None or pts - self._due > self._dt else self._due) + self._dt
        held, self._held = self._held, []
        dt = self._dt
        ev: list[MarkerEvent] = []
        # Every detector reads this frame's box-averaged copies from one pyramid.
        pyramid = Pyramid(luma)
        ev += self.black.frame(pts, pyramid, held, dt)
        ev += self.bars.frame(pts, pyramid, held, dt)
        static_by_design = self.black.black or self.bars.present
        ev += self.freeze.frame(pts, pyramid, held, self._before, dt, static_by_design)
        self._before = held
        ev += self.blur.frame(pts, pyramid, held, dt, static_by_design)
        tiny = pyramid.at(160)
        ev += self.shake.frame(pts, tiny, dt, static_by_design)
        ev += self.scene.frame(pts, tiny, dt)
        return ev

    # -- end -------------------------------------------------------------------
    def flush(self, end: float | None = None) -> list[MarkerEvent]:
        t = self._last_t if end is None else end
        ev = self._close_audio(t)
        for tr in self._video_trackers():
            ev += tr.flush(t)
        return ev

    @property
    def media_end(self) -> float:
        """Media time just past the last audio sample or video frame seen."""
        return self._last_t

    def loudness_summary(self) -> LoudnessSummary | None:
        """Of the audio so far (the last channel layout if it changed)."""
        if self._audio is not None:
            return self._audio.meter.summary()
        return self._summaries[-1] if self._summaries else None


def closed_markers(events: list[MarkerEvent]) -> list[Marker]:
    return sorted((e.marker for e in events if e.kind == "close"), key=lambda m: (m.start, m.type, m.subtype))
