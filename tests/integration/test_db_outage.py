"""The show goes on through a database outage (issue 16).

Real server processes on a real PostgreSQL:

* the embedded PostgreSQL frozen (SIGSTOP on its whole process tree): cut,
  preview, a WHEP join with a signed link, an SRT publish with a token and
  ``/ws/tally`` delivery all work; a REST read answers 503 + Retry-After;
  the tally events cut during the freeze are stored, in order, after SIGCONT;
* the embedded postmaster killed (SIGKILL): the server restarts it, the API
  is back within 10 s without a server restart and the cuts made in the gap
  are stored;
* an external PostgreSQL (started by the test) restarted under two nodes: a
  cut on node A during the restart reaches node B's clients and both nodes
  converge.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import asyncpg
import pytest
import websockets

from helpers import (
    ServerProcess, aiortc_whep_receive, ffmpeg_publish, http, login, postgres_pids, recv_json, stop_process,
    tally_ws_url, wait_live, wait_until,
)

pytestmark = pytest.mark.integration


async def _recv(ws: Any, kinds: tuple[str, ...] = ("snapshot", "tally"), timeout: float = 10.0) -> dict:
    return await recv_json(ws, kinds, timeout)


def _states(msg: dict) -> dict[str, str]:
    return {k: v["state"] for k, v in msg["sources"].items()}


def _embedded_url(data: Path) -> str:
    from server.embedded_pg import EmbeddedPostgres

    pg = EmbeddedPostgres(data)
    pg.socket_dir = pg._socket_dir()
    return pg.url


def _stored_seqs(url: str, production_id: int) -> list[int]:
    async def run() -> list[int]:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            rows = await conn.fetch("SELECT seq FROM tally_events WHERE production_id = $1 ORDER BY id",
                                    production_id)
            return [r["seq"] for r in rows]
        finally:
            await conn.close()

    return asyncio.run(run())


def _link_audits(url: str) -> list[str]:
    async def run() -> list[str]:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            rows = await conn.fetch("SELECT detail->>'jti' AS jti FROM audit_log WHERE action = 'link.create'")
            return [r["jti"] for r in rows]
        finally:
            await conn.close()

    return asyncio.run(run())


def _srt(url: str, port: int) -> str:
    return re.sub(r"^srt://[^?]+\?", f"srt://127.0.0.1:{port}?", url)


def _process_tree(roots: list[int]) -> list[int]:
    """``roots`` and all their descendants (the postmaster's backends,
    checkpointer, walwriter…: their command lines do not name the data dir)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _wait(pred: Any, timeout: float, *servers: ServerProcess, what: str) -> Any:
    """wait_until, failing with what the servers logged."""
    try:
        return wait_until(pred, timeout=timeout, interval=0.2)
    except AssertionError:
        logs = "\n".join("\n".join(s.output[-30:]) for s in servers)
        raise AssertionError(f"{what} not within {timeout} s; server output:\n{logs}") from None


class Freezer:
    """SIGSTOP / SIGCONT a set of processes; always thawed on exit."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids

    def __enter__(self) -> "Freezer":
        for pid in self.pids:
            os.kill(pid, signal.SIGSTOP)
        return self

    def thaw(self) -> None:
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def __exit__(self, *exc: Any) -> None:
        self.thaw()


def _scratch(prefix: str) -> Path:
    """A directory straight under the system temp dir. Not pytest's tmp_path:
    when run as root the cluster runs as another user who must traverse the
    path, and a concurrent pytest session resets its base dir to 0700."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    _SCRATCH.append(path)
    return path


_SCRATCH: list[Path] = []


@pytest.fixture(scope="module", autouse=True)
def _remove_scratch() -> Iterator[None]:
    yield
    while _SCRATCH:
        shutil.rmtree(_SCRATCH.pop(), ignore_errors=True)


@pytest.fixture(scope="module")
def show() -> Iterator[dict]:
    """One server on its embedded PostgreSQL, a production with two cameras,
    cam1 live over SRT, signed links made while the database is up."""
    data = _scratch("rf-outage-") / "data"
    srv = ServerProcess(data, env={"RETURNFEED_ADMIN_PASSWORD": "outage-admin-pw"}).start()
    procs = []
    try:
        base = srv.url
        admin = login(base, "admin", "outage-admin-pw")["access_token"]
        pid = http("POST", f"{base}/api/v1/productions", {"name": "Outage show"}, token=admin).json()["id"]
        cams = {}
        for n in ("cam1", "cam2", "cam3"):
            r = http("POST", f"{base}/api/v1/streams", {"name": n, "production": pid}, token=admin)
            assert r.status == 201, r.body
            cams[n] = r.json()
        read1 = http("POST", f"{base}/api/v1/streams/cam1/links", {"action": "read"}, token=admin).json()
        pub2 = http("POST", f"{base}/api/v1/streams/cam2/links", {"action": "publish"}, token=admin).json()
        procs.append(ffmpeg_publish(_srt(cams["cam1"]["srt_url"], srv.srt_port), seconds=300, audio="none"))
        wait_live(base, "cam1", admin)
        yield {"srv": srv, "base": base, "admin": admin, "pid": pid, "data": data, "read1": read1, "pub2": pub2,
               "procs": procs, "url": _embedded_url(data)}
    finally:
        for p in procs:
            stop_process(p)
        srv.stop()


def test_frozen_database_keeps_tally_viewers_and_publishers(show) -> None:
    base, admin, pid, data = show["base"], show["admin"], show["pid"], show["data"]
    hdr = {"Authorization": f"Bearer {admin}"}
    outage_seqs: list[int] = []
    outage_link_jti = ""

    async def run() -> None:
        nonlocal outage_link_jti
        async with websockets.connect(tally_ws_url(base, f"production={pid}"), additional_headers=hdr) as director:
            await _recv(director)  # snapshot: the production's tally is loaded before the freeze
            pg = _process_tree(postgres_pids(data))
            assert len(pg) > 3, "embedded postgres and its backends should be running"
            with Freezer(pg) as freezer:
                # A REST read that needs the database: 503 + Retry-After + JSON, not a hang.
                t0 = time.monotonic()
                r = await asyncio.to_thread(http, "GET", f"{base}/api/v1/productions", token=admin, timeout=30)
                first_503_s = time.monotonic() - t0
                assert r.status == 503, r.body
                assert int(r.headers["Retry-After"]) >= 1
                assert r.json()["error"] == "database_unavailable"
                print(f"first REST read during the freeze: 503 in {first_503_s * 1000:.0f} ms")

                # /healthz names the degraded part (from the cached probe).
                def degraded() -> Any:
                    h = http("GET", f"{base}/healthz", timeout=30)
                    return h if h.status == 503 else None

                h = await asyncio.to_thread(wait_until, degraded, 15, 0.2)
                body = h.json()
                assert body["degraded"] == ["database"] and body["database"] == "unavailable"
                assert body["tally"] == "ok" and body["media"] == "ok"
                t0 = time.monotonic()
                r = await asyncio.to_thread(http, "GET", f"{base}/api/v1/streams/cam1", token=admin, timeout=30)
                assert r.status == 503 and int(r.headers["Retry-After"]) >= 1
                print(f"REST read once the probe has seen the freeze: {(time.monotonic() - t0) * 1000:.0f} ms")

                # Cut over REST, preview over the WebSocket: both answered, both delivered.
                r = await asyncio.to_thread(http, "POST", f"{base}/api/v1/productions/{pid}/tally",
                                            {"type": "cut", "source": "cam2"}, token=admin, timeout=30)
                assert r.status == 200, r.body
                assert r.json()["program"] == "cam2"
                d = await _recv(director, ("tally",))
                assert _states(d)["cam2"] == "program"
                outage_seqs.append(d["seq"])
                await director.send(json.dumps({"type": "preview", "source": "cam3"}))
                d = await _recv(director, ("tally",))
                assert _states(d)["cam3"] == "preview"
                outage_seqs.append(d["seq"])

                # A new /ws/tally client (camera link) gets its snapshot and the next cut.
                cam_link = show["pub2"]["token"]
                async with websockets.connect(tally_ws_url(base, f"token={cam_link}")) as cam:
                    snap = await _recv(cam, ("snapshot",))
                    assert set(snap["sources"]) == {"cam2"} and snap["sources"]["cam2"]["state"] == "program"
                    await director.send(json.dumps({"type": "cut", "source": "cam1"}))
                    d = await _recv(director, ("tally",))
                    outage_seqs.append(d["seq"])
                    c = await _recv(cam, ("tally",))
                    assert c["seq"] == d["seq"] and c["sources"]["cam2"]["state"] == "off"

                # A director hands out a new link mid-show; its audit row waits.
                r = await asyncio.to_thread(http, "POST", f"{base}/api/v1/streams/cam3/links",
                                            {"action": "read"}, token=admin, timeout=30)
                assert r.status == 201, r.body
                outage_link_jti = r.json()["jti"]

                # A new WHEP viewer with a signed link decodes video.
                out = await aiortc_whep_receive(f"{base}/whep/cam1", show["read1"]["token"], 3, kinds=("video",))
                assert out["status"] == 201, out.get("body")
                assert out["video"] > 10, out

                # An SRT camera publishing with a signed token is accepted and goes live.
                proc = ffmpeg_publish(_srt(show["pub2"]["srt_url"], show["srv"].srt_port), seconds=30, audio="none")
                show["procs"].append(proc)

                def live2() -> bool:
                    return http("HEAD", f"{base}/whep/cam2", token=admin, timeout=30).status == 200

                await asyncio.to_thread(wait_until, live2, 20, 0.3)
                assert proc.poll() is None
                stop_process(proc)
                freezer.thaw()

            # After SIGCONT: the API comes back and the outage's events are stored, in order.
            def api_back() -> bool:
                return http("GET", f"{base}/api/v1/productions", token=admin, timeout=30).status == 200

            await asyncio.to_thread(wait_until, api_back, 15, 0.2)

    asyncio.run(run())

    def stored() -> list[int] | None:
        seqs = _stored_seqs(show["url"], pid)
        return seqs if set(outage_seqs) <= set(seqs) else None

    seqs = wait_until(stored, timeout=15, interval=0.3)
    assert seqs == sorted(seqs), seqs
    assert [s for s in seqs if s in outage_seqs] == outage_seqs
    _wait(lambda: outage_link_jti in _link_audits(show["url"]), 10, show["srv"],
          what="audit row of the link made during the freeze stored")
    h = http("GET", f"{base}/healthz").json()
    assert h["status"] == "ok" and h["pending_writes"] == 0


def test_killed_postmaster_is_restarted_and_gap_cuts_stored(show) -> None:
    base, admin, pid, data = show["base"], show["admin"], show["pid"], show["data"]
    postmaster = int((data / "pg" / "postmaster.pid").read_text().split("\n", 1)[0])
    gap_seqs = []
    # The production's tally is live on this node (loaded while the database was up).
    assert http("GET", f"{base}/api/v1/productions/{pid}/tally", token=admin).status == 200
    restarts = http("GET", f"{base}/healthz").json().get("database_restarts", 0)
    os.kill(postmaster, signal.SIGKILL)
    t0 = time.monotonic()
    for source in ("cam3", "cam1"):
        r = http("POST", f"{base}/api/v1/productions/{pid}/tally", {"type": "cut", "source": source},
                 token=admin, timeout=30)
        assert r.status == 200, r.body
        gap_seqs.append(r.json()["seq"])

    def api_back() -> bool:
        # Back means: the server has restarted its database (not merely
        # answered before it noticed the kill) and the REST API answers.
        restarted = http("GET", f"{base}/healthz", timeout=30).json().get("database_restarts", 0) > restarts
        return restarted and http("GET", f"{base}/api/v1/productions", token=admin, timeout=30).status == 200

    _wait(api_back, 10, show["srv"], what="API back after SIGKILL")
    print(f"API back {time.monotonic() - t0:.2f} s after SIGKILL of the postmaster")
    assert show["srv"].proc.poll() is None, "the server itself was never restarted"
    new_pm = int((data / "pg" / "postmaster.pid").read_text().split("\n", 1)[0])
    assert new_pm != postmaster

    def stored() -> list[int] | None:
        seqs = _stored_seqs(show["url"], pid)
        return seqs if set(gap_seqs) <= set(seqs) else None

    seqs = _wait(stored, 10, show["srv"], what=f"gap cuts {gap_seqs} stored")
    assert [s for s in seqs if s in gap_seqs] == gap_seqs
    h = http("GET", f"{base}/healthz").json()
    assert h["status"] == "ok" and h["database_restarts"] >= 1


@pytest.fixture
def external_pg() -> Iterator[Any]:
    """A second PostgreSQL, started (and restarted) by the test itself."""
    from server.embedded_pg import EmbeddedPostgres

    data = _scratch("rf-extpg-")
    pg = EmbeddedPostgres(data)
    pg.start()
    try:
        yield pg
    finally:
        pg.stop()


def test_external_restart_two_nodes_converge(external_pg, tmp_path: Path) -> None:
    env = {"DATABASE_URL": external_pg.url, "RETURNFEED_ADMIN_PASSWORD": "ext-admin-pw"}
    a = ServerProcess(tmp_path / "a", env=env).start()
    b = ServerProcess(tmp_path / "b", env=env).start()
    try:
        admin = login(a.url, "admin", "ext-admin-pw")["access_token"]
        pid = http("POST", f"{a.url}/api/v1/productions", {"name": "Failover"}, token=admin).json()["id"]
        for n in ("c1", "c2"):
            assert http("POST", f"{a.url}/api/v1/streams", {"name": n, "production": pid}, token=admin).status == 201
        hdr = {"Authorization": f"Bearer {admin}"}

        async def run() -> int:
            async with websockets.connect(tally_ws_url(a.url, f"production={pid}"), additional_headers=hdr) as wa, \
                    websockets.connect(tally_ws_url(b.url, f"production={pid}"), additional_headers=hdr) as wb:
                await _recv(wa)
                await _recv(wb)
                await wa.send(json.dumps({"type": "cut", "source": "c1"}))
                await _recv(wa, ("tally",))
                await _recv(wb, ("tally",))
                await asyncio.to_thread(external_pg.stop)  # fast shutdown: every session is cut
                try:
                    def a_down() -> bool:
                        return http("GET", f"{a.url}/api/v1/productions", token=admin, timeout=30).status == 503

                    await asyncio.to_thread(wait_until, a_down, 10, 0.2)
                    await wa.send(json.dumps({"type": "cut", "source": "c2"}))
                    da = await _recv(wa, ("tally",))
                    assert _states(da)["c2"] == "program"
                finally:
                    await asyncio.to_thread(external_pg.start)
                t0 = time.monotonic()
                # Node B's client hears the cut made on node A during the restart.
                while True:
                    db_ = await _recv(wb, ("tally",), timeout=20)
                    if _states(db_).get("c2") == "program":
                        break
                print(f"cut on A during the restart reached B {time.monotonic() - t0:.2f} s after the restart")
                assert db_["seq"] == da["seq"]
                return da["seq"]

        seq = asyncio.run(run())

        def back(srv: ServerProcess) -> bool:
            return http("GET", f"{srv.url}/api/v1/productions", token=admin, timeout=30).status == 200

        wait_until(lambda: back(a) and back(b), timeout=10, interval=0.2)
        sa = http("GET", f"{a.url}/api/v1/productions/{pid}/tally", token=admin).json()
        sb = http("GET", f"{b.url}/api/v1/productions/{pid}/tally", token=admin).json()
        assert sa["program"] == sb["program"] == "c2" and sa["seq"] == sb["seq"] == seq
        assert seq in _stored_seqs(external_pg.url, pid)
        assert http("GET", f"{b.url}/healthz").json()["database_kind"] == "external"
    finally:
        a.stop()
        b.stop()
