"""Events returned by :class:`media.mpegts.demux.TsDemuxer` and its counters.

All events are frozen slotted dataclasses (values); ``arrival`` is always the
``now`` passed to the ``feed()`` call that produced the event.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from media.mpegts.psi import Pmt

__all__ = [
    "Completion",
    "DiscontinuityReason",
    "ErrorKind",
    "ProgramChanged",
    "AccessUnit",
    "TsDiscontinuity",
    "DemuxError",
    "TsCounters",
    "DemuxEvent",
]


class Completion(enum.IntEnum):
    """How the demuxer knew an access unit's PES was complete."""

    NEXT_START = 0  # the next PES of the PID started (payload_unit_start_indicator)
    LENGTH = 1  # PES_packet_length reached (§2.4.3.7)
    STUFFING = 2  # early: last packet padded with adaptation-field stuffing
    MESSAGE = 3  # early: the transport message ended on this PID after a flush
    FLUSH = 4  # TsDemuxer.flush() at end of input
    QUIET = 5  # early: a full message ended on this PID and the sender then went quiet


class DiscontinuityReason(str, enum.Enum):
    CC_ERROR = "cc_error"  # packets lost/reordered on the PID (TR 101 290 1.4)
    INDICATOR = "discontinuity_indicator"  # signalled by the adaptation field (§2.4.3.5)
    SYNC_LOSS = "sync_loss"  # TS_sync_loss (TR 101 290 1.1): every PID affected
    PROGRAM_CHANGE = "program_change"  # PMT/PAT change removed or re-typed the PID


class ErrorKind(str, enum.Enum):
    PSI_CRC = "psi_crc"  # CRC_32 mismatch (TR 101 290 2.2 CRC_error)
    PSI_INVALID = "psi_invalid"  # malformed section or table
    PES_HEADER = "pes_header"  # no packet_start_code_prefix or bad header
    PES_TRUNCATED = "pes_truncated"  # a PES with a length ended early
    PES_OVERRUN = "pes_overrun"  # payload after a PES was already complete
    PES_OVERSIZE = "pes_oversize"  # PES larger than max_pes_size, dropped
    EARLY_OVERRUN = "early_overrun"  # payload after an early completion: that rule is disabled
    ES_INVALID = "es_invalid"  # ADTS/Opus framing broken inside a PES
    SCRAMBLED = "scrambled"  # transport_scrambling_control != 0
    TRANSPORT_ERROR = "transport_error"  # transport_error_indicator set (TR 101 290 2.1)
    ADAPTATION = "adaptation"  # adaptation_field_length out of range


@dataclass(frozen=True, slots=True)
class ProgramChanged:
    """A new PMT is in force (first one, or a version/content change).

    ``pmt`` is None when the program vanished from the PAT. PIDs present in
    ``previous`` but not in ``pmt`` (or whose stream_type changed) were
    dropped: their partial PES data is discarded without an AccessUnit."""

    pmt: Pmt | None
    previous: Pmt | None
    arrival: float

    @property
    def removed_pids(self) -> frozenset[int]:
        old = {t.pid: t.stream_type for t in self.previous.tracks} if self.previous else {}
        new = {t.pid: t.stream_type for t in self.pmt.tracks} if self.pmt else {}
        return frozenset(p for p, st in old.items() if new.get(p) != st)

    @property
    def added_pids(self) -> frozenset[int]:
        old = {t.pid: t.stream_type for t in self.previous.tracks} if self.previous else {}
        new = {t.pid: t.stream_type for t in self.pmt.tracks} if self.pmt else {}
        return frozenset(p for p, st in new.items() if old.get(p) != st)


@dataclass(frozen=True, slots=True)
class AccessUnit:
    """One coded frame: the TS demuxer's :class:`media.unit.Unit`.

    ``data``: H.264 — the PES payload as Annex-B (all NAL units of the
    access unit with start codes); AAC — one whole ADTS frame (header
    included); Opus — one Opus packet (control header removed).
    ``pts``/``dts``: 90 kHz, 33-bit values as carried (no unwrapping);
    ``dts == pts`` when the PES had no DTS; both None when the PES carried
    no PTS. For AAC/Opus frames after the first in a PES the PTS is the PES
    PTS plus the preceding frames' durations.
    ``sps``/``pps``: H.264 parameter sets (NAL units without start code) in
    force for this PID, i.e. the last ones seen up to and including this AU.
    ``corrupt``: packets of this PES were lost (CC error, TEI) — forward or
    drop as the consumer sees fit.
    ``arrival``: the ``now`` of the call that completed the PES (the frame
    left the demuxer then); ``first_arrival``: the ``now`` of the feed that
    carried the PES's first packet, so ``arrival - first_arrival`` is how
    long the frame was being received and held (a frame completed only by
    the next PES start shows a whole frame interval here)."""

    pid: int
    codec: str
    pts: int | None
    dts: int | None
    keyframe: bool
    data: bytes
    arrival: float
    sps: bytes | None = None
    pps: bytes | None = None
    corrupt: bool = False
    completion: Completion = Completion.NEXT_START
    first_arrival: float | None = None

    @property
    def kind(self) -> str:
        return "video" if self.codec in ("h264", "hevc") else "audio"

    @property
    def early(self) -> bool:
        return self.completion in (Completion.STUFFING, Completion.MESSAGE, Completion.QUIET)


@dataclass(frozen=True, slots=True)
class TsDiscontinuity:
    """Continuity was lost on ``pid`` (None: on every PID)."""

    pid: int | None
    reason: DiscontinuityReason
    arrival: float


@dataclass(frozen=True, slots=True)
class DemuxError:
    """Something malformed was dropped (and counted)."""

    pid: int | None
    kind: ErrorKind
    detail: str
    arrival: float


DemuxEvent = ProgramChanged | AccessUnit | TsDiscontinuity | DemuxError


@dataclass(frozen=True, slots=True)
class TsCounters:
    """Snapshot of a demuxer's counters.

    TR 101 290 (ETSI TR 101 290 V1.4.1 §5.2.1 priority 1, §5.2.2 priority 2)
    indicators count *events*: a timeout is counted once per episode (when
    the limit is first exceeded), not once per check."""

    packets: int = 0
    bytes: int = 0
    # priority 1
    ts_sync_loss: int = 0  # 1.1: lost sync (2 consecutive bad sync bytes)
    sync_byte_error: int = 0  # 1.2: sync byte != 0x47 where one was expected
    pat_error: int = 0  # 1.3.a: PAT gap > 0.5 s, wrong table_id on PID 0, scrambled PID 0
    cc_error: int = 0  # 1.4: Continuity_count_error
    pmt_error: int = 0  # 1.5.a: PMT gap > 0.5 s or scrambled PMT PID
    pid_error: int = 0  # 1.6: PMT-listed PID absent > pid_timeout
    # priority 2
    transport_error: int = 0  # 2.1: transport_error_indicator set
    crc_error: int = 0  # 2.2: PSI CRC_32 mismatch
    pcr_repetition_error: int = 0  # 2.3a: PCRs > 100 ms apart (arrival time)
    pcr_discontinuity_error: int = 0  # 2.3b: PCR value jump outside 0..100 ms, not signalled
    pts_error: int = 0  # 2.5: PTS repetition > 700 ms (arrival time)
    # demuxer health
    sync_acquired: bool = False
    resync_skipped_bytes: int = 0
    psi_errors: int = 0
    pes_errors: int = 0  # header/truncated/overrun/ES framing
    pes_oversize: int = 0
    scrambled_packets: int = 0
    access_units: int = 0
    completed_next_start: int = 0
    completed_length: int = 0
    completed_stuffing: int = 0
    completed_message: int = 0
    completed_quiet: int = 0
    early_overrun: int = 0
