"""Test recordings with faults at known, non-round times (shared by the QC tests).

Audio is synthesised in numpy (exact levels and edges), video with FFmpeg's
lavfi sources and filters; both are encoded together with H.264 (no
B-frames) and AAC (.mp4) or Opus (.mkv), the codecs a contribution feed uses.
"""

from __future__ import annotations

import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np

RATE = 48000


def ffmpeg() -> str:
    exe = shutil.which("ffmpeg")
    if exe is None:
        import pytest

        pytest.skip("ffmpeg not installed")
    return exe


def programme(seconds: float, lufs_offset_db: float = 0.0, seed: int = 1) -> np.ndarray:
    """Programme-like stereo: pink-ish noise, partly correlated L/R, gently
    modulated at a syllable rate; about −23 LUFS (short-term within ±0.5 LU)."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * RATE))
    white = rng.standard_normal((3, n))
    spec = np.fft.rfft(white, axis=1)
    f = np.fft.rfftfreq(n, 1 / RATE)
    shape = 1 / np.sqrt(np.maximum(f, 40.0))  # pink above 40 Hz
    shape[f > 15000] = 0
    pink = np.fft.irfft(spec * shape, n=n, axis=1)
    pink /= pink.std(axis=1, keepdims=True)
    common, l_own, r_own = pink
    left = 0.7 * common + 0.5 * l_own
    right = 0.7 * common + 0.5 * r_own
    t = np.arange(n) / RATE
    env = 1.0 + 0.15 * np.sin(2 * np.pi * 3.7 * t)
    x = np.stack([left * env, right * env])
    # Pink noise with this shape at RMS −26.2 dBFS per channel reads ≈ −23 LUFS.
    x *= 10 ** ((-26.2 + lufs_offset_db) / 20) / np.sqrt(np.mean(x ** 2))
    return x


def span(a: float, b: float) -> slice:
    return slice(int(round(a * RATE)), int(round(b * RATE)))


def tone(seconds: float, dbfs: float, freq: float = 1000.0) -> np.ndarray:
    t = np.arange(int(round(seconds * RATE))) / RATE
    return 10 ** (dbfs / 20) * np.sin(2 * np.pi * freq * t)


def write_wav(path: Path, x: np.ndarray) -> None:
    pcm = (np.clip(x, -1.0, 1.0) * 32767).round().astype("<i2").T.copy()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(x.shape[0])
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(pcm.tobytes())


def encode(out: Path, audio: np.ndarray, seconds: float, video_graph: str, codec: str) -> Path:
    """``video_graph``: a lavfi graph ending in [v]; ``codec``: "aac" or "opus"."""
    wav = out.with_suffix(".wav")
    write_wav(wav, audio)
    suffix = ".mp4" if codec == "aac" else ".mkv"
    target = out.with_suffix(suffix)
    acodec = ["-c:a", "aac", "-b:a", "160k"] if codec == "aac" else ["-c:a", "libopus", "-b:a", "128k"]
    # The graph's sources are lavfi filters inside -filter_complex, so the WAV is input 0.
    cmd = [ffmpeg(), "-hide_banner", "-loglevel", "error", "-y", "-i", str(wav),
           "-filter_complex", video_graph, "-map", "[v]", "-map", "0:a",
           "-t", f"{seconds}", "-c:v", "libx264", "-preset", "ultrafast", "-bf", "0", "-g", "50",
           "-pix_fmt", "yuv420p", *acodec, str(target)]
    subprocess.run(cmd, check=True, timeout=120)
    wav.unlink()
    return target
