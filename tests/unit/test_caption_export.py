"""WebVTT/SRT exports, parsed back with real parsers (webvtt-py, srt)."""

from __future__ import annotations

import html
import io
from datetime import timedelta

import srt
import webvtt

from live_qc.captions.export import MAX_LINE_CHARS, MAX_LINES, cues, to_srt, to_webvtt
from live_qc.captions.types import Caption, Word


def _caption(text: str, start: float, step: float = 0.4, *, final: bool = True,
             emphasis: frozenset[int] = frozenset(), stream: str = "cam1") -> Caption:
    words = tuple(Word(" " + tok, start + i * step, start + i * step + step * 0.8,
                       emphasis=i in emphasis)
                  for i, tok in enumerate(text.split()))
    return Caption(stream, final, words[0].start, words[-1].end, text, words)


def _vtt(text: str) -> list:
    return list(webvtt.from_buffer(io.StringIO(text)))


def _secs(clock: str) -> float:
    h, m, s = clock.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


LONG = ("the quick brown fox jumps over the lazy dog while the director cuts "
        "to camera two and the audience applauds loudly for the speaker on stage "
        "before the break and after the break as well")


def test_short_caption_one_cue_with_word_times() -> None:
    cap = _caption("hello world", 12.0)
    vtt = _vtt(to_webvtt([cap]))
    assert len(vtt) == 1
    assert vtt[0].text == "hello world"
    assert abs(_secs(vtt[0].start) - 12.0) < 0.0015
    assert abs(_secs(vtt[0].end) - cap.words[-1].end) < 0.0015
    subs = list(srt.parse(to_srt([cap])))
    assert [s.content for s in subs] == ["hello world"]
    assert subs[0].start == timedelta(seconds=12.0)
    assert abs(subs[0].end.total_seconds() - cap.words[-1].end) < 0.0015


def test_partials_are_not_exported() -> None:
    caps = [_caption("not yet", 1.0, final=False), _caption("committed text", 3.0)]
    assert [c.text for c in _vtt(to_webvtt(caps))] == ["committed text"]
    assert [s.content for s in srt.parse(to_srt(caps))] == ["committed text"]


def test_long_caption_split_at_word_boundaries_with_word_times() -> None:
    cap = _caption(LONG, 100.0)
    vtt = _vtt(to_webvtt([cap], origin=90.0))
    subs = list(srt.parse(to_srt([cap], origin=90.0)))
    assert len(vtt) == len(subs) > 1
    words = list(cap.words)
    pos = 0
    for v, s in zip(vtt, subs):
        lines = v.text.split("\n")
        assert 1 <= len(lines) <= MAX_LINES
        assert all(len(line) <= MAX_LINE_CHARS for line in lines)
        assert s.content == v.text
        n = len(v.text.split())
        first, last = words[pos], words[pos + n - 1]
        assert " ".join(w.text.strip() for w in words[pos:pos + n]) == " ".join(lines)
        # Cue times are the words' own times, relative to the origin.
        assert abs(_secs(v.start) - (first.start - 90.0)) < 0.0015
        assert abs(_secs(v.end) - (last.end - 90.0)) < 0.0015
        assert abs(s.start.total_seconds() - (first.start - 90.0)) < 0.0015
        assert abs(s.end.total_seconds() - (last.end - 90.0)) < 0.0015
        pos += n
    assert pos == len(words)
    # Lines are filled: no line could have taken the next word.
    for v in vtt:
        lines = v.text.split("\n")
        if len(lines) == 2:
            assert len(lines[0]) + 1 + len(lines[1].split()[0]) > MAX_LINE_CHARS


def test_emphasis_bold_and_escaping_in_vtt_plain_in_srt() -> None:
    cap = _caption("ham & eggs <now> really", 5.0, emphasis=frozenset({4}))
    text = to_webvtt([cap])
    assert "ham &amp; eggs &lt;now&gt; <b>really</b>" in text
    vtt = _vtt(text)
    # webvtt-py strips the tags but leaves character references as written.
    assert html.unescape(vtt[0].text) == "ham & eggs <now> really"
    assert "<b>really</b>" in vtt[0].raw_text
    body = list(srt.parse(to_srt([cap])))[0].content
    assert body == "ham & eggs <now> really"
    assert "<b>" not in body


def test_consecutive_finals_share_a_cue_until_a_pause_or_a_full_cue() -> None:
    caps = [_caption("good evening", 10.0), _caption("and welcome", 10.8),  # no pause: one cue
            _caption("to the show", 14.0)]  # after a 2 s pause: a new cue
    vtt = _vtt(to_webvtt(caps, origin=10.0))
    assert [v.text for v in vtt] == ["good evening and welcome", "to the show"]
    assert _secs(vtt[0].start) == 0.0
    assert abs(_secs(vtt[0].end) - (caps[1].words[-1].end - 10.0)) < 0.0015
    assert abs(_secs(vtt[1].start) - 4.0) < 0.0015
    # Many small finals without pauses still make full, readable cues.
    words = LONG.split()
    small = [_caption(" ".join(words[i:i + 2]), 50.0 + i * 0.4) for i in range(0, len(words), 2)]
    cues_small = [v.text for v in _vtt(to_webvtt(small))]
    cues_long = [v.text for v in _vtt(to_webvtt([_caption(LONG, 50.0)]))]
    assert cues_small == cues_long


def test_order_overlap_origin_clamp() -> None:
    late = _caption("second line", 20.0)
    early = _caption("first line of text", 8.0, step=0.7)
    out = cues([late, early], origin=9.0)
    assert [" ".join(w.text.strip() for line in c.lines for w in line) for c in out] == [
        "first line of text", "second line"]
    assert out[0].start == 0.0  # started before the origin: clamped
    assert out[1].start >= out[0].end
    parsed = list(srt.parse(to_srt([late, early], origin=9.0)))
    assert [p.index for p in parsed] == [1, 2]
    # Overlapping word times never make cues overlap.
    a = Caption("cam1", True, 0.0, 3.0, "one two", (Word("one", 0.0, 1.0), Word("two", 1.0, 3.0)))
    b = Caption("cam1", True, 2.0, 30.0, LONG)
    out = cues([a, b])
    assert all(x.end <= y.start for x, y in zip(out, out[1:]))


def test_caption_without_word_times_still_split() -> None:
    cap = Caption("cam1", True, 0.0, 30.0, LONG)
    vtt = _vtt(to_webvtt([cap]))
    assert len(vtt) > 1
    assert " ".join(" ".join(v.text.split("\n")) for v in vtt) == LONG
    assert _secs(vtt[0].start) == 0.0
    assert abs(_secs(vtt[-1].end) - 30.0) < 0.0015


def test_empty_input() -> None:
    assert to_webvtt([]) == "WEBVTT\n"
    assert to_srt([]) == ""
