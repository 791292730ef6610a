"""Test helpers: run the real server as a subprocess, talk to it over HTTP."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


def wait_until(pred: Any, timeout: float = 10, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)


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
