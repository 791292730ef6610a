"""Soak: the show goes on through a database freeze and an embedded-database kill.

Issue 16's soak: a real server (embedded PostgreSQL) with SRT cameras, WHEP
viewers, tally WebSocket clients and a director cutting once a second, for
``--minutes``. One third of the way in, the whole PostgreSQL process tree is
frozen (SIGSTOP) for ``--freeze-s``; two thirds in, the postmaster is killed
(SIGKILL) and the server must restart it. Every ``--sample-s`` the server's
RSS, open fds and asyncio task count (``returnfeed_asyncio_tasks``) are
sampled. At the end:

* **tally deliveries missed**: for every client, acknowledged cuts whose
  ``seq`` it never received (must be 0);
* **rows**: the cuts acknowledged by the REST API against the
  ``tally_events`` rows stored (missing must be 0; ``dropped_writes`` from
  ``/healthz`` says whether the bounded queue overflowed);
* **flatness**: RSS / fds / tasks after warm-up (first sample after the first
  minute) against the last sample;
* **viewers**: WHEP viewers still receiving video at the end;
* the API outage seen by a client during the freeze and after the kill.

The issue's scale is 8 cameras, 300 viewers, 1000 tally clients for 30
minutes; that does not fit a 2-core machine shared with other work, so scale
it down there (the defaults below), e.g.::

    .venv/bin/python loadtests/db_outage_soak.py --minutes 5 --cameras 2 \
        --viewers 20 --tally-clients 200 --json soak.json

Cameras publish a pre-encoded fixture with ``-c copy`` so they cost almost
nothing; viewers are the light ``whep_client.WhepViewer`` (no decoding).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_process import ServerProcess  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "ts" / "h264_aac_zerolatency.ts"
PASSWORD = "soak-admin-password"


# -- plumbing -------------------------------------------------------------------------

def http(method: str, url: str, body: Any = None, token: str | None = None,
         timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def postmaster_pid(data: Path) -> int:
    return int((data / "pg" / "postmaster.pid").read_text().split("\n", 1)[0])


def process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat[stat.rindex(")") + 2:].split()[1]), []).append(int(d.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def metric(text: str, name: str) -> float | None:
    m = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else None


# -- load -------------------------------------------------------------------------------

@dataclass(slots=True)
class TallyClient:
    seqs: set[int] = field(default_factory=set)
    connected_at: float = 0.0
    closed: str | None = None


async def tally_client(url: str, token: str, client: TallyClient, stop: asyncio.Event) -> None:
    import websockets

    try:
        async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {token}"},
                                      ping_interval=None, max_queue=None) as ws:
            client.connected_at = time.monotonic()
            while not stop.is_set():
                try:
                    raw = await asyncio.wait_for(ws.recv(), 1.0)
                except asyncio.TimeoutError:
                    continue
                msg = json.loads(raw)
                kind = msg.get("type")
                if kind == "tally":
                    client.seqs.add(msg["seq"])
                elif kind == "ping":
                    await ws.send('{"type":"pong"}')
    except Exception as exc:  # a closed client is reported, not retried: a miss must show
        client.closed = f"{type(exc).__name__}: {exc}"[:200]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from whep_client import WhepViewer, prepare_aiortc

    data = Path(tempfile.mkdtemp(prefix="rf-soak-")) / "data"
    # Every tally client is the admin from 127.0.0.1: lift the per-user/IP
    # socket caps meant for strangers.
    srv = ServerProcess(data, password=PASSWORD, env={
        "RETURNFEED_HTTP__WS_MAX_PER_LINK": "0", "RETURNFEED_HTTP__WS_MAX_PER_IP": "0",
        "RETURNFEED_HTTP__MAX_CONNECTIONS_PER_IP": "0"})
    report: dict[str, Any] = {"scale": {"minutes": args.minutes, "cameras": args.cameras, "viewers": args.viewers,
                                        "tally_clients": args.tally_clients, "freeze_s": args.freeze_s}}
    ffmpegs: list[subprocess.Popen] = []
    viewers: list[Any] = []
    stop = asyncio.Event()
    try:
        base = srv.url
        status, _, body = http("POST", f"{base}/api/v1/auth/login", {"username": "admin", "password": PASSWORD})
        admin = json.loads(body)["access_token"]
        pid = json.loads(http("POST", f"{base}/api/v1/productions", {"name": "Soak"}, admin)[2])["id"]
        cams = []
        for i in range(1, max(2, args.cameras) + 1):
            s = json.loads(http("POST", f"{base}/api/v1/streams", {"name": f"cam{i}", "production": pid}, admin)[2])
            cams.append(s)
        link = json.loads(http("POST", f"{base}/api/v1/streams/cam1/links", {"action": "read"}, admin)[2])
        for s in cams[: args.cameras]:
            url = re.sub(r"^srt://[^?]+\?", f"srt://127.0.0.1:{srv.srt_port}?", s["srt_url"]) + "&latency=120000"
            ffmpegs.append(subprocess.Popen(
                ["ffmpeg", "-nostdin", "-loglevel", "error", "-re", "-stream_loop", "-1", "-i", str(FIXTURE),
                 "-c", "copy", "-f", "mpegts", url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True))
        deadline = time.monotonic() + 30
        while json.loads(http("GET", f"{base}/api/v1/streams/cam1", token=admin)[2]).get("live") is not True:
            if time.monotonic() > deadline:
                raise RuntimeError("cam1 did not go live")
            await asyncio.sleep(0.3)

        ws_url = base.replace("http://", "ws://") + f"/ws/tally?production={pid}"
        clients = [TallyClient() for _ in range(args.tally_clients)]
        tasks = []
        for i, c in enumerate(clients):
            tasks.append(asyncio.create_task(tally_client(ws_url, admin, c, stop)))
            if i % 50 == 49:
                await asyncio.sleep(0.2)
        prepare_aiortc()
        for i in range(args.viewers):
            v = WhepViewer(link["whep_url"].replace("localhost", "127.0.0.1"), srtp_verify_every=0)
            try:
                await v.connect()
            except Exception as exc:
                report.setdefault("viewer_errors", []).append(str(exc)[:200])
            viewers.append(v)
            await asyncio.sleep(0.1)
        await asyncio.sleep(2)
        start = time.monotonic()
        end = start + args.minutes * 60
        acked: list[int] = []
        cut_errors: dict[str, int] = {}
        samples: list[dict[str, Any]] = []
        events: list[dict[str, Any]] = []

        async def director() -> None:
            i = 0
            while not stop.is_set():
                src = f"cam{1 + i % 2}"
                i += 1
                t0 = time.monotonic()
                st, _, b = await asyncio.to_thread(http, "POST", f"{base}/api/v1/productions/{pid}/tally",
                                                   {"type": "cut", "source": src}, admin)
                if st == 200:
                    acked.append(json.loads(b)["seq"])
                else:
                    cut_errors[str(st)] = cut_errors.get(str(st), 0) + 1
                await asyncio.sleep(max(0.0, args.cut_interval - (time.monotonic() - t0)))

        async def sampler() -> None:
            while not stop.is_set():
                try:
                    m = (await asyncio.to_thread(http, "GET", srv.metrics))[2].decode()
                    samples.append({
                        "t_s": round(time.monotonic() - start, 1), "rss_mb": round(rss_mb(srv.proc.pid), 1),
                        "fds": len(os.listdir(f"/proc/{srv.proc.pid}/fd")),
                        "tasks": metric(m, "returnfeed_asyncio_tasks"),
                        "db_available": metric(m, "returnfeed_db_available"),
                        "tally_clients": sum(1 for c in clients if c.connected_at and c.closed is None),
                        "viewers_receiving": sum(1 for v in viewers if v.stats.video and v.stats.video.packets),
                    })
                except Exception as exc:
                    samples.append({"t_s": round(time.monotonic() - start, 1), "error": str(exc)[:200]})
                await asyncio.sleep(args.sample_s)

        async def api_outage(label: str) -> None:
            """Until the REST API answers 200 again: how long, and what it answered."""
            t0 = time.monotonic()
            codes: dict[str, int] = {}
            slowest = 0.0
            while True:
                t = time.monotonic()
                st, hdrs, _ = await asyncio.to_thread(http, "GET", f"{base}/api/v1/productions", None, admin)
                slowest = max(slowest, time.monotonic() - t)
                codes[str(st)] = codes.get(str(st), 0) + 1
                if st == 200 and time.monotonic() - t0 > 0.5:
                    break
                await asyncio.sleep(0.2)
            events.append({"event": label, "api_back_after_s": round(time.monotonic() - t0, 2),
                           "answers": codes, "slowest_answer_s": round(slowest, 3)})

        bg = [asyncio.create_task(director()), asyncio.create_task(sampler())]
        await asyncio.sleep(max(0.0, start + (end - start) / 3 - time.monotonic()))
        tree = process_tree(postmaster_pid(data))
        for p in tree:
            os.kill(p, signal.SIGSTOP)
        try:
            watcher = asyncio.create_task(api_outage("freeze"))
            await asyncio.sleep(args.freeze_s)
        finally:
            for p in tree:
                try:
                    os.kill(p, signal.SIGCONT)
                except ProcessLookupError:
                    pass
        await watcher
        await asyncio.sleep(max(0.0, start + 2 * (end - start) / 3 - time.monotonic()))
        os.kill(postmaster_pid(data), signal.SIGKILL)
        await api_outage("postmaster SIGKILL")
        await asyncio.sleep(max(0.0, end - time.monotonic()))
        stop.set()
        await asyncio.gather(*bg)
        before = [v.stats.video.packets if v.stats.video else 0 for v in viewers]
        await asyncio.sleep(3)  # last deliveries and writes
        after = [v.stats.video.packets if v.stats.video else 0 for v in viewers]
        await asyncio.gather(*tasks)

        missed = 0
        for c in clients:
            missed += len(set(acked) - c.seqs)
        health = json.loads(http("GET", f"{base}/healthz")[2])

        import asyncpg
        from server.embedded_pg import EmbeddedPostgres

        pg = EmbeddedPostgres(data)
        pg.socket_dir = pg._socket_dir()
        conn = await asyncpg.connect(pg.url)
        try:
            stored = [r["seq"] for r in await conn.fetch(
                "SELECT seq FROM tally_events WHERE production_id = $1 ORDER BY id", pid)]
        finally:
            await conn.close()
        warm = next((s for s in samples if s.get("t_s", 0) >= 60 and "rss_mb" in s), None)
        last = next((s for s in reversed(samples) if "rss_mb" in s), None)
        report.update({
            "cuts_acknowledged": len(acked), "cut_errors": cut_errors,
            "tally_deliveries_missed": missed,
            "tally_clients_closed": sum(1 for c in clients if c.closed),
            "rows": {"stored": len(stored), "missing": len(set(acked) - set(stored)),
                     "unacknowledged_stored": len(set(stored) - set(acked)),
                     "in_order": stored == sorted(stored), "dropped_writes": health.get("dropped_writes")},
            "outages": events,
            "viewers": {"started": len(viewers),
                        "receiving_at_end": sum(1 for a, b in zip(before, after) if b > a),
                        "video_packets_lost": sum(v.stats.video.lost for v in viewers if v.stats.video)},
            "flat_after_warmup": None if not (warm and last) else {
                "rss_mb": [warm["rss_mb"], last["rss_mb"]], "fds": [warm["fds"], last["fds"]],
                "tasks": [warm["tasks"], last["tasks"]]},
            "samples": samples,
            "server_error_lines": len(srv.errors), "server_errors_first": srv.errors[:10],
        })
        return report
    finally:
        stop.set()
        for v in viewers:
            try:
                await v.close()
            except Exception:
                pass
        for p in ffmpegs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
        srv.stop()
        shutil.rmtree(data.parent, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--cameras", type=int, default=2)
    ap.add_argument("--viewers", type=int, default=20)
    ap.add_argument("--tally-clients", type=int, default=200)
    ap.add_argument("--freeze-s", type=float, default=15.0)
    ap.add_argument("--cut-interval", type=float, default=1.0)
    ap.add_argument("--sample-s", type=float, default=10.0)
    ap.add_argument("--json", help="also write the report here")
    args = ap.parse_args(argv)
    if shutil.which("ffmpeg") is None:
        print("needs ffmpeg", file=sys.stderr)
        return 2
    report = asyncio.run(run(args))
    text = json.dumps(report, indent=2)
    if args.json:
        Path(args.json).write_text(text)
    summary = {k: v for k, v in report.items() if k != "samples"}
    print(json.dumps(summary, indent=2))
    print("samples (t_s, rss_mb, fds, tasks, db_available, tally_clients, viewers_receiving):")
    for s in report["samples"]:
        print("  ", s.get("t_s"), s.get("rss_mb"), s.get("fds"), s.get("tasks"), s.get("db_available"),
              s.get("tally_clients"), s.get("viewers_receiving"), s.get("error", ""))
    ok = (report["tally_deliveries_missed"] == 0 and report["rows"]["missing"] == 0
          and not report["cut_errors"])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
