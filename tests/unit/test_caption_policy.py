"""The commit policy with scripted hypotheses (no model)."""

from __future__ import annotations

from live_qc.captions.policy import (AlignmentPolicy, CommitPolicy, drop_loops, drop_repeated_clauses, normalise,
                                    repeats_phrase, weak_echo)
from live_qc.captions.types import Word


def hyp(text: str, start: float = 0.0, step: float = 0.3) -> list[Word]:
    return [Word(tok, start + i * step, start + i * step + step * 0.9) for i, tok in enumerate(text.split())]


def texts(words) -> str:
    return " ".join(w.text for w in words)


def run(policy: CommitPolicy, steps: list[tuple[str, float]]) -> list[str]:
    """Feed (hypothesis, now) pairs; the committed text after each."""
    out = []
    for text, now in steps:
        policy.update(hyp(text), now)
        out.append(texts(policy.committed))
    return out


def test_local_agreement_commits_the_prefix_two_decodes_agree_on() -> None:
    p = CommitPolicy(timeout_s=10.0)
    step = p.update(hyp("the quick"), 0.7)
    assert step.committed == () and texts(step.partial) == "the quick"
    step = p.update(hyp("the quick brown fox"), 1.2)
    assert texts(step.committed) == "the quick" and step.reason == "agreement"
    assert texts(step.partial) == "brown fox"
    step = p.update(hyp("the quick brown fox jumps"), 1.7)
    assert texts(step.committed) == "brown fox"
    assert texts(p.committed) == "the quick brown fox"


def test_revision_is_not_committed_until_agreed_and_commits_are_never_retracted() -> None:
    p = CommitPolicy(timeout_s=10.0)
    history = run(p, [("I scream", 0.7), ("ice cream is", 1.2), ("ice cream is cold", 1.7),
                      ("eyes cream is cold today", 2.2)])
    # The last decode rewrites committed words: they stay as committed, and
    # the words after them still agree ("cold").
    assert history == ["", "", "ice cream is", "ice cream is cold"]
    step = p.update(hyp("eyes cream is cold today", ), 2.4)
    assert texts(p.committed).startswith("ice cream is")
    assert texts(p.committed).count("cream") == 1
    assert "cream" not in texts(step.committed)


def test_stall_is_broken_by_the_timeout() -> None:
    p = CommitPolicy(timeout_s=2.0)
    # The decoder keeps changing its mind about the first word: no agreement.
    flip = ["red", "read", "rhett", "red", "read", "rhett"]
    committed_at = None
    for i, first in enumerate(flip):
        now = 0.6 + 0.5 * i
        step = p.update(hyp(f"{first} alert now"), now)
        if step.committed:
            committed_at = now
            assert step.reason == "timeout"
            break
    assert committed_at is not None
    # "red" ends at 0.27; committed within timeout + one decode step.
    assert committed_at <= 0.27 + 2.0 + 0.5
    assert p.committed[0].end <= committed_at - 2.0


def test_end_of_speech_commits_everything_then_starts_afresh() -> None:
    p = CommitPolicy(timeout_s=10.0)
    p.update(hyp("hello there"), 0.7)
    step = p.end_of_speech(hyp("hello there general"))
    assert texts(step.committed) == "hello there general" and step.partial == ()
    assert step.reason == "end_of_speech"
    # The next utterance does not agree with the previous one's leftovers.
    step = p.update(hyp("kenobi", start=5.0), 5.5)
    assert step.committed == ()


def test_silence_commits_nothing() -> None:
    p = CommitPolicy(timeout_s=1.0)
    for i in range(10):
        step = p.update([], 0.5 * i)
        assert step.committed == () and step.partial == ()
    assert p.end_of_speech([]).committed == ()
    assert p.flush().committed == ()


def test_repetition_loop_is_cut() -> None:
    words = hyp("and then we went to the the the the the the shop")
    assert texts(drop_loops(words)) == "and then we went to the the the"
    words = hyp("thank you for coming thank you for coming thank you for coming thank you for coming")
    assert texts(drop_loops(words)) == "thank you for coming thank you for coming"
    # Ordinary repeats survive.
    assert texts(drop_loops(hyp("no no I said no"))) == "no no I said no"
    p = CommitPolicy(timeout_s=10.0)
    p.update(hyp("go go go go go go go go"), 3.0)
    step = p.update(hyp("go go go go go go go go go go"), 3.5)
    assert texts(p.committed) == "go go go"
    assert texts(step.partial) == ""


def test_loop_across_the_commit_boundary_is_dropped() -> None:
    p = CommitPolicy(timeout_s=10.0)
    p.end_of_speech(hyp("we are live we are live"))
    step = p.update(hyp("we are live we are live we are live", start=3.0), 6.0)
    assert step.partial == ()


def test_spelling_flicker_still_agrees() -> None:
    p = CommitPolicy(timeout_s=10.0)
    p.update(hyp("a cold hearted man"), 1.5)
    step = p.update([Word("a", 0.0, 0.27), Word("coldhearted", 0.3, 0.8), Word("man.", 0.9, 1.1),
                     Word("Yes", 1.2, 1.4)], 2.0)
    assert texts(step.committed) == "a coldhearted man."
    p2 = CommitPolicy(timeout_s=10.0)
    p2.update([Word("Coldhearted,", 0.0, 0.5), Word("yes", 0.6, 0.8)], 1.0)
    step = p2.update(hyp("cold hearted yes"), 1.5)
    assert texts(step.committed) == "cold hearted yes"


def test_re_decoded_committed_words_are_skipped_by_their_letters() -> None:
    p = CommitPolicy(timeout_s=10.0)
    p.update(hyp("one two three"), 1.0)
    p.update(hyp("one two three four"), 1.5)
    assert texts(p.committed) == "one two three"
    # The whole utterance is decoded again with slightly moved times.
    moved = [Word(w.text, w.start + 0.2, w.end + 0.2) for w in hyp("One, two, three four five")]
    step = p.update(moved, 2.0, audio_start=0.0)
    assert texts(step.committed) == "four"
    assert texts(step.partial) == "five"


def test_overlap_at_a_trimmed_buffer_is_not_repeated() -> None:
    p = CommitPolicy(timeout_s=10.0)
    p.end_of_speech(hyp("the lazy dog"))  # ends at 0.87
    # A decode from the trim point hears "dog" again, then new words.
    step = p.update([Word("dog", 0.8, 0.9), Word("barks", 1.0, 1.3)], 1.6, audio_start=0.85)
    step = p.update([Word("dog", 0.8, 0.9), Word("barks", 1.0, 1.3), Word("loudly", 1.4, 1.7)], 2.1,
                    audio_start=0.85)
    assert texts(p.committed) == "the lazy dog barks"


def test_prompt_is_committed_text_before_the_audio() -> None:
    p = CommitPolicy(timeout_s=10.0)
    p.end_of_speech(hyp("good evening and welcome"))
    assert p.prompt() == "good evening and welcome"
    assert p.prompt(before=0.6) == "good evening"


def test_normalise() -> None:
    assert normalise(" Hello,") == "hello"
    assert normalise("¿Qué?") == "qué"
    assert normalise("...") == ""


def test_alignment_policy_commits_words_aligned_before_the_guard() -> None:
    p = AlignmentPolicy(timeout_s=10.0, guard_s=1.0)
    # One hypothesis is enough: "the" (ends 0.27) and "quick" (0.57) lie a
    # second before the decoded audio's end, "brown" (0.87) does not.
    step = p.update(hyp("the quick brown"), 1.6)
    assert texts(step.committed) == "the quick" and step.reason == "alignment"
    assert texts(step.partial) == "brown"
    # A revision of the unsettled tail is free; the settled words stay.
    step = p.update(hyp("the quick frown fox"), 2.0)
    assert texts(step.committed) == "frown"
    assert texts(p.committed) == "the quick frown"
    step = p.end_of_speech(hyp("the quick frown fox jumps"))
    assert texts(step.committed) == "fox jumps" and step.reason == "end_of_speech"


def test_alignment_policy_keeps_the_cleaning_of_the_agreement_policy() -> None:
    p = AlignmentPolicy(timeout_s=10.0, guard_s=0.5)
    p.update(hyp("go go go go go go go go"), 4.0)
    assert texts(p.committed) == "go go go"
    assert p.update([], 4.5).committed == ()


def test_a_long_utterance_keeps_its_committed_words_and_the_prompt_before_it() -> None:
    # The streamer re-decodes an utterance from its start: after 45
    # committed words (a 15 s utterance of read speech) the policy must still
    # hold all of them to recognise them in the next decode, and the text
    # before the utterance is still there for the prompt.
    p = CommitPolicy(timeout_s=10.0)
    p.end_of_speech(hyp("good evening and welcome back", start=0.0))
    start = 10.0
    words = [f"w{i}" for i in range(46)]
    for k in range(2, len(words) + 1):
        p.update(hyp(" ".join(words[:k]), start), start + 0.3 * k, audio_start=start - 0.3)
    assert len([w for w in p.committed if w.start >= start]) == 45
    assert p.prompt(before=start - 0.3) == "good evening and welcome back"
    # The next decode of the whole utterance, its words re-timed 0.4 s
    # later and the first two spelt as one: only the new word is new.
    again = hyp(" ".join(["w0w1", *words[2:], "end"]), start + 0.4)
    step = p.update(again, start + 15.0, audio_start=start - 0.3)
    assert texts(step.committed) + texts(step.partial) in ("w45end", "w45 end", "end")
    assert texts(p.committed).split().count("w44") == 1


def test_agreement_guard_waits_for_right_context_after_the_agreed_words() -> None:
    # Two decodes 0.5 s apart both end just after "time" (words 0.3 s each):
    # plain LocalAgreement-2 commits it, the guard waits until a decode has
    # heard a second past it — and by then the decoder has changed its mind.
    plain = CommitPolicy(timeout_s=10.0)
    plain.update(hyp("the lost time"), 0.9)
    assert texts(plain.update(hyp("the lost time"), 1.4).committed) == "the lost time"
    guarded = CommitPolicy(timeout_s=10.0, agree_guard_s=1.0)
    guarded.update(hyp("the lost time"), 0.9)
    step = guarded.update(hyp("the lost time"), 1.4)
    # "the" ends at 0.27 ≤ 1.4 − 1.0; "lost" at 0.57 and "time" at 0.87 do not.
    assert texts(step.committed) == "the" and texts(step.partial) == "lost time"
    guarded.update(hyp("the lost dog this"), 1.9)
    step = guarded.update(hyp("the lost dog this evening"), 2.4)
    assert texts(guarded.committed) == "the lost dog this"
    assert "time" not in texts(guarded.committed)


def test_hold_keeps_the_last_hypothesis_and_its_timeout() -> None:
    # A decode that looped (the guards dropped all of it) is not "no words":
    # the last hypothesis stands, and its words still commit by the timeout.
    p = CommitPolicy(timeout_s=2.0)
    step = p.update(hyp("the new teacher is waiting"), 1.6)  # words end at 0.27 … 1.47 s
    assert step.committed == ()
    step = p.hold(2.0)  # nothing is overdue yet
    assert step.committed == () and texts(step.partial) == "the new teacher is waiting"
    step = p.hold(3.0)  # words that ended by 1.0 s are overdue
    assert texts(step.committed) == "the new teacher" and step.reason == "timeout"
    assert texts(step.partial) == "is waiting"
    # The next real decode continues from there: nothing repeated.
    step = p.update(hyp("the new teacher is waiting for the plans"), 3.5)
    assert texts(p.committed).split().count("teacher") == 1
    assert texts(p.committed).startswith("the new teacher is waiting")


def test_update_with_no_words_drops_the_hypothesis() -> None:
    # What hold() is for: an empty hypothesis (silence) clears the partial,
    # so nothing of it is ever committed by the timeout.
    p = CommitPolicy(timeout_s=2.0)
    p.update(hyp("the new teacher"), 1.0)
    assert p.update([], 1.5).partial == ()
    assert p.update([], 5.0).committed == () and p.committed == []


def test_a_clause_said_again_right_after_itself_is_captioned_once() -> None:
    # Whisper over babble after speech (bench, tiny.en, seed 15): one copy
    # per segment, so no single segment loops.
    said = "He has been in the game for a long time."
    assert texts(drop_repeated_clauses(hyp(" ".join([said] * 3)))) == said
    # A speaker's restart loses the repeat, not what follows it.
    assert texts(drop_repeated_clauses(hyp("I'm not going to do, I'm not going to do anything."))) \
        == "I'm not going to do anything."
    # The same clause with other words between is read speech, kept.
    speech = "The director is waiting for the lost dog. Our camera operator is waiting for the lost dog."
    assert texts(drop_repeated_clauses(hyp(speech))) == speech
    # Four words said twice are left to drop_loops (people say "no, no").
    assert texts(drop_repeated_clauses(hyp("we are live now we are live now"))) == "we are live now we are live now"
    # Committed words (``keep``) are never touched: the later copy goes.
    words = hyp("a b c d e a b c d e f")
    assert texts(drop_repeated_clauses(words, keep=3)) == "a b c d e f"


def test_a_clause_repeating_the_committed_text_is_not_committed_again() -> None:
    p = CommitPolicy(timeout_s=2.0)
    p.end_of_speech(hyp("He has been in the game for a long time."))
    step = p.update(hyp("He has been in the game for a long time. And then", start=5.0), 9.0)
    assert texts(p.committed) == "He has been in the game for a long time."
    assert texts(step.partial) == "And then"


def _timed(pairs: str) -> list[Word]:
    """"word@start …" → words ending 0.2 s after they start (or where the next starts)."""
    out = []
    items = [(t.rsplit("@", 1)[0], float(t.rsplit("@", 1)[1])) for t in pairs.split()]
    for i, (text, start) in enumerate(items):
        nxt = items[i + 1][1] if i + 1 < len(items) else start + 0.3
        out.append(Word(text, start, max(start + 0.1, min(nxt, start + 0.4))))
    return out


# Captured (loadtests/captions_bench.py, --voice piper, seed 13, babble right
# after speech; tiny.en, beam 5): every decode of the babble re-hears the
# last sentence, and one says it a second time over the babble, cut short.
SAID = _timed("Thank@24.9 you@25.2 for@25.4 joining@25.6 us.@26.26 The@26.97 band@27.49 cannot@27.69 find@28.01 "
              "the@28.33 history@28.83 of@28.83 the@29.13 old@29.35 bridge@29.57 right@29.75 now.@30.09")
AGAIN = _timed("The@26.97 band@27.45 cannot@27.69 find@28.05 the@28.33 history@28.87 of@28.87 the@29.11 old@29.37 "
               "bridge@29.57 right@29.77 now.@30.09 The@31.85 band@32.81 cannot@33.29 find@33.95 the@34.63 "
               "history@35.21 of@35.21")


def test_the_timeout_does_not_commit_the_start_of_the_last_clause_said_again() -> None:
    policy = CommitPolicy(timeout_s=2.0, agree_guard_s=1.0)
    policy.end_of_speech(SAID)
    step = policy.update(AGAIN, 35.84, audio_start=26.97)
    assert step.committed == () and texts(step.partial) == "The band cannot find the history of"
    assert policy.hold(38.0).committed == ()
    # Without it, the timeout commits the words that ended 2 s ago (the bench: "The band").
    p = CommitPolicy(timeout_s=2.0, agree_guard_s=1.0, hold_restatements=False)
    p.end_of_speech(SAID)
    assert texts(p.update(AGAIN, 35.84, audio_start=26.97).committed) == "The band cannot"
    # A word of its own: speech that starts as the last sentence did is
    # committed by the timeout as before.
    p = CommitPolicy(timeout_s=2.0, agree_guard_s=1.0)
    p.end_of_speech(SAID)
    step = p.update(_timed("The@31.85 band@32.81 will@33.29 explain@33.95 it@34.63"), 35.84)
    assert texts(step.committed) == "The band will"


def test_phrase_loops_and_weak_echoes() -> None:
    keys = [normalise(w) for w in "was in the morning, I was in the morning, I was in the morning.".split()]
    assert repeats_phrase(keys)  # the third copy stops short: the decode ran out of audio
    assert not repeats_phrase(keys[:10])
    assert not repeats_phrase([normalise(w) for w in (
        "the director is waiting for the story of the lost dog our camera operator is waiting for the story "
        "of the lost dog the producer talked about the story of the lost dog").split()])
    twice = [normalise(w) for w in "I was waiting for the moment. I was waiting for the moment.".split()]
    assert repeats_phrase(twice, times=2)
    assert repeats_phrase(twice, times=2, probabilities=[0.2] * 12, below=0.5)
    assert not repeats_phrase(twice, times=2, probabilities=[0.9] * 12, below=0.5)
    assert repeats_phrase(["yeah"] * 5, min_n=1, max_n=3, times=5)
    assert not repeats_phrase(["no"] * 4, min_n=1, max_n=3, times=5)
    prompt = [normalise(w) for w in "is waiting for the story on the Lost, time after the break.".split()]
    echo = [normalise(w) for w in "I was waiting for the story on the Lost.".split()]
    assert weak_echo(echo, [0.1] * len(echo), prompt)
    assert not weak_echo(echo, [0.95] * len(echo), prompt)  # said again for real: heard with confidence
    assert not weak_echo(echo[:5], [0.1] * 5, prompt)  # "the story on the" is four words of it
