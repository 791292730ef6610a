"""A stateful Silero VAD for live audio: the same decisions whatever the
chunking.

::

    16 kHz mono float32 ──► 512-sample windows (+ the 64 samples before each)
                        ──► silero_vad_v6.onnx, carrying h/c across calls
                        ──► speech probabilities ──► start / end (hangover)

faster-whisper's ``SileroVADModel.__call__`` zeroes the LSTM state and the
context on every call (it is written for whole files), so called per chunk
it forgets everything at each chunk boundary. The v6 graph runs its batch
axis as time (one h/c for the whole batch), so carrying ``h``, ``c``, the
last 64 samples and the sub-window remainder across calls makes feeding a
signal in one piece or in many give identical probabilities.

Decisions follow faster-whisper's ``get_speech_timestamps``: speech starts
at the first window ≥ ``threshold``; it ends once the probability has stayed
below ``neg_threshold`` (threshold − 0.15) for ``min_silence_s`` (the
hangover), at the sample where that silence began.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["RATE", "WINDOW", "VadEvent", "StreamingVad", "load_vad_session"]

RATE = 16000
WINDOW = 512
_CONTEXT = 64


def load_vad_session() -> Any:
    """The ONNX session of the VAD faster-whisper ships (one per process:
    the worker creates it once and shares it across streams — the state
    lives in each :class:`StreamingVad`, not in the session)."""
    import onnxruntime
    from faster_whisper.utils import get_assets_path

    opts = onnxruntime.SessionOptions()
    # One thread: the VAD is tiny and the cores belong to CTranslate2.
    opts.inter_op_num_threads = 1
    opts.intra_op_num_threads = 1
    opts.enable_cpu_mem_arena = False
    opts.log_severity_level = 4
    return onnxruntime.InferenceSession(os.path.join(get_assets_path(), "silero_vad_v6.onnx"),
                                        providers=["CPUExecutionProvider"], sess_options=opts)


@dataclass(slots=True, frozen=True)
class VadEvent:
    #: True: speech starts at ``sample``; False: speech ended at ``sample``.
    speech: bool
    #: Index on the VAD's own sample count (0 = the first sample fed).
    sample: int


@dataclass(slots=True)
class StreamingVad:
    session: Any
    threshold: float = 0.5
    #: Below this the window counts as silence (faster-whisper's default rule).
    neg_threshold: float | None = None
    #: Hangover: silence this long ends speech.
    min_silence_s: float = 0.5
    samples_seen: int = 0
    speaking: bool = False
    _h: np.ndarray = field(default_factory=lambda: np.zeros((1, 1, 128), np.float32))
    _c: np.ndarray = field(default_factory=lambda: np.zeros((1, 1, 128), np.float32))
    _context: np.ndarray = field(default_factory=lambda: np.zeros(_CONTEXT, np.float32))
    _pending: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    _silence_from: int | None = None
    #: Probability of every window processed by the last feed (for meters and tests).
    last_probs: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))

    def feed(self, samples: np.ndarray) -> list[VadEvent]:
        x = np.concatenate([self._pending, np.asarray(samples, np.float32).ravel()])
        n = len(x) // WINDOW
        self._pending = x[n * WINDOW:].copy()
        if n == 0:
            self.last_probs = np.zeros(0, np.float32)
            return []
        windows = x[:n * WINDOW].reshape(n, WINDOW)
        before = np.concatenate([self._context[None, :], windows[:-1, -_CONTEXT:]], axis=0)
        self._context = windows[-1, -_CONTEXT:].copy()
        probs, self._h, self._c = self.session.run(
            None, {"input": np.concatenate([before, windows], axis=1), "h": self._h, "c": self._c})
        probs = np.asarray(probs, np.float32).ravel()
        self.last_probs = probs
        first = self.samples_seen
        self.samples_seen += n * WINDOW
        return self._decide(probs, first)

    def _decide(self, probs: np.ndarray, first: int) -> list[VadEvent]:
        neg = self.neg_threshold if self.neg_threshold is not None else max(self.threshold - 0.15, 0.01)
        hangover = round(self.min_silence_s * RATE)
        events: list[VadEvent] = []
        for i, p in enumerate(probs):
            at = first + i * WINDOW
            if not self.speaking:
                if p >= self.threshold:
                    self.speaking = True
                    self._silence_from = None
                    events.append(VadEvent(True, at))
                continue
            if p >= self.threshold:
                self._silence_from = None
            elif p < neg:
                if self._silence_from is None:
                    self._silence_from = at
                if at + WINDOW - self._silence_from >= hangover:
                    self.speaking = False
                    events.append(VadEvent(False, self._silence_from))
                    self._silence_from = None
        return events

    def reset(self) -> None:
        """A discontinuity: the next audio is unrelated to what came before."""
        self._h = np.zeros((1, 1, 128), np.float32)
        self._c = np.zeros((1, 1, 128), np.float32)
        self._context = np.zeros(_CONTEXT, np.float32)
        self.samples_seen += len(self._pending)
        self._pending = np.zeros(0, np.float32)
        self.speaking = False
        self._silence_from = None
