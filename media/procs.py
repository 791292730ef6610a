"""Helper processes (egress workers, QC and caption taps): how they end."""

from __future__ import annotations

from typing import Any

__all__ = ["join_or_kill"]


def join_or_kill(proc: Any, timeout: float, grace: float = 2.0) -> None:
    """Blocking (run it off the event loop): wait ``timeout`` for a
    ``multiprocessing`` process asked to stop, then SIGTERM, then SIGKILL,
    each given ``grace`` seconds; returns once it is gone or ignored both."""
    proc.join(timeout)
    if proc.is_alive():
        proc.terminate()
        proc.join(grace)
    if proc.is_alive():
        proc.kill()
        proc.join(grace)
