"""Packetize a stream once per layer and hand the packets to every viewer.

Two halves, so that the packets can cross a process boundary between them
(egress worker processes, issue 15; the wire is media/webrtc/feed.py)::

    Stream ──frames──► StreamPacketizer ──events──► PacketFanout ──► ViewerSink × N
    (hub, main)         one per stream,    (emit)     one per stream per process:
                        main process                  histories, GOP cache, replays,
                                                      anchors, fair order, stats

* :class:`StreamPacketizer` subscribes to the :class:`~media.stream.Stream`
  once, with a callback reader, and for every frame packetizes it once for
  its layer (H.264 RFC 6184 / Opus RFC 7587), places it on the presentation
  clock (its :class:`~media.rtp.rewrite.MediaAnchor`) and emits one
  :class:`PacketsEvent` to each subscriber; a source restart or reader
  overflow is a :class:`DiscontinuityEvent`; its close (by its owner, or
  when its reader finds the stream closed) an :class:`EndedEvent`. It keeps each layer's events since its last keyframe
  (bounded by ``gop_cache_bytes``), so that a subscriber that comes late
  (a worker started or restarted while the stream runs) first receives them,
  flagged ``cached``: it fills its GOP cache and histories, sends nothing.
* :class:`PacketFanout` takes those events (:meth:`PacketFanout.handle`),
  stores the packets in the layer's NACK history and packet GOP cache, and
  calls every attached :class:`ViewerSink` synchronously, on the event loop,
  starting one viewer further along the attach order each frame; sinks
  with a ``lane`` (a WHEP session on the C path) are all served by one
  call per frame (the lane's ``fanout_frame``: ``_fastsend.fanout``), which
  hands back only the viewers whose frame needs their own call. A video
  frame ends at its marker packet (a large keyframe may come from the feed
  in chunks): only then is it counted and reported (``on_frame_sent(event,
  now)``, the forwarding-latency histograms: the event carries the frame's
  arrival and first-byte times).
* :class:`StreamFanout` is the two in one process, wired directly (one
  function call per event): the single-process path.

Events after a gap: a :class:`DiscontinuityEvent` for a layer flags that
layer's next packet ``discontinuity`` unless the packetizer already did (a
source restart does; events lost on the way to a worker do not), so every
viewer re-bases there and, mid-GOP, waits for the layer's next keyframe,
which is asked of the source at once.

Fair order: one thread hands a frame to viewer after viewer, so the viewer
served last waits for all the others (a keyframe to 500 viewers: tens of
ms). Iterating a set served the same viewers last on every frame; the
start position now rotates by one per frame, so over N frames each of N
viewers is served at every position once and its average position is the
middle — deterministic, and one slice per frame. (Interleaving a keyframe's
packets in chunks across viewers was measured and not kept: every viewer's
frame is complete only at its last packet, so chunking moves the *first*
viewers' completion to the end of the fan-out and the last viewer's not at
all — see loadtests/README.md, "Fair, short fan-out".)

A sink's work per packet is a header rewrite, an SRTP protect and a
``sendto`` (DESIGN.md invariant 2). Nothing here awaits: a viewer whose
socket backs up is told (``on_backlog``), never waited for.

Layers are :class:`media.layer.Layer` values, indexed by increasing bitrate
(``0`` = lowest, the convention of :class:`media.rtp.layers.LayerSelector`);
the stream's layer names become them in :func:`media.layer.order_layers`
only. Index ``AUDIO`` is the audio track.
A new viewer first receives the packet GOP cache of its layer (from the last
IDR), so its picture starts at once rather than at the next keyframe —
paced, never in one burst (:class:`JoinPolicy`). A long GOP (ffmpeg ``-c
copy`` of a file with one keyframe: megabytes) sent at once overflows the
viewer's socket or link, the packets it loses are older than the shared
NACK history, and the viewer stalls until the next keyframe, which may
never come. So on join:

* a source that can make a fresh keyframe (a WHIP publisher that accepted
  ``nack pli``) is asked for one when the cached GOP is longer than
  ``JoinPolicy.fresh_keyframe_after_s``; the viewer starts at it;
* otherwise the cached GOP is replayed: its keyframe at once (as live
  keyframes are sent), the rest at ``speedup`` × the layer's bitrate of the
  last second (within ``min_bps``..``max_bps``); the layer's live packets queue
  behind the replay for that viewer until it has caught up, or until the
  layer's next keyframe, where the viewer skips straight to live;
* what was replayed stays retransmittable (the viewer's NACKs) for
  ``history_s`` after the replay ends: the shared history keeps only 1 s.

Timestamps: a video layer's RTP timestamps are the TS PTS (90 kHz) modulo
2^32 (each viewer's rewriter then adds its own random offset, RFC 3550
§5.1); Opus from TS is rescaled 90 kHz → 48 kHz; Opus produced by the AAC
transcoder is already on 48 kHz.

Presentation clock (for the viewers' sender reports, lip sync): the
packetizer places each layer and the audio track with a
:class:`~media.rtp.rewrite.MediaAnchor`, carried on every PacketsEvent — the
RTP timestamp of their latest frame and the monotonic time at which that
frame's PTS is presented, ``PTS (s) + base``. ``base`` is taken from the
stream's first frame (its arrival minus its PTS) and shared by every track
whose own arrival − PTS lies within ``SAME_CLOCK_S`` of it: then equal PTS
mean equal presentation times, however late the track arrives (the AAC→Opus
transcoder's delay is in its arrival, not in its PTS). A track further off
has an unrelated clock (WHIP: each SSRC starts at a random RTP timestamp) and
gets its own base, its arrival. A track whose PTS jump away from its
arrivals by more than ``SAME_CLOCK_S`` (a source that reset its clock) is
placed again the same way; a publisher restart resets every base. PTS are
unwrapped across the 33-bit MPEG-TS wrap.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol, Union

from ..log import event
from ..layer import AUDIO, Layer, order_layers
from ..rtp.h264 import H264Packetizer
from ..rtp.history import PacketHistory
from ..rtp.opus import OpusPacketizer
from ..rtp.packet import LayerPacket
from ..rtp.rewrite import MediaAnchor
from ..stream import Discontinuity, Frame, Reader, Stream, StreamClosed

log = logging.getLogger("returnfeed.webrtc")

__all__ = ["AUDIO", "AUDIO_LAYER", "DiscontinuityEvent", "EndedEvent", "FanoutStats", "FeedEvent", "JoinPolicy",
           "PacketFanout", "PacketizerStats", "PacketsEvent", "StreamFanout", "StreamPacketizer", "ViewerSink"]

#: Tracks whose arrival − PTS differ by less than this share one media clock:
#: more than any transcoding or interleaving delay, far less than random RTP
#: timestamp origins (hours apart).
SAME_CLOCK_S = 2.0
_PTS_WRAP_S = (1 << 33) / 90000  # MPEG-TS PTS: 33 bits at 90 kHz
#: The ``layer`` of the audio track's events.
AUDIO_LAYER = "audio"


# -- events: what the packetizer hands on (in-process calls, or media/webrtc/feed.py) --


@dataclass(slots=True, frozen=True)
class PacketsEvent:
    """One frame's packets of one track, or a run of whole packets of it (a
    large keyframe crosses to a worker in several chunks; the frame's last
    chunk ends in the packet with the marker bit)."""

    stream: str
    layer: str  # the layer's name, or AUDIO_LAYER
    packets: tuple[LayerPacket, ...]
    anchor: MediaAnchor | None  # the track's anchor after this frame
    arrival: float  # Frame.arrival (monotonic: the same clock in every process)
    first_byte: float | None  # the frame's first byte in, when the ingest knows it
    #: Replayed from the packetizer's GOP cache to a late subscriber: fills
    #: the fan-out's caches and histories, is sent to no viewer.
    cached: bool = False


@dataclass(slots=True, frozen=True)
class DiscontinuityEvent:
    """The next packets of ``layer`` (``None``: of every track) do not follow
    the ones before: the source restarted, the reader overflowed, or events
    were lost on the way."""

    stream: str
    layer: str | None


@dataclass(slots=True, frozen=True)
class EndedEvent:
    stream: str


FeedEvent = Union[PacketsEvent, DiscontinuityEvent, EndedEvent]


class ViewerSink(Protocol):
    """What the fan-out calls on each viewer (all synchronous, on the loop)."""

    def on_packets(self, index: int, packets: list[LayerPacket], now: float) -> None: ...

    def on_layers_changed(self, layers: tuple[Layer, ...]) -> None: ...

    def on_stream_ended(self) -> None: ...


@dataclass(slots=True)
class _TrackState:
    """The packetizer's side of one layer or the audio track."""

    name: str
    packetizer: H264Packetizer | OpusPacketizer
    #: The events since the layer's last keyframe (for late subscribers).
    gop: list[PacketsEvent] = field(default_factory=list)
    gop_bytes: int = 0
    base: float | None = None  # presentation time − PTS (s)
    last_media: float | None = None
    media_wrap: float = 0.0
    anchor: MediaAnchor | None = None


@dataclass(slots=True)
class _LayerState:
    """The fan-out's side of one layer or the audio track."""

    name: str
    history: PacketHistory
    gop: list[LayerPacket] = field(default_factory=list)
    gop_bytes: int = 0
    frames: int = 0
    packets: int = 0
    anchor: MediaAnchor | None = None
    #: Payload bit rate over the last whole second (the join replay's pace).
    rate_bps: float = 0.0
    window_bytes: int = 0
    window_start: float | None = None
    #: A DiscontinuityEvent came: the next packet must start a new run.
    resync: bool = False


@dataclass(slots=True)
class PacketizerStats:
    frames: int = 0
    packets: int = 0
    reader_drops: int = 0
    packetize_failures: int = 0


@dataclass(slots=True)
class FanoutStats:
    frames: int = 0
    packets: int = 0
    packet_sends: int = 0
    reader_drops: int = 0
    viewers: int = 0
    joins_replayed: int = 0
    joins_fresh_keyframe: int = 0
    replay_skipped_to_keyframe: int = 0
    #: DiscontinuityEvents whose layer's next packet was not flagged (events
    #: lost on the way): those viewers re-based at it.
    resyncs: int = 0


@dataclass(frozen=True, slots=True)
class JoinPolicy:
    """How a viewer joining mid-GOP is started (see the module docstring)."""

    speedup: float = 4.0
    min_bps: float = 4e6
    max_bps: float = 40e6
    #: Pacing timer period; the most sent in one go is one period's worth.
    tick: float = 0.005
    fresh_keyframe_after_s: float = 1.0
    history_s: float = 3.0
    #: A viewer whose replay queue grows past this many bytes (it cannot
    #: catch up) is moved to the layer's next keyframe instead.
    max_queue_bytes: int = 24 << 20


@dataclass(slots=True)
class _Replay:
    """One viewer's paced start on layer ``layer`` (by name: indexes shift
    when a layer appears)."""

    layer: str
    rate_bps: float
    queue: deque[LayerPacket] = field(default_factory=deque)
    queued_bytes: int = 0
    credit: float = 0.0
    last: float = 0.0
    sent: dict[int, LayerPacket] = field(default_factory=dict)
    done_at: float | None = None


class _ReplayHistory:
    """The layer's shared history, then what was replayed to one viewer
    (until ``history_s`` after its replay ended): answers its NACKs for
    packets older than the shared history keeps."""

    __slots__ = ("_live", "_replay", "_until")

    def __init__(self, live: PacketHistory, replay: _Replay, history_s: float) -> None:
        self._live = live
        self._replay = replay
        self._until = history_s

    def get(self, seq: int, now: float, timestamp: int | None = None) -> LayerPacket | None:
        p = self._live.get(seq, now, timestamp)
        if p is not None:
            return p
        r = self._replay
        if r.done_at is not None and now - r.done_at > self._until:
            return None
        p = r.sent.get(seq & 0xFFFF)
        if p is None or (timestamp is not None and p.timestamp != timestamp):
            return None
        return p

    def age(self, seq: int, now: float) -> float | None:
        """Seconds since the packet :meth:`get` finds was sent: the shared
        history's age, or for a replayed one the time since its replay ended
        (it was sent by then). The rewriter compares this with the viewer's
        playout window."""
        if self._live.get(seq, now) is not None:
            return self._live.age(seq, now)
        r = self._replay
        if (seq & 0xFFFF) not in r.sent:
            return None
        return 0.0 if r.done_at is None else now - r.done_at


class StreamPacketizer:
    """Reads one hub :class:`Stream` and emits its packets once per layer to
    every subscriber (the in-process :class:`StreamFanout`, or one
    ``FeedSender`` per egress worker)."""

    def __init__(self, stream: Stream, *, max_payload: int = 1200, gop_cache_bytes: int = 8 << 20,
                 reader_size: int = 4096, clock: Callable[[], float] = time.monotonic,
                 first_byte: Callable[[Frame], float | None] | None = None,
                 on_closed: Callable[["StreamPacketizer"], None] | None = None) -> None:
        self.stream = stream
        self.max_payload = max_payload
        self.gop_cache_bytes = gop_cache_bytes
        self._reader_size = reader_size
        # Not read here: every time the packetizer hands on is a frame's own
        # (Frame.arrival, the anchors). Accepted so that both halves and
        # StreamFanout are constructed alike.
        self._clock = clock
        #: When the frame's first byte came in (SRT ingest), for the
        #: forwarding_latency_from_first_byte histogram; None: unknown.
        self._first_byte = first_byte
        self._on_closed = on_closed
        # Subscription order (a dict keeps it); the list is what a frame
        # iterates (an emit may unsubscribe while it runs).
        self._subscribers: dict[Callable[[FeedEvent], None], None] = {}
        self._emits: list[Callable[[FeedEvent], None]] = []
        self._layers: dict[str, _TrackState] = {}
        self._audio = _TrackState(AUDIO_LAYER, OpusPacketizer())
        #: The audio track's last event: a late subscriber gets its anchor
        #: (lip sync) at once rather than one audio frame later.
        self._last_audio: PacketsEvent | None = None
        self._ref_base: float | None = None
        self._reader: Reader | None = None
        self.stats = PacketizerStats()
        self.closed = False

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        # Every frame must be seen: the reader's queue is only a hand-off
        # inside one synchronous callback, drained at once.
        self._reader = self.stream.subscribe(self._reader_size, callback=self._on_reader, from_cache=True)
        self._on_reader(self._reader)

    def close(self) -> None:
        """Stop reading; every subscriber gets an :class:`EndedEvent`."""
        if self.closed:
            return
        self.closed = True
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        ended = EndedEvent(self.stream.name)
        for emit in self._emits:
            emit(ended)
        self._subscribers.clear()
        self._emits = []
        for st in self._tracks():
            st.gop, st.gop_bytes = [], 0
        self._last_audio = None
        if self._on_closed is not None:
            self._on_closed(self)

    # -- subscribers -------------------------------------------------------------------

    def subscribe(self, emit: Callable[[FeedEvent], None]) -> None:
        """Add a subscriber. It first receives each layer's cached GOP (and
        the audio track's last event), flagged ``cached``, so that its
        viewers can start at once (see the module docstring)."""
        if emit in self._subscribers:
            return
        if self.closed:
            emit(EndedEvent(self.stream.name))
            return
        for st in self._layers.values():
            for ev in st.gop:
                emit(dataclasses.replace(ev, cached=True))
        if self._last_audio is not None:
            emit(dataclasses.replace(self._last_audio, cached=True))
        self._subscribers[emit] = None
        self._emits = list(self._subscribers)

    def unsubscribe(self, emit: Callable[[FeedEvent], None]) -> None:
        if emit in self._subscribers:
            del self._subscribers[emit]
            self._emits = list(self._subscribers)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    @property
    def layers(self) -> list[str]:
        """Layer names in increasing bitrate."""
        return [layer.name for layer in order_layers(self._layers)]

    def _tracks(self) -> list[_TrackState]:
        return [*self._layers.values(), self._audio]

    # -- frames --------------------------------------------------------------------

    def _on_reader(self, reader: Reader) -> None:
        if reader.closed:
            if not self.closed:
                self.close()
            return
        try:
            items = reader.drain()
        except StreamClosed:
            self.close()
            return
        for item in items:
            if isinstance(item, Frame):
                self._frame(item)
            elif isinstance(item, Discontinuity):
                self._discontinuity(item)
        self.stats.reader_drops = reader.drops

    def _frame(self, frame: Frame) -> None:
        if frame.kind == "video":
            if frame.codec != "h264" or frame.layer is None:
                return
            st = self._layers.get(frame.layer)
            if st is None:
                st = self._layers[frame.layer] = _TrackState(frame.layer, H264Packetizer(max_payload=self.max_payload))
            ts = (frame.pts if frame.pts is not None else frame.dts or 0) & 0xFFFFFFFF
            try:
                packets = st.packetizer.packetize(frame.data, ts)
            except Exception as exc:  # malformed AU from a remote source: count, skip
                self.stats.packetize_failures += 1
                event(log, logging.WARNING, "webrtc.packetize_failed", stream=self.stream.name, error=str(exc))
                return
            if not packets:
                return
        elif frame.kind == "audio":
            if frame.codec != "opus" or frame.pts is None:
                return
            st = self._audio
            ts = frame.pts if frame.clock_rate == 48000 else frame.pts * 48000 // frame.clock_rate
            try:
                packets = [st.packetizer.packetize(frame.data, ts & 0xFFFFFFFF)]
            except Exception as exc:  # an empty or oversized Opus packet: count, skip
                self.stats.packetize_failures += 1
                event(log, logging.WARNING, "webrtc.packetize_failed", stream=self.stream.name, error=str(exc))
                return
        else:
            return
        self._anchor(st, frame, ts & 0xFFFFFFFF)
        ev = PacketsEvent(self.stream.name, st.name, tuple(packets), st.anchor, frame.arrival,
                          self._first_byte(frame) if self._first_byte is not None else None)
        if st is self._audio:
            self._last_audio = ev
        elif packets[0].keyframe_start:
            st.gop = [ev]
            st.gop_bytes = sum(len(p.payload) for p in packets)
        elif st.gop:
            st.gop.append(ev)
            st.gop_bytes += sum(len(p.payload) for p in packets)
            if st.gop_bytes > self.gop_cache_bytes:
                st.gop, st.gop_bytes = [], 0
        self.stats.frames += 1
        self.stats.packets += len(packets)
        for emit in self._emits:
            emit(ev)

    def _anchor(self, st: _TrackState, frame: Frame, ts: int) -> None:
        pts = frame.pts if frame.pts is not None else frame.dts
        if pts is None:
            return
        media = pts / frame.clock_rate + st.media_wrap
        if st.last_media is not None and media < st.last_media - _PTS_WRAP_S / 2:
            st.media_wrap += _PTS_WRAP_S
            media += _PTS_WRAP_S
        st.last_media = media
        own = frame.arrival - media
        if st.base is None or abs(own - st.base) > SAME_CLOCK_S:
            # First frame, or the PTS jumped while the arrivals did not (the
            # source reset its clock, with or without telling): join the
            # reference clock if this track is on it, else become it.
            ref = self._ref_base
            if ref is None or abs(own - ref) > SAME_CLOCK_S:
                self._ref_base = ref = own
            st.base = ref
        st.anchor = MediaAnchor(ts, media + st.base)

    def _discontinuity(self, marker: Discontinuity) -> None:
        """A publisher restart or reader overflow: the next packets of the
        layer(s) are flagged so every viewer re-bases seq/ts (never backwards)."""
        targets = list(self._layers.values()) if marker.layer is None else [
            st for st in self._layers.values() if st.name == marker.layer]
        if marker.layer is None:
            targets.append(self._audio)
            self._ref_base = None
            self._last_audio = None
        for st in targets:
            st.packetizer.restart()
            st.gop, st.gop_bytes = [], 0
            # The PTS may start anywhere now: measure the clock again.
            st.base = st.last_media = st.anchor = None
            st.media_wrap = 0.0
        ev = DiscontinuityEvent(self.stream.name, marker.layer)
        for emit in self._emits:
            emit(ev)


class PacketFanout:
    """One stream's packets → its viewers in this process: NACK histories,
    GOP cache, join replays, anchors, fair order, stats. Fed by
    :meth:`handle` (from a :class:`StreamPacketizer`, directly or over the
    feed); needs no :class:`Stream`."""

    def __init__(self, stream_name: str, *, gop_cache_bytes: int = 8 << 20,
                 clock: Callable[[], float] = time.monotonic,
                 on_frame_sent: Callable[[PacketsEvent, float], None] | None = None,
                 request_keyframe: Callable[[str], int] | None = None,
                 on_closed: Callable[["PacketFanout"], None] | None = None,
                 join: JoinPolicy = JoinPolicy()) -> None:
        self.stream_name = stream_name
        self.join = join
        #: Asks the stream's source for a keyframe; returns how many requests
        #: were really sent (0: the source cannot be asked, e.g. SRT, or a
        #: WHIP publisher whose offer has ``nack`` but not ``nack pli``).
        self._request_keyframe = request_keyframe
        #: Told once when the fan-out ends (its stream ended or it was closed),
        #: so that its owner forgets it and the viewers that were never
        #: attached at once rather than by polling.
        self._on_closed = on_closed
        self._replays: dict[ViewerSink, _Replay] = {}
        self._timer: asyncio.TimerHandle | None = None
        self.gop_cache_bytes = gop_cache_bytes
        self._clock = clock
        #: Told after each video frame went to every viewer (the forwarding
        #: latency histograms: the event has the frame's arrival times).
        self._on_frame_sent = on_frame_sent
        self._layers: dict[str, _LayerState] = {}
        self._order: tuple[Layer, ...] = ()
        self._index: dict[str, int] = {}  # layer name → index in _order
        self._audio = _LayerState(AUDIO_LAYER, PacketHistory(capacity=512, max_age=1.0))
        # Attach order (a dict keeps it; a set's hash order served the same
        # viewers last on every frame) and its list, rebuilt on attach/detach.
        self._sinks: dict[ViewerSink, None] = {}
        self._sink_list: list[ViewerSink] = []
        #: The sinks' ``lane``s, position for position (None: a sink without
        #: one), and the call that serves them all per frame (the lanes'
        #: ``fanout_frame``); both None while no sink has a lane.
        self._lanes: list[object | None] | None = None
        self._batch: Callable[..., list[tuple[int, object]] | None] | None = None
        self._turn = 0  # frames fanned out: the rotation of the start position
        self.stats = FanoutStats()
        self.closed = False

    # -- lifecycle ---------------------------------------------------------------

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._replays.clear()
        for sink in list(self._sinks):
            sink.on_stream_ended()
        self._sinks.clear()
        self._set_sinks()
        if self._on_closed is not None:
            self._on_closed(self)

    # -- viewers -----------------------------------------------------------------

    @property
    def layers(self) -> list[str]:
        """Layer names in increasing bitrate."""
        return [layer.name for layer in self._order]

    @property
    def ordered_layers(self) -> tuple[Layer, ...]:
        return self._order

    def histories(self, sink: ViewerSink | None = None) -> Mapping[int, PacketHistory | _ReplayHistory]:
        """Retransmission sources per layer index (for ``sink``: including
        what its join replay sent)."""
        out: dict[int, PacketHistory | _ReplayHistory] = {
            layer.index: self._layers[layer.name].history for layer in self._order}
        out[AUDIO] = self._audio.history
        replay = self._replays.get(sink) if sink is not None and self._replays else None
        if replay is not None and replay.layer in self._index:
            out[self._index[replay.layer]] = _ReplayHistory(self._layers[replay.layer].history, replay,
                                                            self.join.history_s)
        return out

    def anchors(self) -> dict[int, MediaAnchor]:
        """Layer index → where its RTP timestamps sit on the presentation clock."""
        out = {layer.index: a for layer in self._order if (a := self._layers[layer.name].anchor) is not None}
        if self._audio.anchor is not None:
            out[AUDIO] = self._audio.anchor
        return out

    def attach(self, sink: ViewerSink, layer_index: int | None, now: float) -> None:
        """Add a viewer and start it on its layer (see the module docstring)."""
        if sink not in self._sinks:
            self._sinks[sink] = None
            self._set_sinks()
        self.stats.viewers = len(self._sinks)
        if not self._order:
            return
        sink.on_layers_changed(self._order)
        idx = min(max(layer_index if layer_index is not None else len(self._order) - 1, 0),
                  len(self._order) - 1)
        st = self._layers[self._order[idx].name]
        if not st.gop:
            return
        span = ((st.gop[-1].timestamp - st.gop[0].timestamp) & 0xFFFFFFFF) / 90000.0
        if span > self.join.fresh_keyframe_after_s and self._request_keyframe is not None:
            if self._request_keyframe(self.stream_name) > 0:
                # The source makes a keyframe within a round trip: start there
                # rather than replaying seconds of old pictures.
                self.stats.joins_fresh_keyframe += 1
                return
        layer_bps = st.rate_bps or (st.gop_bytes * 8.0 / span if span >= 0.5 else 0.0)
        j = self.join
        replay = _Replay(st.name, min(max(layer_bps * j.speedup, j.min_bps), j.max_bps), deque(st.gop),
                         st.gop_bytes, last=now)
        self._replays[sink] = replay
        self.stats.joins_replayed += 1
        self._pump(sink, replay, now, first=True)
        self._arm()

    def _set_sinks(self) -> None:
        """New lists (never changed in place: a frame being served keeps
        the ones it started with) of the sinks and their lanes."""
        sinks = self._sink_list = list(self._sinks)
        lanes: list[object | None] = [getattr(s, "lane", None) for s in sinks]
        first = next((lane for lane in lanes if lane is not None), None)
        self._lanes = lanes if first is not None else None
        self._batch = getattr(first, "fanout_frame", None)

    def detach(self, sink: ViewerSink) -> None:
        if sink in self._sinks:
            del self._sinks[sink]
            self._set_sinks()
        self._replays.pop(sink, None)
        self.stats.viewers = len(self._sinks)

    # -- join replay -------------------------------------------------------------------

    def pump_replays(self, now: float) -> bool:
        """Send each replaying viewer what its pace allows up to ``now``;
        forget replays whose retransmission window is over. Returns whether
        any replay is still sending."""
        active = False
        for sink, replay in list(self._replays.items()):
            if replay.done_at is None:
                self._pump(sink, replay, now)
                active = active or replay.done_at is None
            elif now - replay.done_at > self.join.history_s:
                del self._replays[sink]
        return active

    def _pump(self, sink: ViewerSink, replay: _Replay, now: float, first: bool = False) -> None:
        per_tick = replay.rate_bps / 8.0 * self.join.tick
        # A late timer may send up to four periods' worth at once, never more.
        replay.credit = min(replay.credit + (now - replay.last) * replay.rate_bps / 8.0, 4 * per_tick)
        replay.last = now
        batch: list[LayerPacket] = []
        queue = replay.queue
        if first:
            # The keyframe goes at once, as the live path sends every
            # keyframe: the picture starts now; what follows it is paced.
            while queue:
                p = queue.popleft()
                replay.queued_bytes -= len(p.payload)
                replay.sent[p.seq] = p
                batch.append(p)
                if p.marker:
                    break
        while queue and replay.credit > 0:
            p = queue.popleft()
            replay.credit -= len(p.payload)
            replay.queued_bytes -= len(p.payload)
            replay.sent[p.seq] = p
            batch.append(p)
        if not queue:
            replay.done_at = now
        if batch:
            sink.on_packets(self._index[replay.layer], batch, now)

    def _arm(self, delay: float | None = None) -> None:
        if self.closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # driven by hand (tests): pump_replays(now)
            return
        if self._timer is not None:
            if delay is not None or self._timer.when() <= loop.time() + self.join.tick:
                return
            self._timer.cancel()  # a pending forget-timer gives way to pacing
        self._timer = loop.call_later(self.join.tick if delay is None else delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.pump_replays(self._clock()):
            self._arm()
        elif self._replays:
            # Only retransmission windows left: wake once to forget them.
            self._arm(self.join.history_s + self.join.tick)

    def _queue_for_replay(self, sink: ViewerSink, replay: _Replay, packets: list[LayerPacket],
                          now: float) -> None:
        """Live packets of a replaying viewer's layer: behind the replay, or —
        at the layer's next keyframe, or when the viewer cannot catch up —
        straight to live, flagged so its rewriter starts a new run there."""
        if packets[0].keyframe_start or replay.queued_bytes > self.join.max_queue_bytes:
            skipped = bool(replay.queue)
            replay.queue.clear()
            replay.queued_bytes = 0
            replay.done_at = now
            if skipped:
                self.stats.replay_skipped_to_keyframe += 1
                packets = [dataclasses.replace(packets[0], discontinuity=True), *packets[1:]]
                if not packets[0].keyframe_start and self._request_keyframe is not None:
                    # Mid-GOP: the rewriter waits for a keyframe; ask for one.
                    self._request_keyframe(self.stream_name)
            sink.on_packets(self._index[replay.layer], packets, now)
            return
        replay.queue.extend(packets)
        replay.queued_bytes += sum(len(p.payload) for p in packets)

    @property
    def viewer_count(self) -> int:
        return len(self._sinks)

    def gop_packets(self, index: int) -> list[LayerPacket]:
        if 0 <= index < len(self._order):
            return list(self._layers[self._order[index].name].gop)
        return []

    # -- events --------------------------------------------------------------------

    def handle(self, ev: FeedEvent) -> None:
        """One event of the stream's packetizer (see the module docstring)."""
        if self.closed:
            return
        if type(ev) is PacketsEvent:
            self._packets(ev)
        elif type(ev) is DiscontinuityEvent:
            self._discontinuity(ev.layer)
        elif type(ev) is EndedEvent:
            self.close()

    def _layer(self, name: str) -> _LayerState:
        st = self._layers.get(name)
        if st is None:
            st = _LayerState(name, PacketHistory(capacity=2048, max_age=1.0))
            self._layers[name] = st
            self._order = order_layers(self._layers)
            self._index = {layer.name: layer.index for layer in self._order}
            for sink in list(self._sinks):
                sink.on_layers_changed(self._order)
        return st

    def _packets(self, ev: PacketsEvent) -> None:
        now = self._clock()
        packets = list(ev.packets)
        if not packets:
            return
        video = ev.layer != AUDIO_LAYER
        st = self._layer(ev.layer) if video else self._audio
        if st.resync and not ev.cached:
            st.resync = False
            first = packets[0]
            if not first.discontinuity:
                # Events were lost on the way (not a source restart, which
                # the packetizer flags itself): every viewer re-bases here
                # and, mid-GOP, waits for the next keyframe — asked for now.
                self.stats.resyncs += 1
                packets[0] = dataclasses.replace(first, discontinuity=True)
                if video and not first.keyframe_start and self._request_keyframe is not None:
                    self._request_keyframe(self.stream_name)
        if video:
            size = sum(len(p.payload) for p in packets)
            if packets[0].keyframe_start:
                st.gop = packets[:]
                st.gop_bytes = size
            elif st.gop:
                st.gop.extend(packets)
                st.gop_bytes += size
                if st.gop_bytes > self.gop_cache_bytes:
                    st.gop, st.gop_bytes = [], 0
            if not ev.cached:
                if st.window_start is None:
                    st.window_start = now
                st.window_bytes += size
                if now - st.window_start >= 1.0:
                    st.rate_bps = st.window_bytes * 8.0 / (now - st.window_start)
                    st.window_start, st.window_bytes = now, 0
            index = self._index[st.name]
        else:
            index = AUDIO
        if ev.anchor is not None:
            st.anchor = ev.anchor
        history = st.history
        if ev.cached:
            # Produced before this fan-out existed: aged from its arrival, so
            # the history forgets it when it would have anyway.
            at = min(ev.arrival, now)
            for p in packets:
                history.put(p, at)
            return
        for p in packets:
            history.put(p, now)
        # A frame ends in its marker packet (a keyframe may come in chunks);
        # an Opus packet is a frame.
        frame_end = not video or packets[-1].marker
        if frame_end:
            st.frames += 1
            self.stats.frames += 1
        st.packets += len(packets)
        self.stats.packets += len(packets)
        viewers = len(self._sink_list)
        if self._batch is None or not self._serve_lanes(st.name, index, packets, now):
            self._serve_each(st.name, index, packets, now)
        self.stats.packet_sends += len(packets) * viewers
        if self._on_frame_sent is not None and video and frame_end:
            self._on_frame_sent(ev, self._clock())

    def _serve_each(self, name: str, index: int, packets: list[LayerPacket], now: float) -> None:
        """Each viewer its own call, in :meth:`fanout_order`; those whose
        join replay of this layer is still sending get the frame queued
        behind it."""
        if not self._replays:  # nothing to check per packet-viewer
            for sink in self.fanout_order():
                sink.on_packets(index, packets, now)
            return
        for sink in self.fanout_order():
            self._to_one(sink, name, index, packets, now)

    def _to_one(self, sink: ViewerSink, name: str, index: int, packets: list[LayerPacket], now: float) -> None:
        """The frame to one viewer by its own call, or queued behind its
        join replay of this layer while that is still sending."""
        replay = self._replays.get(sink)
        if replay is not None and replay.layer == name and replay.done_at is None:
            self._queue_for_replay(sink, replay, packets, now)
        else:
            sink.on_packets(index, packets, now)

    def _serve_lanes(self, name: str, index: int, packets: list[LayerPacket], now: float) -> bool:
        """The common case: one call (the lanes' ``fanout_frame``, C) sends
        the frame of track ``name`` to every viewer whose frame takes the
        fast path, in the order :meth:`fanout_order` gives; the viewers it
        hands back get their own call, and those whose join replay of this
        layer is still sending get the frame queued behind it, in the same
        order. False: that call was not made."""
        sinks, lanes = self._sink_list, self._lanes
        n = len(sinks)
        if not n or lanes is None or self._batch is None:
            return False
        replays = self._replays
        if replays:
            waiting = {s for s, r in replays.items() if r.layer == name and r.done_at is None}
            if waiting:
                lanes = [None if s in waiting else lane for s, lane in zip(sinks, lanes)]
        start = self._turn % n
        todo = self._batch(lanes, start, index, packets, now)
        if todo is None:
            return False
        self._turn = start + 1
        for pos, what in todo:
            sink = sinks[pos]
            if what is None:
                self._to_one(sink, name, index, packets, now)
            else:
                sink.on_lane_result(index, packets, what, now)  # type: ignore[attr-defined]
        return True

    def fanout_order(self) -> list[ViewerSink]:
        """The viewers in the order the next frame goes to them: attach
        order, started one further along than for the previous frame. A new
        list (a sink may detach while it is served)."""
        sinks = self._sink_list
        n = len(sinks)
        if n < 2:
            return sinks[:]
        start = self._turn % n
        self._turn = start + 1
        return sinks[start:] + sinks[:start]


    def _discontinuity(self, layer: str | None) -> None:
        """The next packets of ``layer`` (None: every track) start a new run:
        the old GOP cache and anchor are unusable, and a replay of the old
        run would end in packets unrelated to the new one — those viewers go
        straight to the new run."""
        if layer is None:
            targets = [*self._layers.values(), self._audio]
        elif layer == AUDIO_LAYER:
            targets = [self._audio]
        else:
            targets = [st for st in self._layers.values() if st.name == layer]
        for st in targets:
            st.gop, st.gop_bytes = [], 0
            st.anchor = None
            st.resync = True
        names = {st.name for st in targets}
        now = self._clock()
        for replay in self._replays.values():
            if replay.done_at is None and replay.layer in names:
                replay.queue.clear()
                replay.queued_bytes = 0
                replay.done_at = now


class StreamFanout(PacketFanout):
    """A :class:`StreamPacketizer` and a :class:`PacketFanout` in one process,
    wired by a direct call per event: the single-process path."""

    def __init__(self, stream: Stream, *, max_payload: int = 1200, gop_cache_bytes: int = 8 << 20,
                 reader_size: int = 4096, clock: Callable[[], float] = time.monotonic,
                 on_frame_sent: Callable[[PacketsEvent, float], None] | None = None,
                 request_keyframe: Callable[[str], int] | None = None,
                 on_closed: Callable[["StreamFanout"], None] | None = None,
                 join: JoinPolicy = JoinPolicy(),
                 first_byte: Callable[[Frame], float | None] | None = None) -> None:
        super().__init__(stream.name, gop_cache_bytes=gop_cache_bytes, clock=clock, on_frame_sent=on_frame_sent,
                         request_keyframe=request_keyframe, on_closed=on_closed, join=join)  # type: ignore[arg-type]
        self.stream = stream
        self.max_payload = max_payload
        self.packetizer = StreamPacketizer(stream, max_payload=max_payload, gop_cache_bytes=gop_cache_bytes,
                                           reader_size=reader_size, clock=clock, first_byte=first_byte)
        self.packetizer.subscribe(self._from_packetizer)

    def start(self) -> None:
        self.packetizer.start()

    def close(self) -> None:
        if self.closed:
            return
        # The packetizer's EndedEvent comes back here (closed by then).
        self.packetizer.close()
        super().close()

    def _from_packetizer(self, ev: FeedEvent) -> None:
        self.handle(ev)
        self.stats.reader_drops = self.packetizer.stats.reader_drops
