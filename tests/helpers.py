"""Test helpers: run the real server as a subprocess and talk to it (HTTP,
the tally socket, media peers); or run the application in process with
``/ws/events`` clients; the stand-ins the in-process tests publish and wait
with; for the browser tests, a server on a loop of its own thread and the
control room logged into."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

ROOT = Path(__file__).resolve().parent.parent
BANNER = re.compile(r"ReturnFeed is running: https?://[^:]+:(\d+)/")
SRT_BANNER = re.compile(r"SRT listener on port (\d+)")
METRICS_BANNER = re.compile(r"Metrics on (http://\S+/metrics)")
#: Server base URL → its metrics listener's URL (``metrics_url``).
_METRICS_URLS: dict[str, str] = {}


def metrics_url(base: str) -> str:
    """The ``/metrics`` URL of the test server whose API is at ``base``
    (metrics have their own listener, never the public port)."""
    return _METRICS_URLS[base.rstrip("/")]


@dataclass
class ServerProcess:
    """``returnfeed serve`` in a subprocess, with its output collected."""

    data_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    port: int = 0
    srt_port: int = 0
    metrics: str = ""
    output: list[str] = field(default_factory=list)
    admin_password: str | None = None

    def start(self, timeout: float = 60) -> "ServerProcess":
        env = dict(os.environ)
        env.pop("DATABASE_URL", None)
        # Any free port: several servers (and people) share this machine.
        env.update({"RETURNFEED_LOG__FORMAT": "text", "PYTHONUNBUFFERED": "1", "RETURNFEED_METRICS__PORT": "0"})
        # The shared ICE UDP port too (webrtc.ice_udp_port, default 8189).
        env["RETURNFEED_WEBRTC__ICE_UDP_PORT"] = "0"
        env.update(self.env)
        cmd = [sys.executable, "-m", "server.cli", "serve", "--data-dir", str(self.data_dir),
               "--http-port", "0", *self.args]
        if "--srt-port" not in self.args:
            cmd += ["--srt-port", "0"]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        ready = threading.Event()

        def pump() -> None:
            assert self.proc and self.proc.stdout
            for line in self.proc.stdout:
                self.output.append(line.rstrip("\n"))
                srt = SRT_BANNER.search(line)
                if srt:
                    self.srt_port = int(srt.group(1))
                mm = METRICS_BANNER.search(line)
                if mm:
                    self.metrics = mm.group(1)
                m = BANNER.search(line)
                if m:
                    self.port = int(m.group(1))
                    ready.set()
                pw = re.search(r"created user 'admin' with password: (\S+)", line)
                if pw:
                    self.admin_password = pw.group(1)
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(timeout) or not self.port:
            self.kill()
            raise RuntimeError("server did not start:\n" + "\n".join(self.output[-40:]))
        if self.metrics:
            _METRICS_URLS[self.url] = self.metrics
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM and wait. The server's own shutdown budgets (HTTP drain,
        deferred writes, pool close, PostgreSQL's shutdown checkpoint) add
        up to well under a minute; past *timeout* the server's thread stacks
        (SIGUSR1) and log tail are part of the failure."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGUSR1)
            time.sleep(1.0)
            self.kill()
            tail = "\n".join(self.output[-80:])
            raise AssertionError(f"server did not stop within {timeout} s; its last output:\n{tail}") from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@contextlib.contextmanager
def running_server(data_dir: Path, database_url: str, admin_password: str, *, env: dict[str, str] | None = None,
                   args: list[str] | None = None) -> Iterator[ServerProcess]:
    """A started :class:`ServerProcess` on ``database_url`` whose admin
    logs in with ``admin_password`` (more ``env`` and ``args`` as given),
    stopped on the way out."""
    srv = ServerProcess(data_dir, env={"DATABASE_URL": database_url, "RETURNFEED_ADMIN_PASSWORD": admin_password,
                                       **(env or {})}, args=list(args or []))
    srv.admin_password = admin_password
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@dataclass
class Resp:
    status: int
    headers: Any
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http(method: str, url: str, body: Any = None, *, token: str | None = None,
         headers: dict[str, str] | None = None, raw: bytes | None = None, timeout: float = 15) -> Resp:
    h = dict(headers or {})
    data = raw
    if body is not None:
        data = json.dumps(body).encode()
        h.setdefault("Content-Type", "application/json")
    if token:
        h["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return Resp(r.status, r.headers, r.read())
    except urllib.error.HTTPError as e:
        return Resp(e.code, e.headers, e.read())


def login(base: str, username: str, password: str) -> dict[str, Any]:
    r = http("POST", f"{base}/api/v1/auth/login", {"username": username, "password": password})
    assert r.status == 200, r.body
    return r.json()


def _check(pred: Any, deadline: float) -> Any:
    """``pred()``; past ``deadline`` (monotonic) a falsy value fails the test."""
    v = pred()
    if not v and time.monotonic() > deadline:
        raise AssertionError("condition not met in time")
    return v


def wait_until(pred: Any, timeout: float = 10, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while not (v := _check(pred, deadline)):
        time.sleep(interval)
    return v


def tally_ws_url(base: str, query: str) -> str:
    """The ``/ws/tally`` URL of the server at ``base`` with ``query``."""
    return base.replace("http://", "ws://") + "/ws/tally?" + query


async def recv_json(ws: Any, kinds: tuple[str, ...] = ("snapshot", "tally", "error"), timeout: float = 5.0) -> dict:
    """The next JSON message of one of ``kinds`` on a ``websockets``
    connection (heartbeats and other types skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        msg = json.loads(await asyncio.wait_for(ws.recv(), max(0.05, deadline - time.monotonic())))
        if msg["type"] in kinds:
            return msg


def udp_capture(name: str) -> list[tuple[float, bytes]]:
    """A live UDP capture of tests/fixtures/ts (``NAME.ts``, and per datagram
    its arrival second and length in ``NAME.msgs``): (seconds since start,
    datagram) in arrival order."""
    fixtures = ROOT / "tests" / "fixtures" / "ts"
    data = (fixtures / f"{name}.ts").read_bytes()
    out, pos = [], 0
    for line in (fixtures / f"{name}.msgs").read_text().split("\n"):
        if line:
            t, n = line.split()
            out.append((float(t), data[pos : pos + int(n)]))
            pos += int(n)
    return out


def postgres_pids(data_dir: Path) -> list[int]:
    """PIDs of postgres processes serving ``data_dir/pg``."""
    pids = []
    target = str(data_dir / "pg")
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"postgres") and target.encode() in b" ".join(cmd):
            pids.append(int(d.name))
    return pids


# -- media peers -------------------------------------------------------------------

def ffmpeg_publish(srt_url: str, *, seconds: float = 30, size: str = "640x360", fps: int = 25,
                   profile: str = "baseline", bframes: bool = False, audio: str = "aac",
                   latency_us: int = 120000, extra: list[str] | None = None, source: str = "testsrc",
                   bitrate: str = "800k") -> subprocess.Popen:
    """A real ffmpeg SRT caller pushing test pattern + tone as MPEG-TS.
    ``latency_us`` is added unless the URL already asks for a latency (the
    API's URLs do)."""
    v = ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-profile:v", profile, "-g", str(fps), "-b:v", bitrate,
         "-preset", "veryfast"]
    v += ["-bf", "3"] if bframes else ["-tune", "zerolatency"]
    a = {"aac": ["-c:a", "aac", "-b:a", "96k"], "opus": ["-c:a", "libopus", "-b:a", "64k"], "none": ["-an"]}[audio]
    url = srt_url
    if "latency=" not in url:
        url += ("&" if "?" in url else "?") + f"latency={latency_us}"
    cmd = ["ffmpeg", "-nostdin", "-loglevel", "error", "-re",
           "-f", "lavfi", "-i", f"{source}=size={size}:rate={fps}",
           "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000",
           "-t", str(seconds), *v, *a, *(extra or []), "-f", "mpegts", url]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def wait_live(base: str, stream: str, token: str, timeout: float = 20) -> dict:
    def check() -> dict | None:
        r = http("GET", f"{base}/api/v1/streams/{stream}", token=token)
        body = r.json() if r.status == 200 else {}
        return body if body.get("live") and body.get("tracks") else None

    return wait_until(check, timeout=timeout, interval=0.2)


async def aiortc_whep_receive(url: str, token: str, seconds: float, *,
                              kinds: tuple[str, ...] = ("video", "audio")) -> dict:
    """An aiortc WHEP client that decodes what it receives; returns counts."""
    import asyncio

    import aiohttp
    from aiortc import RTCPeerConnection, RTCSessionDescription

    pc = RTCPeerConnection()
    for k in kinds:
        pc.addTransceiver(k, direction="recvonly")
    counts: dict[str, Any] = {"video": 0, "audio": 0, "width": None}
    tasks = []

    @pc.on("track")
    def on_track(track: Any) -> None:
        async def reader() -> None:
            while True:
                try:
                    frame = await track.recv()
                except Exception:
                    return
                counts[track.kind] += 1
                if track.kind == "video":
                    counts["width"] = frame.width

        tasks.append(asyncio.ensure_future(reader()))

    await pc.setLocalDescription(await pc.createOffer())
    async with aiohttp.ClientSession() as http_session:
        async with http_session.post(url, data=pc.localDescription.sdp,
                                     headers={"Content-Type": "application/sdp",
                                              "Authorization": f"Bearer {token}"}) as resp:
            counts["status"] = resp.status
            counts["location"] = resp.headers.get("Location")
            counts["etag"] = resp.headers.get("ETag")
            answer = await resp.text()
        if resp.status != 201:
            await pc.close()
            counts["body"] = answer
            return counts
        counts["answer"] = answer
        await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        await asyncio.sleep(seconds)
        base = url.split("/whep/")[0]
        async with http_session.delete(base + counts["location"],
                                       headers={"Authorization": f"Bearer {token}"}) as resp:
            counts["delete_status"] = resp.status
    await pc.close()
    for t in tasks:
        t.cancel()
    return counts


# -- in-process stand-ins ----------------------------------------------------------

@dataclass(slots=True)
class Unit:
    """One coded unit as an ingest hands it to ``Publisher.publish`` (the
    :class:`media.unit.Unit` protocol), for tests that publish by hand."""

    codec: str
    pts: int
    dts: int
    keyframe: bool
    data: bytes


async def until(pred: Any, timeout: float = 30.0, interval: float = 0.02) -> Any:
    """``wait_until`` on the running event loop: the tasks under test run
    while it sleeps. Returns ``pred()``'s first truthy value."""
    deadline = time.monotonic() + timeout
    while not (v := _check(pred, deadline)):
        await asyncio.sleep(interval)
    return v


class LoopThread(ABC):
    """A server set up by the coroutine ``_start`` on an event loop of its
    own thread, torn down by ``_stop``: for the browser tests, whose main
    thread Playwright's sync API occupies with its own loop. ``port``: the
    one ``_start`` listens on."""

    #: Seconds ``start`` waits for ``_start``.
    start_timeout = 60.0

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    @abstractmethod
    async def _start(self) -> None:
        """Set the server up and listen (on the loop's thread)."""

    @abstractmethod
    async def _stop(self) -> None:
        """Close what ``_start`` opened (on the loop's thread)."""

    def start(self) -> Any:
        self._thread.start()
        if not self._ready.wait(self.start_timeout):
            raise RuntimeError(f"{type(self).__name__} did not start")
        if self._error is not None:
            raise self._error
        return self

    def stop(self, timeout: float = 30.0) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(timeout)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def call(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` on the loop (awaited when it is a coroutine), from
        the test's thread; its result."""
        async def run() -> Any:
            v = fn(*args)
            return await v if inspect.isawaitable(v) else v

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._start())
        except BaseException as exc:  # re-raised in the test's thread
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()


# -- browser pages -----------------------------------------------------------------

class Console:
    """Console errors and uncaught exceptions of one page."""

    def __init__(self, page: Any, name: str) -> None:
        self.name = name
        self.errors: list[str] = []
        page.on("console", lambda m: self.errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))

    def assert_clean(self) -> None:
        assert not self.errors, f"{self.name} page logged errors:\n" + "\n".join(self.errors)


def free_udp_port() -> int:
    """A UDP port free now on 127.0.0.1 (for the server's SRT listener)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def open_control_room(browser: Any, base: str, user: str, password: str, stream: str,
                      name: str = "control") -> tuple[Any, Any, Console]:
    """A desktop-sized browser context on ``base``/control, logged in as
    ``user``, once ``stream``'s tile is on screen: (context, page, console)."""
    ctx = browser.new_context(viewport={"width": 1440, "height": 900})
    page = ctx.new_page()
    console = Console(page, name)
    page.goto(f"{base}/control")
    page.fill("form.login input[name=username]", user)
    page.fill("form.login input[name=password]", password)
    page.click("form.login button[type=submit]")
    page.wait_for_selector(f".tile[data-name={stream}]", timeout=15000)
    return ctx, page, console


# -- the application in process ----------------------------------------------------

class AppEnv:
    """The application of :func:`app_env` and an HTTP session to it as the
    users and links of ``tokens`` (by name)."""

    def __init__(self, server: Any, db: Any, tokens: dict[str, str], qc: Any) -> None:
        import aiohttp

        self.server = server
        self.db = db
        self.tokens = tokens
        self.qc = qc
        self.session = aiohttp.ClientSession()

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))

    async def req(self, method: str, path: str, who: str | None, body: Any = None,
                  raw: bool = False) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.tokens[who]}"} if who else {}
        async with self.session.request(method, self.url(path), json=body, headers=headers) as r:
            text = await r.text()
            if raw:
                return r.status, text
            return r.status, json.loads(text) if text else None

    async def ws(self, who: str) -> "EventsSocket":
        ws = await self.session.ws_connect(self.url("/ws/events") + f"?token={self.tokens[who]}")
        return EventsSocket(ws)


class EventsSocket:
    """A ``/ws/events`` client that collects every message; ``pings`` are
    answered by aiohttp's autoping."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.messages: list[dict] = []
        self.task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        import aiohttp

        async for msg in self.ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                self.messages.append(json.loads(msg.data))

    def of(self, *types: str) -> list[dict]:
        return [m for m in self.messages if m["type"] in types]

    async def wait(self, pred: Any, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not pred(self):
            assert time.monotonic() < deadline, f"timed out; got {self.messages}"
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        await self.ws.close()
        await self.task


@contextlib.asynccontextmanager
async def app_env(db_url: str, data_dir: Path, secret: str,
                  labels: dict[str, str] | None = None) -> AsyncIterator[AppEnv]:
    """The real application (:func:`server.app.create_app`) on the
    PostgreSQL database ``db_url``, behind aiohttp's ``TestServer``.

    Production "show" has streams camA and camB, directors d1 and d2 and a
    viewer member v; production "other" has camC and no member of "show".
    Tokens (``AppEnv.tokens``): admin, d1, d2, v, and linkA, a read link for
    camA (its jti: ``link_jti``). ``labels``: the streams' labels (default:
    their names)."""
    from aiohttp.test_utils import TestServer

    from server import repo
    from server.app import create_app
    from server.auth import TokenService
    from server.config import load_settings
    from server.db import Database
    from server.directory import Directory
    from server.keys import QC_EVENTS

    labels = labels or {}
    settings = load_settings(environ={}, overrides={"database.url": db_url, "data_dir": str(data_dir)})
    # Not supervised: the outage test sets the database's verdict itself.
    # Generous timeouts: this machine is shared, and a slow statement is not what these tests are about.
    db = Database(db_url, data_dir, supervise=False, statement_timeout=10.0, acquire_timeout=5.0)
    await db.start()
    tokens = TokenService(secret)
    async with db.pool.acquire() as conn:
        users = {n: (await repo.create_user(conn, n, "x", role))["id"]
                 for n, role in (("admin", "admin"), ("d1", "director"), ("d2", "director"), ("v", "viewer"))}
        show = (await repo.create_production(conn, "show", "", users["d1"]))["id"]
        other = (await repo.create_production(conn, "other", "", users["admin"]))["id"]
        for n, role in (("d1", "director"), ("d2", "director"), ("v", "viewer")):
            await repo.set_member(conn, show, users[n], role, None)
        sid = {}
        for name, prod in (("camA", show), ("camB", show), ("camC", other)):
            sid[name] = (await repo.create_stream(conn, name, prod, 16, labels.get(name, name), {}))["id"]
    directory = Directory(db)
    await directory.start()
    toks = {n: tokens.issue_access(uid, n, role)[0] for (n, uid), role in
            zip(users.items(), ("admin", "director", "director", "viewer"))}
    toks["linkA"], claims = tokens.issue_link("camA", "read", show, 3600, stream_id=sid["camA"])
    app = create_app(settings, db, tokens, None, None, directory)
    server = TestServer(app)
    await server.start_server()
    await first_purge_done()
    e = AppEnv(server, db, toks, app[QC_EVENTS])
    e.directory, e.link_jti = directory, claims.jti
    try:
        yield e
    finally:
        await e.session.close()
        await server.close()
        await directory.stop()
        await db.close()


async def first_purge_done(timeout: float = 10.0) -> None:
    """Wait until the refresh-token purge the app starts with is asleep.

    Stopping the app while that first purge's statement is in flight can
    lose the task's cancellation (it then sleeps out its whole interval and
    the app's cleanup waits on it): a short test would hang in teardown.
    """
    deadline = time.monotonic() + timeout
    while True:
        purge = [t for t in asyncio.all_tasks() if t.get_name() == "refresh-purge"]
        waiting_on = purge[0].get_coro().cr_await if purge else None
        if not purge or getattr(getattr(waiting_on, "cr_code", None), "co_name", "") == "sleep":
            return
        assert time.monotonic() < deadline, "the first refresh-token purge did not finish"
        await asyncio.sleep(0.01)


# -- shared by the browser and ICE tests -----------------------------------------

CHROMIUM = "/usr/bin/chromium"
#: Chromium for WebRTC tests: headless-safe, autoplay allowed, host
#: candidates as addresses (not mDNS names) so the server can reach them.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--autoplay-policy=no-user-gesture-required", "--disable-features=WebRtcHideLocalIpsWithMdns"]
#: getUserMedia without a prompt, from Chromium's fake camera and microphone.
FAKE_MEDIA_ARGS = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]


def track_pcs_script(var: str = "__rfnPcs") -> str:
    """An init script that keeps every RTCPeerConnection the page makes in
    ``window[var]`` (the pages own theirs; a reconnect makes a new one), so a
    test can read their getStats itself."""
    return f"""(() => {{
  const Native = window.RTCPeerConnection;
  window.{var} = [];
  window.RTCPeerConnection = class extends Native {{
    constructor(...args) {{ super(...args); window.{var}.push(this); }}
  }};
}})();"""


@contextlib.contextmanager
def launched_chromium(args: list[str], wrap: Callable[[Path], Path] | None = None) -> Iterator[Any]:
    """A Playwright (sync) Chromium, closed on exit. ``wrap`` writes, into
    the directory it is given, an executable that starts ``CHROMIUM`` inside
    a network namespace (Playwright drives it over a pipe, which crosses
    namespaces; a CDP port would not)."""
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="rfn-chromium-") as tmp:
        exe = wrap(Path(tmp)) if wrap is not None else CHROMIUM
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(exe), args=args)
            try:
                yield browser
            finally:
                browser.close()


def grant_wake_lock(ctx: Any, page: Any, origin: str) -> None:
    """Granting camera and microphone denies every other permission (CDP
    Browser.grantPermissions); a phone's browser grants the screen wake lock
    to a secure context by itself, so grant it to ``origin`` as well."""
    cdp = ctx.new_cdp_session(page)
    context_id = cdp.send("Target.getTargetInfo")["targetInfo"]["browserContextId"]
    cdp.send("Browser.setPermission", {"permission": {"name": "screen-wake-lock"}, "setting": "granted",
                                       "origin": origin, "browserContextId": context_id})


def metric_value(text: str, name: str) -> float:
    """The value of the unlabelled sample ``name`` in Prometheus text, 0 when absent."""
    line = next((ln for ln in text.splitlines() if ln.startswith(name + " ")), None)
    return float(line.split()[-1]) if line else 0.0


def local_srt_url(srt_url: str, srt_port: int) -> str:
    """An API-issued SRT URL pointed at a test server's real (ephemeral) SRT port."""
    return (srt_url.replace("localhost:8890", f"127.0.0.1:{srt_port}").replace(":8890?", f":{srt_port}?")
            .replace(":0?", f":{srt_port}?"))


def watch_url(base: str, stream: str, token: str) -> str:
    """A new hour-long read link's watch page URL, made through ``base`` (the
    URL points at the host the API was asked on)."""
    link = http("POST", f"{base}/api/v1/streams/{stream}/links", {"action": "read", "ttl_s": 3600}, token=token)
    assert link.status == 201, link.body
    return link.json()["watch_url"]


def publish_live(base: str, token: str, production: str, stream: str, srt_port: int, *,
                 seconds: float) -> subprocess.Popen:
    """A new production with one stream, fed by ffmpeg over SRT until it is
    live; returns the ffmpeg process (the caller stops it)."""
    r = http("POST", f"{base}/api/v1/productions", {"name": production}, token=token)
    assert r.status == 201, r.body
    r = http("POST", f"{base}/api/v1/streams", {"name": stream, "production": production}, token=token)
    assert r.status == 201, r.body
    proc = ffmpeg_publish(local_srt_url(r.json()["srt_url"], srt_port), seconds=seconds)
    try:
        wait_live(base, stream, token)
    except BaseException:
        stop_process(proc)
        raise
    return proc


@contextlib.contextmanager
def live_stream(srv: "ServerProcess", admin_password: str, production: str, stream: str, *,
                seconds: float) -> Iterator[str]:
    """On the started ``srv``: :func:`publish_live`, yielding the admin's
    token; ffmpeg and the server are stopped on exit, also after a failure."""
    proc = None
    try:
        admin = login(srv.url, "admin", admin_password)["access_token"]
        proc = publish_live(srv.url, admin, production, stream, srv.srt_port, seconds=seconds)
        yield admin
    finally:
        if proc is not None:
            stop_process(proc)
        srv.stop()


#: Plays ``url`` over WHEP in the page (recvonly video + audio, the whole
#: offer after gathering): ``{status, answer}``; the peer connection is
#: ``window._pc``, each track's stream ids in ``window._streams``.
WHEP_PLAY = """async ([url, token]) => {
  const pc = new RTCPeerConnection();
  pc.addTransceiver('video', {direction: 'recvonly'});
  pc.addTransceiver('audio', {direction: 'recvonly'});
  const v = document.createElement('video'); v.muted = true; v.autoplay = true; document.body.appendChild(v);
  window._streams = {};
  pc.ontrack = e => { v.srcObject = e.streams[0] || new MediaStream([e.track]);
    window._streams[e.track.kind] = e.streams.map(s => s.id); };
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise(r => { if (pc.iceGatheringState === 'complete') r();
    pc.onicegatheringstatechange = () => pc.iceGatheringState === 'complete' && r(); setTimeout(r, 2000); });
  const res = await fetch(url, {method: 'POST', body: pc.localDescription.sdp,
    headers: {'Content-Type': 'application/sdp', 'Authorization': 'Bearer ' + token}});
  const answer = await res.text();
  if (res.status !== 201) return {status: res.status, body: answer};
  await pc.setRemoteDescription({type: 'answer', sdp: answer});
  window._pc = pc;
  return {status: 201, answer};
}"""


async def chromium_whep_samples(base: str, stream: str, token: str, seconds: float, stats: str,
                                args: list[str]) -> tuple[dict, list[dict]]:
    """Chromium plays ``stream`` over WHEP (:data:`WHEP_PLAY`); ``stats``
    (a page function) is sampled once a second for ``seconds``. Returns the
    play result and the samples."""
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            page = await browser.new_page()
            await page.goto(base + "/healthz")
            started = await page.evaluate(WHEP_PLAY, [f"{base}/whep/{stream}", token])
            assert started["status"] == 201, started
            samples = []
            for _ in range(int(seconds)):
                await asyncio.sleep(1)
                samples.append(await page.evaluate(stats))
            return started, samples
        finally:
            await browser.close()


@contextlib.contextmanager
def udp_socket_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(tx, rx) on loopback for the send-path tests: tx non-blocking, rx
    bound with a 2 s timeout, both with 8 MiB buffers so a whole keyframe
    fits in flight without drops that are the kernel's, not the sender's."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.bind(("127.0.0.1", 0))
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        rx.settimeout(2)
        tx.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
        tx.setblocking(False)
        yield tx, rx
    finally:
        tx.close()
        rx.close()
