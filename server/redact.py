"""Keeping credentials out of responses, log lines and audit rows.

Two rules (issue 9, items 1 and 4):

* configuration secrets are write-only: a stored adapter password is
  answered as ``"password_set": true``, never as its value
  (:func:`redact_secrets`); a client that sends the configuration back
  unchanged keeps the stored secret (:func:`keep_secrets`);
* no log line or audit row carries a bearer credential: signed tokens
  (JWTs start ``eyJ``, the base64 of ``{"``), the ``s=`` key of an SRT
  stream ID (libsrt docs/features/access-control.md, standard keys: ``s``
  is the session ID — ours carries a link token), ``token=`` query
  parameters, SRT passphrases and the password of a
  ``scheme://user:password@host`` URL (:func:`redact_text`).
"""

from __future__ import annotations

import re
from typing import Any

#: Setting names that hold a credential, now and later (compared lower-case;
#: ``*_password``, ``*_secret``, ``*_token``, ``*_key`` count too). Only a
#: string (or null) value is a credential: a mapping under such a name is
#: data (a tally source may be called "token").
SECRET_KEYS = frozenset({"password", "passphrase", "secret", "token", "credential", "api_key", "apikey",
                         "authorization"})
_SECRET_SUFFIXES = ("_password", "_passphrase", "_secret", "_token", "_key", "_credential")
MARK = "<redacted>"

_JWT = re.compile(r"eyJ[A-Za-z0-9_\-.]*")
# ``s=`` inside a ``#!::`` stream ID: preceded by ``::`` or ``,``.
_STREAMID_TOKEN = re.compile(r"(?<=[:,])s=[^,\s'\"&]+")
_QUERY_SECRET = re.compile(r"(?i)\b(passphrase|token|password|credential)=[^&\s'\",]+")
_URL_USERINFO = re.compile(r"(://[^/\s:@'\"]+:)[^@\s/'\"]+@")
_JSON_SECRET = re.compile(r"(?i)([\"'](?:passphrase|password|token|credential|secret)[\"']\s*:\s*[\"'])[^\"']*")


def is_secret_key(key: str) -> bool:
    k = key.lower()
    return k in SECRET_KEYS or k.endswith(_SECRET_SUFFIXES)


def redact_secrets(obj: Any) -> Any:
    """A copy of a JSON value with every credential-like key replaced by
    ``<key>_set: true`` (``false`` when the stored value is empty)."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            if isinstance(k, str) and is_secret_key(k) and (v is None or isinstance(v, str)):
                out[f"{k}_set"] = v not in (None, "")
            elif isinstance(k, str) and k.endswith("_set") and is_secret_key(k[:-4]):
                continue  # a stored marker never shadows the real answer
            else:
                out[k] = redact_secrets(v)
        return out
    if isinstance(obj, list):
        return [redact_secrets(v) for v in obj]
    return obj


def keep_secrets(new: Any, old: Any) -> Any:
    """``new`` as a client sent it back after reading a redacted copy: where
    it says ``<key>_set: true`` without ``<key>``, the stored value at the
    same place in ``old`` is kept; the ``_set`` markers are dropped."""
    if isinstance(new, dict):
        olds = old if isinstance(old, dict) else {}
        out: dict[str, Any] = {}
        for k, v in new.items():
            if isinstance(k, str) and k.endswith("_set") and is_secret_key(k[:-4]):
                base = k[:-4]
                if v is True and base not in new and base in olds:
                    out[base] = olds[base]
                continue
            out[k] = keep_secrets(v, olds.get(k))
        return out
    if isinstance(new, list):
        # A list element (an adapter) keeps the secret of the stored element
        # that talks to the same peer, never of another one: a password must
        # not follow a reordered list to a different server.
        olds_l = old if isinstance(old, list) else []
        return [keep_secrets(v, next((o for o in olds_l if _identity(o) == _identity(v)), None))
                for v in new]
    return new


def _identity(item: Any) -> Any:
    if not isinstance(item, dict):
        return None
    return tuple(str(item.get(k)) for k in ("type", "url", "host", "port"))


def redact_text(text: str) -> str:
    """``text`` with tokens, stream-ID session tokens and passphrases masked."""
    if "eyJ" in text:
        text = _JWT.sub(MARK, text)
    if "s=" in text:
        text = _STREAMID_TOKEN.sub("s=" + MARK, text)
    if "=" in text:
        text = _QUERY_SECRET.sub(lambda m: f"{m.group(1)}={MARK}", text)
    if ":" in text:
        text = _JSON_SECRET.sub(lambda m: m.group(1) + MARK, text)
        if "@" in text:  # ws://user:password@host (RFC 3986 §3.2.1: deprecated, still seen)
            text = _URL_USERINFO.sub(lambda m: m.group(1) + MARK + "@", text)
    return text
