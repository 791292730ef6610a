"""The QC tap's cheaper paths compute what the plain ones do (issue 12's CPU
budgets were met without changing what the detectors find): the shared
box-average pyramid, the integer-bin histogram, loudness windows summed from
step energies, and the worker's lower scheduling priority."""

from __future__ import annotations

import math
import os
import time

import numpy as np
import pytest

from live_qc.loudness import RATE, LoudnessMeter
from live_qc.tap import WORKER_NICE, TapWorker
from live_qc.video import Pyramid, _histogram32, sharpness


def box_mean(y: np.ndarray, width: int) -> np.ndarray:
    """The reference: a float32 box mean over whole f×f blocks, f = ⌊W / width⌋."""
    f = max(1, y.shape[1] // width)
    h, w = y.shape[0] // f * f, y.shape[1] // f * f
    if f == 1:
        return y[:h, :w].astype(np.float32)
    rows = y[:h, :w].reshape(h // f, f, w).sum(axis=1, dtype=np.float32)
    return rows.reshape(h // f, w // f, f).sum(axis=2) * (1.0 / (f * f))


@pytest.mark.parametrize("shape", [(720, 1280), (360, 640), (180, 320), (1080, 1920), (480, 854), (97, 333),
                                   (1, 41)])
@pytest.mark.parametrize("order", [(320, 160, 80, 40), (40, 80, 160, 320), (160, 80, 320, 40, 7, 1000)])
def test_pyramid_levels_equal_a_plain_box_mean_bit_for_bit(shape, order) -> None:
    rng = np.random.default_rng(sum(shape))
    # A frame plane is a view into rows padded to the line size, not a contiguous array.
    y = rng.integers(0, 256, (shape[0], shape[1] + 32), dtype=np.uint8)[:, :shape[1]]
    y[: max(1, shape[0] // 5)] = 255  # full-scale rows: the largest sums a level can hold
    pyramid = Pyramid(y)
    for width in order:
        got, want = pyramid.at(width), box_mean(y, width)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert np.array_equal(got, want), (shape, width)
    assert pyramid.at(order[0]) is pyramid.at(order[0])  # computed once per frame


def test_histogram32_counts_like_numpy_histogram_at_the_bin_edges() -> None:
    edges = np.array([[0.0, 7.9375, 8.0, 8.0625, 127.99, 128.0, 247.9, 248.0, 255.0]], np.float32)
    noise = np.random.default_rng(3).integers(0, 256, (45, 80)).astype(np.float32) / 1.7
    for small in (edges, noise, Pyramid(np.random.default_rng(4).integers(0, 256, (90, 160), np.uint8)).at(40)):
        want = np.histogram(small, bins=32, range=(0, 256))[0].astype(np.float64)
        assert np.array_equal(_histogram32(small), want)


def test_sharpness_in_one_buffer_equals_the_written_out_laplacian() -> None:
    small = np.random.default_rng(5).random((90, 160)).astype(np.float32) * 255
    lap = (4 * small[1:-1, 1:-1] - small[:-2, 1:-1] - small[2:, 1:-1] - small[1:-1, :-2] - small[1:-1, 2:])
    assert sharpness(small) == float(np.mean(np.abs(lap)))


def programme(seconds: float, channels: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((channels, int(seconds * RATE))).astype(np.float32) * 0.05
    x[:, RATE:2 * RATE] = 0.0                   # digital silence: −inf windows
    x[:, 3 * RATE:int(3.5 * RATE)] *= 15.0      # a loud burst
    x[:, 5 * RATE:6 * RATE] *= 1e-4             # very quiet, far below the gate
    return x


@pytest.mark.parametrize("channels", [1, 2, 5])
def test_loudness_windows_from_step_energies_match_the_librarys_own_windows(channels) -> None:
    x = programme(8.0, channels)
    summed = LoudnessMeter(channels, histogram=False)
    direct = LoudnessMeter(channels, histogram=False)
    direct._by_steps = False  # every window read from libebur128 itself, as before
    assert summed._by_steps
    a, b = [], []
    for off in range(0, x.shape[1], 1001):  # odd chunks, like decoder frames
        a += summed.feed(x[:, off:off + 1001])
        b += direct.feed(x[:, off:off + 1001])
    assert len(a) == len(b) == x.shape[1] // 240
    for ra, rb in zip(a, b):
        assert ra.t == rb.t and ra.true_peak_dbtp == rb.true_peak_dbtp
        for field in ("momentary", "short_term", "fast"):
            u, v = getattr(ra, field), getattr(rb, field)
            assert (u == v == -math.inf) or abs(u - v) < 1e-9, (field, ra.t, u, v)
    sa, sb = summed.summary(), direct.summary()
    assert sa.integrated_lufs == sb.integrated_lufs and sa.true_peak_dbtp == sb.true_peak_dbtp
    assert abs(sa.max_momentary_lufs - sb.max_momentary_lufs) < 1e-9
    assert abs(sa.max_short_term_lufs - sb.max_short_term_lufs) < 1e-9


def test_a_step_that_is_no_whole_millisecond_reads_the_library_directly() -> None:
    meter = LoudnessMeter(2, step=1001)
    assert not meter._by_steps
    readings = meter.feed(programme(2.0, 2))
    assert len(readings) == 2 * RATE // 1001 and math.isfinite(readings[-1].momentary)


def _nice(pid: int) -> int:
    return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[16])


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads niceness from /proc")
def test_the_worker_process_runs_at_a_lower_priority_than_the_server() -> None:
    w = TapWorker(capacity=8)
    w.start()
    try:
        assert w.pid is not None
        want = min(19, os.nice(0) + WORKER_NICE)
        idle = getattr(os, "SCHED_IDLE", None)

        def lowered() -> bool:
            # niceness first, then the policy: wait for both (the spawned
            # interpreter may still be starting, or between the two calls)
            return _nice(w.pid) == want and (idle is None or os.sched_getscheduler(w.pid) == idle)

        deadline = time.monotonic() + 30
        while not lowered() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _nice(w.pid) == want
        assert _nice(os.getpid()) == os.nice(0)  # the server's own priority is untouched
        if idle is not None:
            # and it runs only on a core forwarding leaves idle
            assert os.sched_getscheduler(w.pid) == idle
            assert os.sched_getscheduler(os.getpid()) == os.SCHED_OTHER
    finally:
        w.request_stop()
        w.close()
