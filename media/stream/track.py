"""Per-track properties and statistics (resolution, fps, GOP, bitrate,
sample rate), updated by each frame the stream delivers."""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from media import h264
from media.aac import AdtsHeader
from media.errors import BitstreamError
from media.opus import Toc
from media.unit import Unit

__all__ = ["TrackInfo", "Track"]

# One logger for the whole package: its records keep the name they had
# when the stream was one module.
log = logging.getLogger("media.stream")


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

    def update(self, unit: Unit, data: bytes, ts: int | None, clock_rate: int, keyframe: bool) -> None:
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

    def _update_video(self, unit: Unit, data: bytes, ts: int | None, clock_rate: int, keyframe: bool) -> None:
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
