"""WebVTT and SRT exports of committed captions.

::

    Caption(final) ──► words ──► cues (≤ 2 lines × ≤ 42 chars, split at word
                                  boundaries and at pauses ≥ 1 s, timed by
                                  the words' own times)
                               ──► to_webvtt (``<b>`` on emphasis, escaped)
                               ──► to_srt     (plain text)

Used by ``GET /api/v1/streams/{s}/captions.vtt|.srt`` and by
``returnfeed captions FILE``. Partials are never exported: they may still
change. Times are written relative to ``origin`` (media seconds), so a time
range export starts at 00:00:00.000 when the caller passes the range start.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from .types import Caption, Word

__all__ = ["MAX_LINE_CHARS", "MAX_LINES", "MAX_GAP_S", "Cue", "cues", "to_webvtt", "to_srt"]

#: Readability on a phone (issue 13; the upper end of the 32 (CEA-608) to 42
#: characters a line used by broadcasters' subtitle guidelines).
MAX_LINE_CHARS = 42
MAX_LINES = 2
#: A pause this long starts a new cue.
MAX_GAP_S = 1.0
# A cue must not be empty in time: players drop zero-length cues.
_MIN_CUE_S = 0.001


@dataclass(slots=True, frozen=True)
class Cue:
    start: float
    end: float
    #: Lines of words; each line's plain text is ≤ MAX_LINE_CHARS unless a
    #: single word is longer (it is never broken).
    lines: tuple[tuple[Word, ...], ...]


def _words_of(caption: Caption) -> tuple[Word, ...]:
    words = tuple(w for w in caption.words if _plain(w))
    if words:
        return words
    # A caption without word times (never produced by the streamer, but the
    # contract allows it): spread its text evenly over its span so that long
    # text is still split into readable cues.
    tokens = caption.text.split()
    if not tokens:
        return ()
    step = max(caption.end - caption.start, 0.0) / len(tokens)
    return tuple(Word(tok, caption.start + i * step, caption.start + (i + 1) * step)
                 for i, tok in enumerate(tokens))


def _plain(w: Word) -> str:
    # A line break or a blank line inside a word would end the cue early.
    return " ".join(w.text.split())


def _lines(words: tuple[Word, ...]) -> Iterator[tuple[Word, ...]]:
    line: list[Word] = []
    length = 0
    for w in words:
        n = len(_plain(w))
        if line and length + 1 + n > MAX_LINE_CHARS:
            yield tuple(line)
            line, length = [], 0
        length = n if not line else length + 1 + n
        line.append(w)
    if line:
        yield tuple(line)


def cues(captions: Iterable[Caption], *, origin: float = 0.0) -> list[Cue]:
    """Final captions → cues in time order, times relative to ``origin``
    (clamped at 0; consecutive cues never overlap). The streamer commits a
    few words at a time, so consecutive finals share a cue while it has room
    and the speaker has not paused for ``MAX_GAP_S``."""
    out: list[Cue] = []
    finals = sorted((c for c in captions if c.final), key=lambda c: (c.start, c.end))
    words = [w for c in finals for w in _words_of(c)]
    group: list[Word] = []

    def close() -> None:
        lines = list(_lines(tuple(group)))
        for i in range(0, len(lines), MAX_LINES):
            part = tuple(lines[i:i + MAX_LINES])
            start = max(part[0][0].start - origin, 0.0)
            end = max(part[-1][-1].end - origin, 0.0)
            if out and start < out[-1].end:
                start = out[-1].end
            out.append(Cue(start, max(end, start + _MIN_CUE_S), part))
        group.clear()

    for w in words:
        if group and (w.start - group[-1].end > MAX_GAP_S
                      or len(list(_lines((*group, w)))) > MAX_LINES):
            close()
        group.append(w)
    if group:
        close()
    return out


def _clock(t: float, sep: str) -> str:
    ms = round(t * 1000)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def _vtt_escape(text: str) -> str:
    # WebVTT §4.2.2 (cue text): "&", "<" and ">" are written as character references.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _vtt_word(w: Word) -> str:
    text = _vtt_escape(_plain(w))
    return f"<b>{text}</b>" if w.emphasis else text


def to_webvtt(captions: Iterable[Caption], *, origin: float = 0.0) -> str:
    """WebVTT (W3C WebVTT §4.1): the ``WEBVTT`` header, then one block per
    cue, ``HH:MM:SS.mmm --> HH:MM:SS.mmm`` and its lines."""
    parts = ["WEBVTT\n"]
    for cue in cues(captions, origin=origin):
        text = "\n".join(" ".join(_vtt_word(w) for w in line) for line in cue.lines)
        parts.append(f"\n{_clock(cue.start, '.')} --> {_clock(cue.end, '.')}\n{text}\n")
    return "".join(parts)


def to_srt(captions: Iterable[Caption], *, origin: float = 0.0) -> str:
    """SubRip: numbered blocks, ``HH:MM:SS,mmm --> HH:MM:SS,mmm``, plain
    text (no markup), a blank line after each block."""
    parts = []
    for index, cue in enumerate(cues(captions, origin=origin), 1):
        text = "\n".join(" ".join(_plain(w) for w in line) for line in cue.lines)
        parts.append(f"{index}\n{_clock(cue.start, ',')} --> {_clock(cue.end, ',')}\n{text}\n\n")
    return "".join(parts)
