"""WHIP sessions and the service that owns them (asyncio).

:class:`WhipSession` / :class:`WhipService`. A session answers
the offer with transceivers whose receivers never start aiortc's decoder
(:class:`~media.webrtc.aiortc_adapter.CapturingReceiver`) and takes the
decrypted RTP/RTCP from the DTLS transport before aiortc's router sees it
(:func:`~media.webrtc.aiortc_adapter.capture_rtp`): nothing is decoded.
Once ICE/DTLS are up it attaches one whole-stream publisher to the hub's
stream (``SourceInfo("whip")``) and publishes each access unit with its
layer. ICE/DTLS failure, ``connect_timeout`` without connecting,
``media_timeout`` without RTP, or :meth:`WhipSession.close` (HTTP DELETE)
detach the publisher: the stream enters its reconnect grace period and its
viewers stay. The service owns the sessions, one 20 ms ticker for every
session's timers, and :meth:`WhipService.request_keyframe` for viewers'
PLI/FIR.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.rtcrtpparameters import RTCRtcpFeedback, RTCRtpCodecParameters

from ...errors import NoCapacity
from ...log import event
from ...stream import Publisher, SourceInfo, StreamBusy, StreamClosed, StreamHub
from .. import aiortc_adapter as adapter
from .. import icetcp
from ..icemux import IceMux
from ..sdp import Offer, SdpError
from .plan import WhipPlan, patch_answer, plan_offer
from .rtp_ingest import IngestConfig, IngestStats, RtpIngest, RtpUnit

log = logging.getLogger("returnfeed.webrtc")

__all__ = ["SessionInfo", "WhipSession", "WhipService"]


@dataclass(slots=True)
class SessionInfo:
    id: str
    stream: str
    state: str
    attached: bool
    created: float
    remote: str
    stats: dict[str, int] = field(default_factory=dict)
    layers: list[dict[str, Any]] = field(default_factory=list)


class WhipSession:
    """One WHIP publisher."""

    def __init__(self, service: "WhipService", stream_name: str, *, owner: str, remote: str = "",
                 label: str = "") -> None:
        self.id = secrets.token_urlsafe(12)
        self.etag = '"' + secrets.token_hex(8) + '"'
        self.service = service
        self.stream_name = stream_name
        self.owner = owner
        self.remote = remote
        self.label = label
        self.created = time.monotonic()
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[RTCIceServer(**s) for s in service.ice_servers]))
        self.plan: WhipPlan | None = None
        self.ingest: RtpIngest | None = None
        self.publisher: Publisher | None = None
        self.sdp_answer = ""
        self.closed = False
        self.close_reason = ""
        self.connected_at: float | None = None
        self.last_rtp: float | None = None
        self._dtls: Any = None
        self.dtls_role = ""
        self._closing: asyncio.Task | None = None
        # One timer: connect/media timeouts and the ingest's deadlines.
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    # -- negotiation -------------------------------------------------------------

    async def answer(self, offer_sdp: str, offer: Offer) -> str:
        """Return the SDP answer; raises SdpError for what cannot be ingested."""
        plan = plan_offer(offer_sdp, offer)
        self.plan = plan
        transceivers = {}
        for section in offer.media:
            if section.kind in ("audio", "video"):
                tr = self.pc.addTransceiver(section.kind, direction="recvonly")
                adapter.install_receiver(tr, adapter.CapturingReceiver(section.kind, tr.receiver.transport))
                transceivers[section.kind] = tr
        self.pc.on("connectionstatechange", self._on_state)
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(offer_sdp, "offer"))
        except Exception as exc:  # aiortc raises assorted errors on SDP it dislikes
            raise SdpError(f"offer rejected by the WebRTC stack: {exc}") from None
        if self.service.ice_mux is not None:
            self.service.ice_mux.attach(self.pc)
        self.dtls_role = adapter.choose_dtls_role(self.pc)
        for kind, tr in transceivers.items():
            if kind == "video" and plan.video is not None:
                c = plan.video.codec
                fb = [RTCRtcpFeedback(type="nack")] if plan.nack else []
                fb += [RTCRtcpFeedback(type="nack", parameter="pli")] if plan.pli else []
                fb += [RTCRtcpFeedback(type="goog-remb")] if plan.remb else []
                codecs = [RTCRtpCodecParameters(
                    mimeType="video/H264", clockRate=90000, payloadType=c.payload_type, rtcpFeedback=fb,
                    parameters={"level-asymmetry-allowed": "1", "packetization-mode": "1",
                                "profile-level-id": plan.video.answer_profile_level_id})]
                if plan.video.rtx is not None:
                    codecs.append(RTCRtpCodecParameters(mimeType="video/rtx", clockRate=90000,
                                                        payloadType=plan.video.rtx.payload_type,
                                                        parameters={"apt": c.payload_type}))
                adapter.set_negotiated_codecs(tr, codecs)
            elif kind == "audio" and plan.audio is not None:
                params = {k: v for k, v in plan.audio.fmtp.items() if k in ("minptime", "useinbandfec", "stereo")}
                adapter.set_negotiated_codecs(tr, [RTCRtpCodecParameters(
                    mimeType="audio/opus", clockRate=48000, channels=2, payloadType=plan.audio.payload_type,
                    parameters=params)])
        main = transceivers.get("video") or transceivers["audio"]
        self.ingest = RtpIngest(IngestConfig.from_plan(plan, adapter.sender_ssrc(main), **self.service.tuning))
        self._dtls = main.receiver.transport
        for dtls in {id(tr.receiver.transport): tr.receiver.transport for tr in transceivers.values()}.values():
            adapter.capture_rtp(dtls, self._on_rtp, self._on_rtcp)
        icetcp.attach(self.pc, getattr(self.service, "ice_tcp", None))
        answer = await self.pc.createAnswer()
        await self.pc.setLocalDescription(answer)
        return patch_answer(self.pc.localDescription.sdp, plan)

    async def add_remote_candidates(self, frag: str) -> None:
        """Trickle ICE (RFC 8840 sdpfrag) from a PATCH."""
        await adapter.add_trickle_candidates(self.pc, frag)

    # -- connection ------------------------------------------------------------------

    def _on_state(self) -> None:
        state = self.pc.connectionState
        if state == "connected" and self.connected_at is None:
            self.connected_at = time.monotonic()
            self._attach()
            self._rearm()
        elif state in ("failed", "closed") and not self.closed:
            self.close_soon(f"ice/dtls {state}")

    def _attach(self) -> None:
        if self.publisher is not None or self.closed or self._closing is not None:
            return
        remote = adapter.nominated_remote(self._dtls) or self.remote
        if remote:
            self.remote = remote
        try:
            self.publisher = self.service.attach(self)
        except (StreamBusy, StreamClosed) as exc:
            self.close_soon(f"refused: {exc}")
            return
        event(log, logging.INFO, "whip.publishing", session=self.id, stream=self.stream_name, remote=self.remote,
              who=self.label, rids=list(self.plan.rids) if self.plan else [], dtls_role=self.dtls_role,
              connect_ms=round(((self.connected_at or self.created) - self.created) * 1000.0, 1))

    def _on_rtp(self, data: bytes) -> None:
        if self.closed or self.ingest is None:
            return
        now = time.monotonic()
        self.last_rtp = now
        if self.publisher is None:
            self._attach()
            if self.publisher is None:
                return
        units = self.ingest.on_rtp(data, now)
        if units:
            self._publish(units)
        if self.ingest.pending_rtcp:
            self._send_rtcp()
        self._rearm()

    def _on_rtcp(self, data: bytes) -> None:
        if self.ingest is not None and not self.closed:
            self.ingest.on_rtcp(data, time.monotonic())

    def _publish(self, units: list[RtpUnit]) -> None:
        pub = self.publisher
        if pub is None:
            return
        if not pub.active:
            self.close_soon("taken over by another publisher")
            return
        try:
            for u in units:
                pub.publish(u, layer=u.layer)
        except StreamClosed:
            self.close_soon("stream closed")

    def _send_rtcp(self) -> None:
        if self.ingest is None:
            return
        for packet in self.ingest.take_rtcp():
            try:
                adapter.send_rtcp(self._dtls, packet)
            except (ConnectionError, OSError):
                return

    # -- the one timer -------------------------------------------------------------------

    def _deadline(self) -> float:
        """The earliest of: the connect timeout (until connected), the media
        timeout, the ingest's own timer."""
        svc = self.service
        if self.connected_at is None:
            return self.created + svc.connect_timeout
        last = self.last_rtp if self.last_rtp is not None else self.connected_at
        at = last + svc.media_timeout
        if self.ingest is not None:
            t = self.ingest.get_timer()
            if t is not None and t < at:
                at = t
        return at

    def _rearm(self, floor: float = 0.0) -> None:
        """Arm the session's one timer at :meth:`_deadline`, unless it is
        already armed no later (a deadline that moved later is found when
        the timer fires, which re-arms: no cancel per packet)."""
        if self.closed:
            return
        at = max(self._deadline(), floor)
        if self._timer is not None:
            if self._timer_at <= at:
                return
            self._timer.cancel()
        self._timer_at = at
        self._timer = asyncio.get_running_loop().call_later(max(0.0, at - time.monotonic()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = time.monotonic()
        try:
            self.tick(now)
        except Exception:  # a broken session must not lose its timer
            event(log, logging.ERROR, "whip.tick_failed", exc_info=True, session=self.id)
        # At least 1 ms on: a deadline that the tick did not move cannot spin.
        self._rearm(floor=now + 0.001)

    def tick(self, now: float) -> None:
        if self.closed:
            return
        svc = self.service
        if self.connected_at is None:
            if now - self.created > svc.connect_timeout:
                self.close_soon("ICE/DTLS did not connect in time")
            return
        last = self.last_rtp if self.last_rtp is not None else self.connected_at
        if now - last > svc.media_timeout:
            self.close_soon(f"no media for {svc.media_timeout:g} s")
            return
        if self.ingest is None:
            return
        units = self.ingest.tick(now)
        if units:
            self._publish(units)
        self._send_rtcp()

    def request_keyframe(self) -> int:
        """PLIs sent (0 when the offer did not accept ``nack pli``, or rate-limited)."""
        if self.ingest is not None and self.publisher is not None and not self.closed:
            sent = self.ingest.request_keyframe(time.monotonic())
            if sent:
                self._send_rtcp()
            return sent
        return 0

    # -- lifecycle ------------------------------------------------------------------------

    def close_soon(self, reason: str = "") -> None:
        if self._closing is None and not self.closed:
            self._closing = asyncio.get_running_loop().create_task(self.close(reason))

    async def close(self, reason: str = "deleted") -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pub, self.publisher = self.publisher, None
        if pub is not None:
            pub.stream.detach_publisher(pub, time.monotonic())
        self.service.session_ended(self)
        event(log, logging.INFO, "whip.closed", session=self.id, stream=self.stream_name, reason=reason,
              stats=self.ingest.stats.as_dict() if self.ingest else {})
        try:
            await asyncio.wait_for(self.pc.close(), timeout=5)
        except (asyncio.TimeoutError, Exception):
            event(log, logging.WARNING, "whip.close_timeout", session=self.id)

    @property
    def attached(self) -> bool:
        return self.publisher is not None and self.publisher.active

    def info(self) -> SessionInfo:
        return SessionInfo(self.id, self.stream_name, self.pc.connectionState, self.attached, self.created,
                           self.remote, self.ingest.stats.as_dict() if self.ingest else {},
                           self.ingest.layers() if self.ingest else [])


class WhipService:
    """All WHIP sessions of this process."""

    def __init__(self, hub: StreamHub, *, ice_servers: list[dict[str, Any]] | None = None, takeover: bool = False,
                 max_sessions: int = 64, connect_timeout: float = 15.0, media_timeout: float = 8.0,
                 **tuning: Any) -> None:
        adapter.ensure_h264_profiles()
        self.hub = hub
        self.ice_servers = ice_servers or []
        #: The ICE-TCP listener (media/webrtc/icetcp.py); None: UDP only.
        self.ice_tcp: icetcp.IceTcpListener | None = None
        #: The shared ICE UDP socket (set and started by the owner); None:
        #: aioice's own socket per session.
        self.ice_mux: IceMux | None = None
        self.takeover = takeover
        self.max_sessions = max_sessions
        self.connect_timeout = connect_timeout
        self.media_timeout = media_timeout
        self.tuning = tuning
        IngestConfig(sender_ssrc=0, **tuning)  # reject unknown tuning keys now, not per session
        self.sessions: dict[str, WhipSession] = {}
        self.totals = IngestStats()
        self.sessions_total = 0

    def start(self) -> None:
        """Nothing to start: each session arms its own timer (kept for the
        services' common start/close shape)."""

    def for_stream(self, name: str) -> list[WhipSession]:
        return [s for s in self.sessions.values() if s.stream_name == name and not s.closed]

    def check_free(self, name: str) -> None:
        """Raise StreamBusy when ``name`` is published (and takeover is off)."""
        if self.takeover:
            return
        stream = self.hub.get(name)
        if stream is not None and any(p.active for p in stream.publishers):
            held = ", ".join(sorted({p.info.protocol for p in stream.publishers}))
            raise StreamBusy(f"stream {name!r} is already being published ({held})")
        if self.for_stream(name):
            raise StreamBusy(f"stream {name!r} is already being published (WHIP)")

    async def create_session(self, name: str, offer_sdp: str, offer: Offer, *, owner: str, remote: str = "",
                             label: str = "") -> WhipSession:
        """Raises StreamBusy (409), SdpError/UnsupportedMedia (422), NoCapacity (503).

        A session of ``name`` that has not connected yet does not hold the
        stream: a publisher with valid rights replaces it (one that never
        connects would otherwise lock the stream for ``connect_timeout``)."""
        stale = [s for s in self.for_stream(name) if s.connected_at is None]
        for s in stale:
            await s.close("replaced before it connected")
        self.check_free(name)
        if len(self.sessions) >= self.max_sessions:
            raise NoCapacity("WHIP session limit reached")
        session = WhipSession(self, name, owner=owner, remote=remote, label=label)
        self.sessions[session.id] = session  # before any await: a concurrent POST sees it
        self.sessions_total += 1
        session._rearm()  # the connect timeout
        try:
            session.sdp_answer = await session.answer(offer_sdp, offer)
        except BaseException:
            await session.close("offer refused")
            raise
        return session

    def attach(self, session: WhipSession) -> Publisher:
        """Attach ``session`` as the stream's publisher (called once connected)."""
        stream = self.hub.get_or_create(session.stream_name)
        pub = stream.attach_publisher(SourceInfo("whip", remote=session.remote, description=session.label),
                                      layer=None, takeover=self.takeover, now=time.monotonic())
        if session.ingest is not None:
            pub.set_source_counters(session.ingest.source_counters)
        for other in self.for_stream(session.stream_name):
            if other is not session:
                other.close_soon("taken over by another publisher")
        return pub

    def session_ended(self, session: WhipSession) -> None:
        """A session closed (called once by the session itself): it leaves
        the registry and its counters join the service's totals."""
        if self.sessions.pop(session.id, None) is not None and session.ingest is not None:
            t = self.totals
            for k, v in session.ingest.stats.as_dict().items():
                setattr(t, k, getattr(t, k) + v)

    def publishing(self, name: str) -> WhipSession | None:
        """The session whose publisher is attached to stream ``name``."""
        return next((s for s in self.for_stream(name) if s.attached), None)

    def request_keyframe(self, name: str) -> int:
        """A viewer of ``name`` sent PLI/FIR or joined: ask the publisher
        (rate-limited per layer); returns the PLIs really sent."""
        return sum(s.request_keyframe() for s in self.for_stream(name))

    def counters(self) -> IngestStats:
        """Totals over closed and live sessions (monotonic)."""
        out = IngestStats(**self.totals.as_dict())
        for s in list(self.sessions.values()):
            if s.ingest is not None:
                for k, v in s.ingest.stats.as_dict().items():
                    setattr(out, k, getattr(out, k) + v)
        return out

    async def close(self) -> None:
        await asyncio.gather(*(s.close("server shutdown") for s in list(self.sessions.values())),
                             return_exceptions=True)
