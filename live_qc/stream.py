"""Stream detectors: what the compressed stream and its transport tell,
without decoding a picture (issue 12, "Stream detectors").

:class:`StreamMonitor` is sans-I/O like the other detectors: the caller
hands it each frame's metadata and the source's counters with an explicit
``now`` (seconds, any monotonic clock) and asks :meth:`~StreamMonitor.get_timer`
when to call :meth:`~StreamMonitor.handle_timer`; every call returns
:class:`~live_qc.markers.MarkerEvent`\\ s whose markers open and close through
the shared :class:`~live_qc.markers.FaultTracker`. Everything per frame is
O(1) arithmetic (plus an SPS scan of keyframes), so the server runs it on the
event loop beside the forwarding path::

    on_frame(kind, now, media_t, size, keyframe, pts, dts, data)
        ├─ video/audio arrival ──────────► stall (wall clock: handle_timer)
        ├─ video frame windows (media t) ► fps_drop, bitrate_collapse
        ├─ pts ≠ dts / pts going back ───► b_frames
        └─ keyframe SPS (media/h264.py) ─► resolution_change, profile_change
    on_counters(now, {source: counters})
        ├─ TsCounters fields ────────────► TR 101 290 markers
        ├─ pktRcvLoss/pktRcvDrop/pktRecv ► srt_loss, srt_drop
        ├─ rtpGaps/rtpLost/rtpRecv (WHIP) ► rtp_loss, rtp_drop
        └─ any source listed ────────────► "the connection is still there"

Markers (type / subtype, severity):

``stall``
    ``video_stalled``, ``audio_stalled`` (error): a track that was flowing
    delivered nothing for ``stall_d`` s of wall clock while the other track
    still delivered or the source is still connected (its publisher
    attached: a hung encoder); start back-dated to where the next frame was
    due, end at the first frame back. A source that left is not a stall
    (the stream goes to reconnecting).
    ``fps_drop`` (warning): frames over ``fps_window_s`` of media time below
    ``fps_ratio`` × the stream's own rate over the preceding
    ``rate_baseline_s``, for ``fps_d``. ``bitrate_collapse`` (warning):
    video bytes over ``bitrate_window_s`` below ``bitrate_ratio`` × that
    baseline, for ``bitrate_d``. Both baselines are frozen while their fault
    is pending or open, and need ``rate_baseline_s`` of history first.
``transport``
    TR 101 290 (ETSI TR 101 290 V1.4.1 §5.2.1 priority 1 → severity error:
    ``ts_sync_loss``, ``sync_byte_error``, ``pat_error``, ``cc_error``,
    ``pmt_error``, ``pid_error``; §5.2.2 priority 2 → warning:
    ``transport_error``, ``crc_error``, ``pcr_repetition_error``,
    ``pcr_discontinuity_error``, ``pts_error``), the demuxer's counter names
    (media/mpegts/events.py ``TsCounters``). A counter that grows opens the
    marker (or extends it; an ``update`` at most once a second carries the
    counts) and it closes ``transport_clear_s`` after the last increment.
    ``pcr_repetition_error`` is timed on arrival, so it needs
    ``pcr_repetition_min`` within ``pcr_repetition_window_s`` to open (one
    late PCR is network or event-loop jitter).
    ``srt_loss`` (warning) / ``srt_drop`` (error): libsrt's loss/drop totals
    over ``srt_window_s`` (see the thresholds), same hysteresis.
    ``rtp_loss`` (warning) / ``rtp_drop`` (error): the same for a WHIP
    publisher's RTP (media/webrtc/whip/rtp_ingest.py): sequence numbers
    missing on arrival (a NACK or the reorder buffer may still repair them)
    and those given up on, judged with the same ``srt_*`` thresholds — the
    question ("is the contribution link losing packets, and is the loss
    repaired?") and its answer do not depend on the protocol.
    ``b_frames`` (error): reordered frames (pts ≠ dts, or pts going back);
    WebRTC viewers cannot be served them passthrough.
    ``resolution_change`` / ``profile_change`` (warning): the SPS's
    width×height, or profile_idc/level_idc (ITU-T H.264 §7.3.2.1.1), differ
    from the previous SPS; the marker spans the change and closes after
    ``transport_clear_s`` without another.

Media time for markers raised by the wall clock (stalls, counters) is the
latest frame's media time advanced by the wall clock since it came.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from media import h264
from media.errors import BitstreamError

from .markers import FaultTracker, Marker, MarkerEvent
from .thresholds import Thresholds

__all__ = ["TR101290_P1", "TR101290_P2", "StreamMonitor"]

#: TR 101 290 V1.4.1 §5.2.1 (first priority: the stream cannot be decoded).
TR101290_P1 = ("ts_sync_loss", "sync_byte_error", "pat_error", "cc_error", "pmt_error", "pid_error")
#: §5.2.2 (second priority: recommended continuous monitoring).
TR101290_P2 = ("transport_error", "crc_error", "pcr_repetition_error", "pcr_discontinuity_error", "pts_error")

# The source counts as connected for this long after a counter sample listed
# it (samples come a few times a second); the other track counts as still
# delivering when its last frame is at most this old.
_ALIVE_S = 1.0
# At most one ``update`` per open counter marker this often (each one is a
# broadcast and a database write).
_UPDATE_EVERY_S = 1.0
# A frame this far from the previous one of its kind (media time) is a
# timestamp jump (encoder restart, wrap), not a gap: the windows start over.
_JUMP_S = 10.0
# The expected frame interval used to back-date a stall is at most this.
_MAX_INTERVAL_S = 0.5


@dataclass(slots=True)
class _Window:
    """(media time, bytes) of the frames within ``span`` seconds of the latest."""

    span: float
    items: deque[tuple[float, int]] = field(default_factory=deque)
    total: int = 0

    def add(self, t: float, size: int) -> None:
        self.items.append((t, size))
        self.total += size
        horizon = t - self.span
        items = self.items
        while items[0][0] <= horizon:
            self.total -= items.popleft()[1]

    def clear(self) -> None:
        self.items.clear()
        self.total = 0


@dataclass(slots=True)
class _LossWindow:
    """A link's loss over a sliding window of counter samples: packets
    reported missing (``lost``: repairable), received, and lost for good
    (``dropped``), from one set of running-total names."""

    lost_key: str
    received_key: str
    dropped_key: str
    items: deque[tuple[float, int, int, int]] = field(default_factory=deque)  # (now, lost, received, dropped)
    sums: list[int] = field(default_factory=lambda: [0, 0, 0])

    def add(self, now: float, span: float, lost: int, received: int, dropped: int) -> None:
        sums = self.sums
        if lost or received or dropped:
            self.items.append((now, lost, received, dropped))
            sums[0] += lost
            sums[1] += received
            sums[2] += dropped
        while self.items and self.items[0][0] <= now - span:
            _, a, b, c = self.items.popleft()
            sums[0] -= a
            sums[1] -= b
            sums[2] -= c


@dataclass(slots=True)
class _CounterFault:
    """One counter-driven marker: the tracker, its open marker and its counts."""

    tracker: FaultTracker
    last_hit: float | None = None  # now of the latest sample that found the fault
    marker: Marker | None = None  # as opened (for updates)
    counts: dict[str, Any] = field(default_factory=dict)
    updated_at: float = 0.0
    dirty: bool = False


class StreamMonitor:
    """The stream detectors of one stream (see the module docstring)."""

    def __init__(self, thresholds: Thresholds | None = None) -> None:
        th = self.th = thresholds or Thresholds()
        self._anchor: float | None = None  # now of the first call: media axis before any frame
        self._ref: tuple[float, float] | None = None  # (now, media t) of the latest frame
        # stalls
        self._arrival: dict[str, float | None] = {"video": None, "audio": None}
        self._last_t: dict[str, float | None] = {"video": None, "audio": None}
        self._interval: dict[str, float] = {"video": 0.0, "audio": 0.0}
        self._stall = {k: FaultTracker("stall", f"{k}_stalled", 0.0, 0.0, "error") for k in ("video", "audio")}
        self._alive_at: float | None = None
        self._judged_at: float | None = None  # now of the latest handle_timer
        # rates (video, media time)
        self._fps_win = _Window(th.fps_window_s)
        self._br_win = _Window(th.bitrate_window_s)
        self._base_win = _Window(th.rate_baseline_s)
        self._history_from: float | None = None
        self._measure_from: float | None = None  # the short windows hold a full span from here
        self._fps_base: float | None = None
        self._br_base: float | None = None
        self._fps = FaultTracker("stall", "fps_drop", th.fps_d, th.rate_clear_s, "warning")
        self._bitrate = FaultTracker("stall", "bitrate_collapse", th.bitrate_d, th.rate_clear_s, "warning")
        # reordering and format (video, media time)
        self._bframes = FaultTracker("transport", "b_frames", 0.0, th.transport_clear_s, "error")
        self._max_pts: int | None = None
        self._reordered = 0  # reordered frames since the b_frames marker opened
        self._sps: bytes | None = None
        self._format: tuple[int, int, int, int] | None = None
        self._resolution = FaultTracker("transport", "resolution_change", 0.0, th.transport_clear_s, "warning")
        self._profile = FaultTracker("transport", "profile_change", 0.0, th.transport_clear_s, "warning")
        # counters
        self._prev: dict[Hashable, Mapping[str, Any]] = {}
        self._sampled_at: float | None = None
        self._tr: dict[str, _CounterFault] = {
            name: _CounterFault(FaultTracker("transport", name, 0.0, 0.0,
                                             "error" if name in TR101290_P1 else "warning"))
            for name in TR101290_P1 + TR101290_P2
        }
        # (window, loss fault, drop fault) per link kind
        self._links = [
            (_LossWindow(lost_key, received_key, dropped_key),
             _CounterFault(FaultTracker("transport", f"{kind}_loss", 0.0, 0.0, "warning")),
             _CounterFault(FaultTracker("transport", f"{kind}_drop", 0.0, 0.0, "error")))
            for kind, lost_key, received_key, dropped_key in (("srt", "pktRcvLoss", "pktRecv", "pktRcvDrop"),
                                                              ("rtp", "rtpGaps", "rtpRecv", "rtpLost"))]
        self._pcr_hits: deque[tuple[float, int]] = deque()  # (now, PCR_repetition_errors) in the window

    # -- the media axis ------------------------------------------------------------
    def media_at(self, now: float) -> float:
        """Media time at wall-clock ``now``: the latest frame's, advanced by the
        clock since it came (before any frame: seconds since the first call)."""
        if self._ref is None:
            if self._anchor is None:
                self._anchor = now
            return now - self._anchor
        ref_now, ref_t = self._ref
        return ref_t + (now - ref_now)

    # -- frames --------------------------------------------------------------------
    def on_frame(self, kind: str, now: float, media_t: float, size: int, keyframe: bool = False,
                 pts: int | None = None, dts: int | None = None, data: bytes | None = None,
                 codec: str | None = None) -> list[MarkerEvent]:
        """One frame of ``kind`` ('video' | 'audio') arrived at ``now`` with
        media time ``media_t`` (pts/dts: its raw timestamps, for the
        reordering check; data/codec: for the SPS of a keyframe)."""
        events: list[MarkerEvent] = []
        stall = self._stall.get(kind)
        if stall is None:
            return events
        if stall.is_open:
            # The first frame back ends the stall, on the axis it was opened on.
            end = self.media_at(now)
            events += stall.observe(end, end, False)
        prev_t = self._last_t[kind]
        jumped = prev_t is not None and not -1.0 < media_t - prev_t < _JUMP_S
        if prev_t is not None and not jumped and media_t > prev_t:
            self._interval[kind] = min(media_t - prev_t, _MAX_INTERVAL_S)
        self._arrival[kind] = now
        self._last_t[kind] = media_t
        self._ref = (now, media_t)
        if kind == "video":
            if jumped:
                events += self._restart_video(prev_t)
            events += self._video(media_t, size, keyframe, pts, dts, data, codec, prev_t if not jumped else None)
        return events

    def _video(self, t: float, size: int, keyframe: bool, pts: int | None, dts: int | None,
               data: bytes | None, codec: str | None, prev_t: float | None) -> list[MarkerEvent]:
        th = self.th
        events: list[MarkerEvent] = []
        t0 = t if prev_t is None or prev_t > t else prev_t
        # Rates: the windows follow media time, so network jitter moves no frame.
        fps_win, br_win, base = self._fps_win, self._br_win, self._base_win
        fps_win.add(t, size)
        br_win.add(t, size)
        if self._history_from is None:
            self._history_from = t
        if self._measure_from is None:
            self._measure_from = t + max(th.fps_window_s, th.bitrate_window_s)
        measuring = t >= self._measure_from
        fps_tracker, br_tracker = self._fps, self._bitrate
        established = t - self._history_from >= th.rate_baseline_s
        if fps_tracker.is_open or fps_tracker.pending_since is not None:
            pass  # the baseline holds still while the drop is being judged
        elif established:
            self._fps_base = len(base.items) / th.rate_baseline_s
        if not (br_tracker.is_open or br_tracker.pending_since is not None) and established:
            self._br_base = base.total / th.rate_baseline_s
        base.add(t, size)
        if self._fps_base and measuring:
            fps = len(fps_win.items) / th.fps_window_s
            low = fps < th.fps_ratio * self._fps_base
            if low or fps_tracker.is_open or fps_tracker.pending_since is not None:
                was_pending = fps_tracker.pending_since is not None
                events += fps_tracker.observe(t0, t, low, metadata={
                    "fps": round(fps, 2), "baseline_fps": round(self._fps_base, 2)})
                if low and not was_pending and not fps_tracker.is_open:
                    self._backdate_fps(fps_tracker)
                    if fps_tracker.pending_since is not None and t - fps_tracker.pending_since >= th.fps_d - 1e-9:
                        events += fps_tracker.observe(t, t, True)
        if self._br_base and measuring:
            bps = br_win.total * 8 / th.bitrate_window_s
            low = br_win.total < th.bitrate_ratio * self._br_base * th.bitrate_window_s
            if low or br_tracker.is_open or br_tracker.pending_since is not None:
                events += br_tracker.observe(t0, t, low, metadata={
                    "bitrate_bps": round(bps), "baseline_bps": round(self._br_base * 8)})
        # Reordering: a decoder needs frames ahead of their display (ISO/IEC
        # 14496-10 C.4: dpb output order ≠ decoding order) only with B-frames.
        if pts is not None:
            reordered = (dts is not None and dts != pts) or (self._max_pts is not None and pts < self._max_pts)
            if self._max_pts is None or pts > self._max_pts:
                self._max_pts = pts
            if reordered or self._bframes.is_open:
                if not self._bframes.is_open:
                    self._reordered = 0
                self._reordered += reordered
                events += self._bframes.observe(t, t, reordered,
                                                metadata={"reordered_frames": self._reordered} if reordered else None)
        if keyframe and codec == "h264" and data is not None:
            events += self._check_sps(t, data)
        elif self._resolution.is_open or self._profile.is_open:
            events += self._resolution.observe(t, t, False) + self._profile.observe(t, t, False)
        return events

    def _backdate_fps(self, tracker: FaultTracker) -> None:
        """The measured rate lags the drop by up to a window: start the
        candidate at the first gap in the window longer than the baseline
        rate's interval allows."""
        assert self._fps_base
        limit = 1.0 / (self.th.fps_ratio * self._fps_base)
        items = self._fps_win.items
        for i in range(1, len(items)):
            if items[i][0] - items[i - 1][0] > limit:
                tracker.backdate(items[i - 1][0])
                return

    def _check_sps(self, t: float, data: bytes) -> list[MarkerEvent]:
        sps = h264.scan_access_unit(data).sps
        changed_res = changed_profile = False
        meta_res: dict[str, Any] = {}
        meta_profile: dict[str, Any] = {}
        if sps is not None and sps != self._sps:
            self._sps = sps
            try:
                parsed = h264.Sps.parse(sps)
            except BitstreamError:
                parsed = None
            if parsed is not None:
                fmt = (parsed.width, parsed.height, parsed.profile_idc, parsed.level_idc)
                old = self._format
                self._format = fmt
                if old is not None:
                    if old[:2] != fmt[:2]:
                        changed_res = True
                        meta_res = {"from": f"{old[0]}x{old[1]}", "to": f"{fmt[0]}x{fmt[1]}"}
                    if old[2:] != fmt[2:]:
                        changed_profile = True
                        meta_profile = {"from_profile_idc": old[2], "to_profile_idc": fmt[2],
                                        "from_level_idc": old[3], "to_level_idc": fmt[3]}
        events: list[MarkerEvent] = []
        if changed_res or self._resolution.is_open:
            events += self._resolution.observe(t, t, changed_res, metadata=meta_res or None)
        if changed_profile or self._profile.is_open:
            events += self._profile.observe(t, t, changed_profile, metadata=meta_profile or None)
        return events

    def _restart_windows(self) -> None:
        """Frames went missing on the way here: the rate windows refill
        before they are judged again (the baselines stand meanwhile)."""
        for w in (self._fps_win, self._br_win, self._base_win):
            w.clear()
        self._history_from = None
        self._measure_from = None

    def _restart_video(self, last_t: float | None) -> list[MarkerEvent]:
        """Timestamps jumped or the source changed: the rates and the
        reordering state start over; faults judged on the old timeline end
        where it ended."""
        end = last_t if last_t is not None else 0.0
        events: list[MarkerEvent] = []
        for tracker in (self._fps, self._bitrate, self._bframes):
            events += tracker.flush(end)
        self._restart_windows()
        self._fps_base = self._br_base = None
        self._max_pts = None
        return events

    def on_discontinuity(self, now: float, reason: str) -> list[MarkerEvent]:
        """What follows is not continuous with what preceded (media/stream
        ``Discontinuity.reason``). Frames lost on the way here ('overflow':
        this reader's; 'source': packets lost, the layer restarts at its
        next keyframe) would read as a rate drop: the windows refill before
        the rates are judged again, on the same timeline. A new source
        ('reconnect', 'takeover', 'detach') starts everything over and ends
        a stall."""
        if reason not in ("reconnect", "takeover", "detach"):
            self._restart_windows()
            return []
        events = self._restart_video(self._last_t["video"]) + self._source_left(now)
        self._sps = None
        self._format = None
        return events

    def _source_left(self, now: float) -> list[MarkerEvent]:
        end = self.media_at(now)
        events: list[MarkerEvent] = []
        for kind, tracker in self._stall.items():
            events += tracker.flush(end)
            self._arrival[kind] = None
            self._last_t[kind] = None
        return events

    # -- counters ------------------------------------------------------------------
    def on_counters(self, now: float, sources: Mapping[Hashable, Mapping[str, Any]]) -> list[MarkerEvent]:
        """A sample of each source's running totals (TsCounters fields, SRT
        stats) at ``now``. The first sample of a source is its baseline; a
        total that went down (a new session under the same key) is one too."""
        events: list[MarkerEvent] = []
        hits: dict[str, int] = {}
        link_deltas = [[0, 0, 0] for _ in self._links]
        totals: dict[str, int] = {}
        if sources:
            # A publisher is attached: the connection is there even when it
            # carries nothing (an encoder that hangs keeps its SRT connection
            # until the peer-idle timeout; a caller that leaves detaches).
            self._alive_at = now
        elif self._prev:
            # The last publisher left (the stream waits for it to reconnect):
            # a stall that was open ends here — what follows is an absent
            # source, not a stalled one — and nothing is judged until frames
            # come again.
            events += self._source_left(now)
        for key, counters in sources.items():
            prev = self._prev.get(key)
            self._prev[key] = counters
            if prev is None:
                continue
            for name in self._tr:
                d = _delta(counters, prev, name)
                if d > 0:
                    hits[name] = hits.get(name, 0) + d
                    totals[name] = totals.get(name, 0) + int(counters.get(name, 0))
            for (win, _, _), d in zip(self._links, link_deltas):
                d[0] += _delta(counters, prev, win.lost_key)
                d[1] += _delta(counters, prev, win.received_key)
                d[2] += _delta(counters, prev, win.dropped_key)
        for key in [k for k in self._prev if k not in sources]:
            del self._prev[key]
        since = self._sampled_at if self._sampled_at is not None else now
        self._sampled_at = now
        t0, t1 = self.media_at(since), self.media_at(now)
        th = self.th
        pcr = hits.get("pcr_repetition_error")
        if pcr:
            self._pcr_hits.append((now, pcr))
        while self._pcr_hits and self._pcr_hits[0][0] <= now - th.pcr_repetition_window_s:
            self._pcr_hits.popleft()
        if pcr and not self._tr["pcr_repetition_error"].tracker.is_open:
            in_window = sum(n for _, n in self._pcr_hits)
            if in_window < th.pcr_repetition_min:
                del hits["pcr_repetition_error"]  # a lone late PCR: arrival jitter (see the thresholds)
            else:
                hits["pcr_repetition_error"] = in_window
        for name, n in hits.items():
            fault = self._tr[name]
            fault.counts["count"] = fault.counts.get("count", 0) + n
            fault.counts["total"] = totals[name]
            events += self._hit(fault, now, t0, t1)
        # Link loss/drop (SRT, WHIP's RTP) over a sliding window of samples.
        for (win, loss, drop), (lost, received, dropped) in zip(self._links, link_deltas):
            win.add(now, th.srt_window_s, lost, received, dropped)
            sums = win.sums
            if lost and sums[0] >= th.srt_loss_min and sums[0] >= th.srt_loss_ratio * (sums[0] + sums[1]):
                loss.counts.update(lost_in_window=sums[0], received_in_window=sums[1], window_s=th.srt_window_s)
                loss.counts["lost"] = loss.counts.get("lost", 0) + lost
                events += self._hit(loss, now, t0, t1)
            if sums[2] >= th.srt_drop_min and dropped:
                drop.counts["dropped"] = drop.counts.get("dropped", 0) + dropped
                events += self._hit(drop, now, t0, t1)
        return events

    def _hit(self, fault: _CounterFault, now: float, t0: float, t1: float) -> list[MarkerEvent]:
        """The fault was seen in the sample interval [t0, t1] (media time)."""
        fault.last_hit = now
        if fault.tracker.is_open:
            fault.dirty = True
            return self._update(fault, now)
        events = fault.tracker.observe(min(t0, t1), t1, True, metadata=dict(fault.counts))
        for ev in events:
            if ev.kind == "open":
                fault.marker = replace(ev.marker, metadata=dict(ev.marker.metadata))
                fault.updated_at = now
        return events

    def _update(self, fault: _CounterFault, now: float) -> list[MarkerEvent]:
        if not fault.dirty or fault.marker is None or now - fault.updated_at < _UPDATE_EVERY_S:
            return []
        fault.dirty = False
        fault.updated_at = now
        fault.marker.metadata.update(fault.counts)
        # The tracker keeps its own copy for the close: give it the counts too.
        fault.tracker.observe(0.0, 0.0, True, metadata=dict(fault.counts))
        return [MarkerEvent("update", replace(fault.marker, metadata=dict(fault.marker.metadata)))]

    def _counter_faults(self) -> list[_CounterFault]:
        return [*self._tr.values(), *(f for _, loss, drop in self._links for f in (loss, drop))]

    # -- timers --------------------------------------------------------------------
    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` has something to decide (a stall
        threshold, a counter marker's quiet period, a pending update), on the
        ``now`` clock; None: nothing pending."""
        deadlines = []
        d = self.th.stall_d
        for kind, tracker in self._stall.items():
            arrival = self._arrival[kind]
            # A deadline already judged (no other track, no connection) is
            # judged again at the next counter sample or frame, not in a loop.
            if arrival is not None and not tracker.is_open and (
                    self._judged_at is None or arrival + d > self._judged_at):
                deadlines.append(arrival + d)
        for fault in self._counter_faults():
            if fault.tracker.is_open and fault.last_hit is not None:
                deadlines.append(fault.last_hit + self.th.transport_clear_s)
                if fault.dirty:
                    deadlines.append(fault.updated_at + _UPDATE_EVERY_S)
        return min(deadlines) if deadlines else None

    def handle_timer(self, now: float) -> list[MarkerEvent]:
        events: list[MarkerEvent] = []
        self._judged_at = now
        d = self.th.stall_d
        alive = self._alive_at is not None and now - self._alive_at < _ALIVE_S
        for kind, tracker in self._stall.items():
            arrival = self._arrival[kind]
            if arrival is None or tracker.is_open or now - arrival < d - 1e-9:
                continue
            # The other track must have carried on well past this one's last
            # frame: both stopping together (within jitter) is a source gone.
            other = self._arrival["audio" if kind == "video" else "video"]
            if alive or (other is not None and now - other < min(_ALIVE_S, d / 2)):
                last_t = self._last_t[kind]
                due = self.media_at(arrival) if last_t is None else last_t + self._interval[kind]
                events += tracker.observe(due, max(due, self.media_at(now)), True,
                                          metadata={"gap_s": round(now - arrival, 3)})
        clear = self.th.transport_clear_s
        for fault in self._counter_faults():
            if not fault.tracker.is_open or fault.last_hit is None:
                continue
            if now - fault.last_hit >= clear - 1e-9:
                end = self.media_at(fault.last_hit)
                fault.tracker.observe(end, end, True, metadata=dict(fault.counts))
                events += fault.tracker.observe(end, end, False)
                fault.marker = None
                fault.counts = {}
                fault.dirty = False
            else:
                events += self._update(fault, now)
        return events

    def flush(self, now: float) -> list[MarkerEvent]:
        """The stream ended (or the tap detached): close whatever is open."""
        end = self.media_at(now)
        events: list[MarkerEvent] = []
        for tracker in (*self._stall.values(), self._resolution, self._profile):
            events += tracker.flush(end)
        last_video = self._last_t["video"]
        events += self._restart_video(last_video if last_video is not None else end)
        for fault in self._counter_faults():
            if fault.tracker.is_open:
                fault.tracker.observe(end, end, True, metadata=dict(fault.counts))
            events += fault.tracker.flush(self.media_at(fault.last_hit) if fault.last_hit is not None else end)
            fault.marker = None
            fault.counts = {}
            fault.dirty = False
        return events


def _delta(now: Mapping[str, Any], prev: Mapping[str, Any], key: str) -> int:
    """Growth of a running total; a total that went down started over: no growth."""
    a, b = now.get(key), prev.get(key)
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or isinstance(a, bool):
        return 0
    d = int(a - b)
    return d if d > 0 else 0
