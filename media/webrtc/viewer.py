"""The sans-I/O core of one WebRTC viewer: what to send it, and when.

:class:`ViewerEgress` is to :class:`~media.webrtc.whep.WhepSession` what
aioquic's ``QuicConnection`` is to its asyncio protocol: it never touches a
socket, a clock or the event loop. Every input carries its ``now``; what it
wants sent comes back as datagrams (plain RTP/RTCP, before SRTP); what the
send path saw is reported back with :meth:`ViewerEgress.on_sent`; what its
owner must act on is queued as events (:attr:`ViewerEgress.events`); and
:meth:`get_timer` / :meth:`handle_timer` replace every periodic ticker
(sender reports, probe pacing, the end of a probe, the send-failure limit).

It owns, per viewer:

* the rewriters of its tracks (:class:`media.rtp.rewrite.Rewriter`) and the
  layer choice (:class:`media.rtp.layers.LayerSelector`): receiver reports
  → cumulative loss, highest sequence number and RTT (RFC 3550 §6.4.1);
  REMB (draft-alvestrand-rmcat-remb) → bandwidth; going up is decided on a
  probe: RTX copies of recent packets paced up to the next layer's rate
  (:mod:`media.rtp.probe`), plus a sender report every 100 ms so the RTT
  follows the queue the probe may build;
* Generic NACK (RFC 4585 §6.2.1) → retransmission from the layer's shared
  history (RTX, RFC 4588, when negotiated), within the viewer's
  retransmission budget and playout window (:mod:`media.rtp.budget`);
* PLI/FIR (RFC 4585 §6.3.1, RFC 5104 §4.3.1) → counted, the viewer is
  frozen until its layer's next keyframe reaches it, and a
  :class:`KeyframeWanted` event lets the owner ask the source;
* a sender report (+ CNAME) per track once a second (RFC 3550 §6.4.1), on
  the stream's presentation clock (lip sync);
* the viewer's statistics, and its close reasons: ``slow_viewer`` (a send
  queue overflow on the lowest or a pinned layer), ``send_failed`` (every
  send failed for ``send_failure_timeout`` seconds without one success).
"""

from __future__ import annotations

import errno
import math
from dataclasses import dataclass
from typing import Any, Mapping, Protocol

from ..errors import RtpError
from ..layer import AUDIO, Layer, layer_named
from ..rtp.budget import RateMeter, RetransmitBudget
from ..rtp.layers import Action, LayerDecision, LayerPolicy, LayerSelector, Reason
from ..rtp.packet import LayerPacket
from ..rtp.probe import ProbePacer
from ..rtp.rewrite import MediaAnchor, Rewriter
from ..rtp.rtcp import (
    Fir, Nack, Pli, ReceiverReport, Remb, Sdes, SdesChunk, SenderReport, ntp_middle32, parse_rtcp,
    rtt_from_report, serialize_rtcp,
)

__all__ = [
    "CloseWanted", "KeyframeWanted", "LayerSwitched", "PacketSource", "ProbeFailed", "ProbeStarted",
    "SendKind", "SessionStats", "TIMER_GRID_S", "ViewerDropped", "ViewerEgress", "on_timer_grid",
]

#: Sender reports per track, RFC 3550 §6.2 (one a second is the product's cadence).
REPORT_INTERVAL_S = 1.0
#: While probing: each RR's LSR/DLSR then measures the RTT through the
#: queue the probe may build.
PROBE_REPORT_INTERVAL_S = 0.1
#: Sender reports and the send-failure limit need no finer time than this:
#: their deadlines are rounded up onto one grid of the process's clock, so
#: that the viewers a process serves share its event loop's wake-ups
#: instead of each waking it once a second at its own phase (a probe's
#: pace and judgement stay exact).
TIMER_GRID_S = 0.02


def on_timer_grid(at: float) -> float:
    """The first point of the :data:`TIMER_GRID_S` grid at or after ``at``."""
    slot = math.ceil(at / TIMER_GRID_S) * TIMER_GRID_S
    return slot if slot >= at else slot + TIMER_GRID_S


@dataclass(slots=True)
class SessionStats:
    packets_sent: int = 0
    bytes_sent: int = 0
    nacks: int = 0
    retransmits: int = 0
    plis: int = 0
    firs: int = 0
    switches: int = 0
    backlog_events: int = 0
    retransmit_bytes: int = 0
    retransmits_dropped: int = 0  # NACKed packets not resent: over budget or too old
    probes: int = 0
    probes_failed: int = 0
    probe_bytes: int = 0
    freezes: int = 0
    frozen_s: float = 0.0

    def add(self, other: "SessionStats") -> None:
        """Accumulate ``other`` (a closed session's totals) into these."""
        for name in SessionStats.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


# -- events (drained by the owner after each call) ------------------------------------


@dataclass(frozen=True, slots=True)
class LayerSwitched:
    frm: str
    to: str
    decision: LayerDecision


@dataclass(frozen=True, slots=True)
class ViewerDropped:
    """The viewer cannot keep up on its lowest (or pinned) layer; a
    :class:`CloseWanted` with reason ``slow_viewer`` follows."""

    decision: LayerDecision


@dataclass(frozen=True, slots=True)
class KeyframeWanted:
    """The viewer asked for a picture (PLI/FIR): ask the source, if it can."""


@dataclass(frozen=True, slots=True)
class ProbeStarted:
    to: str
    decision: LayerDecision
    base_bps: float
    target_bps: float


@dataclass(frozen=True, slots=True)
class ProbeFailed:
    to: str
    decision: LayerDecision
    probe_bytes: int


@dataclass(frozen=True, slots=True)
class CloseWanted:
    reason: str
    detail: str = ""


Event = LayerSwitched | ViewerDropped | KeyframeWanted | ProbeStarted | ProbeFailed | CloseWanted


class SendKind:
    """What a batch reported to :meth:`ViewerEgress.on_sent` carried."""

    MEDIA = 0
    RETRANSMIT = 1
    PROBE = 2
    REPORT = 3


class PacketSource(Protocol):
    """What the core reads from its stream's fan-out (no I/O)."""

    def histories(self, sink: Any = None) -> Mapping[int, Any]: ...

    def anchors(self) -> dict[int, MediaAnchor]: ...

    @property
    def ordered_layers(self) -> tuple[Layer, ...]: ...


class ViewerEgress:
    """One viewer's forwarding decisions, sans-I/O (see the module docstring).

    ``source`` gives the retransmission histories and media anchors, read
    per ``sink`` (the key the fan-out knows this viewer by: its join replay
    stays retransmittable).
    """

    # Slots: the fan-out's C call (media/webrtc/_fastsend.c) reads a core's
    # state per viewer per frame at fixed offsets, and Python reads them
    # without a dict lookup.
    __slots__ = ("_source", "_sink", "cname", "policy", "send_failure_timeout", "stats", "events", "timer_changed",
                 "layers", "pin_name", "video", "audio", "video_ssrc", "audio_ssrc", "_selector", "_budget",
                 "_video_rate", "_wire_rate", "estimate_bps", "_pacer", "_pacer_at", "_probe_sr_at",
                 "_judge_after_send", "_frozen_since", "_failing_since", "_report_at", "_close_wanted")

    def __init__(self, source: PacketSource, sink: Any, *, cname: bytes, policy: LayerPolicy,
                 rtx_share: float = 0.25, rtx_playout_allowance: float = 0.5,
                 send_failure_timeout: float = 5.0, pin: str | None = None) -> None:
        self._source = source
        self._sink = sink
        self.cname = cname
        self.policy = policy
        self.send_failure_timeout = send_failure_timeout
        self.stats = SessionStats()
        self.events: list[Event] = []
        #: Set when :meth:`get_timer` may have moved; the owner re-arms and clears it.
        self.timer_changed = False
        self.layers: tuple[Layer, ...] = ()
        self.pin_name = pin
        self.video: Rewriter | None = None
        self.audio: Rewriter | None = None
        self.video_ssrc = 0
        self.audio_ssrc = 0
        self._selector: LayerSelector | None = None
        self._budget = RetransmitBudget(rtx_share, playout_allowance=rtx_playout_allowance)
        self._video_rate = RateMeter()  # video payload bytes (the layer's rate as sent)
        self._wire_rate = RateMeter()  # everything sent to this viewer, SRTP bytes
        self.estimate_bps: float | None = None
        self._pacer: ProbePacer | None = None
        self._pacer_at: float | None = None  # its next batch
        self._probe_sr_at = 0.0
        #: The probe was judged after its batch's send outcome is known.
        self._judge_after_send = False
        # A viewer that asked for a picture (PLI/FIR) shows a frozen or broken
        # one until the next keyframe of its layer reaches it.
        self._frozen_since: float | None = None
        self._failing_since: float | None = None
        self._report_at: float | None = None
        self._close_wanted = False

    # -- wiring ------------------------------------------------------------------------

    def set_track(self, kind: str, rewriter: Rewriter, ssrc: int) -> None:
        """A negotiated track: its rewriter and SSRC (what RTCP names it by)."""
        if kind == "video":
            self.video, self.video_ssrc = rewriter, ssrc
        else:
            self.audio, self.audio_ssrc = rewriter, ssrc

    def initial_layer(self, layers: tuple[Layer, ...] | None = None) -> int:
        """Where a viewer starts: its pinned layer, else the highest (loss,
        RTT and REMB move it down)."""
        layers = layers or self.layers
        if not layers:
            return 0
        pinned = layer_named(layers, self.pin_name)
        return pinned.index if pinned is not None else len(layers) - 1

    def start(self, now: float) -> None:
        """Attached to the fan-out: sender reports are due from now on."""
        self._report_at = now + REPORT_INTERVAL_S
        self.timer_changed = True

    def on_layers(self, layers: tuple[Layer, ...], now: float) -> None:
        """The stream's layers changed (one appeared): a new selector, kept
        on the current layer by name."""
        old = layer_named(layers, self.layer_name)
        self.layers = layers
        pinned = layer_named(layers, self.pin_name)
        start = old.index if old is not None else self.initial_layer()
        video = self.video
        self._stop_probe()
        self._selector = LayerSelector(
            max(len(layers), 1), initial_layer=start, policy=self.policy,
            can_probe=video is not None and video.can_probe)
        if pinned is not None:
            self._selector.pin(pinned.index, now)
        if video is not None:
            video.request_switch(start)

    def pin(self, name: str | None, now: float) -> None:
        """Pin to a layer name, or ``None`` for automatic selection; raises
        ValueError for a layer the stream does not have."""
        known = self.layers or self._source.ordered_layers
        if name is not None and layer_named(known, name) is None:
            raise ValueError(f"no layer {name!r}; layers: {', '.join(l.name for l in known) or 'none yet'}")
        self.pin_name = name
        if self._selector is None:
            return
        if name is None:
            self._selector.unpin()
            return
        layer = layer_named(self.layers, name)
        assert layer is not None  # validated against self.layers above once a selector exists
        decision = self._selector.pin(layer.index, now)
        if decision is not None:
            self._apply(decision)
        elif self.video is not None:
            self.video.request_switch(layer.index)

    @property
    def layer(self) -> Layer | None:
        video = self.video
        if video is None or not self.layers:
            return None
        idx = video.current_layer
        if idx is None:
            idx = video.target_layer
        return self.layers[idx] if idx is not None and 0 <= idx < len(self.layers) else None

    @property
    def layer_name(self) -> str | None:
        layer = self.layer
        return layer.name if layer is not None else None

    @property
    def pinned(self) -> bool:
        return self.pin_name is not None

    # -- media -----------------------------------------------------------------------

    def on_packets(self, index: int, packets: list[LayerPacket], now: float) -> list[bytes]:
        """The fan-out's packets of layer ``index`` (or ``AUDIO``) → the RTP
        datagrams for this viewer (empty: not its layer, or not yet)."""
        if index == AUDIO:
            rw = self.audio
        else:
            rw = self.video
        if rw is None:
            return []
        if index != AUDIO and index != rw.current_layer and index != rw.target_layer:
            return []
        out = rw.rewrite_frame(index, packets, now)
        if (out and self._frozen_since is not None and index != AUDIO and packets[0].keyframe_start
                and rw.current_layer == index):
            self.stats.freezes += 1
            self.stats.frozen_s += max(0.0, now - self._frozen_since)
            self._frozen_since = None
        return out

    def fast_rewriter(self, index: int, first: LayerPacket) -> Rewriter | None:
        """The rewriter whose in-order path takes a frame of ``index`` that
        starts with ``first`` with nothing else for :meth:`on_packets` to do
        (the I/O shell may then rewrite and send it in one call, e.g.
        ``FastPath.rewrite_send``, and give what that path does not take to
        :meth:`on_packets`); None: :meth:`on_packets` takes it all."""
        rw = self.audio if index == AUDIO else self.video
        if rw is None or rw.current_layer != index:
            return None
        if index != AUDIO and self._frozen_since is not None and first.keyframe_start:
            return None  # the end of a freeze is counted in on_packets
        return rw

    def on_sent(self, kind: int, count: int, nbytes: int, overflowed: bool, failing_since: float | None,
                now: float, index: int = 0) -> None:
        """What the send path did with a batch: ``nbytes`` on the wire,
        whether the socket's buffer overflowed (packets dropped for this
        viewer only), and since when every send has failed (``None``: the
        last one succeeded)."""
        stats = self.stats
        stats.bytes_sent += nbytes
        if kind == SendKind.MEDIA and not overflowed and failing_since is None and self._failing_since is None:
            # The per-frame case (sent, nothing failing):
            # nothing below applies.
            stats.packets_sent += count
            return
        if kind == SendKind.MEDIA:
            stats.packets_sent += count
        elif kind == SendKind.RETRANSMIT:
            stats.retransmits += count
            stats.retransmit_bytes += nbytes
        elif kind == SendKind.PROBE:
            stats.probe_bytes += nbytes
        if failing_since != self._failing_since:
            self._failing_since = failing_since
            self.timer_changed = True
        if failing_since is not None and kind != SendKind.RETRANSMIT:
            self._check_send_failure(now)
        if overflowed and kind != SendKind.RETRANSMIT and kind != SendKind.REPORT:
            # The kernel buffer of this viewer's socket was full: packets were
            # dropped for this viewer only. Move it down, or drop it.
            stats.backlog_events += 1
            if self._selector is not None and (kind == SendKind.PROBE or index != AUDIO):
                self._apply(self._selector.on_send_queue_overflow(now))
        if kind == SendKind.PROBE and self._judge_after_send:
            self._judge_after_send = False
            self._judge(now)

    def _check_send_failure(self, now: float) -> None:
        """End the viewer only when sends have failed for
        ``send_failure_timeout`` seconds without one success in between."""
        since = self._failing_since
        if since is None or self._close_wanted or now - since < self.send_failure_timeout:
            return
        self._close("send_failed", f"every send failed for {now - since:.1f} s")

    def _close(self, reason: str, detail: str = "") -> None:
        self._close_wanted = True
        self._stop_probe()
        self.events.append(CloseWanted(reason, detail))

    # -- RTCP ------------------------------------------------------------------------

    def on_rtcp_datagram(self, data: bytes, now: float, ntp_now: int) -> list[bytes]:
        """One unprotected (compound) RTCP datagram from the viewer, as it
        came off SRTCP: parsed here and each packet given to the track it
        names, the way :meth:`on_rtcp` expects it. Returns the
        retransmissions to send; a datagram that does not parse is dropped
        (RFC 3550 §6.1: a compound packet is validated as a whole).

        The track is found by SSRC, as a receiver of a BUNDLE group must
        (RFC 8843 §9.2): a report block's SSRC, the feedback's media source
        (RFC 4585 §6.1), a FIR entry's SSRC — RFC 5104 §4.3.1.2: the media
        source field of a FIR "SHALL be set to 0", the target is in the
        FCI — and the SSRCs a REMB lists. Audio receiver reports change
        nothing (loss and RTT drive the video layer only), so they stop at
        the parse.
        """
        try:
            packets = parse_rtcp(data)
        except RtpError:
            return []
        video_ssrc = self.video_ssrc if self.video is not None else None
        audio_ssrc = self.audio_ssrc if self.audio is not None else None
        out: list[bytes] = []
        for packet in packets:
            kind: str | None = None
            if isinstance(packet, (ReceiverReport, SenderReport)):
                if video_ssrc is not None and any(b.ssrc == video_ssrc for b in packet.reports):
                    kind = "video"
            elif isinstance(packet, (Nack, Pli)):
                if packet.media_ssrc == video_ssrc:
                    kind = "video"
                elif packet.media_ssrc == audio_ssrc:
                    kind = "audio"
            elif isinstance(packet, Fir):
                if video_ssrc is not None and any(e.ssrc == video_ssrc for e in packet.entries):
                    kind = "video"
            elif isinstance(packet, Remb):
                if video_ssrc is not None and video_ssrc in packet.ssrcs:
                    kind = "video"
            if kind is not None:
                out.extend(self.on_rtcp(kind, packet, now, ntp_now))
        return out

    def on_rtcp(self, kind: str, packet: Any, now: float, ntp_now: int) -> list[bytes]:
        """One RTCP packet from the viewer on track ``kind``; ``ntp_now`` is
        the wall clock as NTP (for the RTT, RFC 3550 §6.4.1). Returns the
        retransmissions to send."""
        rw = self.video if kind == "video" else self.audio
        if rw is None:
            return []
        ssrc = self.video_ssrc if kind == "video" else self.audio_ssrc
        if kind == "video":
            self._update_budget(rw, now)
        sel = self._selector
        if isinstance(packet, (ReceiverReport, SenderReport)):
            if kind != "video" or sel is None:
                return []
            for block in packet.reports:
                if block.ssrc == ssrc:
                    rtt = rtt_from_report(block.lsr, block.dlsr, ntp_middle32(ntp_now))
                    self._apply(sel.on_receiver_report(block.highest_seq, block.packets_lost, rtt, now))
        elif isinstance(packet, Nack):
            if packet.media_ssrc != ssrc:
                return []
            self.stats.nacks += 1
            dropped = rw.rtx_too_old + rw.rtx_over_budget
            histories = self._source.histories(self._sink)
            if kind == "video":
                rtt = sel.rtt if sel is not None else None
                out = rw.retransmit(packet.lost, histories, now, budget=self._budget,
                                    max_age=self._budget.max_age(rtt))
            else:
                out = rw.retransmit(packet.lost, histories, now)
            self.stats.retransmits_dropped += rw.rtx_too_old + rw.rtx_over_budget - dropped
            if kind == "video" and self._selector is not None:
                self._apply(self._selector.on_nack(packet.lost, now))
            return out
        elif isinstance(packet, Pli):
            if packet.media_ssrc == ssrc and kind == "video":
                self.stats.plis += 1
                self._freeze(now)
        elif isinstance(packet, Fir):
            if kind == "video" and any(e.ssrc == ssrc for e in packet.entries):
                self.stats.firs += 1
                self._freeze(now)
        elif isinstance(packet, Remb):
            if kind == "video" and sel is not None and ssrc in packet.ssrcs:
                self._apply(sel.on_remb(packet.bitrate, now))
        return []

    def _freeze(self, now: float) -> None:
        if self._frozen_since is None:
            self._frozen_since = now
        self.events.append(KeyframeWanted())

    def _update_budget(self, rw: Rewriter, now: float) -> None:
        """Per RTCP packet (never per media packet): send rates, the viewer's
        estimated bandwidth — its REMB, and while it loses packets what gets
        through (send rate × (1 − loss over the last 0.5 s)) — and from them
        the retransmission budget."""
        layer_bps = self._video_rate.update(rw.octets_sent, now)
        wire_bps = self._wire_rate.update(self.stats.bytes_sent, now)
        sel = self._selector
        if sel is None:
            return
        estimate = sel.bandwidth
        loss = sel.recent_loss(0.5, now)
        if wire_bps is not None and loss is not None and loss > self._budget.loss_threshold:
            delivered = wire_bps * (1.0 - loss)
            estimate = delivered if estimate is None else min(estimate, delivered)
        self.estimate_bps = estimate
        self._budget.update(layer_bps, estimate, loss, now)

    # -- layer decisions -----------------------------------------------------------------

    def _name(self, index: int) -> str:
        return self.layers[index].name if 0 <= index < len(self.layers) else str(index)

    def _apply(self, decision: LayerDecision | None) -> None:
        if decision is None:
            if self._pacer is not None and (self._selector is None or self._selector.probing is None):
                self._stop_probe()
            return
        if decision.action in (Action.PROBE, Action.PROBE_STOP):
            self._on_probe_decision(decision)
            return
        self._stop_probe()
        if decision.action == Action.DROP_VIEWER:
            self.events.append(ViewerDropped(decision))
            self._close("slow_viewer")
            return
        video = self.video
        if video is not None:
            # Away from congestion the old layer stops at once (it only
            # feeds the loss); up, or pinned, it flows until the switch.
            congested = decision.to_layer < decision.from_layer and Reason.PINNED not in decision.reasons
            video.request_switch(decision.to_layer, stop_current=congested)
        self.stats.switches += 1
        self.events.append(LayerSwitched(self._name(decision.from_layer), self._name(decision.to_layer), decision))

    # -- probing ---------------------------------------------------------------------------

    def _on_probe_decision(self, decision: LayerDecision) -> None:
        to = self._name(decision.to_layer)
        if decision.action == Action.PROBE_STOP:
            self.stats.probes_failed += 1
            sent = self._pacer.bytes_sent if self._pacer is not None else 0
            self._stop_probe()
            self.events.append(ProbeFailed(to, decision, sent))
            return
        window = self._selector.probe_window if self._selector is not None else None
        if self.video is None or window is None:
            return
        histories = self._source.histories()
        now = decision.at
        # Rates of the layers as produced over the last second: one scan of
        # each ring, once per probe.
        cur = histories[decision.from_layer].recent_bytes(now, 1.0) * 8.0 if decision.from_layer in histories else 0.0
        nxt = histories[decision.to_layer].recent_bytes(now, 1.0) * 8.0 if decision.to_layer in histories else 0.0
        # The ramp runs on what the viewer's link carries: everything sent
        # (audio, headers, SRTP) now, and the same with the next layer's video.
        wire = self._wire_rate.rate or cur
        base = max(wire, cur, 50_000.0)
        target = max(base - cur + nxt * 1.05, 1.5 * base)
        start, end = window
        self._pacer = ProbePacer(base, target, start, end - start)
        self._pacer_at = self._pacer.next_deadline(now)
        self.stats.probes += 1
        self.timer_changed = True
        self.events.append(ProbeStarted(to, decision, base, target))

    def _stop_probe(self) -> None:
        if self._pacer is not None:
            self._pacer = self._pacer_at = None
            self.timer_changed = True

    @property
    def probing(self) -> bool:
        return self._pacer is not None

    def _judge(self, now: float) -> None:
        if self._selector is not None:
            self._apply(self._selector.handle_timer(now))

    # -- timers ------------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` has something to do: the next sender
        report or the send-failure limit (on the :data:`TIMER_GRID_S`
        grid), a probe batch or probe judgement (exact)."""
        coarse = None
        if not self._close_wanted:
            coarse = self._report_at
            if self._failing_since is not None:
                limit = self._failing_since + self.send_failure_timeout
                coarse = limit if coarse is None else min(coarse, limit)
        deadlines = [] if coarse is None else [on_timer_grid(coarse)]
        pacer = self._pacer
        sel = self._selector
        if pacer is not None or (sel is not None and sel.probing is not None):
            # The probe's pace and its end: only while one runs.
            if pacer is not None and self._pacer_at is not None:
                deadlines.append(self._pacer_at)
            if sel is not None and (d := sel.next_deadline()) is not None:
                deadlines.append(d)
        return min(deadlines) if deadlines else None

    def handle_timer(self, now: float, wall: float) -> tuple[list[bytes], list[bytes]]:
        """Do what is due at ``now`` (``wall``: Unix time, for the sender
        reports' NTP). Returns (RTP, RTCP) datagrams to send; report the RTP
        batch with ``on_sent(SendKind.PROBE, …)`` and the RTCP one with
        ``on_sent(SendKind.REPORT, …)``."""
        rtp: list[bytes] = []
        rtcp: list[bytes] = []
        self.timer_changed = True
        if self._report_at is not None and now >= self._report_at:
            self._report_at = now + REPORT_INTERVAL_S
            rtcp.extend(self._sender_reports(now, wall))
        pacer = self._pacer
        video = self.video
        judged_later = False
        if pacer is not None and video is not None:
            due = pacer.due(now)
            if due > 0:
                out = video.probe(due, self._source.histories(), now)
                # Bytes not found in the history are not owed later: no burst.
                pacer.sent(max(due, sum(len(d) for d in out)))
                rtp.extend(out)
            if now - self._probe_sr_at >= PROBE_REPORT_INTERVAL_S:
                self._probe_sr_at = now
                sdes = Sdes((SdesChunk(self.video_ssrc, ((1, self.cname),)),))
                rtcp.append(serialize_rtcp((video.sender_report(now, wall, self._source.anchors()), sdes)))
            if pacer.done(now):
                self._pacer = self._pacer_at = None
            else:
                self._pacer_at = pacer.next_deadline(now)
            if rtp:
                # Judged once the batch's send outcome (overflow) is known.
                self._judge_after_send = judged_later = True
        if not judged_later and (self._pacer is not None or self._selector is not None):
            self._judge(now)
        if self._failing_since is not None:
            self._check_send_failure(now)
        return rtp, rtcp

    def _sender_reports(self, now: float, wall: float) -> list[bytes]:
        """A sender report (+ CNAME) per track that has sent (RFC 3550
        §6.4.1), audio and video on the stream's presentation clock."""
        anchors = self._source.anchors()
        out = []
        for rw, ssrc in ((self.audio, self.audio_ssrc), (self.video, self.video_ssrc)):
            if rw is None or rw.packets_sent == 0:
                continue
            sdes = Sdes((SdesChunk(ssrc, ((1, self.cname),)),))
            out.append(serialize_rtcp((rw.sender_report(now, wall, anchors), sdes)))
        return out

    # -- what a director sees ---------------------------------------------------------------

    def counters(self, send_errors: int) -> dict[str, int | float | None]:
        """Cumulative figures of this viewer (``send_errors`` from its sender)."""
        s = self.stats
        return {"packets_sent": s.packets_sent, "bytes_sent": s.bytes_sent, "nacks": s.nacks,
                "retransmits": s.retransmits, "retransmit_bytes": s.retransmit_bytes, "plis": s.plis,
                "firs": s.firs, "switches": s.switches, "backlog_events": s.backlog_events,
                "send_errors": send_errors,
                "freezes": s.freezes, "frozen_s": round(s.frozen_s, 3),
                "retransmits_dropped": s.retransmits_dropped, "probes": s.probes, "probes_failed": s.probes_failed,
                "probe_bytes": s.probe_bytes,
                "estimate_bps": round(self.estimate_bps) if self.estimate_bps is not None else None}

    @property
    def frozen(self) -> bool:
        return self._frozen_since is not None

    def frozen_s(self, now: float) -> float:
        """Seconds frozen in total, the current freeze included."""
        return self.stats.frozen_s + (now - self._frozen_since if self._frozen_since is not None else 0.0)

    @property
    def loss(self) -> float | None:
        return self._selector.loss if self._selector is not None else None

    @property
    def rtt(self) -> float | None:
        return self._selector.rtt if self._selector is not None else None

    def struggling(self, failing: bool) -> bool:
        """Frozen (a PLI/FIR not yet answered by a keyframe), every send
        failing (``failing``, from the send path), or losing more than the
        down-switch threshold."""
        sel = self._selector
        return (self._frozen_since is not None or failing
                or (sel is not None and sel.loss is not None and sel.loss > sel.policy.down_loss))


def errno_name(code: int | None) -> str:
    """``EPERM`` for 1; ``unknown`` for no code."""
    return errno.errorcode.get(code, str(code)) if code is not None else "unknown"
