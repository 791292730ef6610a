"""The guards against invented speech, on segments faster-whisper returned
(captured from tiny.en in loadtests/captions_bench.py: crowd babble and
espeak speech), without a model."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

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


#: Greedy decodes (beam 5 is the decoders' default): the greedy guards' tests.
GREEDY = dict(beam_size=1, final_beam_size=1)


class _Model:
    """faster-whisper's transcribe() shape, returning captured segments."""

    def __init__(self, segments: list[SimpleNamespace]) -> None:
        self.segments = segments
        self.model = SimpleNamespace(is_multilingual=False)

    def transcribe(self, audio, **options):
        return iter(self.segments), SimpleNamespace(language=options.get("language") or "en", language_probability=1.0)


def test_captured_babble_yields_no_words() -> None:
    decoder = WhisperDecoder(_Model(BABBLE), **GREEDY)  # the greedy guard
    hyp = decoder.decode(np.zeros(16000 * 5, np.float32), prompt="", language="en")
    assert hyp.words == ()
    assert hyp.rejected == len(BABBLE)


def test_speech_segments_pass_the_guards() -> None:
    decoder = WhisperDecoder(_Model(SPEECH), word_probability_min=0.5, **GREEDY)
    hyp = decoder.decode(np.zeros(16000 * 5, np.float32), prompt="", language="en")
    assert " ".join(w.text for w in hyp.words) == "My grandmother will start the story on the last. My friend mother..."
    assert hyp.rejected == 0


def test_low_confidence_speech_passes_the_word_probability_guard() -> None:
    decoder = WhisperDecoder(_Model(LOW_CONFIDENCE_SPEECH), **GREEDY)  # the greedy guard
    hyp = decoder.decode(np.zeros(16000 * 5, np.float32), prompt="", language="en")
    assert " ".join(w.text for w in hyp.words) == "The quick round -fark storm. The quick route."
    assert hyp.rejected == 0


def test_word_probability_guard_is_what_rejects_babble() -> None:
    # Without it (word_probability_min 0: the segment guards only) the
    # babble gets through: the word probabilities are the evidence. Two of
    # these segments are also loops and one is weak enough on its own
    # (round 5's guards, below): those off too.
    decoder = WhisperDecoder(_Model(BABBLE), word_probability_min=0.0, segment_word_probability_min=0.0,
                             phrase_loop_times=None, **GREEDY)
    hyp = decoder.decode(np.zeros(16000 * 5, np.float32), prompt="", language="en")
    assert len(hyp.words) > 40
    decoder = WhisperDecoder(_Model(BABBLE), word_probability_min=0.0, **GREEDY)
    hyp = decoder.decode(np.zeros(16000 * 5, np.float32), prompt="", language="en")
    assert (hyp.rejected, hyp.looped) == (3, 2)


def test_thank_you_on_silence_is_still_rejected() -> None:
    thanks = segment(" Thank you.", 0.35, -0.6, 0.7, [(" Thank", 0.7), (" you.", 0.9)])
    hyp = WhisperDecoder(_Model([thanks]), **GREEDY).decode(np.zeros(16000, np.float32), prompt="", language="en")
    assert hyp.words == ()


def test_word_probability_guard_is_for_english_transcription_only() -> None:
    # Multilingual base on espeak-ng Spanish: real words at the babble's
    # word probabilities (captured); other languages and translation keep
    # the segment-level guards only.
    spanish = segment(" Buenos nias", 0.07, -0.97, 0.8, [(" Buenos", 0.52), (" nias", 0.26)])
    model = _Model([spanish])
    model.model.is_multilingual = True
    hyp = WhisperDecoder(model, word_probability_min=0.5, **GREEDY).decode(np.zeros(16000, np.float32), prompt="",
                                                                 language="es")
    assert [w.text for w in hyp.words] == ["Buenos", "nias"]
    hyp = WhisperDecoder(_Model([spanish]), translate=True, word_probability_min=0.5, **GREEDY).decode(
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
    hyp = WhisperDecoder(_Model([seg]), **GREEDY).decode(np.zeros(16000 * 5, np.float32), prompt="", language="en")
    assert " ".join(w.text for w in hyp.words) == said
    # One squeezed last word (cut by the end of the audio) is real: kept.
    seg = _timed("before midnight", [(3.44, 3.84), (3.84, 3.84)])
    hyp = WhisperDecoder(_Model([seg]), **GREEDY).decode(np.zeros(16000 * 4, np.float32), prompt="", language="en")
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
    # The guard alone (no greedy confirmation: this model would say the
    # same segments greedily, see the confirmation tests below).
    beam = WhisperDecoder(_Model(BEAM_BABBLE), beam_size=5, final_beam_size=5, beam_confirm_overlap=None)
    assert beam.decode(x, prompt="", language="en").words == ()
    assert beam.decode(x, prompt="", language="en", final=True).words == ()
    # The greedy thresholds let every one of them through: the beam's words
    # look surer than a greedy decode's. (Only the loop guard catches one:
    # "thank you" five times.)
    greedy = WhisperDecoder(_Model(BEAM_BABBLE), phrase_loop_times=None, **GREEDY)
    assert greedy.decode(x, prompt="", language="en").rejected == 0
    assert WhisperDecoder(_Model(BEAM_BABBLE), **GREEDY).decode(x, prompt="", language="en").looped == 1
    beam = WhisperDecoder(_Model(BEAM_SPEECH), beam_size=5, final_beam_size=5)
    hyp = beam.decode(x, prompt="", language="en")
    assert hyp.rejected == 0 and len(hyp.words) == 31
    # A beam only on the final decode: the partials keep the greedy guard.
    mixed = WhisperDecoder(_Model(BEAM_BABBLE), beam_size=1, final_beam_size=5, beam_confirm_overlap=None,
                           phrase_loop_times=None)
    assert mixed.decode(x, prompt="", language="en").rejected == 0
    assert mixed.decode(x, prompt="", language="en", final=True).words == ()


# Babble right after speech (loadtests/captions_bench.py babble_after_speech,
# tiny.en, seed 13, ``--clock model``), as captured: segments that passed
# every guard of round 4 and were committed. avg_logprob, no_speech_prob and
# compression ratio are one figure per decoding window, so a segment decoded
# from babble after real speech in the same window carries the speech's.
AFTER_SPEECH_WEAK = segment(" Lost, time after the story.", 0.1, -0.68, 1.27,
                            [(" Lost,", 0.0), (" time", 0.0), (" after", 0.01), (" the", 0.24), (" story.", 0.0)])
AFTER_SPEECH_LOOP = segment(
    " was in the morning, I was in the morning, I was in the morning.", 0.18, -0.49, 2.16,
    [(" was", 0.9), (" in", 0.48), (" the", 0.92), (" morning,", 0.96), (" I", 0.74), (" was", 0.94), (" in", 0.74),
     (" the", 0.96), (" morning,", 0.96), (" I", 0.79), (" was", 0.96), (" in", 0.83), (" the", 0.97),
     (" morning.", 0.95)])
AFTER_SPEECH_WEAK_LOOP = segment(
    " us. The man cannot find the history on the old bridge right now in the morning. I was waiting for the"
    " moment. I was waiting for the moment.", 0.16, -0.73, 1.53,
    [(" us.", 0.32), (" The", 0.73), (" man", 0.32), (" cannot", 0.98), (" find", 0.98), (" the", 0.17),
     (" history", 1.0), (" on", 0.82), (" the", 0.37), (" old", 0.8), (" bridge", 0.98), (" right", 0.97),
     (" now", 0.91), (" in", 0.59), (" the", 0.29), (" morning.", 0.12), (" I", 0.21), (" was", 0.2),
     (" waiting", 0.01), (" for", 0.46), (" the", 0.13), (" moment.", 0.03), (" I", 0.3), (" was", 0.57),
     (" waiting", 0.1), (" for", 0.83), (" the", 0.75), (" moment.", 0.58)])
AFTER_SPEECH_YEAH = segment(
    " Yeah. Yeah. Yeah. Yeah. Yeah. Yeah. Yeah. Yeah. Yeah. Yeah. Yeah. I'm out of the mack. Well.", 0.15, -0.97, 2.14,
    [(" Yeah.", p) for p in (0.08, 0.25, 0.44, 0.55, 0.55, 0.5, 0.51, 0.46, 0.44, 0.42, 0.4)]
    + [(" I'm", 0.36), (" out", 0.36), (" of", 0.34), (" the", 0.21), (" mack.", 0.05), (" Well.", 0.47)])
AFTER_SPEECH_ECHO = segment(
    " now in the morning. I was waiting for the story on the Lost, time after the break.", 0.18, -0.62, 1.31,
    [(" now", 0.91), (" in", 0.59), (" the", 0.29), (" morning.", 0.12), (" I", 0.21), (" was", 0.2),
     (" waiting", 0.01), (" for", 0.46), (" the", 0.13), (" story", 0.0), (" on", 0.05), (" the", 0.52),
     (" Lost,", 0.0), (" time", 0.0), (" after", 0.01), (" the", 0.33), (" break.", 0.0)])
ECHO_PROMPT = "Our camera operator is waiting for the story on the Lost, time after the break."

# Read speech that says its phrases again (the bench's, same run), decoded
# with confidence: not loops, not echoes.
REPEATING_SPEECH = segment(
    " The sound engineer will start the story on the Lost, time this evening. The director is waiting for the"
    " story on the Lost, time. Our camera operator is waiting for the story on the Lost.", 0.05, -0.3, 2.0,
    _even(" The sound engineer will start the story on the Lost, time this evening. The director is waiting for"
          " the story on the Lost, time. Our camera operator is waiting for the story on the Lost.", 0.95))


def test_babble_after_speech_is_dropped_by_round_5_guards() -> None:
    x = np.zeros(16000 * 5, np.float32)
    segments = [AFTER_SPEECH_WEAK, AFTER_SPEECH_LOOP, AFTER_SPEECH_WEAK_LOOP, AFTER_SPEECH_YEAH]
    # Round 4's guards let every one of them through.
    off = WhisperDecoder(_Model(segments), segment_word_probability_min=0.0, phrase_loop_times=None, **GREEDY)
    assert off.decode(x, prompt="", language="en").rejected == 0
    hyp = WhisperDecoder(_Model(segments), **GREEDY).decode(x, prompt="", language="en")
    assert hyp.words == ()
    # The loops are counted as loops (the policy holds its last hypothesis);
    # the weak segment is not.
    assert (hyp.rejected, hyp.looped) == (4, 3)


def test_a_weak_echo_of_the_prompt_is_dropped() -> None:
    x = np.zeros(16000 * 5, np.float32)
    decoder = WhisperDecoder(_Model([AFTER_SPEECH_ECHO]), **GREEDY)
    assert decoder.decode(x, prompt="", language="en").rejected == 0  # no prompt, no echo
    hyp = decoder.decode(x, prompt=ECHO_PROMPT, language="en")
    assert hyp.words == () and hyp.looped == 1 and decoder.echoed_segments == 1
    off = WhisperDecoder(_Model([AFTER_SPEECH_ECHO]), echo_min_words=None, **GREEDY)
    assert off.decode(x, prompt=ECHO_PROMPT, language="en").rejected == 0


def test_speech_that_repeats_itself_and_its_prompt_is_kept() -> None:
    x = np.zeros(16000 * 5, np.float32)
    decoder = WhisperDecoder(_Model([REPEATING_SPEECH]), **GREEDY)
    hyp = decoder.decode(x, prompt="The director is waiting for the story on the Lost, time.", language="en")
    assert hyp.rejected == 0 and len(hyp.words) == len(REPEATING_SPEECH.words)
    hyp = WhisperDecoder(_Model(SPEECH + LOW_CONFIDENCE_SPEECH), **GREEDY).decode(
        x, prompt="My grandmother will start the story on the last.", language="en")
    assert hyp.rejected == 0


class _TwoWayModel(_Model):
    """A beam decode and a greedy decode of the same audio return different
    segments (as captured); every call's beam width is kept."""

    def __init__(self, beam: list[SimpleNamespace], greedy: list[SimpleNamespace]) -> None:
        super().__init__(beam)
        self.greedy = greedy
        self.beams: list[int] = []

    def transcribe(self, audio, **options):
        self.beams.append(options["beam_size"])
        segments = self.segments if options["beam_size"] > 1 else self.greedy
        return iter(segments), SimpleNamespace(language="en", language_probability=1.0)


# Captured (tiny.en, beam 5, loadtests/captions_bench.py's model clock): the
# live test's clip, espeak-ng "The quick brown fox …" through Opus 96 kb/s,
# segments that only the beam guard drops, next to the greedy decode of the
# same audio — misheard the same way, so confirmed.
OPUS_BEAM = [segment(t, ns, lp, 0.9, _even(t, wp)) for t, ns, lp, wp in [
    (" The quick brown fox jump over the lazy dog.", 0.095, -0.824, 0.604),
    (" The quick roundfuck stump over the lazy dog.", 0.059, -0.842, 0.62),
]]
OPUS_GREEDY = [segment(" the quick round foc stump so the lazy dog", 0.1, -0.7, 0.9,
                       _even("the quick round foc stump so the lazy dog", 0.7))]


def test_a_doubtful_beam_segment_is_kept_when_greedy_decoding_says_it_too() -> None:
    x = np.zeros(16000 * 4, np.float32)
    model = _TwoWayModel(OPUS_BEAM[:1], OPUS_GREEDY)
    decoder = WhisperDecoder(model, beam_size=5, final_beam_size=5)
    hyp = decoder.decode(x, prompt="", language="en")
    # 5 of its 9 words in the greedy decode, in order: ≥ 0.5.
    assert " ".join(w.text for w in hyp.words) == "The quick brown fox jump over the lazy dog."
    assert model.beams == [5, 1] and decoder.confirm_decodes == 1 and decoder.confirmed_segments == 1
    # Without the confirmation (round 4) the beam guard drops the sentence.
    decoder = WhisperDecoder(_TwoWayModel(OPUS_BEAM[:1], OPUS_GREEDY), beam_size=5, beam_confirm_overlap=None)
    assert decoder.decode(x, prompt="", language="en").words == ()
    # Two doubtful segments, one greedy decode.
    decoder = WhisperDecoder(_TwoWayModel(OPUS_BEAM, OPUS_GREEDY), beam_size=5)
    hyp = decoder.decode(x, prompt="", language="en")
    assert len(hyp.words) == 17 and decoder.confirm_decodes == 1


def test_doubtful_beam_babble_is_dropped_when_greedy_decoding_does_not_say_it() -> None:
    x = np.zeros(16000 * 5, np.float32)
    # Round 4: the greedy decode of the babble returned no words at all for
    # 14 of 18 such segments ...
    log: list = []
    decoder = WhisperDecoder(_TwoWayModel(BEAM_BABBLE, []), beam_size=5, doubt_log=log)
    hyp = decoder.decode(x, prompt="", language="en")
    assert hyp.words == () and hyp.rejected == len(BEAM_BABBLE)
    # ("Thank you" five times is a loop: dropped before any confirmation.)
    assert hyp.looped == 1
    assert decoder.confirm_decodes == 1 and [r["kept"] for r in log] == [False] * (len(BEAM_BABBLE) - 1)
    # ... and what it did return is babble that the greedy guards drop
    # (greedy confirmation under the greedy rules) ...
    decoder = WhisperDecoder(_TwoWayModel(BEAM_BABBLE, BABBLE), beam_size=5)
    assert decoder.decode(x, prompt="", language="en").words == ()
    # ... or other words: under half of the beam segment's.
    other = [segment(" I didn't want it to be at all.", 0.1, -0.5, 0.9,
                     _even("and then I want it to go", 0.8))]
    decoder = WhisperDecoder(_TwoWayModel(BEAM_BABBLE[1:2], other), beam_size=5, doubt_log=log)
    assert decoder.decode(x, prompt="", language="en").words == ()
    assert log[-1]["overlap"] == round(2 / 6, 3)  # "i", "want" of "i didnt want that at all"


def test_confirmation_needs_the_words_near_the_segment() -> None:
    # The same words said 5 s later in the greedy decode do not confirm.
    late = segment(" the quick round foc stump so the lazy dog", 0.1, -0.7, 0.9,
                   _even("the quick round foc stump so the lazy dog", 0.7))
    for w in late.words:
        w.start += 8.0
        w.end += 8.0
    decoder = WhisperDecoder(_TwoWayModel(OPUS_BEAM[:1], [late]), beam_size=5)
    assert decoder.decode(np.zeros(16000 * 12, np.float32), prompt="", language="en").words == ()


def test_no_greedy_decode_when_no_beam_segment_is_doubtful() -> None:
    model = _TwoWayModel(BEAM_SPEECH, [])
    decoder = WhisperDecoder(model, beam_size=5)
    assert len(decoder.decode(np.zeros(16000 * 5, np.float32), prompt="", language="en").words) == 31
    assert model.beams == [5] and decoder.confirm_decodes == 0
    # Segments every guard drops (a loop, Whisper's sign-off on a weak
    # decode) are not doubtful: no confirmation either.
    loop = segment(" I'll meet more. " * 6, 0.2, -0.6, 3.1, _even("I'll meet more. " * 6, 0.8))
    thanks = segment(" Thank you.", 0.35, -0.6, 0.7, [(" Thank", 0.7), (" you.", 0.9)])
    model = _TwoWayModel([loop, thanks], [thanks])
    decoder = WhisperDecoder(model, beam_size=5)
    assert decoder.decode(np.zeros(16000 * 5, np.float32), prompt="", language="en").words == ()
    assert model.beams == [5]


def test_decodes_go_greedy_first_while_the_guards_drop_everything() -> None:
    x = np.zeros(16000 * 3, np.float32)
    model = _TwoWayModel(BEAM_BABBLE, [])
    decoder = WhisperDecoder(model, beam_size=5, final_beam_size=5, greedy_after_dropped=2)
    for _ in range(4):
        assert decoder.decode(x, prompt="", language="en").words == ()
    # Two beam decodes (each with its greedy confirmation), then greedy
    # decodes that hear nothing: no beam after them.
    assert model.beams == [5, 1, 5, 1, 1, 1]
    assert decoder.greedy_switched_decodes == 2 and decoder.beam_decodes == 2 and decoder.confirm_decodes == 2
    # A final decode too.
    decoder.decode(x, prompt="", language="en", final=True)
    assert model.beams[-1] == 1
    # The greedy decode hears babble its guards let through: the beam
    # decode of the same audio decides, and drops it (what the greedy
    # decode says does not confirm other words).
    model.greedy = [segment(" and then I want it to go", 0.1, -0.5, 0.9, _even("and then I want it to go", 0.8))]
    assert decoder.decode(x, prompt="", language="en").words == ()
    # (The greedy decodes that said nothing at all did not count: 2, then 3.)
    assert model.beams[-2:] == [1, 5] and decoder.confirm_decodes == 3 and decoder.dropped_run == 3
    # Speech again: greedy hears words, the beam's are kept, and the next
    # decode is a beam one.
    model.greedy, model.segments = SPEECH, BEAM_SPEECH
    assert len(decoder.decode(x, prompt="", language="en").words) == 31
    assert decoder.decode(x, prompt="", language="en").words
    assert model.beams[-3:] == [1, 5, 5] and decoder.dropped_run == 0
    # A decode with no segments at all (nothing said) neither counts nor resets.
    model.segments = []
    decoder.dropped_run = 1
    decoder.decode(x, prompt="", language="en")
    assert decoder.dropped_run == 1
    # Off: always the beam.
    model = _TwoWayModel(BEAM_BABBLE, [])
    decoder = WhisperDecoder(model, beam_size=5, greedy_after_dropped=None)
    for _ in range(6):
        decoder.decode(x, prompt="", language="en")
    assert model.beams == [5, 1] * 6
    # Greedy decoders are not switched.
    model = _TwoWayModel([], BABBLE)
    decoder = WhisperDecoder(model, greedy_after_dropped=1, **GREEDY)
    for _ in range(3):
        decoder.decode(x, prompt="", language="en")
    assert model.beams == [1, 1, 1] and decoder.greedy_switched_decodes == 0


# -- one decoding pass per window (WhisperDecoder.one_pass) -------------------

class _Tokenizer:
    timestamp_begin = 50364

    def decode(self, tokens: list[int]) -> str:
        return " ".join(str(t) for t in tokens if t < self.timestamp_begin)


def _split(one_pass: bool, tokens: list[int], cap: int | None = 30, duration_s: float = 3.0):
    from live_qc.captions.streamer import windowed_whisper_class

    model = object.__new__(windowed_whisper_class())  # the splitting needs no model loaded
    model.time_precision, model.input_stride = 0.02, 2
    model.one_pass, model.token_cap = one_pass, cap
    frames = round(duration_s * 100)
    return model._split_segments_by_timestamps(tokenizer=_Tokenizer(), tokens=tokens, time_offset=0.0,
                                               segment_size=frames, segment_duration=duration_s, seek=0)


def _ts(seconds: float) -> int:
    return _Tokenizer.timestamp_begin + round(seconds / 0.02)


def test_a_decode_that_ends_mid_segment_is_one_pass_keeping_the_open_segment() -> None:
    # "<0.0> 1 2 <1.0><1.0> 3 4" then end of text: the audio ends mid-speech.
    tokens = [_ts(0.0), 1, 2, _ts(1.0), _ts(1.0), 3, 4]
    segments, seek, single = _split(False, tokens)
    # faster-whisper keeps the closed segment and seeks back to decode the rest again.
    assert [s["tokens"] for s in segments] == [[_ts(0.0), 1, 2, _ts(1.0)]] and seek == 100 and not single
    segments, seek, single = _split(True, tokens)
    assert [s["tokens"] for s in segments] == [[_ts(0.0), 1, 2, _ts(1.0)], [_ts(1.0), 3, 4, _ts(3.0)]]
    assert segments[1]["start"] == pytest.approx(1.0) and segments[1]["end"] == pytest.approx(3.0)
    assert seek == 300 and single


def test_one_pass_without_consecutive_timestamps_and_after_a_new_segment_opens() -> None:
    segments, seek, single = _split(True, [_ts(0.2), 1, 2, 3])
    assert [s["tokens"] for s in segments] == [[_ts(0.2), 1, 2, 3, _ts(3.0)]] and (seek, single) == (300, True)
    # Closed, then a new segment opened with nothing in it: nothing more to decode.
    segments, seek, single = _split(True, [_ts(0.0), 1, _ts(0.8), _ts(0.8)])
    assert [s["tokens"] for s in segments] == [[_ts(0.0), 1, _ts(0.8)]] and (seek, single) == (300, True)


@pytest.mark.parametrize("tokens", [
    [_ts(0.0), 1, 2, _ts(1.0)],  # a lone timestamp at the end: one pass anyway
    [_ts(0.0)] + [7] * 29,  # the token cap (30): a loop, decoded on from its last word as before
    [1, 2, 3],  # no timestamps (without_timestamps decodes)
])
def test_one_pass_leaves_finished_capped_and_untimed_decodes_to_faster_whisper(tokens) -> None:
    assert _split(True, tokens) == _split(False, tokens)
