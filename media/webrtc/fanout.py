"""Packetize a stream once per layer and hand the packets to every viewer.

One :class:`StreamFanout` per live stream with WebRTC viewers. It subscribes
to the :class:`~media.stream.Stream` once, with a callback reader, and for
every frame:

1. packetizes it once for its layer (H.264 RFC 6184 / Opus RFC 7587),
2. stores the packets in the layer's NACK history and packet GOP cache,
3. calls every attached :class:`ViewerSink` synchronously, on the event loop.

A sink's work per packet is a header rewrite, an SRTP protect and a
``sendto`` (DESIGN.md invariant 2). Nothing here awaits: a viewer whose
socket backs up is told (``on_backlog``), never waited for.

Layers are indexed by increasing bitrate (``0`` = lowest), the convention of
:class:`media.rtp.layers.LayerSelector`. Index ``AUDIO`` is the audio track.
A new viewer first receives the packet GOP cache of its layer (from the last
IDR), so its picture starts at once rather than at the next keyframe.

Timestamps: a video layer's RTP timestamps are the TS PTS (90 kHz) modulo
2^32 (each viewer's rewriter then adds its own random offset, RFC 3550
§5.1); Opus from TS is rescaled 90 kHz → 48 kHz; Opus produced by the AAC
transcoder is already on 48 kHz.

Presentation clock (for the viewers' sender reports, lip sync): each layer
and the audio track keep a :class:`~media.rtp.rewrite.MediaAnchor` — the
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

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from ..rtp.h264 import H264Packetizer
from ..rtp.history import PacketHistory
from ..rtp.opus import OpusPacketizer
from ..rtp.packet import LayerPacket
from ..rtp.rewrite import MediaAnchor
from ..stream import Discontinuity, Frame, Reader, Stream, StreamClosed

log = logging.getLogger("returnfeed.webrtc")

AUDIO = -1
#: Tracks whose arrival − PTS differ by less than this share one media clock:
#: more than any transcoding or interleaving delay, far less than random RTP
#: timestamp origins (hours apart).
SAME_CLOCK_S = 2.0
_PTS_WRAP_S = (1 << 33) / 90000  # MPEG-TS PTS: 33 bits at 90 kHz
_LAYER_RANK = {"low": 0, "mid": 1, "high": 2}


def layer_order(names: list[str]) -> list[str]:
    """Layer names in increasing bitrate order (index = selector layer)."""
    return sorted(names, key=lambda n: (_LAYER_RANK.get(n, 1), n))


class ViewerSink(Protocol):
    """What the fan-out calls on each viewer (all synchronous, on the loop)."""

    def on_packets(self, index: int, packets: list[LayerPacket], now: float) -> None: ...

    def on_layers_changed(self, layers: list[str]) -> None: ...

    def on_stream_ended(self) -> None: ...


@dataclass(slots=True)
class _LayerState:
    name: str
    packetizer: H264Packetizer | OpusPacketizer
    history: PacketHistory
    gop: list[LayerPacket] = field(default_factory=list)
    gop_bytes: int = 0
    frames: int = 0
    packets: int = 0
    base: float | None = None  # presentation time − PTS (s)
    last_media: float | None = None
    media_wrap: float = 0.0
    anchor: MediaAnchor | None = None


@dataclass(slots=True)
class FanoutStats:
    frames: int = 0
    packets: int = 0
    packet_sends: int = 0
    reader_drops: int = 0
    viewers: int = 0


class StreamFanout:
    """Per-stream packetizer and dispatcher for WebRTC viewers."""

    def __init__(self, stream: Stream, *, max_payload: int = 1200, gop_cache_bytes: int = 8 << 20,
                 reader_size: int = 4096, clock: Callable[[], float] = time.monotonic,
                 on_frame_sent: Callable[[Frame, float], None] | None = None) -> None:
        self.stream = stream
        self.max_payload = max_payload
        self.gop_cache_bytes = gop_cache_bytes
        self._clock = clock
        self._reader_size = reader_size
        self._on_frame_sent = on_frame_sent
        self._layers: dict[str, _LayerState] = {}
        self._order: list[str] = []
        self._audio = _LayerState("audio", OpusPacketizer(), PacketHistory(capacity=512, max_age=1.0))
        self._sinks: set[ViewerSink] = set()
        self._reader: Reader | None = None
        self._ref_base: float | None = None
        self.stats = FanoutStats()
        self.closed = False

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        # The fan-out must see every frame: its queue is only a hand-off
        # inside one synchronous callback, drained at once.
        self._reader = self.stream.subscribe(self._reader_size, callback=self._on_reader, from_cache=True)
        self._on_reader(self._reader)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        for sink in list(self._sinks):
            sink.on_stream_ended()
        self._sinks.clear()

    # -- viewers -----------------------------------------------------------------

    @property
    def layers(self) -> list[str]:
        return list(self._order)

    def histories(self) -> dict[int, PacketHistory]:
        out = {i: self._layers[n].history for i, n in enumerate(self._order)}
        out[AUDIO] = self._audio.history
        return out

    def anchors(self) -> dict[int, MediaAnchor]:
        """Layer index → where its RTP timestamps sit on the presentation clock."""
        out = {i: a for i, n in enumerate(self._order) if (a := self._layers[n].anchor) is not None}
        if self._audio.anchor is not None:
            out[AUDIO] = self._audio.anchor
        return out

    def attach(self, sink: ViewerSink, layer_index: int | None, now: float) -> None:
        """Add a viewer; replay its layer's GOP so it can start decoding now."""
        self._sinks.add(sink)
        self.stats.viewers = len(self._sinks)
        if self._order:
            sink.on_layers_changed(list(self._order))
            idx = min(max(layer_index if layer_index is not None else len(self._order) - 1, 0),
                      len(self._order) - 1)
            gop = self._layers[self._order[idx]].gop
            if gop:
                sink.on_packets(idx, list(gop), now)

    def detach(self, sink: ViewerSink) -> None:
        self._sinks.discard(sink)
        self.stats.viewers = len(self._sinks)

    @property
    def viewer_count(self) -> int:
        return len(self._sinks)

    def gop_packets(self, index: int) -> list[LayerPacket]:
        if 0 <= index < len(self._order):
            return list(self._layers[self._order[index]].gop)
        return []

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

    def _layer(self, name: str) -> _LayerState:
        st = self._layers.get(name)
        if st is None:
            st = _LayerState(name, H264Packetizer(max_payload=self.max_payload),
                             PacketHistory(capacity=2048, max_age=1.0))
            self._layers[name] = st
            self._order = layer_order(list(self._layers))
            for sink in list(self._sinks):
                sink.on_layers_changed(list(self._order))
        return st

    def _frame(self, frame: Frame) -> None:
        now = self._clock()
        if frame.kind == "video":
            if frame.codec != "h264" or frame.layer is None:
                return
            st = self._layer(frame.layer)
            ts = (frame.pts if frame.pts is not None else frame.dts or 0) & 0xFFFFFFFF
            try:
                packets = st.packetizer.packetize(frame.data, ts)
            except Exception as exc:  # malformed AU from a remote source: count, skip
                log.warning("webrtc.packetize_failed", extra={"fields": {"stream": self.stream.name,
                                                                         "error": str(exc)}})
                return
            if not packets:
                return
            if packets[0].keyframe_start:
                st.gop = list(packets)
                st.gop_bytes = sum(len(p.payload) for p in packets)
            elif st.gop:
                st.gop.extend(packets)
                st.gop_bytes += sum(len(p.payload) for p in packets)
                if st.gop_bytes > self.gop_cache_bytes:
                    st.gop, st.gop_bytes = [], 0
            index = self._order.index(st.name)
        elif frame.kind == "audio":
            if frame.codec != "opus" or frame.pts is None:
                return
            st = self._audio
            ts = frame.pts if frame.clock_rate == 48000 else frame.pts * 48000 // frame.clock_rate
            packets = [st.packetizer.packetize(frame.data, ts & 0xFFFFFFFF)]
            index = AUDIO
        else:
            return
        self._anchor(st, frame, ts & 0xFFFFFFFF)
        history = st.history
        for p in packets:
            history.put(p, now)
        st.frames += 1
        st.packets += len(packets)
        self.stats.frames += 1
        self.stats.packets += len(packets)
        for sink in list(self._sinks):
            sink.on_packets(index, packets, now)
        self.stats.packet_sends += len(packets) * len(self._sinks)
        if self._on_frame_sent is not None and index != AUDIO:
            self._on_frame_sent(frame, self._clock())

    def _anchor(self, st: _LayerState, frame: Frame, ts: int) -> None:
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
        for st in targets:
            st.packetizer.restart()
            st.gop, st.gop_bytes = [], 0
            # The PTS may start anywhere now: measure the clock again.
            st.base = st.last_media = st.anchor = None
            st.media_wrap = 0.0
