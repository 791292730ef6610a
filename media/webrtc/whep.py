"""WHEP viewer sessions: aiortc for ICE/DTLS/SRTP, our own forwarding.

:class:`WhepSession` answers one viewer's offer and, once DTLS is up, joins
the stream's :class:`~media.webrtc.fanout.StreamFanout` as a sink. Per
packet it rewrites (:class:`media.rtp.rewrite.Rewriter`), protects and sends
(:class:`~media.webrtc.aiortc_adapter.FastPath`) — nothing is decoded or
re-packetized per viewer.

RTCP from the viewer:

* receiver reports → cumulative loss, highest sequence number and RTT
  (RFC 3550 §6.4.1) → layer selector; REMB (draft-alvestrand-rmcat-remb) →
  layer selector. Going up is decided on a probe: RTX copies of recent
  packets paced up to the next layer's rate (:mod:`media.rtp.probe`, one
  timer per probing viewer), plus a sender report every 100 ms so the RTT
  follows the queue the probe may build;
* Generic NACK (RFC 4585 §6.2.1) → retransmission from the layer's shared
  history (RTX, RFC 4588, when negotiated), within the viewer's
  retransmission budget and playout window (:mod:`media.rtp.budget`);
  retransmitted and probe bytes count in ``bytes_sent``;
* PLI/FIR (RFC 4585 §6.3.1, RFC 5104 §4.3.1) → counted; the viewer resumes
  at the layer's next IDR (an SRT source cannot be asked for one; a hook
  lets a WebRTC source forward the request upstream).

The send queue of a viewer is its ICE socket's write buffer: above
``backlog_limit`` bytes the viewer is moved down a layer at once, and on the
lowest layer (or pinned) it is disconnected — it never slows the others.

:class:`WhepService` owns the sessions and one fan-out per stream, and runs
one ticker for all sessions (sender reports, liveness).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.rtcrtpparameters import RTCRtcpFeedback, RTCRtpCodecParameters, RTCRtpSendParameters

from ..errors import UnsupportedMedia
from ..rtp.budget import RateMeter, RetransmitBudget
from ..rtp.layers import Action, LayerDecision, LayerPolicy, LayerSelector, Reason
from ..rtp.probe import ProbePacer
from ..rtp.packet import LayerPacket
from ..rtp.rewrite import Rewriter, TrackParams
from ..rtp.rtcp import (
    Fir, Nack, Pli, ReceiverReport, Remb, Sdes, SdesChunk, SenderReport, ntp_from_unix, ntp_middle32,
    rtt_from_report, serialize_rtcp,
)
from ..stream import Stream
from . import aiortc_adapter as adapter
from .fanout import AUDIO, StreamFanout
from .sdp import Offer, SdpError, choose_h264, choose_opus

log = logging.getLogger("returnfeed.webrtc")

#: Close reasons that mean something went wrong (logged as warnings).
_FAILURE_REASONS = frozenset({"send_failed", "transport_closed", "ice_failed", "slow_viewer"})

URI_MID = "urn:ietf:params:rtp-hdrext:sdes:mid"
URI_ABS_SEND_TIME = "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"


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


@dataclass(slots=True)
class _Track:
    kind: str
    sender: adapter.ForwardingSender
    rewriter: Rewriter | None = None


@dataclass(slots=True)
class SessionInfo:
    id: str
    stream: str
    layer: str | None
    pinned: bool
    state: str
    created: float
    stats: dict[str, int | None] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ViewerSnapshot:
    """One viewer as a director sees it (``GET /api/v1/streams/{s}/viewers``).

    ``loss`` is the smoothed fraction lost from the viewer's receiver reports,
    ``rtt_ms`` the round trip from them, ``estimate_bps`` the viewer's
    bandwidth estimate (its REMB, or what gets through while it loses
    packets); ``frozen`` is true between a picture request
    (PLI/FIR) and the next keyframe that reached it; ``struggling`` is true
    while it is frozen, its sends fail, or its loss is above the down-switch
    threshold.
    """

    id: str
    stream: str
    layer: str | None
    pinned: bool
    state: str
    since_s: float
    loss: float | None
    rtt_ms: float | None
    estimate_bps: int | None
    frozen: bool
    struggling: bool
    errors_by_errno: dict[str, int]
    counters: dict[str, int | float | None]

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "layer": self.layer, "pinned": self.pinned, "state": self.state,
                "since_s": self.since_s, "loss": self.loss, "rtt_ms": self.rtt_ms,
                "estimate_bps": self.estimate_bps, "frozen": self.frozen, "struggling": self.struggling,
                "send_errors_by_errno": self.errors_by_errno, **self.counters}


class WhepSession:
    """One WHEP viewer."""

    def __init__(self, service: "WhepService", stream_name: str, fanout: StreamFanout, *,
                 owner: str, pin: str | None = None, sync: bool = True) -> None:
        self.id = secrets.token_urlsafe(12)
        # Lip sync (a=msid, RFC 8830 §2): a browser synchronizes only tracks
        # of one MediaStream, so one stream id for audio and video; with
        # sync off (video first) each track gets its own and plays at once.
        self.sync = sync
        msid = "returnfeed-" + secrets.token_hex(8)
        self._stream_ids = {"audio": msid, "video": msid} if sync else {
            "audio": msid + "-audio", "video": msid + "-video"}
        self.etag = '"' + secrets.token_hex(8) + '"'
        self.service = service
        self.stream_name = stream_name
        self.fanout = fanout
        self.owner = owner
        self.created = time.time()
        self.created_mono = time.monotonic()
        #: When ICE+DTLS completed (monotonic); None until then.
        self.connected_at: float | None = None
        self.stats = SessionStats()
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[
            RTCIceServer(**s) for s in service.ice_servers]))
        self._tracks: dict[str, _Track] = {}
        self._fast: adapter.FastPath | None = None
        self._selector: LayerSelector | None = None
        self._layer_names: list[str] = []
        self._pin_name = pin
        self._attached = False
        self.closed = False
        self._closing: asyncio.Task | None = None
        self.close_reason: str | None = None
        # A viewer that asked for a picture (PLI/FIR) shows a frozen or broken
        # one until the next keyframe of its layer reaches it.
        self._frozen_since: float | None = None
        self.answer_note = ""
        self.sdp_answer = ""
        self._budget = RetransmitBudget(service.rtx_share, playout_allowance=service.rtx_playout_allowance)
        self._video_rate = RateMeter()  # video payload bytes (the layer's rate as sent)
        self._wire_rate = RateMeter()  # everything sent to this viewer, SRTP bytes
        self.estimate_bps: float | None = None
        self._pacer: ProbePacer | None = None
        self._probe_timer: asyncio.TimerHandle | None = None
        self._probe_sr_at = 0.0

    # -- negotiation -------------------------------------------------------------

    async def answer(self, offer_sdp: str, offer: Offer, source_plid: str | None) -> str:
        """Return the SDP answer; raises SdpError/UnsupportedMedia for what
        cannot be served."""
        video = offer.section("video")
        audio = offer.section("audio")
        video_choice = choose_h264(video, source_plid) if video is not None else None
        opus = choose_opus(audio) if audio is not None else None
        if video is not None and video.direction not in ("recvonly", "sendrecv"):
            raise SdpError("the video section must be recvonly for WHEP")
        if audio is not None and audio.direction not in ("recvonly", "sendrecv"):
            raise SdpError("the audio section must be recvonly for WHEP")
        transceivers = {}
        for section in offer.media:
            if section.kind in ("audio", "video"):
                transceivers[section.kind] = self.pc.addTransceiver(section.kind, direction="sendonly")
        self.pc.on("connectionstatechange", self._on_state)
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(offer_sdp, "offer"))
        except Exception as exc:  # aiortc raises assorted errors on SDP it dislikes
            raise SdpError(f"offer rejected by the WebRTC stack: {exc}") from None
        adapter.choose_dtls_role(self.pc)
        for kind, tr in transceivers.items():
            if kind == "video" and video_choice is not None:
                c = video_choice.codec
                fb = [RTCRtcpFeedback(type="nack"), RTCRtcpFeedback(type="nack", parameter="pli"),
                      RTCRtcpFeedback(type="goog-remb")]
                fb = [f for f in fb if (f.type + (" " + f.parameter if f.parameter else "")) in c.rtcp_fb]
                codecs = [RTCRtpCodecParameters(
                    mimeType="video/H264", clockRate=90000, payloadType=c.payload_type, rtcpFeedback=fb,
                    parameters={"level-asymmetry-allowed": "1", "packetization-mode": "1",
                                "profile-level-id": video_choice.answer_profile_level_id})]
                if video_choice.rtx is not None:
                    codecs.append(RTCRtpCodecParameters(mimeType="video/rtx", clockRate=90000,
                                                        payloadType=video_choice.rtx.payload_type,
                                                        parameters={"apt": c.payload_type}))
                adapter.set_negotiated_codecs(tr, codecs)
                self.answer_note = video_choice.reason
            elif kind == "audio" and opus is not None:
                params = {k: v for k, v in opus.fmtp.items() if k in ("minptime", "useinbandfec", "stereo")}
                adapter.set_negotiated_codecs(tr, [RTCRtpCodecParameters(
                    mimeType="audio/opus", clockRate=48000, channels=2, payloadType=opus.payload_type,
                    parameters=params)])
            sender = adapter.ForwardingSender(
                kind, tr.sender.transport,
                on_rtcp=lambda p, k=kind: self._on_rtcp(k, p),
                on_ready=self._on_sender_ready)
            adapter.install_sender(tr, sender, self._stream_ids[kind])
            self._tracks[kind] = _Track(kind, sender)
        answer = await self.pc.createAnswer()
        await self.pc.setLocalDescription(answer)
        return self.pc.localDescription.sdp

    async def add_remote_candidates(self, frag: str) -> None:
        """Trickle ICE (RFC 8840 sdpfrag) from a PATCH."""
        await adapter.add_trickle_candidates(self.pc, frag)

    # -- connection ----------------------------------------------------------------

    def _on_state(self) -> None:
        state = self.pc.connectionState
        if state == "connected" and self.connected_at is None:
            self.connected_at = time.monotonic()
        if state in ("failed", "closed") and not self.closed:
            log.info("webrtc.viewer_state", extra={"fields": {"session": self.id, "state": state}})
            self.close_soon("ice_failed" if state == "failed" else "peer_closed")

    def _on_sender_ready(self, sender: adapter.ForwardingSender, parameters: RTCRtpSendParameters) -> None:
        track = self._tracks[sender.kind]
        codecs = parameters.codecs
        main = codecs[0]
        rtx = next((c for c in codecs if c.mimeType.lower().endswith("/rtx")), None)
        ext = {e.uri: e.id for e in parameters.headerExtensions}
        mid_id = ext.get(URI_MID)
        track.rewriter = Rewriter(TrackParams(
            ssrc=sender.ssrc, payload_type=main.payloadType, clock_rate=main.clockRate,
            mid=parameters.muxId if mid_id else None, mid_id=mid_id,
            abs_send_time_id=ext.get(URI_ABS_SEND_TIME),
            rtx_ssrc=sender.rtx_ssrc if rtx else None, rtx_payload_type=rtx.payloadType if rtx else None,
        ), initial_layer=AUDIO if sender.kind == "audio" else self._initial_layer_index())
        if self._fast is None:
            try:
                self._fast = adapter.FastPath(sender.transport, sndbuf=self.service.backlog_limit)
            except ConnectionError:
                self.close_soon("transport_closed")
                return
        if all(t.rewriter is not None for t in self._tracks.values()) and not self._attached:
            self._attached = True
            self.fanout.attach(self, self._initial_layer_index(), time.monotonic())
            log.info("webrtc.viewer_started", extra={"fields": {
                "session": self.id, "stream": self.stream_name, "layers": self._layer_names,
                "layer": self.layer_name}})

    def _initial_layer_index(self) -> int:
        names = self._layer_names or self.fanout.layers
        if not names:
            return 0
        if self._pin_name in names:
            return names.index(self._pin_name)
        return len(names) - 1  # start high; loss/RTT/REMB move it down

    # -- fan-out sink ----------------------------------------------------------------

    def on_layers_changed(self, layers: list[str]) -> None:
        old = self.layer_name
        self._layer_names = layers
        pinned = self._pin_name in layers
        start = layers.index(old) if old in layers else self._initial_layer_index()
        video = self._tracks.get("video")
        self._stop_probe()
        self._selector = LayerSelector(
            max(len(layers), 1), initial_layer=start, policy=self.service.layer_policy,
            can_probe=video is not None and video.rewriter is not None and video.rewriter.can_probe)
        if pinned:
            self._selector.pin(layers.index(self._pin_name), time.monotonic())
        if video is not None and video.rewriter is not None:
            video.rewriter.request_switch(start)

    def on_packets(self, index: int, packets: list[LayerPacket], now: float) -> None:
        fast = self._fast
        if fast is None or self.closed:
            return
        if index == AUDIO:
            track = self._tracks.get("audio")
        else:
            track = self._tracks.get("video")
        if track is None or track.rewriter is None:
            return
        rw = track.rewriter
        if index != AUDIO and index != rw.current_layer and index != rw.target_layer:
            return
        rewrite = rw.rewrite
        out = []
        for p in packets:
            data = rewrite(index, p, now)
            if data is not None:
                out.append(data)
        if not out:
            return
        if (self._frozen_since is not None and index != AUDIO and packets[0].keyframe_start
                and rw.current_layer == index):
            self.stats.freezes += 1
            self.stats.frozen_s += max(0.0, now - self._frozen_since)
            self._frozen_since = None
        sender = fast.sender
        before = sender.backlogged if sender is not None else 0
        try:
            nbytes = fast.send_batch(out, now)
        except (ConnectionError, OSError, AttributeError):
            # The ICE transport or its socket went away under us (transient
            # send errors never get here: the sender counts and survives them).
            self.close_soon("transport_closed")
            return
        stats = self.stats
        stats.packets_sent += len(out)
        stats.bytes_sent += nbytes
        sender = fast.sender
        if sender.failing_since is not None:
            self._check_send_failure(now)
        if sender.backlogged != before:
            # The kernel buffer of this viewer's socket was full: packets were
            # dropped for this viewer only. Move it down, or drop it.
            self.stats.backlog_events += 1
            if self._selector is not None and index != AUDIO:
                self._apply(self._selector.on_send_queue_overflow(now))

    def on_stream_ended(self) -> None:
        self.close_soon("stream_ended")

    def _check_send_failure(self, now: float) -> None:
        """End the session only when sends have failed for
        ``send_failure_timeout`` seconds without one success in between."""
        sender = self._fast.sender if self._fast is not None else None
        if sender is None or sender.failing_since is None:
            return
        if now - sender.failing_since >= self.service.send_failure_timeout:
            code = sender.last_errno
            name = errno.errorcode.get(code, str(code)) if code is not None else "unknown"
            self.close_soon("send_failed", detail=f"every send failed for "
                            f"{now - sender.failing_since:.1f} s (last error {name})")

    # -- RTCP ------------------------------------------------------------------------

    def _on_rtcp(self, kind: str, packet: Any) -> None:
        track = self._tracks.get(kind)
        if track is None or track.rewriter is None or self._fast is None:
            return
        now = time.monotonic()
        ssrc = track.sender.ssrc
        if kind == "video":
            self._update_budget(track.rewriter, now)
        if isinstance(packet, (ReceiverReport, SenderReport)):
            if kind != "video" or self._selector is None:
                return
            for block in packet.reports:
                if block.ssrc == ssrc:
                    rtt = rtt_from_report(block.lsr, block.dlsr, ntp_middle32(ntp_from_unix(time.time())))
                    self._apply(self._selector.on_receiver_report(
                        block.highest_seq, block.packets_lost, rtt, now))
        elif isinstance(packet, Nack):
            if packet.media_ssrc != ssrc:
                return
            self.stats.nacks += 1
            rw = track.rewriter
            dropped = rw.rtx_too_old + rw.rtx_over_budget
            histories = self.fanout.histories(self)
            if kind == "video":
                rtt = self._selector.rtt if self._selector is not None else None
                out = rw.retransmit(packet.lost, histories, now, budget=self._budget,
                                    max_age=self._budget.max_age(rtt))
            else:
                out = rw.retransmit(packet.lost, histories, now)
            self.stats.retransmits_dropped += rw.rtx_too_old + rw.rtx_over_budget - dropped
            if kind == "video" and self._selector is not None:
                self._apply(self._selector.on_nack(packet.lost, now))
            if not out:
                return
            try:
                nbytes = self._fast.send_batch(out, now)
            except (ConnectionError, OSError, AttributeError):
                self.close_soon("transport_closed")
                return
            self.stats.retransmits += len(out)
            self.stats.retransmit_bytes += nbytes
            self.stats.bytes_sent += nbytes
        elif isinstance(packet, Pli):
            if packet.media_ssrc == ssrc and kind == "video":
                self.stats.plis += 1
                if self._frozen_since is None:
                    self._frozen_since = now
                self.service.on_keyframe_request(self.stream_name)
        elif isinstance(packet, Fir):
            if kind == "video" and any(e.ssrc == ssrc for e in packet.entries):
                self.stats.firs += 1
                if self._frozen_since is None:
                    self._frozen_since = now
                self.service.on_keyframe_request(self.stream_name)
        elif isinstance(packet, Remb):
            if kind == "video" and self._selector is not None and ssrc in packet.ssrcs:
                self._apply(self._selector.on_remb(packet.bitrate, now))

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
            log.info("webrtc.viewer_dropped", extra={"fields": {
                "session": self.id, "stream": self.stream_name, "reasons": [r.value for r in decision.reasons]}})
            self.service.count_drop(self.stream_name)
            self.close_soon("slow_viewer")
            return
        video = self._tracks.get("video")
        if video is not None and video.rewriter is not None:
            # Away from congestion the old layer stops at once (it only
            # feeds the loss); up, or pinned, it flows until the switch.
            congested = decision.to_layer < decision.from_layer and Reason.PINNED not in decision.reasons
            video.rewriter.request_switch(decision.to_layer, stop_current=congested)
        self.stats.switches += 1
        names = self._layer_names
        frm = names[decision.from_layer] if decision.from_layer < len(names) else str(decision.from_layer)
        to = names[decision.to_layer] if decision.to_layer < len(names) else str(decision.to_layer)
        self.service.count_switch(self.stream_name, frm, to)
        log.info("webrtc.layer_switch", extra={"fields": {
            "session": self.id, "stream": self.stream_name, "from": frm, "to": to,
            "reasons": [r.value for r in decision.reasons], "loss": decision.loss, "rtt": decision.rtt,
            "bandwidth": decision.bandwidth}})

    # -- probing -----------------------------------------------------------------------

    def _on_probe_decision(self, decision: LayerDecision) -> None:
        names = self._layer_names
        to = names[decision.to_layer] if decision.to_layer < len(names) else str(decision.to_layer)
        fields = {"session": self.id, "stream": self.stream_name, "to": to,
                  "reasons": [r.value for r in decision.reasons], "loss": decision.loss,
                  "rtt": decision.rtt, "bandwidth": decision.bandwidth}
        if decision.action == Action.PROBE_STOP:
            self.stats.probes_failed += 1
            fields["probe_bytes"] = self._pacer.bytes_sent if self._pacer is not None else 0
            self._stop_probe()
            log.info("webrtc.probe_failed", extra={"fields": fields})
            return
        video = self._tracks.get("video")
        window = self._selector.probe_window if self._selector is not None else None
        if video is None or video.rewriter is None or window is None:
            return
        histories = self.fanout.histories()
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
        self.stats.probes += 1
        fields.update(base_bps=round(base), target_bps=round(target))
        log.info("webrtc.probe_started", extra={"fields": fields})
        self._arm_probe_timer(now)

    def _arm_probe_timer(self, now: float) -> None:
        if self._probe_timer is not None:
            self._probe_timer.cancel()
            self._probe_timer = None
        deadlines = [d for d in (
            self._pacer.next_deadline(now) if self._pacer is not None else None,
            self._selector.next_deadline() if self._selector is not None else None) if d is not None]
        if deadlines and not self.closed:
            self._probe_timer = asyncio.get_running_loop().call_later(
                max(0.0, min(deadlines) - now), self._on_probe_timer)

    def _stop_probe(self) -> None:
        self._pacer = None
        if self._probe_timer is not None:
            self._probe_timer.cancel()
            self._probe_timer = None

    def _on_probe_timer(self) -> None:
        self._probe_timer = None
        fast = self._fast
        video = self._tracks.get("video")
        if self.closed or fast is None or video is None or video.rewriter is None:
            return
        now = time.monotonic()
        pacer = self._pacer
        if pacer is not None:
            rw = video.rewriter
            due = pacer.due(now)
            before = fast.backlogged
            try:
                if due > 0:
                    out = rw.probe(due, self.fanout.histories(), now)
                    # Bytes not found in the history are not owed later: no burst.
                    pacer.sent(max(due, sum(len(d) for d in out)))
                    if out:
                        nbytes = fast.send_batch(out, now)
                        self.stats.probe_bytes += nbytes
                        self.stats.bytes_sent += nbytes
                if now - self._probe_sr_at >= 0.1:
                    # Sender reports while probing: each RR's LSR/DLSR then
                    # measures the RTT through the queue the probe may build.
                    self._probe_sr_at = now
                    sdes = Sdes((SdesChunk(video.sender.ssrc, ((1, self.service.cname),)),))
                    fast.send_rtcp(serialize_rtcp((rw.sender_report(now, time.time(), self.fanout.anchors()), sdes)), now)
            except (ConnectionError, OSError, AttributeError):
                self.close_soon("transport_closed")
                return
            if pacer.done(now):
                self._pacer = None
            if fast.backlogged != before and self._selector is not None:
                self.stats.backlog_events += 1
                self._apply(self._selector.on_send_queue_overflow(now))
        if self._selector is not None:
            self._apply(self._selector.handle_timer(now))
        if self._selector is not None and self._selector.probing is not None:
            self._arm_probe_timer(now)

    # -- control -----------------------------------------------------------------------

    def pin(self, layer: str | None) -> None:
        """Pin to a layer name, or ``None`` for automatic selection."""
        known = self._layer_names or self.fanout.layers
        if layer is not None and layer not in known:
            raise ValueError(f"no layer {layer!r}; layers: {', '.join(known) or 'none yet'}")
        self._pin_name = layer
        if self._selector is None:
            return
        if layer is None:
            self._selector.unpin()
        else:
            decision = self._selector.pin(self._layer_names.index(layer), time.monotonic())
            if decision is not None:
                self._apply(decision)
            else:
                video = self._tracks.get("video")
                if video is not None and video.rewriter is not None:
                    video.rewriter.request_switch(self._layer_names.index(layer))

    @property
    def layer_name(self) -> str | None:
        video = self._tracks.get("video")
        if video is None or video.rewriter is None or not self._layer_names:
            return None
        idx = video.rewriter.current_layer
        if idx is None:
            idx = video.rewriter.target_layer
        return self._layer_names[idx] if idx is not None and idx < len(self._layer_names) else None

    def tick(self, now: float, wall: float) -> None:
        """Once a second: a sender report (+ CNAME) per track (RFC 3550 §6.4.1),
        audio and video on the stream's presentation clock (lip sync)."""
        if self._fast is None or self.closed:
            return
        anchors = self.fanout.anchors()
        for track in self._tracks.values():
            rw = track.rewriter
            if rw is None or rw.packets_sent == 0:
                continue
            sr = rw.sender_report(now, wall, anchors)
            sdes = Sdes((SdesChunk(track.sender.ssrc, ((1, self.service.cname),)),))
            try:
                self._fast.send_rtcp(serialize_rtcp((sr, sdes)), now)
            except (ConnectionError, OSError, AttributeError):
                self.close_soon("transport_closed")
                return
        self._check_send_failure(now)

    def counters(self) -> dict[str, int | float | None]:
        """Cumulative figures of this viewer (send errors from its sender)."""
        s = self.stats
        sender = self._fast.sender if self._fast is not None else None
        return {"packets_sent": s.packets_sent, "bytes_sent": s.bytes_sent, "nacks": s.nacks,
                "retransmits": s.retransmits, "retransmit_bytes": s.retransmit_bytes, "plis": s.plis,
                "firs": s.firs, "switches": s.switches, "backlog_events": s.backlog_events,
                "send_errors": sender.errors if sender is not None else 0,
                "freezes": s.freezes, "frozen_s": round(s.frozen_s, 3),
                "retransmits_dropped": s.retransmits_dropped, "probes": s.probes, "probes_failed": s.probes_failed,
                "probe_bytes": s.probe_bytes,
                "estimate_bps": round(self.estimate_bps) if self.estimate_bps is not None else None}

    def send_errors_by_name(self) -> dict[str, int]:
        """Failed sends of this viewer by errno name (``EPERM``, …)."""
        sender = self._fast.sender if self._fast is not None else None
        if sender is None:
            return {}
        return {errno.errorcode.get(code, str(code)): n for code, n in sender.errors_by_errno.items()}

    def struggling(self) -> bool:
        """Frozen (a PLI/FIR not yet answered by a keyframe), every send
        failing, or losing more than the down-switch threshold."""
        sel = self._selector
        sender = self._fast.sender if self._fast is not None else None
        return (self._frozen_since is not None
                or (sender is not None and sender.failing_since is not None)
                or (sel is not None and sel.loss is not None and sel.loss > sel.policy.down_loss))

    def snapshot(self, now: float) -> "ViewerSnapshot":
        """What a director sees of this viewer now."""
        sel = self._selector
        loss = sel.loss if sel is not None else None
        frozen = self._frozen_since is not None
        frozen_s = self.stats.frozen_s + (now - self._frozen_since if self._frozen_since is not None else 0.0)
        return ViewerSnapshot(
            id=self.id, stream=self.stream_name, layer=self.layer_name, pinned=self._pin_name is not None,
            state=self.pc.connectionState, since_s=round(time.time() - self.created, 1),
            loss=None if loss is None else round(loss, 4),
            rtt_ms=None if sel is None or sel.rtt is None else round(sel.rtt * 1000.0, 1),
            estimate_bps=round(self.estimate_bps) if self.estimate_bps is not None else None,
            frozen=frozen, struggling=self.struggling(), errors_by_errno=self.send_errors_by_name(),
            counters={**self.counters(), "frozen_s": round(frozen_s, 3)})

    def info(self) -> SessionInfo:
        return SessionInfo(self.id, self.stream_name, self.layer_name, self._pin_name is not None,
                           self.pc.connectionState, self.created, self.counters())

    def close_soon(self, reason: str, detail: str = "") -> None:
        if self._closing is None and not self.closed:
            self._closing = asyncio.get_running_loop().create_task(self.close(reason, detail))

    async def close(self, reason: str = "deleted", detail: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        self._stop_probe()
        self.fanout.detach(self)
        self.service._forget(self)
        log.log(logging.WARNING if reason in _FAILURE_REASONS else logging.INFO, "webrtc.viewer_closed",
                extra={"fields": {"session": self.id, "stream": self.stream_name, "reason": reason,
                                  "detail": detail, "layer": self.layer_name, **self.counters()}})
        if self._fast is not None:
            self._fast.close()
        try:
            await asyncio.wait_for(self.pc.close(), timeout=5)
        except (asyncio.TimeoutError, Exception):
            log.warning("webrtc.close_timeout", extra={"fields": {"session": self.id}})


class WhepService:
    """All WHEP sessions of this process, and one fan-out per stream."""

    def __init__(self, *, ice_servers: list[dict[str, Any]] | None = None, max_viewers: int = 2000,
                 backlog_limit: int = 512 * 1024, send_failure_timeout: float = 5.0,
                 connect_timeout: float = 15.0, layer_policy: LayerPolicy | None = None,
                 rtx_share: float = 0.25, rtx_playout_allowance: float = 0.5,
                 on_keyframe_request: Callable[[str], int | None] | None = None,
                 on_frame_sent: Callable[[Any, float], None] | None = None) -> None:
        adapter.ensure_h264_profiles()
        self.ice_servers = ice_servers or []
        self.max_viewers = max_viewers
        self.backlog_limit = backlog_limit
        self.send_failure_timeout = send_failure_timeout
        #: A session that has not completed ICE+DTLS this long after its offer
        #: is freed: a client that never connects must not hold sockets.
        self.connect_timeout = connect_timeout
        self.layer_policy = layer_policy or LayerPolicy()
        self.rtx_share = rtx_share
        self.rtx_playout_allowance = rtx_playout_allowance
        self.cname = ("returnfeed-" + secrets.token_hex(4)).encode()
        self.sessions: dict[str, WhepSession] = {}
        self.fanouts: dict[str, StreamFanout] = {}
        self.keyframe_handlers: list[Callable[[str], int | None]] = (
            [on_keyframe_request] if on_keyframe_request is not None else [])
        self._on_frame_sent = on_frame_sent
        self.switches: dict[tuple[str, str, str], int] = {}
        self.drops: dict[str, int] = {}
        #: Totals of closed sessions, so that every ``_total`` stays a counter.
        self.closed_totals = SessionStats()
        self.closed_send_errors: dict[str, int] = {}
        self.closed_by_reason: dict[str, int] = {}
        self._ticker: asyncio.Task | None = None

    def start(self) -> None:
        if self._ticker is None:
            self._ticker = asyncio.get_running_loop().create_task(self._tick_loop(), name="whep-ticker")

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now, wall = time.monotonic(), time.time()
            self.free_unconnected(now)
            for session in list(self.sessions.values()):
                try:
                    session.tick(now, wall)
                except Exception:  # one broken session must not stop the others' reports
                    log.exception("webrtc.tick_failed", extra={"fields": {"session": session.id}})
            for name, fo in list(self.fanouts.items()):
                if fo.closed or (fo.viewer_count == 0 and not any(
                        s.stream_name == name for s in self.sessions.values())):
                    fo.close()
                    self.fanouts.pop(name, None)

    def free_unconnected(self, now: float) -> None:
        """Close sessions that never completed ICE+DTLS within
        ``connect_timeout``, and those whose stream ended before they were
        attached (the fan-out tells only the viewers it feeds)."""
        for session in list(self.sessions.values()):
            if session.closed or session.connected_at is not None and not session.fanout.closed:
                continue
            if session.fanout.closed:
                session.close_soon("stream_ended")
            elif now - session.created_mono > self.connect_timeout:
                session.close_soon("connect_timeout", f"ICE/DTLS not completed in {self.connect_timeout:g} s")

    def fanout(self, stream: Stream) -> StreamFanout:
        fo = self.fanouts.get(stream.name)
        if fo is None or fo.closed or fo.stream is not stream:
            if fo is not None:
                fo.close()
            fo = StreamFanout(stream, on_frame_sent=self._on_frame_sent, request_keyframe=self.on_keyframe_request)
            fo.start()
            self.fanouts[stream.name] = fo
        return fo

    async def create_session(self, stream: Stream, offer_sdp: str, offer: Offer, *, owner: str,
                             pin: str | None, source_plid: str | None, b_frames: bool,
                             sync: bool = True) -> WhepSession:
        if b_frames:
            raise UnsupportedMedia(
                "the source sends B-frames, which WebRTC cannot play passthrough; encode with "
                "B-frames off (x264: -bf 0 or -tune zerolatency)")
        if len(self.sessions) >= self.max_viewers:
            raise OverflowError("viewer limit reached")
        session = WhepSession(self, stream.name, self.fanout(stream), owner=owner, pin=pin, sync=sync)
        self.sessions[session.id] = session
        try:
            session.sdp_answer = await session.answer(offer_sdp, offer, source_plid)
        except BaseException:
            await session.close()
            raise
        return session

    def _forget(self, session: WhepSession) -> None:
        if self.sessions.pop(session.id, None) is None:
            return
        self.closed_totals.add(session.stats)
        for name, n in session.send_errors_by_name().items():
            self.closed_send_errors[name] = self.closed_send_errors.get(name, 0) + n
        reason = session.close_reason or "deleted"
        self.closed_by_reason[reason] = self.closed_by_reason.get(reason, 0) + 1

    def totals(self) -> tuple[SessionStats, dict[str, int]]:
        """Cumulative figures over every session this process has had, and
        send errors by errno: closed sessions plus the live ones."""
        total = SessionStats()
        total.add(self.closed_totals)
        errors = dict(self.closed_send_errors)
        for session in list(self.sessions.values()):
            total.add(session.stats)
            for name, n in session.send_errors_by_name().items():
                errors[name] = errors.get(name, 0) + n
        return total, errors

    def viewers(self, stream: str) -> list[WhepSession]:
        return [s for s in self.sessions.values() if s.stream_name == stream]

    def on_keyframe_request(self, stream: str) -> int:
        """Ask the stream's source for a keyframe; returns how many requests
        were really sent upstream (0 when the source cannot be asked)."""
        return sum(handler(stream) or 0 for handler in self.keyframe_handlers)

    def count_switch(self, stream: str, frm: str, to: str) -> None:
        key = (stream, frm, to)
        self.switches[key] = self.switches.get(key, 0) + 1

    def count_drop(self, stream: str) -> None:
        self.drops[stream] = self.drops.get(stream, 0) + 1

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            try:
                await self._ticker
            except asyncio.CancelledError:
                pass
            self._ticker = None
        await asyncio.gather(*(s.close() for s in list(self.sessions.values())), return_exceptions=True)
        for fo in self.fanouts.values():
            fo.close()
        self.fanouts.clear()
