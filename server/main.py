"""Process lifecycle: the database and directory around the HTTP application.

Start: TLS certificate, when there is one (:mod:`server.tls`) → database
(embedded or external) → migrations → first admin → token service →
directory → the app (:func:`server.app.create_app`), whose runner starts the
media and tally services (``app.cleanup_ctx``, in the order drawn in
:mod:`server.app`) → HTTP(S) site → redirect site → metrics site. SIGHUP
re-reads the certificate. Stop
(SIGINT/SIGTERM): stop accepting, close tally sockets, let in-flight
requests finish within ``http.shutdown_timeout_s``, stop media, close the
directory and the pool, stop the embedded PostgreSQL. A second signal
during shutdown exits at once.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from aiohttp import web

from media.procs import freeze_startup_heap

from . import repo
from .app import create_app
from .auth import LEEWAY_S, TokenService, hash_password
from .config import ENV_ADMIN_PASSWORD, Settings
from .db import Database
from .directory import Directory
from .health import healthz, metrics_app
from .http_guard import GuardedRunner, HttpGuard
from .keys import DB, STARTED, TALLY
from .log import event
from .metrics import PROCESS_GC
from .media_service import MediaService
from .tally_service import TallyService
from .tls import TlsCertificate, TlsSite, install_hsts, redirect_app, tls_files

log = logging.getLogger("returnfeed")


async def ensure_first_admin(db: Database, environ: dict[str, str] | None = None,
                             out: Callable[[str], None] = print) -> str | None:
    """Create user ``admin`` on first start. Returns the password if generated."""
    environ = dict(os.environ if environ is None else environ)
    # A direct connection: the advisory lock below may wait for another
    # node's first start (an Argon2 hash) longer than the pool's budget.
    async with db.direct() as conn, conn.transaction():
        # Serialise concurrent first starts of several processes.
        await conn.execute("SELECT pg_advisory_xact_lock(7270461)")
        if await repo.count_users(conn) > 0:
            return None
        given = environ.get(ENV_ADMIN_PASSWORD)
        password = given or secrets.token_urlsafe(12)
        loop = asyncio.get_running_loop()
        pw_hash = await loop.run_in_executor(None, hash_password, password)
        await repo.create_user(conn, "admin", pw_hash, "admin")
        await repo.audit(conn, "user.create", actor="system", target="admin", detail={"role": "admin"})
    if given:
        out(f"First start: created user 'admin' with the password from {ENV_ADMIN_PASSWORD}.")
        return None
    out(f"First start: created user 'admin' with password: {password}\n"
        "  (shown once; change it or set RETURNFEED_ADMIN_PASSWORD before the first start)")
    return password


async def token_service(db: Database, settings: Settings) -> TokenService:
    secret = settings.auth.jwt_secret
    if not secret:
        async with db.direct() as conn:
            secret = await repo.get_or_create_secret(conn, "jwt")
    return TokenService(secret, access_ttl_s=settings.auth.access_ttl_s)


def database_from_settings(s: Settings, *, supervise: bool = True, pool_max: int | None = None) -> Database:
    d = s.database
    return Database(d.url, s.data_dir, pool_min=d.pool_min, pool_max=pool_max or d.pool_max,
                    connect_timeout=d.connect_timeout_s, acquire_timeout=d.acquire_timeout_s,
                    statement_timeout=d.statement_timeout_s, probe_interval=d.probe_interval_s,
                    probe_timeout=d.probe_timeout_s, retry_after=d.retry_after_s,
                    restart_backoff_max=d.restart_backoff_max_s, write_queue_max=d.write_queue_max,
                    supervise=supervise)


@dataclass
class Server:
    settings: Settings
    db: Database | None = None
    app: web.Application | None = None
    media: MediaService | None = None
    tally: TallyService | None = None
    directory: Directory | None = None
    runner: web.AppRunner | None = None
    metrics_runner: web.AppRunner | None = None
    #: HTTPS: the listener's certificate (None: plain HTTP) and the optional
    #: plain-HTTP port that redirects to it.
    tls: TlsCertificate | None = None
    redirect_runner: web.AppRunner | None = None
    addresses: list[Any] = field(default_factory=list)

    async def start(self, out: Callable[[str], None] = print) -> None:
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        # Before the database: a missing or broken certificate fails the start at once.
        files = tls_files(s.http, s.data_dir)
        self.tls = TlsCertificate(files) if files is not None else None
        self.db = database_from_settings(s)
        await self.db.start()
        try:
            await ensure_first_admin(self.db, out=out)
            tokens = await token_service(self.db, s)
            self.directory = Directory(self.db, refresh_s=s.database.directory_refresh_s,
                                       session_window_s=s.auth.access_ttl_s + LEEWAY_S)
            await self.directory.start()
            # Constructed here, started and stopped by the app's runner.
            self.media = MediaService(s, self.db, tokens, self.directory)
            self.tally = TallyService(self.db, queue_max=s.database.write_queue_max)
            self.app = create_app(s, self.db, tokens, self.media, self.tally, self.directory)
            if self.tls is not None:
                install_hsts(self.app, s.http.hsts_max_age_s)
            guard = HttpGuard(header_timeout_s=s.http.header_timeout_s,
                              max_connections_per_ip=s.http.max_connections_per_ip,
                              trusted_proxies=s.http.trusted_proxies)
            # Parser errors in JSON, a header timeout and a per-IP cap.
            self.runner = GuardedRunner(self.app, guard=guard, shutdown_timeout=s.http.shutdown_timeout_s,
                                        handle_signals=False, access_log=None,
                                        keepalive_timeout=s.http.keepalive_timeout_s)
            await self.runner.setup()
            if self.tls is not None:
                site: web.TCPSite = TlsSite(self.runner, s.http.host, s.http.port, ssl_context=self.tls.context,
                                            handshake_timeout_s=s.http.header_timeout_s)
            else:
                site = web.TCPSite(self.runner, s.http.host, s.http.port, reuse_address=True)
            await site.start()
            if self.tls is not None and s.http.redirect_port:
                await self._start_redirect()
            if s.metrics.enabled:
                self.metrics_runner = web.AppRunner(metrics_app(self.app), handle_signals=False, access_log=None)
                await self.metrics_runner.setup()
                await web.TCPSite(self.metrics_runner, s.metrics.host, s.metrics.port, reuse_address=True).start()
        except BaseException:
            await self.stop()
            raise
        self.addresses = list(self.runner.addresses)
        port = self.addresses[0][1] if self.addresses else s.http.port
        host = "localhost" if s.http.host in ("0.0.0.0", "::", "") else s.http.host
        event(log, logging.INFO, "server.started", http_port=port, database=self.db.kind,
              data_dir=str(s.data_dir))
        if self.media.srt is not None:
            out(f"SRT listener on port {self.media.srt_port} (publish with streamid=publish:<stream>)")
        else:
            out(f"SRT is disabled: {self.media.srt_error or 'srt.enabled = false'}")
        if self.metrics_runner is not None:
            mhost, mport = list(self.metrics_runner.addresses)[0][:2]
            out(f"Metrics on http://{mhost}:{mport}/metrics")
        if self.tls is not None:
            out(f"TLS certificate {self.tls.files.cert} (SHA-256 {self.tls.fingerprint}); SIGHUP reloads it")
        if self.redirect_runner is not None:
            rport = list(self.redirect_runner.addresses)[0][1]
            out(f"HTTP redirect on port {rport} (308 to HTTPS; /healthz and /ca.crt answer directly)")
        scheme = "https" if self.tls is not None else "http"
        out(f"ReturnFeed is running: {scheme}://{host}:{port}/  (database: {self.db.kind}; Ctrl-C stops)")

    async def _start_redirect(self) -> None:
        s = self.settings
        assert self.app is not None
        from . import pages

        direct = {"/healthz": healthz, **pages.local_ca_handlers(s.data_dir)}
        app = redirect_app(lambda: self.http_port, s.http.public_url, direct)
        # /healthz reads the main application's state.
        for key in (DB, STARTED, TALLY):
            if key in self.app:
                app[key] = self.app[key]
        guard = HttpGuard(header_timeout_s=s.http.header_timeout_s, max_connections_per_ip=s.http.max_connections_per_ip)
        self.redirect_runner = GuardedRunner(app, guard=guard, shutdown_timeout=1.0, handle_signals=False,
                                             access_log=None, keepalive_timeout=s.http.keepalive_timeout_s)
        await self.redirect_runner.setup()
        await web.TCPSite(self.redirect_runner, s.http.host, s.http.redirect_port, reuse_address=True).start()

    def reload_tls(self) -> bool | None:
        """SIGHUP: new handshakes get the certificate now in the files; open
        connections keep theirs. None: the server does not use TLS."""
        return self.tls.reload() if self.tls is not None else None

    @property
    def http_port(self) -> int:
        return self.addresses[0][1] if self.addresses else self.settings.http.port

    async def stop(self) -> None:
        event(log, logging.INFO, "server.stopping")
        began = time.monotonic()
        steps: dict[str, float] = {}

        async def step(name: str, stop: Callable[[], Awaitable[Any]]) -> None:
            t0 = time.monotonic()
            event(log, logging.DEBUG, "server.stop_step", step=name)
            await stop()
            steps[name] = round(time.monotonic() - t0, 3)
            if steps[name] >= 2.0:  # a slow step is named, not guessed at
                event(log, logging.WARNING, "server.stop_step_slow", step=name, seconds=steps[name])

        if self.metrics_runner is not None:
            await step("metrics_http", self.metrics_runner.cleanup)
            self.metrics_runner = None
        if self.redirect_runner is not None:
            await step("redirect_http", self.redirect_runner.cleanup)
            self.redirect_runner = None
        if self.runner is not None:
            # Stops tally and media too (server.app.Lifecycle), each once.
            await step("http", self.runner.cleanup)
            self.runner = None
        self.tally = None
        self.media = None
        if self.directory is not None:
            await step("directory", self.directory.stop)
            self.directory = None
        if self.db is not None:
            await step("database", self.db.close)
            self.db = None
        event(log, logging.INFO, "server.stopped", seconds=round(time.monotonic() - began, 3), steps=steps)


async def serve(settings: Settings) -> int:
    server = Server(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            event(log, logging.WARNING, "server.forced_exit", signal=signum)
            os._exit(130)
        event(log, logging.INFO, "server.signal", signal=signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    # `kill -HUP <pid>` re-reads the TLS certificate (a renewal): new
    # handshakes get it, open connections are not touched.
    loop.add_signal_handler(signal.SIGHUP, server.reload_tls)
    # `kill -USR1 <pid>` writes every thread's stack to stderr: what a hung
    # server is doing, without stopping it.
    faulthandler.register(signal.SIGUSR1, all_threads=True, chain=False)
    try:
        await server.start(out=lambda line: print(line, flush=True))
    except Exception as exc:
        print(f"returnfeed: could not start: {exc}", file=sys.stderr, flush=True)
        return 1
    event(log, logging.INFO, "server.heap_frozen", objects=freeze_startup_heap())
    PROCESS_GC.install()
    await stop.wait()
    await server.stop()
    return 0
