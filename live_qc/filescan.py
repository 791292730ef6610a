"""``returnfeed qc FILE``: decode a recording and run the live detectors on it.

Decoding is PyAV: audio resampled to 48 kHz float planar, video as the Y
plane of every frame (the engine picks the frames it analyses). Times are on
the file's timeline as the ffmpeg CLI prints them: 0 is the container's
start time.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import av
import numpy as np

from media.mpegts import AccessUnit, TsDemuxer, TsDiscontinuity

from .engine import QcEngine, closed_markers
from .loudness import RATE
from .markers import Marker, MarkerEvent
from .stream import StreamMonitor
from .thresholds import Thresholds

#: Bytes handed to the demuxer at a time: one SRT/UDP message of 7 packets.
_TS_MESSAGE = 7 * 188


class QcFileError(Exception):
    """The file cannot be analysed (missing, not media, truncated); one line for the user."""


@dataclass(slots=True)
class FileReport:
    file: str
    duration_s: float
    markers: list[Marker]
    loudness: dict[str, float | None]

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "duration_s": round(self.duration_s, 3),
            "markers": [m.to_json() for m in self.markers],
            "loudness": self.loudness,
        }


def _luma(frame: av.VideoFrame) -> np.ndarray:
    if frame.format.name not in ("yuv420p", "yuvj420p", "yuv422p", "yuv444p", "nv12"):
        frame = frame.reformat(format="yuv420p")
    plane = frame.planes[0]
    rows = np.frombuffer(plane, dtype=np.uint8).reshape(plane.height, plane.line_size)
    return rows[:, : plane.width]


def analyse_file(path: str, thresholds: Thresholds | None = None) -> FileReport:
    if not os.path.isfile(path):
        raise QcFileError(f"{path}: no such file")
    try:
        container = av.open(path)
    except av.error.FFmpegError as exc:
        with open(path, "rb") as fh:
            head = fh.read(12)
        if head[4:8] == b"ftyp":
            # An MP4/MOV whose recording stopped before its index (moov) was written.
            raise QcFileError(f"{path}: truncated or damaged MP4 (no index; {exc.strerror or exc})") from None
        raise QcFileError(f"{path}: not a media file ({exc.strerror or exc})") from None
    with container:
        vstreams = list(container.streams.video[:1])
        astreams = list(container.streams.audio[:1])
        if not vstreams and not astreams:
            raise QcFileError(f"{path}: no audio or video stream")
        origin = container.start_time / 1e6 if container.start_time is not None else 0.0
        declared = container.duration / 1e6 if container.duration else None
        # The file's whole history is measured, so keep every gating block
        # (exact integrated loudness) rather than the live tap's histogram.
        engine = QcEngine(thresholds, histogram=False)
        resampler = None
        audio_t0: float | None = None
        last = 0.0
        decoded = 0
        fed = 0  # audio samples given to the engine
        events = []
        for s in vstreams:
            s.thread_type = "AUTO"
        try:
            for packet in container.demux(*vstreams, *astreams):
                for frame in packet.decode():
                    decoded += 1
                    if isinstance(frame, av.VideoFrame):
                        if frame.pts is None:
                            continue
                        t = float(frame.pts * frame.time_base) - origin
                        events += engine.video(t, _luma(frame))
                        last = max(last, t + (1.0 / float(vstreams[0].average_rate or 25)))
                    elif isinstance(frame, av.AudioFrame):
                        if resampler is None:
                            resampler = av.AudioResampler(format="fltp", layout=frame.layout.name, rate=RATE)
                        if audio_t0 is None and frame.pts is not None:
                            audio_t0 = float(frame.pts * frame.time_base) - origin
                        for out in resampler.resample(frame):
                            x = out.to_ndarray()
                            events += engine.audio((audio_t0 or 0.0) + fed / RATE, x)
                            fed += x.shape[1]
            if resampler is not None:
                for out in resampler.resample(None):
                    x = out.to_ndarray()
                    events += engine.audio((audio_t0 or 0.0) + fed / RATE, x)
                    fed += x.shape[1]
        except av.error.FFmpegError as exc:
            if decoded == 0:
                raise QcFileError(f"{path}: cannot decode ({exc.strerror or exc})") from None
            raise QcFileError(f"{path}: truncated or corrupt after {last:.2f} s ({exc.strerror or exc})") from None
        if decoded == 0:
            raise QcFileError(f"{path}: no decodable audio or video")
        end = max(last, engine.media_end)
        if declared is not None and end + 0.5 < declared:
            raise QcFileError(f"{path}: truncated: media ends at {end:.2f} s of a declared {declared:.2f} s")
        if declared is not None:
            end = min(end, declared)  # a decoder's last frame may run past the container's end
        markers = closed_markers(events + engine.flush(end))
        if "mpegts" in container.format.name:
            markers = sorted(markers + scan_ts(path, origin, thresholds),
                             key=lambda m: (m.start, m.type, m.subtype))
        summary = engine.loudness_summary()
        empty = {"integrated_lufs": None, "lra_lu": None, "true_peak_dbtp": None,
                 "max_momentary_lufs": None, "max_short_term_lufs": None}
        return FileReport(path, declared if declared is not None else end, markers,
                          summary.to_json() if summary else empty)


def scan_ts(path: str, origin: float = 0.0, thresholds: Thresholds | None = None) -> list[Marker]:
    """The stream detectors (live_qc/stream.py) over an MPEG-TS file's own
    packets: TR 101 290 counters, B-frames, SPS changes, stalls and rates.

    A file has no arrival time, so the clock is the one a real-time sender
    paces it by: the latest PCR (ISO/IEC 13818-1 §2.4.2.2), or in a file
    without PCRs the latest decode time; the counters are sampled every
    0.1 s of it. Times are on the file's timeline (``origin`` subtracted).
    Only the first video and the first audio PID are followed, as the live
    tap follows one layer."""
    with open(path, "rb") as fh:
        data = fh.read()
    now = _first_decode_time(data)
    if now is None:
        return []
    has_pcr = False
    demux = TsDemuxer()
    monitor = StreamMonitor(thresholds)
    events: list[MarkerEvent] = list(monitor.on_counters(now, {"file": _counters(demux)}))
    pids: dict[str, int] = {}
    sampled = now
    for i in range(0, len(data), _TS_MESSAGE):
        message = data[i:i + _TS_MESSAGE]
        pcr = _last_pcr(message)
        if pcr is not None:
            has_pcr = True
            now = max(now, pcr)
        for ev in demux.feed(message, now, end_of_message=True):
            if isinstance(ev, AccessUnit) and ev.pts is not None:
                kind = "video" if ev.codec in ("h264", "hevc") else "audio"
                if pids.setdefault(kind, ev.pid) != ev.pid:
                    continue
                if not has_pcr:
                    now = max(now, (ev.dts if ev.dts is not None else ev.pts) / 90000)
                events += monitor.on_frame(kind, now, ev.pts / 90000, len(ev.data), ev.keyframe, ev.pts, ev.dts,
                                           ev.data if ev.keyframe else None, ev.codec)
            elif isinstance(ev, TsDiscontinuity):
                events += monitor.on_discontinuity(now, "source")
        deadline = monitor.get_timer()
        if deadline is not None and deadline <= now:
            events += monitor.handle_timer(now)
        if now - sampled >= 0.1:
            sampled = now
            events += monitor.on_counters(now, {"file": _counters(demux)})
            events += monitor.handle_timer(now)
    for ev in demux.flush(now):
        if isinstance(ev, AccessUnit) and ev.pts is not None and pids.get(
                "video" if ev.codec in ("h264", "hevc") else "audio") == ev.pid:
            events += monitor.on_frame("video" if ev.codec in ("h264", "hevc") else "audio", now, ev.pts / 90000,
                                       len(ev.data), ev.keyframe, ev.pts, ev.dts, None, ev.codec)
    events += monitor.on_counters(now, {"file": _counters(demux)})
    events += monitor.flush(now)
    out = []
    for m in closed_markers(events):
        m.start -= origin
        if m.end is not None:
            m.end -= origin
        out.append(m)
    return out


def _counters(demux: TsDemuxer) -> dict[str, int]:
    c = demux.counters()
    return {name: getattr(c, name) for name in c.__dataclass_fields__}


def _first_decode_time(data: bytes) -> float | None:
    """Where the file's clock starts: its first PCR, else the decode time of
    its first access unit (starting at 0 would read as a PAT/PCR gap up to
    there)."""
    probe = TsDemuxer()
    for i in range(0, min(len(data), 4 << 20), _TS_MESSAGE):
        message = data[i:i + _TS_MESSAGE]
        pcr = _last_pcr(message)
        if pcr is not None:
            return pcr
        for ev in probe.feed(message, 0.0, end_of_message=True):
            if isinstance(ev, AccessUnit) and ev.pts is not None:
                return (ev.dts if ev.dts is not None else ev.pts) / 90000
    return None


def _last_pcr(message: bytes) -> float | None:
    """The last PCR base in a run of aligned packets, in seconds. Shrunk by a
    part in 10⁹: a PCR exactly 100 ms after the last is within TR 101 290
    2.3a (more than 100 ms is the error), and the float seconds of the two
    must not make it more."""
    found = None
    p = message
    for i in range(0, len(p) - 187, 188):
        # sync byte, adaptation field present, long enough, PCR_flag
        if p[i] == 0x47 and p[i + 3] & 0x20 and p[i + 4] >= 7 and p[i + 5] & 0x10:
            base = (p[i + 6] << 25) | (p[i + 7] << 17) | (p[i + 8] << 9) | (p[i + 9] << 1) | (p[i + 10] >> 7)
            found = base / 90000 * (1 - 1e-9)
    return found


def format_table(report: FileReport) -> str:
    lines = [f"{report.file}  duration {report.duration_s:.3f} s", ""]
    if report.markers:
        lines.append(f"{'type':<10} {'subtype':<14} {'start_s':>9} {'end_s':>9} {'severity':<8} metadata")
        for m in report.markers:
            end = "-" if m.end is None else f"{m.end:9.3f}"
            meta = ", ".join(f"{k}={v}" for k, v in m.metadata.items())
            lines.append(f"{m.type:<10} {m.subtype:<14} {m.start:9.3f} {end:>9} {m.severity:<8} {meta}")
    else:
        lines.append("no faults found")
    lines.append("")
    names = {"integrated_lufs": "integrated (LUFS)", "lra_lu": "loudness range (LU)",
             "true_peak_dbtp": "true peak (dBTP)", "max_momentary_lufs": "max momentary (LUFS)",
             "max_short_term_lufs": "max short-term (LUFS)"}
    for key, label in names.items():
        v = report.loudness.get(key)
        lines.append(f"{label:<24} {'-' if v is None or (isinstance(v, float) and math.isinf(v)) else v}")
    return "\n".join(lines)
