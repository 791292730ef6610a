"""Wiring of the media path: SRT listener → demux → Stream hub → WHEP / SRT read.

:class:`MediaService` is created by the server process and owns, in start
order: the stream catalog (an in-memory copy of the ``streams`` table the
SRT listen callback reads on libsrt's thread), the
:class:`~media.stream.StreamHub`, the :class:`~media.webrtc.whep.WhepService`
and the :class:`~media.srt.listener.SrtListener`. Shutdown runs in reverse.

SRT authorisation (the listen callback; DESIGN.md "Interfaces"):

* ``publish:{stream}`` / ``#!::r={stream},m=publish``: the stream must exist;
  the stream's passphrase is required (libsrt rejects a wrong one with
  1010); an ``s=`` token, when given, must be a valid publish link for that
  stream. A second publisher of a live stream (same layer) is refused with
  1409 unless ``srt.takeover`` is set.
* ``read:{stream}`` / ``m=request``: the stream must be live (else 1503).
  With a valid read link in ``s=`` the reader is accepted without
  encryption (the link is the credential); without one the stream's
  passphrase is required, as for publishing.
* unknown stream 1404, bad or expired token 1401, token for another stream or
  action 1403, unparsable stream ID 1400 (with the parser's reason).

The media path itself lives in media/: an SRT publisher's connection drives
:class:`~media.srt.ingest.SrtIngestSession` (the sans-I/O core is
:class:`~media.ingest.ts.TsIngest`), a reader's
:class:`~media.srt.read.SrtReadSession`. This module authorises, wires
connections to them and keeps the books (sessions, grants, metrics). AAC
audio is transcoded once per stream to Opus (PyAV, executor thread) and
published as the stream's audio track; Opus passes through.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import OrderedDict
from datetime import datetime, timezone
from dataclasses import dataclass
from typing import Any, Iterable

from prometheus_client import Histogram
from prometheus_client.core import Metric

from media.errors import SrtApiError, SrtUnavailable
from media.ingest.ts import IngestCounters
from media.mpegts.events import AccessUnit, TsCounters
from media.srt.ingest import SrtIngestSession
from media.srt.listener import Decision, RateLimit, SrtConnection, SrtListener, reject_unparsable
from media.srt.read import SrtReadSession
from media.srt.streamid import StreamIdRequest
from media.stream import SourceInfo, Stream, StreamBusy, StreamClosed, StreamHub, StreamState
from media.transcode import TranscodeWorker
from media.webrtc.icemux import IceMux
from media.webrtc.whep import WhepService
from media.webrtc.icetcp import IceTcpListener
from media.webrtc.whip import WhipService
from media.webrtc.egress_worker import FIRST_BYTE_BUCKETS, FORWARDING_BUCKETS, WorkerConfig

from .auth import TokenError, TokenService
from .config import Settings
from .egress_host import EgressHost
from .grants import Grant
from .log import event
from .media_metrics import collect
from .redact import redact_text
from .tasks import cancel_and_wait

log = logging.getLogger("returnfeed.media")

# SRT_REJX_* (libsrt access_control.h): 1000 + HTTP status.
REJ_BAD_REQUEST, REJ_UNAUTHORIZED, REJ_FORBIDDEN, REJ_NOT_FOUND = 1400, 1401, 1403, 1404
REJ_CONFLICT, REJ_UNAVAILABLE = 1409, 1503

#: Video frames whose first-byte arrival is kept until the fan-out reports
#: them sent (a frame nobody watches is forgotten after this many others).
FIRST_BYTE_FRAMES = 256


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    id: int
    name: str
    production_id: int
    passphrase: str
    pbkeylen: int
    latency_ms: int | None = None  # None: the listener's srt.latency_ms


class StreamCatalog:
    """Stream name → credentials, read from any thread, replaced atomically."""

    def __init__(self) -> None:
        self._entries: dict[str, CatalogEntry] = {}
        self._revoked: frozenset[str] = frozenset()

    def replace(self, entries: Iterable[CatalogEntry], revoked: Iterable[str]) -> None:
        self._entries = {e.name: e for e in entries}  # one reference swap: safe for readers
        self._revoked = frozenset(revoked)

    def get(self, name: str) -> CatalogEntry | None:
        return self._entries.get(name)

    def revoked(self, jti: str) -> bool:
        return jti in self._revoked

    def __len__(self) -> int:
        return len(self._entries)


class SrtIngest:
    """One SRT publisher: the stream's publisher attached, the connection
    wired to the media path (media/srt/ingest.py), the service's books kept."""

    def __init__(self, service: "MediaService", conn: SrtConnection, stream: Stream, layer: str | None) -> None:
        self.service = service
        self.conn = conn
        self.stream = stream
        now = time.monotonic()
        self.publisher = stream.attach_publisher(
            SourceInfo("srt", remote=f"{conn.peer[0]}:{conn.peer[1]}" if isinstance(conn.peer, tuple) else str(conn.peer),
                       description=redact_text(conn.raw_streamid)),
            layer=layer, takeover=service.settings.srt.takeover, now=now)
        self.session = SrtIngestSession(conn, self.publisher, service.ingest, executor=service.executor,
                                        on_video=self._on_video, on_closed=self.on_close)

    def _on_video(self, unit: AccessUnit) -> None:
        if unit.first_arrival is not None:
            self.service.note_first_byte(unit.data, unit.first_arrival)

    @property
    def transcoder(self) -> TranscodeWorker | None:
        return self.session.transcoder

    def on_close(self, reason: str) -> None:
        self.stream.detach_publisher(self.publisher, time.monotonic())
        if self.session.transcoder is not None:
            self.service.spawn(self.session.transcoder.stop())
        self.service.ingests.pop(self.conn.socket_id, None)
        event(log, logging.INFO, "srt.ingest_closed", stream=self.stream.name, reason=reason,
              bytes=self.conn.bytes_received)

    @property
    def ts_counters(self) -> TsCounters:
        return self.session.ts_counters


class MediaService:
    def __init__(self, settings: Settings, db: Any, tokens: TokenService, directory: Any = None) -> None:
        self.settings = settings
        self.db = db
        self.tokens = tokens
        #: The server's in-memory directory: when given, the SRT
        #: catalog follows it (NOTIFY, reconnects) instead of polling the
        #: database.
        self.directory = directory
        self.catalog = StreamCatalog()
        self.hub = StreamHub(grace=settings.srt.reconnect_grace_s)
        # media.stream.Frame carries only the completion time, and hands
        # the access unit's bytes through unchanged: the bytes object is the
        # key (kept alive here, so its id cannot be reused meanwhile).
        self._first_bytes: OrderedDict[int, tuple[bytes, float]] = OrderedDict()
        # Forwarding latency: frame complete at ingest to its last packet sent
        # to every viewer; and the same end point timed from the frame's
        # first byte, which includes how long the frame took to arrive and
        # any wait in the demuxer for its end (a frame released only when the
        # next one starts shows a whole frame interval there, not here).
        forwarding = ("returnfeed_forwarding_latency_seconds",
                      "Frame complete at ingest (last byte in) to its last RTP packet sent to every viewer")
        first_byte = ("returnfeed_forwarding_latency_from_first_byte_seconds",
                      "SRT ingest: a video frame's first byte in to its last RTP packet sent to every viewer")
        #: With ``webrtc.egress_workers`` (issue 15) the WHEP viewers live in
        #: worker processes and ``self.whep`` is their host: the same surface
        #: for the routes and metrics (server/egress_host.py); the latency
        #: histograms are the workers' counts, summed.
        self.egress: EgressHost | None = None
        if settings.webrtc.egress_worker_count() > 0:
            self.egress = self._egress_host(settings)
            self.whep = self.egress  # type: ignore[assignment]
            self.forwarding_latency = self.egress.histogram(*forwarding, "forwarding")  # type: ignore[assignment]
            self.first_byte_latency = self.egress.histogram(*first_byte, "first_byte")  # type: ignore[assignment]
        else:
            self.forwarding_latency = Histogram(*forwarding, buckets=FORWARDING_BUCKETS, registry=None)
            self.first_byte_latency = Histogram(*first_byte, buckets=FIRST_BYTE_BUCKETS, registry=None)
            self.whep = WhepService(ice_servers=settings.webrtc.agent_ice_servers(),
                                    max_viewers=settings.webrtc.max_viewers,
                                    backlog_limit=settings.webrtc.backlog_bytes,
                                    send_failure_timeout=settings.webrtc.send_failure_timeout_s,
                                    c_fastpath=settings.webrtc.c_fastpath,
                                    c_fanout=settings.webrtc.c_fanout,
                                    connect_timeout=settings.webrtc.connect_timeout_s,
                                    layer_policy=settings.webrtc.layer_policy(),
                                    rtx_share=settings.webrtc.rtx_share,
                                    rtx_playout_allowance=settings.webrtc.rtx_playout_allowance_s,
                                    on_frame_sent=self._frame_sent,
                                    first_byte=self.frame_first_byte)
        w = settings.webrtc
        self.whip = WhipService(self.hub, ice_servers=w.agent_ice_servers(),
                                takeover=settings.srt.takeover, max_sessions=w.whip_max_sessions,
                                connect_timeout=w.connect_timeout_s,
                                media_timeout=w.whip_media_timeout_s, remb_bps=w.whip_remb_bps,
                                reorder_window=w.whip_reorder_window_s)
        mux_config = settings.webrtc.ice_mux_config()
        #: The shared ICE UDP socket of this process (bound in start()).
        self.ice_mux: IceMux | None = IceMux(mux_config) if mux_config is not None else None
        self.whep.ice_mux = self.whip.ice_mux = self.ice_mux
        # A WHEP viewer's PLI/FIR reaches the stream's WHIP publisher (rate-limited
        # per layer in the ingest).
        self.whep.keyframe_handlers.append(self.whip.request_keyframe)
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="media-cpu")
        self.srt: SrtListener | None = None
        self.ice_tcp: IceTcpListener | None = None
        self.srt_error: str | None = None
        self.ingests: dict[int, SrtIngest] = {}
        self.reads: dict[int, SrtReadSession] = {}
        self.ingest = IngestCounters()
        self._tasks: set[asyncio.Task] = set()
        self._timer: asyncio.Task | None = None
        self._catalog_lock = threading.Lock()

    def _egress_host(self, settings: Settings) -> EgressHost:
        """The egress workers' host: each worker gets what WhepService gets
        here; its viewers share this process's ICE ports (relayed)."""
        w = settings.webrtc
        config = WorkerConfig(index=0, ice_servers=w.agent_ice_servers(), max_viewers=w.max_viewers,
                              backlog_limit=w.backlog_bytes, send_failure_timeout=w.send_failure_timeout_s,
                              connect_timeout=w.connect_timeout_s, layer_policy=w.layer_policy(),
                              rtx_share=w.rtx_share, rtx_playout_allowance=w.rtx_playout_allowance_s,
                              c_fastpath=w.c_fastpath, c_fanout=w.c_fanout, log_level=logging.getLogger().getEffectiveLevel())
        host = EgressHost(w.egress_worker_count(), config, max_viewers=w.max_viewers, wait_for_ice=True)
        host.first_byte = self.frame_first_byte
        return host

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        if self.directory is not None:
            self._from_directory(self.directory.snap)
            self.directory.on_change.append(self._from_directory)
        else:
            await self.refresh_catalog()
        if self.ice_mux is not None:
            await self.ice_mux.start()
        self.whep.start()
        self.whip.start()
        await self._start_ice_tcp()
        if self.egress is not None:
            # The workers' viewers share this process's ICE ports (relayed),
            # so they are spawned once both are bound.
            self.egress.use_ice(self.ice_mux, self.ice_tcp)
            if not await self.egress.wait_ready():
                # Serving goes on: a worker that came up takes viewers, the
                # others keep being restarted (their backoff is in the log).
                event(log, logging.ERROR, "egress.workers_not_ready", workers=len(self.egress.slots))
        s = self.settings.srt
        if s.enabled:
            listener = SrtListener(
                s.host, s.port, authorize=self.authorize, on_connection=self.on_connection,
                latency_ms=s.latency_ms, max_connections=s.max_connections,
                reject_rate_limit=RateLimit(burst=max(5.0, s.reject_rate_per_s), per_second=s.reject_rate_per_s),
            )
            try:
                await listener.start()
                self.srt = listener
                event(log, logging.INFO, "srt.listening", host=s.host, port=listener.port,
                      latency_ms=s.latency_ms)
            except SrtUnavailable as exc:
                self.srt_error = str(exc)
                event(log, logging.ERROR, "srt.unavailable", detail=str(exc))
        self._timer = asyncio.get_running_loop().create_task(self._housekeeping(), name="media-housekeeping")

    async def _start_ice_tcp(self) -> None:
        """The ICE-TCP listener, when ``webrtc.ice_tcp`` is on; every WHEP and
        WHIP answer then offers its passive candidates. A port that cannot
        be bound is an error worth stopping for: the operator asked for it."""
        w = self.settings.webrtc
        if not w.ice_tcp:
            return
        listener = IceTcpListener(w.ice_bind_address, w.ice_tcp_port,
                                  max_connections=w.ice_tcp_connection_limit(), write_limit=w.backlog_bytes)
        await listener.start()
        self.ice_tcp = listener
        self.whep.ice_tcp = listener
        self.whip.ice_tcp = listener

    @property
    def srt_port(self) -> int | None:
        return self.srt.port if self.srt is not None else None

    async def stop(self) -> None:
        await cancel_and_wait(self._timer)
        if self.srt is not None:
            await self.srt.close()
            self.srt = None
        await self.whip.close()
        await self.whep.close()
        if self.ice_tcp is not None:
            await self.ice_tcp.close()
            self.ice_tcp = None
        if self.ice_mux is not None:
            await self.ice_mux.close()
        for ingest in list(self.ingests.values()):
            if ingest.transcoder is not None:
                await ingest.transcoder.stop()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        for stream in list(self.hub):
            stream.close()
        self.executor.shutdown(wait=False, cancel_futures=True)

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _housekeeping(self) -> None:
        last_refresh = time.monotonic()
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for name in self.hub.expire(now):
                event(log, logging.INFO, "stream.ended", stream=name)
            if self.directory is None and now - last_refresh >= 5.0:
                last_refresh = now
                try:
                    await self.refresh_catalog()
                except Exception as exc:  # the database may be briefly away; keep the last table
                    event(log, logging.WARNING, "media.catalog_refresh_failed", error=str(exc))

    def _from_directory(self, snap: Any) -> None:
        self.catalog.replace(
            (CatalogEntry(e.id, e.name, e.production_id, e.passphrase, e.pbkeylen, e.latency_ms)
             for e in snap.streams.values()),
            snap.revoked,
        )

    async def refresh_catalog(self) -> None:
        if self.directory is not None:
            await self.directory.reload()  # its on_change refills the catalog
            return
        pool = self.db.pool
        rows = await pool.fetch("SELECT id, name, production_id, passphrase, pbkeylen, latency_ms FROM streams")
        revoked = await pool.fetch("SELECT jti FROM revoked_links WHERE expires_at > now()")
        self.catalog.replace(
            (CatalogEntry(r["id"], r["name"], r["production_id"], r["passphrase"], r["pbkeylen"], r["latency_ms"])
             for r in rows),
            (r["jti"] for r in revoked),
        )

    # -- SRT -----------------------------------------------------------------------

    def authorize(self, req: StreamIdRequest | None, peer: str, raw: str) -> Decision:
        """Runs on libsrt's thread: in-memory lookups only."""
        if req is None:
            return reject_unparsable(raw)
        entry = self.catalog.get(req.stream)
        if entry is None:
            return Decision.deny(REJ_NOT_FOUND, f"unknown stream {req.stream!r}")
        token_ok = False
        if req.token:
            try:
                link = self.tokens.verify_link(req.token)
            except TokenError as exc:
                return Decision.deny(REJ_UNAUTHORIZED, str(exc))
            if self.catalog.revoked(link.jti):
                return Decision.deny(REJ_UNAUTHORIZED, "link revoked")
            if link.stream != req.stream or link.action != req.action:
                return Decision.deny(REJ_FORBIDDEN, "token is for another stream or action")
            # Bound to the stream's id (issue 9 item 2): a new stream that
            # took a deleted one's name is not the link's stream.
            if link.stream_id is None:
                return Decision.deny(REJ_UNAUTHORIZED, "link from before stream binding; ask for a new one")
            if link.stream_id != entry.id or link.production_id != entry.production_id:
                return Decision.deny(REJ_UNAUTHORIZED, "the link's stream was deleted")
            token_ok = True
        stream = self.hub.get(req.stream)
        if req.action == "publish":
            if stream is not None and not self.settings.srt.takeover:
                for p in stream.publishers:
                    if p.active and (p.layer is None or req.layer is None or p.layer == req.layer):
                        return Decision.deny(REJ_CONFLICT, "stream is already being published")
            # A publish link carries its own passphrase (issue 9 item 5), so
            # revoking the link revokes what its srt_url handed out.
            passphrase = self.tokens.link_passphrase(link.jti, entry.passphrase) if token_ok else entry.passphrase
            return Decision.allow(passphrase=passphrase, pbkeylen=entry.pbkeylen,
                                  latency_ms=entry.latency_ms, reason="publish (link)" if token_ok else "publish")
        if stream is None or stream.state != StreamState.LIVE:
            return Decision.deny(REJ_UNAVAILABLE, "stream is not live")
        if token_ok:
            return Decision.allow(latency_ms=entry.latency_ms, reason="read (link)")
        return Decision.allow(passphrase=entry.passphrase, pbkeylen=entry.pbkeylen,
                              latency_ms=entry.latency_ms, reason="read")

    def _grant(self, conn: SrtConnection, live: dict[int, Any]) -> None:
        """Register what this SRT session was admitted with, so revoking it
        (or deleting or re-keying the stream) ends it (issue 9 item 5)."""
        req = conn.request
        entry = self.catalog.get(req.stream) if req is not None else None
        if self.directory is None or req is None or entry is None:
            return
        link = None
        if req.token:
            try:
                link = self.tokens.verify_link(req.token)
            except TokenError:
                return  # cannot happen: the listen callback verified it
        encrypted = req.action == "publish" or link is None
        sid = conn.socket_id

        def close(reason: str) -> None:
            event(log, logging.INFO, "srt.access_ended", stream=req.stream, reason=reason)
            conn.close()

        self.directory.grants.add(conn, Grant(
            f"srt-{req.action}", entry.production_id, close, lambda: sid in live, stream=req.stream,
            stream_id=entry.id, link=link, passphrase=entry.passphrase if encrypted else None))

    def on_connection(self, conn: SrtConnection) -> None:
        req = conn.request
        if req is None:
            conn.close()
            return
        if req.action == "publish":
            stream = self.hub.get_or_create(req.stream)
            try:
                ingest = SrtIngest(self, conn, stream, req.layer)
            except (StreamBusy, StreamClosed) as exc:
                self.ingest.refused_busy += 1
                event(log, logging.WARNING, "srt.publish_refused", stream=req.stream, reason=str(exc))
                conn.close()
                return
            self.ingests[conn.socket_id] = ingest
            self._grant(conn, self.ingests)
            self.ingest.sessions += 1
            event(log, logging.INFO, "srt.publishing", stream=req.stream, layer=req.layer,
                  peer=str(conn.peer), latency_ms=conn.latency_ms, encrypted=conn.encrypted)
        else:
            stream = self.hub.get(req.stream)
            if stream is None or stream.state == StreamState.CLOSED:
                conn.close()
                return
            sid = conn.socket_id
            self.reads[sid] = SrtReadSession(conn, stream, on_closed=lambda reason: self.reads.pop(sid, None))
            self._grant(conn, self.reads)
            event(log, logging.INFO, "srt.reading", stream=req.stream, peer=str(conn.peer))

    # -- observation --------------------------------------------------------------------

    def note_first_byte(self, data: bytes, first_arrival: float) -> None:
        """Remember when the first byte of the video frame ``data`` came in."""
        first_bytes = self._first_bytes
        first_bytes[id(data)] = (data, first_arrival)
        if len(first_bytes) > FIRST_BYTE_FRAMES:
            first_bytes.popitem(last=False)

    def frame_first_byte(self, frame: Any) -> float | None:
        """When the first byte of the video frame ``frame`` came in (once:
        the entry is forgotten); None when unknown (not from SRT, or evicted).
        The packetizer stamps it on the frame's PacketsEvent, which may be
        sent to viewers in another process."""
        entry = self._first_bytes.pop(id(frame.data), None)
        if entry is not None and entry[0] is frame.data:
            return entry[1]
        return None

    def _frame_sent(self, sent: Any, now: float) -> None:
        """A video frame's last packet went to every viewer (``sent``: its
        media.webrtc.fanout.PacketsEvent, with the frame's arrival times)."""
        self.forwarding_latency.observe(max(0.0, now - sent.arrival))
        if sent.first_byte is not None:
            self.first_byte_latency.observe(max(0.0, now - sent.first_byte))

    def connection_failures(self, name: str, limit: int = 10) -> list[dict[str, Any]]:
        """The last SRT callers for ``name`` that did not get through, newest
        first: what a director needs to fix an encoder's settings."""
        if self.srt is None:
            return []
        out = []
        for f in reversed(list(self.srt.failures)):
            if f.stream == name:
                out.append({"at": datetime.fromtimestamp(f.at, timezone.utc).isoformat(), "protocol": "srt",
                            "peer": f.peer, "code": f.code, "reason": f.reason})
                if len(out) >= limit:
                    break
        return out

    def live_state(self, name: str) -> dict[str, Any]:
        stream = self.hub.get(name)
        viewers = self.whep.viewers(name)
        if stream is None:
            return {"live": False, "state": "offline", "source": None, "tracks": [], "layers": [],
                    "viewers": len(viewers), "viewers_by_layer": {},
                    "connection_failures": self.connection_failures(name)}
        st = stream.stats()
        by_layer: dict[str, int] = {}
        struggling = 0
        for v in viewers:
            key = v.layer_name or "starting"
            by_layer[key] = by_layer.get(key, 0) + 1
            struggling += v.struggling()
        tracks = []
        for t in st.tracks:
            d = {k: getattr(t, k) for k in t.__dataclass_fields__}
            d["bitrate_bps"] = round(t.bitrate_bps)
            tracks.append(d)
        b_frames = any(t.b_frames for t in st.tracks)
        source = None
        if st.publishers:
            pubs = []
            for p in st.publishers:
                info: dict[str, Any] = {"protocol": p.protocol, "remote": p.remote, "layer": p.layer,
                                        "since_s": round(time.monotonic() - p.attached_at, 1), "frames": p.frames}
                ingest = next((i for i in self.ingests.values() if i.publisher.epoch == p.epoch
                               and i.stream is stream), None)
                if ingest is not None:
                    try:
                        info["srt"] = ingest.conn.stats()
                    except SrtApiError:
                        info["srt"] = None
                    c = ingest.ts_counters
                    info["transport_errors"] = {k: getattr(c, k) for k in c.__dataclass_fields__
                                                if isinstance(getattr(c, k), int)}
                pubs.append(info)
            source = {"protocol": pubs[0]["protocol"], "publishers": pubs}
        warnings = []
        if b_frames:
            warnings.append("source has B-frames: WebRTC viewers cannot be served passthrough; "
                            "encode with B-frames off (x264 -bf 0 / -tune zerolatency)")
        return {
            "live": st.state == StreamState.LIVE, "state": st.state.value, "source": source,
            "tracks": tracks, "layers": list(st.layers), "viewers": len(viewers), "viewers_by_layer": by_layer,
            "viewers_struggling": struggling,
            "connection_failures": self.connection_failures(name),
            "srt_readers": st.ts_readers, "bytes_in": st.ts_bytes_in, "drops": st.drops_total,
            "warnings": warnings,
        }

    def collect(self) -> Iterable[Metric]:
        """Prometheus families read at scrape time (server/media_metrics.py)."""
        return collect(self)
