"""One live feed: its publishers, tracks, readers and GOP cache.

Publishers hand units in through the :class:`~media.stream.publisher.PublishTarget`
methods (``accept_*``); the stream stamps each into a :class:`Frame`, updates
its :class:`Track`, keeps the GOP cache and offers the frame to every reader.
It talks to publishers and readers only through their public methods. The
whole model is described in :mod:`media.stream`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from media.errors import LocalMediaError
from media.unit import Unit

from .publisher import Publisher, PublisherInfo
from .reader import Reader, ReaderStats, TsReader
from .track import Track, TrackInfo
from .types import Discontinuity, Frame, SourceInfo, StreamBusy, StreamClosed, StreamState, layer_rank

__all__ = ["StreamStats", "Stream"]


@dataclass(frozen=True, slots=True)
class StreamStats:
    name: str
    state: StreamState
    epoch: int
    publishers: tuple[PublisherInfo, ...]
    tracks: tuple[TrackInfo, ...]
    layers: tuple[str, ...]
    readers: int
    ts_readers: int
    frames_in: int
    bytes_in: int
    ts_bytes_in: int
    drops_total: int
    reader_stats: tuple[ReaderStats, ...]


class Stream:
    """One live feed. Create through StreamHub.get_or_create()."""

    def __init__(
        self,
        name: str,
        *,
        grace: float = 10.0,
        gop_cache_bytes: int = 16 << 20,
        bitrate_window: float = 2.0,
    ) -> None:
        self.name = name
        self.grace = grace
        self.state = StreamState.IDLE
        self.epoch = 0
        self.detached_at: float | None = None
        self.tracks: dict[str, Track] = {}
        self._publishers: dict[str | None, Publisher] = {}
        self._audio_owner: Publisher | None = None
        self._ts_owner: Publisher | None = None
        self._ts_cache: list[bytes] = []  # PAT+PMT, then TS since the last keyframe start
        self._ts_cache_bytes = 0
        self._readers: list[Reader] = []
        self._ts_readers: list[TsReader] = []
        self._next_id = 1
        self._seq = 0
        self._window = bitrate_window
        self._cache: deque[Frame] = deque()
        self._cache_bytes = 0
        self._cache_limit = gop_cache_bytes
        self._kf_seq: dict[str, int] = {}  # layer → seq of its last keyframe in the cache
        self._frames_in = 0
        self._bytes_in = 0
        self._ts_bytes_in = 0
        self._drops_closed = 0  # drops of readers already gone

    # -- publisher lifecycle

    def attach_publisher(
        self,
        info: SourceInfo,
        *,
        layer: str | None = None,
        takeover: bool = False,
        now: float | None = None,
    ) -> Publisher:
        """Attach a source. Raises StreamBusy when it conflicts with an
        attached one (same layer, or either is a whole-stream publisher)
        unless ``takeover``; raises StreamClosed on a closed stream."""
        if self.state == StreamState.CLOSED:
            raise StreamClosed(f"stream {self.name!r} is closed")
        now = time.monotonic() if now is None else now
        if layer is None:
            conflicts = list(self._publishers.values())
        else:
            conflicts = [p for key, p in self._publishers.items() if key is None or key == layer]
        if conflicts and not takeover:
            held = ", ".join(p.layer or "all layers" for p in conflicts)
            raise StreamBusy(f"stream {self.name!r} already has a publisher ({held}); use takeover to replace it")
        for old in conflicts:
            self._evict(old)
        resumed = self.state == StreamState.RECONNECTING
        self.epoch += 1
        pub = Publisher(self, info, layer, self.epoch, now)
        self._publishers[layer] = pub
        self.state = StreamState.LIVE
        self.detached_at = None
        if conflicts or resumed:
            reason = "takeover" if conflicts else "reconnect"
            marker_layer = layer if layer is not None and len(self._publishers) > 1 else None
            self._restart_readers(Discontinuity(reason, marker_layer, self.epoch), marker_layer)
        return pub

    def detach_publisher(self, publisher: Publisher | None = None, now: float | None = None) -> None:
        """Detach ``publisher`` (default: the only one). When none remain the
        stream enters 'reconnecting' for the grace period."""
        now = time.monotonic() if now is None else now
        if publisher is None:
            if len(self._publishers) != 1:
                raise LocalMediaError("detach_publisher() needs the publisher when several are attached")
            publisher = next(iter(self._publishers.values()))
        if not publisher.active or self._publishers.get(publisher.layer) is not publisher:
            return
        self._evict(publisher)
        if not self._publishers:
            self.state = StreamState.RECONNECTING
            self.detached_at = now
            self._clear_cache()
        elif publisher.layer is not None:
            self._restart_readers(Discontinuity("detach", publisher.layer, self.epoch), publisher.layer)

    def _evict(self, pub: Publisher) -> None:
        pub.active = False
        if self._publishers.get(pub.layer) is pub:
            del self._publishers[pub.layer]
        if self._audio_owner is pub:
            self._audio_owner = None
        if self._ts_owner is pub:
            self._ts_owner = None
            self._ts_cache, self._ts_cache_bytes = [], 0
        for layer in pub.mapped_layers() | ({pub.layer} if pub.layer else set()):
            self._drop_layer_cache(layer)

    def expire(self, now: float) -> bool:
        """Close the stream when it has been reconnecting longer than the
        grace period. Returns True when the stream is closed."""
        if self.state == StreamState.RECONNECTING and self.detached_at is not None and now - self.detached_at >= self.grace:
            self.close()
        return self.state == StreamState.CLOSED

    def close(self) -> None:
        """End the stream now: publishers evicted, readers ended."""
        for pub in list(self._publishers.values()):
            self._evict(pub)
        self.state = StreamState.CLOSED
        self._clear_cache()
        for r in self._readers:
            self._drops_closed += r.drops
            r.end()
        for t in self._ts_readers:
            self._drops_closed += t.drops
            t.end()
        self._readers = []
        self._ts_readers = []

    @property
    def publishers(self) -> list[Publisher]:
        return list(self._publishers.values())

    @property
    def live(self) -> bool:
        return self.state == StreamState.LIVE

    # -- readers

    def subscribe(
        self,
        maxsize: int = 512,
        *,
        layers: Iterable[str] | None = None,
        kinds: Iterable[str] = ("video", "audio"),
        callback: Callable[[Reader], None] | None = None,
        from_cache: bool = True,
    ) -> Reader:
        """A new frame reader. ``layers`` None = every video layer.
        ``callback(reader)`` runs synchronously after each push (keep it
        cheap: schedule work, don't do it)."""
        if self.state == StreamState.CLOSED:
            raise StreamClosed(f"stream {self.name!r} is closed")
        reader = Reader(
            self._new_id(),
            maxsize,
            None if layers is None else frozenset(layers),
            frozenset(kinds),
            callback,
            self._remove_reader,
        )
        if from_cache and "video" in reader.kinds:
            self._replay_cache(reader)
        self._readers.append(reader)
        return reader

    def _replay_cache(self, reader: Reader) -> None:
        starts = {
            layer: seq
            for layer, seq in self._kf_seq.items()
            if reader.layers is None or layer in reader.layers
        }
        if not starts:
            return
        start = min(starts.values())
        items = [
            f
            for f in self._cache
            if f.seq >= start
            and reader.wants(f)
            and (f.kind != "video" or (f.layer in starts and f.seq >= starts[f.layer]))
        ]
        if len(items) > reader.maxsize:
            return  # the GOP does not fit: wait for the next keyframe instead
        reader.preload_gop(items, starts)

    def subscribe_ts(self, maxsize: int = 256, *, callback: Callable[[TsReader], None] | None = None) -> TsReader:
        """A reader of the original TS bytes (chunks as published)."""
        if self.state == StreamState.CLOSED:
            raise StreamClosed(f"stream {self.name!r} is closed")
        reader = TsReader(self._new_id(), maxsize, callback, self._remove_reader)
        cached = self._ts_cache
        if cached and len(cached) <= maxsize:
            # Start at the last keyframe, after the PAT/PMT, not mid-GOP.
            reader.preload(cached)
        self._ts_readers.append(reader)
        return reader

    def _new_id(self) -> int:
        rid = self._next_id
        self._next_id += 1
        return rid

    def _remove_reader(self, reader: Reader | TsReader) -> None:
        self._drops_closed += reader.drops
        if isinstance(reader, Reader):
            if reader in self._readers:
                self._readers.remove(reader)
        elif reader in self._ts_readers:
            self._ts_readers.remove(reader)

    @property
    def readers(self) -> list[Reader]:
        return list(self._readers)

    @property
    def ts_readers(self) -> list[TsReader]:
        return list(self._ts_readers)

    # -- layers

    def _layer_names(self) -> list[str]:
        names = [t.layer for t in self.tracks.values() if t.kind == "video" and t.layer is not None]
        return sorted(names, key=layer_rank)

    @property
    def layers(self) -> dict[str, Track]:
        """Layer name → its video track, largest first."""
        return {t.layer: t for t in sorted(self.tracks.values(), key=lambda t: layer_rank(t.layer or "")) if t.kind == "video" and t.layer}

    # -- publishing

    def publish(self, unit: Unit, *, layer: str | None = None) -> None:
        """Publish through the only attached publisher."""
        if len(self._publishers) != 1:
            raise LocalMediaError(f"stream {self.name!r} has {len(self._publishers)} publishers; use Publisher.publish")
        next(iter(self._publishers.values())).publish(unit, layer=layer)

    def publish_ts(self, data: bytes) -> None:
        if len(self._publishers) != 1:
            raise LocalMediaError(f"stream {self.name!r} has {len(self._publishers)} publishers; use Publisher.publish_ts")
        next(iter(self._publishers.values())).publish_ts(data)

    def _track(self, track_id: str, kind: str, codec: str, layer: str | None, pid: int | None) -> Track:
        track = self.tracks.get(track_id)
        if track is None or track.codec != codec:
            track = Track(track_id, kind, codec, layer, pid, self._window)
            self.tracks[track_id] = track
        track.pid = pid
        return track

    # PublishTarget: called by Publisher only.

    def accept_video(self, pub: Publisher, unit: Unit, layer: str, pid: int | None) -> None:
        self._deliver(pub, unit, "video", "video:" + layer, layer, pid)

    def accept_audio(self, pub: Publisher, unit: Unit, pid: int | None) -> None:
        owner = self._audio_owner
        if owner is None or not owner.active:
            owner = self._audio_owner = pub
        if owner is not pub:
            pub.ignored += 1
            return
        self._deliver(pub, unit, "audio", "audio", None, pid)

    def _deliver(self, pub: Publisher, unit: Unit, kind: str, track_id: str, layer: str | None, pid: int | None) -> None:
        data = unit.data
        codec = unit.codec
        clock_rate = getattr(unit, "clock_rate", 90000)
        dts = unit.dts if unit.dts is not None else unit.pts
        keyframe = bool(unit.keyframe) if kind == "video" else True
        track = self._track(track_id, kind, codec, layer, pid)
        track.update(unit, data, dts, clock_rate, keyframe)
        arrival = getattr(unit, "arrival", None)
        self._seq += 1
        frame = Frame(
            self._seq,
            track_id,
            layer,
            kind,
            codec,
            unit.pts,
            unit.dts,
            clock_rate,
            keyframe,
            data,
            time.monotonic() if arrival is None else arrival,
            pub.epoch,
        )
        self._frames_in += 1
        self._bytes_in += len(data)
        self._cache_add(frame)
        for reader in self._readers:
            if reader.wants(frame):
                reader.offer(frame)

    def accept_ts(self, pub: Publisher, data: bytes, rap_offset: int | None = None, psi: bytes = b"") -> None:
        owner = self._ts_owner
        if owner is None or not owner.active:
            owner = self._ts_owner = pub
        if owner is not pub:
            return
        self._ts_bytes_in += len(data)
        if rap_offset is not None and psi:
            self._ts_cache = [psi, data[rap_offset:]]
            self._ts_cache_bytes = len(psi) + len(data) - rap_offset
        elif self._ts_cache:
            self._ts_cache.append(data)
            self._ts_cache_bytes += len(data)
            if self._ts_cache_bytes > self._cache_limit:
                self._ts_cache, self._ts_cache_bytes = [], 0
        for reader in self._ts_readers:
            reader.offer(data)

    def accept_discontinuity(self, pub: Publisher, layer: str | None) -> None:
        layers = [layer] if layer is not None else (list(pub.mapped_layers()) or ([pub.layer] if pub.layer else None))
        if layers is None:
            self._restart_readers(Discontinuity("source", None, self.epoch), None)
        else:
            for name in layers:
                self._restart_readers(Discontinuity("source", name, self.epoch), name)

    def _restart_readers(self, marker: Discontinuity, layer: str | None) -> None:
        """Marker to every reader; their video (of ``layer``, or all)
        restarts at the next keyframe; the GOP cache is dropped."""
        if layer is None:
            self._clear_cache()
        else:
            self._drop_layer_cache(layer)
        for reader in self._readers:
            reader.resume_at_keyframe(layer)
            reader.mark(marker)

    # -- GOP cache

    def _cache_add(self, frame: Frame) -> None:
        if frame.kind == "video" and frame.keyframe:
            self._kf_seq[frame.layer] = frame.seq
        elif not self._kf_seq:
            return  # nothing to start a new reader from yet
        elif frame.kind == "video" and frame.layer not in self._kf_seq:
            return
        self._cache.append(frame)
        self._cache_bytes += len(frame.data)
        if frame.kind == "video" and frame.keyframe:
            self._trim_cache()
        while self._cache_bytes > self._cache_limit and self._kf_seq:
            oldest = min(self._kf_seq, key=self._kf_seq.__getitem__)
            del self._kf_seq[oldest]
            self._trim_cache()

    def _trim_cache(self) -> None:
        cache = self._cache
        if not self._kf_seq:
            cache.clear()
            self._cache_bytes = 0
            return
        start = min(self._kf_seq.values())
        while cache and cache[0].seq < start:
            self._cache_bytes -= len(cache.popleft().data)
        # frames of layers without a cached keyframe are useless
        if any(f.kind == "video" and f.layer not in self._kf_seq for f in cache):
            kept = deque(f for f in cache if f.kind != "video" or f.layer in self._kf_seq)
            self._cache = kept
            self._cache_bytes = sum(len(f.data) for f in kept)

    def _drop_layer_cache(self, layer: str) -> None:
        if layer in self._kf_seq:
            del self._kf_seq[layer]
            self._trim_cache()

    def _clear_cache(self) -> None:
        self._kf_seq.clear()
        self._cache.clear()
        self._cache_bytes = 0

    @property
    def gop_cache_bytes(self) -> int:
        return self._cache_bytes

    def gop_cache(self, layer: str) -> list[Frame]:
        """Cached frames of ``layer`` from its last keyframe."""
        start = self._kf_seq.get(layer)
        if start is None:
            return []
        return [f for f in self._cache if f.kind == "video" and f.layer == layer and f.seq >= start]

    # -- stats

    def stats(self) -> StreamStats:
        readers = tuple(r.stats() for r in self._readers) + tuple(t.stats() for t in self._ts_readers)
        return StreamStats(
            name=self.name,
            state=self.state,
            epoch=self.epoch,
            publishers=tuple(p.stats() for p in self._publishers.values()),
            tracks=tuple(t.info() for t in self.tracks.values()),
            layers=tuple(self._layer_names()),
            readers=len(self._readers),
            ts_readers=len(self._ts_readers),
            frames_in=self._frames_in,
            bytes_in=self._bytes_in,
            ts_bytes_in=self._ts_bytes_in,
            drops_total=self._drops_closed + sum(r.drops for r in readers),
            reader_stats=readers,
        )

