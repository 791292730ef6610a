"""Fan-out cost of two checkouts, side by side, in one sitting.

For each checkout (a directory holding a ReturnFeed tree, e.g. a
``git worktree`` of the commit before a change) this starts that tree's
server with its own embedded PostgreSQL, creates a stream and a read link,
publishes one pre-encoded clip into it with ``ffmpeg -c copy`` (so the
publisher costs next to nothing), runs :mod:`whep_swarm` from *this* tree
against it and records the server's CPU per delivered packet. Rounds
alternate A, B, A, B … so that drift in the machine's load hits both.

    .venv/bin/python loadtests/fanout_ab.py --checkout before=../rf-before \\
        --checkout after=. --viewers 200 --hold 30 --rounds 2

Or one tree under two configurations (``--set LABEL:section.key=value``,
repeatable; settings with the same LABEL form one variant, passed to the
server as ``RETURNFEED_<SECTION>__<KEY>``): every checkout runs once per
variant per round, alternated the same way. Issue 14's comparison, the one
shared ICE socket against a socket per session (ephemeral ICE port: other
servers on the machine may hold 8189)::

    .venv/bin/python loadtests/fanout_ab.py --checkout this=. \\
        --set shared:webrtc.ice_mux=true --set shared:webrtc.ice_udp_port=0 \\
        --set per-session:webrtc.ice_mux=false --viewers 200 --hold 30 --rounds 2

Issue 15's comparison, the viewers served by N egress worker processes
(``--workers N``, repeatable: one variant per N, ``webrtc.egress_workers``
set to it; 0 is the single process). The server's CPU is then the main
process's plus every worker's (``returnfeed_egress_worker_cpu_seconds_total``
over the same window)::

    .venv/bin/python loadtests/fanout_ab.py --workers 1 --workers 2 \
        --viewers 200 --hold 30 --rounds 2

Prints one line per run and the median per checkout (and variant). A
benchmark, not a test: figures depend on the machine; compare only within
one sitting.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_process import ServerProcess  # noqa: E402

HERE = Path(__file__).resolve().parent
PASSWORD = "fanout-ab-benchmark-password"


def api(method: str, url: str, body: object = None, token: str | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read() or b"{}")


def make_clip(path: Path, kbps: int, seconds: int) -> None:
    subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i", "testsrc2=size=1280x720:rate=30",
         "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000", "-t", str(seconds),
         "-c:v", "libx264", "-pix_fmt", "yuv420p", "-preset", "veryfast", "-tune", "zerolatency", "-bf", "0",
         "-g", "30", "-b:v", f"{kbps}k", "-maxrate", f"{kbps}k", "-bufsize", f"{kbps}k",
         "-c:a", "libopus", "-b:a", "64k", "-f", "mpegts", str(path)], check=True)


def parse_variants(specs: list[str]) -> dict[str, dict[str, str]]:
    """``LABEL:section.key=value`` → {label: {RETURNFEED_SECTION__KEY: value}}
    (in the order the labels first appear)."""
    variants: dict[str, dict[str, str]] = {}
    for spec in specs:
        label, sep, setting = spec.partition(":")
        path, eq, value = setting.partition("=")
        if not sep or not eq or not label or "." not in path:
            raise SystemExit(f"--set {spec!r}: expected LABEL:section.key=value")
        env_name = "RETURNFEED_" + "__".join(part.upper() for part in path.split("."))
        variants.setdefault(label, {})[env_name] = value
    return variants


#: Server counters of packets it could not send or chose to drop (the
#: shared ICE socket's own too): a variant that "costs less" by sending
#: less shows here.
DROP_SERIES = re.compile(r"^returnfeed_webrtc_\w*(send_errors|dropped\w*|backlog_events)\b")


def server_drops(changes: list[dict]) -> dict[str, float]:
    """Non-zero growth of the :data:`DROP_SERIES` counters in the window."""
    return {c["series"]: c["delta"] for c in changes
            if DROP_SERIES.search(c["series"]) and c.get("delta")}


WORKER_CPU = "returnfeed_egress_worker_cpu_seconds_total"


def add_worker_cpu(sv: dict) -> None:
    """The swarm measured the server's main process; egress workers are
    processes of their own: their CPU over the same window (from the
    metrics) joins the figure, so that µs per packet-viewer and % of a core
    cover every process of the server."""
    changes = sv.get("metrics") or []
    worker_cpu = sum(c["delta"] or 0.0 for c in changes if c["series"].startswith(WORKER_CPU))
    if not worker_cpu or not sv.get("cpu_s"):
        return
    main_cpu = sv["cpu_s"]
    total = main_cpu + worker_cpu
    sv["main_cpu_s"], sv["worker_cpu_s"], sv["cpu_s"] = main_cpu, worker_cpu, total
    if sv.get("core_pct"):
        sv["core_pct"] *= total / main_cpu
    if sv.get("us_per_packet"):
        sv["us_per_packet"] *= total / main_cpu


def one_run(label: str, checkout: Path, clip: Path, args: argparse.Namespace,
            settings: dict[str, str] | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="rf-ab-") as tmp:
        env = {"RETURNFEED_LOG__LEVEL": "warning", **(settings or {})}
        if "max_connections_per_ip" in (checkout / "server" / "config.py").read_text():
            env["RETURNFEED_HTTP__MAX_CONNECTIONS_PER_IP"] = "0"  # every viewer comes from 127.0.0.1
        server = ServerProcess(Path(tmp) / "data", password=PASSWORD, checkout=checkout, cpus=args.server_cpus,
                               env=env)
        publisher = None
        try:
            base = f"http://127.0.0.1:{server.port}"
            token = api("POST", f"{base}/api/v1/auth/login", {"username": "admin", "password": PASSWORD})["access_token"]
            api("POST", f"{base}/api/v1/productions", {"name": "bench"}, token)
            stream = api("POST", f"{base}/api/v1/streams", {"name": "cam1", "production": "bench"}, token)
            srt = re.sub(r"srt://[^/?]+", f"srt://127.0.0.1:{server.srt_port}", stream["srt_url"])
            publisher = subprocess.Popen(
                ["ffmpeg", "-nostdin", "-loglevel", "error", "-re", "-stream_loop", "-1", "-i", str(clip),
                 "-c", "copy", "-f", "mpegts", srt], start_new_session=True)
            link = api("POST", f"{base}/api/v1/streams/cam1/links", {"action": "read"}, token)["token"]
            deadline = time.monotonic() + 20
            while not api("GET", f"{base}/api/v1/streams/cam1", None, token).get("live"):
                if time.monotonic() > deadline:
                    raise RuntimeError("stream did not go live")
                time.sleep(0.2)
            out = Path(tmp) / "swarm.json"
            cmd = [sys.executable, str(HERE / "whep_swarm.py"), "--url", f"{base}/whep/cam1?token={link}",
                   "--viewers", str(args.viewers), "--procs", str(args.procs), "--rate", str(args.rate),
                   "--hold", str(args.hold), "--server-pid", str(server.proc.pid), "--json", str(out),
                   "--metrics-url", server.metrics]
            if args.nack:
                cmd.append("--nack")
            if not args.plain_rtcp:
                cmd.append("--browser-rtcp")  # the server's RTCP work belongs in the figure
            if args.srtp_verify_every != 1:
                cmd += ["--srtp-verify-every", str(args.srtp_verify_every)]
            if args.swarm_cpus:
                cmd = ["taskset", "-c", args.swarm_cpus, *cmd]
            subprocess.run(cmd, stdout=subprocess.DEVNULL, check=False, timeout=args.hold + 240)
            report = json.loads(out.read_text())
        finally:
            if publisher is not None:
                os.killpg(publisher.pid, signal.SIGTERM)
                publisher.wait(10)
            server.stop()
    sv = report["server"]
    add_worker_cpu(sv)
    return {"label": label, "us_per_packet": sv.get("us_per_packet"), "core_pct": sv.get("core_pct"),
            "receiving": report["viewers"]["receiving"], "lost": report["sequence_window"]["lost"],
            "viewers": args.viewers, "packets": report["swarm"]["packets"],
            "pps_p50": report["per_viewer"]["packets_per_s"]["p50"], "failures": report["viewers"]["failures"],
            "server_drops": server_drops(sv.get("metrics") or []),
            "main_cpu_s": sv.get("main_cpu_s"), "worker_cpu_s": sv.get("worker_cpu_s")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkout", action="append", metavar="LABEL=DIR", help="default: this tree, as 'this'")
    ap.add_argument("--set", action="append", default=[], metavar="LABEL:SECTION.KEY=VALUE", dest="settings",
                    help="a server setting of the variant LABEL (repeatable; one run per variant and checkout)")
    ap.add_argument("--viewers", type=int, default=200)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--rate", type=float, default=50.0)
    ap.add_argument("--hold", type=float, default=30.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--kbps", type=int, default=1000)
    ap.add_argument("--nack", action="store_true")
    ap.add_argument("--srtp-verify-every", type=int, default=1,
                    help="passed to the swarm: unprotect every Nth packet only (a swarm sharing the server's "
                         "cores then takes less of them)")
    ap.add_argument("--plain-rtcp", action="store_true",
                    help="viewers send one RR+REMB a second (the swarm's default) instead of --browser-rtcp")
    ap.add_argument("--workers", type=int, action="append", default=[], metavar="N",
                    help="a variant with N egress worker processes (webrtc.egress_workers; repeatable)")
    ap.add_argument("--server-cpus", help="taskset list for the server (e.g. 0,1)")
    ap.add_argument("--swarm-cpus", help="taskset list for the swarm (e.g. 2-15)")
    args = ap.parse_args()
    checkouts = []
    for spec in args.checkout or [f"this={HERE.parent}"]:
        label, _, path = spec.partition("=")
        checkouts.append((label, Path(path).resolve()))
    variants = parse_variants(args.settings)
    for n in args.workers:
        variants[f"workers={n}"] = {**variants.get(f"workers={n}", {}), "RETURNFEED_WEBRTC__EGRESS_WORKERS": str(n)}
    variants = variants or {"": {}}
    runs = [(f"{label} {variant}".strip(), path, settings)
            for label, path in checkouts for variant, settings in variants.items()]
    with tempfile.TemporaryDirectory(prefix="rf-ab-clip-") as tmp:
        clip = Path(tmp) / "clip.ts"
        make_clip(clip, args.kbps, 20)
        results: list[dict] = []
        for round_ in range(args.rounds):
            for label, path, settings in runs:
                r = one_run(label, path, clip, args, settings)
                results.append(r)
                print(f"round {round_ + 1} {label}: {r['us_per_packet']:.2f} µs per packet-viewer, "
                      f"{r['core_pct']:.0f}% of a core, {r['receiving']}/{r['viewers']} viewers receiving, "
                      f"{r['lost']} lost, {r['packets']} packets in the window "
                      f"(median {r['pps_p50'] or 0:.0f}/s per viewer)"
                      + (f", failures {r['failures']}" if r["failures"] else "")
                      + (f", server drops {r['server_drops']}" if r["server_drops"] else "")
                      + (f" (CPU s: main {r['main_cpu_s']:.1f}, workers {r['worker_cpu_s']:.1f})"
                         if r.get("worker_cpu_s") else ""),
                      flush=True)
    print()
    for label, _, _ in runs:
        mine = [r for r in results if r["label"] == label and r["us_per_packet"]]
        values = [r["us_per_packet"] for r in mine]
        if values:
            print(f"{label}: median {statistics.median(values):.2f} µs per packet-viewer over {len(values)} runs "
                  f"({', '.join(f'{v:.2f}' for v in values)}), median {statistics.median(r['core_pct'] for r in mine):.0f}% "
                  f"of a core, lost {sum(r['lost'] for r in mine)} in all")


if __name__ == "__main__":
    main()
