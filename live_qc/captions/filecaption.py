"""``returnfeed captions FILE``: a recording through the live code path.

::

    FILE ──► PyAV decode ──► 16 kHz mono ──► 0.5 s steps ──► Streamer.feed
                                                          ──► Streamer.step
         ──► final Captions ──► to_webvtt / to_srt

The file is fed as fast as decoding goes, in the same half-second steps the
live worker sees, through the same streamer, VAD and commit policy
(``CaptionEngine.new_streamer``), so what the CLI prints is what the live
tap would have committed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import av
import numpy as np

from .export import to_srt, to_webvtt
from .models import ModelError
from .streamer import RATE
from .types import Caption
from .worker import CaptionEngine

__all__ = ["CaptionFileError", "audio_chunks", "caption_file", "run_cli"]

STEP_S = 0.5


class CaptionFileError(Exception):
    """The file cannot be read as audio; the message names it."""


def audio_chunks(path: str | os.PathLike[str], step_s: float = STEP_S) -> Iterator[tuple[float, np.ndarray]]:
    """(media time, 16 kHz mono float32) in ``step_s`` pieces, times from the
    file's first audio sample (0.0)."""
    step = round(step_s * RATE)
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as exc:
        raise CaptionFileError(f"{path}: cannot open: {getattr(exc, 'strerror', None) or exc}") from exc
    with container:
        if not container.streams.audio:
            raise CaptionFileError(f"{path}: no audio stream")
        resampler = av.AudioResampler(format="flt", layout="mono", rate=RATE)
        pending = np.zeros(0, np.float32)
        sent = 0
        try:
            for frame in container.decode(audio=0):
                for out in resampler.resample(frame):
                    pending = np.concatenate([pending, out.to_ndarray().reshape(-1)])
                while len(pending) >= step:
                    yield sent / RATE, pending[:step]
                    sent += step
                    pending = pending[step:]
            for out in resampler.resample(None):
                pending = np.concatenate([pending, out.to_ndarray().reshape(-1)])
        except av.error.FFmpegError as exc:
            raise CaptionFileError(f"{path}: cannot decode audio: {exc.strerror or exc}") from exc
        if sent == 0 and not len(pending):
            raise CaptionFileError(f"{path}: no audio decoded")
        if len(pending):
            yield sent / RATE, pending


def caption_file(path: str | os.PathLike[str], options: dict[str, Any] | None = None, *,
                 on_caption: Callable[[Caption], None] | None = None,
                 engine: CaptionEngine | None = None) -> list[Caption]:
    """Final captions of a recording (``options`` as the worker's attach
    options). ``on_caption`` sees every caption, partials included, as the
    live tap would emit them."""
    if not Path(path).is_file():
        raise CaptionFileError(f"{path}: no such file")
    streamer = (engine or CaptionEngine()).new_streamer(Path(path).name, dict(options or {}))
    finals: list[Caption] = []

    def emit(captions: list[Caption]) -> None:
        for c in captions:
            if on_caption is not None:
                on_caption(c)
            if c.final:
                finals.append(c)

    for t, x in audio_chunks(path):
        streamer.feed(x, t)
        emit(streamer.step())
    emit(streamer.finish())
    return finals


def run_cli(file: str, *, model: str | None, language: str | None, translate: bool,
            output: str | None, data_dir: str | None, cpu_threads: int = 2) -> tuple[int, str]:
    """(exit code, message for stderr); writes the captions to ``output``
    (.vtt or .srt) or WebVTT to stdout."""
    # Nothing is fetched from a hub: models are local directories only.
    os.environ["HF_HUB_OFFLINE"] = "1"
    fmt = "vtt"
    if output is not None:
        suffix = Path(output).suffix.lower()
        if suffix not in (".vtt", ".srt"):
            return 2, f"-o {output}: the output must end in .vtt or .srt"
        fmt = suffix[1:]
    options = {"model": model, "language": language, "translate": translate,
               "data_dir": data_dir, "cpu_threads": cpu_threads}
    try:
        captions = caption_file(file, options)
    except (CaptionFileError, ModelError) as exc:
        return 1, str(exc)
    text = to_srt(captions) if fmt == "srt" else to_webvtt(captions)
    if output is None:
        import sys
        sys.stdout.write(text)
    else:
        try:
            Path(output).write_text(text, encoding="utf-8")
        except OSError as exc:
            return 1, f"-o {output}: {exc.strerror or exc}"
    return 0, ""
