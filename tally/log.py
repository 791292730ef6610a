"""Structured log events for the tally package: ``event(log, level, name, **fields)``.

The same call style as the server's (``server/log.py``), which tally may not
import (imports point downward): the fields ride in ``extra["fields"]``, where
the server's JSON formatter writes them as top-level keys and its text
formatter as ``k=v``. No I/O of its own, so sans-I/O modules may use it.
"""

from __future__ import annotations

import logging
from typing import Any


def event(logger: logging.Logger, level: int, name: str, /, **fields: Any) -> None:
    """Log ``name`` with structured ``fields``."""
    logger.log(level, name, extra={"fields": fields})
