"""Tally WebSocket protocol (``/ws/tally``): JSON text messages.

Every message is a JSON object whose first key is ``type``. Server messages
are encoded once per change and the same bytes go to every client.

Server → client
---------------
``{"type":"snapshot","seq":N,"production":"...","sources":{NAME: SOURCE, ...}}``
    First message on every connection: the complete state at production
    sequence number ``N``.
``{"type":"tally","seq":M,"sources":{NAME: SOURCE, ...}}``
    A delta: only the sources that changed, each with its complete new
    state. ``M > N`` and increases with every delta on a connection.
``{"type":"ping"}``
    Server heartbeat, once a second.
``{"type":"pong"}`` (``{"type":"pong","id":ID}`` when the ping had an ``id``)
    Answer to a client ``ping``.
``{"type":"error","code":CODE,"detail":"..."}`` (+ ``"id"`` when the refused
message had one)
    A refused or malformed command; nothing changed.

``SOURCE`` is ``{"state": S, "buses": [...], "aux": bool, "label": str,
"authority": str}`` where ``S`` is ``"program"`` (on air, red), ``"preview"``
(green), ``"off"`` or ``"unknown"`` (the link to whatever drives the source is
lost — show a distinct "lost" indication, never the last colour); ``buses``
lists the active buses in priority order (``program``, ``preview``,
``aux``); ``authority`` is ``"director"`` or the adapter driving the source
(``"vmix"``, ``"obs"``, ``"tsl:..."``).

Client → server
---------------
``{"type":"cut","source":NAME}``       put NAME on program (directors only)
``{"type":"preview","source":NAME}``   put NAME on preview (directors only)
``{"type":"take"}`` / ``{"type":"take","duration":SECONDS}``
    auto transition: program and preview are both on air for the duration
    (production default when absent; 0..60 s), then they swap
``{"type":"ping"}``                    heartbeat; answered with ``pong``
``{"type":"pong"}``                    answer to the server's ``ping``
Every client message may carry ``"id"`` (string of at most 64 characters or
integer) which is echoed in the ``error`` or ``pong`` it causes.

Validation is strict: at most 4096 bytes (UTF-8), a JSON object without
duplicate keys, NaN or Infinity; a known ``type``; exactly the fields listed
above with the right JSON types. Anything else is answered with an
``error`` (codes in ``ErrorCode``) and ignored.

Sequence numbers (decision)
---------------------------
DESIGN asks for a per-connection monotonically increasing ``seq`` on
WebSocket messages; the product contract fixes ``seq`` in ``snapshot`` and
``tally`` as the production's tally sequence number. Both hold with one
field: ``seq`` *is* the production sequence number, and a connection
receives a snapshot at ``N`` and afterwards only deltas with a higher
``seq``, in order — so ``seq`` strictly increases on every connection. Deltas
are coalesced when changes arrive faster than they can be written, so ``seq``
may skip numbers; no state is lost because a delta carries the latest
complete state of every source changed since the previous one. A client that
sees a ``seq`` not above the last one it applied must ignore that message.
Heartbeats (``ping``/``pong``) and ``error`` carry no ``seq``: they are not
state, and keeping them out lets every tally frame be encoded once for all
connections.

Heartbeat
---------
The server sends ``ping`` and an RFC 6455 Ping frame every second; a browser
client sends ``ping`` (or answers with ``pong``) at least every second, a
standard client's automatic Pong is enough: any frame counts. The server
closes a client it has not heard from for 3 s (close code 4001). A client that has received nothing for
3 s must show "tally lost" and reconnect; on reconnect the snapshot replaces
everything it knew.

Close codes
-----------
4000 "too slow": the client's send backlog exceeded the server's limit;
4001 "heartbeat timeout"; 4029 too many connections (per link, IP or
production; the reason names the cap, retry later); 1001 server shutting down.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any

from tally.errors import MessageError
from tally.state import SourceState

MAX_MESSAGE_BYTES = 4096
MAX_ID_LENGTH = 64
MAX_SOURCE_LENGTH = 64
_MAX_INT_ID = 2**53


class ErrorCode(StrEnum):
    """``code`` values of ``error`` messages."""

    BAD_JSON = "bad_json"
    TOO_LARGE = "too_large"
    UNKNOWN_TYPE = "unknown_type"
    BAD_FIELD = "bad_field"
    FORBIDDEN = "forbidden"
    UNKNOWN_SOURCE = "unknown_source"
    EXTERNAL_AUTHORITY = "external_authority"
    NO_PREVIEW = "no_preview"
    TRANSITION_IN_PROGRESS = "transition_in_progress"
    BAD_DURATION = "bad_duration"


class CloseCode(IntEnum):
    GOING_AWAY = 1001
    TOO_SLOW = 4000
    HEARTBEAT_TIMEOUT = 4001
    TOO_MANY_CONNECTIONS = 4029


# ------------------------------------------------------------ client messages


@dataclass(frozen=True, slots=True)
class Cut:
    source: str
    id: str | int | None = None


@dataclass(frozen=True, slots=True)
class Preview:
    source: str
    id: str | int | None = None


@dataclass(frozen=True, slots=True)
class Take:
    duration: float | None = None
    id: str | int | None = None


@dataclass(frozen=True, slots=True)
class Ping:
    id: str | int | None = None


@dataclass(frozen=True, slots=True)
class Pong:
    id: str | int | None = None


ClientMessage = Cut | Preview | Take | Ping | Pong

_FIELDS: dict[str, frozenset[str]] = {
    "cut": frozenset({"type", "source", "id"}),
    "preview": frozenset({"type", "source", "id"}),
    "take": frozenset({"type", "duration", "id"}),
    "ping": frozenset({"type", "id"}),
    "pong": frozenset({"type", "id"}),
}


def _no_constants(name: str) -> Any:
    raise MessageError(ErrorCode.BAD_JSON, f"{name} is not allowed")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise MessageError(ErrorCode.BAD_JSON, f"duplicate key {key!r}")
        out[key] = value
    return out


def _parse_id(obj: Mapping[str, Any]) -> str | int | None:
    if "id" not in obj:
        return None
    value = obj["id"]
    if isinstance(value, str) and len(value) <= MAX_ID_LENGTH:
        return value
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) <= _MAX_INT_ID:
        return value
    raise MessageError(ErrorCode.BAD_FIELD, f"id must be a string of at most {MAX_ID_LENGTH} characters or an integer")


def parse_client_message(data: str | bytes | bytearray) -> ClientMessage:
    """Validate and parse one client message; raises ``MessageError``."""
    if isinstance(data, str):
        if len(data) > MAX_MESSAGE_BYTES:
            raise MessageError(ErrorCode.TOO_LARGE, f"messages are limited to {MAX_MESSAGE_BYTES} bytes")
        size = len(data) if data.isascii() else len(data.encode("utf-8", "surrogatepass"))
        if size > MAX_MESSAGE_BYTES:
            raise MessageError(ErrorCode.TOO_LARGE, f"messages are limited to {MAX_MESSAGE_BYTES} bytes")
        text = data
    elif isinstance(data, bytes | bytearray):
        if len(data) > MAX_MESSAGE_BYTES:
            raise MessageError(ErrorCode.TOO_LARGE, f"messages are limited to {MAX_MESSAGE_BYTES} bytes")
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise MessageError(ErrorCode.BAD_JSON, "message is not valid UTF-8") from None
    else:
        raise MessageError(ErrorCode.BAD_JSON, "message must be text")
    try:
        obj = json.loads(text, parse_constant=_no_constants, object_pairs_hook=_no_duplicates)
    except MessageError:
        raise
    except (ValueError, RecursionError) as exc:
        raise MessageError(ErrorCode.BAD_JSON, f"invalid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise MessageError(ErrorCode.BAD_JSON, "message must be a JSON object")
    return parse_client_object(obj)


def parse_client_object(obj: Mapping[str, Any]) -> ClientMessage:
    """Validate the fields of one decoded client message; raises ``MessageError``.

    The WebSocket reaches it through :func:`parse_client_message`; the REST
    command route (whose body is decoded by the HTTP layer) through
    :func:`parse_command`, so both see the same rules and error codes."""
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise MessageError(ErrorCode.BAD_FIELD, "type must be a string")
    allowed = _FIELDS.get(kind)
    if allowed is None:
        raise MessageError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {kind[:32]!r}")
    extra = set(obj) - allowed
    if extra:
        raise MessageError(ErrorCode.BAD_FIELD, f"unexpected field(s) for {kind}: {sorted(extra)[:4]}")
    msg_id = _parse_id(obj)
    if kind in ("cut", "preview"):
        source = obj.get("source")
        if not isinstance(source, str) or not 0 < len(source) <= MAX_SOURCE_LENGTH:
            raise MessageError(
                ErrorCode.BAD_FIELD, f"source must be a string of 1..{MAX_SOURCE_LENGTH} characters"
            )
        return Cut(source, msg_id) if kind == "cut" else Preview(source, msg_id)
    if kind == "take":
        if "duration" not in obj:
            return Take(None, msg_id)
        d = obj["duration"]
        if isinstance(d, bool) or not isinstance(d, int | float) or not math.isfinite(d):
            raise MessageError(ErrorCode.BAD_FIELD, "duration must be a number of seconds")
        return Take(float(d), msg_id)
    if kind == "ping":
        return Ping(msg_id)
    return Pong(msg_id)


Command = Cut | Preview | Take


def parse_command(obj: Mapping[str, Any]) -> Command:
    """A decoded switching command (``cut``, ``preview``, ``take``), checked
    as :func:`parse_client_object` checks it; a heartbeat is no command
    outside a connection and is refused as an unknown type."""
    msg = parse_client_object(obj)
    if isinstance(msg, Ping | Pong):
        raise MessageError(ErrorCode.UNKNOWN_TYPE, "type must be cut, preview or take")
    return msg


# ------------------------------------------------------------ server messages


def _dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _sources_json(states: Mapping[str, SourceState]) -> dict[str, Any]:
    return {name: st.to_json() for name, st in states.items()}


def encode_snapshot(seq: int, production: str, states: Mapping[str, SourceState]) -> str:
    return _dumps({"type": "snapshot", "seq": seq, "production": production, "sources": _sources_json(states)})


def encode_tally(seq: int, states: Mapping[str, SourceState]) -> str:
    return _dumps({"type": "tally", "seq": seq, "sources": _sources_json(states)})


def encode_error(code: str, detail: str, msg_id: str | int | None = None) -> str:
    obj: dict[str, Any] = {"type": "error", "code": code, "detail": detail}
    if msg_id is not None:
        obj["id"] = msg_id
    return _dumps(obj)


def encode_pong(msg_id: str | int | None = None) -> str:
    return PONG if msg_id is None else _dumps({"type": "pong", "id": msg_id})


PING = '{"type":"ping"}'
PONG = '{"type":"pong"}'
