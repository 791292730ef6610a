"""Video detectors on luma (the Y plane, uint8, limited range as decoded).

Frames are analysed at the configured rate (10 fps by default), but the
frames skipped in between are kept until the next analysed frame: where a
detector's state changes between two analysed frames, the skipped frames are
scanned to put the edge on the frame where it really happened (a 25 fps
source analysed at 10 fps would otherwise be up to 120 ms late).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable, Sequence

import numpy as np

from .markers import FaultTracker, MarkerEvent
from .thresholds import Thresholds

Frame = tuple[float, np.ndarray]  # (pts in seconds, luma)


def _box_sums(src: np.ndarray, k: int, dtype: type) -> np.ndarray:
    """Integer sums of k×k blocks (the trailing rows/columns that make no whole block are cut).

    Strided adds of whole rows, then of columns: each pass is one contiguous
    sweep, where a reduction over a reshaped middle or inner axis of length
    k makes numpy loop per output row.
    """
    h2, w2 = src.shape[0] // k, src.shape[1] // k
    hk, wk = h2 * k, w2 * k
    rows = src[0:hk:k, :wk].astype(dtype)
    for i in range(1, k):
        rows += src[i:hk:k, :wk]
    out = rows[:, 0:wk:k].copy()
    for j in range(1, k):
        out += rows[:, j:wk:k]
    return out


class Pyramid:
    """One frame's luma box-averaged to the widths the detectors use, each
    width computed once per frame and shared (black and bars, freeze at 80,
    blur at 320 and 40, shake and scene at 160 all read the same frame).

    ``at(width)`` is ``downscale(y, width)`` bit for bit: block sums are exact
    integers, a level whose factor is a multiple of an already summed level's
    factor is summed from that level (⌊⌊h/a⌋/b⌋ = ⌊h/ab⌋ keeps the same crop),
    and the sums are scaled in float32 the way a float32 box mean is.
    """

    #: The widths the detectors ask for; each level is summed from the finest
    #: of these that divides it, so the full picture is read once.
    WIDTHS = (320, 160, 80, 40)

    __slots__ = ("y", "_sums", "_avg")

    def __init__(self, y: np.ndarray) -> None:
        self.y = y
        self._sums: dict[int, np.ndarray] = {1: y}
        self._avg: dict[int, np.ndarray] = {}

    def at(self, width: int) -> np.ndarray:
        f = max(1, self.y.shape[1] // width)
        out = self._avg.get(f)
        if out is None:
            if f == 1:
                out = self.y.astype(np.float32)
            else:
                out = self._block_sums(f).astype(np.float32) * (1.0 / (f * f))
            self._avg[f] = out
        return out

    def _block_sums(self, f: int) -> np.ndarray:
        sums = self._sums.get(f)
        if sums is None:
            finer = [g for g in (max(1, self.y.shape[1] // w) for w in self.WIDTHS) if 1 < g < f and f % g == 0]
            if finer:
                self._block_sums(max(finer))
            base = max(g for g in self._sums if f % g == 0)
            # 16-bit sums while a block of 8-bit pixels cannot overflow them (less memory to sweep).
            dtype = np.uint16 if 255 * f * f <= 0xFFFF else np.int32
            sums = self._sums[f] = _box_sums(self._sums[base], f // base, dtype)
        return sums


def downscale(y: np.ndarray, width: int) -> np.ndarray:
    """Box-average to about ``width`` columns (float32); cheap and alias-free enough."""
    return Pyramid(y).at(width)


def edge_in(held: Sequence[Frame], pred: Callable[[Pyramid], bool], default: float) -> float:
    """pts of the first skipped frame for which ``pred`` already holds."""
    for pts, y in held:
        if pred(Pyramid(y)):
            return pts
    return default


class BlackDetector:
    """blackdetect semantics (pix_th 0.10, pic_th 0.98, d 2.0), raised at d, not at the end."""

    def __init__(self, th: Thresholds) -> None:
        # FFmpeg: pixel_black_th_i = 16 + pix_th·(235 − 16), stored as an integer.
        self._pix = int(16 + th.black_pix_th * (235 - 16))
        self._pic = th.black_pic_th
        self.tracker = FaultTracker("black", "", th.black_d, 0.0, "error")
        self.black = False

    def is_black(self, y: np.ndarray) -> bool:
        need = self._pic * y.size
        # Exact early answer for the usual picture: when every 8th row alone
        # has more non-black pixels than a black picture may have in all, the
        # whole count cannot reach pic_th (N − need is exact: Sterbenz).
        sample = y[::8]
        if sample.size - np.count_nonzero(sample <= self._pix) > y.size - need:
            return False
        return np.count_nonzero(y <= self._pix) >= need

    def frame(self, pts: float, pyramid: Pyramid, held: Sequence[Frame], dt: float) -> list[MarkerEvent]:
        black = self.is_black(pyramid.y)
        t0 = pts
        if black != self.black:
            t0 = edge_in(held, (lambda f: self.is_black(f.y)) if black else (lambda f: not self.is_black(f.y)), pts)
        self.black = black
        return self.tracker.observe(t0, pts + dt, black)


class FreezeDetector:
    """freezedetect semantics (n 0.001 of full scale, d 2 s), but never during black.

    FFmpeg compares each frame with the freeze's first frame; a digitally black
    picture is perfectly "frozen" and FFmpeg flags it. Black is its own fault
    (and colour bars are static by design), so both suspend the freeze rule.
    Start is the frame where the picture stopped changing; end the first frame
    that differs from it.

    The comparison is on an 80-column box-averaged picture: an encoder keeps
    refining a still picture for a while (x264 moves a frozen frame by ~0.3
    levels per pixel over 0.3 s in fine detail, which full-resolution
    freezedetect takes for motion and so starts the freeze late), while real
    motion survives the averaging.
    """

    def __init__(self, th: Thresholds) -> None:
        self._n = th.freeze_n * 256.0  # mean |ΔY| in 8-bit levels
        self.tracker = FaultTracker("freeze", "", th.freeze_d, 0.0, "error")
        # The reference frame with its pyramid: compared with every analysed frame.
        self._ref: tuple[float, Pyramid] | None = None
        self._frozen = False

    def _same(self, a: Pyramid, b: Pyramid) -> bool:
        if a.y.shape != b.y.shape:
            return False
        return float(np.mean(np.abs(a.at(80) - b.at(80)))) <= self._n

    def frame(self, pts: float, pyramid: Pyramid, held: Sequence[Frame], before: Sequence[Frame], dt: float,
              suspended: bool) -> list[MarkerEvent]:
        if suspended:
            self._ref = (pts, pyramid)
            self._frozen = False
            return self.tracker.observe(pts, pts + dt, False)
        ref = self._ref
        frozen = ref is not None and self._same(pyramid, ref[1])
        t0 = pts
        if frozen and not self._frozen:
            # The picture stopped at the reference frame or before it: walk back
            # through the frames skipped before the reference while they match.
            t0 = ref[0]
            for p, f in reversed(before):
                if not self._same(Pyramid(f), ref[1]):
                    break
                t0 = p
        elif not frozen and self._frozen and ref is not None:
            t0 = edge_in(held, lambda f: not self._same(f, ref[1]), pts)
        if not frozen:
            self._ref = (pts, pyramid)
        self._frozen = frozen
        return self.tracker.observe(t0, pts + dt, frozen, metadata={"reference_pts": round(self._ref[0], 3)})


class BarsDetector:
    """SMPTE / EBU colour bars: 7 or 8 vertical bars of descending luma.

    Every bar pattern orders its bars by luma (white, yellow, cyan, green,
    magenta, red, blue, [black]); the test is that column structure in the
    upper half of the picture: each column constant down the rows, each bar
    flat across, and each bar darker than the one to its left.
    """

    def __init__(self, th: Thresholds) -> None:
        self.tracker = FaultTracker("bars", "", th.bars_d, 0.0, "warning")
        self.present = False

    @staticmethod
    def is_bars(p: Pyramid) -> bool:
        small = p.at(160)
        h = small.shape[0]
        region = small[int(h * 0.05):int(h * 0.55)]
        if region.size == 0 or float(np.mean(np.std(region, axis=0))) > 4.0:
            return False
        profile = region.mean(axis=0)
        w = profile.size
        for bars in (7, 8):
            edges = np.linspace(0, w, bars + 1)
            means = []
            flat = True
            for a, b in zip(edges[:-1], edges[1:]):
                lo, hi = int(a + (b - a) * 0.2), int(math.ceil(b - (b - a) * 0.2))
                seg = profile[lo:hi]
                if seg.size == 0 or float(np.std(seg)) > 4.0:
                    flat = False
                    break
                means.append(float(seg.mean()))
            if flat and all(m1 - m2 >= 8.0 for m1, m2 in zip(means[:-1], means[1:])):
                return True
        return False

    def frame(self, pts: float, pyramid: Pyramid, held: Sequence[Frame], dt: float) -> list[MarkerEvent]:
        bars = self.is_bars(pyramid)
        t0 = pts
        if bars != self.present:
            t0 = edge_in(held, (lambda f: self.is_bars(f)) if bars else (lambda f: not self.is_bars(f)), pts)
        self.present = bars
        return self.tracker.observe(t0, pts + dt, bars)


def sharpness(small: np.ndarray) -> float:
    """Mean absolute 4-neighbour Laplacian: high-frequency detail that blur removes."""
    lap = 4 * small[1:-1, 1:-1]
    # In place, in the order of the written-out expression (same float32 rounding).
    lap -= small[:-2, 1:-1]
    lap -= small[2:, 1:-1]
    lap -= small[1:-1, :-2]
    lap -= small[1:-1, 2:]
    return float(np.mean(np.abs(lap, out=lap)))


class BlurDetector:
    """Sharpness below a fraction of the stream's own recent baseline.

    Absolute sharpness depends on the scene, so the reference is the median
    of this stream's recent unblurred frames. Blur softens fine detail but
    keeps the picture's coarse structure (measured the same way on a
    40-column image); a picture that lost both is a slate, a fill or a cut to
    a plain scene, not a focus fault, and is not judged.
    """

    def __init__(self, th: Thresholds) -> None:
        self.th = th
        self.tracker = FaultTracker("blur", "", th.blur_d, 0.3, "warning")
        n = max(4, int(th.blur_baseline_s * th.analysis_fps))
        self._fine: deque[float] = deque(maxlen=n)
        self._coarse: deque[float] = deque(maxlen=n)
        self.blurred = False

    @staticmethod
    def measure(p: Pyramid) -> tuple[float, float]:
        return sharpness(p.at(320)), sharpness(p.at(40))

    def _is_blurred(self, fine: float, coarse: float, base: tuple[float, float]) -> bool:
        return fine < self.th.blur_ratio * base[0] and coarse >= 0.5 * base[1]

    def frame(self, pts: float, pyramid: Pyramid, held: Sequence[Frame], dt: float,
              suspended: bool) -> list[MarkerEvent]:
        fine, coarse = self.measure(pyramid)
        base = (statistics.median(self._fine), statistics.median(self._coarse)) if len(self._fine) >= 4 else None
        blurred = not suspended and base is not None and base[0] >= 2.0 and self._is_blurred(fine, coarse, base)
        t0 = pts
        if blurred != self.blurred and base is not None:
            t0 = edge_in(held, lambda f: self._is_blurred(*self.measure(f), base) == blurred, pts)
        if not blurred and not suspended:
            self._fine.append(fine)
            self._coarse.append(coarse)
        self.blurred = blurred
        meta = {"sharpness": round(fine, 2), "baseline": round(base[0], 2)} if blurred and base else None
        return self.tracker.observe(t0, pts + dt, blurred, metadata=meta)


def spectrum(x: np.ndarray, window: np.ndarray) -> np.ndarray:
    """The windowed, mean-free spectrum phase correlation compares."""
    return np.fft.rfft2((x - x.mean()) * window)


def global_shift(a: np.ndarray, b: np.ndarray, window: np.ndarray) -> tuple[float, float, float]:
    """Translation of b against a by phase correlation, with a parabolic sub-pixel
    peak, and the peak's height (near 1 for one clean global shift, near 0 for
    noise or unrelated pictures)."""
    return shift_between(spectrum(a, window), spectrum(b, window), a.shape)


def shift_between(fa: np.ndarray, fb: np.ndarray, shape: tuple[int, ...]) -> tuple[float, float, float]:
    """:func:`global_shift` from the two pictures' :func:`spectrum`."""
    cross = fb * np.conj(fa)
    cross /= np.abs(cross) + 1e-9
    corr = np.fft.irfft2(cross, s=shape)
    iy, ix = np.unravel_index(int(np.argmax(corr)), corr.shape)
    h, w = corr.shape

    def refine(c_m: float, c_0: float, c_p: float) -> float:
        den = c_m - 2 * c_0 + c_p
        return 0.5 * (c_m - c_p) / den if abs(den) > 1e-12 else 0.0

    dy = iy + refine(corr[(iy - 1) % h, ix], corr[iy, ix], corr[(iy + 1) % h, ix])
    dx = ix + refine(corr[iy, (ix - 1) % w], corr[iy, ix], corr[iy, (ix + 1) % w])
    if dy > h / 2:
        dy -= h
    if dx > w / 2:
        dx -= w
    return float(dx), float(dy), float(corr[iy, ix])


class ShakeDetector:
    """Camera shake: global motion that keeps reversing direction.

    A pan moves the whole picture one way; shake moves it back and forth.
    Frame-to-frame global motion comes from phase correlation of 160-pixel
    images; with the pan (median motion of the last second) removed, a frame
    is shaky while it moves (> shake_px; or did at the previous analysed
    frame) and the motion has reversed at least twice within the last 0.5 s.
    """

    MIN_PEAK = 0.1

    def __init__(self, th: Thresholds) -> None:
        self.th = th
        self.tracker = FaultTracker("shake", "", th.shake_d, 0.5, "warning")
        self._prev: np.ndarray | None = None
        # The previous picture's spectrum, when it was taken (each picture is
        # transformed once: as the newer of a pair, then as the older).
        self._prev_spectrum: np.ndarray | None = None
        self._prev_motion: tuple[float, float] | None = None
        self._reversals: deque[float] = deque(maxlen=32)
        self._was_moving = False
        self._last_moving: float | None = None
        self._motion: deque[tuple[float, float]] = deque(maxlen=max(3, int(th.analysis_fps)))
        self._window: np.ndarray | None = None

    def frame(self, pts: float, small: np.ndarray, dt: float, suspended: bool) -> list[MarkerEvent]:
        prev, self._prev = self._prev, small
        prev_spectrum, self._prev_spectrum = self._prev_spectrum, None
        if prev is None or prev.shape != small.shape or suspended:
            self._prev_motion = None
            return self.tracker.observe(pts, pts + dt, False)
        if self._window is None or self._window.shape != small.shape:
            self._window = np.outer(np.hanning(small.shape[0]), np.hanning(small.shape[1])).astype(np.float32)
        current = self._prev_spectrum = spectrum(small, self._window)
        older = prev_spectrum if prev_spectrum is not None else spectrum(prev, self._window)
        mx, my, peak = shift_between(older, current, small.shape)
        if peak < self.MIN_PEAK:
            # No single global motion (noise, a cut, a flat picture): nothing to judge.
            self._prev_motion = None
            self._was_moving = False
            return self.tracker.observe(pts, pts + dt, False)
        self._motion.append((mx, my))
        # Shake is the motion around the pan: subtract the median motion of the last second.
        pan = (statistics.median(m[0] for m in self._motion), statistics.median(m[1] for m in self._motion))
        dx, dy = mx - pan[0], my - pan[1]
        mag = math.hypot(dx, dy)
        moving = mag > self.th.shake_px
        last = self._prev_motion
        if moving and last is not None and math.hypot(*last) > self.th.shake_px and dx * last[0] + dy * last[1] < 0:
            self._reversals.append(pts)
        self._prev_motion = (dx, dy)
        recent = [t for t in self._reversals if pts - t <= 0.5]
        # Sampled at 10 fps, a 3 Hz shake has intervals with little net motion:
        # one still interval inside a run of reversals does not end it.
        shaky = (moving or self._was_moving) and len(recent) >= 2
        self._was_moving = moving
        # The first reversed move began a frame before the reversal.
        t0 = recent[0] - 2 * dt if shaky and not self.tracker.is_open else pts
        if shaky and moving:
            self._last_moving = pts
        events = self.tracker.observe(t0, pts + dt, shaky, metadata={"motion_px": round(mag, 2)} if shaky else None)
        for e in events:
            # Hysteresis decides *when* to close; the shake ended with its last move.
            if e.kind == "close" and self._last_moving is not None and e.marker.end is not None:
                e.marker.end = max(e.marker.start, min(e.marker.end, self._last_moving))
        return events


def _histogram32(small: np.ndarray) -> np.ndarray:
    """``np.histogram(small, bins=32, range=(0, 256))`` counts as float64, for
    box averages of 8-bit luma (all within the range): the bin is ⌊v / 8⌋,
    exact in floating point (v·0.125 is a power-of-two scaling), so this is
    the same count without numpy's general edge search (~7× faster)."""
    bins = np.minimum((small * 0.125).astype(np.intp), 31)
    return np.bincount(bins.ravel(), minlength=32).astype(np.float64)


class SceneDetector:
    """Scene-change rate: more than scene_max_cuts cuts within scene_window_s."""

    def __init__(self, th: Thresholds) -> None:
        self.th = th
        self.tracker = FaultTracker("scene", "rapid_cuts", 0.0, th.scene_window_s / 2, "info")
        self._prev_hist: np.ndarray | None = None
        self._cuts: deque[float] = deque()

    def frame(self, pts: float, small: np.ndarray, dt: float) -> list[MarkerEvent]:
        hist = _histogram32(small)
        hist /= max(hist.sum(), 1.0)
        prev, self._prev_hist = self._prev_hist, hist
        if prev is not None and 0.5 * float(np.abs(hist - prev).sum()) > self.th.scene_cut_diff:
            self._cuts.append(pts)
        while self._cuts and pts - self._cuts[0] > self.th.scene_window_s:
            self._cuts.popleft()
        rapid = len(self._cuts) > self.th.scene_max_cuts
        t0 = self._cuts[0] if rapid and not self.tracker.is_open else pts
        return self.tracker.observe(t0, pts + dt, rapid, metadata={"cuts": len(self._cuts)} if rapid else None)
