"""Layer switching on a simulcast SRT source, driven by a viewer's RTCP.

The viewer is the light WHEP client from loadtests/ (ICE/DTLS/SRTP like a
browser, its own RR/REMB). Loss is induced by dropping a share of the
video packets before the viewer counts them, so its receiver reports carry
real loss; the server must move it to the low layer at an IDR, keep the
sequence numbers on the viewer's SSRC continuous, and move it back up once
the network is clean again (5 s cooldown).
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from pathlib import Path

import pytest

from helpers import ffmpeg_publish, http, login, metrics_url, stop_process, wait_until
from media.h264 import Sps
from media.rtp.packet import payload_bounds, peek_header

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent / "loadtests"))
from whep_client import WhepViewer  # noqa: E402

pytestmark = pytest.mark.integration


def _sps_width(payload: bytes) -> int | None:
    """Width from an SPS at the start of an RTP payload (single NAL or STAP-A)."""
    t = payload[0] & 0x1F
    if t == 7:
        return Sps.parse(payload).width
    if t == 24:  # STAP-A: [hdr][len16][nal]...
        p = 1
        while p + 2 < len(payload):
            n = int.from_bytes(payload[p:p + 2], "big")
            nal = payload[p + 2:p + 2 + n]
            if nal and nal[0] & 0x1F == 7:
                return Sps.parse(nal).width
            p += 2 + n
    return None


def test_switch_down_on_loss_at_idr_and_back_up(api_server) -> None:
    base = api_server.url
    admin = login(base, "admin", api_server.admin_password)["access_token"]
    http("POST", f"{base}/api/v1/productions", {"name": "Layers"}, token=admin)
    r = http("POST", f"{base}/api/v1/streams", {"name": "sim", "production": "Layers"}, token=admin)
    assert r.status == 201
    s = r.json()
    url = f"srt://127.0.0.1:{api_server.srt_port}?streamid=publish:sim&passphrase={s['passphrase']}&pbkeylen=16"
    proc = ffmpeg_publish(url, seconds=90, size="640x360", fps=25, audio="none", extra=[
        "-filter_complex", "[0:v]split=2[hi][lo0];[lo0]scale=320:180[lo]", "-map", "[hi]", "-map", "[lo]"])
    try:
        wait_until(lambda: len(http("GET", f"{base}/api/v1/streams/sim", token=admin).json().get("layers", [])) == 2,
                   timeout=20)
        out = asyncio.run(_watch(base, admin))
    finally:
        stop_process(proc)

    seqs, widths, layers = out["seqs"], out["widths"], out["layers"]
    # Sequence numbers on the viewer's video SSRC: strictly +1, across both switches.
    assert all(((b - a) & 0xFFFF) == 1 for a, b in zip(seqs, seqs[1:])), "gap or reorder on the viewer SSRC"
    # Resolution changes happen only at a packet carrying an SPS (the IDR of the target layer).
    changes = [(i, w) for i, w in enumerate(widths) if w is not None]
    sizes = [w for _, w in changes]
    assert 640 in sizes and 320 in sizes
    first_low = next(i for i, w in changes if w == 320)
    assert widths[first_low] == 320  # the first low-layer packet is a keyframe start with its SPS
    assert sizes.index(320) > 0 and 640 in sizes[sizes.index(320):], sizes  # high → low → high
    assert layers[0] == "high" and "low" in layers and layers[-1] == "high", layers
    m = http("GET", metrics_url(base)).body.decode()
    assert 'returnfeed_webrtc_layer_switches_total{from="high",stream="sim",to="low"}' in m
    assert 'returnfeed_webrtc_layer_switches_total{from="low",stream="sim",to="high"}' in m


async def _watch(base: str, token: str) -> dict:
    v = WhepViewer(f"{base}/whep/sim", token=token, remb_bps=10_000_000, loopback_only=False)
    counter = v.stats.counter
    orig = counter.on_rtp
    seqs: list[int] = []
    widths: list[int | None] = []
    drop = {"p": 0.0}
    rng = random.Random(7)

    def on_rtp(data: bytes, now: int, trailer: int = 0) -> None:
        try:
            _m, pt, seq, _ts, _ssrc = peek_header(data)
        except Exception:
            return orig(data, now, trailer)
        kind = counter.payload_types.get(pt, ("",))[0]
        if kind == "video":
            start, end = payload_bounds(data)
            seqs.append(seq)
            widths.append(_sps_width(data[start:end]) if end > start else None)
            if drop["p"] and rng.random() < drop["p"]:
                return None  # "lost on the network": the viewer's RR reports it
        return orig(data, now, trailer)

    counter.on_rtp = on_rtp
    layers = []
    await v.connect()
    try:
        loc = v.stats.location if hasattr(v.stats, "location") else None
        session_url = loc

        async def layer() -> str | None:
            if session_url is None:
                return None
            r = await asyncio.to_thread(http, "GET", session_url, None, token=token)
            return r.json().get("layer") if r.status == 200 else None

        await asyncio.sleep(3)
        layers.append(await layer())
        drop["p"] = 0.15
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and (await layer()) != "low":
            await asyncio.sleep(0.5)
        layers.append(await layer())
        drop["p"] = 0.0
        await asyncio.sleep(3)
        deadline = time.monotonic() + 25
        while time.monotonic() < deadline and (await layer()) != "high":
            await asyncio.sleep(0.5)
        await asyncio.sleep(2)
        layers.append(await layer())
    finally:
        await v.close()
    return {"seqs": seqs, "widths": widths, "layers": layers}
