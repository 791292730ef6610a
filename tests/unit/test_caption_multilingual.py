"""The multilingual base model (joined from the two wheels) through the same
streamer: Spanish and Korean, transcribed and translated to English.

espeak-ng's Spanish is intelligible to Whisper base; its Korean is not
(base hears roughly the first greeting and guesses the rest), so the
Korean checks are about routing — Hangul when transcribing Korean, Latin
script when translating the same clip — not about accuracy."""

from __future__ import annotations

import re
import shutil

import pytest

from caption_audio import espeak, wer, write_wav
from live_qc.captions.filecaption import caption_file
from live_qc.captions.worker import CaptionEngine

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")

SPANISH = "Buenos días. Me llamo Carlos. Hoy hace mucho calor en Madrid."
KOREAN = "안녕하세요. 저는 학생입니다."
HANGUL = re.compile(r"[\uac00-\ud7a3]")


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("ml")
    return {"es": write_wav(d / "es.wav", espeak(d, SPANISH, voice="es", speed=120)),
            "ko": write_wav(d / "ko.wav", espeak(d, KOREAN, voice="ko", speed=110))}


@pytest.fixture(scope="module")
def engine() -> CaptionEngine:
    return CaptionEngine()  # one base model for the module


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def run(engine, data_dir, path, **options):
    captions = caption_file(path, {"model": "base", "data_dir": str(data_dir), **options}, engine=engine)
    return " ".join(c.text for c in captions), {c.language for c in captions}


def test_spanish_detected_and_transcribed(engine, data_dir, clips) -> None:
    text, languages = run(engine, data_dir, clips["es"])
    assert languages == {"es"}
    assert wer(SPANISH, text) <= 0.4, text


def test_spanish_translated_to_english(engine, data_dir, clips) -> None:
    text, languages = run(engine, data_dir, clips["es"], translate=True)
    assert languages == {"en"}
    words = set(re.sub(r"[^\w\s]", " ", text.lower()).split())
    spanish = set(re.sub(r"[^\w\s]", " ", SPANISH.lower()).split()) - {"carlos", "madrid"}
    assert len(words) >= 3 and len(words & spanish) <= 1, text


def test_korean_transcribed_in_hangul(engine, data_dir, clips) -> None:
    text, languages = run(engine, data_dir, clips["ko"], language="ko")
    assert languages == {"ko"}
    assert HANGUL.search(text), text


def test_korean_translated_is_not_hangul(engine, data_dir, clips) -> None:
    text, languages = run(engine, data_dir, clips["ko"], language="ko", translate=True)
    assert languages <= {"en"}
    assert not HANGUL.search(text), text
