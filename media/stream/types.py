"""The stream's vocabulary: states, errors, the items readers receive, and
layer names. A leaf of :mod:`media.stream`: imports nothing from it."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from media.errors import LocalMediaError, RemoteMediaError
from media.layer import layer_names, rank_high_first as layer_rank

__all__ = [
    "VIDEO_CODECS",
    "StreamBusy",
    "StreamClosed",
    "StreamState",
    "SourceInfo",
    "Frame",
    "Discontinuity",
    "Item",
    "layer_names",
    "layer_rank",
]

VIDEO_CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "av1"})


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


@dataclass(frozen=True, slots=True)
class Frame:
    """One :class:`media.unit.Unit` as delivered to readers, stamped by the
    stream (shared by all readers)."""

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
