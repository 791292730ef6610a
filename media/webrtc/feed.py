"""The packet feed: a stream's packetized layers from the ingest process to
each egress worker process, once per worker (issue 15).

::

    main process                                         worker process
    StreamPacketizer ─event─► FeedSender ══ Unix SOCK_SEQPACKET ══► FeedReceiver ─event─► PacketFanout
                              encode()        one message per        decode()
                              non-blocking    event (or chunk)       loop.add_reader

Why a socket and these messages (loadtests/feed_bench.py, figures in
loadtests/README.md "Packet feed"): a SOCK_SEQPACKET socketpair keeps message
boundaries (no framing layer, no partial reads), is reliable and in order,
and is bounded by the kernel's socket buffer; one message per frame costs
one ``send`` and one ``recv`` for 4-40 packets, where one message per packet
would cost a system call pair per packet.

Wire format (network byte order; ``VERSION`` 1). Every message starts with::

    u8 version, u8 kind, u8 flags, u8 layer_len, u16 stream_len

then, by kind:

* ``KIND_PACKETS`` (:class:`PacketsEvent`)::

      u16 count, f64 arrival, f64 first_byte, f64 anchor_at, u32 anchor_ts,
      stream (utf-8), layer (utf-8),
      count × (u16 seq, u32 timestamp, u8 packet_flags, u16 payload_len),
      the payloads, back to back

  ``flags``: 1 cached, 2 anchor present, 4 first_byte present.
  ``packet_flags``: 1 marker, 2 keyframe_start, 4 discontinuity.
* ``KIND_DISCONTINUITY``: stream, layer; ``flags`` 8: the layer is ``None``
  (every track).
* ``KIND_ENDED``: stream.

:func:`decode` checks every length against the message (a truncated or
padded message, an unknown version, kind or flag, a count of zero, a
non-finite time, bad UTF-8: :class:`FeedError`), so a bug or a version skew
between the two processes is an error counted at the receiver, never a
wrong packet sent to viewers. A frame larger than ``max_message`` (a big
keyframe) is split by :func:`encode` into several PacketsEvents of whole
packets; the receiving fan-out handles each as it comes (the frame ends at
its marker packet).

Back-pressure: the sender never blocks the ingest loop. When the worker's
socket buffer is full (``EAGAIN``) the messages wait in the sender's queue,
in order, and go as the socket has room (the loop's writer callback). A
worker that subscribes to a running stream gets the cached GOP (up to
``gop_cache_bytes``) in one burst, far more than a socket buffer holds, so
the queue's bound (``MAX_QUEUE_BYTES``) is above any cached GOP: what a
worker needs to start its viewers is never dropped. Past the bound, or once
the oldest waiting message is older than ``MAX_LAG_S`` (a stalled worker),
packets are let go and counted, and a :class:`DiscontinuityEvent` for each
layer that lost something takes their place in the queue, so that worker's
fan-out flags the layer's next packet and its viewers re-base and wait for
the next keyframe (which the fan-out asks the source for) rather than NACK
packets no history has, or play seconds late. Discontinuities and
:class:`EndedEvent` are never refused (a few bytes each, at most one per
layer per run of packets). The receiver reads at most
``max_per_wakeup`` messages per wake-up, so one busy feed cannot starve the
worker's loop of its viewers' RTCP.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import math
import socket
import struct
import time
from collections import deque
from typing import Callable

from ..errors import LocalMediaError
from ..log import event
from ..rtp.packet import LayerPacket
from ..rtp.rewrite import MediaAnchor
from .fanout import DiscontinuityEvent, EndedEvent, FeedEvent, PacketsEvent

log = logging.getLogger("returnfeed.webrtc")

__all__ = ["DEFAULT_MAX_MESSAGE", "FeedError", "FeedReceiver", "FeedSender", "MAX_LAG_S", "MAX_MESSAGE",
           "MAX_QUEUE_BYTES", "SEND_BUFFER", "VERSION", "decode", "encode", "socketpair"]

VERSION = 1
KIND_PACKETS = 1
KIND_DISCONTINUITY = 2
KIND_ENDED = 3

_CACHED = 1
_ANCHOR = 2
_FIRST_BYTE = 4
_ALL_LAYERS = 8

_MARKER = 1
_KEYFRAME_START = 2
_DISCONTINUITY = 4

#: The largest message :func:`decode` accepts (and the receiver's buffer).
MAX_MESSAGE = 1 << 18
#: What :func:`encode` packs into one message by default: well under the
#: default Unix socket send buffer (a SEQPACKET message must fit it whole),
#: and one ~40-packet keyframe of a 1 Mbit/s stream in one message.
DEFAULT_MAX_MESSAGE = 60000

#: What may wait in the sender's queue for one worker, beyond its socket:
#: at least a whole cached GOP (the packetizer keeps up to 8 MiB), which a
#: worker that just subscribed gets at once.
MAX_QUEUE_BYTES = 24 << 20
#: A queue whose oldest message waited longer than this is stale: the worker
#: is stalled, and its viewers are better re-based on the next keyframe than
#: served seconds late.
MAX_LAG_S = 2.0

_Q_PACKETS = 0
_Q_DISCONTINUITY = 1
_Q_ENDED = 2

#: What may wait in the socket for one worker: the default (208 kB) is a few
#: keyframes; this is over half a second of 20 streams at 1.15 Mbit/s, so a worker
#: busy with a long fan-out loses nothing, one stalled longer resyncs.
SEND_BUFFER = 1 << 20

_PREFIX = struct.Struct("!BBBBH")
_PACKETS_HEAD = struct.Struct("!BBBBHHdddI")
_PACKET = struct.Struct("!HIBH")
_PACKET_SIZE = _PACKET.size


class FeedError(LocalMediaError):
    """A feed message that does not decode: a bug or a version skew between
    our own processes (counted and dropped by the receiver)."""


@functools.lru_cache(maxsize=256)
def _table(count: int) -> struct.Struct:
    # One pack call for every packet header of a message.
    return struct.Struct("!" + "HIBH" * count)


def socketpair(send_buffer: int = SEND_BUFFER) -> tuple[socket.socket, socket.socket]:
    """A connected Unix SOCK_SEQPACKET pair: (the main end, the worker end),
    the main end's send buffer (which bounds what waits for the worker)
    raised to ``send_buffer``."""
    main_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    # The kernel caps it at net.core.wmem_max (and doubles it for overhead).
    main_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    return main_end, worker_end


# -- codec (sans-I/O) -------------------------------------------------------------------


def encode(ev: FeedEvent, max_message: int = DEFAULT_MAX_MESSAGE) -> list[bytes]:
    """``ev`` as feed messages: one, or for a PacketsEvent larger than
    ``max_message`` several, each a PacketsEvent of whole packets in order.
    Raises ValueError for what the format cannot carry (a name too long, a
    packet that alone exceeds ``max_message``, a field out of range)."""
    if not 0 < max_message <= MAX_MESSAGE:
        raise ValueError(f"max_message must be in 1..{MAX_MESSAGE}")
    stream = ev.stream.encode()
    if len(stream) > 0xFFFF:
        raise ValueError("stream name too long for the feed")
    if type(ev) is PacketsEvent:
        return _encode_packets(ev, stream, max_message)
    if type(ev) is DiscontinuityEvent:
        layer = b"" if ev.layer is None else ev.layer.encode()
        if len(layer) > 0xFF:
            raise ValueError("layer name too long for the feed")
        flags = _ALL_LAYERS if ev.layer is None else 0
        return [b"".join((_PREFIX.pack(VERSION, KIND_DISCONTINUITY, flags, len(layer), len(stream)), stream, layer))]
    if type(ev) is EndedEvent:
        return [_PREFIX.pack(VERSION, KIND_ENDED, 0, 0, len(stream)) + stream]
    raise TypeError(f"not a feed event: {type(ev).__name__}")


def _encode_packets(ev: PacketsEvent, stream: bytes, max_message: int) -> list[bytes]:
    layer = ev.layer.encode()
    if len(layer) > 0xFF:
        raise ValueError("layer name too long for the feed")
    packets = ev.packets
    if not packets:
        raise ValueError("a PacketsEvent without packets")
    flags = (_CACHED if ev.cached else 0) | (_ANCHOR if ev.anchor is not None else 0) | (
        _FIRST_BYTE if ev.first_byte is not None else 0)
    anchor_ts, anchor_at = (ev.anchor.timestamp, ev.anchor.at) if ev.anchor is not None else (0, 0.0)
    first_byte = ev.first_byte if ev.first_byte is not None else 0.0
    fixed = _PACKETS_HEAD.size + len(stream) + len(layer)
    total = fixed + sum(_PACKET_SIZE + len(p.payload) for p in packets)
    try:
        if total <= max_message:
            groups: list[tuple] = [packets]
        else:
            groups = []
            start, size = 0, fixed
            for i, p in enumerate(packets):
                add = _PACKET_SIZE + len(p.payload)
                if fixed + add > max_message:
                    raise ValueError(f"a {len(p.payload)}-byte packet does not fit a {max_message}-byte message")
                if size + add > max_message:
                    groups.append(packets[start:i])
                    start, size = i, fixed
                size += add
            groups.append(packets[start:])
        out = []
        for group in groups:
            fields: list[int] = []
            extend = fields.extend
            for p in group:
                extend((p.seq, p.timestamp,
                        (_MARKER if p.marker else 0) | (_KEYFRAME_START if p.keyframe_start else 0)
                        | (_DISCONTINUITY if p.discontinuity else 0), len(p.payload)))
            out.append(b"".join((
                _PACKETS_HEAD.pack(VERSION, KIND_PACKETS, flags, len(layer), len(stream), len(group),
                                   ev.arrival, first_byte, anchor_at, anchor_ts),
                stream, layer, _table(len(group)).pack(*fields), *[p.payload for p in group])))
        return out
    except struct.error as exc:  # seq, timestamp or length out of its field's range
        raise ValueError(f"PacketsEvent not encodable: {exc}") from None


def decode(data: bytes | bytearray | memoryview) -> FeedEvent:
    """One feed message → its event; :class:`FeedError` for anything that is
    not exactly a message of this version."""
    n = len(data)
    if n < _PREFIX.size:
        raise FeedError(f"truncated feed message ({n} bytes)")
    if n > MAX_MESSAGE:
        raise FeedError(f"oversized feed message ({n} bytes)")
    # One copy of the message, then the payloads are plain bytes slices
    # (cheaper per packet than slicing a memoryview and copying each).
    data = bytes(data)
    version, kind, flags, layer_len, stream_len = _PREFIX.unpack_from(data, 0)
    if version != VERSION:
        raise FeedError(f"feed version {version}, expected {VERSION}")
    if kind == KIND_PACKETS:
        return _decode_packets(data, n, flags, layer_len, stream_len)
    if kind == KIND_DISCONTINUITY:
        if flags & ~_ALL_LAYERS or (flags and layer_len):
            raise FeedError(f"bad discontinuity flags {flags:#x}")
        if n != _PREFIX.size + stream_len + layer_len:
            raise FeedError("discontinuity message length does not match its names")
        off = _PREFIX.size
        stream = _text(data, off, stream_len)
        layer = None if flags else _text(data, off + stream_len, layer_len)
        return DiscontinuityEvent(stream, layer)
    if kind == KIND_ENDED:
        if flags or layer_len or n != _PREFIX.size + stream_len:
            raise FeedError("malformed ended message")
        return EndedEvent(_text(data, _PREFIX.size, stream_len))
    raise FeedError(f"unknown feed message kind {kind}")


def _text(data: bytes, off: int, length: int) -> str:
    try:
        return data[off:off + length].decode()
    except UnicodeDecodeError as exc:
        raise FeedError(f"feed name is not UTF-8: {exc}") from None


def _decode_packets(data: bytes, n: int, flags: int, layer_len: int, stream_len: int) -> PacketsEvent:
    if flags & ~(_CACHED | _ANCHOR | _FIRST_BYTE):
        raise FeedError(f"bad packets flags {flags:#x}")
    head = _PACKETS_HEAD.size
    if n < head:
        raise FeedError(f"truncated packets message ({n} bytes)")
    count, arrival, first_byte, anchor_at, anchor_ts = _PACKETS_HEAD.unpack_from(data, 0)[5:]
    off = head + stream_len + layer_len
    table_end = off + count * _PACKET_SIZE
    if count == 0 or table_end > n:
        raise FeedError(f"packets message of {n} bytes cannot hold {count} packets")
    if not (math.isfinite(arrival) and math.isfinite(first_byte) and math.isfinite(anchor_at)):
        raise FeedError("non-finite time in a packets message")
    stream = _text(data, head, stream_len)
    layer = _text(data, head + stream_len, layer_len)
    packets = []
    append = packets.append
    pos = table_end
    for seq, ts, pflags, length in _PACKET.iter_unpack(memoryview(data)[off:table_end]):
        if pflags & ~7:
            raise FeedError(f"bad packet flags {pflags:#x}")
        end = pos + length
        if end > n:
            raise FeedError("packets message truncated inside a payload")
        append(LayerPacket(seq, ts, pflags & _MARKER != 0, data[pos:end], pflags & _KEYFRAME_START != 0,
                           pflags & _DISCONTINUITY != 0))
        pos = end
    if pos != n:
        raise FeedError(f"{n - pos} bytes after the last payload")
    return PacketsEvent(stream, layer, tuple(packets),
                        MediaAnchor(anchor_ts, anchor_at) if flags & _ANCHOR else None, arrival,
                        first_byte if flags & _FIRST_BYTE else None, bool(flags & _CACHED))


# -- I/O ------------------------------------------------------------------------------


class FeedSender:
    """The main end of one worker's feed socket. :meth:`send` is a
    StreamPacketizer subscriber (``packetizer.subscribe(sender.send)``): it
    never blocks; what the socket cannot take at once waits in a bounded
    queue, in order (see the module docstring)."""

    def __init__(self, sock: socket.socket, *, max_message: int = DEFAULT_MAX_MESSAGE,
                 max_queue_bytes: int = MAX_QUEUE_BYTES, max_lag: float = MAX_LAG_S,
                 on_error: Callable[["FeedSender", OSError], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not 0 < max_message <= MAX_MESSAGE:
            raise ValueError(f"max_message must be in 1..{MAX_MESSAGE}")
        if max_queue_bytes < 0 or not max_lag > 0:
            raise ValueError("max_queue_bytes must be >= 0 and max_lag > 0")
        sock.setblocking(False)
        self._sock = sock
        self.max_message = max_message
        self.max_queue_bytes = max_queue_bytes
        self.max_lag = max_lag
        self._clock = clock
        #: Told once when the socket fails for good (the worker is gone).
        self._on_error = on_error
        #: Events taken (sent or queued), events lost (refused by the
        #: bound, or queued and then let go by a resync), bytes and messages
        #: written to the socket, resyncs of a queue that grew too old.
        self.sent = 0
        self.dropped = 0
        self.bytes = 0
        self.messages = 0
        self.resyncs = 0
        #: Messages waiting for room in the socket, oldest first:
        #: (message, queued at, (stream, layer or None, kind, last chunk)).
        self._queue: deque[tuple[bytes, float, tuple[str, str | None, int, bool]]] = deque()
        self._queued_bytes = 0
        #: (stream, layer) → True when the last thing queued for that layer
        #: is a discontinuity (a second loss needs no second one), False when
        #: packets were queued after it. Cleared when the queue empties.
        self._tail: dict[tuple[str, str | None], bool] = {}
        self._writer: asyncio.AbstractEventLoop | None = None
        self.error: OSError | None = None
        self.closed = False

    @property
    def pending(self) -> int:
        """Messages waiting for room in the socket."""
        return len(self._queue)

    @property
    def pending_bytes(self) -> int:
        return self._queued_bytes

    def send(self, ev: FeedEvent) -> bool:
        """Hand ``ev`` to the worker: sent, or queued behind what waits;
        False when it was lost (the layer then resyncs at the worker)."""
        if self.closed:
            return False
        queue = self._queue
        if queue:
            self._flush()
        try:
            messages = encode(ev, self.max_message)
        except ValueError as exc:  # a bug upstream: this worker loses the event, the others do not
            event(log, logging.ERROR, "webrtc.feed_unencodable", stream=ev.stream, error=str(exc))
            self._lose(ev.stream, getattr(ev, "layer", None))
            self._flush()
            return False
        done = 0
        if not queue:
            for data in messages:
                if not self._send(data):
                    break
                done += 1
            if self.closed:
                return False
            if done == len(messages):
                self.sent += 1
                return True
        rest = messages[done:] if done else messages
        kind = type(ev)
        now = self._clock()
        if kind is PacketsEvent:
            if queue and now - queue[0][1] > self.max_lag:
                self._resync()
            if self._queued_bytes + sum(map(len, rest)) > self.max_queue_bytes:
                self._lose(ev.stream, ev.layer)  # type: ignore[union-attr]
                return False
            self._enqueue(rest, ev.stream, ev.layer, _Q_PACKETS, now)  # type: ignore[union-attr]
        elif kind is DiscontinuityEvent:
            self._enqueue(rest, ev.stream, ev.layer, _Q_DISCONTINUITY, now)  # type: ignore[union-attr]
        else:
            self._enqueue(rest, ev.stream, None, _Q_ENDED, now)
        self.sent += 1
        return True

    def _send(self, data: bytes) -> bool:
        try:
            self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                return False
            self._fail(exc)
            return False
        self.messages += 1
        self.bytes += len(data)
        return True

    # -- the queue's bookkeeping

    def _mark_discontinuity(self, key: tuple[str, str | None]) -> None:
        if key[1] is None:  # covers every layer of the stream
            self._forget(key[0])
        self._tail[key] = True

    def _forget(self, stream: str) -> None:
        tail = self._tail
        for k in [k for k in tail if k[0] == stream]:
            del tail[k]

    def _lose(self, stream: str, layer: str | None) -> None:
        """One event of ``layer`` is lost: queue its discontinuity (never
        refused: a few bytes, and at most one per run of queued packets)
        unless the last thing queued for the layer already is one."""
        if self.closed:
            return
        self.dropped += 1
        tail = self._tail
        if tail.get((stream, layer)) or ((stream, layer) not in tail and tail.get((stream, None))):
            return
        self._queue_control(DiscontinuityEvent(stream, layer), _Q_DISCONTINUITY, layer)

    def _queue_control(self, ev: FeedEvent, code: int, layer: str | None) -> None:
        self._enqueue(encode(ev), ev.stream, layer, code, self._clock())

    def _enqueue(self, messages: list[bytes], stream: str, layer: str | None, code: int, now: float) -> None:
        """Queue one event's messages (the last flagged as its end) and
        note what the layer's tail now is."""
        last = len(messages) - 1
        for i, data in enumerate(messages):
            self._queue.append((data, now, (stream, layer, code, i == last)))
            self._queued_bytes += len(data)
        if code == _Q_PACKETS:
            self._tail[(stream, layer)] = False
        elif code == _Q_DISCONTINUITY:
            self._mark_discontinuity((stream, layer))
        else:  # the end says more than any gap before it
            self._forget(stream)
        self._watch()

    def _resync(self) -> None:
        """The worker has not read for ``max_lag``: what waits is stale.
        Let every queued packet go and keep, in order, each stream's end
        and one discontinuity per layer that lost something, so that the
        worker's viewers re-base on the next keyframe instead of playing
        seconds late."""
        self.resyncs += 1
        lost: dict[tuple[str, str | None], None] = {}
        ends: list[FeedEvent] = []
        for _data, _at, (stream, layer, code, last) in self._queue:
            if code == _Q_ENDED:
                for k in [k for k in lost if k[0] == stream]:
                    del lost[k]
                ends.append(EndedEvent(stream))
                continue
            if code == _Q_PACKETS and last:
                self.dropped += 1
            if layer is None:
                for k in [k for k in lost if k[0] == stream]:
                    del lost[k]
                lost[(stream, None)] = None
            elif (stream, None) not in lost:
                lost[(stream, layer)] = None
        event(log, logging.WARNING, "webrtc.feed_resync", queued=len(self._queue),
              queued_bytes=self._queued_bytes, layers=len(lost))
        self._queue.clear()
        self._queued_bytes = 0
        self._tail.clear()
        for ev in ends:
            self._queue_control(ev, _Q_ENDED, None)
        for stream, layer in lost:
            self._queue_control(DiscontinuityEvent(stream, layer), _Q_DISCONTINUITY, layer)

    def _flush(self) -> bool:
        """Send what waits, oldest first; True when nothing is left."""
        queue = self._queue
        while queue:
            data = queue[0][0]
            if not self._send(data):
                return False
            queue.popleft()
            self._queued_bytes -= len(data)
        self._tail.clear()
        self._unwatch()
        return True

    def _watch(self) -> None:
        """Flush as soon as the socket has room, not only at the next event
        (a stream may have gone quiet)."""
        if self._writer is not None or self.closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # driven by hand: the next send flushes
            return
        loop.add_writer(self._sock.fileno(), self._on_writable)
        self._writer = loop

    def _unwatch(self) -> None:
        if self._writer is not None:
            self._writer.remove_writer(self._sock.fileno())
            self._writer = None

    def _on_writable(self) -> None:
        if self.closed or self._flush():
            self._unwatch()

    def _fail(self, exc: OSError) -> None:
        self.error = exc
        event(log, logging.WARNING, "webrtc.feed_failed", error=str(exc))
        self.close()
        if self._on_error is not None:
            self._on_error(self, exc)

    def close(self) -> None:
        """Stop sending (the socket stays the caller's to close)."""
        if self.closed:
            return
        self._unwatch()
        self.closed = True
        self._queue.clear()
        self._queued_bytes = 0
        self._tail.clear()


class FeedReceiver:
    """The worker end of the feed: reads on the running loop, decodes, and
    hands each event to ``on_event`` (the worker routes it to the stream's
    PacketFanout). ``on_eof`` is told once when the main process closed the
    feed."""

    def __init__(self, sock: socket.socket, on_event: Callable[[FeedEvent], None], *,
                 max_per_wakeup: int = 64, on_eof: Callable[["FeedReceiver"], None] | None = None) -> None:
        if max_per_wakeup < 1:
            raise ValueError("max_per_wakeup must be at least 1")
        sock.setblocking(False)
        self._sock = sock
        self._on_event = on_event
        self._on_eof = on_eof
        self.max_per_wakeup = max_per_wakeup
        self._buf = bytearray(MAX_MESSAGE)
        self._view = memoryview(self._buf)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.received = 0
        self.bytes = 0
        #: Messages that did not decode (logged, dropped).
        self.errors = 0
        #: Events whose handler raised (logged; the feed goes on).
        self.handler_errors = 0
        self.closed = False

    def start(self) -> None:
        """Read on the running loop from now on."""
        if self._loop is not None or self.closed:
            return
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._sock.fileno(), self.read_available)

    def read_available(self) -> int:
        """Read and hand on what is queued, at most ``max_per_wakeup``
        messages; returns how many were read."""
        sock, view, buf = self._sock, self._view, self._buf
        count = 0
        while count < self.max_per_wakeup and not self.closed:
            try:
                n = sock.recv_into(buf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                event(log, logging.WARNING, "webrtc.feed_read_failed", error=str(exc))
                self._eof()
                break
            if n == 0:  # SOCK_SEQPACKET: the peer closed (we never send empty messages)
                self._eof()
                break
            count += 1
            self.received += 1
            self.bytes += n
            try:
                ev = decode(view[:n])
            except FeedError as exc:
                self.errors += 1
                event(log, logging.WARNING, "webrtc.feed_garbage", error=str(exc), size=n)
                continue
            try:
                self._on_event(ev)
            except Exception:  # one stream's bug must not stop the feed of the others
                self.handler_errors += 1
                log.exception("feed event handler failed")
        return count

    def _eof(self) -> None:
        self.close()
        if self._on_eof is not None:
            self._on_eof(self)

    def close(self) -> None:
        """Stop reading (the socket stays the caller's to close)."""
        if self.closed:
            return
        self.closed = True
        if self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._loop = None
