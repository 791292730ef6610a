"""Adaptive quality under a real shaped network: Chromium on /watch in a
network namespace, a two-layer simulcast SRT source (ReturnFeed issue 17,
"Tests (in CI)", network part).

One server, one ffmpeg source and one Chromium serve every scenario; each
scenario opens a fresh /watch page (a new WHEP session, starting on a clean
network on the high layer), then plays its phases::

    server (root ns) ── veth 10.213.x.1/30 ──► namespace rfn-q<pid>: Chromium
                         tbf (queue)            nft: policer, random drop

and records a timeline (tests/viewer_timeline.py): the page's getStats
every 250 ms (decoded height = the layer the viewer sees, freezes, frames),
the video element's frame callbacks (when each height was first presented),
the server's ``webrtc.layer_switch`` and probe decisions from its JSON log,
and the server's view of the viewer about once a second. Every rule of the
issue is evaluated on every scenario and all results are reported together,
with the timeline (also written to test-artifacts/viewer-network/), so a
failure says which rule broke and what happened around it. Two self-tests of
the harness run first: the shaping, with plain UDP, and the namespace's reach.

The namespace, veth pair, nft table and qdisc are removed when the module
ends, also after a failure (and leftovers of a crashed run at the start).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from helpers import (CHROMIUM, CHROMIUM_ARGS, ServerProcess, http, launched_chromium, login, metrics_url, stop_process,
                     track_pcs_script, wait_until, watch_url)
from netns import CLEAN, Shaping, ViewerNetwork, module_network
from viewer_timeline import Phase, Probe, Sample, ServerView, Switch, Timeline

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "viewer-network"
ADMIN_PASSWORD = "admin-password-1"
STREAM = "netcam"
HIGH, LOW = 720, 180
SAMPLE_EVERY_S = 0.25
SERVER_VIEW_EVERY_S = 1.0
# Measured here: Chromium receives ≈ 150 kbit/s of video payload on the low
# layer, ≈ 2.3 Mbit/s on the high one; with Opus audio, RTCP, RTP/SRTP/UDP/IP
# headers and the server's probes ≈ 260 kbit/s crossed the veth while the
# viewer was on low. A 320 kbit/s queue "just fits" the low layer.
LOW_FITS_KBIT = 320


@dataclass(frozen=True, slots=True)
class Step:
    seconds: float
    shaping: Shaping


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    steps: tuple[Step, ...]


BASELINE_S = 8.0
SCENARIOS = [
    # clean → 400 kbit/s policer → clean
    Scenario("policer", (Step(BASELINE_S, CLEAN), Step(40, Shaping(police_kbit=400)), Step(15, CLEAN))),
    # 8 % random loss (no rate limit)
    Scenario("loss8", (Step(BASELINE_S, CLEAN), Step(30, Shaping(loss_pct=8)), Step(15, CLEAN))),
    # a queue that just fits the low layer
    Scenario("fits-low", (Step(BASELINE_S, CLEAN), Step(35, Shaping(queue_kbit=LOW_FITS_KBIT)), Step(15, CLEAN))),
    # a 400 kbit/s queue, then clean for 60 s
    Scenario("queue-then-clean", (Step(BASELINE_S, CLEAN), Step(20, Shaping(queue_kbit=400)), Step(60, CLEAN))),
]

# Keep every RTCPeerConnection the page makes (the watch page's player owns
# its own; a reconnect makes a new one), so the test can read getStats
# itself, more often than the page's own once-a-second overlay; and note, from
# the video element's frame callbacks, when each new picture height was first
# presented (frame-exact, where sampling getStats is up to 250 ms late).
TRACK_PAGE = track_pcs_script() + """
(() => {
  window.__rfnShown = [];
  const watch = () => {
    const v = document.querySelector('video');
    if (!v || !v.requestVideoFrameCallback) { setTimeout(watch, 50); return; }
    let last = 0;
    const onFrame = (now, meta) => {
      if (meta.height !== last) { last = meta.height; window.__rfnShown.push([now, meta.height]); }
      v.requestVideoFrameCallback(onFrame);
    };
    v.requestVideoFrameCallback(onFrame);
  };
  document.addEventListener('DOMContentLoaded', watch);
})();"""

VIDEO_STATS = """async (shownFrom) => {
  const pcs = (window.__rfnPcs || []).filter(pc => pc.connectionState !== 'closed');
  const pc = pcs[pcs.length - 1];
  if (!pc) return null;
  let out = null;
  (await pc.getStats()).forEach(r => {
    if (r.type === 'inbound-rtp' && r.kind === 'video') out = {
      height: r.frameHeight || 0, framesDecoded: r.framesDecoded || 0, keyFramesDecoded: r.keyFramesDecoded || 0,
      freezeCount: r.freezeCount || 0, totalFreezesDuration: r.totalFreezesDuration || 0,
      packetsLost: r.packetsLost || 0, packetsReceived: r.packetsReceived || 0, nackCount: r.nackCount || 0,
      retransmittedBytesReceived: r.retransmittedBytesReceived || 0, bytesReceived: r.bytesReceived || 0};
  });
  return out ? {...out, pcs: window.__rfnPcs.length, shown: window.__rfnShown.slice(shownFrom),
                perfNow: performance.now()} : null;
}"""


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def viewer_net() -> Iterator[ViewerNetwork]:
    with module_network(ViewerNetwork.for_this_process()) as net:
        yield net


@pytest.fixture(scope="module")
def stack(viewer_net: ViewerNetwork, e2e_db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """Server (JSON logs, all addresses), a live two-layer stream, a read link."""
    srv = ServerProcess(tmp_path_factory.mktemp("srv"), env={
        "DATABASE_URL": e2e_db_url, "RETURNFEED_ADMIN_PASSWORD": ADMIN_PASSWORD, "RETURNFEED_LOG__FORMAT": "json"})
    srv.start()
    source: subprocess.Popen | None = None
    try:
        base = f"http://{viewer_net.host_addr}:{srv.port}"
        token = login(srv.url, "admin", ADMIN_PASSWORD)["access_token"]
        http("POST", f"{srv.url}/api/v1/productions", {"name": "Network"}, token=token)
        r = http("POST", f"{srv.url}/api/v1/streams", {"name": STREAM, "production": "Network"}, token=token)
        assert r.status == 201, r.body
        source_log = srv.data_dir / "ffmpeg.log"
        source = publish_two_layers(srv.srt_port, r.json()["passphrase"], source_log)

        def two_layers() -> bool:
            body = http("GET", f"{srv.url}/api/v1/streams/{STREAM}", token=token).json()
            return body.get("live") and len(body.get("layers", [])) == 2

        try:
            wait_until(two_layers, timeout=30, interval=0.25)
        except AssertionError:
            pytest.fail(f"the two-layer SRT source did not go live in 30 s: {source_log.read_text()[-2000:]}")
        # The read link is made through the veth address so its watch_url points there.
        yield {"server": srv, "base": base, "token": token, "watch_url": watch_url(base, STREAM, token)}
    finally:
        if source is not None:
            stop_process(source)
        srv.stop()


def publish_two_layers(srt_port: int, passphrase: str, log: Path) -> subprocess.Popen:
    """Real ffmpeg + libx264: 720p ≈ 2.5 Mbit/s ('high') and 180p ≈ 150
    kbit/s ('low') as two H.264 PIDs in one TS, 1 s GOP, no B-frames, AAC."""
    url = (f"srt://127.0.0.1:{srt_port}?streamid=publish:{STREAM}&passphrase={passphrase}&pbkeylen=16"
           "&latency=120000")
    cmd = ["ffmpeg", "-nostdin", "-loglevel", "error", "-re",
           "-f", "lavfi", "-i", "testsrc2=size=1280x720:rate=25",
           "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000", "-t", "1800",
           "-filter_complex", "[0:v]split=2[hi][lo0];[lo0]scale=320:180[lo]",
           "-map", "[hi]", "-map", "[lo]", "-map", "1:a",
           "-c:v", "libx264", "-pix_fmt", "yuv420p", "-profile:v", "baseline", "-preset", "ultrafast",
           "-tune", "zerolatency", "-bf", "0", "-g", "25", "-keyint_min", "25", "-sc_threshold", "0",
           "-b:v:0", "2500k", "-maxrate:v:0", "2500k", "-bufsize:v:0", "1250k",
           "-b:v:1", "150k", "-maxrate:v:1", "150k", "-bufsize:v:1", "75k",
           "-c:a", "aac", "-b:a", "64k", "-f", "mpegts", url]
    # Errors to a file: a pipe nobody reads could fill and stall the source.
    with log.open("wb") as err:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)


@pytest.fixture(scope="module")
def ns_browser(viewer_net: ViewerNetwork, stack: dict) -> Iterator[Any]:
    """Chromium inside the namespace (launched through ``ip netns exec``;
    Playwright drives it over a pipe)."""
    # The page is served over plain HTTP from the veth address; treat that
    # origin as secure, as localhost would be.
    with launched_chromium([*CHROMIUM_ARGS, f"--unsafely-treat-insecure-origin-as-secure={stack['base']}"],
                           wrap=lambda d: viewer_net.wrapper(d, CHROMIUM)) as browser:
        yield browser


# ---------------------------------------------------------------- recording

class Recorder:
    """Plays one scenario's steps and records the timeline."""

    def __init__(self, net: ViewerNetwork, stack: dict, page: Any) -> None:
        self.net = net
        self.stack = stack
        self.page = page
        self.server: ServerProcess = stack["server"]
        self.log_from = len(self.server.output)
        self.wall_minus_mono = time.time() - time.monotonic()
        self.timeline = Timeline(high=HIGH, low=LOW)
        self.raw: list[dict] = []
        self.drops: list[str] = []  # per constrained phase, read before the rules are replaced
        self.carried: list[str] = []  # what crossed the veth in each phase
        self._next_view = 0.0

    # -- server side -----------------------------------------------------------------

    def events(self, name: str) -> list[dict]:
        out = []
        for line in self.server.output[self.log_from:]:
            if name not in line or not line.startswith("{"):
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if ev.get("event") == name:
                out.append(ev)
        return out

    def mono(self, ts: str) -> float:
        wall = dt.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.timezone.utc).timestamp()
        return wall - self.wall_minus_mono

    def sessions(self) -> list[str]:
        return [ev["session"] for ev in self.events("webrtc.viewer_started") if ev.get("stream") == STREAM]

    def view_server(self, now: float) -> None:
        if now < self._next_view:
            return
        self._next_view = now + SERVER_VIEW_EVERY_S
        sessions = self.sessions()
        if not sessions:
            return
        # The per-viewer view a director gets (layer, loss, RTT, estimate,
        # retransmissions) where the server has it, else the WHEP session's.
        token = self.stack["token"]
        r = http("GET", f"{self.server.url}/api/v1/streams/{STREAM}/viewers", token=token, timeout=5)
        mine = [v for v in r.json().get("viewers", []) if v.get("id") == sessions[-1]] if r.status == 200 else []
        if mine:
            fields = mine[0]
        else:
            r = http("GET", f"{self.server.url}/whep/{STREAM}/{sessions[-1]}", token=token, timeout=5)
            if r.status != 200:
                return
            fields = r.json()
        # The stream's WebRTC counters: the viewer's own while it is the
        # stream's only viewer (one scenario at a time).
        metrics = http("GET", metrics_url(self.server.url), timeout=5)
        if metrics.status == 200:
            fields["stream_metrics"] = {
                name: float(value) for name, _, value in (
                    line.partition(" ") for line in metrics.body.decode().splitlines()
                    if line.startswith("returnfeed_webrtc_") and "{" not in line)}
        self.timeline.server.append(ServerView(time.monotonic(), fields))

    def collect_server_log(self) -> None:
        mine = set(self.sessions())
        for event in ("webrtc.probe_started", "webrtc.probe_failed"):
            for ev in self.events(event):
                if ev.get("session") in mine:
                    detail = ", ".join(f"{k} {ev[k]}" for k in ("to", "reasons", "loss", "rtt", "bandwidth",
                                                                "base_bps", "target_bps", "probe_bytes") if k in ev)
                    self.timeline.probes.append(Probe(self.mono(ev["ts"]), event.rsplit("_", 1)[1], detail,
                                                      ev.get("bandwidth")))
        for ev in self.events("webrtc.layer_switch"):
            if ev.get("session") in mine:
                self.timeline.switches.append(Switch(
                    self.mono(ev["ts"]), str(ev.get("from")), str(ev.get("to")), tuple(ev.get("reasons") or ()),
                    ev.get("loss"), ev.get("rtt"), ev.get("bandwidth")))

    # -- page side -------------------------------------------------------------------

    def sample(self) -> Sample | None:
        st = self.page.evaluate(VIDEO_STATS, len(self.timeline.shown))
        now = time.monotonic()
        if not st:
            return None
        self.raw.append({"t": now, **st})
        # performance.now() → this clock: the page read it a moment before
        # the answer came back (a few ms).
        for at_ms, height in st["shown"]:
            self.timeline.shown.append((now - (st["perfNow"] - at_ms) / 1000.0, height))
        s = Sample(now, st["height"], st["framesDecoded"], st["keyFramesDecoded"], st["freezeCount"],
                   st["totalFreezesDuration"], st["packetsLost"], st["packetsReceived"], st["nackCount"],
                   st["retransmittedBytesReceived"], st["bytesReceived"])
        self.timeline.samples.append(s)
        return s

    def run_for(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (now := time.monotonic()) < end:
            self.sample()
            self.view_server(now)
            time.sleep(max(0.0, min(SAMPLE_EVERY_S - (time.monotonic() - now), end - time.monotonic())))

    def wait_high(self, timeout: float) -> bool:
        """Until the page decodes the high layer and frames keep coming."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            s = self.sample()
            self.view_server(time.monotonic())
            if s is not None and s.height == HIGH and s.frames_decoded > 25:
                return True
            time.sleep(SAMPLE_EVERY_S)
        return False

    def play(self, steps: tuple[Step, ...]) -> None:
        for step in steps:
            self.net.shape(step.shaping)
            start, sent = time.monotonic(), self.net.tx_bytes()
            self.run_for(step.seconds)
            s = step.shaping
            rate = (self.net.tx_bytes() - sent) * 8 / (time.monotonic() - start) / 1000
            self.carried.append(f"{s.describe()} {rate:.0f} kbit/s")
            if not s.clean:
                self.drops.append(f"{s.describe()}: {self.net.drops()}")
            capacity = next((k * 1000.0 for k in (s.police_kbit, s.queue_kbit) if k is not None), None)
            self.timeline.phases.append(Phase(start, time.monotonic(), s.describe(), s.clean, capacity))
        self.net.shape(CLEAN)


def report(scenario: Scenario, rec: Recorder, origin: float, checks: list[Any]) -> str:
    lines = [f"scenario {scenario.name}: " + " → ".join(f"{s.shaping.describe()} {s.seconds:g} s"
                                                      for s in scenario.steps)]
    lines += [f"  [{'PASS' if c.ok else 'FAIL'}] {c.name}: {c.detail}" for c in checks]
    lines.append(f"  sessions {rec.sessions()}; packets dropped by {'; '.join(rec.drops) or 'nothing'}")
    probes = rec.timeline.probes
    lines.append(f"  probes: {sum(p.event == 'started' for p in probes)} started, "
                 f"{sum(p.event == 'failed' for p in probes)} failed")
    lines.append(f"  crossed the veth (after the queue, before the nft rules): {'; '.join(rec.carried)}")
    lines.append("  timeline:")
    lines += ["    " + line for line in rec.timeline.story(origin)]
    return "\n".join(lines)


def save(scenario: Scenario, rec: Recorder, origin: float, text: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    tl = rec.timeline
    data = {"scenario": scenario.name, "origin": origin, "phases": [asdict(p) for p in tl.phases],
            "switches": [asdict(s) for s in tl.switches],
            "probes": [asdict(p) for p in tl.probes], "shown": tl.shown, "server": [asdict(v) for v in tl.server],
            "page": rec.raw}
    (ARTIFACTS / f"{scenario.name}.json").write_text(json.dumps(data, indent=1, default=str))
    (ARTIFACTS / f"{scenario.name}.txt").write_text(text + "\n")


# ---------------------------------------------------------------- tests

# Counts UDP datagrams until the sender has been quiet for 1.5 s.
RECEIVER = """
import json, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
s.bind((sys.argv[1], int(sys.argv[2])))
s.settimeout(1.5)
print("ready", flush=True)
n = size = 0
try:
    while True:
        size += len(s.recv(65536))
        n += 1
except socket.timeout:
    pass
print(json.dumps({"packets": n, "bytes": size}), flush=True)
"""
UDP_SEGMENT = 103  # linux/udp.h: the option the server's FastPath sends batches with


def blast(net: ViewerNetwork, shaping: Shaping, *, seconds: float = 2.0, kbit: int = 4000) -> dict[str, int]:
    """Send 1,200-byte datagrams in GSO batches of five (as the server sends a
    frame's fragments) at ``kbit`` for ``seconds`` into the namespace under
    ``shaping``; return what was sent, received and counted as dropped."""
    import socket
    import struct

    net.shape(shaping)
    port = 40000 + os.getpid() % 20000
    rx = subprocess.Popen(["ip", "netns", "exec", net.namespace, sys.executable, "-c", RECEIVER, net.ns_addr, str(port)],
                          stdout=subprocess.PIPE, text=True)
    try:
        assert rx.stdout is not None and rx.stdout.readline().strip() == "ready"
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        batch, sent = b"\0" * 1200 * 5, 0
        every = len(batch) * 8 / (kbit * 1000)
        start = time.monotonic()
        while (elapsed := time.monotonic() - start) < seconds:
            tx.sendmsg([batch], [(socket.SOL_UDP, UDP_SEGMENT, struct.pack("H", 1200))], 0, (net.ns_addr, port))
            sent += 5
            time.sleep(max(0.0, sent / 5 * every - elapsed))
        tx.close()
        received = json.loads(rx.stdout.readline())
    finally:
        rx.kill()
        rx.wait(10)
    drops = net.drops()
    net.shape(CLEAN)
    return {"sent": sent, **received, "dropped": sum(drops.values())}


def test_shaping_does_what_it_says(viewer_net: ViewerNetwork) -> None:
    """The harness itself, with plain UDP: each impairment acts per packet
    (GSO batches are split before the rules see them) and at its rate."""
    clean = blast(viewer_net, CLEAN)
    assert clean["packets"] == clean["sent"], clean
    loss = blast(viewer_net, Shaping(loss_pct=8))
    # Counted per packet: a GSO batch counted once would leave 4 of every 5
    # dropped packets out of the counter.
    assert loss["packets"] + loss["dropped"] == loss["sent"], loss
    assert 0.04 < loss["dropped"] / loss["sent"] < 0.12, loss  # ~1,650 packets: 8 % ± 4 standard deviations
    # 2 s at 400 kbit/s = 100 kB; the policer's bucket adds one second of its
    # rate (50 kB), the tbf its queue (200 ms = 10 kB) and burst (3 kB).
    for shaping, expected in ((Shaping(police_kbit=400), 150_000), (Shaping(queue_kbit=400), 113_000)):
        limited = blast(viewer_net, shaping)
        assert 0.85 * expected < limited["bytes"] < 1.1 * expected, (shaping, limited)
        assert limited["packets"] + limited["dropped"] == limited["sent"], (shaping, limited)


def test_namespace_is_reachable_only_through_its_veth(viewer_net: ViewerNetwork, stack: dict) -> None:
    """The harness itself: the server answers at the host-side veth address
    from inside the namespace, and the namespace has no other way out."""
    probe = ["ip", "netns", "exec", viewer_net.namespace, "python3", "-c",
             "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=5).status)",
             f"{stack['base']}/healthz"]
    assert subprocess.run(probe, capture_output=True, text=True, timeout=20).stdout.strip() == "200"
    routes = subprocess.run(["ip", "-n", viewer_net.namespace, "route"], capture_output=True, text=True).stdout
    assert "default" not in routes and viewer_net.subnet in routes, routes


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_adaptive_quality_under_shaped_network(scenario: Scenario, viewer_net: ViewerNetwork, stack: dict,
                                               ns_browser: Any) -> None:
    ctx = ns_browser.new_context(viewport={"width": 1280, "height": 720})
    try:
        ctx.add_init_script(TRACK_PAGE)
        page = ctx.new_page()
        rec = Recorder(viewer_net, stack, page)
        origin = time.monotonic()
        viewer_net.shape(CLEAN)
        page.goto(stack["watch_url"])
        if not rec.wait_high(25):
            rec.collect_server_log()
            pytest.fail("BASELINE: the viewer did not reach the high layer within 25 s on a clean network\n"
                        + "\n".join(rec.timeline.story(origin)), pytrace=False)
        rec.play(scenario.steps)
        rec.collect_server_log()
    finally:
        viewer_net.shape(CLEAN)
        ctx.close()
    checks = rec.timeline.checks()
    text = report(scenario, rec, origin, checks)
    print(text)
    save(scenario, rec, origin, text)
    failed = [c for c in checks if not c.ok]
    if failed:
        pytest.fail(f"{len(failed)} of {len(checks)} rules broken\n{text}", pytrace=False)
