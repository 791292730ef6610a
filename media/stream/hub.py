"""The registry of live streams by name."""

from __future__ import annotations

from .stream import Stream
from .types import StreamState

__all__ = ["StreamHub"]


class StreamHub:
    """Registry of streams by name."""

    def __init__(self, *, grace: float = 10.0, gop_cache_bytes: int = 16 << 20, bitrate_window: float = 2.0) -> None:
        self._streams: dict[str, Stream] = {}
        self._grace = grace
        self._gop_cache_bytes = gop_cache_bytes
        self._window = bitrate_window

    def get(self, name: str) -> Stream | None:
        return self._streams.get(name)

    def get_or_create(self, name: str) -> Stream:
        stream = self._streams.get(name)
        if stream is None or stream.state == StreamState.CLOSED:
            stream = Stream(name, grace=self._grace, gop_cache_bytes=self._gop_cache_bytes, bitrate_window=self._window)
            self._streams[name] = stream
        return stream

    def __contains__(self, name: str) -> bool:
        return name in self._streams

    def __iter__(self):
        return iter(list(self._streams.values()))

    def __len__(self) -> int:
        return len(self._streams)

    def expire(self, now: float) -> list[str]:
        """Close and forget streams past their grace period; returns their
        names. Call periodically (e.g. once a second)."""
        gone = [name for name, s in self._streams.items() if s.expire(now)]
        for name in gone:
            del self._streams[name]
        return gone

    def remove(self, name: str) -> None:
        stream = self._streams.pop(name, None)
        if stream is not None:
            stream.close()
