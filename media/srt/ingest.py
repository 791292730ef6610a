"""One SRT publisher on the event loop: an SrtConnection driving a TsIngest.

The I/O half of the SRT ingest (the core, media/ingest/ts.py, owns no
socket, clock or task)::

    SrtListener ── conn.on_data(messages, now) ─► TsIngest.receive_messages
                                                     │ get_timer()
                   loop.call_later ◄─────────────────┘ one timer, re-armed lazily
                     └─► handle_timer(time.monotonic())
                   TsIngest's transcode(unit) ─► TranscodeWorker (executor thread)
                     └─► Opus packets ─► publisher.publish
                conn.on_close(reason) ─► timer cancelled ─► on_closed(reason)

Attaching and detaching the stream's publisher, and what a close means for
the application (its books, its log), stay with whoever made the session:
the server (server/media_service.py) or the benchmark (loadtests/srt_ingest.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable

from media.ingest.ts import IngestCounters, TsIngest
from media.mpegts.events import AccessUnit, TsCounters
from media.errors import SrtApiError
from media.srt.listener import SrtConnection
from media.stream import Publisher, StreamClosed
from media.transcode import AacToOpus, OpusPacket, TranscodeWorker

__all__ = ["SrtIngestSession"]

# A quiet deadline that finds data still on its way looks again this much
# later, at most this many times in a row (50 ms in all: beyond that the
# loop is so far behind that holding the frame costs more than cutting it).
_POSTPONE_S = 0.002
_MAX_POSTPONE = 25


class SrtIngestSession:
    """Binds ``conn``'s data and close to a :class:`TsIngest` publishing
    through ``publisher``.

    ``transcode``: AAC goes to an AAC → Opus :class:`TranscodeWorker`
    (started on the first AAC frame, on ``executor``) whose packets are the
    stream's audio; False publishes AAC as it is. ``on_video``: see
    :class:`TsIngest`. ``on_closed(reason)``: after the connection closed
    and the timer is gone; the owner stops :attr:`transcoder`."""

    def __init__(
        self,
        conn: SrtConnection,
        publisher: Publisher,
        counters: IngestCounters | None = None,
        *,
        executor: concurrent.futures.Executor | None = None,
        transcode: bool = True,
        on_video: Callable[[AccessUnit], None] | None = None,
        on_closed: Callable[[str], None] | None = None,
    ) -> None:
        self.conn = conn
        self.publisher = publisher
        self.ingest = TsIngest(publisher, counters, transcode=self._transcode if transcode else None,
                               on_video=on_video)
        self.transcoder: TranscodeWorker | None = None
        self._executor = executor
        self._on_closed = on_closed
        # The ingest's timer (the demuxer's QUIET deadline): one loop timer,
        # re-armed lazily when it fires early because more data moved the
        # deadline later.
        self._quiet_timer: asyncio.TimerHandle | None = None
        self._postponed = 0  # consecutive postponements of this deadline
        self.postponed_total = 0
        conn.on_data = self.on_data
        conn.on_close = self.on_close
        publisher.set_source_counters(self.source_counters)

    def on_data(self, messages: list[bytes], now: float) -> None:
        self._postponed = 0
        ingest = self.ingest
        ingest.receive_messages(messages, now)
        if self._quiet_timer is None:
            deadline = ingest.get_timer()
            if deadline is not None:
                self._arm(deadline)

    def _arm(self, deadline: float) -> None:
        delay = max(0.0, deadline - time.monotonic())
        self._quiet_timer = asyncio.get_running_loop().call_later(delay, self._on_quiet_timer)

    def _on_quiet_timer(self) -> None:
        self._quiet_timer = None
        deadline = self.ingest.get_timer()
        if deadline is None:
            return
        now = time.monotonic()
        if now < deadline:
            self._arm(deadline)
            return
        # "Quiet" must mean nothing more arrived, not that the loop has not
        # seen it yet: on a busy machine the next messages can sit in
        # libsrt's buffer or in the bridge's hand-over while this timer
        # fires, and completing the frame then would cut it short. Wait for
        # them (they complete the frame, or extend it), a bounded number
        # of times.
        if self._postponed < _MAX_POSTPONE and self.conn.receive_pending():
            self._postponed += 1
            self.postponed_total += 1
            self._arm(now + _POSTPONE_S)
            return
        self._postponed = 0
        self.ingest.handle_timer(now)

    def _transcode(self, unit: AccessUnit) -> None:
        if self.transcoder is None:
            self.transcoder = TranscodeWorker(AacToOpus(), self._on_opus, executor=self._executor)
            self.transcoder.start()
        self.transcoder.push(unit)

    def _on_opus(self, packets: list[OpusPacket]) -> None:
        for p in packets:
            try:
                self.publisher.publish(p)
            except StreamClosed:
                return

    def on_close(self, reason: str) -> None:
        if self._quiet_timer is not None:
            self._quiet_timer.cancel()
            self._quiet_timer = None
        if self._on_closed is not None:
            self._on_closed(reason)

    @property
    def ts_counters(self) -> TsCounters:
        return self.ingest.ts_counters

    def source_counters(self) -> dict[str, int | float]:
        """The demuxer's counters plus libsrt's receive totals (pktRecv,
        pktRcvLoss, pktRcvDrop, ...; the listener's last sample once the
        peer is gone, none before any)."""
        out: dict[str, int | float] = dict(self.ingest.source_counters())
        try:
            stats = self.conn.stats()
        except SrtApiError:
            return out
        for key in ("pktRecv", "byteRecv", "pktRcvLoss", "pktRcvDrop", "pktRcvRetrans"):
            if key in stats:
                out[key] = stats[key]
        return out
