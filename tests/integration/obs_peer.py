"""Real OBS Studio (obs-websocket 5) for tests: headless under Xvfb, in a
network namespace of its own.

OBS reaches out to the internet at start (the rtmp-services plugin fetches
its service list), so it runs in a fresh network namespace (``unshare -n``)
that has only a loopback. Its WebSocket server is reached through a Unix
socket: inside the namespace this file (run as a script) relays each
connection on the Unix socket to OBS's port; outside, ``ObsStudio`` listens
on 127.0.0.1 and relays to the Unix socket.

Profile: WebSocket server enabled with a password (so authentication is
exercised), a 320x180 canvas at 10 fps (a shared CI machine renders it with
llvmpipe), no first-run wizard, no updater.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

WS_PORT = 4455
PASSWORD = "returnfeed-obs-test"

GLOBAL_INI = f"""[General]
FirstRun=true
LastVersion=486539266
EnableAutoUpdates=false
Pre19Defaults=false
Pre21Defaults=false
Pre23Defaults=false
Pre24.1Defaults=false

[OBSWebSocket]
FirstLoad=false
ServerEnabled=true
ServerPort={WS_PORT}
AlertsEnabled=false
AuthRequired=true
ServerPassword={PASSWORD}
"""

PROFILE_INI = """[General]
Name=Untitled

[Video]
BaseCX=320
BaseCY=180
OutputCX=320
OutputCY=180
FPSType=1
FPSInt=10
"""


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def _relay(open_peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        peer_reader, peer_writer = await open_peer()
    except OSError:
        writer.close()
        return
    await asyncio.gather(_pipe(reader, peer_writer), _pipe(peer_reader, writer))


def missing() -> str | None:
    """Why OBS cannot run here (None when it can)."""
    for tool in ("obs", "xvfb-run", "unshare", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (bash config/bootstrap.sh setup)"
    return None


class ObsStudio:
    """``async with ObsStudio() as obs: obs.url`` — a running OBS."""

    def __init__(self) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="rf-obs-"))
        self.sock = self.home / "obs-ws.sock"
        self.proc: subprocess.Popen | None = None
        self.server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def __aenter__(self) -> "ObsStudio":
        cfg = self.home / ".config" / "obs-studio"
        (cfg / "basic" / "profiles" / "Untitled").mkdir(parents=True)
        (cfg / "global.ini").write_text(GLOBAL_INI)
        (cfg / "basic" / "profiles" / "Untitled" / "basic.ini").write_text(PROFILE_INI)
        inner = (f"ip link set lo up && {sys.executable} {Path(__file__).resolve()} {self.sock} {WS_PORT} & "
                 "exec xvfb-run -a -s '-screen 0 640x360x24' obs --minimize-to-tray --disable-shutdown-check "
                 "--disable-updater --multi")
        env = {**os.environ, "HOME": str(self.home), "LIBGL_ALWAYS_SOFTWARE": "1"}
        # Not root: a user namespace too (maps us to root inside, so the
        # loopback can be brought up).
        unshare = ["unshare", "--net"] if os.geteuid() == 0 else ["unshare", "--map-root-user", "--net"]
        self.proc = subprocess.Popen([*unshare, "sh", "-c", inner], env=env, cwd=self.home,
                                     stdout=open(self.home / "obs.log", "wb"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.server = await asyncio.start_server(
            lambda r, w: _relay(lambda: asyncio.open_unix_connection(str(self.sock)), r, w), "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def log(self) -> str:
        try:
            return (self.home / "obs.log").read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    async def __aexit__(self, *exc) -> None:
        if self.server is not None:
            self.server.close()
        if self.proc is not None and self.proc.poll() is None:
            # Our own session (start_new_session): OBS, Xvfb and the relay.
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                await asyncio.to_thread(self.proc.wait, 10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                await asyncio.to_thread(self.proc.wait, 10)
        shutil.rmtree(self.home, ignore_errors=True)


async def _inner_main(sock: str, port: int) -> None:
    """Inside the namespace: Unix socket → OBS's WebSocket port."""
    server = await asyncio.start_unix_server(
        lambda r, w: _relay(lambda: asyncio.open_connection("127.0.0.1", port), r, w), sock)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(_inner_main(sys.argv[1], int(sys.argv[2])))
