"""``returnfeed captions FILE``: a real recording (espeak-ng speech in AAC
in MP4) through the CLI process; WebVTT and SRT read back with webvtt-py
and srt."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import srt
import webvtt

from caption_audio import RATE, espeak, wer, write_wav

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("espeak-ng") is None or shutil.which("ffmpeg") is None,
                                 reason="needs espeak-ng and ffmpeg")]

ROOT = Path(__file__).resolve().parents[2]
SENTENCES = ["Good evening and welcome to the show.", "Tonight we have three guests on the main stage."]
LEAD_S, GAP_S = 1.5, 2.0


@pytest.fixture(scope="module")
def recording(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("rec")
    lead, gap = np.zeros(int(LEAD_S * RATE), np.float32), np.zeros(int(GAP_S * RATE), np.float32)
    x = np.concatenate([lead, espeak(d, SENTENCES[0], name="a") * 0.3, gap,
                        espeak(d, SENTENCES[1], name="b") * 0.3, gap])
    wav = write_wav(d / "show.wav", x)
    mp4 = d / "show.mp4"
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", str(wav), "-c:a", "aac",
                    "-b:a", "96k", str(mp4)], check=True)
    return mp4


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.cli", "captions", *args], capture_output=True,
                          text=True, timeout=110, cwd=ROOT)


def _secs(clock: str) -> float:
    h, m, s = clock.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def test_vtt_on_stdout_and_srt_to_a_file(recording, tmp_path) -> None:
    proc = cli(str(recording))
    assert proc.returncode == 0, proc.stderr
    cues = list(webvtt.from_buffer(io.StringIO(proc.stdout)))
    text = " ".join(c.text.replace("\n", " ") for c in cues)
    assert wer(" ".join(SENTENCES), text) <= 0.35, text
    for c in cues:
        assert all(len(line) <= 42 for line in c.text.split("\n")) and len(c.text.split("\n")) <= 2
    # Speech starts after the lead-in and the second sentence after the
    # pause: the cue times are the words' media times.
    assert LEAD_S - 0.4 <= _secs(cues[0].start) <= LEAD_S + 0.6
    assert all(_secs(a.end) <= _secs(b.start) for a, b in zip(cues, cues[1:]))
    second = [c for c in cues if _secs(c.start) > LEAD_S + 2.0]
    assert second and "guests" in " ".join(c.text for c in second).lower()

    out = tmp_path / "show.srt"
    proc = cli(str(recording), "-o", str(out))
    assert proc.returncode == 0 and proc.stdout == "", proc.stderr
    subs = list(srt.parse(out.read_text(encoding="utf-8")))
    # The same cues in SubRip, without markup.
    assert [s.content for s in subs] == [c.raw_text.replace("<b>", "").replace("</b>", "") for c in cues]
    assert [round(s.start.total_seconds(), 3) for s in subs] == [round(_secs(c.start), 3) for c in cues]


def test_bad_inputs_exit_non_zero_with_one_line(tmp_path, recording) -> None:
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(bytes(range(256)) * 40)
    cases = [
        ((str(garbage),), 1, "garbage.mp4"),
        ((str(tmp_path / "missing.wav"),), 1, "missing.wav"),
        ((str(recording), "--model", str(tmp_path / "no-model")), 1, "no-model"),
        ((str(recording), "--language", "es"), 1, "English-only"),
        ((str(recording), "-o", str(tmp_path / "out.txt")), 2, ".vtt or .srt"),
    ]
    for args, code, needle in cases:
        proc = cli(*args)
        assert proc.returncode == code, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("returnfeed captions: ") and needle in lines[0], lines
        assert proc.stdout == ""
