"""New thresholds mid-programme (``QcEngine.retune``): open markers close at
the change, detection restarts with the new values, and the programme's
loudness meter carries on — its integrated loudness is that of the whole
programme, not of what came after the change."""

from __future__ import annotations

import dataclasses

import numpy as np

from live_qc.engine import QcEngine
from live_qc.thresholds import Thresholds

RATE = 48000


def tone(seconds: float, dbfs: float, channels: int = 2) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    x = (10 ** (dbfs / 20) * np.sin(2 * np.pi * 997 * t)).astype(np.float32)
    return np.tile(x, (channels, 1))


def feed(engine: QcEngine, t0: float, x: np.ndarray, chunk: float = 0.02) -> list:
    events, n = [], int(chunk * RATE)
    for off in range(0, x.shape[1], n):
        events += engine.audio(t0 + off / RATE, x[:, off:off + n])
    return events


def test_retune_keeps_the_programme_loudness() -> None:
    # 20 s at -30 dBFS then 20 s at -20 dBFS: the integrated loudness of
    # the whole 40 s is not that of the second half alone.
    first, second = tone(20, -30), tone(20, -20)
    plain = QcEngine(Thresholds())
    feed(plain, 0.0, first)
    feed(plain, 20.0, second)
    retuned = QcEngine(Thresholds())
    feed(retuned, 0.0, first)
    retuned.retune(dataclasses.replace(Thresholds(), silence_d=5.0, target_lufs=-24.0))
    feed(retuned, 20.0, second)
    whole, kept = plain.loudness_summary(), retuned.loudness_summary()
    assert whole is not None and kept is not None
    assert kept.integrated_lufs == whole.integrated_lufs
    assert kept.lra_lu == whole.lra_lu
    second_only = QcEngine(Thresholds())
    feed(second_only, 20.0, second)
    assert abs(second_only.loudness_summary().integrated_lufs - kept.integrated_lufs) > 1.0


def test_retune_closes_open_markers_and_uses_the_new_values() -> None:
    engine = QcEngine(Thresholds())
    events = feed(engine, 0.0, np.zeros((2, 3 * RATE), dtype=np.float32))  # 3 s silence: opens at 2 s
    assert [e.kind for e in events if e.marker.type == "silence"] == ["open"]
    closed = engine.retune(dataclasses.replace(Thresholds(), silence_d=5.0))
    silence = [e for e in closed if e.marker.type == "silence"]
    assert [e.kind for e in silence] == ["close"]
    assert abs(silence[0].marker.end - 3.0) < 0.05
    # 4 more seconds of silence: under the new 5 s nothing opens ...
    assert not [e for e in feed(engine, 3.0, np.zeros((2, 4 * RATE), dtype=np.float32)) if e.marker.type == "silence"]
    # ... and at 5 s after the change it does.
    later = feed(engine, 7.0, np.zeros((2, 2 * RATE), dtype=np.float32))
    assert [e.kind for e in later if e.marker.type == "silence"] == ["open"]
