"""The Stream hub: one object per live feed, fanning access units out to
bounded readers. No I/O, no awaiting on the publishing side.

Data model::

    StreamHub ── name → Stream
    Stream ── publishers (one whole-stream publisher, or one per layer)
           ── tracks: 'video:<layer>' (one per video layer) and 'audio'
           ── layers: 'high', 'low', ... (each layer is one video track)
           ── readers (Reader: frames) and TS readers (TsReader: raw TS)
           ── GOP cache: frames since the last keyframe of each layer

Publishing. ``pub = stream.attach_publisher(SourceInfo(...), layer=None)``
returns a :class:`Publisher`; the ingest session calls ``pub.set_program(pmt)``
(TS sources), ``pub.publish(access_unit)`` and ``pub.publish_ts(data)``, and
finally ``stream.detach_publisher(pub, now)``. Everything the publisher
calls is synchronous and O(readers): a reader that cannot keep up loses
frames, the publisher never waits.

Layers. A TS with several H.264 PIDs is simulcast: the PIDs are ranked by
picture area (from each PID's SPS) and named 'high', 'low' (three:
'high', 'mid', 'low'). Until every video PID has shown an SPS the frames are
held back (bounded); one video PID is 'high' at once. Alternatively several
publishers each name their layer: ``attach_publisher(info, layer='low')``.
A whole-stream publisher (``layer=None``) excludes any other publisher.

Readers. ``stream.subscribe(maxsize, layers, kinds)`` returns a
:class:`Reader` with a bounded queue of :class:`Frame` and
:class:`Discontinuity` items. Overflow policy — drop the newest: when the
queue is full the incoming frame is dropped and counted; for video the
reader's layer then waits for the next keyframe, so a reader never receives
a GOP with a hole in it (dropping the oldest instead would cut frames out of
the GOP the reader is already consuming and force a second skip). When that
keyframe comes and the queue is still full, the queue is emptied (counted)
so the reader jumps to live instead of staying a full queue behind. A
:class:`Discontinuity` ('overflow') precedes the keyframe. Audio frames are
independent and simply dropped. A new reader gets the GOP cache (from the
last keyframe of each layer it wants, plus audio from that point) so it
starts on a keyframe immediately.

Lifecycle and clock. Time is explicit: ``detach_publisher(pub, now)`` puts
the stream in 'reconnecting'; readers keep their subscriptions. The server
calls ``hub.expire(now)`` periodically (say every second); a stream
reconnecting for longer than ``grace`` (default 10 s) is closed then and its
readers end. A publisher attaching within the grace period resumes the same
Stream: readers get ``Discontinuity('reconnect')`` and restart at the next
keyframe, so downstream can keep its RTP sequence numbers continuous. A
second whole-stream publisher (or a second one for the same layer) raises
:class:`StreamBusy` unless ``takeover=True``, which evicts the old one.

Raw TS. ``pub.publish_ts(data)`` fans the original TS bytes out to
:class:`TsReader` queues (``stream.subscribe_ts(maxsize)``) for SRT
``read:`` clients, with the same bounded drop-newest policy on whole chunks.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from media import h264
from media.aac import AdtsHeader
from media.errors import BitstreamError, LocalMediaError, RemoteMediaError
from media.opus import Toc

__all__ = [
    "StreamBusy",
    "StreamClosed",
    "StreamState",
    "SourceInfo",
    "AccessUnitLike",
    "Frame",
    "Discontinuity",
    "TrackInfo",
    "ReaderStats",
    "StreamStats",
    "Track",
    "Reader",
    "TsReader",
    "Publisher",
    "Stream",
    "StreamHub",
    "layer_names",
]

log = logging.getLogger(__name__)

VIDEO_CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "av1"})
_LAYER_ORDER = ("high", "mid", "low")


class StreamBusy(RemoteMediaError):
    """A publisher is already attached (for that layer); pass takeover=True
    to evict it. Map to SRT reject 1409 / HTTP 409."""


class StreamClosed(LocalMediaError):
    """The stream ended (grace period expired or closed) or the reader was
    closed; nothing more will come."""


class StreamState(str, enum.Enum):
    IDLE = "idle"  # created, never published
    LIVE = "live"
    RECONNECTING = "reconnecting"  # publisher gone, within the grace period
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class SourceInfo:
    protocol: str  # 'srt', 'whip', ...
    remote: str = ""  # peer address
    description: str = ""  # encoder name, stream id, ...


class AccessUnitLike(Protocol):
    """What publish() needs; media.mpegts.AccessUnit fits. Optional
    attributes read with getattr: pid, arrival, sps, clock_rate, layer."""

    codec: str
    pts: int | None
    dts: int | None
    keyframe: bool
    data: bytes


@dataclass(frozen=True, slots=True)
class Frame:
    """One access unit as delivered to readers (shared by all readers)."""

    seq: int  # stream-wide publish sequence number
    track: str  # 'video:<layer>' or 'audio'
    layer: str | None  # video layer name, None for audio
    kind: str  # 'video' | 'audio'
    codec: str
    pts: int | None
    dts: int | None
    clock_rate: int  # timestamp units per second (90000 for TS)
    keyframe: bool
    data: bytes
    arrival: float
    epoch: int  # publisher session; changes on reconnect/takeover


@dataclass(frozen=True, slots=True)
class Discontinuity:
    """In-band marker: what follows is not continuous with what preceded.

    reason: 'reconnect' (publisher came back), 'takeover', 'detach' (the
    layer's publisher left), 'overflow' (this reader dropped frames),
    'source' (the source signalled a discontinuity / lost data)."""

    reason: str
    layer: str | None  # None: every layer and audio
    epoch: int


Item = Frame | Discontinuity


def layer_names(count: int) -> list[str]:
    """Names for ``count`` layers, largest first."""
    if count <= 3:
        return {1: ["high"], 2: ["high", "low"], 3: ["high", "mid", "low"]}.get(count, [])
    return ["high", "mid", "low"] + [f"low{i}" for i in range(2, count - 1)]


# ------------------------------------------------------------------ tracks


@dataclass(frozen=True, slots=True)
class TrackInfo:
    id: str
    kind: str
    codec: str
    layer: str | None
    pid: int | None
    frames: int
    bytes: int
    bitrate_bps: float
    profile_level_id: str | None = None
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    gop_frames: int | None = None  # frames from one keyframe to the next
    b_frames: bool = False
    sample_rate: int | None = None
    channels: int | None = None


class Track:
    """Per-track properties and statistics, updated by each frame."""

    __slots__ = (
        "id",
        "kind",
        "codec",
        "layer",
        "pid",
        "frames",
        "bytes",
        "profile_level_id",
        "width",
        "height",
        "fps",
        "gop_frames",
        "b_frames",
        "sample_rate",
        "channels",
        "_window",
        "_window_bytes",
        "_window_ticks",
        "_since_key",
        "_sps",
        "_sps_fps",
        "_dts_hist",
        "_audio_hdr",
    )

    def __init__(self, track_id: str, kind: str, codec: str, layer: str | None, pid: int | None, window: float) -> None:
        self.id = track_id
        self.kind = kind
        self.codec = codec
        self.layer = layer
        self.pid = pid
        self.frames = 0
        self.bytes = 0
        self.profile_level_id: str | None = None
        self.width: int | None = None
        self.height: int | None = None
        self.fps: float | None = None
        self.gop_frames: int | None = None
        self.b_frames = False
        self.sample_rate: int | None = None
        self.channels: int | None = None
        self._window: deque[tuple[int, int]] = deque()
        self._window_bytes = 0
        self._window_ticks = window
        self._since_key: int | None = None
        self._sps: bytes | None = None
        self._sps_fps: float | None = None
        self._dts_hist: deque[int] = deque(maxlen=32)
        self._audio_hdr: bytes | None = None

    def update(self, unit: Any, data: bytes, ts: int | None, clock_rate: int, keyframe: bool) -> None:
        self.frames += 1
        size = len(data)
        self.bytes += size
        if ts is not None:
            win = self._window
            if win and not 0 <= ts - win[-1][0] < clock_rate * 10:
                win.clear()  # timestamp jump or wrap: restart the window
                self._window_bytes = 0
                self._dts_hist.clear()
            win.append((ts, size))
            self._window_bytes += size
            horizon = ts - int(self._window_ticks * clock_rate)
            while win[0][0] <= horizon:
                self._window_bytes -= win.popleft()[1]
        if self.kind == "video":
            self._update_video(unit, data, ts, clock_rate, keyframe)
        else:
            self._update_audio(data)

    @property
    def bitrate_bps(self) -> float:
        win = self._window
        if len(win) < 2:
            return 0.0
        return self._window_bytes * 8 / self._window_ticks

    def _update_video(self, unit: Any, data: bytes, ts: int | None, clock_rate: int, keyframe: bool) -> None:
        if keyframe:
            if self._since_key is not None:
                self.gop_frames = self._since_key
            self._since_key = 1
        elif self._since_key is not None:
            self._since_key += 1
        if self.codec != "h264":
            return
        sps = getattr(unit, "sps", None)
        first_slice = None
        if sps is None or not self.b_frames:
            info = h264.scan_access_unit(data)
            sps = sps or info.sps
            first_slice = info.first_slice
        if sps is not None and sps != self._sps:
            self._sps = sps
            try:
                parsed = h264.Sps.parse(sps)
            except BitstreamError as exc:
                log.debug("track %s: bad SPS: %s", self.id, exc)
            else:
                self.width, self.height = parsed.width, parsed.height
                self.profile_level_id = parsed.profile_level_id
                self._sps_fps = parsed.fps
                if parsed.fps:
                    self.fps = round(parsed.fps, 3)
        if not self.b_frames and first_slice is not None:
            try:
                self.b_frames = h264.SliceHeader.parse(first_slice).is_b
            except BitstreamError:
                pass
        if ts is not None and not self._sps_fps:
            hist = self._dts_hist
            hist.append(ts)
            if len(hist) >= 3 and hist[-1] > hist[0]:
                self.fps = round((len(hist) - 1) * clock_rate / (hist[-1] - hist[0]), 3)

    def _update_audio(self, data: bytes) -> None:
        if self.codec == "aac":
            head = data[:7]
            if head != self._audio_hdr:
                try:
                    hdr = AdtsHeader.parse(head)
                except BitstreamError:
                    return
                self._audio_hdr = head
                self.sample_rate = hdr.sample_rate
                self.channels = hdr.channels
        elif self.codec == "opus" and data:
            self.sample_rate = 48000
            self.channels = 2 if Toc.parse(data).stereo else 1

    def info(self) -> TrackInfo:
        return TrackInfo(
            id=self.id,
            kind=self.kind,
            codec=self.codec,
            layer=self.layer,
            pid=self.pid,
            frames=self.frames,
            bytes=self.bytes,
            bitrate_bps=self.bitrate_bps,
            profile_level_id=self.profile_level_id,
            width=self.width,
            height=self.height,
            fps=self.fps,
            gop_frames=self.gop_frames,
            b_frames=self.b_frames,
            sample_rate=self.sample_rate,
            channels=self.channels,
        )


# ----------------------------------------------------------------- readers


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

    def _end(self) -> None:
        self._closed = True
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

    def _offer(self, frame: Frame) -> None:
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

    def _restart(self, layer: str | None) -> None:
        if layer is None:
            self._live.clear()
        else:
            self._live.discard(layer)

    def _marker(self, marker: Discontinuity) -> None:
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

    def _offer(self, data: bytes) -> None:
        if len(self._buf) >= self.maxsize:
            self.drops += 1
            self.dropped_bytes += len(data)
            return
        self._push(data)


# -------------------------------------------------------------- publishers


class Publisher:
    """Handle of one attached source. Obtained from attach_publisher()."""

    __slots__ = (
        "stream",
        "info",
        "layer",
        "epoch",
        "active",
        "attached_at",
        "frames",
        "ignored",
        "_video_pids",
        "_audio_pid",
        "_pid_layer",
        "_pending",
        "_pending_bytes",
        "_sizes",
    )

    PENDING_LIMIT = 4 << 20  # bytes held while simulcast layers are being ranked

    def __init__(self, stream: Stream, info: SourceInfo, layer: str | None, epoch: int, now: float) -> None:
        self.stream = stream
        self.info = info
        self.layer = layer
        self.epoch = epoch
        self.active = True
        self.attached_at = now
        self.frames = 0
        self.ignored = 0  # units not mapped to a track (extra audio, unknown PIDs)
        self._video_pids: list[int] | None = None
        self._audio_pid: int | None = None
        self._pid_layer: dict[int, str] = {}
        self._pending: list[Any] = []
        self._pending_bytes = 0
        self._sizes: dict[int, int] = {}  # pid → picture area

    # -- program mapping (TS sources)

    def set_program(self, pmt: Any) -> None:
        """Map a PMT's PIDs (objects with .tracks of (pid, kind)) to tracks:
        video PIDs to layers by resolution, the first audio PID to 'audio'."""
        if pmt is None:
            self._video_pids = []
            self._audio_pid = None
            self._pid_layer = {}
            return
        video = [t.pid for t in pmt.tracks if t.kind == "video"]
        audio = [t.pid for t in pmt.tracks if t.kind == "audio"]
        self._audio_pid = audio[0] if audio else None
        if self._video_pids == video:
            return
        self._video_pids = video
        self._pending.clear()
        self._pending_bytes = 0
        self._sizes = {p: a for p, a in self._sizes.items() if p in video}
        if self.layer is not None:
            self._pid_layer = {video[0]: self.layer} if video else {}
        elif len(video) == 1:
            self._pid_layer = {video[0]: "high"}
        else:
            self._pid_layer = {}

    # -- publishing

    def publish(self, unit: AccessUnitLike, *, layer: str | None = None) -> None:
        """Publish one access unit. ``layer`` names the video layer for
        sources without PIDs (WHIP RIDs); otherwise the PID mapping or the
        publisher's layer decides."""
        if not self.active:
            self.ignored += 1
            return
        self.frames += 1
        self._route(unit, layer)

    def _route(self, unit: AccessUnitLike, layer: str | None) -> None:
        codec = unit.codec
        pid = getattr(unit, "pid", None)
        if codec in VIDEO_CODECS:
            if layer is None:
                layer = self.layer
                if pid is not None and self._video_pids is not None:
                    if pid not in self._video_pids:
                        self.ignored += 1
                        return
                    layer = self._pid_layer.get(pid)
                    if layer is None:
                        self._hold(unit, pid)
                        return
                elif layer is None:
                    layer = "high"
            self.stream._publish_video(self, unit, layer, pid)
        else:
            if pid is not None and self._video_pids is not None and pid != self._audio_pid:
                self.ignored += 1
                return
            self.stream._publish_audio(self, unit, pid)

    def _hold(self, unit: Any, pid: int) -> None:
        """Simulcast ranking: hold frames until every video PID showed its
        resolution (or the hold limit is reached)."""
        if pid not in self._sizes:
            area = None
            sps = getattr(unit, "sps", None)
            if sps is None and unit.codec == "h264":
                sps = h264.scan_access_unit(unit.data).sps
            if sps is not None:
                try:
                    parsed = h264.Sps.parse(sps)
                    area = parsed.width * parsed.height
                except BitstreamError:
                    area = None
            if area is None:
                if not unit.keyframe:
                    self.ignored += 1  # undecodable until its first keyframe anyway
                    return
                area = 0
            self._sizes[pid] = area
        self._pending.append(unit)
        self._pending_bytes += len(unit.data)
        video = self._video_pids or []
        if all(p in self._sizes for p in video) or self._pending_bytes > self.PENDING_LIMIT:
            ranked = sorted(video, key=lambda p: (-self._sizes.get(p, -1), video.index(p)))
            self._pid_layer = dict(zip(ranked, layer_names(len(ranked))))
            pending, self._pending = self._pending, []
            self._pending_bytes = 0
            for held in pending:
                self._route(held, None)

    def publish_ts(self, data: bytes, *, rap_offset: int | None = None, psi: bytes = b"") -> None:
        """Fan the original TS bytes out to TS readers.

        ``rap_offset``: where in ``data`` a keyframe PES starts (see
        :mod:`media.mpegts.rap`), with ``psi`` the latest PAT+PMT packets;
        the stream then restarts its TS cache there, so a new TS reader
        begins at a point a decoder can start from."""
        if self.active:
            self.stream._publish_ts(self, data, rap_offset, psi)

    def discontinuity(self, layer: str | None = None) -> None:
        """The source lost data or reset timestamps (TsDiscontinuity):
        readers get a 'source' marker and video restarts at a keyframe."""
        if self.active:
            self.stream._source_discontinuity(self, layer)

    @property
    def layers(self) -> dict[int, str]:
        """PID → layer mapping in force."""
        return dict(self._pid_layer)


# ------------------------------------------------------------------ stream


@dataclass(frozen=True, slots=True)
class PublisherInfo:
    protocol: str
    remote: str
    layer: str | None
    epoch: int
    attached_at: float
    frames: int


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
        for layer in set(pub._pid_layer.values()) | ({pub.layer} if pub.layer else set()):
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
            r._end()
        for t in self._ts_readers:
            self._drops_closed += t.drops
            t._end()
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
        reader._live.update(starts)
        reader._buf.extend(items)
        if items:
            reader._event.set()

    def subscribe_ts(self, maxsize: int = 256, *, callback: Callable[[TsReader], None] | None = None) -> TsReader:
        """A reader of the original TS bytes (chunks as published)."""
        if self.state == StreamState.CLOSED:
            raise StreamClosed(f"stream {self.name!r} is closed")
        reader = TsReader(self._new_id(), maxsize, callback, self._remove_reader)
        cached = self._ts_cache
        if cached and len(cached) <= maxsize:
            # Start at the last keyframe, after the PAT/PMT, not mid-GOP.
            reader._buf.extend(cached)
            reader._event.set()
        self._ts_readers.append(reader)
        return reader

    def _new_id(self) -> int:
        rid = self._next_id
        self._next_id += 1
        return rid

    def _remove_reader(self, reader: _Queue) -> None:
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
        return sorted(names, key=_layer_rank)

    @property
    def layers(self) -> dict[str, Track]:
        """Layer name → its video track, largest first."""
        return {t.layer: t for t in sorted(self.tracks.values(), key=lambda t: _layer_rank(t.layer or "")) if t.kind == "video" and t.layer}

    # -- publishing (called by Publisher)

    def publish(self, unit: AccessUnitLike, *, layer: str | None = None) -> None:
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

    def _publish_video(self, pub: Publisher, unit: Any, layer: str, pid: int | None) -> None:
        self._deliver(pub, unit, "video", "video:" + layer, layer, pid)

    def _publish_audio(self, pub: Publisher, unit: Any, pid: int | None) -> None:
        owner = self._audio_owner
        if owner is None or not owner.active:
            owner = self._audio_owner = pub
        if owner is not pub:
            pub.ignored += 1
            return
        self._deliver(pub, unit, "audio", "audio", None, pid)

    def _deliver(self, pub: Publisher, unit: Any, kind: str, track_id: str, layer: str | None, pid: int | None) -> None:
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
                reader._offer(frame)

    def _publish_ts(self, pub: Publisher, data: bytes, rap_offset: int | None = None, psi: bytes = b"") -> None:
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
            reader._offer(data)

    def _source_discontinuity(self, pub: Publisher, layer: str | None) -> None:
        layers = [layer] if layer is not None else (list(set(pub._pid_layer.values())) or ([pub.layer] if pub.layer else None))
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
            reader._restart(layer)
            reader._marker(marker)

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
            publishers=tuple(
                PublisherInfo(p.info.protocol, p.info.remote, p.layer, p.epoch, p.attached_at, p.frames)
                for p in self._publishers.values()
            ),
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


def _layer_rank(name: str) -> tuple[int, str]:
    try:
        return (_LAYER_ORDER.index(name), name)
    except ValueError:
        return (len(_LAYER_ORDER), name)


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
