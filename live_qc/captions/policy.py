"""The commit policy: which words of a changing hypothesis are final.

Pure: hypotheses (timed words on the media timeline) in, newly committed
words and the current partial out. No clock: ``now`` is the media time up
to which audio has been decoded.

::

    hypothesis ──► clean (drop empty/punctuation-only words, words already
                   committed — overlap at the trim point —, n-gram loops)
               ──► LocalAgreement-2: commit the longest prefix the last two
                   hypotheses agree on (compared as letters, so "cold
                   hearted" / "coldhearted" agree)
               ──► timeout: a word that ended ``timeout_s`` before ``now``
                   is committed with everything before it, agreed or not
               ──► end of speech (VAD): commit the whole last hypothesis
    committed words are appended only: never retracted, never repeated.

LocalAgreement-2 is the rule of ÚFAL whisper_streaming (Macháček et al.,
"Turning Whisper into Real-Time Transcription System", 2023, §2.3);
alone it stalls for seconds when two decodes keep disagreeing (REFERENCES.md
"Captions"), hence the timeout and the end-of-speech commit.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field

from .types import Word

__all__ = ["CommitPolicy", "AlignmentPolicy", "PolicyStep", "normalise", "drop_loops"]

# Whisper ends and starts words with these; they do not make words differ.
_PUNCT = re.compile(r"[\W_]+", re.UNICODE)


def normalise(text: str) -> str:
    """Lower case, letters and digits only (NFKC): what agreement compares."""
    return _PUNCT.sub("", unicodedata.normalize("NFKC", text).casefold())


def drop_loops(words: Sequence[Word], *, max_n: int = 4, max_repeats: int = 2) -> list[Word]:
    """Cut a hypothesis where an n-gram (n ≤ ``max_n``) repeats back to back
    more than ``max_repeats`` times (a single word more than 3 times): the
    decoder loop "and the and the and the …" that every Whisper streamer has
    shipped. The first ``max_repeats`` occurrences are kept (people do say
    "no, no"), the loop after them is dropped with everything that follows."""
    keys = [normalise(w.text) for w in words]
    for i in range(len(keys)):
        for n in range(1, max_n + 1):
            limit = max(max_repeats, 3) if n == 1 else max_repeats
            gram = keys[i:i + n]
            if len(gram) < n:
                break
            reps = 1
            j = i + n
            while keys[j:j + n] == gram:
                reps += 1
                j += n
            if reps > limit:
                return list(words[:i + n * limit])
    return list(words)


def drop_repeated_clauses(words: Sequence[Word], *, min_n: int = 5, max_n: int = 12,
                          keep: int = 0) -> list[Word]:
    """Remove a clause of ``min_n``–``max_n`` words said again right after
    itself: one copy goes — the first, unless it is in the first ``keep``
    words (committed text before the hypothesis, never touched), then the
    second — and what follows stays. Whisper
    says a sentence again over babble ("He has been in the game for a long
    time. He has been in the game for a long time. …", one copy per
    segment, so no segment loops); a speaker's restart ("I'm not going to
    do, I'm not going to do anything") is captioned without the repeat, as
    a subtitler would."""
    out = list(words)
    keys = [normalise(w.text) for w in out]
    i = 0
    while i < len(out):
        for n in range(max_n, min_n - 1, -1):
            if i + 2 * n <= len(out) and i + n >= keep and keys[i:i + n] == keys[i + n:i + 2 * n]:
                gone = slice(i, i + n) if i >= keep else slice(i + n, i + 2 * n)
                del out[gone]
                del keys[gone]
                break
        else:
            i += 1
    return out


def repeats_phrase(words: Sequence[str], *, min_n: int = 4, max_n: int = 8, times: int = 3,
                   probabilities: Sequence[float] | None = None, below: float = 1.0) -> bool:
    """Whether a phrase of ``min_n``–``max_n`` words comes ``times`` times
    back to back in ``words`` (normalised keys; the last time may stop
    short by up to half the phrase, where the decode ran out of audio) —
    with ``probabilities`` (one per word), only where the repeated words'
    mean probability is under ``below``. ``drop_loops`` keeps the first
    two of a loop of at most four words; this finds the longer clause
    Whisper says again and again ("was in the morning, I was in the
    morning, I was in the morning"), whose text is too short for the
    compression ratio to show it. Not the same phrase with other words
    between: read speech does that ("The director is waiting for the story
    of the lost dog. Our camera operator is waiting for the story of the
    lost dog")."""
    for n in range(min_n, max_n + 1):
        need = times * n - n // 2
        run = n  # words in the current stretch that repeats with period n
        for j in range(n, len(words)):
            run = run + 1 if words[j] == words[j - n] else n
            if run < need:
                continue
            if probabilities is None:
                return True
            span = probabilities[j + 1 - run:j + 1]
            if sum(span) / len(span) < below:
                return True
    return False


def weak_echo(words: Sequence[str], probabilities: Sequence[float], prompt: Sequence[str], *,
              min_run: int = 5, below: float = 0.35) -> bool:
    """Whether ``words`` (normalised keys) say a run of at least
    ``min_run`` words of ``prompt`` again with a mean word probability
    under ``below``: the decoder reading its prompt into audio it cannot
    hear. A speaker who says the prompt's words again is heard: the prompt
    makes those words likelier, not less likely (read speech repeating
    "the story of the lost dog" measured 0.9–1.0 a word; babble after
    speech heard as its prompt 0.0–0.5)."""
    if len(words) < min_run or len(prompt) < min_run:
        return False
    previous = [0] * (len(prompt) + 1)
    for i, w in enumerate(words):
        current = [0] * (len(prompt) + 1)
        for j, p in enumerate(prompt, 1):
            if w == p:
                run = current[j] = previous[j - 1] + 1
                if run >= min_run and sum(probabilities[i + 1 - run:i + 1]) / run < below:
                    return True
        previous = current
    return False


@dataclass(slots=True, frozen=True)
class PolicyStep:
    committed: tuple[Word, ...] = ()
    partial: tuple[Word, ...] = ()
    #: Why the words were committed: "agreement", "timeout", "end_of_speech" or "".
    reason: str = ""


def _agreed_prefix(new: Sequence[Word], old: Sequence[Word], whole: bool = False) -> int | None:
    """How many words of ``new`` the previous hypothesis ``old`` agrees on:
    the longest run of whole words of ``new`` whose letters equal a prefix of
    ``old``'s letters ending at a word boundary of ``old`` too. ``whole``:
    the number of words of ``new`` that spell all of ``old``, or None."""
    old_cuts: set[int] = set()
    old_text = ""
    for w in old:
        old_text += normalise(w.text)
        old_cuts.add(len(old_text))
    text = ""
    agreed = 0
    for i, w in enumerate(new):
        text += normalise(w.text)
        if not old_text.startswith(text):
            break
        if len(text) in old_cuts:
            agreed = i + 1
            if whole and len(text) == len(old_text):
                return agreed
    if whole:
        return 0 if not old_text else None
    return agreed


@dataclass(slots=True)
class CommitPolicy:
    #: Commit a word that ended this long before the decoded audio's end
    #: even without agreement (the stall guard).
    timeout_s: float = 2.0
    #: Words starting this much before the last committed end are overlap
    #: from the trim point, not new speech.
    overlap_s: float = 0.15
    #: Committed words kept at least this long (media seconds) besides the
    #: last ``history_words``: the streamer re-decodes an utterance from its
    #: start (up to a 30 s window), and every committed word it hears again
    #: must still be here to be recognised — a 15 s utterance of read speech
    #: holds about 40 words; with only the last 32 kept, the match failed,
    #: the time-based fallback dropped or repeated words at the seam, and
    #: the prompt (words before the decoded audio) was empty.
    history_s: float = 45.0
    history_words: int = 32
    #: Agreement commits only words that end at least this long before the
    #: end of the newer decode's audio: two decodes that both end just after
    #: a word agree on it without having heard what follows, and that is
    #: where they agree on the wrong word ("the lost, time" for "the lost
    #: dog" at a sentence end, committed from two decodes 0.5 s apart).
    #: 0: plain LocalAgreement-2; the streamer's default is 1.0 s
    #: (StreamerOptions.agree_guard_s, measured there).
    agree_guard_s: float = 0.0
    #: The timeout does not commit a hypothesis whose new words are only the
    #: start of the last committed clause said again (5–12 words: the clause
    #: ``_no_loops`` drops once it is said whole) until it says a word of
    #: its own; agreement still commits it. Measured
    #: (loadtests/captions_bench.py, README "Round 6"): every decode of the
    #: babble right after speech re-hears the last sentence, and one said it
    #: a second time over the babble, cut short ("… right now. The band
    #: cannot find the history of"): the timeout committed "The band" (10-min
    #: Piper input, the only words on its non-speech). With this rule 0,
    #: speech unchanged (the same input: WER 0.92 %, commit latency 1.57 /
    #: 1.86 / 3.16 s). Holding agreement too was worse: 28 / 4 / 0 words
    #: against 9 / 4 / 0 on three 1-min inputs with one-voice babble (held
    #: back, the first words changed what Whisper said next).
    hold_restatements: bool = True
    #: Recent committed words (for the overlap check and the prompt).
    committed: list[Word] = field(default_factory=list)
    _previous: list[Word] = field(default_factory=list)

    @property
    def committed_end(self) -> float:
        return self.committed[-1].end if self.committed else float("-inf")

    def _clean(self, hypothesis: Sequence[Word], audio_start: float) -> list[Word]:
        """The part of a decode that is not committed yet. The decoded audio
        starts at ``audio_start`` and may hold committed words again (the
        streamer re-decodes the whole utterance for context): those are
        matched by their letters and skipped; where they do not match (the
        decoder changed its mind about committed text, which stays as it
        is), words are kept from the last committed end on."""
        words = [w for w in hypothesis if normalise(w.text)]
        heard_again = [w for w in self.committed if w.end > audio_start + 0.05]
        if heard_again:
            n = _agreed_prefix(words, heard_again, whole=True)
            if n is not None:
                return self._no_loops(words[n:])
        end = self.committed_end
        words = [w for w in words if w.start >= end - self.overlap_s]
        # At the edge of the committed text the decode may hear the last
        # committed word (or its last syllables) again: drop a leading
        # repeat of the committed tail, longest first.
        tail = [normalise(w.text) for w in self.committed[-4:]]
        keys = [normalise(w.text) for w in words]
        for n in range(min(len(tail), len(keys)), 0, -1):
            if keys[:n] == tail[-n:] and words[0].start < end + 0.5:
                words = words[n:]
                break
        return self._no_loops(words)

    def _no_loops(self, words: list[Word]) -> list[Word]:
        words = drop_loops(drop_repeated_clauses(words))
        if self.committed:
            # A loop across the boundary: the hypothesis keeps saying what
            # was just committed.
            tail = self.committed[-8:]
            joined = drop_loops(tail + words)
            words = joined[len(tail):]
            tail = self.committed[-12:]
            words = drop_repeated_clauses(tail + words, keep=len(tail))[len(tail):]
        return words

    def update(self, hypothesis: Sequence[Word], now: float, audio_start: float = float("-inf")) -> PolicyStep:
        """A new decode of the audio from ``audio_start`` to ``now``."""
        words = self._clean(hypothesis, audio_start)
        agreed = _agreed_prefix(words, self._previous) or 0
        while agreed and words[agreed - 1].end > now - self.agree_guard_s:
            agreed -= 1
        reason = "agreement" if agreed else ""
        overdue = self._overdue(words, now)
        if overdue > agreed:
            agreed, reason = overdue, "timeout"
        return self._commit(words, agreed, reason)

    def _restating(self, words: Sequence[Word], min_n: int = 5, max_n: int = 12) -> bool:
        """Whether ``words`` (new, uncommitted) are all a proper prefix of
        the last ``min_n``–``max_n`` committed words (``hold_restatements``)."""
        if not self.hold_restatements or not words:
            return False
        keys = [normalise(w.text) for w in words]
        tail = [normalise(w.text) for w in self.committed[-max_n:]]
        return any(keys == tail[-n:][:len(keys)] for n in range(max(min_n, len(keys) + 1), len(tail) + 1))

    def hold(self, now: float) -> PolicyStep:
        """No usable hypothesis this time (the decode looped and the guards
        dropped it): the last hypothesis stands, and the timeout applies to
        it as to a new one — without this, a run of looping decodes held
        every word for as long as it lasted (benchmark, tiny.en: five in a
        row held "new teacher is waiting" for 4.6 s, and 5 s where each loop
        also cost 1–3 s to decode)."""
        words = self._previous
        return self._commit(list(words), self._overdue(words, now), "timeout")

    def _overdue(self, words: Sequence[Word], now: float) -> int:
        """How many leading words the timeout commits: up to the last one
        that ended ``timeout_s`` or more before ``now``; none while they only
        restate the last clause (``hold_restatements``)."""
        if self._restating(words):
            return 0
        overdue = 0
        for i, w in enumerate(words):
            if w.end <= now - self.timeout_s:
                overdue = i + 1
        return overdue

    def end_of_speech(self, hypothesis: Sequence[Word], audio_start: float = float("-inf")) -> PolicyStep:
        """The final decode of an utterance (the VAD heard it end): all of it
        is committed, and the next utterance starts without history."""
        words = self._clean(hypothesis, audio_start)
        step = self._commit(words, len(words), "end_of_speech" if words else "")
        self._previous = []
        return step

    def flush(self) -> PolicyStep:
        """Audio ended without a final decode (detach, discontinuity, skip):
        what the last two decodes agreed on is already committed; the rest of
        the last hypothesis is committed too — it is the best text there is."""
        words = self._no_loops(list(self._previous))
        step = self._commit(words, len(words), "end_of_speech" if words else "")
        self._previous = []
        return step

    def _commit(self, words: list[Word], n: int, reason: str) -> PolicyStep:
        done = tuple(words[:n])
        rest = words[n:]
        self.committed.extend(done)
        if len(self.committed) > self.history_words:
            horizon = self.committed[-1].end - self.history_s
            cut = 0
            while len(self.committed) - cut > self.history_words and self.committed[cut].end < horizon:
                cut += 1
            del self.committed[:cut]
        self._previous = rest
        return PolicyStep(done, tuple(rest), reason if done else "")

    def prompt(self, before: float = float("inf"), max_chars: int = 200) -> str:
        """Recent committed text that ended by ``before`` (the start of the
        decoded audio: text that is also in the audio must not be in the
        prompt), for Whisper's ``initial_prompt``."""
        text = ""
        for w in reversed(self.committed):
            if w.end > before:
                continue
            t = w.text.strip()
            if len(text) + len(t) + 1 > max_chars:
                break
            text = f"{t} {text}" if text else t
        return text


@dataclass(slots=True)
class AlignmentPolicy(CommitPolicy):
    """The alignment-based rule (AlignAtt: Papi et al., "AlignAtt: Using
    Attention-based Audio-Translation Alignments as a Guide for Simultaneous
    Speech Translation", Interspeech 2023, §2; the rule of ÚFAL's
    SimulStreaming for Whisper): a word is final once the audio it is
    aligned to lies at least ``guard_s`` before the end of the decoded
    audio — the decoder has heard enough right context not to change it.
    No second hypothesis is needed. The word times are the cross-attention
    alignment CTranslate2's ``Whisper.align`` computes (faster-whisper's
    ``word_timestamps=True``), so this costs no extra decode.

    Same interface, cleaning, end-of-speech commit and timeout as
    :class:`CommitPolicy`; only :meth:`update`'s commit rule differs.

    Compared on loadtests/captions_bench.py (tiny.en, 4 min of espeak-ng
    speech, ``--clock cpu``, the same input): LocalAgreement-2 WER 21.0 %,
    word end → commit median 0.87 s / p95 2.18 s / max 2.84 s; this rule
    with ``guard_s`` = 1.0 WER 20.6 %, 1.41 / 1.83 / 2.69 s. The WER
    difference is inside the run-to-run spread (±1 point between knobs
    that change nothing systematic), so the latency decides: the default
    stays LocalAgreement-2, whose median is half a second lower — what a
    viewer sees most of the time. This rule is kept selectable
    (``commit_policy="alignment"``) because it needs one decode, not two:
    its latency does not grow with the interval between decodes, which
    widens when the worker falls behind or decodes less often."""

    guard_s: float = 1.0

    def update(self, hypothesis: Sequence[Word], now: float, audio_start: float = float("-inf")) -> PolicyStep:
        words = self._clean(hypothesis, audio_start)
        settled = 0
        for w in words:
            if w.end > now - self.guard_s:
                break
            settled += 1
        return self._commit(words, settled, "alignment")
