"""One SRT ``read:`` client: the stream's original TS packets, passthrough.

::

    Publisher.publish_ts ─► TsReader (bounded, drops newest whole chunks,
                            media/stream.py) ─callback─► drain ─► conn.send
    stream closed ─► reader closed ─► conn.close()
    conn.on_close(reason) ─► reader closed ─► on_closed(reason)

A chunk libsrt will not take (its send buffer full: the reader's link is
slower than the stream) is dropped and counted in :attr:`SrtReadSession.drops`;
a new reader starts at the stream's TS cache (PSI + the last keyframe).
"""

from __future__ import annotations

from collections.abc import Callable

from media.srt.listener import SrtConnection
from media.stream import Stream, TsReader

__all__ = ["SrtReadSession"]


class SrtReadSession:
    """Subscribes ``conn`` to ``stream``'s TS bytes until either ends."""

    def __init__(
        self,
        conn: SrtConnection,
        stream: Stream,
        *,
        maxsize: int = 512,
        on_closed: Callable[[str], None] | None = None,
    ) -> None:
        self.conn = conn
        self.stream = stream
        self.drops = 0
        self._on_closed = on_closed
        self.reader: TsReader = stream.subscribe_ts(maxsize, callback=self._pump)
        conn.on_close = self.on_close

    def _pump(self, reader: TsReader) -> None:
        if reader.closed:
            self.conn.close()
            return
        for chunk in reader.drain():
            if not self.conn.send(chunk):
                self.drops += 1

    def on_close(self, reason: str) -> None:
        self.reader.close()
        if self._on_closed is not None:
            self._on_closed(reason)
