"""Audio for the caption tests: espeak-ng speech from known sentences,
non-speech signals, the same audio encoded as the hub hands it to a tap
(AAC or Opus packets out of MPEG-TS), and a word error rate (the speech
and the rate are loadtests/speech.py's, shared with the benchmark)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import av
import numpy as np

from loadtests.speech import RATE, espeak, load, wer  # noqa: F401 (the caption tests import them from here)


def write_wav(path: Path, x: np.ndarray) -> Path:
    pcm = (np.clip(x, -1, 1) * 32767).astype(np.int16)
    with av.open(str(path), "w") as c:
        s = c.add_stream("pcm_s16le", rate=RATE, layout="mono")
        frame = av.AudioFrame.from_ndarray(pcm[None, :], format="s16", layout="mono")
        frame.sample_rate = RATE
        for p in s.encode(frame):
            c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return path


def ts_packets(directory: Path, x: np.ndarray, codec: str) -> list[tuple[str, float, bytes]]:
    """``x`` encoded with ``aac`` or ``libopus`` (48 kHz stereo) in MPEG-TS,
    demuxed: (codec, media time, data) per packet, like the hub's readers."""
    wav = write_wav(directory / f"in-{codec}.wav", x)
    ts = directory / f"out-{codec}.ts"
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", str(wav), "-ar", "48000",
                    "-ac", "2", "-c:a", codec, "-f", "mpegts", str(ts)], check=True)
    out = []
    with av.open(str(ts)) as c:
        for p in c.demux():
            if p.size and p.pts is not None:
                out.append((p.stream.codec_context.name, float(p.pts * p.time_base), bytes(p)))
    return out


def pink_noise(seconds: float, level: float = 0.1, seed: int = 1) -> np.ndarray:
    n = int(seconds * RATE)
    spectrum = np.fft.rfft(np.random.default_rng(seed).standard_normal(n))
    spectrum /= np.sqrt(np.maximum(np.arange(len(spectrum)), 1))
    x = np.fft.irfft(spectrum, n)
    return (level * x / np.abs(x).max()).astype(np.float32)


def music(seconds: float, bpm: float = 120.0) -> np.ndarray:
    """Chords with rhythm: a I–vi–IV–V progression of plucked triads on the
    beat, a kick on every beat and a hi-hat on the off-beats."""
    t = np.arange(int(seconds * RATE)) / RATE
    beat = 60.0 / bpm
    chords = [(261.6, 329.6, 392.0), (220.0, 261.6, 329.6), (174.6, 220.0, 261.6), (196.0, 246.9, 293.7)]
    x = np.zeros_like(t)
    for k in range(int(seconds / beat)):
        on = k * beat
        sl = (t >= on) & (t < on + beat)
        tt = t[sl] - on
        env = np.exp(-tt * 4.0)
        for f in chords[(k // 4) % 4]:
            x[sl] += 0.12 * env * (np.sin(2 * np.pi * f * tt) + 0.3 * np.sin(4 * np.pi * f * tt))
        x[sl] += 0.3 * np.exp(-tt * 30.0) * np.sin(2 * np.pi * 60 * tt)
        hat = (t >= on + beat / 2) & (t < on + beat / 2 + 0.05)
        x[hat] += 0.05 * np.random.default_rng(k).standard_normal(int(hat.sum()))
    return (0.5 * x / np.abs(x).max()).astype(np.float32)
