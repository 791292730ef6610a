"""MPEG-TS ingest core (sans-I/O): transport messages + ``now`` → the Stream.

One :class:`TsIngest` per publishing connection. Data flow::

    receive_messages(messages, now)          handle_timer(now)  (at get_timer())
      │ each message                           │
      ├─► TsDemuxer.feed(msg, now, end_of_message=True)   TsDemuxer.poll(now)
      │        │ events (media/mpegts/events.py)            │ events
      │        ▼                                            ▼
      │     _dispatch ── match on the event kind ───────────┘
      │        AccessUnit     AAC → transcode(unit) (the AAC → Opus hand-off)
      │                       else → on_video(unit) (video) → publisher.publish(unit)
      │        ProgramChanged → publisher.set_program(pmt), RAP scanner re-aimed
      │        TsDiscontinuity→ publisher.discontinuity(layer | None)
      │        DemuxError     → counted
      └─► publisher.publish_ts(msg, rap_offset, psi)   the original bytes, for TS readers

Nothing here reads a clock, sleeps or starts a task: the caller passes
``now``, asks :meth:`TsIngest.get_timer` when to come back (aioquic's
``get_timer()`` / ``handle_timer(now)``), and owns the AAC → Opus worker
that ``transcode`` hands units to (media/transcode.py runs the codec on an
executor thread, never on the event loop). media/srt/ingest.py is that
caller for SRT; loadtests/srt_ingest.py drives the same path.

An event kind the ``match`` does not know is a programming error (a kind
added to ``DemuxEvent`` without a rule here) and raises ``TypeError``:
dropping it silently is how a continuity error once went unnoticed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from media.mpegts.demux import TsDemuxer
from media.mpegts.events import AccessUnit, DemuxError, DemuxEvent, ProgramChanged, TsCounters, TsDiscontinuity
from media.mpegts.rap import RandomAccessScanner
from media.stream import Publisher

__all__ = ["IngestCounters", "TsIngest"]


@dataclass(slots=True)
class IngestCounters:
    """Totals over every ingest session that shares this object (the server
    keeps one for all SRT publishers; the counters only ever go up)."""

    sessions: int = 0
    bytes: int = 0
    messages: int = 0
    access_units: int = 0
    demux_errors: int = 0
    discontinuities: int = 0
    refused_busy: int = 0


class TsIngest:
    """TS bytes of one source → its stream's publisher.

    ``transcode``: where AAC access units go instead of the stream (the
    server's AAC → Opus worker; WebRTC has no AAC). None publishes AAC as
    it is. ``on_video``: called with each video access unit just before it
    is published, so an observer keyed on the unit is in place before any
    reader can have sent it (readers run inside ``publish``)."""

    __slots__ = ("publisher", "counters", "demux", "rap", "_transcode", "_on_video")

    def __init__(
        self,
        publisher: Publisher,
        counters: IngestCounters | None = None,
        *,
        transcode: Callable[[AccessUnit], None] | None = None,
        on_video: Callable[[AccessUnit], None] | None = None,
    ) -> None:
        self.publisher = publisher
        self.counters = counters if counters is not None else IngestCounters()
        self.demux = TsDemuxer()
        self.rap = RandomAccessScanner()
        self._transcode = transcode
        self._on_video = on_video
        publisher.set_source_counters(self.source_counters)

    def receive_messages(self, messages: list[bytes], now: float) -> None:
        """Whole transport messages (SRT/UDP payloads: 1–7 TS packets each)
        received at ``now``; message boundaries feed the demuxer's early
        completion rules (media/mpegts/__init__.py, MESSAGE and QUIET)."""
        pub = self.publisher
        demux = self.demux
        counters = self.counters
        counters.messages += len(messages)
        rap = self.rap
        for msg in messages:
            counters.bytes += len(msg)
            self._dispatch(demux.feed(msg, now, end_of_message=True))
            # The original packets for TS readers, marked where a keyframe starts.
            pub.publish_ts(msg, rap_offset=rap.scan(msg), psi=rap.psi)

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` should run next (the demuxer's QUIET
        deadline: a frame that ended exactly on a full message is complete
        once the sender stays silent), on the ``now`` clock; None: no timer.
        Moves later with every message received."""
        return self.demux.next_deadline()

    def handle_timer(self, now: float) -> None:
        """The time from :meth:`get_timer` has come: release what the
        silence completed. Early calls do nothing but advance the demuxer's
        timeout counters."""
        self._dispatch(self.demux.poll(now))

    @property
    def ts_counters(self) -> TsCounters:
        """The demuxer's TR 101 290 counters (a snapshot)."""
        return self.demux.counters()

    def source_counters(self) -> dict[str, int]:
        """The TR 101 290 and demuxer counters by their TsCounters names
        (what ``Publisher.source_counters`` gives a monitor)."""
        c = self.demux.counters()
        return {name: getattr(c, name) for name in c.__dataclass_fields__}

    def _dispatch(self, events: list[DemuxEvent]) -> None:
        pub = self.publisher
        counters = self.counters
        for ev in events:
            match ev:
                case AccessUnit():
                    counters.access_units += 1
                    if ev.codec == "aac" and self._transcode is not None:
                        self._transcode(ev)
                    else:
                        if self._on_video is not None and ev.kind == "video":
                            self._on_video(ev)
                        pub.publish(ev)
                case ProgramChanged(pmt=pmt):
                    pub.set_program(pmt)
                    if pmt is None:  # the program left the PAT: no PMT PID, no video PIDs
                        self.rap.configure(None, frozenset())
                    else:
                        self.rap.configure(pmt.pmt_pid, frozenset(t.pid for t in pmt.tracks if t.kind == "video"))
                case DemuxError():
                    counters.demux_errors += 1
                case TsDiscontinuity(pid=pid):
                    # Packets were lost (CC error, TR 101 290 1.4), the sender
                    # signalled a break (discontinuity_indicator, ISO/IEC
                    # 13818-1 §2.4.3.5) or sync was lost: the frames that
                    # follow reference a picture the viewers never got whole,
                    # so their layer restarts at its next IDR. An audio PID
                    # needs nothing: Opus/AAC frames stand alone.
                    counters.discontinuities += 1
                    if pid is None:
                        pub.discontinuity(None)
                    elif (layer := pub.layers.get(pid)) is not None:
                        pub.discontinuity(layer)
                case _:
                    raise TypeError(f"TsIngest has no rule for the demux event {type(ev).__name__}")
