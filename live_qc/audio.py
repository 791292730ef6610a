"""Audio detectors on 48 kHz float blocks (channels × samples).

Every detector sees the same 50 ms blocks with their media time and refines a
fault's edges to the sample where the block allows it, so a marker's start
and end are not quantised to the block.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import replace

import numpy as np

from .loudness import RATE, LoudnessReading
from .markers import FaultTracker, Marker, MarkerEvent
from .thresholds import Thresholds

BLOCK = 2400  # 50 ms
_EPS = 1e-12


def _amp(db: float) -> float:
    return 10.0 ** (db / 20.0)


def _segments(tracker: FaultTracker, t0: float, n: int, parts: list[tuple[int, int, bool]],
              metadata: dict | None = None) -> list[MarkerEvent]:
    out: list[MarkerEvent] = []
    for a, b, faulty in parts:
        if b > a:
            out.extend(tracker.observe(t0 + a / RATE, t0 + b / RATE, faulty, metadata=metadata))
    return out


class PeakHistory:
    """5 ms sample peaks per channel over the last 0.4 s, to find where a cut happened.

    A lossy codec does not stop at a cut: Opus decays over ~150 ms (about
    2 dB per 10 ms) before it reaches −60 dBFS, so silencedetect's start lands
    late. Walking back from where the level is finally below threshold, a
    smooth decay is the codec's tail; the step of > 6 dB in 5 ms before it is
    the cut, and the fault is back-dated to it.
    """

    STEP = 240
    JUMP_DB = 6.0

    def __init__(self) -> None:
        self._t: deque[float] = deque(maxlen=80)
        self._db: deque[np.ndarray] = deque(maxlen=80)

    def add(self, t0: float, x: np.ndarray) -> None:
        n = x.shape[1] // self.STEP * self.STEP
        if n == 0:
            return
        peaks = np.max(np.abs(x[:, :n]).reshape(x.shape[0], -1, self.STEP), axis=2)
        levels = 20.0 * np.log10(peaks + 1e-9)
        for k in range(levels.shape[1]):
            self._t.append(t0 + k * self.STEP / RATE)
            self._db.append(levels[:, k])

    def cut_before(self, t: float, channels: list[int]) -> float:
        times = list(self._t)
        if not times:
            return t
        levels = [float(np.max(v[channels])) for v in self._db]
        i = int(np.searchsorted(times, t + 1e-9, side="right")) - 1
        i = min(max(i, 0), len(times) - 1)
        while i > 0:
            if levels[i - 1] - levels[i] > self.JUMP_DB:
                return min(t, times[i])
            if levels[i - 1] < levels[i] - 1.0:  # not a decay: nothing to back-date
                return t
            i -= 1
        return t


class SilenceDetector:
    """silencedetect semantics: every channel's sample peak below −60 dBFS for d."""

    def __init__(self, th: Thresholds, history: PeakHistory) -> None:
        self._level = _amp(th.silence_db)
        self._history = history
        self.tracker = FaultTracker("silence", "", th.silence_d, 0.0, "error")

    def block(self, t0: float, x: np.ndarray) -> list[MarkerEvent]:
        loud = np.flatnonzero(np.max(np.abs(x), axis=0) >= self._level)
        n = x.shape[1]
        if loud.size == 0:
            parts = [(0, n, True)]
        else:
            first, last = int(loud[0]), int(loud[-1]) + 1
            parts = [(0, first, True), (first, last, False), (last, n, True)]
        was = self.tracker.pending_since
        out: list[MarkerEvent] = []
        for a, b, faulty in parts:
            if b <= a:
                continue
            out += self.tracker.observe(t0 + a / RATE, t0 + b / RATE, faulty)
            began = self.tracker.pending_since
            if began is not None and began != was:
                self.tracker.backdate(self._history.cut_before(began, list(range(x.shape[0]))))
                out += self.tracker.observe(t0 + b / RATE, t0 + b / RATE, True)  # re-check d after back-dating
            was = self.tracker.pending_since
        return out


class ClippingDetector:
    """Runs of consecutive samples near full scale.

    FFmpeg's flat_factor counts samples exactly equal to the peak; AAC and Opus
    round a clipped top off into a ripple, so after coding it finds nothing.
    A run of ≥ 4 samples above −1 dBFS (same polarity) survives the coding: a
    legitimate signal 1 dB below full scale has no such plateau.
    """

    def __init__(self, th: Thresholds) -> None:
        self._level = _amp(th.clip_db)
        self._run = th.clip_run_len
        self._runs = th.clip_runs
        self.tracker = FaultTracker("clipping", "", 0.0, th.clip_clear_s, "error")

    def _runs_of(self, ch: np.ndarray) -> tuple[int, int, int]:
        """(number of runs, first run start, last run end) in one channel."""
        sign = np.where(ch >= self._level, 1, np.where(ch <= -self._level, -1, 0)).astype(np.int8)
        if not sign.any():
            return 0, 0, 0
        padded = np.concatenate(([0], sign, [0]))
        edges = np.flatnonzero(np.diff(padded) != 0)
        starts, ends = edges[:-1], edges[1:]
        vals = padded[starts + 1]
        keep = (vals != 0) & (ends - starts >= self._run)
        if not keep.any():
            return 0, 0, 0
        return int(keep.sum()), int(starts[keep][0]), int(ends[keep][-1])

    def block(self, t0: float, x: np.ndarray) -> list[MarkerEvent]:
        n = x.shape[1]
        total, first, last, channels = 0, n, 0, []
        for c in range(x.shape[0]):
            runs, a, b = self._runs_of(x[c])
            if runs:
                total += runs
                first, last = min(first, a), max(last, b)
                channels.append(c)
        if total < self._runs:
            return _segments(self.tracker, t0, n, [(0, n, False)])
        return _segments(self.tracker, t0, n, [(0, first, False), (first, last, True), (last, n, False)],
                         {"channels": channels})


def _rms_db(x: np.ndarray) -> np.ndarray:
    return 10.0 * np.log10(np.mean(np.square(x, dtype=np.float64), axis=-1) + _EPS)


class StereoDetector:
    """Phase, dead / duplicated channel and imbalance on the first two channels.

    Phase is the energy-weighted L/R correlation Σ L·R / √(ΣL² ΣR²) over the
    block (a loud block weighs more than a quiet one by construction); it is
    judged only while both channels carry signal, so a pause does not read as
    anti-phase. FFmpeg's aphasemeter averages a per-frame phase that AAC's
    joint-stereo coding drags back towards zero, which is why it ends early.
    """

    def __init__(self, th: Thresholds, history: PeakHistory) -> None:
        self.th = th
        self._history = history
        self.phase = FaultTracker("phase", "out_of_phase", th.phase_d, 0.3, "error")
        self.dead = [FaultTracker("channel", "dead", th.channel_d, 0.3, "error") for _ in range(2)]
        self.dup = FaultTracker("channel", "duplicate", th.channel_d, 0.3, "info")
        self.imbalance = FaultTracker("channel", "imbalance", th.channel_d, 0.3, "warning")
        self._dead_amp = _amp(th.dead_db)

    def block(self, t0: float, x: np.ndarray, tone: bool) -> list[MarkerEvent]:
        th = self.th
        t1 = t0 + x.shape[1] / RATE
        left, right = x[0].astype(np.float64), x[1].astype(np.float64)
        rms = _rms_db(x[:2])
        peak = np.max(np.abs(x[:2]), axis=1)
        both = bool(rms[0] > th.signal_db and rms[1] > th.signal_db)
        ll, rr, lr = float(left @ left), float(right @ right), float(left @ right)
        corr = lr / math.sqrt(ll * rr) if ll > 0 and rr > 0 else 0.0
        ev: list[MarkerEvent] = []
        ev += self.phase.observe(t0, t1, both and corr < th.phase_corr, metadata={"correlation": round(corr, 3)})
        for c in range(2):
            other = 1 - c
            dead = bool(peak[c] < self._dead_amp and rms[other] > th.signal_db)
            before = self.dead[c].pending_since
            ev += self.dead[c].observe(t0, t1, dead, metadata={"channel": c})
            began = self.dead[c].pending_since
            if began is not None and before is None:
                self.dead[c].backdate(self._history.cut_before(began, [c]))
        # A line-up tone is dual mono by design: not a duplicated-channel fault.
        dup = both and not tone and corr >= th.dup_corr and abs(rms[0] - rms[1]) < 0.5
        ev += self.dup.observe(t0, t1, dup, metadata={"correlation": round(corr, 4)})
        imb = both and abs(float(rms[0] - rms[1])) >= th.imbalance_db
        ev += self.imbalance.observe(t0, t1, imb, metadata={"difference_db": round(float(rms[0] - rms[1]), 1)})
        return ev


class ToneDetector:
    """A 1 kHz line-up tone: nearly all of a channel's energy within ±40 Hz of 1 kHz."""

    def __init__(self, th: Thresholds) -> None:
        self.th = th
        self.tracker = FaultTracker("tone", "1khz", th.tone_d, 0.3, "warning")
        freqs = np.fft.rfftfreq(BLOCK, 1.0 / RATE)
        self._band = np.abs(freqs - 1000.0) <= th.tone_bw_hz
        self._window = np.hanning(BLOCK)
        self.present = False

    def block(self, t0: float, x: np.ndarray) -> list[MarkerEvent]:
        t1 = t0 + x.shape[1] / RATE
        found, level = False, -math.inf
        if x.shape[1] == BLOCK:
            spec = np.abs(np.fft.rfft(x * self._window, axis=1)) ** 2
            total = spec.sum(axis=1) + _EPS
            purity = spec[:, self._band].sum(axis=1) / total
            rms = _rms_db(x)
            ok = (purity >= self.th.tone_purity) & (rms > self.th.signal_db)
            if ok.any():
                found = True
                level = float(np.max(rms[ok])) + 3.01  # sine peak level in dBFS
        self.present = found
        meta = {"level_dbfs": round(level, 1)} if found else None
        return self.tracker.observe(t0, t1, found, metadata=meta)


def _step_at(ts: np.ndarray, vals: np.ndarray) -> float:
    """Where a two-level piecewise-constant fit of ``vals`` changes level (least squares)."""
    n = vals.size
    if n < 4:
        return float(ts[0]) if n else 0.0
    cs = np.concatenate(([0.0], np.cumsum(vals)))
    cs2 = np.concatenate(([0.0], np.cumsum(vals * vals)))
    k = np.arange(1, n)
    left = cs2[k] - cs[k] ** 2 / k
    right = (cs2[n] - cs2[k]) - (cs[n] - cs[k]) ** 2 / (n - k)
    return float(ts[int(np.argmin(left + right)) + 1])


class LoudnessDetector:
    """EBU R128 live tolerance on short-term loudness, and true peak.

    Short-term (3 s) is what the tolerance is defined on, but it lags a step
    in level by up to 3 s on both edges. The marker's edges are therefore
    placed on the 100 ms loudness: at the step of a two-level least-squares
    fit over the 3 s before S crossed (a single threshold crossing of the
    100 ms loudness would land on programme flicker instead).
    """

    HISTORY_S = 3.5

    def __init__(self, th: Thresholds) -> None:
        self.th = th
        self.peak = FaultTracker("loudness", "true_peak", 0.0, 1.0, "error")
        self._state: dict[str, dict] = {d: {"since": None, "open": None} for d in ("loud", "quiet")}
        self._fast: deque[tuple[float, float]] = deque(maxlen=int(self.HISTORY_S * RATE / 240) + 1)

    def _side(self, level: float) -> str | None:
        if not math.isfinite(level) or level < -70.0:  # BS.1770 absolute gate: nothing to judge
            return None
        if level > self.th.target_lufs + self.th.tolerance_lu:
            return "loud"
        if level < self.th.target_lufs - self.th.tolerance_lu:
            return "quiet"
        return "in"

    def _edge(self, since: float, until: float) -> float:
        pts = [(t, v) for t, v in self._fast if since <= t <= until]
        if not pts:
            return until
        ts = np.array([p[0] for p in pts])
        vals = np.clip(np.array([p[1] for p in pts]), -70.0, 10.0)
        return _step_at(ts, vals)

    def reading(self, r: LoudnessReading, short_valid: bool, dt: float) -> list[MarkerEvent]:
        ev: list[MarkerEvent] = []
        over = math.isfinite(r.true_peak_dbtp) and r.true_peak_dbtp > self.th.true_peak_dbtp
        ev += self.peak.observe(r.t - dt, r.t, over,
                                metadata={"true_peak_dbtp": round(r.true_peak_dbtp, 2)} if over else None)
        self._fast.append((r.t - dt, r.fast if math.isfinite(r.fast) else -70.0))
        slow = self._side(r.short_term) if short_valid else None
        for d, st in self._state.items():
            if slow == d:
                if st["since"] is None:
                    st["since"] = r.t
                if st["open"] is None and r.t - st["since"] >= self.th.loudness_d:
                    start = self._edge(st["since"] - 3.0, r.t)
                    st["open"] = Marker("loudness", d, start, None, "warning", 1.0,
                                        {"short_term_lufs": round(r.short_term, 1)})
                    ev.append(MarkerEvent("open", replace(st["open"], metadata=dict(st["open"].metadata))))
                continue
            st["since"] = None
            m = st["open"]
            if m is not None:
                m.end = self._edge(max(m.start, r.t - self.HISTORY_S), r.t)
                ev.append(MarkerEvent("close", m))
                st["open"] = None
        return ev

    def flush(self, t: float) -> list[MarkerEvent]:
        """End of input. S may still lag a step back into tolerance: if the
        100 ms loudness has settled back inside, the fault ended at that step."""
        ev = self.peak.flush(t)
        for d, st in self._state.items():
            m = st["open"]
            if m is not None:
                m.end = t
                since = max(m.start, t - self.HISTORY_S)
                step = self._edge(since, t)
                after = [v for u, v in self._fast if step <= u <= t]
                if step > m.start and after:
                    energy = float(np.mean(np.power(10.0, np.array(after) / 10.0)))
                    if self._side(10.0 * math.log10(energy)) == "in":
                        m.end = step
                ev.append(MarkerEvent("close", m))
            st.update(since=None, open=None)
        return ev
