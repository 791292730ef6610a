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

Modules (imports point up this list only)::

    types.py      states, errors, Frame/Discontinuity, layer names
    track.py      Track/TrackInfo: per-track properties and statistics
    reader.py     Reader/TsReader: bounded queues, drop-newest
    publisher.py  Publisher: PID/RID → track mapping, simulcast ranking
    stream.py     Stream: publishers, tracks, readers, GOP cache
    hub.py        StreamHub: streams by name, grace expiry

What a publisher hands in is a :class:`media.unit.Unit`.
"""

from .hub import StreamHub
from .publisher import Publisher, PublisherInfo
from .reader import Reader, ReaderStats, TsReader
from .stream import Stream, StreamStats
from .track import Track, TrackInfo
from .types import (
    Discontinuity,
    Frame,
    SourceInfo,
    StreamBusy,
    StreamClosed,
    StreamState,
    layer_names,
)

__all__ = [
    "StreamBusy",
    "StreamClosed",
    "StreamState",
    "SourceInfo",
    "Frame",
    "Discontinuity",
    "TrackInfo",
    "ReaderStats",
    "StreamStats",
    "PublisherInfo",
    "Track",
    "Reader",
    "TsReader",
    "Publisher",
    "Stream",
    "StreamHub",
    "layer_names",
]
