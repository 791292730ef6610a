"""Structured log events for the media package.

One call style for the whole project: ``event(log, level, "name", **fields)``
puts the event name in the message and the fields in the record's
``fields`` attribute, which the server's formatters (server/log.py) write
as JSON keys or ``key=value`` pairs. It lives here because media must not
import server; server/log.py re-exports it.
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["event"]


def event(logger: logging.Logger, level: int, name: str, /, *, exc_info: bool = False, **fields: Any) -> None:
    """Log ``name`` with structured ``fields`` (``exc_info``: attach the
    exception being handled, as ``logger.exception`` does)."""
    if logger.isEnabledFor(level):
        logger.log(level, name, exc_info=exc_info, extra={"fields": fields})
