"""SRT Stream ID parsing (sans-I/O).

A caller sends one Stream ID string during the SRT handshake (``SRTO_STREAMID``,
at most 512 bytes, UTF-8 — SRT access-control guidelines, "Character
Encoding" and "Motivation"). ReturnFeed accepts two syntaxes and turns both
into one :class:`StreamIdRequest`.

1. Colon form (the MediaMTX convention encoders already use)::

       ACTION ":" PATH [ ":" USER ":" PASSWORD ]
       ACTION = "publish" | "read"
       PATH   = STREAM [ "/" LAYER ]

   e.g. ``publish:cam1``, ``publish:cam1/low``, ``read:cam1:alice:s3cret``.
   In USER and PASSWORD a backslash escapes the next character (``\\:`` is a
   literal colon, ``\\\\`` a backslash).

2. Access-control form (SRT access-control guidelines, "General Syntax" and
   "Standard Keys")::

       "#!::" KV *( "," KV )          flat: comma-separated key=value pairs
       "#!:{" BLOCK "}"               nested: a brace block
       BLOCK = ITEM *( "," ITEM )
       ITEM  = KV | "{" BLOCK "}"     nested blocks are merged into one key set
       KV    = KEY "=" VALUE

   Standard keys used: ``r`` resource (= PATH above, so ``r=cam1/low`` names
   a layer), ``m`` mode (``publish``; ``request`` = read, the default;
   ``bidirectional`` is refused), ``s`` session ID (our token), ``u`` user,
   ``h`` host, ``t`` type (only ``stream``, the default, is served). The
   guidelines reserve single-letter keys and recommend prefixed custom keys,
   so the layer key is ``returnfeed_layer``; ``layer`` is accepted as a short
   alias. Unknown keys are ignored (the guidelines leave that to the
   application). A key given twice is an error. The guidelines define no
   escaping; ReturnFeed lets a backslash escape the next character in a
   VALUE (``\\,`` ``\\=`` ``\\{`` ``\\}`` ``\\\\``), and the first unescaped
   ``=`` of an item separates key from value (so base64 padding in a value
   works unescaped).

Names (STREAM, LAYER) are ``[A-Za-z0-9][A-Za-z0-9_.-]*``, at most 64 (stream)
and 32 (layer) characters; a ``/`` therefore always separates the layer.

Anything else raises :class:`StreamIdError` carrying a human-readable reason
and the SRT reject code that fits (access_control.h: 1400 bad request, 1405
bad mode, 1415 unsupported media type). Nothing else is ever raised, for any
input (fuzzed in tests).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes
from typing import Final, Literal

from media.errors import RemoteMediaError

__all__ = [
    "MAX_STREAM_ID_BYTES",
    "StreamIdError",
    "StreamIdRequest",
    "is_valid_layer_name",
    "is_valid_stream_name",
    "parse_stream_id",
]

#: SRT access-control guidelines: "a string of maximum 512 characters".
MAX_STREAM_ID_BYTES: Final = 512
MAX_STREAM_NAME: Final = 64
MAX_LAYER_NAME: Final = 32
_MAX_NESTING: Final = 8

# access_control.h codes (kept literal here: this module does no I/O and
# does not depend on the ctypes binding).
REJ_BAD_REQUEST: Final = 1400
REJ_BAD_MODE: Final = 1405
REJ_NOTSUP_MEDIA: Final = 1415

_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_KEY_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_CONTROL_RE: Final = re.compile(r"[\x00-\x1f\x7f]")

Action = Literal["publish", "read"]


class StreamIdError(RemoteMediaError):
    """A caller's Stream ID cannot be used.

    ``reason`` says why in words; ``reject_code`` is the SRT reject code
    (``SRT_REJX_*``, access_control.h) a listener should answer with.
    """

    def __init__(self, reason: str, reject_code: int = REJ_BAD_REQUEST) -> None:
        super().__init__(reason)
        self.reason = reason
        self.reject_code = reject_code


def is_valid_stream_name(name: str) -> bool:
    return len(name) <= MAX_STREAM_NAME and _NAME_RE.fullmatch(name) is not None


def is_valid_layer_name(name: str) -> bool:
    return len(name) <= MAX_LAYER_NAME and _NAME_RE.fullmatch(name) is not None


@dataclass(frozen=True, slots=True)
class StreamIdRequest:
    """What a caller asks for: publish into / read from ``stream`` (``layer``)."""

    stream: str
    action: Action
    token: str | None = None
    user: str | None = None
    password: str | None = None
    layer: str | None = None
    host: str | None = None

    def __post_init__(self) -> None:
        if self.action not in ("publish", "read"):
            raise ValueError(f"action must be 'publish' or 'read', not {self.action!r}")
        if not is_valid_stream_name(self.stream):
            raise ValueError(f"invalid stream name {self.stream!r}")
        if self.layer is not None and not is_valid_layer_name(self.layer):
            raise ValueError(f"invalid layer name {self.layer!r}")

    @classmethod
    def parse(cls, raw: str | bytes) -> StreamIdRequest:
        return parse_stream_id(raw)

    @property
    def path(self) -> str:
        return self.stream if self.layer is None else f"{self.stream}/{self.layer}"

    def serialize(self) -> str:
        """A Stream ID that parses back to this request.

        Uses the colon form when it can carry everything (no token, no host,
        user and password both or neither), else the access-control form,
        which has no key for a password: a request with a password and a
        token (or host, or without a user) cannot be written and raises
        ``ValueError``.
        """
        simple = self.token is None and self.host is None and (self.user is None) == (self.password is None)
        if simple:
            text = f"{self.action}:{self.path}"
            if self.user is not None and self.password is not None:
                text += f":{_escape(self.user, ':')}:{_escape(self.password, ':')}"
        else:
            if self.password is not None:
                raise ValueError("the access-control form has no key for a password")
            items = [f"r={self.path}", "m=publish" if self.action == "publish" else "m=request"]
            if self.token is not None:
                items.append(f"s={_escape(self.token, ',')}")
            if self.user is not None:
                items.append(f"u={_escape(self.user, ',')}")
            if self.host is not None:
                items.append(f"h={_escape(self.host, ',')}")
            text = "#!::" + ",".join(items)
        if len(text.encode("utf-8")) > MAX_STREAM_ID_BYTES:
            raise ValueError("serialized stream ID exceeds 512 bytes")
        return text

    def __str__(self) -> str:
        return self.serialize()


def _escape(value: str, specials: str) -> str:
    out = []
    for ch in value:
        if ch == "\\" or ch in specials:
            out.append("\\")
        out.append(ch)
    return "".join(out)


def parse_stream_id(raw: str | bytes) -> StreamIdRequest:
    """Parse a caller's Stream ID; raises only :class:`StreamIdError`."""
    if isinstance(raw, (bytes, bytearray, memoryview)):
        data = bytes(raw)
        if len(data) > MAX_STREAM_ID_BYTES:
            raise StreamIdError(f"stream ID is {len(data)} bytes; the SRT limit is {MAX_STREAM_ID_BYTES}")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise StreamIdError("stream ID is not valid UTF-8") from None
    elif isinstance(raw, str):
        text = raw
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError:
            raise StreamIdError("stream ID is not valid UTF-8 (lone surrogate)") from None
        if size > MAX_STREAM_ID_BYTES:
            raise StreamIdError(f"stream ID is {size} bytes; the SRT limit is {MAX_STREAM_ID_BYTES}")
    else:
        raise StreamIdError(f"stream ID must be str or bytes, not {type(raw).__name__}")
    if not text:
        raise StreamIdError("empty stream ID; expected 'publish:NAME', 'read:NAME' or '#!::r=NAME,m=publish'")
    if text[:3].upper() == "%23":
        # A '#' in a URL starts its fragment, so an access-control stream ID
        # in an srt:// URL has to be written %23!::…; GStreamer and FFmpeg ≥ 6
        # decode it, FFmpeg 5.1 and srt-live-transmit send it as written.
        # Decode it here (RFC 3986 §2.1) so one URL serves all of them.
        text = _percent_decode(text)
    if _CONTROL_RE.search(text):
        raise StreamIdError("stream ID contains control characters")
    if text.startswith("#!"):
        return _parse_access_control(text)
    return _parse_colon(text)


_PCT_RE: Final = re.compile(r"%([0-9A-Fa-f]{2})")


def _percent_decode(text: str) -> str:
    """Strict percent-decoding: every ``%`` must start a valid ``%XX`` and the
    result must be UTF-8."""
    if text.count("%") != len(_PCT_RE.findall(text)):
        raise StreamIdError("stream ID has a '%' that does not start a %XX escape")
    try:
        return unquote_to_bytes(text).decode("utf-8")
    except UnicodeDecodeError:
        raise StreamIdError("percent-encoded stream ID is not valid UTF-8") from None


# -- colon form -----------------------------------------------------------


def _split_unescaped(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside backslash escapes, then unescape each part."""
    parts: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            if i + 1 >= len(text):
                raise StreamIdError("stream ID ends with a lone backslash")
            cur.append(text[i + 1])
            i += 2
            continue
        if ch == sep:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return parts


def _parse_path(path: str, where: str) -> tuple[str, str | None]:
    if not path:
        raise StreamIdError(f"{where}: missing stream name")
    stream, slash, layer = path.partition("/")
    if not is_valid_stream_name(stream):
        raise StreamIdError(
            f"{where}: invalid stream name {stream[:70]!r} (letters, digits, '_', '.', '-'; "
            f"at most {MAX_STREAM_NAME}; must start with a letter or digit)"
        )
    if not slash:
        return stream, None
    if not is_valid_layer_name(layer):
        raise StreamIdError(
            f"{where}: invalid layer name {layer[:40]!r} (letters, digits, '_', '.', '-'; at most {MAX_LAYER_NAME})"
        )
    return stream, layer


def _parse_colon(text: str) -> StreamIdRequest:
    action, colon, rest = text.partition(":")
    if not colon:
        raise StreamIdError(
            f"unrecognised stream ID {text[:60]!r}; expected 'publish:NAME', 'read:NAME' or '#!::r=NAME,m=publish'"
        )
    if action not in ("publish", "read"):
        raise StreamIdError(f"unknown action {action[:20]!r}; expected 'publish' or 'read'", REJ_BAD_MODE)
    path, colon, creds = rest.partition(":")
    stream, layer = _parse_path(path, "stream ID")
    user = password = None
    if colon:
        fields = _split_unescaped(creds, ":")
        if len(fields) != 2:
            raise StreamIdError("credentials must be 'USER:PASSWORD' after the stream name")
        user, password = fields
        if not user or not password:
            raise StreamIdError("empty user name or password in stream ID")
    return StreamIdRequest(stream=stream, action=action, user=user, password=password, layer=layer)  # type: ignore[arg-type]


# -- access-control form ----------------------------------------------------


class _AcParser:
    """Recursive-descent parser for the ``#!:`` content (flat or nested)."""

    def __init__(self, text: str, pos: int, nested: bool) -> None:
        self.text = text
        self.pos = pos
        self.nested = nested
        self.pairs: dict[str, str] = {}

    def error(self, reason: str) -> StreamIdError:
        return StreamIdError(f"access-control stream ID, offset {self.pos}: {reason}")

    def parse_block(self, depth: int) -> None:
        """Parse ITEM *("," ITEM) up to the end (flat) or the closing brace."""
        if depth > _MAX_NESTING:
            raise self.error(f"blocks nested deeper than {_MAX_NESTING}")
        while True:
            if self.nested and self.pos < len(self.text) and self.text[self.pos] == "{":
                self.pos += 1
                self.parse_block(depth + 1)
                if self.pos >= len(self.text) or self.text[self.pos] != "}":
                    raise self.error("missing '}'")
                self.pos += 1
            else:
                self.parse_pair()
            if self.pos >= len(self.text):
                return
            ch = self.text[self.pos]
            if ch == ",":
                self.pos += 1
                continue
            if ch == "}" and self.nested:
                return
            raise self.error(f"unexpected {ch!r}")

    def parse_pair(self) -> None:
        start = self.pos
        text = self.text
        while self.pos < len(text) and text[self.pos] not in "=,{}":
            self.pos += 1
        key = text[start : self.pos]
        if self.pos >= len(text) or text[self.pos] != "=":
            if not key:
                raise self.error("empty item (expected key=value)")
            raise self.error(f"item {key[:30]!r} has no '='")
        if not _KEY_RE.fullmatch(key):
            raise self.error(f"invalid key {key[:30]!r}")
        self.pos += 1
        value: list[str] = []
        stops = ",{}" if self.nested else ","
        while self.pos < len(text):
            ch = text[self.pos]
            if ch == "\\":
                if self.pos + 1 >= len(text):
                    raise self.error("value ends with a lone backslash")
                value.append(text[self.pos + 1])
                self.pos += 2
                continue
            if ch in stops:
                break
            value.append(ch)
            self.pos += 1
        if key in self.pairs:
            raise self.error(f"key {key!r} given twice")
        self.pairs[key] = "".join(value)


def _parse_access_control(text: str) -> StreamIdRequest:
    # Guidelines, "General Syntax": "#!" then the syntax identifier ":" then
    # the content, starting with ":" (flat pairs) or "{" (nested block).
    if text.startswith("#!::"):
        parser = _AcParser(text, 4, nested=False)
        parser.parse_block(0)
    elif text.startswith("#!:{"):
        parser = _AcParser(text, 4, nested=True)
        parser.parse_block(1)
        if parser.pos >= len(text) or text[parser.pos] != "}":
            raise parser.error("missing '}'")
        parser.pos += 1
        if parser.pos != len(text):
            raise parser.error("text after the closing '}'")
    else:
        raise StreamIdError("unsupported '#!' syntax; expected '#!::key=value,...' or '#!:{key=value,...}'")
    kv = parser.pairs

    resource = kv.get("r")
    if resource is None:
        raise StreamIdError("access-control stream ID has no 'r' (resource) key")
    stream, layer = _parse_path(resource, "r")

    layer_keys = [kv[k] for k in ("returnfeed_layer", "layer") if k in kv]
    for extra in layer_keys:
        if not is_valid_layer_name(extra):
            raise StreamIdError(f"invalid layer name {extra[:40]!r}")
        if layer is not None and extra != layer:
            raise StreamIdError(f"conflicting layers {layer!r} and {extra!r}")
        layer = extra

    mode = kv.get("m", "request")
    if mode == "publish":
        action: Action = "publish"
    elif mode == "request":
        action = "read"
    elif mode == "bidirectional":
        raise StreamIdError("mode 'bidirectional' is not supported; use m=publish or m=request", REJ_BAD_MODE)
    else:
        raise StreamIdError(f"unknown mode m={mode[:30]!r}; expected publish or request", REJ_BAD_MODE)

    kind = kv.get("t", "stream")
    if kind != "stream":
        raise StreamIdError(f"type t={kind[:30]!r} is not supported; only t=stream", REJ_NOTSUP_MEDIA)

    def optional(key: str, what: str) -> str | None:
        value = kv.get(key)
        if value is not None and not value:
            raise StreamIdError(f"empty {what} ({key}=)")
        return value

    return StreamIdRequest(
        stream=stream,
        action=action,
        token=optional("s", "session token"),
        user=optional("u", "user name"),
        password=None,
        layer=layer,
        host=optional("h", "host name"),
    )
