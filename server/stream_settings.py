"""Per-stream QC and caption settings (issue 12: "Per-stream enable and
thresholds (API + config defaults)"; issue 13: captions per stream).

A stream's ``settings`` jsonb may hold two sections this module owns::

    {"qc":       {"enabled": bool, "thresholds": {NAME: number, ...}},
     "captions": {"enabled": bool, "language": null | "en" | ...,
                  "translate": bool, "model": null | "tiny.en" | "base"}}

Every field is optional: what a stream does not store comes from the
server's configuration (``[qc]``: ``enabled`` minus ``disabled_streams``,
``thresholds``, ``analysis_fps``; ``[captions]`` where the server has one),
field by field. The schema is strict: an unknown key, a wrong type (``"2"``
or ``true`` for a number) or a value outside its range is a 400.

Changes arrive as a PATCH document read like RFC 7396 (JSON Merge Patch):
a key present replaces the stored value, a key absent keeps it, ``null``
removes the override so the default applies again (``{"qc": null}`` removes
every QC override). ``captions.language`` and ``captions.model`` are the
exception the issue's schema asks for: there ``null`` is itself a value
(language detected automatically; the server's default model) and is stored.

:class:`StreamSettings` holds the stored sections of every stream in memory
(fed by the directory's reload, which the streams table's NOTIFY trigger
drives, so a change made on another node arrives here too) and answers
``qc_for(name)`` / ``captions_for(name)`` without touching the database.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from .log import event

log = logging.getLogger("returnfeed.stream_settings")

#: The settings keys this module owns; the rest of ``streams.settings`` is
#: left as it is.
SECTIONS = ("qc", "captions")

#: Thresholds a director may set per stream, with their ranges: the ones an
#: engineer tunes on air (durations, levels, the loudness target). The
#: ranges keep a detector meaningful (a 0 s duration would open a marker on
#: every frame; −70 LUFS is BS.1770's absolute gate).
THRESHOLD_RANGES: dict[str, tuple[float, float]] = {
    "black_d": (0.1, 60.0),
    "black_pix_th": (0.0, 1.0),
    "black_pic_th": (0.5, 1.0),
    "freeze_d": (0.1, 60.0),
    "freeze_n": (0.00001, 0.1),
    "silence_d": (0.1, 60.0),
    "silence_db": (-100.0, -20.0),
    "clip_db": (-6.0, 0.0),
    "phase_corr": (-1.0, 0.0),
    "phase_d": (0.1, 60.0),
    "channel_d": (0.1, 60.0),
    "tone_d": (0.1, 60.0),
    "bars_d": (0.1, 60.0),
    "blur_d": (0.1, 60.0),
    "shake_d": (0.1, 60.0),
    # EBU R128 s1: target −23 LUFS; other delivery specs use −24 … −14.
    "target_lufs": (-40.0, -10.0),
    "tolerance_lu": (0.1, 10.0),
    "loudness_d": (0.1, 60.0),
    "true_peak_dbtp": (-10.0, 0.0),
    # stream detectors (live_qc/stream.py)
    "stall_d": (0.5, 60.0),
    "fps_ratio": (0.1, 0.99),
    "fps_d": (0.5, 60.0),
    "bitrate_ratio": (0.01, 0.99),
    "bitrate_d": (0.5, 60.0),
    "transport_clear_s": (0.5, 60.0),
}

#: ISO 639-1 codes Whisper transcribes (its tokenizer's LANGUAGES table,
#: two-letter entries only).
LANGUAGES = frozenset(
    "af am ar as az ba be bg bn bo br bs ca cs cy da de el en es et eu fa fi fo fr gl gu ha he hi hr ht hu hy "
    "id is it ja jw ka kk km kn ko la lb ln lo lt lv mg mi mk ml mn mr ms mt my ne nl nn no oc pa pl ps pt ro "
    "ru sa sd si sk sl sn so sq sr su sv sw ta te tg th tk tl tr tt uk ur uz vi yi yo zh yue".split())
#: Caption models a stream may ask for (issue 13: the two offline wheels).
MODELS = ("tiny.en", "base")

_STRICT = ConfigDict(extra="forbid", strict=True)


#: The per-stream threshold overrides (names of live_qc.thresholds.Thresholds).
#: Strict floats still take JSON integers (2 for 2.0), never strings or booleans.
QcThresholdsDoc = create_model(
    "QcThresholdsDoc", __config__=_STRICT,
    **{k: (float | None, Field(None, ge=lo, le=hi)) for k, (lo, hi) in THRESHOLD_RANGES.items()})


class QcDoc(BaseModel):
    model_config = _STRICT
    enabled: bool | None = None
    thresholds: QcThresholdsDoc | None = None  # type: ignore[valid-type]


class CaptionsDoc(BaseModel):
    model_config = _STRICT
    enabled: bool | None = None
    language: str | None = Field(None, min_length=2, max_length=3)
    translate: bool | None = None
    model: Literal["tiny.en", "base"] | None = None

    @field_validator("language")
    @classmethod
    def _iso_639_1(cls, v: str | None) -> str | None:
        if v is not None and v not in LANGUAGES:
            raise ValueError(f"{v!r} is not an ISO 639-1 code Whisper knows")
        return v


class SettingsDoc(BaseModel):
    model_config = _STRICT
    qc: QcDoc | None = None
    captions: CaptionsDoc | None = None


#: Fields where ``null`` is a value that is stored, not "back to the default".
_NULL_IS_VALUE = {("captions", "language"), ("captions", "model")}


class SettingsError(ValueError):
    """A settings document or patch that does not fit the schema; the
    message names every offending field."""


def _errors(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors()[:10]:
        loc = ".".join(str(p) for p in e.get("loc", ()))
        msg = e.get("msg", "invalid")
        if e.get("type") == "extra_forbidden":
            msg = "unknown setting"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def _validate(doc: Any) -> SettingsDoc:
    if not isinstance(doc, dict):
        raise SettingsError("settings must be a JSON object")
    try:
        return SettingsDoc.model_validate(doc)
    except ValidationError as exc:
        raise SettingsError(_errors(exc)) from None


def stored_sections(settings: Any) -> dict[str, Any]:
    """The QC/captions part of a stream's ``settings`` jsonb, as stored."""
    if not isinstance(settings, dict):
        return {}
    return {k: settings[k] for k in SECTIONS if k in settings}


def check_document(settings: Mapping[str, Any]) -> None:
    """Raise :class:`SettingsError` when the QC/captions sections of a whole
    ``settings`` object (POST/PATCH /api/v1/streams) do not fit the schema."""
    sections = stored_sections(dict(settings))
    if sections:
        _validate(sections)


def apply_patch(stored: Mapping[str, Any], patch: Any) -> dict[str, Any]:
    """The stored QC/captions sections after a merge patch (module
    docstring), validated; the input is not changed."""
    _validate(patch)  # types, ranges and unknown keys of the patch itself
    out: dict[str, Any] = {k: dict(v) if isinstance(v, dict) else v for k, v in stored_sections(dict(stored)).items()}
    for section, body in patch.items():
        if body is None:
            out.pop(section, None)
            continue
        cur = out.get(section)
        cur = dict(cur) if isinstance(cur, dict) else {}
        for key, value in body.items():
            if key == "thresholds" and isinstance(value, dict):
                th = dict(cur.get("thresholds") or {})
                for name, v in value.items():
                    if v is None:
                        th.pop(name, None)
                    else:
                        th[name] = v
                if th:
                    cur["thresholds"] = th
                else:
                    cur.pop("thresholds", None)
            elif value is None and (section, key) not in _NULL_IS_VALUE:
                cur.pop(key, None)
            else:
                cur[key] = value
        if cur:
            out[section] = cur
        else:
            out.pop(section, None)
    _validate(out)
    return out


# -- effective settings ----------------------------------------------------------

@dataclass(slots=True, frozen=True)
class QcStreamSettings:
    """What the QC tap does with one stream."""

    enabled: bool
    #: The mapping the worker builds live_qc.thresholds.Thresholds from
    #: (integers stay integers; includes analysis_fps).
    thresholds: dict[str, float | int] = field(default_factory=dict)


@dataclass(slots=True, frozen=True)
class CaptionStreamSettings:
    """What the caption tap does with one stream."""

    enabled: bool = False
    language: str | None = None  # ISO 639-1; None: detected
    translate: bool = False  # Whisper's translate task: English text
    model: str | None = None  # None: the server's default model

    def options(self) -> dict[str, Any] | None:
        """The caption worker's attach options, or None while captions are off."""
        if not self.enabled:
            return None
        return {"model": self.model, "language": self.language, "translate": self.translate}


def threshold_defaults(qc_config: Any) -> dict[str, float | int]:
    """Every threshold's value without a stream override: Thresholds'
    defaults under the configuration's ``[qc] thresholds`` and ``analysis_fps``."""
    from live_qc.thresholds import Thresholds

    out: dict[str, float | int] = {f.name: f.default for f in fields(Thresholds)}  # type: ignore[misc]
    out.update(qc_config.stream_thresholds())
    return out


def effective_qc(qc_config: Any, name: str, stored: Mapping[str, Any] | None) -> QcStreamSettings:
    """Config defaults overridden field by field by the stream's stored ``qc``."""
    qc = (stored or {}).get("qc") or {}
    enabled = qc.get("enabled")
    if not isinstance(enabled, bool):
        enabled = bool(qc_config.enabled) and name not in qc_config.disabled_streams
    th: dict[str, float | int] = dict(qc_config.stream_thresholds())
    for k, v in (qc.get("thresholds") or {}).items():
        if k in THRESHOLD_RANGES and isinstance(v, (int, float)) and not isinstance(v, bool):
            th[k] = float(v)
    return QcStreamSettings(enabled, th)


def effective_captions(captions_config: Any, stored: Mapping[str, Any] | None) -> CaptionStreamSettings:
    """``captions_config``: an object with ``enabled``, ``language``,
    ``translate``, ``model`` (the server's ``[captions]`` section), or None
    for captions off, language detected, the default model."""
    # [captions] language = "auto" (TOML has no null) is this schema's null: detected.
    language = getattr(captions_config, "language", None)
    base = CaptionStreamSettings(
        enabled=bool(getattr(captions_config, "enabled", False)),
        language=None if language == "auto" else language,
        translate=bool(getattr(captions_config, "translate", False)),
        model=getattr(captions_config, "model", None),
    )
    cap = (stored or {}).get("captions") or {}
    return CaptionStreamSettings(
        enabled=cap["enabled"] if isinstance(cap.get("enabled"), bool) else base.enabled,
        language=cap["language"] if "language" in cap else base.language,
        translate=cap["translate"] if isinstance(cap.get("translate"), bool) else base.translate,
        model=cap["model"] if "model" in cap and cap["model"] is not None else base.model,
    )


def effective_json(qc_config: Any, captions_config: Any, name: str, stored: Mapping[str, Any] | None
                   ) -> dict[str, Any]:
    """The effective settings as the API shows them: every editable threshold
    with its value in force."""
    qc = effective_qc(qc_config, name, stored)
    all_th = threshold_defaults(qc_config)
    all_th.update(qc.thresholds)
    cap = effective_captions(captions_config, stored)
    return {
        "qc": {"enabled": qc.enabled, "thresholds": {k: all_th[k] for k in THRESHOLD_RANGES}},
        "captions": {"enabled": cap.enabled, "language": cap.language, "translate": cap.translate,
                     "model": cap.model},
    }


def limits_json() -> dict[str, Any]:
    """The ranges a client can build its form from."""
    return {"qc.thresholds": {k: {"min": lo, "max": hi} for k, (lo, hi) in THRESHOLD_RANGES.items()},
            "captions.model": list(MODELS), "captions.language": sorted(LANGUAGES)}


# -- the in-memory copy ----------------------------------------------------------------

Listener = Callable[[set[str]], None]


class StreamSettings:
    """Every stream's stored QC/captions sections, kept current by the
    directory (:meth:`update` is its listener), with the effective settings
    worked out on demand. Listeners hear the names of the streams whose
    stored sections changed (created and deleted streams included)."""

    def __init__(self, qc_config: Any, captions_config: Any = None) -> None:
        self.qc_config = qc_config
        self.captions_config = captions_config
        self._stored: dict[str, dict[str, Any]] = {}
        # The QC poll asks for every live stream twice a second: worked out
        # once per change, not per ask.
        self._qc: dict[str, QcStreamSettings] = {}
        self.listeners: list[Listener] = []

    def update(self, settings: Mapping[str, Any]) -> set[str]:
        """``settings``: stream name → its whole ``settings`` jsonb. A stored
        document that does not fit the schema (written before it existed,
        or by hand) is logged and its stream gets the defaults."""
        new: dict[str, dict[str, Any]] = {}
        for name, raw in settings.items():
            sections = stored_sections(raw)
            if sections:
                try:
                    _validate(sections)
                except SettingsError as exc:
                    event(log, logging.WARNING, "stream_settings.invalid", stream=name, error=str(exc))
                    sections = {}
            new[name] = sections
        old = self._stored
        changed = {n for n in old.keys() | new.keys() if old.get(n, {}) != new.get(n, {})}
        self._stored = new
        for n in changed:
            self._qc.pop(n, None)
        if changed:
            for cb in list(self.listeners):
                try:
                    cb(changed)
                except Exception:  # one listener's bug must not stop the others
                    event(log, logging.ERROR, "stream_settings.listener_failed", exc_info=True)
        return changed

    def stored(self, name: str) -> dict[str, Any]:
        return self._stored.get(name, {})

    def qc_for(self, name: str) -> QcStreamSettings:
        found = self._qc.get(name)
        if found is None:
            found = effective_qc(self.qc_config, name, self._stored.get(name))
            if len(self._qc) < 4 * len(self._stored) + 1024:  # bounded by the streams there are
                self._qc[name] = found
        return found

    def captions_for(self, name: str) -> CaptionStreamSettings:
        return effective_captions(self.captions_config, self._stored.get(name))

    def caption_options(self, name: str) -> dict[str, Any] | None:
        """The caption service's ``options_for(name)``: None while off."""
        return self.captions_for(name).options()
