"""Query-string values the record routes share (markers, notes, captions):
wall-clock times and bounded integers, each a 400 ``{error, detail}`` that
names the parameter when it is wrong."""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any

from .errors import BadRequest

__all__ = ["parse_time", "query_int"]


def parse_time(name: str, raw: Any) -> datetime:
    """ISO 8601 (RFC 3339) text or unix seconds (number or numeric text)."""
    if isinstance(raw, bool):
        raise BadRequest(f"{name} must be ISO 8601 or unix seconds")
    if isinstance(raw, (int, float)) or (isinstance(raw, str) and raw.replace(".", "", 1).isdigit()):
        value = float(raw)
        if not math.isfinite(value) or not 0 <= value < 253402300800:  # year 10000
            raise BadRequest(f"{name} is out of range")
        return datetime.fromtimestamp(value, timezone.utc)
    if not isinstance(raw, str) or len(raw) > 64:
        raise BadRequest(f"{name} must be ISO 8601 or unix seconds")
    try:
        # An unencoded "+02:00" in a query string arrives as " 02:00".
        d = datetime.fromisoformat(raw.replace("z", "Z").replace(" ", "+"))
    except ValueError:
        raise BadRequest(f"{name} must be ISO 8601 (e.g. 2026-05-01T18:30:00Z) or unix seconds") from None
    return d if d.tzinfo is not None else d.replace(tzinfo=timezone.utc)


def query_int(name: str, raw: str | None, default: int | None, lo: int, hi: int) -> int | None:
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be an integer") from None
    if not lo <= value <= hi:
        raise BadRequest(f"{name} must be between {lo} and {hi}")
    return value
