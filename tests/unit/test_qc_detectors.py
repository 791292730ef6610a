"""QcEngine on synthetic arrays: each detector's rule, without a codec in between."""

from __future__ import annotations

import numpy as np
import pytest

from live_qc.engine import QcEngine, closed_markers
from live_qc.thresholds import Thresholds

RATE = 48000
FPS = 25


def run_audio(x: np.ndarray, engine: QcEngine | None = None, chunk: int = 1024):
    engine = engine or QcEngine()
    events = []
    for off in range(0, x.shape[1], chunk):
        events += engine.audio(off / RATE, x[:, off:off + chunk])
    events += engine.flush()
    return engine, events


def noise(seconds: float, seed: int = 0, level_db: float = -26.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(seconds * RATE)
    common = rng.standard_normal(n)
    x = np.stack([0.7 * common + 0.5 * rng.standard_normal(n), 0.7 * common + 0.5 * rng.standard_normal(n)])
    return (x * 10 ** (level_db / 20) / x.std()).astype(np.float32)


def sl(a: float, b: float) -> slice:
    return slice(int(a * RATE), int(b * RATE))


def test_silence_edges_are_sample_accurate_and_d_is_respected():
    x = noise(8.0)
    x[:, sl(1.234, 3.9)] = 0  # 2.666 s: a marker
    x[:, sl(5.0, 6.9)] = 0    # 1.9 s: under d = 2 s
    _, events = run_audio(x)
    silences = [m for m in closed_markers(events) if m.type == "silence"]
    assert [(round(m.start, 3), round(m.end, 3)) for m in silences] == [(1.234, 3.9)]
    opened = [e for e in events if e.kind == "open" and e.marker.type == "silence"]
    assert len(opened) == 1 and opened[0].marker.start == pytest.approx(1.234, abs=1e-3)


def test_silence_open_event_comes_when_d_is_reached_not_at_the_end():
    x = noise(10.0)
    x[:, sl(2.0, 9.0)] = 0
    engine = QcEngine()
    opened_at = None
    for off in range(0, x.shape[1], 2400):
        for e in engine.audio(off / RATE, x[:, off:off + 2400]):
            if e.kind == "open" and e.marker.type == "silence":
                opened_at = (off + 2400) / RATE
    assert opened_at == pytest.approx(4.0, abs=0.06)


def test_clipping_needs_runs_not_single_peaks():
    x = noise(6.0)
    x[0, sl(2.0, 2.00002)] = 0.99  # a single sample: a peak, not clipping
    # A 300 Hz tone driven 6 dB into the rails (white noise is a poor model
    # here: its samples are independent, so its clipped tops form no runs).
    t = np.arange(int(0.8 * RATE)) / RATE
    x[:, int(3.3 * RATE):int(3.3 * RATE) + t.size] = np.clip(2.0 * np.sin(2 * np.pi * 300 * t), -1, 1)
    _, events = run_audio(x)
    clips = [m for m in closed_markers(events) if m.type == "clipping"]
    assert [(round(m.start, 2), round(m.end, 2)) for m in clips] == [(3.3, 4.1)]


def test_phase_dead_and_imbalance():
    x = noise(12.0)
    x[1, sl(1.0, 3.5)] *= -1
    x[0, sl(5.0, 7.5)] = 0
    x[1, sl(9.0, 11.5)] *= 0.25  # −12 dB
    _, events = run_audio(x)
    got = {(m.type, m.subtype): (round(m.start, 2), round(m.end, 2)) for m in closed_markers(events)
           if m.type in ("phase", "channel")}
    assert got[("phase", "out_of_phase")] == pytest.approx((1.0, 3.5), abs=0.06)
    assert got[("channel", "dead")] == pytest.approx((5.0, 7.5), abs=0.06)
    assert got[("channel", "imbalance")] == pytest.approx((9.0, 11.5), abs=0.06)


def test_mono_duplicated_channels_flagged_but_not_for_a_lineup_tone():
    x = noise(10.0)
    x[1, sl(1.0, 4.0)] = x[0, sl(1.0, 4.0)]
    t = np.arange(int(3.0 * RATE)) / RATE
    x[:, sl(6.0, 9.0)] = (10 ** (-18 / 20) * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    _, events = run_audio(x)
    markers = closed_markers(events)
    dup = [m for m in markers if m.subtype == "duplicate"]
    assert [(round(m.start, 2), round(m.end, 2)) for m in dup] == [(1.0, 4.0)]
    tone = [m for m in markers if m.type == "tone"]
    assert len(tone) == 1 and tone[0].metadata["level_dbfs"] == pytest.approx(-18.0, abs=0.3)


def test_true_peak_over_minus_one_dbtp():
    x = noise(4.0)
    t = np.arange(int(0.5 * RATE)) / RATE
    # A sine at fs/4 with 45° phase: samples at −1.6 dBFS, true peak +1.4 dBTP.
    x[:, sl(2.0, 2.5)] = (1.18 * np.sin(2 * np.pi * 12000 * t + np.pi / 4)).astype(np.float32)
    engine, events = run_audio(x)
    peaks = [m for m in closed_markers(events) if m.subtype == "true_peak"]
    assert len(peaks) == 1 and peaks[0].start == pytest.approx(2.0, abs=0.02)
    assert engine.loudness_summary().true_peak_dbtp > 1.0


def frames(seconds: float, fn):
    for i in range(int(seconds * FPS)):
        yield i / FPS, fn(i / FPS)


def moving(t: float) -> np.ndarray:
    """A moving picture with coarse structure and fine detail."""
    yy, xx = np.mgrid[0:180, 0:320]
    coarse = 60 * np.sin((xx + 40 * t) / 7.0) * np.cos((yy - 25 * t) / 9.0)
    fine = 30 * np.sin((xx + 40 * t) / 1.3 + yy / 1.7)
    return np.clip(128 + coarse + fine, 0, 255).astype(np.uint8)


def texture(h: int, w: int, seed: int = 5) -> np.ndarray:
    """Non-periodic detail, so phase correlation has one unambiguous peak."""
    rng = np.random.default_rng(seed)
    n = rng.standard_normal((h, w))
    n = (n + np.roll(n, 1, 0) + np.roll(n, 1, 1) + np.roll(n, (1, 1), (0, 1))) / 4
    return np.clip(128 + 50 * n, 0, 255).astype(np.uint8)


def run_video(fn, seconds: float, thresholds: Thresholds | None = None):
    engine = QcEngine(thresholds)
    events = []
    for pts, y in frames(seconds, fn):
        events += engine.video(pts, y)
    events += engine.flush(seconds)
    return closed_markers(events)


def test_black_edges_land_on_the_frame_even_between_analysed_frames():
    black = np.full((180, 320), 16, np.uint8)
    markers = run_video(lambda t: black if 1.24 <= t < 4.52 else moving(t), 6.0)
    assert [(m.type, round(m.start, 2), round(m.end, 2)) for m in markers] == [("black", 1.24, 4.52)]


def test_black_under_pic_th_is_not_black():
    def pic(t):
        y = np.full((180, 320), 16, np.uint8)
        y[:, 310:] = moving(t)[:, 310:]  # 3.1 % of the picture carries picture
        return y
    assert run_video(pic, 4.0) == []


def test_freeze_but_not_during_black_or_bars():
    still = moving(2.0)
    black = np.full((180, 320), 16, np.uint8)

    def pic(t):
        if 1.0 <= t < 3.6:
            return still
        if 4.0 <= t < 7.0:
            return black
        return moving(t)
    markers = run_video(pic, 8.0)
    assert [(m.type, round(m.start, 2), round(m.end, 2)) for m in markers] == \
        [("freeze", 1.0, 3.6), ("black", 4.0, 7.0)]


def bars_picture() -> np.ndarray:
    levels = [180, 162, 131, 112, 84, 65, 35]  # 75 % bars' luma, white to blue
    y = np.zeros((180, 320), np.uint8)
    edges = np.linspace(0, 320, 8).astype(int)
    for lv, a, b in zip(levels, edges[:-1], edges[1:]):
        y[:120, a:b] = lv
    y[120:] = 16
    return y


def test_colour_bars_and_no_freeze_while_bars():
    bars = bars_picture()
    markers = run_video(lambda t: bars if 0.52 <= t < 3.4 else moving(t), 5.0)
    assert [(m.type, round(m.start, 2), round(m.end, 2)) for m in markers] == [("bars", 0.52, 3.4)]


def test_blur_against_own_baseline():
    def pic(t):
        y = moving(t).astype(np.float32)
        if 3.0 <= t < 6.0:
            k = 9
            y = np.cumsum(np.cumsum(np.pad(y, k), axis=0), axis=1)
            y = (y[k:-k, k:-k] - y[:-2 * k, k:-k] - y[k:-k, :-2 * k] + y[:-2 * k, :-2 * k]) / (k * k)
            y = y[: 180, : 320]
        return np.clip(y, 0, 255).astype(np.uint8)
    markers = [m for m in run_video(pic, 8.0) if m.type == "blur"]
    assert [(round(m.start, 1), round(m.end, 1)) for m in markers] == [(3.0, 6.0)]


def test_shake_but_not_a_pan():
    big = texture(360, 640)

    def pic(t):
        x = int(40 + 30 * t)  # a steady pan
        if 2.0 <= t < 4.0:
            x += int(round(10 * np.sin(2 * np.pi * 3.3 * t)))
        return big[40:220, x:x + 320].copy()
    markers = run_video(pic, 6.0)
    assert [(m.type, round(m.start, 1)) for m in markers] and all(m.type == "shake" for m in markers)
    (m,) = markers
    assert abs(m.start - 2.0) <= 0.3 and abs(m.end - 4.0) <= 0.3


def test_rapid_cuts():
    scenes = [moving(0.0) // 3, moving(0.5) // 3 + 160]  # a dark and a bright scene
    markers = run_video(lambda t: scenes[int(t / 0.5) % 2] if 2.0 <= t < 6.0 else moving(t), 8.0,
                        Thresholds(freeze_d=10.0))
    cuts = [m for m in markers if m.type == "scene"]
    assert len(cuts) == 1 and 2.0 <= cuts[0].start <= 3.0


def test_thresholds_from_mapping_rejects_unknown_names():
    assert Thresholds.from_mapping({"black_d": 1.0}).black_d == 1.0
    with pytest.raises(ValueError, match="nope"):
        Thresholds.from_mapping({"nope": 1})


def test_video_timeline_jumping_back_is_analysed_not_held_forever():
    engine = QcEngine()
    black = np.full((180, 320), 16, np.uint8)
    for i in range(100):
        engine.video(100.0 + i / FPS, moving(i / FPS))
    events = []
    for i in range(100):  # the source restarts at 0
        events += engine.video(i / FPS, black)
    events += engine.flush(4.0)
    blacks = [m for m in closed_markers(events) if m.type == "black"]
    assert len(blacks) == 1 and blacks[0].start == pytest.approx(0.0, abs=0.05)


def test_audio_gap_restarts_the_timeline():
    engine = QcEngine()
    x = noise(3.0)
    events = engine.audio(0.0, x)
    silent = np.zeros((2, 3 * RATE), dtype=np.float32)
    events += engine.audio(10.0, silent)  # 7 s later than the samples so far end
    events += engine.flush()
    (m,) = [m for m in closed_markers(events) if m.type == "silence"]
    assert m.start == pytest.approx(10.0, abs=0.01) and m.end == pytest.approx(13.0, abs=0.01)
