"""Readers: bounded queues the stream fills synchronously and consumers
drain from asyncio (MediaMTX's per-reader buffers in
``internal/stream/stream_reader.go``).

The stream calls :meth:`Reader.offer` / :meth:`TsReader.offer` for each
item (drop-newest when full, see :mod:`media.stream`), :meth:`Reader.mark`
for in-band markers, :meth:`Reader.resume_at_keyframe` when a layer must
restart, :meth:`_Queue.preload` with the GOP cache of a new reader and
:meth:`_Queue.end` when the stream ends; consumers use ``get``/``drain``/
``async for`` and ``close``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .types import Discontinuity, Frame, StreamClosed

__all__ = ["ReaderStats", "Reader", "TsReader"]

# One logger for the whole package: its records keep the name they had
# when the stream was one module.
log = logging.getLogger("media.stream")


@dataclass(frozen=True, slots=True)
class ReaderStats:
    id: int
    queued: int
    delivered: int
    drops: int


class _Queue:
    """Bounded queue with an asyncio wake-up; filled synchronously."""

    __slots__ = ("id", "maxsize", "drops", "delivered", "_buf", "_event", "_closed", "_callback", "_detach")

    def __init__(self, rid: int, maxsize: int, callback: Callable[[Any], None] | None, detach: Callable[[Any], None]) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self.id = rid
        self.maxsize = maxsize
        self.drops = 0
        self.delivered = 0
        self._buf: deque = deque()
        self._event = asyncio.Event()
        self._closed = False
        self._callback = callback
        self._detach = detach

    def _push(self, item: Any) -> None:
        self._buf.append(item)
        if not self._event.is_set():
            self._event.set()
        cb = self._callback
        if cb is not None:
            try:
                cb(self)
            except Exception:  # a consumer's bug must not reach the publisher
                log.exception("reader %d callback failed", self.id)

    def __len__(self) -> int:
        return len(self._buf)

    @property
    def closed(self) -> bool:
        return self._closed

    def drain(self) -> list:
        """Everything queued, without waiting."""
        buf = self._buf
        out = list(buf)
        buf.clear()
        self.delivered += len(out)
        return out

    async def get(self) -> Any:
        """Next item; raises StreamClosed once closed and empty."""
        buf = self._buf
        while not buf:
            if self._closed:
                raise StreamClosed("stream closed")
            self._event.clear()
            await self._event.wait()
        self.delivered += 1
        return buf.popleft()

    def __aiter__(self):
        return self

    async def __anext__(self) -> Any:
        try:
            return await self.get()
        except StreamClosed:
            raise StopAsyncIteration from None

    def close(self) -> None:
        """Unsubscribe; pending items can still be drained."""
        if not self._closed:
            self._closed = True
            self._event.set()
            self._detach(self)

    def end(self) -> None:
        """The stream ended (called by the stream): ``get`` raises
        StreamClosed once the queue is empty."""
        self._closed = True
        self._event.set()

    def preload(self, items: list) -> None:
        """Queue ``items`` (the stream's cache for a new reader) without the
        bound or the callback: they fitted the bound when the stream chose them."""
        self._buf.extend(items)
        if items:
            self._event.set()

    def stats(self) -> ReaderStats:
        return ReaderStats(self.id, len(self._buf), self.delivered, self.drops)


class Reader(_Queue):
    """A consumer of frames (WHEP viewer, QC tap, caption tap)."""

    __slots__ = ("layers", "kinds", "_live", "_overflowed")

    def __init__(
        self,
        rid: int,
        maxsize: int,
        layers: frozenset[str] | None,
        kinds: frozenset[str],
        callback: Callable[[Any], None] | None,
        detach: Callable[[Any], None],
    ) -> None:
        super().__init__(rid, maxsize, callback, detach)
        self.layers = layers
        self.kinds = kinds
        self._live: set[str] = set()  # video layers flowing (started at a keyframe)
        self._overflowed: set[str] = set()  # layers waiting for a keyframe after a drop

    def wants(self, frame: Frame) -> bool:
        if frame.kind not in self.kinds:
            return False
        return frame.kind != "video" or self.layers is None or frame.layer in self.layers

    def waiting_for_keyframe(self, layer: str) -> bool:
        return layer not in self._live

    def offer(self, frame: Frame) -> None:
        """A frame this reader wants (called by the stream)."""
        buf = self._buf
        if frame.kind == "video":
            layer = frame.layer
            if layer not in self._live:
                if not frame.keyframe:
                    if layer in self._overflowed:
                        self.drops += 1
                    return
                if len(buf) >= self.maxsize:
                    # Still a whole queue behind: jump to live at this keyframe.
                    self._flush_for_keyframe()
                    self._overflowed.add(layer)
                if layer in self._overflowed:
                    self._overflowed.discard(layer)
                    buf.append(Discontinuity("overflow", layer, frame.epoch))
                self._live.add(layer)
            elif len(buf) >= self.maxsize:
                self.drops += 1
                self._live.discard(layer)
                self._overflowed.add(layer)
                return
        elif len(buf) >= self.maxsize:
            self.drops += 1
            return
        self._push(frame)

    def _flush_for_keyframe(self) -> None:
        for item in self._buf:
            if isinstance(item, Frame):
                self.drops += 1
        self._overflowed.update(self._live)
        self._live.clear()
        self._buf.clear()

    def preload_gop(self, items: list, live: Iterable[str]) -> None:
        """Start with the GOP cache: ``items`` begin at the keyframes of the
        layers in ``live``, which therefore flow at once."""
        self._live.update(live)
        self.preload(items)

    def resume_at_keyframe(self, layer: str | None) -> None:
        """Video of ``layer`` (None: every layer) restarts at its next keyframe."""
        if layer is None:
            self._live.clear()
        else:
            self._live.discard(layer)

    def mark(self, marker: Discontinuity) -> None:
        # Markers bypass the bound: they are rare and tiny.
        if marker.layer is None or self.layers is None or marker.layer in self.layers:
            self._push(marker)

    def set_layers(self, layers: Iterable[str] | None) -> None:
        """Change the video layers; newly added layers start at their next
        keyframe (frames of removed layers still queued stay queued)."""
        self.layers = None if layers is None else frozenset(layers)
        if self.layers is not None:
            self._live &= self.layers
            self._overflowed &= self.layers

    def restart(self) -> None:
        """Drop what is queued and restart every video layer at its next
        keyframe (e.g. on a viewer's PLI when the cache is not wanted)."""
        self.drops += sum(1 for item in self._buf if isinstance(item, Frame))
        self._buf.clear()
        self._live.clear()


class TsReader(_Queue):
    """A consumer of the original TS bytes (SRT ``read:`` clients)."""

    __slots__ = ("dropped_bytes",)

    def __init__(self, rid: int, maxsize: int, callback, detach) -> None:
        super().__init__(rid, maxsize, callback, detach)
        self.dropped_bytes = 0

    def offer(self, data: bytes) -> None:
        """A chunk of the original TS (called by the stream)."""
        if len(self._buf) >= self.maxsize:
            self.drops += 1
            self.dropped_bytes += len(data)
            return
        self._push(data)
