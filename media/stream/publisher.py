"""Publishers: the handle an ingest session publishes through.

A :class:`Publisher` maps a source's units to the stream's tracks — TS PIDs
to layers (simulcast PIDs ranked by picture area, held back until ranked),
the first audio PID to 'audio', WHIP RIDs by the ``layer`` argument — and
hands each unit to its stream through the :class:`PublishTarget` methods.
It knows the stream only through that protocol, so this module imports
nothing above :mod:`media.stream.types`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from media import h264
from media.errors import BitstreamError
from media.unit import Unit

from .types import VIDEO_CODECS, SourceInfo, layer_names

__all__ = ["PublishTarget", "Publisher", "PublisherInfo"]


@dataclass(frozen=True, slots=True)
class PublisherInfo:
    protocol: str
    remote: str
    layer: str | None
    epoch: int
    attached_at: float
    frames: int


class PublishTarget(Protocol):
    """What a :class:`Publisher` calls on its stream (:class:`~media.stream.Stream`)."""

    def accept_video(self, pub: Publisher, unit: Unit, layer: str, pid: int | None) -> None: ...

    def accept_audio(self, pub: Publisher, unit: Unit, pid: int | None) -> None: ...

    def accept_ts(self, pub: Publisher, data: bytes, rap_offset: int | None, psi: bytes) -> None: ...

    def accept_discontinuity(self, pub: Publisher, layer: str | None) -> None: ...

    def detach_publisher(self, publisher: Publisher | None = None, now: float | None = None) -> None: ...


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
        "_counters",
    )

    PENDING_LIMIT = 4 << 20  # bytes held while simulcast layers are being ranked

    def __init__(self, stream: PublishTarget, info: SourceInfo, layer: str | None, epoch: int, now: float) -> None:
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
        self._pending: list[Unit] = []
        self._pending_bytes = 0
        self._sizes: dict[int, int] = {}  # pid → picture area
        self._counters: Callable[[], Mapping[str, Any]] | None = None

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

    def publish(self, unit: Unit, *, layer: str | None = None) -> None:
        """Publish one access unit. ``layer`` names the video layer for
        sources without PIDs (WHIP RIDs); otherwise the PID mapping or the
        publisher's layer decides."""
        if not self.active:
            self.ignored += 1
            return
        self.frames += 1
        self._route(unit, layer)

    def _route(self, unit: Unit, layer: str | None) -> None:
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
            self.stream.accept_video(self, unit, layer, pid)
        else:
            if pid is not None and self._video_pids is not None and pid != self._audio_pid:
                self.ignored += 1
                return
            self.stream.accept_audio(self, unit, pid)

    def _hold(self, unit: Unit, pid: int) -> None:
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
            self.stream.accept_ts(self, data, rap_offset, psi)

    def discontinuity(self, layer: str | None = None) -> None:
        """The source lost data or reset timestamps (TsDiscontinuity):
        readers get a 'source' marker and video restarts at a keyframe."""
        if self.active:
            self.stream.accept_discontinuity(self, layer)

    @property
    def layers(self) -> dict[int, str]:
        """PID → layer mapping in force."""
        return dict(self._pid_layer)

    def mapped_layers(self) -> set[str]:
        """The layers the PID mapping feeds (empty before it is known)."""
        return set(self._pid_layer.values())

    def set_source_counters(self, read: Callable[[], Mapping[str, Any]] | None) -> None:
        """Where :meth:`source_counters` reads from (the ingest session that
        publishes through this handle: demuxer and transport counters)."""
        self._counters = read

    def source_counters(self) -> Mapping[str, Any]:
        """The source's running totals (TR 101 290 counters, SRT stats) for
        monitors such as the live QC; empty when the source keeps none."""
        return self._counters() if self._counters is not None else {}

    def stats(self) -> PublisherInfo:
        return PublisherInfo(self.info.protocol, self.info.remote, self.layer, self.epoch, self.attached_at, self.frames)
