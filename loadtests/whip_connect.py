"""WHIP connect time by DTLS role: ffmpeg 9 (both modes) and Chromium.

An A/B in one sitting of the answerer's DTLS role choice, with the server's
WHIP answer path reduced to what decides it: an aiortc peer connection that
answers the offer (receive-only), either as aiortc answers by itself
(``aiortc``: ``a=setup:active`` to every ``actpass`` offer, OpenSSL's 1 s
first retransmission) or with ReturnFeed's
:func:`media.webrtc.aiortc_adapter.choose_dtls_role` (``returnfeed``).
Publishers, alternating per round:

* ffmpeg n9.0.2's WHIP muxer (``imageio_ffmpeg.get_ffmpeg_exe()``), default
  mode (offers ``a=setup:passive``) and ``-whip_flags dtls_active``
  (offers ``a=setup:active``): the figures are ffmpeg's own
  (``Muxer state=10 … elapsed=…(…ice:…,dtls:…)``);
* Chromium (system ``/usr/bin/chromium`` through Playwright) with a fake
  camera, offering ``actpass``: time from ``setRemoteDescription(answer)`` to
  ``connectionState == "connected"``.

    .venv/bin/python loadtests/whip_connect.py --rounds 10 [--no-chromium] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiohttp import web  # noqa: E402
from aiortc import RTCPeerConnection, RTCSessionDescription  # noqa: E402

from media.webrtc import aiortc_adapter as adapter  # noqa: E402

MUXER = re.compile(r"Muxer state=10,.*elapsed=([\d.]+)ms\(.*ice:([\d.]+),dtls:([\d.]+)")
CHROMIUM_PUBLISH = """async (url) => {
  const media = await navigator.mediaDevices.getUserMedia({video: {width: 320, height: 240}});
  const pc = new RTCPeerConnection();
  pc.addTransceiver(media.getVideoTracks()[0], {direction: 'sendonly'});
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise(r => { if (pc.iceGatheringState === 'complete') r();
    pc.onicegatheringstatechange = () => pc.iceGatheringState === 'complete' && r(); setTimeout(r, 1000); });
  const res = await fetch(url, {method: 'POST', body: pc.localDescription.sdp,
                                headers: {'Content-Type': 'application/sdp'}});
  const answer = await res.text();
  const t0 = performance.now();
  const connected = new Promise(r => { pc.onconnectionstatechange = () =>
    pc.connectionState === 'connected' && r(performance.now() - t0); });
  await pc.setRemoteDescription({type: 'answer', sdp: answer});
  const ms = await Promise.race([connected, new Promise(r => setTimeout(() => r(-1), 10000))]);
  pc.close(); media.getTracks().forEach(t => t.stop());
  return ms; }"""


class Answerer:
    """Answers WHIP offers with one aiortc peer connection each."""

    def __init__(self) -> None:
        self.mode = "returnfeed"
        self.pcs: list[RTCPeerConnection] = []

    async def post(self, request: web.Request) -> web.Response:
        pc = RTCPeerConnection()
        self.pcs.append(pc)
        pc.addTransceiver("video", direction="recvonly")
        if "m=audio" in (offer := await request.text()):
            pc.addTransceiver("audio", direction="recvonly")
        await pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
        if self.mode == "returnfeed":
            adapter.choose_dtls_role(pc)
        await pc.setLocalDescription(await pc.createAnswer())
        return web.Response(status=201, text=pc.localDescription.sdp, content_type="application/sdp",
                            headers={"Location": f"/whip/x/{len(self.pcs)}"})

    async def delete(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def close_all(self) -> None:
        await asyncio.gather(*(pc.close() for pc in self.pcs), return_exceptions=True)
        self.pcs.clear()


async def ffmpeg_round(exe: str, url: str, active: bool) -> dict[str, float] | None:
    cmd = [exe, "-nostdin", "-hide_banner", "-loglevel", "info", "-re", "-f", "lavfi", "-i",
           "testsrc=size=160x120:rate=25", "-t", "0.5", "-pix_fmt", "yuv420p", "-c:v", "libx264",
           "-preset", "ultrafast", "-tune", "zerolatency",
           *(["-whip_flags", "dtls_active"] if active else []), "-f", "whip", url]
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, err = await proc.communicate()
    m = MUXER.search(err.decode(errors="replace"))
    return None if m is None else {"total": float(m[1]), "ice": float(m[2]), "dtls": float(m[3])}


def summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    return {"n": len(values), "median": round(statistics.median(values), 1),
            "p90": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 1), "max": round(max(values), 1)}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--no-chromium", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    import imageio_ffmpeg

    exe = imageio_ffmpeg.get_ffmpeg_exe()
    answerer = Answerer()
    app = web.Application()
    app.router.add_post("/whip/x", answerer.post)
    app.router.add_delete("/whip/x/{n}", answerer.delete)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/whip/x"
    results: dict[str, dict[str, list[float]]] = {}
    browser = playwright = page = None
    if not args.no_chromium:
        from playwright.async_api import async_playwright

        playwright = await async_playwright().start()
        browser = await playwright.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--no-sandbox", "--disable-gpu", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            "--disable-features=WebRtcHideLocalIpsWithMdns"])
        page = await browser.new_page()
        await page.goto(url.rsplit("/whip/", 1)[0] + "/")
    try:
        for _ in range(args.rounds):
            for mode in ("aiortc", "returnfeed"):
                answerer.mode = mode
                for active in (False, True):
                    r = await ffmpeg_round(exe, url, active)
                    key = f"ffmpeg {'dtls_active' if active else 'default'}"
                    bucket = results.setdefault(f"{mode}: {key}", {"dtls": [], "total": [], "failed": []})
                    if r is None:
                        bucket["failed"].append(1.0)
                    else:
                        bucket["dtls"].append(r["dtls"])
                        bucket["total"].append(r["total"])
                if page is not None:
                    ms = await page.evaluate(CHROMIUM_PUBLISH, url)
                    bucket = results.setdefault(f"{mode}: chromium", {"connect": [], "failed": []})
                    (bucket["connect"] if ms >= 0 else bucket["failed"]).append(max(ms, 0.0))
                await answerer.close_all()
    finally:
        if browser is not None:
            await browser.close()
        if playwright is not None:
            await playwright.stop()
        await runner.cleanup()
    report = {name: {k: summary(v) if k != "failed" else len(v) for k, v in b.items()} for name, b in results.items()}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for name, b in report.items():
        print(f"{name:38s} " + "  ".join(f"{k}={v}" for k, v in b.items()))


if __name__ == "__main__":
    asyncio.run(main())
