"""A ReturnFeed server in a subprocess for the load tools: started with its
own embedded PostgreSQL, its HTTP and SRT ports read from its banner lines,
its error lines kept, stopped with SIGTERM (SIGKILL after ``timeout``)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

BANNER = re.compile(r"ReturnFeed is running: http://[^:]+:(\d+)/")
SRT_BANNER = re.compile(r"SRT listener on port (\d+)")
METRICS_BANNER = re.compile(r"Metrics on (http://\S+/metrics)")


class ServerProcess:
    def __init__(self, data_dir: Path, *, password: str, checkout: Path | None = None, cpus: str | None = None,
                 env: dict[str, str] | None = None, start_timeout: float = 120.0) -> None:
        """``checkout``: the tree to run (its ``.venv`` if it has one, else this
        Python with the tree on ``PYTHONPATH``); default: this tree."""
        root = checkout or Path(__file__).resolve().parent.parent
        full_env = dict(os.environ, RETURNFEED_ADMIN_PASSWORD=password, RETURNFEED_LOG__FORMAT="text",
                        PYTHONUNBUFFERED="1", PYTHONPATH=str(root))
        full_env.pop("DATABASE_URL", None)
        if "ice_udp_port" in (root / "server" / "config.py").read_text():
            full_env["RETURNFEED_WEBRTC__ICE_UDP_PORT"] = "0"  # the shared ICE port: any free one
        full_env.update(env or {})
        python = root / ".venv" / "bin" / "python"
        cmd = [str(python if checkout is not None and python.exists() else sys.executable), "-m", "server.cli",
               "serve", "--data-dir", str(data_dir), "--http-port", "0", "--srt-port", "0"]
        if "--metrics-port" in (root / "server" / "cli.py").read_text():
            cmd += ["--metrics-port", "0"]  # metrics on their own listener (any free port)
        if cpus:
            cmd = ["taskset", "-c", cpus, *cmd]
        self.data = data_dir
        self.proc = subprocess.Popen(cmd, cwd=root, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.port = self.srt_port = 0
        self.metrics_url = ""  # empty: the tree serves /metrics on its HTTP port
        self.errors: list[str] = []
        ready = threading.Event()

        def pump() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                if m := SRT_BANNER.search(line):
                    self.srt_port = int(m.group(1))
                if m := METRICS_BANNER.search(line):
                    self.metrics_url = m.group(1)
                if m := BANNER.search(line):
                    self.port = int(m.group(1))
                    ready.set()
                if " ERROR " in line or "Traceback" in line:
                    self.errors.append(line.rstrip()[:300])
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(start_timeout) or not self.port:
            self.stop()
            raise RuntimeError(f"server from {root} did not start")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics(self) -> str:
        """Where this server's Prometheus text is."""
        return self.metrics_url or f"{self.url}/metrics"

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
