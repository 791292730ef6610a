"""The streaming recogniser of one stream: 16 kHz mono in, captions out.

::

    feed(samples, t) ──► StreamingVad ──► speech? ──► utterance buffer
                     └─► loudness (BS.1770 momentary / short-term, per 100 ms)
    step() ──► every ``step_s`` of new speech: decode the uncommitted part of
               the utterance (WhisperDecoder: faster-whisper, guards against
               invented speech) ──► CommitPolicy ──► final + partial Captions
           ──► at the end of an utterance (VAD): a last decode, all committed
           ──► behind real time: shorter context, then skip (``skipped_s``)

Sans-I/O apart from the decoder call: no clock, no thread. ``feed`` is
cheap (VAD + loudness); ``step`` does the decoding, so a caller that has
fallen behind feeds everything it has and then steps once, and the streamer
sees how far behind it is as undecoded audio (media seconds, no clock).
Times are the stream's media seconds: ``t`` of the first sample fed, then
the sample count, re-anchored on a gap or overlap of more than
``GAP_S``.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .policy import AlignmentPolicy, CommitPolicy, PolicyStep, normalise, repeats_phrase, weak_echo
from .types import Caption, CaptionStats, Word
from .vad import RATE, StreamingVad

__all__ = ["RATE", "Hypothesis", "Decoder", "WhisperDecoder", "StreamerOptions", "Streamer",
           "HALLUCINATIONS"]

#: A jump in the incoming media time larger than this is a gap (lost
#: packets, a reconnect): the utterance ends there.
GAP_S = 0.25
#: Texts Whisper invents on silence and noise (trained on subtitled video:
#: credits and sign-offs). Alone in a segment they need strong evidence.
HALLUCINATIONS = frozenset(normalise(t) for t in (
    "Thank you.", "Thank you", "Thanks.", "Thank you very much.", "Thanks for watching!",
    "Thank you for watching.", "Thank you so much for watching!", "Please subscribe.",
    "you", "You", "Bye.", "Bye-bye.", "So.", "Okay.", "Oh.", "Hmm.", "Uh.", "Um.",
    "Subtitles by the Amara.org community", "I'm sorry.", "Gracias.", "감사합니다.",
    "MBC 뉴스 이덕영입니다.", "시청해주셔서 감사합니다.",
))


@dataclass(slots=True, frozen=True)
class Hypothesis:
    #: Words with times relative to the decoded audio's first sample.
    words: tuple[Word, ...]
    language: str
    #: Segments the guards dropped (for stats).
    rejected: int = 0
    #: How sure the model was of the detected language (1.0 when fixed).
    language_probability: float = 1.0
    #: Of the rejected segments, those that were a decoder loop (text that
    #: compresses too well: the decoder repeating itself).
    looped: int = 0


class Decoder(Protocol):
    #: Whether the model detects languages (auto-detection waits for audio).
    multilingual: bool

    def decode(self, audio: np.ndarray, *, prompt: str, language: str | None,
               final: bool = False) -> Hypothesis:
        """``final``: the decode that finalises an utterance (end of
        speech: nothing later can revise its words)."""


def windowed_whisper_class() -> type:
    """``WhisperModel`` whose encoder can run on less than 30 s.

    faster-whisper pads every window to 3000 mel frames (30 s), so a decode
    of 3 s of speech costs the encoder pass of 30 s — 75 % of a tiny.en
    decode on CPU. CTranslate2's encoder takes any frame count (measured:
    1000 frames cost a tenth of 3000), so the streamer trims the padded
    features to the audio it decodes plus a margin (whisper.cpp's
    ``audio_ctx`` does the same). With ``one_pass`` it also makes one
    decoding pass of the window where faster-whisper would make another
    from the last word (see WhisperDecoder.one_pass)."""
    from faster_whisper import WhisperModel

    class WindowedWhisperModel(WhisperModel):  # type: ignore[misc]
        #: Mel frames given to the encoder for the current call (None: all 3000).
        encoder_frames: int | None = None
        #: A pass that ends by itself (end of text before ``token_cap``
        #: tokens) is the decode of the whole window (WhisperDecoder.one_pass).
        one_pass: bool = False
        token_cap: int | None = None

        def encode(self, features: np.ndarray) -> Any:
            if self.encoder_frames is not None:
                features = features[..., :self.encoder_frames]
            return super().encode(features)

        def _split_segments_by_timestamps(self, tokenizer: Any, tokens: list[int], time_offset: float,
                                          segment_size: int, segment_duration: float, seek: int) -> Any:
            begin = tokenizer.timestamp_begin
            last = max((t for t in tokens if t >= begin), default=None)
            if not self.one_pass or last is None or (self.token_cap is not None and len(tokens) >= self.token_cap):
                return super()._split_segments_by_timestamps(tokenizer, tokens, time_offset, segment_size,
                                                             segment_duration, seek)
            if tokens[-1] < begin:
                # The open segment's words end with the audio (faster-whisper
                # drops them, to decode them again in its next pass).
                end = begin + min(round(segment_duration / self.time_precision), 1500)
                tokens = [*tokens, max(end, last)]
            segments, _, _ = super()._split_segments_by_timestamps(tokenizer, tokens, time_offset, segment_size,
                                                                   segment_duration, seek)
            # "Single timestamp ending" also keeps the word-timestamp branch
            # from seeking back to the last word's end.
            return segments, seek + segment_size, True

    return WindowedWhisperModel


@dataclass(slots=True)
class WhisperDecoder:
    """faster-whisper with the settings a streamer needs and the guards
    against invented speech applied per segment."""

    model: Any  # faster_whisper.WhisperModel (windowed_whisper_class() for short windows)
    translate: bool = False
    #: Silence after the audio in the encoder's window (Whisper needs some
    #: to place the last timestamp); None: the full 30 s window.
    window_margin_s: float | None = 2.0
    #: After openai/whisper transcribe.py: a segment whose text compresses
    #: this well is a loop; this no-speech probability with a weak decode is
    #: silence. Whisper's −1.0 log-probability is where it *retries* at a
    #: higher temperature, not where it drops text; audio here is already
    #: VAD-gated speech, and accented or synthetic speech decodes correctly
    #: at −1.0 to −1.3, so only a decode far below that is dropped.
    compression_ratio_max: float = 2.4
    logprob_min: float = -1.5
    no_speech_max: float = 0.6
    no_speech_logprob: float = -0.5
    #: Crowd babble (reversed voices: speech-like, no words) passes the three
    #: checks above: VAD-gated, no_speech_prob mostly < 0.2, avg_logprob −0.9
    #: to −1.5 (above the −1.5 floor), compression ratio normal, and the
    #: "I'm going to use this one, so …" loops it invents at −0.5 to −0.7.
    #: What separates it is the words' own probabilities (measured with
    #: tiny.en, loadtests/captions_bench.py babbles vs espeak speech,
    #: per decoded segment): the mean word probability was ≤ 0.52 for 95 %
    #: of babble segments and all its loops, ≥ 0.52 for 95 % of speech
    #: segments (median 0.83); the speech segments below are mostly
    #: decodes of cut audio ("The sound then you hear.") that a later
    #: decode replaces. English transcription only: that is where it was
    #: measured. base on espeak-ng Spanish, Korean and Spanish→English has
    #: mean word probabilities of 0.2–0.4 on real (synthetic) speech — the
    #: babble's range — so elsewhere the threshold would drop speech.
    #: Alone (as first landed, off by default) it also dropped real speech:
    #: espeak-ng "The quick brown fox jumps over the lazy dog" through Opus
    #: (tests/integration/test_captions_live.py) decodes as "The quick
    #: round-fark jump over the lazy nog", and the misheard words (0.1–0.35)
    #: pull the segment means to 0.42–0.60 — 11 of its 74 decoded segments
    #: fell under 0.5, so the sentence lost words (WER 0.23 → 0.41–0.45).
    #: The decodes of the sentence are not weak (avg_logprob −0.78 to −1.0)
    #: nor likely silence (no_speech_prob 0.1–0.22), while the babble that
    #: passes the segment checks has avg_logprob ≤ −1.0 or no_speech_prob
    #: ≥ 0.3 (16 segments in 3 min of 3-voice babble). So a segment is
    #: dropped for its word probabilities only with one of those two signs.
    #: Measured (tiny.en, bench, ``--clock model``): 3-voice babble 49 words
    #: in 3 min → 0; streaming WER on two 4-min inputs 18.2 / 21.4 % →
    #: 18.8 / 20.8 % (mean unchanged); the Opus clip 0.27 either way. On
    #: by default at 0.5 (English transcription only, see above).
    word_probability_min: float = 0.5
    #: The word-probability guard drops a segment only with a second sign
    #: of non-speech: a weak decode or a likely no-speech window.
    word_logprob_max: float = -1.0
    word_no_speech_min: float = 0.3
    #: The same guard for decodes with a beam (mean word probability below,
    #: and avg_logprob below or no_speech_prob above): a beam finds the
    #: confident path through babble, so its words look surer than a greedy
    #: decode's. Measured (tiny.en, beam 5, ``--clock model``, bench seed 13,
    #: per decoded segment that passed every other guard): 3-voice babble
    #: (18 segments, 118 committed words in 1 min) mean word probability
    #: 0.46–0.62, no_speech_prob 0.17–0.60, avg_logprob −1.3 to −0.5;
    #: speech (409 segments) mean word probability median 0.83 (5 % under
    #: 0.62), no_speech_prob median 0.06, avg_logprob median −0.24. At
    #: (0.65, −0.8, 0.15) all 18 babble segments and 12 of the 409 speech
    #: segments are dropped.
    beam_word_guard: tuple[float, float, float] = (0.65, -0.8, 0.15)
    #: With a beam, a likely no-speech window is dropped whatever the
    #: decode's log-probability: the beam raises avg_logprob (it keeps the
    #: likeliest path), so the no-speech rule above (also a weak decode)
    #: lets Whisper's sign-offs through. Measured (same runs, babble built
    #: from the 10-min input): "Thank you so much for watching, I'll see you
    #: guys in the next video, bye bye" (no_speech_prob 0.82, avg_logprob
    #: −0.45, mean word probability 0.74) and "Thank you, thank you, …"
    #: (0.56, −0.94, 0.77) were the only babble segments to pass — 17 and 4
    #: words in 1 min each; 2 of the 409 speech segments are above 0.4
    #: ("the new", "Come on, come on, come on", cut partial decodes).
    beam_no_speech_max: float = 0.4
    #: A segment whose mean word probability is below this is dropped
    #: whatever its avg_logprob and no_speech_prob say (English
    #: transcription only). Those two are one figure per decoding window,
    #: shared by every segment of it, so babble decoded after speech in the
    #: same window carries the speech's good figures: measured (bench,
    #: babble right after speech, tiny.en) "Lost, time after the story."
    #: at mean word probability 0.05 beside a segment of real speech
    #: (avg_logprob −0.68, no_speech_prob 0.1 for both). Real speech
    #: through Opus measured 0.42 at the lowest (round 2).
    segment_word_probability_min: float = 0.2
    #: A segment in which a phrase of 4–8 words comes 3 times back to back
    #: — twice when the repeated words' mean probability is under
    #: ``weak_phrase_loop_probability`` — or a word or a phrase of up to 3
    #: words 5 times back to back is a loop: dropped, and counted as one
    #: (``Hypothesis.looped``: the policy holds its last hypothesis).
    #: Measured (bench, babble right after speech, tiny.en): "was in the
    #: morning, I was in the morning, I was in the morning." (compression
    #: ratio 2.16, avg_logprob −0.49, mean word probability 0.68), "… right
    #: now in the morning. I was waiting for the moment. I was waiting for
    #: the moment." (the repeated clause's words 0.01–0.83, mean 0.35) and
    #: "Yeah." ten times (compression ratio 2.14) passed every other guard.
    phrase_loop_times: int | None = 3
    weak_phrase_loop_probability: float = 0.5
    #: A segment that says a run of at least this many words of its prompt
    #: again, those words with a mean probability under
    #: ``echo_probability_max``, is dropped like a loop (None: never). The
    #: prompt is committed text from before the decoded audio; babble right
    #: after speech is heard as the prompt (bench, tiny.en: "… I was waiting
    #: for the story on the Lost, time after the break." over babble, the
    #: prompt ending "… is waiting for the story on the Lost, time after the
    #: break.", the echoed words 0.0–0.52, mean 0.14; the segment's
    #: avg_logprob −0.62 and no_speech_prob 0.18 were those of the real
    #: speech decoded before it in the same window). A speaker repeating the
    #: prompt is heard with confidence (0.9–1.0 a word on the bench's read
    #: speech, which repeats its phrases).
    echo_min_words: int | None = 5
    echo_probability_max: float = 0.35
    #: Segments dropped for echoing the prompt (the benchmark reports them).
    echoed_segments: int = 0
    #: Beam width of the decodes whose words a later decode can still revise
    #: (the partial decodes every ``step_s``) and of the decode that
    #: finalises an utterance (``final``: end of speech). Greedy decoding is
    #: where tiny.en loops ("The new tea chask, come out and come out and
    #: …", the guards then drop the whole decode); a beam rarely does.
    #: Measured (loadtests/captions_bench.py, tiny.en, 4 min, seeds 13 / 14,
    #: ``--clock model`` charging a beam-5 decode 1.6× a greedy one; README
    #: "Round 3"): greedy 18.8 / 20.8 % WER; beam 5 on the final decode
    #: only 17.5 / 21.5 %; beam 5 on every decode 16.7 / 19.5 %, commit
    #: latency median 1.5 → 1.6 s, partial median 0.39 → 0.52 s. Offline
    #: on the whole file: 17.2 / 15.4 % greedy, 11.9 / 11.2 % at beam 5.
    #: Not the default: at beam 5 the crowd babbles that give no words
    #: greedily gave words ("Thank you so much for watching, I'll see you
    #: guys in the next video, bye bye": 17 and 27 words in 1 min each,
    #: ``--clock cpu``, 10 min + 5 min of non-speech) — a beam finds the
    #: confident sign-off the babble guard lets through. Beam 5 needs its
    #: own babble guard first. Round 4: with ``beam_word_guard`` and
    #: ``beam_no_speech_max`` the five non-speech kinds gave 0 words at beam
    #: 5 (both seeds, and the babbles of the 10-min input that gave 17 and
    #: 4), WER 14.0 / 19.2 % against 17.2 / 15.4 % offline greedy (mean gap
    #: 0.3 points; seed 14 run before the no-speech rule was added) — but
    #: the live Opus test (tests/integration/
    #: test_captions_live.py) lost "The quick brown fox …" to that guard
    #: (WER 0.45, bound 0.35): codec-degraded speech has the babble's word
    #: probabilities. And babble at beam 5 cost 100–108 % of 2 cores
    #: (process CPU, load 5–8; greedy 53–54 %). Still not the default.
    #: Round 5: the default, with ``beam_confirm_overlap`` (a greedy decode
    #: confirms the segments only the beam guard drops: the live test
    #: passed seven runs of seven, Opus WER 0.09–0.23, AAC 0.05–0.23 and once
    #: 0.41 at load 10) and
    #: ``greedy_after_dropped`` (babble 33–46 % of 2 cores): 4-min seeds
    #: 13 / 14 WER 14.5 / 20.9 % (greedy 19.1 / 20.8 %), commit latency
    #: 1.61–1.68 / 2.44–2.49 / 3.01–3.44 s, speech CPU 32–37 %, 0 words on
    #: all five non-speech kinds, both seeds.
    beam_size: int = 5
    final_beam_size: int = 5
    #: The most tokens one decode pass may generate: ``max_tokens_base`` +
    #: ``max_tokens_per_s`` per second of audio (None: Whisper's 224 a pass,
    #: up to 448 with the prompt). Speech holds far fewer (fast speech, 5
    #: words/s, is about 8 tokens/s with punctuation and timestamps); what
    #: runs past that is a loop — ". . . ." after the speech, the prompt
    #: said again and again — that the guards reject anyway. Measured on the
    #: benchmark (tiny.en, 10 min, ``--clock cpu``): 142 of 1011 decodes
    #: cost 1.1–3.0 s of CPU instead of 0.1–0.5 s, 68 of them returned no
    #: words at all, 40 % of all decoding CPU; two such decodes in a row put
    #: the commit latency of the words waiting behind them at 5–7 s.
    max_tokens_base: int = 16
    max_tokens_per_s: float | None = 10.0
    #: faster-whisper decodes a window again from its last word's end when
    #: the decode did not end on a lone timestamp, which in a streamer is
    #: almost every decode: the audio ends mid-speech. With ``one_pass``, a
    #: decode that ends by itself (not at the token cap) is the decode: the
    #: open segment's words are kept, ending with the audio, and no second
    #: pass is made; a decode stopped by the token cap (a loop) goes on as
    #: before. Measured (bench, base, beam 5, 4 min, seed 13): 438 second
    #: and later passes in 496 decodes, 412 of them on less than 0.5 s of
    #: audio after the last word (median 0.11 s), each an encoder pass of
    #: the whole window and a decode, returning what Whisper says over a
    #: cut syllable: "I'm sorry, I'm sorry, …", "Thank you.", "We are going
    #: to have a great time." — 2,702 words against 6,533 from the first
    #: passes. Of the 4 passes on more than 1 s, two decoded again the open
    #: segment faster-whisper had dropped, which one pass keeps. 10-min
    #: Piper input (README "Round 8"): base, ``--clock cpu``, 61.7–69.1 % →
    #: 45.5–53.2 % of 2 cores (two runs each), WER 1.96–2.08 → 1.47–1.59 %,
    #: commit latency p95 2.32–2.51 → 1.95–2.09 s; tiny.en (model clock)
    #: WER 0.92 % either way, process CPU 37.8 → 28.3 %; 0 words on the six
    #: non-speech kinds with both models.
    one_pass: bool = True
    #: Greedy confirmation of a doubtful beam segment: a segment of a beam
    #: decode that only the beam's own guard (``beam_word_guard``,
    #: ``beam_no_speech_max``) would drop is kept when a greedy decode of
    #: the same audio, under the greedy guards, says at least this share of
    #: its words too (None: such segments are dropped, as in round 4).
    #: Codec-degraded speech is heard the same way by both decodes; babble
    #: is where the beam finds a confident path that greedy decoding does
    #: not. Measured (tiny.en, beam 5, the bench's model clock; README
    #: "Round 5"): the live test's clip through Opus 96 kb/s and AAC, five
    #: step phases each — 78 doubtful segments, the confirmed ones at
    #: overlaps 0.5–1.0, the others 0.0–0.4 (cut partial decodes, loops);
    #: Opus WER 0.18–0.50 without (the first sentence lost or cut in three of
    #: five phases), 0.14–0.23 with. The bench's babbles
    #: (54 doubtful segments): overlap 0.0 for 51, 0.18 and 0.27, and one
    #: at 1.0 (see ``beam_confirm_floor``).
    beam_confirm_overlap: float | None = 0.5
    #: A doubtful segment whose mean word probability is below this is not
    #: confirmed (None: no floor). Measured (tiny.en, beam 5, model clock):
    #: of 54 doubtful segments of the bench's babbles (4-min inputs of seeds
    #: 13 and 14, 10-min input of seed 13; 8- and 3-voice, 1 min each) the
    #: greedy decode confirmed one, " I've been here for a long time."
    #: (mean word probability 0.178, greedy 0.178 at avg_logprob −0.67,
    #: no_speech_prob 0.16: the greedy guards pass it), and Whisper then
    #: said it again after it as its prompt (45 words); the live test's
    #: clip through Opus and AAC (five step phases each) had its confirmed
    #: segments at 0.37–0.65.
    beam_confirm_floor: float | None = 0.3
    #: Back to greedy while nothing is speech: after this many decodes in a
    #: row whose segments the guards dropped whole (None: never), each decode
    #: is greedy first; when the greedy decode hears no words it is the
    #: decode, when it does the beam decodes the same audio and decides
    #: (that greedy decode confirming its doubtful segments), and a decode
    #: with words ends the state. Babble is decoded all along (the VAD hears
    #: speech in it); at beam 5 that cost 78–108 % of 2 cores, greedily
    #: 44–63 %. Greedy alone in that state (tried first) let 3-voice babble
    #: through: 29 words in 1 min, bench seed 14, the greedy guards' leak
    #: (README "Round 4"); greedy first then the beam: 0.
    greedy_after_dropped: int | None = 4
    #: Decodes made with a beam wider than 1 and their audio (the
    #: benchmark's model clock charges them their own cost).
    beam_decodes: int = 0
    beam_decoded_audio_s: float = 0.0
    #: Greedy decodes made to confirm doubtful beam segments (not counted as
    #: the caller's decodes) and their audio; segments kept by them.
    confirm_decodes: int = 0
    confirm_decoded_audio_s: float = 0.0
    confirmed_segments: int = 0
    #: Decodes made greedy only by ``greedy_after_dropped`` (the greedy
    #: decode heard no words, so no beam decode followed).
    greedy_switched_decodes: int = 0
    #: Decodes in a row whose segments were all dropped.
    dropped_run: int = 0
    #: When a list: one record per beam-doubtful segment (text, scores,
    #: the greedy words it was compared with, the overlap, the verdict).
    doubt_log: list | None = None

    @property
    def multilingual(self) -> bool:
        return bool(self.model.model.is_multilingual)

    def decode(self, audio: np.ndarray, *, prompt: str, language: str | None,
               final: bool = False) -> Hypothesis:
        beam = self.final_beam_size if final else self.beam_size
        # Nothing but dropped decodes lately (babble, music): greedy first,
        # the beam only once the greedy decode hears words.
        greedy_first = beam > 1 and self.greedy_after_dropped is not None \
            and self.dropped_run >= self.greedy_after_dropped
        max_new_tokens = None
        if self.max_tokens_per_s is not None:
            # The prompt takes at most 224 of Whisper's 448 positions.
            max_new_tokens = min(MAX_NEW_TOKENS, self.max_tokens_base
                                 + int(np.ceil(self.max_tokens_per_s * len(audio) / RATE)))
        # windowed_whisper_class()'s settings hold for this one decode.
        ours = hasattr(self.model, "encoder_frames")
        if ours:
            if self.window_margin_s is not None:
                # Whole seconds, so that the encoder sees few distinct shapes.
                seconds = min(30, int(np.ceil(len(audio) / RATE + self.window_margin_s)))
                self.model.encoder_frames = seconds * 100
            self.model.one_pass, self.model.token_cap = self.one_pass, max_new_tokens
        try:
            hyp = self._decode(audio, prompt=prompt, language=language, beam=beam, greedy_first=greedy_first,
                               max_new_tokens=max_new_tokens)
        finally:
            if ours:
                self.model.encoder_frames, self.model.one_pass, self.model.token_cap = None, False, None
        if hyp.words:
            self.dropped_run = 0
        elif hyp.rejected:
            self.dropped_run += 1
        return hyp

    def _decode(self, audio: np.ndarray, *, prompt: str, language: str | None, beam: int = 1,
                greedy_first: bool = False, max_new_tokens: int | None = None) -> Hypothesis:
        options = dict(language=language, task="translate" if self.translate else "transcribe",
                       best_of=1, temperature=0.0,
                       # One pass, no fallback re-decodes at higher temperatures (they
                       # cost a multiple and are where loops and inventions come from);
                       # the guards below reject what a fallback would have retried.
                       compression_ratio_threshold=None, log_prob_threshold=None, no_speech_threshold=None,
                       condition_on_previous_text=False, initial_prompt=prompt or None,
                       word_timestamps=True, vad_filter=False, without_timestamps=False,
                       max_new_tokens=max_new_tokens)
        # The prompt's words, for the echo guard (WhisperDecoder._loops).
        said = [k for k in (normalise(t) for t in prompt.split()) if k] if self.echo_min_words else []
        greedy: tuple[list, Any] | None = None
        if greedy_first:
            segments, info = self.model.transcribe(audio, beam_size=1, **options)
            greedy = (list(segments), info)
            hyp = self._hypothesis(greedy[0], info, language, 1, set(), said)
            if not hyp.words:
                # The greedy decode is the decode (charged as one).
                self.greedy_switched_decodes += 1
                return hyp
            # Words: the beam decides, with this greedy decode as the
            # confirmation of its doubtful segments (charged as one).
            self.confirm_decodes += 1
            self.confirm_decoded_audio_s += len(audio) / RATE
        if beam > 1:
            self.beam_decodes += 1
            self.beam_decoded_audio_s += len(audio) / RATE
        segments, info = self.model.transcribe(audio, beam_size=beam, **options)
        english = not self.translate and (info.language or language) == "en"
        segments = list(segments)
        doubtful = [seg for seg in segments
                    if self._verdict(seg, english, beam) == DOUBTFUL and not self._loops(seg, said)]
        confirmed: set[int] = set()
        if doubtful and self.beam_confirm_overlap is not None:
            if greedy is None:
                # One greedy decode of the same audio for all the doubtful
                # segments, judged by the greedy guards.
                self.confirm_decodes += 1
                self.confirm_decoded_audio_s += len(audio) / RATE
                greedy_segments, _ = self.model.transcribe(audio, beam_size=1, **options)
                greedy = (list(greedy_segments), None)
            # A greedy loop or echo confirms nothing.
            kept = [g for g in greedy[0] if self._verdict(g, english, 1) == KEEP and not self._loops(g, said)]
            heard = [(normalise(w.word), float(w.start), float(w.end))
                     for g in kept for w in g.words or () if normalise(w.word)]
            for seg in doubtful:
                share = _overlap(seg, heard)
                keep = share >= self.beam_confirm_overlap and (
                    self.beam_confirm_floor is None or (_mean_word_p(seg) or 0.0) >= self.beam_confirm_floor)
                if keep:
                    confirmed.add(id(seg))
                    self.confirmed_segments += 1
                if self.doubt_log is not None:
                    self.doubt_log.append({**_doubt_record(seg, heard, share, keep),
                                           "greedy_segments": [_doubt_record(g, None, None, True) for g in kept]})
        elif doubtful and self.doubt_log is not None:
            self.doubt_log += [_doubt_record(seg, None, None, False) for seg in doubtful]
        return self._hypothesis(segments, info, language, beam, confirmed, said)

    def _hypothesis(self, segments: list, info: Any, language: str | None, beam: int,
                    confirmed: set[int], said: Sequence[str] = ()) -> Hypothesis:
        """The words of the segments the guards keep (or a greedy decode
        confirmed: ``confirmed`` holds their ids)."""
        english = not self.translate and (info.language or language) == "en"
        words: list[Word] = []
        rejected = looped = 0
        for seg in segments:
            loop = self._loops(seg, said)
            if loop == "echo":
                self.echoed_segments += 1
            if loop or (self._verdict(seg, english, beam) != KEEP and id(seg) not in confirmed):
                rejected += 1
                looped += loop is not None
                continue
            for w in seg.words or ():
                text = w.word.strip()
                if text:
                    words.append(Word(text, float(w.start), float(w.end), float(w.probability)))
        return Hypothesis(tuple(_drop_unheard(words)), info.language or language or "en", rejected,
                          float(info.language_probability or 0.0), looped)

    def _loops(self, seg: Any, prompt: Sequence[str] = ()) -> str | None:
        """The decoder repeating itself: "loop" for text that compresses
        too well or a phrase said again and again, "echo" for the prompt
        said again where the audio does not hold it; None: neither."""
        if seg.compression_ratio > self.compression_ratio_max:
            return "loop"
        heard = [(k, w.probability) for k, w in ((normalise(w.word), w) for w in seg.words or ()) if k]
        keys = [k for k, _ in heard]
        probabilities = [p for _, p in heard]
        if self.phrase_loop_times is not None and (
                repeats_phrase(keys, min_n=1, max_n=3, times=5)
                or repeats_phrase(keys, times=self.phrase_loop_times)
                or repeats_phrase(keys, times=2, probabilities=probabilities,
                                  below=self.weak_phrase_loop_probability)):
            return "loop"
        if prompt and self.echo_min_words is not None and weak_echo(
                keys, probabilities, prompt, min_run=self.echo_min_words, below=self.echo_probability_max):
            return "echo"
        return None

    def _verdict(self, seg: Any, english: bool = True, beam: int = 1) -> str:
        """KEEP, DROP, or DOUBTFUL: a beam decode's segment that passes
        every guard but the beam's own (``beam_word_guard``,
        ``beam_no_speech_max``), which a greedy decode may confirm."""
        if seg.compression_ratio > self.compression_ratio_max:
            return DROP
        if seg.avg_logprob < self.logprob_min:
            return DROP
        if seg.no_speech_prob > self.no_speech_max and seg.avg_logprob < self.no_speech_logprob:
            return DROP
        if normalise(seg.text) in HALLUCINATIONS \
                and not (seg.no_speech_prob < 0.2 and seg.avg_logprob > -0.4):
            # Said for real it is decoded with confidence and speech-like.
            return DROP
        if beam > 1:
            word_min, logprob_max, no_speech_min = self.beam_word_guard
        else:
            word_min, logprob_max, no_speech_min = \
                self.word_probability_min, self.word_logprob_max, self.word_no_speech_min
        # Word probabilities are read for English transcription only.
        mean = _mean_word_p(seg) if english else None
        if mean is None:
            mean = 1.0  # nothing to judge by
        if mean < self.segment_word_probability_min:
            return DROP
        if (beam > 1 and seg.no_speech_prob > self.beam_no_speech_max) or (
                mean < word_min and (seg.avg_logprob < logprob_max or seg.no_speech_prob > no_speech_min)):
            return DOUBTFUL if beam > 1 else DROP
        return KEEP


KEEP, DROP, DOUBTFUL = "keep", "drop", "doubtful"


def _overlap(seg: Any, heard: list[tuple[str, float, float]], slack_s: float = 1.0) -> float:
    """The share of ``seg``'s words that the greedy decode's kept words
    (normalised text, start, end) near the segment's time span say too, in
    the same order (longest common subsequence)."""
    words = list(seg.words or ())
    mine = [normalise(w.word) for w in words]
    mine = [w for w in mine if w]
    if not mine:
        return 0.0
    start, end = float(words[0].start), float(words[-1].end)
    theirs = [t for t, a, b in heard if b >= start - slack_s and a <= end + slack_s]
    if not theirs:
        return 0.0
    prev = [0] * (len(theirs) + 1)
    for m in mine:
        cur = [0]
        for j, t in enumerate(theirs, 1):
            cur.append(prev[j - 1] + 1 if m == t else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1] / len(mine)


def _mean_word_p(seg: Any) -> float | None:
    """A segment's mean word probability; None when it has no words."""
    probabilities = [w.probability for w in seg.words or ()]
    return sum(probabilities) / len(probabilities) if probabilities else None


def _doubt_record(seg: Any, heard: list | None, share: float | None, keep: bool) -> dict:
    mean = _mean_word_p(seg)
    return {"text": seg.text, "no_speech": round(float(seg.no_speech_prob), 3),
            "logprob": round(float(seg.avg_logprob), 3), "ratio": round(float(seg.compression_ratio), 2),
            "word_p": None if mean is None else round(mean, 3),
            "start": round(float(getattr(seg, "start", 0.0)), 2), "end": round(float(getattr(seg, "end", 0.0)), 2),
            "greedy": None if heard is None else " ".join(t for t, _, _ in heard),
            "overlap": None if share is None else round(share, 3), "kept": keep}


#: faster-whisper's limit for ``max_new_tokens`` with the longest prompt
#: (448 positions, of which the prompt and the start tokens take up to 228).
MAX_NEW_TOKENS = 220

#: A word shorter than this has no audio of its own (the aligner gave it none).
UNHEARD_S = 0.02


def _drop_unheard(words: list[Word]) -> list[Word]:
    """Drop the words the alignment gives no audio: every run of two or
    more in a row, each of zero length, wherever it is in the decode.
    That is the decoder saying words it did not hear — measured on the
    benchmark (tiny.en): a final decode of "The new teacher asked to come
    out the price on fresh rent before midnight." came back with the
    whole sentence a second time, every word of the copy at 4.18–4.18 s of
    4.6 s, and was committed as new speech; in partial decodes the same
    runs ("Thank you for joining. Thank …", "The home team is …") sit on
    the audio's last instant. Round 5: a run at the *start* of a decode
    too — a 2.3 s decode (10-min input, seed 13, 431 s) said "The sound
    been the near and waiting for the fight." with all ten words at its
    first instant, then the same words heard; the timeout committed the
    unheard copy (its words "ended" 2.3 s before the audio's end), the next
    decode's real words were not recognised as committed (different
    times), and the sentence was committed twice (16 extra errors). A
    single short word is kept: a word cut by the end of the audio is
    squeezed too, and is real."""
    out: list[Word] = []
    i = 0
    while i < len(words):
        j = i
        while j < len(words) and words[j].end - words[j].start < UNHEARD_S:
            j += 1
        if j - i >= 2:
            i = j  # a run of unheard words
            continue
        out += words[i:max(j, i + 1)]
        i = max(j, i + 1)
    return out


@dataclass(slots=True)
class StreamerOptions:
    language: str | None = None
    #: Auto-detected language: the first decode waits for this much speech.
    detect_s: float = 2.0
    #: New speech between two decodes of the same utterance.
    step_s: float = 0.5
    #: Audio kept before the VAD's speech start (its decision lags the onset).
    preroll_s: float = 0.3
    #: Audio kept after the VAD's speech end (the last word's tail).
    tail_s: float = 0.25
    #: The longest uncommitted audio decoded at once (one Whisper window is 30 s).
    max_context_s: float = 15.0
    #: Behind by this much undecoded audio: decode a shorter context.
    behind_short_s: float = 1.5
    short_context_s: float = 6.0
    #: Behind by this much: skip to the newest audio, keeping ``keep_s``.
    behind_skip_s: float = 6.0
    keep_s: float = 2.0
    #: Emphasis: a word this many LU above the speaker's running level.
    emphasis_lu: float = 6.0
    vad_threshold: float = 0.5
    vad_min_silence_s: float = 0.5
    commit_timeout_s: float = 2.0
    #: Committed text given as Whisper's prompt (0: none). Measured with
    #: tiny.en on the benchmark: without it the streaming WER was 1.3
    #: points worse (22.3 % vs 21.0 %).
    prompt_chars: int = 200
    #: "local_agreement" (CommitPolicy, the default) or "alignment"
    #: (AlignmentPolicy); see AlignmentPolicy for the comparison.
    commit_policy: str = "local_agreement"
    alignment_guard_s: float = 1.0
    #: LocalAgreement-2 commits agreed words only once a decode has heard
    #: this much audio after them (CommitPolicy.agree_guard_s). Measured on
    #: loadtests/captions_bench.py (tiny.en, 4 min, ``--clock model``, two
    #: seeds; offline 17.2 / 15.4 %): streaming WER 19.5 / 23.9 % without
    #: it, 17.8 / 21.4 % with 1.0 s; commit latency median 0.9 → 1.5 s,
    #: p95 2.0–2.2 → 2.3–2.5 s, max 2.9–3.0 → 3.0–4.6 s (budget 2.0 /
    #: 3.5 / 5 s).
    agree_guard_s: float = 1.0
    #: A decode the guards dropped whole is made once more: from the start
    #: of the last committed word in its audio (at least ``retry_min_cut_s``
    #: after the audio's start and ``retry_min_rest_s`` before its end), the
    #: committed text before it as prompt; with no such word, the same
    #: audio without the prompt (if it had one). Measured on the benchmark
    #: (tiny.en, 10 min, seed 13, ``--clock model``, which reproduces the
    #: 6.6 s maximum of the ``--clock cpu`` run): ten decodes in a row of
    #: the growing 7.3–11.8 s buffer of one utterance returned one weak
    #: segment ("A local farmer talk to Mount De", avg_logprob −1.3) that
    #: the babble guard dropped. The same audio without the prompt was
    #: dropped too, all ten times (max 7.08 s); from the last committed word
    #: ("camera", 1.8 s before the buffer's end) nine of ten returned the
    #: sentence. Commit latency max 6.58 → 3.01 s, median 1.53 → 1.52 s,
    #: p95 2.46 → 2.41 s, WER 21.7 → 21.8 %, process CPU 29.2 → 34.1 % of
    #: 2 cores (143 retries in 1075 decodes, 30 from a committed word).
    retry_dropped: bool = True
    retry_min_cut_s: float = 0.5
    #: With no committed word inside, retry the same audio without the prompt.
    retry_without_prompt: bool = True
    #: The retry from a committed word has the committed text before it as
    #: prompt.
    retry_prompt: bool = True
    retry_min_rest_s: float = 1.0
    #: Left context: a decode starts up to this much earlier, at the start
    #: of a committed word (committed speech heard again, skipped by the
    #: policy by its letters; the prompt is the committed text before it),
    #: so that the first words of an utterance are not decoded from a second
    #: or two of audio alone. 0: off. Measured (loadtests/captions_gap.py on
    #: the bench's 10-min seed-13 input, ``--clock model``): of the decodes of
    #: an utterance's first 1.5 s, 77 of 102 were dropped whole by the
    #: guards (37 loops: the prompt with no audio context), 34 of 102 of
    #: 1.5–2.5 s, 8 of 253 of 2.5–5 s; words committed from buffers under
    #: 3 s were wrong where offline was right 13.6 % of the time, from
    #: buffers over 10 s 6.9 %. With 3 s, 4-min seeds 13 / 14: WER 19.1 /
    #: 20.6 % → 16.8 / 17.8 % (offline 17.2 / 15.4 %), commit latency p95
    #: 2.35–2.38 → 2.15–2.19 s, max 3.0 → 2.7–3.3 s, process CPU 26–27 →
    #: 32–38 % of 2 cores (README "Round 5"). Off by default: the live Opus
    #: test (tests/integration/test_captions_live.py, real server, real
    #: time, load 6–9) failed 7 of 8 runs with 3 s (WER 0.45–0.73, bound
    #: 0.45; "brown fox jumps over the lazy dog" lost), 1 of 5 without
    #: (0.18–0.45), alternating runs; the same audio streamed through the
    #: bench's clock lost nothing either way — the cause is not found yet.
    left_context_s: float = 0.0
    #: Nothing new heard: after ``idle_after`` partial decodes in a row of
    #: one utterance that leave nothing to show (no word committed, an empty
    #: partial: the guards dropped what was heard, or it was committed speech
    #: heard again), the next decode waits for ``idle_step_s`` of new audio
    #: instead of ``step_s``, until a decode hears a word (None: never).
    #: Crowd noise, music under talk and babble are speech to the VAD, so
    #: they are decoded all along; at beam 5, 3-voice babble right after
    #: speech cost 85–106 % of 2 cores (bench, tiny.en, ``--clock model``,
    #: README "Round 5c"), which on a 2-core machine is lag and skipped audio.
    #: Measured (README "Round 6"): seed 15's babble after speech 91.4 →
    #: 51.4 % of 2 cores, 0 words either way; on speech it never engages
    #: (4-min espeak-ng and 10-min Piper inputs: 0 idle decodes, WER and
    #: commit latency unchanged). Speech that starts inside such noise waits
    #: at most ``idle_step_s`` − ``step_s`` longer for its first partial.
    idle_after: int | None = 4
    idle_step_s: float = 1.5
    #: CommitPolicy.hold_restatements (the benchmark compares both).
    hold_restatements: bool = True


@dataclass(slots=True)
class _Loudness:
    """BS.1770 loudness of the stream per 100 ms block (pyebur128) and the
    speaker's running level: the power mean of the momentary loudness over
    the last 10 s *of speech*. Gated by the VAD because a plain short-term
    window (3 s) straddling a pause sits far below the voice, which would
    make every first word after a pause "louder than the speaker"."""

    state: Any = None
    blocks: deque = field(default_factory=lambda: deque(maxlen=600))  # (t_end, M, speech)
    _carry: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    _t: float = 0.0

    def __post_init__(self) -> None:
        import pyebur128
        self.state = pyebur128.R128State(1, RATE, pyebur128.MeasurementMode.MODE_M)

    def feed(self, x: np.ndarray, t: float, speech: bool) -> None:
        import pyebur128
        if not len(self._carry):
            self._t = t
        x = np.concatenate([self._carry, x])
        block = RATE // 10
        n = len(x) // block
        for i in range(n):
            self.state.add_frames(np.ascontiguousarray(x[i * block:(i + 1) * block], np.float64), block)
            self._t += block / RATE
            self.blocks.append((self._t, pyebur128.get_loudness_momentary(self.state), speech))
        self._carry = x[n * block:]

    def emphasis(self, word: Word, lu: float) -> bool:
        history = [m for (t, m, speech) in self.blocks
                   if speech and word.start - 10.0 <= t < word.start and m > -70.0]
        # Two seconds of speech before a word can be called louder than it.
        if len(history) < 20:
            return False
        running = 10.0 * np.log10(np.mean(np.power(10.0, np.asarray(history) / 10.0)))
        # Momentary loudness is a 400 ms window: the word's blocks end up to
        # 0.4 s after the word's start.
        peak = max((m for (t, m, _) in self.blocks if word.start + 0.1 <= t <= word.end + 0.3),
                   default=float("-inf"))
        return bool(peak >= running + lu)


class Streamer:
    """One stream's streaming recogniser (see the module docstring)."""

    def __init__(self, stream: str, decoder: Decoder, vad: StreamingVad,
                 options: StreamerOptions | None = None) -> None:
        self.stream = stream
        self.decoder = decoder
        self.options = options or StreamerOptions()
        self.vad = vad
        o = self.options
        if o.commit_policy == "alignment":
            self.policy: CommitPolicy = AlignmentPolicy(timeout_s=o.commit_timeout_s, guard_s=o.alignment_guard_s,
                                                        hold_restatements=o.hold_restatements)
        else:
            self.policy = CommitPolicy(timeout_s=o.commit_timeout_s, agree_guard_s=o.agree_guard_s,
                                       hold_restatements=o.hold_restatements)
        self.language = self.options.language
        self._loud = _Loudness()
        # Audio kept: from ``_audio_start`` (absolute sample index) on.
        self._audio = np.zeros(0, np.float32)
        self._pieces: list[np.ndarray] = []
        self._audio_start = 0
        self._samples = 0  # absolute samples fed
        self._anchor_t: float | None = None  # media time of sample ``_anchor_k``
        self._anchor_k = 0
        self._utterance: int | None = None  # start sample of the open utterance
        self._ended: list[tuple[int, int]] = []  # utterances waiting for a final decode
        self._trim = 0  # committed (or skipped) up to this sample
        self._decoded_to = 0  # the end of the last decode's audio
        self._partial: tuple[Word, ...] = ()
        self.skipped_s = 0.0
        self.decodes = 0
        self.rejected_segments = 0
        self.looped_segments = 0
        self.retries = 0  # decodes made again (StreamerOptions.retry_dropped)
        self.retries_from_committed = 0  # of those, from the last committed word
        self._decoded_from = 0.0  # media time where the last decode's audio started
        self._looped = False  # the last decode had no words because it looped
        self.words_committed = 0
        self.decoded_audio_s = 0.0
        self._hyp_language = self.language or "en"
        self._pending_out: list[Caption] = []
        self._unheard = 0  # partial decodes in a row with nothing to show (options.idle_after)
        self.idle_decodes = 0  # partial decodes made at idle_step_s

    # -- time
    def time_of(self, sample: int) -> float:
        return (self._anchor_t or 0.0) + (sample - self._anchor_k) / RATE

    def sample_of(self, t: float) -> int:
        return self._anchor_k + round((t - (self._anchor_t or 0.0)) * RATE)

    @property
    def media_end(self) -> float:
        return self.time_of(self._samples)

    # -- input
    def feed(self, samples: np.ndarray, t: float | None = None) -> None:
        """16 kHz mono float32 samples whose first sample is at media time
        ``t`` (None: right after the previous ones)."""
        x = np.asarray(samples, np.float32).ravel()
        if t is not None:
            if self._anchor_t is None:
                self._anchor_t, self._anchor_k = t, self._samples
            elif abs(t - self.media_end) > GAP_S:
                # A gap or a jump back: what was heard so far is one utterance.
                self._close_utterance(self._samples)
                self.vad.reset()
                self._samples = self.vad.samples_seen
                self._audio_start = self._samples
                self._audio = np.zeros(0, np.float32)
                self._pieces.clear()
                self._trim = self._decoded_to = self._samples
                self._anchor_t, self._anchor_k = t, self._samples
        elif self._anchor_t is None:
            self._anchor_t, self._anchor_k = 0.0, self._samples
        if not len(x):
            return
        start = self._samples
        # Appended as pieces and joined when read: one copy per decode, not
        # one of the whole utterance per 20 ms frame.
        self._pieces.append(x)
        self._samples += len(x)
        speaking_before = self.vad.speaking
        for event in self.vad.feed(x):
            if event.speech:
                self._utterance = event.sample
                self._unheard = 0
            else:
                self._close_utterance(event.sample)
        self._loud.feed(x, self.time_of(start), speaking_before or self.vad.speaking)
        if self._utterance is None and not self._ended:
            # Idle: keep only the pre-roll.
            keep = self._samples - round(self.options.preroll_s * RATE) - 2 * 512
            self._drop_before(keep - round(self.options.left_context_s * RATE))
            self._trim = max(self._trim, keep)

    def _close_utterance(self, end: int) -> None:
        if self._utterance is not None:
            self._ended.append((self._utterance, end))
            self._utterance = None

    def _joined(self) -> np.ndarray:
        if self._pieces:
            self._audio = np.concatenate([self._audio, *self._pieces])
            self._pieces.clear()
        return self._audio

    def _drop_before(self, sample: int) -> None:
        if sample > self._audio_start:
            self._joined()
            cut = min(sample - self._audio_start, len(self._audio))
            self._audio = self._audio[cut:]
            self._audio_start += cut

    def _slice(self, a: int, b: int) -> np.ndarray:
        a = max(a, self._audio_start)
        return self._joined()[a - self._audio_start:max(b - self._audio_start, 0)]

    # -- decoding
    def step(self) -> list[Caption]:
        """Decode what is due; returns the captions to emit (finals first)."""
        out: list[Caption] = self._pending_out
        self._pending_out = []
        o = self.options
        behind = (self._samples - max(self._decoded_to, self._trim)) / RATE
        if behind > o.behind_skip_s and (self._utterance is not None or self._ended):
            out += self._skip()
        while self._ended:
            start, end = self._ended.pop(0)
            tail = min(end + round(o.tail_s * RATE), self._samples)
            a = max(start - round(o.preroll_s * RATE), self._trim)
            step = PolicyStep()
            if tail - a > 0.1 * RATE:
                hyp = self._decode(a, tail, final=True, context=self._context_start(a))
                if hyp or not self._looped:
                    step = self.policy.end_of_speech(hyp, self._decoded_from)
                else:
                    # The last decode looped: the utterance's words are those
                    # of the decode before it, not none.
                    step = self.policy.flush()
            else:
                step = self.policy.flush()
            out += self._emit(step)
            self._trim = max(self._trim, tail)
            self._decoded_to = max(self._decoded_to, tail)
            if self._utterance is None and not self._ended:
                self._drop_before(self._trim - round((o.preroll_s + o.left_context_s) * RATE))
        if self._utterance is not None:
            new = self._samples - max(self._decoded_to, self._utterance)
            if self.language is None and getattr(self.decoder, "multilingual", False) \
                    and self._samples - self._utterance < o.detect_s * RATE:
                # Language detection on a second of audio is a guess (it
                # flips between related languages); partials wait for it.
                new = 0
            idle = o.idle_after is not None and self._unheard >= o.idle_after
            if new >= (o.idle_step_s if idle else o.step_s) * RATE:
                self.idle_decodes += idle
                # The whole utterance is decoded each time (up to a limit):
                # a decode of audio cut at a committed word's end starts
                # mid-syllable and invents words there.
                limit = o.short_context_s if behind > o.behind_short_s else o.max_context_s
                a = max(self._utterance - round(o.preroll_s * RATE), self._trim)
                if (self._samples - a) / RATE > limit:
                    a = self._shorten(self._samples - round(limit * RATE))
                # Behind real time: no left context either (back-pressure
                # wants the shortest decode).
                hyp = self._decode(a, self._samples,
                                   context=a if behind > o.behind_short_s else self._context_start(a))
                if hyp or not self._looped:
                    step = self.policy.update(hyp, self.media_end, self._decoded_from)
                else:
                    # A decode that looped says nothing about the speech: the
                    # last hypothesis stands and its timeout still applies.
                    # Only loops: a decode the other guards dropped whole
                    # (weak, likely no speech) clears it — holding those too
                    # let 3-voice babble commit 28 words in 1 min (bench,
                    # ``--clock cpu``), 0 without.
                    step = self.policy.hold(self.media_end)
                self._unheard = 0 if step.committed or step.partial else self._unheard + 1
                out += self._emit(step)
                self._drop_before(self._trim - round((o.preroll_s + o.left_context_s) * RATE))
        return out

    def _shorten(self, a: int) -> int:
        """Decode from ``a`` at the latest: the buffer starts at the end of
        the last committed word before ``a`` when there is one; otherwise what
        the last decode heard before ``a`` is committed as it stands."""
        t = self.time_of(a)
        ends = [w.end for w in self.policy.committed if w.end <= t]
        committed_from = self.sample_of(ends[-1]) if ends else None
        if committed_from is None or committed_from <= self._trim:
            self._pending_out += self._emit(self.policy.flush())
            committed_from = a
        self._trim = max(self._trim, committed_from)
        return self._trim

    def _skip(self) -> list[Caption]:
        """Far behind: give up on the oldest audio so that lag stays bounded."""
        keep_from = self._samples - round(self.options.keep_s * RATE)
        out = self._emit(self.policy.flush())
        skipped = 0
        for start, end in self._ended:
            skipped += max(0, min(end, keep_from) - max(start, self._trim, self._decoded_to))
        self._ended.clear()
        if self._utterance is not None:
            skipped += max(0, keep_from - max(self._utterance, self._trim, self._decoded_to))
            self._utterance = max(self._utterance, keep_from)
        self.skipped_s += skipped / RATE
        self._trim = max(self._trim, keep_from)
        self._decoded_to = max(self._decoded_to, keep_from)
        self._drop_before(keep_from - round(self.options.preroll_s * RATE))
        return out

    def _context_start(self, a: int) -> int:
        """Where a decode of audio from ``a`` starts with its left context
        (StreamerOptions.left_context_s): the start of the first committed
        word that ends within ``left_context_s`` before ``a``; ``a`` when
        there is none (or its audio is gone)."""
        span = self.options.left_context_s
        if span <= 0:
            return a
        t = self.time_of(a)
        for w in self.policy.committed:
            if t - span < w.end and w.start < t:
                return max(min(self.sample_of(w.start), a), self._audio_start)
        return a

    def _decode(self, a: int, b: int, final: bool = False, context: int | None = None) -> Sequence[Word]:
        """Decode samples ``a``–``b``; the words on the media timeline.
        ``context`` (< ``a``): the decode starts there instead, hearing
        committed speech again for context (the policy skips it), with the
        committed text before it as prompt. When the guards drop the decode
        whole, it is made once more (``retry``, of ``a``–``b`` as without
        context): see StreamerOptions.retry_dropped. ``_decoded_from`` is
        the media time the returned words' audio starts at."""
        audio = self._slice(a, b)
        t0 = self.time_of(max(a, self._audio_start))
        prompt = self.policy.prompt(before=t0, max_chars=self.options.prompt_chars)
        c = max(context, self._audio_start) if context is not None else a
        if c < max(a, self._audio_start):
            t_ctx = self.time_of(c)
            hyp = self._run_decoder(self._slice(c, b), self.policy.prompt(
                before=t_ctx, max_chars=self.options.prompt_chars), final)
            t_hyp = t_ctx
        else:
            hyp = self._run_decoder(audio, prompt, final)
            t_hyp = t0
        looped = hyp.looped > 0
        if not hyp.words and hyp.rejected and self.options.retry_dropped:
            again = self._retry(audio, t0, prompt, final)
            if again is not None:
                t_hyp, hyp = again
                # A loop either way says nothing about the speech (held, as
                # before); words from the retry are the decode's words.
                looped = looped or hyp.looped > 0
        self._looped = looped
        self._decoded_from = t0 = t_hyp
        if self.options.language is None and hyp.words and (
                len(audio) >= self.options.detect_s * RATE or hyp.language_probability >= 0.6):
            # Detected once with enough audio or confidence, then kept:
            # per-decode detection on short buffers flips between languages.
            self.language = hyp.language
        # Translated text is English whatever was spoken.
        self._hyp_language = "en" if getattr(self.decoder, "translate", False) else hyp.language
        self._decoded_to = max(self._decoded_to, b)
        return [Word(w.text, t0 + w.start, t0 + w.end, w.probability) for w in hyp.words]

    def _retry(self, audio: np.ndarray, t0: float, prompt: str, final: bool) -> tuple[float, Hypothesis] | None:
        """The second decode of audio (starting at media time ``t0``) that
        the guards dropped whole: from the start of the last committed word
        heard in it, with the committed text before that word as prompt —
        or, when no committed word lies inside, the same audio without the
        prompt. None: nothing to try."""
        o = self.options
        end = t0 + len(audio) / RATE
        last = self.policy.committed[-1] if self.policy.committed else None
        if last is not None and t0 + o.retry_min_cut_s <= last.start <= end - o.retry_min_rest_s:
            k = round((last.start - t0) * RATE)
            t0 = t0 + k / RATE
            audio = audio[k:]
            prompt = self.policy.prompt(before=t0, max_chars=o.prompt_chars) if o.retry_prompt else ""
            self.retries_from_committed += 1
        elif prompt and o.retry_without_prompt:
            prompt = ""
        else:
            return None
        self.retries += 1
        return t0, self._run_decoder(audio, prompt, final)

    def _run_decoder(self, audio: np.ndarray, prompt: str, final: bool) -> Hypothesis:
        self.decodes += 1
        self.decoded_audio_s += len(audio) / RATE
        hyp = self.decoder.decode(audio, prompt=prompt, language=self.language, final=final)
        self.rejected_segments += hyp.rejected
        self.looped_segments += hyp.looped
        return hyp

    def _emit(self, step: PolicyStep) -> list[Caption]:
        out: list[Caption] = []
        language = self._hyp_language
        if step.committed:
            words = tuple(Word(w.text, w.start, w.end, w.probability,
                               self._loud.emphasis(w, self.options.emphasis_lu))
                          for w in step.committed)
            self.words_committed += len(words)
            out.append(Caption(self.stream, True, words[0].start, words[-1].end,
                               _join(words), words, language))
        if step.partial != self._partial or step.committed:
            self._partial = step.partial
            if step.partial or step.committed:
                p = step.partial
                at = p[0].start if p else (step.committed[-1].end if step.committed else self.media_end)
                out.append(Caption(self.stream, False, at, p[-1].end if p else at, _join(p), p, language))
        return out

    def finish(self) -> list[Caption]:
        """End of input: the open utterance is decoded and committed."""
        self._close_utterance(self._samples)
        return self.step()

    def reset(self, reason: str = "") -> list[Caption]:
        """A discontinuity: the open utterance is finished as it stands; the
        next audio starts a new timeline."""
        out = self.finish()
        self.vad.reset()
        self._samples = self.vad.samples_seen
        self._audio = np.zeros(0, np.float32)
        self._pieces.clear()
        self._audio_start = self._trim = self._decoded_to = self._samples
        self._anchor_t = None
        return out

    def stats(self) -> CaptionStats:
        """Lag and skips (the caller adds rtf and CPU, which need a clock)."""
        pending = self._utterance is not None or bool(self._ended)
        # Newest audio received minus the end of the newest committed (or
        # skipped) audio; nothing pending (silence) is no lag.
        done = self._trim
        if self.policy.committed and self._anchor_t is not None:
            done = max(done, self.sample_of(self.policy.committed_end))
        lag = max(self._samples - done, 0) / RATE if pending else 0.0
        return CaptionStats(lag_s=lag, skipped_s=self.skipped_s,
                            extra={"decodes": self.decodes, "words": self.words_committed,
                                   "rejected_segments": self.rejected_segments,
                                   "looped_segments": self.looped_segments,
                                   "retries": self.retries,
                                   "retries_from_committed": self.retries_from_committed,
                                   "idle_decodes": self.idle_decodes,
                                   "language": self.language or ""})


_NO_SPACE = re.compile(r"^[,.!?;:%)\]}»、。，！？]")


def _join(words: Sequence[Word]) -> str:
    text = ""
    for w in words:
        t = w.text.strip()
        text = t if not text else (text + t if _NO_SPACE.match(t) else f"{text} {t}")
    return text
