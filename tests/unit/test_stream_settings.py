"""Per-stream QC/captions settings: the strict schema, merge-patch semantics,
config defaults overridden field by field, the in-memory store and its
listeners (server/stream_settings.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from server.config import QcSettings
from server.stream_settings import (THRESHOLD_RANGES, CaptionStreamSettings, SettingsError, StreamSettings,
                                    apply_patch, check_document, effective_json, effective_qc, limits_json)


@pytest.mark.parametrize("patch, where", [
    ({"qc": {"enabled": "yes"}}, "qc.enabled"),
    ({"qc": {"enabled": 1}}, "qc.enabled"),
    ({"qc": {"thresholds": {"black_d": True}}}, "qc.thresholds.black_d"),
    ({"qc": {"thresholds": {"black_d": "2"}}}, "qc.thresholds.black_d"),
    ({"qc": {"thresholds": {"black_d": 0}}}, "qc.thresholds.black_d"),
    ({"qc": {"thresholds": {"black_d": 61}}}, "qc.thresholds.black_d"),
    ({"qc": {"thresholds": {"target_lufs": -5}}}, "qc.thresholds.target_lufs"),
    ({"qc": {"thresholds": {"no_such": 1}}}, "qc.thresholds.no_such"),
    ({"qc": {"thresholds": {"analysis_fps": 5}}}, "qc.thresholds.analysis_fps"),
    ({"qc": {"thresholds": [1]}}, "qc.thresholds"),
    ({"qc": {"colour": True}}, "qc.colour"),
    ({"qc": []}, "qc"),
    ({"latency": 3}, "latency"),
    ({"captions": {"language": "xx"}}, "captions.language"),
    ({"captions": {"language": "english"}}, "captions.language"),
    ({"captions": {"language": 7}}, "captions.language"),
    ({"captions": {"model": "large-v3"}}, "captions.model"),
    ({"captions": {"translate": "true"}}, "captions.translate"),
])
def test_bad_patches_name_the_field(patch, where) -> None:
    with pytest.raises(SettingsError) as exc:
        apply_patch({}, patch)
    assert where in str(exc.value)


def test_a_patch_that_is_not_an_object_is_refused() -> None:
    for patch in ([], "qc", 3, None):
        with pytest.raises(SettingsError):
            apply_patch({}, patch)


def test_merge_patch_replaces_keeps_and_removes() -> None:
    stored = {"qc": {"enabled": True, "thresholds": {"black_d": 3.0, "freeze_d": 4}}, "latency_note": "x"}
    out = apply_patch(stored, {"qc": {"thresholds": {"black_d": None, "silence_d": 5}},
                               "captions": {"enabled": True, "language": None}})
    # Only the sections come back; other settings keys are not this module's.
    assert out == {"qc": {"enabled": True, "thresholds": {"freeze_d": 4, "silence_d": 5}},
                   "captions": {"enabled": True, "language": None}}
    assert stored["qc"]["thresholds"] == {"black_d": 3.0, "freeze_d": 4}  # input untouched
    # null clears an override, a whole section at once, or every threshold.
    assert apply_patch(out, {"qc": {"thresholds": None}}) == {"qc": {"enabled": True},
                                                             "captions": {"enabled": True, "language": None}}
    assert apply_patch(out, {"qc": None, "captions": {"enabled": None}}) == {"captions": {"language": None}}
    assert apply_patch({"qc": {"enabled": False}}, {"qc": {"enabled": None}}) == {}
    # An integer is a number; the range edges are in range.
    assert apply_patch({}, {"qc": {"thresholds": {"black_d": 60, "tolerance_lu": 0.1}}}) == {
        "qc": {"thresholds": {"black_d": 60, "tolerance_lu": 0.1}}}


def test_whole_settings_documents_are_checked_only_in_their_sections() -> None:
    check_document({"anything": {"else": 1}, "qc": {"enabled": True}})
    with pytest.raises(SettingsError):
        check_document({"anything": 1, "qc": {"enabled": "on"}})


def test_config_gives_defaults_and_stored_values_override_field_by_field() -> None:
    cfg = QcSettings(enabled=True, disabled_streams=["quiet"], thresholds={"black_d": 5, "clip_runs": 3},
                     analysis_fps=5)
    assert effective_qc(cfg, "cam", None).enabled
    assert not effective_qc(cfg, "quiet", None).enabled
    # A stored 'enabled' wins over both the default and disabled_streams.
    assert effective_qc(cfg, "quiet", {"qc": {"enabled": True}}).enabled
    assert not effective_qc(cfg, "cam", {"qc": {"enabled": False}}).enabled
    eff = effective_qc(cfg, "cam", {"qc": {"thresholds": {"freeze_d": 4}}})
    assert eff.thresholds == {"black_d": 5.0, "clip_runs": 3, "analysis_fps": 5.0, "freeze_d": 4.0}
    assert isinstance(eff.thresholds["clip_runs"], int)
    assert effective_qc(cfg, "cam", {"qc": {"thresholds": {"black_d": 2.5}}}).thresholds["black_d"] == 2.5
    off = QcSettings()
    assert not effective_qc(off, "cam", None).enabled
    assert effective_qc(off, "cam", {"qc": {"enabled": True}}).enabled


def test_effective_json_lists_every_editable_threshold_in_force() -> None:
    cfg = QcSettings(thresholds={"black_d": 5})
    out = effective_json(cfg, None, "cam", {"qc": {"thresholds": {"silence_d": 3}}, "captions": {"enabled": True}})
    assert set(out["qc"]["thresholds"]) == set(THRESHOLD_RANGES)
    assert out["qc"]["thresholds"]["black_d"] == 5.0  # config
    assert out["qc"]["thresholds"]["silence_d"] == 3.0  # stream
    assert out["qc"]["thresholds"]["target_lufs"] == -23.0  # Thresholds' own default
    assert out["captions"] == {"enabled": True, "language": None, "translate": False, "model": None}
    limits = limits_json()
    assert limits["qc.thresholds"]["black_d"] == {"min": 0.1, "max": 60.0}
    assert "ko" in limits["captions.language"] and limits["captions.model"] == ["tiny.en", "base"]


def test_captions_follow_the_captions_config_when_there_is_one() -> None:
    config = SimpleNamespace(enabled=False, language="en", translate=False, model="tiny.en")
    store = StreamSettings(QcSettings(), config)
    assert store.captions_for("cam") == CaptionStreamSettings(False, "en", False, "tiny.en")
    assert store.caption_options("cam") is None
    store.update({"cam": {"captions": {"enabled": True, "language": None, "model": "base", "translate": True}}})
    # language null is stored and means "detect"; the model named wins.
    assert store.captions_for("cam") == CaptionStreamSettings(True, None, True, "base")
    assert store.caption_options("cam") == {"model": "base", "language": None, "translate": True}
    store.update({"cam": {"captions": {"enabled": True, "model": None}}})
    assert store.captions_for("cam").model == "tiny.en"  # null model: the server's default
    assert store.captions_for("cam").language == "en"


def test_store_tells_listeners_which_streams_changed() -> None:
    store = StreamSettings(QcSettings())
    heard: list[set[str]] = []
    store.listeners.append(heard.append)
    store.update({"a": {}, "b": {"qc": {"enabled": True}}, "c": {"label_colour": "red"}})
    assert heard == [{"b"}]
    assert store.qc_for("b").enabled and not store.qc_for("a").enabled
    # Keys outside the sections are not settings of this module: no change.
    store.update({"a": {"other": 1}, "b": {"qc": {"enabled": True}}, "c": {}})
    assert heard == [{"b"}]
    store.update({"a": {}, "b": {"qc": {"enabled": False}}})
    assert heard[-1] == {"b"}
    assert not store.qc_for("b").enabled  # the cached answer went with the change
    store.update({"a": {}})  # b deleted: its listeners hear it
    assert heard[-1] == {"b"}
    assert store.stored("b") == {}


def test_an_invalid_stored_document_gives_the_defaults_and_a_failing_listener_stops_nobody() -> None:
    store = StreamSettings(QcSettings(enabled=True))
    heard: list[set[str]] = []

    def broken(names: set[str]) -> None:
        raise RuntimeError("listener bug")

    store.listeners += [broken, heard.append]
    store.update({"cam": {"qc": {"enabled": "no", "thresholds": {"black_d": -1}}}})
    assert store.qc_for("cam").enabled  # the default, not the garbage
    assert store.stored("cam") == {}
    store.update({"cam": {"qc": {"enabled": False}}})
    assert heard == [{"cam"}] and not store.qc_for("cam").enabled
