"""AAC → Opus transcoding for WebRTC viewers of AAC sources.

WebRTC has no AAC, so an SRT source carrying AAC needs its audio as Opus.
This is the only re-encoding the server does, and it runs once per stream
(wire one :class:`TranscodeWorker` as an audio reader of the Stream and
publish its packets as the stream's Opus track), never per viewer.

Pipeline (PyAV): ADTS frames → FFmpeg ``aac`` decoder → ``AudioResampler``
(48 kHz, s16, mono or stereo as the source; more channels are downmixed to
stereo; exact frames of 20 ms, 960 samples) → ``libopus`` encoder (20 ms
frames, RFC 7587 clock 48 kHz, ``application=lowdelay`` by default).

Delay (what a sound waits between the AAC source and the Opus out; the
viewers' sender reports take it into account through the PTS, see
media/webrtc/fanout.py): the AAC encoder of the source cannot send a frame
before the 2048 samples its window spans (42.7 ms, the source's cost);
here an Opus frame waits for the AAC frame that completes it (0–21 ms,
1024- vs 960-sample frames), for its own 20 ms, and for libopus's look-ahead
— 6.5 ms with ``application=audio``, 2.5 ms with ``lowdelay`` (CELT only,
no SILK: fine for programme sound at these bitrates), hence the default.
Decoding, resampling, encoding and the executor hop add about 1 ms of wall
time (measured: mean 1.1 ms, max 5 ms, frames pushed in real time). 10 ms
frames (``frame_ms=10``) would save about 5 ms more but double the audio
packets every viewer is sent, which the fan-out pays per viewer.

Timestamps. The first AAC frame's 90 kHz PTS fixes the origin: its 48 kHz
equivalent (PTS × 8 / 15). Output packet PTS are the encoder's, on that 48
kHz clock; libopus reports its look-ahead (312 samples, 120 with
``lowdelay``) as a negative offset (the first packet's PTS is origin −
look-ahead), which keeps audio aligned with video for receivers that do not
apply pre-skip (WebRTC): a sound at AAC PTS P plays at Opus timestamp
P × 8/15 (tests/unit/test_transcode.py checks it). A jump of more than
100 ms between the expected and the received AAC PTS (lost frames, a
publisher reconnect) flushes the encoder and restarts the pipeline at the
new PTS. The 33-bit PTS wrap (26.5 h) is treated as such a jump.

CPU. :meth:`AacToOpus.process` is synchronous CPU work (≈ a few % of a core
per stereo stream); call it from an executor thread — :class:`TranscodeWorker`
does that, batching whatever arrived while the previous batch ran, so the
event loop never runs codec code.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av

from media.aac import AdtsHeader
from media.errors import BitstreamError, LocalMediaError

__all__ = ["OpusPacket", "AacToOpus", "TranscodeWorker", "run_in_executor"]

log = logging.getLogger(__name__)

_TB48 = Fraction(1, 48000)
_TB90 = Fraction(1, 90000)
_FRAME_MS = (10, 20)  # libopus frame durations offered (samples at 48 kHz: ×48)
_JUMP = 9000  # 100 ms in 90 kHz ticks


@dataclass(frozen=True, slots=True)
class OpusPacket:
    """One encoded Opus packet; fits media.unit.Unit."""

    data: bytes
    pts: int  # 48 kHz
    duration: int  # samples at 48 kHz
    channels: int
    codec: str = "opus"
    clock_rate: int = 48000
    keyframe: bool = True

    @property
    def dts(self) -> int:
        return self.pts


class AacToOpus:
    """Stateful AAC (ADTS) → Opus transcoder for one stream.

    Not thread-safe: use it from one thread at a time (TranscodeWorker runs
    one batch at a time)."""

    def __init__(self, *, bitrate: int | None = None, application: str = "lowdelay", frame_ms: int = 20) -> None:
        if application not in ("audio", "voip", "lowdelay"):
            raise LocalMediaError(f"unknown libopus application {application!r}")
        if frame_ms not in _FRAME_MS:
            raise LocalMediaError(f"Opus frames of {frame_ms} ms not offered; use one of {_FRAME_MS}")
        self._frame_ms = frame_ms
        self._frame = frame_ms * 48
        self._bitrate = bitrate
        self._application = application
        self._decoder: Any = None
        self._resampler: Any = None
        self._encoder: Any = None
        self._channels = 0
        self._layout = ""
        self._origin48 = 0
        self._fed = 0  # samples (48 kHz) given to the encoder since the origin
        self._expected: int | None = None  # next AAC PTS (90 kHz)
        self._in_rate = 0
        self.frames_in = 0
        self.packets_out = 0
        self.decode_errors = 0
        self.resets = 0

    @property
    def channels(self) -> int:
        return self._channels

    def process(self, frames: Iterable[Any]) -> list[OpusPacket]:
        """Transcode a batch. Each item is an object with ``data`` (one ADTS
        frame) and ``pts`` (90 kHz), or a ``(data, pts)`` tuple."""
        out: list[OpusPacket] = []
        for item in frames:
            if isinstance(item, tuple):
                data, pts = item
            else:
                data, pts = item.data, item.pts
            self._one(bytes(data), pts, out)
        return out

    def flush(self) -> list[OpusPacket]:
        """Encode what is buffered (end of stream)."""
        out: list[OpusPacket] = []
        self._drain(out)
        self._decoder = self._resampler = self._encoder = None
        self._expected = None
        return out

    # ------------------------------------------------------------ internals

    def _one(self, data: bytes, pts: int | None, out: list[OpusPacket]) -> None:
        try:
            hdr = AdtsHeader.parse(data)
        except BitstreamError:
            self.decode_errors += 1
            return
        self.frames_in += 1
        channels = 1 if hdr.channels == 1 else 2
        if pts is None:
            pts = self._expected if self._expected is not None else 0
        if (
            self._encoder is None
            or channels != self._channels
            or hdr.sample_rate != self._in_rate
            or self._expected is None
            or abs(pts - self._expected) > _JUMP
        ):
            if self._encoder is not None:
                self.resets += 1
                self._drain(out)
            self._open(channels, hdr.sample_rate, pts)
        self._expected = pts + hdr.samples * 90000 // hdr.sample_rate
        packet = av.Packet(data)
        packet.pts = pts
        packet.time_base = _TB90
        try:
            decoded = self._decoder.decode(packet)
        except av.FFmpegError as exc:
            self.decode_errors += 1
            log.debug("AAC decode error: %s", exc)
            return
        for frame in decoded:
            frame.pts = None
            for res in self._resampler.resample(frame):
                self._encode(res, out)

    def _open(self, channels: int, rate: int, pts: int) -> None:
        self._channels = channels
        self._in_rate = rate
        self._layout = "mono" if channels == 1 else "stereo"
        self._decoder = av.CodecContext.create("aac", "r")
        self._resampler = av.AudioResampler(format="s16", layout=self._layout, rate=48000, frame_size=self._frame)
        enc = av.CodecContext.create("libopus", "w")
        enc.sample_rate = 48000
        enc.layout = self._layout
        enc.format = "s16"
        enc.time_base = _TB48
        enc.bit_rate = self._bitrate or (32000 if channels == 1 else 64000)
        enc.options = {"application": self._application, "frame_duration": str(self._frame_ms)}
        enc.open()
        self._encoder = enc
        self._origin48 = pts * 8 // 15
        self._fed = 0

    def _encode(self, frame: Any, out: list[OpusPacket]) -> None:
        frame.pts = self._origin48 + self._fed
        frame.time_base = _TB48
        self._fed += frame.samples
        self._emit(self._encoder.encode(frame), out)

    def _drain(self, out: list[OpusPacket]) -> None:
        if self._encoder is None:
            return
        try:
            for res in self._resampler.resample(None):
                self._encode(res, out)
        except av.FFmpegError as exc:  # resampler already flushed
            log.debug("resampler flush: %s", exc)
        self._emit(self._encoder.encode(None), out)

    def _emit(self, packets: Iterable[Any], out: list[OpusPacket]) -> None:
        for p in packets:
            self.packets_out += 1
            out.append(OpusPacket(bytes(p), int(p.pts), int(p.duration or self._frame), self._channels))


async def run_in_executor(
    transcoder: AacToOpus,
    frames: Iterable[Any],
    executor: concurrent.futures.Executor | None = None,
) -> list[OpusPacket]:
    """Run one ``transcoder.process(frames)`` batch off the event loop."""
    batch = list(frames)
    return await asyncio.get_running_loop().run_in_executor(executor, transcoder.process, batch)


class TranscodeWorker:
    """Feeds an :class:`AacToOpus` from the event loop in batches.

    ``push(frame)`` is synchronous and never blocks (call it from a Stream
    reader's callback or drain loop); a task owned by the worker sends what
    accumulated to the executor, one batch at a time, and hands the packets
    to ``on_packets`` on the event loop. When more than ``max_pending``
    frames wait (the executor cannot keep up) the oldest are dropped and
    counted. Start with ``start()``, stop with ``await stop()``.
    """

    def __init__(
        self,
        transcoder: AacToOpus,
        on_packets: Callable[[list[OpusPacket]], None],
        *,
        executor: concurrent.futures.Executor | None = None,
        max_pending: int = 256,
    ) -> None:
        self.transcoder = transcoder
        self._on_packets = on_packets
        self._executor = executor
        self._max_pending = max_pending
        self._pending: list[Any] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stopping = False
        self.dropped = 0
        self.batches = 0

    def push(self, frame: Any) -> None:
        pending = self._pending
        pending.append(frame)
        if len(pending) > self._max_pending:
            excess = len(pending) - self._max_pending
            del pending[:excess]
            self.dropped += excess
        self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._stopping = False
            self._task = asyncio.get_running_loop().create_task(self._run(), name="aac-to-opus")

    async def stop(self, timeout: float = 2.0) -> None:
        """Finish what is pending (up to ``timeout``), flush, end the task."""
        task = self._task
        if task is None:
            return
        self._stopping = True
        self._wake.set()
        try:
            await asyncio.wait_for(task, timeout)
        except asyncio.TimeoutError:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                if self._stopping:
                    break
                self._wake.clear()
                await self._wake.wait()
                continue
            batch, self._pending = self._pending, []
            self.batches += 1
            packets = await loop.run_in_executor(self._executor, self.transcoder.process, batch)
            if packets:
                self._deliver(packets)
        packets = await loop.run_in_executor(self._executor, self.transcoder.flush)
        if packets:
            self._deliver(packets)

    def _deliver(self, packets: list[OpusPacket]) -> None:
        try:
            self._on_packets(packets)
        except Exception:
            log.exception("on_packets callback failed")
