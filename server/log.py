"""Structured logging: one line per event.

Call sites log an event name and fields with :func:`event` (defined in
media/log.py so that media, which must not import server, logs the same
way)::

    event(log, logging.INFO, "srt.accept", stream="cam1", peer=addr)

The JSON format writes ``{"ts", "level", "logger", "event", ...fields}``;
the text format writes ``ts level logger event k=v``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from media.log import event

from .redact import redact_text

__all__ = ["event", "setup_logging"]


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for k, v in fields.items():
                out.setdefault(k, v)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        # Issue 9 item 4: no token or passphrase reaches a log line, whatever
        # the call site put in it.
        return redact_text(json.dumps(out, default=str, ensure_ascii=False))


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%H:%M:%S", time.localtime(record.created))
        parts = [f"{ts}.{int(record.msecs):03d}", f"{record.levelname:<7}", record.name, record.getMessage()]
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            # A value a caller chose (an SRT stream ID) must not break the
            # line or forge a field: quote it when it is not plain.
            parts.extend(f"{k}={v!r}" if isinstance(v, str) and (" " in v or not v.isprintable()) else f"{k}={v}"
                         for k, v in fields.items())
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return redact_text(line)


def setup_logging(level: str = "INFO", fmt: str = "json", stream: Any = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    # aiohttp's access log duplicates our request metrics; keep it at WARNING.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
