"""WHEP viewer sessions: aiortc for ICE/DTLS/SRTP, our own forwarding.

:class:`WhepSession` answers one viewer's offer and, once DTLS is up, joins
the stream's :class:`~media.webrtc.fanout.StreamFanout` as a sink. What to
send the viewer and when — the per-packet rewrite, layer choice, probing,
retransmissions, sender reports, statistics and close reasons — is decided
by its sans-I/O core, :class:`~media.webrtc.viewer.ViewerEgress` (see there
for the RTCP rules). The session keeps only what needs I/O:

* aiortc negotiation (ICE, DTLS, SRTP keys) and its RTCP callbacks, until
  the session is attached; from then on the viewer's SRTCP is taken off the
  ICE connection (:func:`~media.webrtc.aiortc_adapter.capture_rtcp`) and
  the core parses and routes it (``on_rtcp_datagram``);
* the send path: SRTP-protect and ``sendto``
  (:class:`~media.webrtc.aiortc_adapter.FastPath`), each batch's outcome
  reported back to the core;
* one timer, armed from ``core.get_timer()``;
* the core's events: log lines, service counters, keyframe requests
  upstream, closing.

The send queue of a viewer is its ICE socket's write buffer: above
``backlog_limit`` bytes the viewer is moved down a layer at once, and on the
lowest layer (or pinned) it is disconnected — it never slows the others.

:class:`WhepService` owns the sessions and one fan-out per stream. Nothing
polls: a session that has not connected within ``connect_timeout`` is freed
by one service timer armed at the oldest such deadline; a fan-out whose
stream ended tells the service (and its viewers) at once; a fan-out is
closed when its last session goes.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.rtcrtpparameters import RTCRtcpFeedback, RTCRtpCodecParameters, RTCRtpSendParameters

from ..log import event
from ..errors import NoCapacity, UnsupportedMedia
from ..layer import AUDIO, Layer
from ..rtp.layers import LayerPolicy
from ..rtp.packet import LayerPacket
from ..rtp.rewrite import Rewriter, TrackParams
from ..rtp.rtcp import ntp_from_unix
from ..stream import Stream
from . import aiortc_adapter as adapter
from . import icetcp
from .fanout import StreamFanout
from .icemux import IceMux
from .sdp import Offer, SdpError, choose_h264, choose_opus
from .viewer import (
    CloseWanted, KeyframeWanted, LayerSwitched, ProbeFailed, ProbeStarted, SendKind, SessionStats,
    ViewerDropped, ViewerEgress, errno_name,
)

__all__ = ["SessionInfo", "SessionStats", "ViewerSnapshot", "WhepService", "WhepSession"]

log = logging.getLogger("returnfeed.webrtc")

#: Close reasons that mean something went wrong (logged as warnings).
_FAILURE_REASONS = frozenset({"send_failed", "transport_closed", "ice_failed", "slow_viewer"})

URI_MID = "urn:ietf:params:rtp-hdrext:sdes:mid"
URI_ABS_SEND_TIME = "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"

#: What the aiortc transport raises when the ICE transport or its socket went
#: away under us (transient send errors never get here: the sender counts
#: and survives them).
_TRANSPORT_GONE = (ConnectionError, OSError, AttributeError)


def forward_frame(core: ViewerEgress, fast: adapter.FastPath, index: int, packets: list[LayerPacket],
                  now: float) -> bool:
    """One viewer's share of a frame of layer ``index`` (or audio): the
    packets the rewriter's in-order path takes are rewritten, protected and
    sent in one C call (``FastPath.rewrite_send``), whatever is left (a gap,
    a switch, a restart; everything without the extension) goes through the
    core's ``on_packets`` and ``FastPath.send_frame``; the core hears what
    was sent. True when the core then has events or a moved timer. A
    transport that went away raises (``_TRANSPORT_GONE``)."""
    sender = fast.sender
    before = sender.backlogged if sender is not None else 0
    rw = core.fast_rewriter(index, packets[0])
    count = nbytes = 0
    if rw is not None:
        count, nbytes = fast.rewrite_send(rw, index, packets, now)
    return _forward_rest(core, fast, index, packets, now, count, nbytes, before)


def finish_frame(core: ViewerEgress, fast: adapter.FastPath, index: int, packets: list[LayerPacket], now: float,
                 outcome: tuple[int, int, int, int, list[bytes] | None, int]) -> bool:
    """:func:`forward_frame` after ``_fastsend.fanout`` took the first
    ``outcome[0]`` packets of this viewer's frame but not everything went
    out (``rewrite_send``'s tuple): the counters and errors, the rest of the
    frame, the core's ``on_sent``."""
    sender = fast.sender
    before = sender.backlogged  # the C call counts nothing on the sender
    nbytes = adapter.native_outcome(sender, outcome, now)
    return _forward_rest(core, fast, index, packets, now, outcome[0], nbytes, before)


def _forward_rest(core: ViewerEgress, fast: adapter.FastPath, index: int, packets: list[LayerPacket], now: float,
                  count: int, nbytes: int, before: int) -> bool:
    if count < len(packets):
        out = core.on_packets(index, packets[count:] if count else packets, now)
        if out:
            nbytes += fast.send_frame(out, now)
            count += len(out)
    if not count:
        return False
    sender = fast.sender
    core.on_sent(SendKind.MEDIA, count, nbytes, sender.backlogged != before, sender.failing_since, now, index)
    return bool(core.events or core.timer_changed)


class FrameLane:
    """What ``_fastsend.fanout`` reads of one viewer to send it a frame with
    no Python code of its own (a :class:`WhepSession`'s ``lane``, which
    :class:`~media.webrtc.fanout.PacketFanout` batches): its FastPath (None
    once closed) and its core. The C call checks per frame what
    ``FastPath.rewrite_send`` and ``ViewerEgress.fast_rewriter`` check, and
    hands anything else back to the session (:meth:`WhepSession.on_lane_result`)."""

    __slots__ = ("fast", "core")

    def __init__(self, fast: adapter.FastPath | None, core: ViewerEgress) -> None:
        self.fast = fast
        self.core = core

    @staticmethod
    def fanout_frame(lanes: list[FrameLane | None], start: int, index: int, packets: list[LayerPacket],
                     now: float) -> list[tuple[int, Any]] | None:
        """One frame of layer ``index`` (or audio) to every lane from
        position ``start`` round: (position, what) for the sessions with
        work left (see ``_fastsend.fanout``); None: every sink its own call."""
        return adapter.fanout_lanes(lanes, start, index, AUDIO, packets, now)


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
    """One WHEP viewer: aiortc, the send path and one timer around its
    :class:`~media.webrtc.viewer.ViewerEgress`."""

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
        self.core = ViewerEgress(
            fanout, self, cname=service.cname, policy=service.layer_policy, rtx_share=service.rtx_share,
            rtx_playout_allowance=service.rtx_playout_allowance,
            send_failure_timeout=service.send_failure_timeout, pin=pin)
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[
            RTCIceServer(**s) for s in service.ice_servers]))
        self._tracks: dict[str, _Track] = {}
        self._fast: adapter.FastPath | None = None
        #: This viewer's place in the fan-out's one C call per frame
        #: (webrtc.c_fanout, with the C path); None: its own on_packets.
        self.lane: FrameLane | None = None
        self._attached = False
        self.closed = False
        self._closing: asyncio.Task | None = None
        self.close_reason: str | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self.answer_note = ""
        self.sdp_answer = ""

    @property
    def stats(self) -> SessionStats:
        return self.core.stats

    @property
    def estimate_bps(self) -> float | None:
        return self.core.estimate_bps

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
                tr = transceivers[section.kind] = self.pc.addTransceiver(section.kind, direction="sendonly")
                adapter.drop_receive_estimator(tr.receiver)  # a viewer sends no media
        self.pc.on("connectionstatechange", self._on_state)
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(offer_sdp, "offer"))
        except Exception as exc:  # aiortc raises assorted errors on SDP it dislikes
            raise SdpError(f"offer rejected by the WebRTC stack: {exc}") from None
        if self.service.ice_mux is not None:
            self.service.ice_mux.attach(self.pc)
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
        icetcp.attach(self.pc, getattr(self.service, "ice_tcp", None))
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
            event(log, logging.INFO, "webrtc.viewer_state", session=self.id, state=state)
            self.close_soon("ice_failed" if state == "failed" else "peer_closed")

    def _on_sender_ready(self, sender: adapter.ForwardingSender, parameters: RTCRtpSendParameters) -> None:
        track = self._tracks[sender.kind]
        codecs = parameters.codecs
        main = codecs[0]
        rtx = next((c for c in codecs if c.mimeType.lower().endswith("/rtx")), None)
        ext = {e.uri: e.id for e in parameters.headerExtensions}
        mid_id = ext.get(URI_MID)
        core = self.core
        track.rewriter = Rewriter(TrackParams(
            ssrc=sender.ssrc, payload_type=main.payloadType, clock_rate=main.clockRate,
            mid=parameters.muxId if mid_id else None, mid_id=mid_id,
            abs_send_time_id=ext.get(URI_ABS_SEND_TIME),
            rtx_ssrc=sender.rtx_ssrc if rtx else None, rtx_payload_type=rtx.payloadType if rtx else None,
        ), initial_layer=AUDIO if sender.kind == "audio" else core.initial_layer(self.fanout.ordered_layers))
        core.set_track(sender.kind, track.rewriter, sender.ssrc)
        if self._fast is None:
            try:
                self._fast = adapter.FastPath(sender.transport, sndbuf=self.service.backlog_limit,
                                              native=self.service.c_fastpath)
            except ConnectionError:
                self.close_soon("transport_closed")
                return
        if all(t.rewriter is not None for t in self._tracks.values()) and not self._attached:
            self._attached = True
            if self.service.c_fanout and self._fast._native is not None:
                self.lane = FrameLane(self._fast, core)
            # From here on the viewer's RTCP skips aiortc (aiortc_adapter.capture_rtcp);
            # what already sits in aioice's queue still comes through _on_rtcp.
            receive_direct = getattr(self.service.ice_mux, "receive_direct", None)
            for transport in {id(t.sender.transport): t.sender.transport for t in self._tracks.values()}.values():
                adapter.capture_rtcp(transport, self._on_rtcp_datagram)
                if receive_direct is not None:
                    # An egress worker: the viewer's datagrams straight to
                    # this process, not through main (media/webrtc/icerelay.py).
                    receive_direct(transport.transport._connection)
            now = time.monotonic()
            self.fanout.attach(self, core.initial_layer(self.fanout.ordered_layers), now)
            core.start(now)
            self._after(now)
            event(log, logging.INFO, "webrtc.viewer_started", session=self.id, stream=self.stream_name,
                  layers=[layer.name for layer in core.layers], layer=self.layer_name)

    # -- fan-out sink ----------------------------------------------------------------

    def on_layers_changed(self, layers: tuple[Layer, ...]) -> None:
        self.core.on_layers(layers, time.monotonic())
        self._after()

    def on_packets(self, index: int, packets: list[LayerPacket], now: float) -> None:
        fast = self._fast
        if fast is None or self.closed:
            return
        try:
            if forward_frame(self.core, fast, index, packets, now):
                self._after(now)
        except _TRANSPORT_GONE:
            self.close_soon("transport_closed")

    def on_lane_result(self, index: int, packets: list[LayerPacket], what: Any, now: float) -> None:
        """The fan-out's C call served this viewer's lane but left work
        (``_fastsend.fanout``): True, the core has events or a moved timer;
        a tuple, the frame did not all go out (finish it as on_packets
        would); an exception, what on_packets would have raised."""
        if what is True:
            self._after(now)
            return
        fast = self._fast
        if fast is None or self.closed:
            return
        try:
            if isinstance(what, BaseException):
                raise what
            if finish_frame(self.core, fast, index, packets, now, what):
                self._after(now)
        except _TRANSPORT_GONE:
            self.close_soon("transport_closed")

    def on_stream_ended(self) -> None:
        self.close_soon("stream_ended")

    # -- RTCP ------------------------------------------------------------------------

    def _on_rtcp(self, kind: str, packet: Any) -> None:
        track = self._tracks.get(kind)
        fast = self._fast
        if track is None or track.rewriter is None or fast is None:
            return
        now = time.monotonic()
        self._retransmit(fast, self.core.on_rtcp(kind, packet, now, ntp_from_unix(time.time())), now)

    def _on_rtcp_datagram(self, data: bytes) -> None:
        """A compound RTCP datagram, unprotected, straight off the ICE
        connection: the core parses it and finds the tracks by SSRC."""
        fast = self._fast
        if fast is None or self.closed:
            return
        now = time.monotonic()
        self._retransmit(fast, self.core.on_rtcp_datagram(data, now, ntp_from_unix(time.time())), now)

    def _retransmit(self, fast: adapter.FastPath, out: list[bytes], now: float) -> None:
        """Send what the core answered to a viewer's RTCP (retransmissions),
        report the outcome to it, and act on its events."""
        if out:
            try:
                nbytes = fast.send_batch(out, now)
            except _TRANSPORT_GONE:
                self.close_soon("transport_closed")
                self._after(now)
                return
            sender = fast.sender
            self.core.on_sent(SendKind.RETRANSMIT, len(out), nbytes, False,
                              sender.failing_since if sender is not None else None, now)
        self._after(now)

    # -- the one timer -----------------------------------------------------------------

    def _after(self, now: float | None = None) -> None:
        """Act on the core's events, then re-arm the timer if it moved."""
        core = self.core
        if core.events:
            events, core.events = core.events, []
            for ev in events:
                self._on_event(ev)
        if not core.timer_changed:
            return
        core.timer_changed = False
        at = None if self.closed else core.get_timer()
        if at == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = at
        if at is not None:
            # The core's times are time.monotonic(); so is the loop's clock.
            delay = at - (now if now is not None else time.monotonic())
            self._timer = asyncio.get_running_loop().call_later(max(0.0, delay), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        if self.closed or self._fast is None:
            return
        now = time.monotonic()
        try:
            self._timer_due(self._fast, now)
        except Exception:
            # A broken viewer must neither lose its reports and limits for
            # good nor spin: try again a second later, as a ticker would.
            event(log, logging.ERROR, "webrtc.timer_failed", exc_info=True, session=self.id)
            self._timer_at = now + 1.0
            self._timer = asyncio.get_running_loop().call_later(1.0, self._on_timer)
            return
        self.core.timer_changed = True  # this timer is spent
        self._after(now)

    def _timer_due(self, fast: adapter.FastPath, now: float) -> None:
        core = self.core
        rtp, rtcp = core.handle_timer(now, time.time())
        sender = fast.sender
        before = sender.backlogged if sender is not None else 0
        try:
            nbytes = fast.send_batch(rtp, now) if rtp else 0
            for packet in rtcp:
                fast.send_rtcp(packet, now)
        except _TRANSPORT_GONE:
            self.close_soon("transport_closed")
            return
        sender = fast.sender
        failing = sender.failing_since if sender is not None else None
        if rtp:
            core.on_sent(SendKind.PROBE, len(rtp), nbytes, fast.backlogged != before, failing, now)
        if rtcp:
            core.on_sent(SendKind.REPORT, len(rtcp), 0, False, failing, now)

    def _on_event(self, event: Any) -> None:
        fields: dict[str, Any] = {"session": self.id, "stream": self.stream_name}
        match event:
            case LayerSwitched(frm=frm, to=to, decision=d):
                self.service.count_switch(self.stream_name, frm, to)
                event(log, logging.INFO, "webrtc.layer_switch", **fields, **{"from": frm}, to=to,
                      reasons=[r.value for r in d.reasons], loss=d.loss, rtt=d.rtt, bandwidth=d.bandwidth)
            case ViewerDropped(decision=d):
                event(log, logging.INFO, "webrtc.viewer_dropped", **fields, reasons=[r.value for r in d.reasons])
                self.service.count_drop(self.stream_name)
            case KeyframeWanted():
                self.service.on_keyframe_request(self.stream_name)
            case ProbeStarted(to=to, decision=d, base_bps=base, target_bps=target):
                event(log, logging.INFO, "webrtc.probe_started", **fields, to=to,
                      reasons=[r.value for r in d.reasons], loss=d.loss, rtt=d.rtt, bandwidth=d.bandwidth,
                      base_bps=round(base), target_bps=round(target))
            case ProbeFailed(to=to, decision=d, probe_bytes=sent):
                event(log, logging.INFO, "webrtc.probe_failed", **fields, to=to, reasons=[r.value for r in d.reasons],
                      loss=d.loss, rtt=d.rtt, bandwidth=d.bandwidth, probe_bytes=sent)
            case CloseWanted(reason="send_failed", detail=detail):
                sender = self._fast.sender if self._fast is not None else None
                name = errno_name(sender.last_errno if sender is not None else None)
                self.close_soon("send_failed", detail=f"{detail} (last error {name})")
            case CloseWanted(reason=reason, detail=detail):
                self.close_soon(reason, detail)

    # -- control -----------------------------------------------------------------------

    async def pin(self, layer: str | None) -> None:
        """Pin to a layer name, or ``None`` for automatic selection. A
        coroutine, as the pin of a viewer in an egress worker is (a call to
        it; server/egress_host.py), so the route awaits either alike."""
        now = time.monotonic()
        self.core.pin(layer, now)
        self._after(now)

    @property
    def layer_name(self) -> str | None:
        return self.core.layer_name

    def counters(self) -> dict[str, int | float | None]:
        """Cumulative figures of this viewer (send errors from its sender)."""
        sender = self._fast.sender if self._fast is not None else None
        return self.core.counters(sender.errors if sender is not None else 0)

    def send_errors_by_name(self) -> dict[str, int]:
        """Failed sends of this viewer by errno name (``EPERM``, …)."""
        sender = self._fast.sender if self._fast is not None else None
        if sender is None:
            return {}
        return {errno.errorcode.get(code, str(code)): n for code, n in sender.errors_by_errno.items()}

    def struggling(self) -> bool:
        """Frozen (a PLI/FIR not yet answered by a keyframe), every send
        failing, or losing more than the down-switch threshold."""
        sender = self._fast.sender if self._fast is not None else None
        return self.core.struggling(sender is not None and sender.failing_since is not None)

    def snapshot(self, now: float) -> "ViewerSnapshot":
        """What a director sees of this viewer now."""
        core = self.core
        loss, rtt = core.loss, core.rtt
        return ViewerSnapshot(
            id=self.id, stream=self.stream_name, layer=self.layer_name, pinned=core.pinned,
            state=self.pc.connectionState, since_s=round(time.time() - self.created, 1),
            loss=None if loss is None else round(loss, 4),
            rtt_ms=None if rtt is None else round(rtt * 1000.0, 1),
            estimate_bps=round(core.estimate_bps) if core.estimate_bps is not None else None,
            frozen=core.frozen, struggling=self.struggling(), errors_by_errno=self.send_errors_by_name(),
            counters={**self.counters(), "frozen_s": round(core.frozen_s(now), 3)})

    def info(self) -> SessionInfo:
        return SessionInfo(self.id, self.stream_name, self.layer_name, self.core.pinned,
                           self.pc.connectionState, self.created, self.counters())

    def close_soon(self, reason: str, detail: str = "") -> None:
        if self._closing is None and not self.closed:
            self._closing = asyncio.get_running_loop().create_task(self.close(reason, detail))

    async def close(self, reason: str = "deleted", detail: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        if self.lane is not None:
            self.lane.fast = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.fanout.detach(self)
        self.service.session_ended(self)
        event(log, logging.WARNING if reason in _FAILURE_REASONS else logging.INFO, "webrtc.viewer_closed",
              session=self.id, stream=self.stream_name, reason=reason, detail=detail, layer=self.layer_name,
              **self.counters())
        if self._fast is not None:
            self._fast.close()
        try:
            await asyncio.wait_for(self.pc.close(), timeout=5)
        except (asyncio.TimeoutError, Exception):
            event(log, logging.WARNING, "webrtc.close_timeout", session=self.id)


class WhepService:
    """All WHEP sessions of this process, and one fan-out per stream."""

    def __init__(self, *, ice_servers: list[dict[str, Any]] | None = None, max_viewers: int = 2000,
                 backlog_limit: int = 512 * 1024, send_failure_timeout: float = 5.0,
                 connect_timeout: float = 15.0, layer_policy: LayerPolicy | None = None,
                 rtx_share: float = 0.25, rtx_playout_allowance: float = 0.5, c_fastpath: bool = True,
                 c_fanout: bool = True,
                 on_keyframe_request: Callable[[str], int | None] | None = None,
                 on_frame_sent: Callable[[Any, float], None] | None = None,
                 first_byte: Callable[[Any], float | None] | None = None) -> None:
        adapter.ensure_h264_profiles()
        self.ice_servers = ice_servers or []
        #: The ICE-TCP listener whose passive candidates every answer offers
        #: (media/webrtc/icetcp.py); None: UDP only.
        self.ice_tcp: icetcp.IceTcpListener | None = None
        #: The shared ICE UDP socket (set and started by the owner); None:
        #: aioice's own socket per session.
        self.ice_mux: IceMux | None = None
        self.max_viewers = max_viewers
        self.backlog_limit = backlog_limit
        self.send_failure_timeout = send_failure_timeout
        #: Viewers' frames through the C extension where it is built
        #: (FastPath's ``native``); False: the pure-Python path.
        self.c_fastpath = c_fastpath
        #: With the C path, one C call per frame for every viewer on it
        #: (a session's ``lane``; _fastsend.fanout); False: one per viewer.
        self.c_fanout = c_fanout
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
        #: When a frame's first byte came in (StreamFanout stamps it on its PacketsEvent).
        self._first_byte = first_byte
        self.switches: dict[tuple[str, str, str], int] = {}
        self.drops: dict[str, int] = {}
        #: Totals of closed sessions, so that every ``_total`` stays a counter.
        self.closed_totals = SessionStats()
        self.closed_send_errors: dict[str, int] = {}
        self.closed_by_reason: dict[str, int] = {}
        #: Sessions in creation order, so their connect deadlines are in
        #: order too: one timer, armed at the oldest that may still be due.
        self._connecting: deque[WhepSession] = deque()
        self._connect_timer: asyncio.TimerHandle | None = None
        self._started = False

    def start(self) -> None:
        """Enforce ``connect_timeout`` from now on (on the running loop)."""
        self._started = True
        self._arm_connect_timer()

    def _arm_connect_timer(self) -> None:
        if not self._started or self._connect_timer is not None:
            return
        queue = self._connecting
        while queue and (queue[0].closed or queue[0].connected_at is not None):
            queue.popleft()  # connected or gone: its deadline no longer matters
        if queue:
            delay = queue[0].created_mono + self.connect_timeout - time.monotonic()
            self._connect_timer = asyncio.get_running_loop().call_later(max(0.0, delay), self._on_connect_timer)

    def _on_connect_timer(self) -> None:
        self._connect_timer = None
        now = time.monotonic()
        self.free_unconnected(now)
        queue = self._connecting
        # Past their deadline (free_unconnected's own comparison): freed just
        # now, or connected. One exactly at it waits for the next turn.
        while queue and now - queue[0].created_mono > self.connect_timeout:
            queue.popleft()
        self._arm_connect_timer()

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
            fo = StreamFanout(stream, on_frame_sent=self._on_frame_sent, request_keyframe=self.on_keyframe_request,
                              on_closed=self._on_fanout_closed, first_byte=self._first_byte)
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
            raise NoCapacity("viewer limit reached")
        session = WhepSession(self, stream.name, self.fanout(stream), owner=owner, pin=pin, sync=sync)
        self._admit(session)
        try:
            session.sdp_answer = await session.answer(offer_sdp, offer, source_plid)
        except BaseException:
            await session.close()
            raise
        return session

    def _admit(self, session: WhepSession) -> None:
        """A new session: counted, and freed if it does not connect in time."""
        self.sessions[session.id] = session
        self._connecting.append(session)
        self._arm_connect_timer()

    def _on_fanout_closed(self, fanout: StreamFanout) -> None:
        """A fan-out ended (its stream did): forget it, and free the
        sessions it never fed (it told the ones it did)."""
        if self.fanouts.get(fanout.stream.name) is fanout:
            del self.fanouts[fanout.stream.name]
        self.free_unconnected(time.monotonic())

    def session_ended(self, session: WhepSession) -> None:
        """A session closed (called once by the session itself): it leaves
        the registry, its stream's fan-out closes with its last viewer, and
        its counters join the service's totals."""
        if self.sessions.pop(session.id, None) is None:
            return
        name = session.stream_name
        fo = self.fanouts.get(name)
        if fo is not None and fo.viewer_count == 0 and not any(
                s.stream_name == name for s in self.sessions.values()):
            fo.close()  # the last viewer of the stream left (on_closed forgets it)
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

    async def snapshots(self, stream: str) -> list[ViewerSnapshot]:
        """Every viewer of ``stream`` as a director sees it (a coroutine, as
        the egress host's, which asks its workers)."""
        now = time.monotonic()
        return [s.snapshot(now) for s in self.viewers(stream)]

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
        self._started = False
        if self._connect_timer is not None:
            self._connect_timer.cancel()
            self._connect_timer = None
        self._connecting.clear()
        await asyncio.gather(*(s.close() for s in list(self.sessions.values())), return_exceptions=True)
        for fo in list(self.fanouts.values()):
            fo.close()
        self.fanouts.clear()
