"""Beam-5 segments that only the beam guard drops, with the greedy decode of
the same audio (issue 13, round 5): the live caption test's clip through
Opus and AAC next to the benchmark's babbles.

::

    .venv/bin/python loadtests/beam_doubts.py clip --out clip.json
    .venv/bin/python loadtests/beam_doubts.py clip --overlap 2 --out clip-unconfirmed.json
    .venv/bin/python loadtests/beam_doubts.py babble --minutes 4 --seed 14 --out babble.json
    .venv/bin/python loadtests/beam_doubts.py babble --minutes 10 --seed 13 --greedy-after-dropped 4

Each input is streamed through captions_bench.stream() on the model clock
at beam 5; every doubtful segment (WhisperDecoder.doubt_log) is recorded
with its scores, the greedy words it was compared with, the overlap and
whether it was kept. ``--overlap 2``: the confirmation never accepts (the
round-4 guard alone, the greedy decodes still made).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from live_qc.captions.worker import CaptionEngine  # noqa: E402
from loadtests import captions_bench as bench  # noqa: E402
from loadtests.speech import RATE, load, wer  # noqa: E402

#: tests/integration/test_captions_live.py's sentences, voice rate and bitrates.
SENTENCES = ["The quick brown fox jumps over the lazy dog.",
             "Please call Stella and ask her to bring these things from the store."]
BITRATES = {"libopus": "96k", "aac": "128k"}


class _Engine(CaptionEngine):
    """Streamers whose decoders log their doubtful segments."""

    def __init__(self, log: list, overlap: float, switch: int | None) -> None:
        super().__init__()
        self.log, self.overlap, self.switch = log, overlap, switch

    def new_streamer(self, name, options):  # type: ignore[no-untyped-def]
        s = super().new_streamer(name, options)
        s.decoder.doubt_log = self.log
        s.decoder.beam_confirm_overlap = self.overlap
        s.decoder.greedy_after_dropped = self.switch
        return s


def clip(codec: str, d: Path) -> np.ndarray:
    """The live test's audio: each sentence with 1 s of silence around,
    through ``codec`` in MPEG-TS (48 kHz stereo), back to 16 kHz mono."""
    parts = []
    for i, text in enumerate(SENTENCES):
        wav = d / f"s{i}.wav"
        subprocess.run(["espeak-ng", "-s", "150", "-w", str(wav), text], check=True)
        parts.append(load(wav))
    silence = np.zeros(RATE, np.float32)
    x = np.concatenate([silence, parts[0], silence, parts[1], silence])
    pcm = d / "in.wav"
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-f", "f32le", "-ar", str(RATE), "-ac", "1",
                    "-i", "-", str(pcm)], input=x.astype(np.float32).tobytes(), check=True)
    ts = d / f"out-{codec}.ts"
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", str(pcm), "-ar", "48000", "-ac", "2",
                    "-c:a", codec, "-b:a", BITRATES[codec], "-f", "mpegts", str(ts)], check=True)
    return load(ts)


def _plain(value: object) -> object:
    """numpy scalars (the model's word times and probabilities) as Python's."""
    return value.item() if hasattr(value, "item") else str(value)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["clip", "babble"])
    ap.add_argument("--overlap", type=float, default=0.5, help="greedy word overlap that confirms")
    ap.add_argument("--greedy-after-dropped", type=int, help="greedy first after this many dropped decodes")
    ap.add_argument("--minutes", type=float, default=4.0, help="babble: the speech input it is built from")
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--out", help="JSON file for the records")
    args = ap.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    log: list = []
    engine = _Engine(log, args.overlap, args.greedy_after_dropped)
    options = {"model": "tiny.en", "cpu_threads": 2, "language": "en", "beam_size": 5, "final_beam_size": 5}
    inputs: list[tuple[dict, np.ndarray]] = []
    with tempfile.TemporaryDirectory(prefix="beam-doubts-") as tmp:
        if args.what == "clip":
            for codec in BITRATES:
                x = clip(codec, Path(tmp))
                for lead in (0.0, 0.1, 0.2, 0.3, 0.4):  # step phases
                    inputs.append(({"codec": codec, "lead_s": lead},
                                   np.concatenate([np.zeros(int(lead * RATE), np.float32), x])))
        else:
            speech, _ = bench.build_speech(args.minutes, args.seed, Path(tmp))
            nonspeech = bench.build_nonspeech(5, speech, args.seed)
            inputs = [({"kind": k, "minutes": args.minutes, "seed": args.seed}, nonspeech[k])
                      for k in ("crowd_babble", "crowd_babble_3")]
    out = []
    for label, x in inputs:
        log.clear()
        r = bench.stream(engine, options, x, "model")
        text = " ".join(c.text for _, c in r["emitted"] if c.final)
        rec = {**label, "words": len(text.split()), "text": text,
               "cpu_pct_of_2_cores": round(100 * r["cpu_s"] / r["media_s"] / 2, 1),
               "decodes": r["decodes"], "beam_decodes": r["beam_decodes"],
               "confirm_decodes": r["confirm_decodes"], "doubtful": list(log)}
        if args.what == "clip":
            rec["wer"] = round(wer(" ".join(SENTENCES), text), 3)
        out.append(rec)
        print(json.dumps({k: v for k, v in rec.items() if k != "doubtful"}
                         | {"doubtful": len(log), "kept": sum(bool(d["kept"]) for d in log)}, default=_plain),
              flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1, default=_plain))
    return 0


if __name__ == "__main__":
    sys.exit(main())
