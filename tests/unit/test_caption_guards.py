"""The guards against invented speech, on segments faster-whisper returned
(captured from tiny.en in loadtests/captions_bench.py: crowd babble and
espeak speech), without a model."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from live_qc.captions.streamer import WhisperDecoder


def segment(text: str, no_speech: float, logprob: float, ratio: float,
            words: list[tuple[str, float]]) -> SimpleNamespace:
    return SimpleNamespace(
        text=text, no_speech_prob=no_speech, avg_logprob=logprob, compression_ratio=ratio,
        words=[SimpleNamespace(word=w, probability=p, start=0.3 * i, end=0.3 * i + 0.25)
               for i, (w, p) in enumerate(words)])


# Crowd babble (reversed voices) that passed the VAD and the no-speech,
# log-probability and compression-ratio checks before the word-probability
# guard: 101 and 131 committed words on two minutes each.
BABBLE = [
    segment(" More, and room and room on the phone this side very much.", 0.126, -1.329, 1.04,
            [(" More,", 0.284), (" and", 0.103), (" room", 0.126), (" and", 0.278), (" room", 0.335),
             (" on", 0.241), (" the", 0.459), (" phone", 0.118), (" this", 0.257), (" side", 0.464),
             (" very", 0.26), (" much.", 0.994)]),
    segment(" even for men", 0.098, -1.341, 0.6, [(" even", 0.122), (" for", 0.285), (" men", 0.382)]),
    segment(" I'm not even a human, I'm not even a human, I'm not even a human", 0.083, -1.372, 1.94,
            [(" I'm", 0.129), (" not", 0.276), (" even", 0.168), (" a", 0.111), (" human,", 0.006),
             (" I'm", 0.43), (" not", 0.438), (" even", 0.405), (" a", 0.544), (" human,", 0.9),
             (" I'm", 0.718), (" not", 0.541), (" even", 0.565), (" a", 0.77), (" human", 0.942)]),
    segment(" I'm going to be using this one, so I'm going to use this one, so I'm going to use this one.",
            0.457, -1.247, 1.86,
            [(" I'm", 0.164), (" going", 0.158), (" to", 0.953), (" be", 0.075), (" using", 0.32), (" this", 0.274),
             (" one,", 0.131), (" so", 0.12), (" I'm", 0.307), (" going", 0.421), (" to", 0.957), (" use", 0.112),
             (" this", 0.272), (" one,", 0.637), (" so", 0.267), (" I'm", 0.554), (" going", 0.611), (" to", 0.969),
             (" use", 0.4), (" this", 0.384), (" one.", 0.858)]),
    segment(" but I see I'll be the dream of the", 0.049, -1.317, 0.87,
            [(" but", 0.021), (" I", 0.197), (" see", 0.284), (" I'll", 0.182), (" be", 0.181), (" the", 0.104),
             (" dream", 0.261), (" of", 0.235), (" the", 0.217)]),
]

# Three-voice babble (loadtests/captions_bench.py crowd_babble_3, 3 min,
# tiny.en) that passed the segment guards: a decode as strong as weak speech
# (avg_logprob above −1.0) comes with a likely no-speech window.
BABBLE += [
    segment(" So that's mine.", 0.377, -0.88, 0.65, [(" So", 0.228), (" that's", 0.706), (" mine.", 0.165)]),
    segment(" the up top.", 0.406, -0.957, 0.58, [(" the", 0.22), (" up", 0.542), (" top.", 0.48)]),
    segment(" I've been born now.", 0.19, -1.148, 0.7,
            [(" I've", 0.227), (" been", 0.977), (" born", 0.063), (" now.", 0.105)]),
    segment(" I've been running and I was home in not a fast.", 0.115, -1.109, 0.85,
            [(" I've", 0.265), (" been", 0.758), (" running", 0.113), (" and", 0.143), (" I", 0.316),
             (" was", 0.451), (" home", 0.205), (" in", 0.861), (" not", 0.592), (" a", 0.352), (" fast.", 0.375)]),
]

# Real speech at the babble's word probabilities: espeak-ng "The quick brown
# fox …" through Opus (the live test's audio), misheard words pulling the
# mean under 0.5 — the mean alone dropped these (and with them the
# sentence in the live Opus test); the decode is not weak and the window
# is not a likely no-speech one.
LOW_CONFIDENCE_SPEECH = [
    segment(" The quick round-fark storm.", 0.158, -0.903, 0.77,
            [(" The", 0.591), (" quick", 0.691), (" round", 0.68), ("-fark", 0.35), (" storm.", 0.181)]),
    segment(" The quick route.", 0.121, -0.985, 0.67, [(" The", 0.228), (" quick", 0.648), (" route.", 0.469)]),
]

SPEECH = [
    segment(" My grandmother will start the story on the last.", 0.203, -0.514, 0.96,
            [(" My", 0.644), (" grandmother", 0.519), (" will", 0.947), (" start", 0.985), (" the", 0.906),
             (" story", 0.992), (" on", 0.828), (" the", 0.96), (" last.", 0.496)]),
    segment(" My friend mother...", 0.203, -0.684, 1.18,
            [(" My", 0.974), (" friend", 0.981), (" mother...", 0.555)]),
]


class _Model:
    """faster-whisper's transcribe() shape, returning captured segments."""

    def __init__(self, segments: list[SimpleNamespace]) -> None:
        self.segments = segments
        self.model = SimpleNamespace(is_multilingual=False)

    def transcribe(self, audio, **options):
        return iter(self.segments), SimpleNamespace(language=options.get("language") or "en", language_probability=1.0)


def test_captured_babble_yields_no_words() -> None:
    decoder = WhisperDecoder(_Model(BABBLE))  # the default guard
    hyp = decoder.decode(np.zeros(16000 * 5, np.float32), prompt="", language="en")
    assert hyp.words == ()
    assert hyp.rejected == len(BABBLE)


def test_speech_segments_pass_the_guards() -> None:
    decoder = WhisperDecoder(_Model(SPEECH), word_probability_min=0.5)
    hyp = decoder.decode(np.zeros(16000 * 5, np.float32), prompt="", language="en")
    assert " ".join(w.text for w in hyp.words) == "My grandmother will start the story on the last. My friend mother..."
    assert hyp.rejected == 0


def test_low_confidence_speech_passes_the_word_probability_guard() -> None:
    decoder = WhisperDecoder(_Model(LOW_CONFIDENCE_SPEECH))  # the default guard
    hyp = decoder.decode(np.zeros(16000 * 5, np.float32), prompt="", language="en")
    assert " ".join(w.text for w in hyp.words) == "The quick round -fark storm. The quick route."
    assert hyp.rejected == 0


def test_word_probability_guard_is_what_rejects_babble() -> None:
    # Without it (word_probability_min 0: the segment guards only) the
    # babble gets through: the word probabilities are the evidence.
    decoder = WhisperDecoder(_Model(BABBLE), word_probability_min=0.0)
    hyp = decoder.decode(np.zeros(16000 * 5, np.float32), prompt="", language="en")
    assert len(hyp.words) > 40


def test_thank_you_on_silence_is_still_rejected() -> None:
    thanks = segment(" Thank you.", 0.35, -0.6, 0.7, [(" Thank", 0.7), (" you.", 0.9)])
    hyp = WhisperDecoder(_Model([thanks])).decode(np.zeros(16000, np.float32), prompt="", language="en")
    assert hyp.words == ()


def test_word_probability_guard_is_for_english_transcription_only() -> None:
    # Multilingual base on espeak-ng Spanish: real words at the babble's
    # word probabilities (captured); other languages and translation keep
    # the segment-level guards only.
    spanish = segment(" Buenos nias", 0.07, -0.97, 0.8, [(" Buenos", 0.52), (" nias", 0.26)])
    model = _Model([spanish])
    model.model.is_multilingual = True
    hyp = WhisperDecoder(model, word_probability_min=0.5).decode(np.zeros(16000, np.float32), prompt="",
                                                                 language="es")
    assert [w.text for w in hyp.words] == ["Buenos", "nias"]
    hyp = WhisperDecoder(_Model([spanish]), translate=True, word_probability_min=0.5).decode(
        np.zeros(16000, np.float32), prompt="", language="en")
    assert len(hyp.words) == 2


def _timed(text: str, times: list[tuple[float, float]]) -> SimpleNamespace:
    return SimpleNamespace(text=text, no_speech_prob=0.05, avg_logprob=-0.3, compression_ratio=1.4,
                           words=[SimpleNamespace(word=f" {w}", probability=0.9, start=a, end=b)
                                  for w, (a, b) in zip(text.split(), times)])


def test_words_the_alignment_gives_no_audio_are_dropped_at_the_end() -> None:
    # Captured (tiny.en, benchmark): the end-of-speech decode of 4.6 s said
    # the sentence twice, the copy's words all at 4.18–4.18 s.
    said = "The new teacher asked before midnight."
    real = [(0.0, 0.56), (0.56, 0.82), (0.82, 1.16), (1.16, 1.56), (3.44, 3.84), (3.84, 4.18)]
    copy = [(4.18, 4.18)] * 6
    seg = _timed(f"{said} {said}", real + copy)
    hyp = WhisperDecoder(_Model([seg])).decode(np.zeros(16000 * 5, np.float32), prompt="", language="en")
    assert " ".join(w.text for w in hyp.words) == said
    # One squeezed last word (cut by the end of the audio) is real: kept.
    seg = _timed("before midnight", [(3.44, 3.84), (3.84, 3.84)])
    hyp = WhisperDecoder(_Model([seg])).decode(np.zeros(16000 * 4, np.float32), prompt="", language="en")
    assert [w.text for w in hyp.words] == ["before", "midnight"]


def test_unheard_words_are_dropped_wherever_they_run() -> None:
    # Captured (tiny.en, benchmark, 10-min input, 431 s): a 2.3 s partial
    # decode said the sentence with every word at its first instant, then
    # the words it heard; the timeout committed the unheard copy.
    said = "The sound been the near"
    unheard = [(0.0, 0.0)] * 5
    heard = [(0.0, 0.56), (0.56, 0.78), (0.78, 1.06), (1.06, 1.16), (1.16, 1.3)]
    seg = _timed(f"{said} {said}", unheard + heard)
    hyp = WhisperDecoder(_Model([seg])).decode(np.zeros(16000 * 3, np.float32), prompt="", language="en")
    assert [(w.text, w.start) for w in hyp.words] == [(w, a) for w, (a, _) in zip(said.split(), heard)]
    # In the middle too; a single zero-length word between heard ones is kept.
    seg = _timed("a b c d e f", [(0.0, 0.3), (0.5, 0.5), (0.5, 0.5), (0.5, 0.8), (0.9, 0.9), (0.9, 1.2)])
    hyp = WhisperDecoder(_Model([seg])).decode(np.zeros(16000 * 2, np.float32), prompt="", language="en")
    assert [w.text for w in hyp.words] == ["a", "d", "e", "f"]


class _RecordingModel(_Model):
    """_Model that keeps the options of every transcribe() call."""

    def __init__(self, segments: list[SimpleNamespace]) -> None:
        super().__init__(segments)
        self.calls: list[dict] = []

    def transcribe(self, audio, **options):
        self.calls.append(options)
        return super().transcribe(audio, **options)


def test_only_the_final_decode_uses_the_final_beam() -> None:
    model = _RecordingModel(SPEECH)
    decoder = WhisperDecoder(model, beam_size=1, final_beam_size=5)
    x = np.zeros(16000 * 3, np.float32)
    decoder.decode(x, prompt="", language="en")  # a partial decode
    decoder.decode(x, prompt="", language="en", final=True)  # end of speech
    decoder.decode(x, prompt="", language="en", final=False)
    assert [c["beam_size"] for c in model.calls] == [1, 5, 1]
    # Beam search, not sampling: one pass at temperature 0 either way.
    assert all(c["temperature"] == 0.0 and c["best_of"] == 1 for c in model.calls)
    assert (decoder.beam_decodes, decoder.beam_decoded_audio_s) == (1, 3.0)
    # Greedy throughout: nothing counted as a beam decode.
    greedy = WhisperDecoder(_RecordingModel(SPEECH), beam_size=1, final_beam_size=1)
    greedy.decode(x, prompt="", language="en", final=True)
    assert greedy.model.calls[0]["beam_size"] == 1 and greedy.beam_decodes == 0


def test_a_decode_pass_generates_at_most_what_its_audio_can_hold() -> None:
    model = _RecordingModel(SPEECH)
    decoder = WhisperDecoder(model)  # 16 + 10 tokens per second of audio
    decoder.decode(np.zeros(int(16000 * 0.8), np.float32), prompt="", language="en")
    decoder.decode(np.zeros(16000 * 15, np.float32), prompt="a prompt", language="en", final=True)
    # 30 s: Whisper's own limit with the longest prompt, not more (a longer
    # one makes faster-whisper raise).
    decoder.decode(np.zeros(16000 * 30, np.float32), prompt="", language="en")
    assert [c["max_new_tokens"] for c in model.calls] == [24, 166, 220]
    decoder.max_tokens_per_s = None
    decoder.decode(np.zeros(16000 * 15, np.float32), prompt="", language="en")
    assert model.calls[-1]["max_new_tokens"] is None


def _even(text: str, p: float) -> list[tuple[str, float]]:
    """The words of ``text`` at the captured segment's mean word probability."""
    return [(f" {w}", p) for w in text.split()]


# Beam 5 (tiny.en, loadtests/captions_bench.py seed 13, ``--clock model``):
# segments of 3-voice babble that passed every other guard — 118 words
# committed in 1 min, 0 greedily. No-speech probability, avg_logprob and
# compression ratio as captured; each word at the segment's mean word
# probability (all the guard reads).
BEAM_BABBLE = [segment(t, ns, lp, cr, _even(t, wp)) for t, ns, lp, cr, wp in [
    (" That's what I'm about, hold it.", 0.599, -0.809, 0.84, 0.513),
    (" I didn't want that at all.", 0.288, -0.873, 0.84, 0.458),
    (" and I'll see you in the next one. I'll see you in the next", 0.188, -0.739, 2.16, 0.62),
    (" I'm going to go with it.", 0.265, -0.854, 0.8, 0.561),
    (" I'll meet more. I'll meet more. I'll meet more.", 0.599, -0.641, 1.74, 0.511),
    # Babble built from the 10-min input: Whisper's sign-offs, sure of
    # their words, in a likely no-speech window (17 and 4 words in 1 min).
    (" Thank you so much for watching, I'll see you guys in the next video, bye bye, bye,",
     0.819, -0.445, 2.3, 0.739),
    (" Thank you, thank you, thank you, thank you, thank you.", 0.555, -0.939, 2.35, 0.767),
]]
# Speech at beam 5 with the lowest mean word probabilities that pass
# (same run): the decode is not weak and the window not a no-speech one.
BEAM_SPEECH = [segment(t, ns, lp, cr, _even(t, wp)) for t, ns, lp, cr, wp in [
    (" The sound engineer will start the story.", 0.104, -0.591, 0.87, 0.481),
    (" A young reporter can help.", 0.053, -0.726, 0.76, 0.593),
    (" The producer will explain the schedule for next week.", 0.009, -0.424, 1.12, 0.675),
    (" My grandmother will start the story on the last time.", 0.301, -0.388, 1.2, 0.806),
]]


def test_beam_decodes_have_their_own_babble_guard() -> None:
    x = np.zeros(16000 * 5, np.float32)
    beam = WhisperDecoder(_Model(BEAM_BABBLE), beam_size=5, final_beam_size=5)
    assert beam.decode(x, prompt="", language="en").words == ()
    assert beam.decode(x, prompt="", language="en", final=True).words == ()
    # The greedy thresholds let every one of them through: the beam's words
    # look surer than a greedy decode's.
    greedy = WhisperDecoder(_Model(BEAM_BABBLE))
    assert greedy.decode(x, prompt="", language="en").rejected == 0
    beam = WhisperDecoder(_Model(BEAM_SPEECH), beam_size=5, final_beam_size=5)
    hyp = beam.decode(x, prompt="", language="en")
    assert hyp.rejected == 0 and len(hyp.words) == 31
    # A beam only on the final decode: the partials keep the greedy guard.
    mixed = WhisperDecoder(_Model(BEAM_BABBLE), beam_size=1, final_beam_size=5)
    assert mixed.decode(x, prompt="", language="en").rejected == 0
    assert mixed.decode(x, prompt="", language="en", final=True).words == ()
