"""Lip sync and glass-to-glass latency in Chromium: SRT in → WHEP out.

Usage::

    # a running server (see README.md "Preparing a server"); the probe
    # creates a production + stream + read link and deletes them afterwards
    python loadtests/lipsync_probe.py --api http://127.0.0.1:8080 \\
        --username admin --password "$RETURNFEED_ADMIN_PASSWORD" \\
        --audio opus --modes sync,video-first --seconds 20

Source: ffmpeg pre-encodes once a picture that is black except for one white
frame at every whole second (H.264, no B-frames, ``-tune zerolatency``) and
a 1 kHz beep starting at every whole second (Opus 20 ms, or AAC-LC: the
server then transcodes it). The probe demuxes that file and sends it over
SRT itself (libsrt, live mode, ``--srt-latency-ms``, 20 by default), one
PES per access unit, each at the earliest moment a live encoder with zero
encoding time could have produced it: a picture at its PTS, an Opus packet
when its 20 ms and libopus's 6.5 ms look-ahead have been captured, an AAC
frame when the two 1024-sample windows it depends on have. "Glass" is the
capture instant of the flash or the beep's first sample (the same media
time): start + (PTS − first PTS). Encoding time is thus excluded, every
buffering a live encoder cannot avoid is included.

Chromium (Playwright, system ``/usr/bin/chromium``) plays the WHEP stream
(``?sync=0`` in the video-first mode) in a ``<video>`` element with sound.
The page stamps, in ``performance.timeOrigin + performance.now()`` (Unix
ms, the same clock as this process's ``time.time()``):

* each flash: ``requestVideoFrameCallback`` → the frame drawn to a canvas
  is bright → ``metadata.expectedDisplayTime``;
* each beep: an AudioWorklet on the remote audio track finds the first
  loud sample after ≥ 300 ms of quiet; its context time is turned into the
  time it leaves the output with ``AudioContext.getOutputTimestamp()``.

Reported per mode: video and audio glass-to-glass (p50/p99), and the
audio − video offset per second (positive: the sound comes late).
Headless Chromium has no real display or sound card: "display" is its
compositor's expected display time and "output" its fake audio sink.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from latency_probe import MESSAGE, SrtTarget, provision  # noqa: E402
from media.mpegts.demux import TsDemuxer  # noqa: E402
from media.mpegts.events import AccessUnit  # noqa: E402
from media.mpegts.pes import PesHeader, packetize_pes  # noqa: E402
from media.mpegts.psi import (  # noqa: E402
    TAG_DVB_EXTENSION, TAG_REGISTRATION, Descriptor, Pat, Pmt, PmtTrack, StreamType, packetize_section,
)
from media.opus import wrap_ts_opus  # noqa: E402
from whep_client import percentile  # noqa: E402

VIDEO_PID, AUDIO_PID, PMT_PID = 0x100, 0x101, 0x1000
PTS_MASK = (1 << 33) - 1
AUD = b"\x00\x00\x00\x01\x09\xf0"
#: When a live encoder can have an audio access unit out, after its PTS (s).
AUDIO_READY_S = {"opus": 0.020 + 312 / 48000, "aac": 2048 / 48000}

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--autoplay-policy=no-user-gesture-required", "--disable-features=WebRtcHideLocalIpsWithMdns"]

WORKLET = """
class Onset extends AudioWorkletProcessor {
  constructor() { super(); this.quiet = 0; }
  process(inputs) {
    const ch = inputs[0] && inputs[0][0];
    if (!ch) return true;
    for (let i = 0; i < ch.length; i++) {
      if (Math.abs(ch[i]) > 0.2) {
        if (this.quiet > sampleRate * 0.3) this.port.postMessage(currentFrame + i);
        this.quiet = 0;
      } else this.quiet++;
    }
    return true;
  }
}
registerProcessor('onset', Onset);
"""

PLAY = """async ([url, token, worklet]) => {
  const pc = new RTCPeerConnection();
  pc.addTransceiver('video', {direction: 'recvonly'});
  pc.addTransceiver('audio', {direction: 'recvonly'});
  const v = document.createElement('video'); v.autoplay = true; v.playsInline = true;
  document.body.appendChild(v);
  const flashes = [], beeps = [], epoch = () => performance.timeOrigin;
  window._probe = {flashes, beeps, streamIds: []};
  const ctx = new AudioContext({latencyHint: 'interactive'});
  window._probe.ctx = ctx;
  await ctx.audioWorklet.addModule(URL.createObjectURL(new Blob([worklet], {type: 'text/javascript'})));
  const tracks = {};
  const canvas = document.createElement('canvas'); canvas.width = canvas.height = 8;
  const g = canvas.getContext('2d', {willReadFrequently: true});
  let bright = false;
  const onFrame = (now, meta) => {
    g.drawImage(v, 0, 0, 8, 8);
    const d = g.getImageData(0, 0, 8, 8).data;
    let sum = 0; for (let i = 0; i < d.length; i += 4) sum += d[i + 1];
    const lit = sum / 64 > 128;
    if (lit && !bright) flashes.push(epoch() + meta.expectedDisplayTime);
    bright = lit;
    v.requestVideoFrameCallback(onFrame);
  };
  pc.ontrack = (e) => {
    tracks[e.track.kind] = e.track;
    window._probe.streamIds.push(e.track.kind + ':' + (e.streams[0] ? e.streams[0].id : ''));
    if (!tracks.audio || !tracks.video) return;
    v.srcObject = new MediaStream([tracks.video, tracks.audio]);
    v.play().catch(() => {});
    v.requestVideoFrameCallback(onFrame);
    const src = ctx.createMediaStreamSource(new MediaStream([tracks.audio]));
    const det = new AudioWorkletNode(ctx, 'onset');
    det.port.onmessage = (m) => {
      const ts = ctx.getOutputTimestamp();
      beeps.push(epoch() + ts.performanceTime + (m.data / ctx.sampleRate - ts.contextTime) * 1000);
    };
    const mute = ctx.createGain(); mute.gain.value = 0;
    src.connect(det).connect(mute).connect(ctx.destination);
    ctx.resume();
  };
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise(r => { if (pc.iceGatheringState === 'complete') r();
    pc.onicegatheringstatechange = () => pc.iceGatheringState === 'complete' && r(); setTimeout(r, 2000); });
  const res = await fetch(url, {method: 'POST', body: pc.localDescription.sdp,
    headers: {'Content-Type': 'application/sdp', 'Authorization': 'Bearer ' + token}});
  if (res.status !== 201) return {status: res.status, body: await res.text()};
  await pc.setRemoteDescription({type: 'answer', sdp: await res.text()});
  window._pc = pc;
  return {status: 201, location: res.headers.get('Location')};
}"""

STATS = """async () => { const out = {}; (await window._pc.getStats()).forEach(r => {
  if (r.type === 'inbound-rtp') out[r.kind] = {jitterBufferDelay: r.jitterBufferDelay,
    jitterBufferEmittedCount: r.jitterBufferEmittedCount, jitterBufferTargetDelay: r.jitterBufferTargetDelay,
    jitterBufferMinimumDelay: r.jitterBufferMinimumDelay, framesDecoded: r.framesDecoded,
    packetsReceived: r.packetsReceived, packetsLost: r.packetsLost,
    estimatedPlayoutTimestamp: r.estimatedPlayoutTimestamp}; });
  return {stats: out, flashes: window._probe.flashes, beeps: window._probe.beeps,
          streamIds: window._probe.streamIds, outputLatency: window._probe.ctx.outputLatency,
          baseLatency: window._probe.ctx.baseLatency}; }"""


# --------------------------------------------------------------------------
# Source
# --------------------------------------------------------------------------


def encode_source(path: Path, seconds: int, audio: str, ffmpeg: str = "ffmpeg") -> None:
    video = ("color=c=black:s=640x360:r=25,"
             "drawbox=x=0:y=0:w=iw:h=ih:color=white:t=fill:enable='lt(mod(t\\,1)\\,0.04)'")
    beep = "aevalsrc='0.8*sin(2*PI*1000*t)*lt(mod(t\\,1)\\,0.1)':s=48000:c=stereo"
    codec = ["-c:a", "libopus", "-b:a", "64k", "-frame_duration", "20"] if audio == "opus" else \
        ["-c:a", "aac", "-b:a", "96k"]
    subprocess.run([ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
                    "-f", "lavfi", "-i", video, "-f", "lavfi", "-i", beep, "-t", str(seconds),
                    "-c:v", "libx264", "-pix_fmt", "yuv420p", "-tune", "zerolatency", "-bf", "0", "-g", "25",
                    "-b:v", "600k", *codec, "-f", "mpegts", str(path)], check=True)


def load_units(path: Path) -> list[AccessUnit]:
    demux = TsDemuxer()
    events = demux.feed(path.read_bytes(), 0.0) + demux.flush(0.0)
    return [e for e in events if isinstance(e, AccessUnit) and e.pts is not None]


class AvMuxer:
    """H.264 + one audio track, one PES per access unit (PCR on video)."""

    def __init__(self, audio: str) -> None:
        self.audio = audio
        self.cc = {0: 0, PMT_PID: 0, VIDEO_PID: 0, AUDIO_PID: 0}
        if audio == "opus":
            atrack = PmtTrack(AUDIO_PID, StreamType.PRIVATE_PES, "opus", (
                Descriptor(TAG_REGISTRATION, b"Opus"), Descriptor(TAG_DVB_EXTENSION, bytes((0x80, 2)))))
        else:
            atrack = PmtTrack(AUDIO_PID, StreamType.AAC_ADTS, "aac")
        self.pat = Pat(transport_stream_id=1, version=0, programs=((1, PMT_PID),)).serialize()
        self.pmt = Pmt(program_number=1, version=0, pcr_pid=VIDEO_PID,
                       tracks=(PmtTrack(VIDEO_PID, StreamType.H264, "h264"), atrack)).serialize()

    def _section(self, pid: int, section: bytes) -> list[bytes]:
        packets = packetize_section(pid, section, self.cc[pid])
        self.cc[pid] = (self.cc[pid] + len(packets)) & 15
        return packets

    def unit(self, u: AccessUnit) -> bytes:
        out: list[bytes] = []
        if u.codec == "h264":
            if u.keyframe:
                out += self._section(0, self.pat) + self._section(PMT_PID, self.pmt)
            pes = PesHeader(0xE0, pts=u.pts, data_alignment=True).serialize(None) + AUD + u.data
            packets, self.cc[VIDEO_PID] = packetize_pes(VIDEO_PID, pes, self.cc[VIDEO_PID],
                                                        pcr=((u.pts - 9000) & PTS_MASK) * 300,
                                                        random_access=u.keyframe)
        else:
            body = wrap_ts_opus(u.data) if self.audio == "opus" else u.data
            sid = 0xBD if self.audio == "opus" else 0xC0
            pes = PesHeader(sid, pts=u.pts, data_alignment=True).serialize(len(body)) + body
            packets, self.cc[AUDIO_PID] = packetize_pes(AUDIO_PID, pes, self.cc[AUDIO_PID])
        return b"".join(out + packets)


class Sender(threading.Thread):
    """Sends the units in real time over SRT; ``t0`` is the wall time of PTS ``pts0``."""

    def __init__(self, target: SrtTarget, units: list[AccessUnit], audio: str, latency_ms: int) -> None:
        super().__init__(name="lipsync-sender", daemon=True)
        self.target, self.audio, self.latency_ms = target, audio, latency_ms
        self.pts0 = min(u.pts for u in units if u.codec == "h264")
        ready = AUDIO_READY_S[audio]
        self.schedule = sorted(
            (((u.pts - self.pts0) / 90000 + (0.0 if u.codec == "h264" else ready)), i) for i, u in enumerate(units))
        self.units = units
        self.t0 = 0.0
        self.started = threading.Event()
        self.error: str | None = None
        self.late = 0

    def run(self) -> None:
        from media.srt.binding import SockOpt, SrtLibrary

        try:
            lib = SrtLibrary.open()
            sock = lib.create_socket()
            t = self.target
            lib.setsockflag(sock, SockOpt.LATENCY, self.latency_ms)
            if t.streamid:
                lib.setsockflag(sock, SockOpt.STREAMID, t.streamid)
            if t.passphrase:
                lib.setsockflag(sock, SockOpt.PASSPHRASE, t.passphrase)
                if t.pbkeylen:
                    lib.setsockflag(sock, SockOpt.PBKEYLEN, t.pbkeylen)
            lib.connect(sock, t.host, t.port)
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            self.started.set()
            return
        mux = AvMuxer(self.audio)
        self.t0 = time.time() + 0.2
        self.started.set()
        try:
            for due, i in self.schedule:
                wait = self.t0 + due - time.time()
                if wait > 0:
                    time.sleep(wait)
                elif wait < -0.005:
                    self.late += 1
                data = mux.unit(self.units[i])
                for off in range(0, len(data), MESSAGE):
                    lib.sendmsg(sock, data[off:off + MESSAGE])
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            lib.close_socket(sock)
            lib.close()


# --------------------------------------------------------------------------
# Browser and analysis
# --------------------------------------------------------------------------


async def watch(url: str, token: str, seconds: float) -> dict[str, Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            await page.goto(url.split("/whep/")[0] + "/healthz")
            r = await page.evaluate(PLAY, [url, token, WORKLET])
            if r["status"] != 201:
                raise RuntimeError(f"WHEP POST: {r}")
            # Chromium's own view of sync, once a second: the capture time
            # (NTP, through our sender reports) of what each track plays now.
            playout = []
            for _ in range(int(seconds)):
                await asyncio.sleep(1)
                st = (await page.evaluate(STATS))["stats"]
                a = st.get("audio", {}).get("estimatedPlayoutTimestamp")
                v = st.get("video", {}).get("estimatedPlayoutTimestamp")
                playout.append(round(v - a, 1) if a and v else None)
            result = await page.evaluate(STATS)
            result["playout"] = playout
            return result
        finally:
            await browser.close()


def glass_latencies(events_ms: list[float], t0: float, seconds: int, skip: int = 2) -> dict[int, float]:
    """Second index → seconds from that second's glass time to the event."""
    out: dict[int, float] = {}
    for ms in events_ms:
        t = ms / 1000.0 - t0
        k = int(t // 1)
        if skip <= k < seconds and k not in out and t - k < 0.9:
            out[k] = t - k
    return out


def summary(values: list[float]) -> dict[str, Any]:
    ms = [v * 1000 for v in values]
    return {"n": len(ms), "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99),
            "min_ms": min(ms) if ms else None, "max_ms": max(ms) if ms else None}


def run_mode(prov: Any, units: list[AccessUnit], audio: str, sync: bool, seconds: int,
             latency_ms: int) -> dict[str, Any]:
    sender = Sender(SrtTarget.parse(prov.srt_url), units, audio, latency_ms)
    sender.start()
    sender.started.wait(10)
    if sender.error:
        raise RuntimeError(sender.error)
    time.sleep(1.0)  # the stream goes live
    sep = "&" if "?" in prov.whep_url else "?"
    url = prov.whep_url + ("" if sync else f"{sep}sync=0")
    result = asyncio.run(watch(url, prov.token, seconds - 2.5))
    sender.join(seconds + 5)
    video = glass_latencies(result["flashes"], sender.t0, seconds)
    sound = glass_latencies(result["beeps"], sender.t0, seconds)
    both = sorted(set(video) & set(sound))
    stats = result["stats"]

    def jb(kind: str) -> float | None:
        s = stats.get(kind, {})
        n = s.get("jitterBufferEmittedCount") or 0
        return round(s["jitterBufferDelay"] / n * 1000, 1) if n else None

    return {
        "mode": "sync" if sync else "video-first", "audio_codec": audio, "stream_ids": result["streamIds"],
        "video_glass_to_glass": summary(list(video.values())),
        "audio_glass_to_glass": summary(list(sound.values())),
        "audio_minus_video": summary([sound[k] - video[k] for k in both]),
        "audio_minus_video_per_second_ms": [round((sound[k] - video[k]) * 1000, 1) for k in both],
        "video_per_second_ms": [round(video[k] * 1000, 1) for k in sorted(video)],
        # estimatedPlayoutTimestamp video − audio: > 0 when Chromium believes
        # the picture shows later media than the sound plays (sound late).
        "chromium_video_minus_audio_playout_ms": result["playout"],
        "audio_per_second_ms": [round(sound[k] * 1000, 1) for k in sorted(sound)],
        "webaudio_output_latency_ms": round((result["outputLatency"] or 0) * 1000, 1),
        "webaudio_base_latency_ms": round((result["baseLatency"] or 0) * 1000, 1),
        "jitter_buffer_ms": {"video": jb("video"), "audio": jb("audio")},
        "jitter_buffer_target_ms": {k: round(stats[k]["jitterBufferTargetDelay"]
                                             / max(stats[k]["jitterBufferEmittedCount"], 1) * 1000, 1)
                                    for k in ("video", "audio") if stats.get(k, {}).get("jitterBufferTargetDelay")},
        "sender_late_units": sender.late,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--api", required=True, help="server base URL")
    ap.add_argument("--username", default="admin")
    ap.add_argument("--password", required=True)
    ap.add_argument("--audio", choices=("opus", "aac"), default="opus")
    ap.add_argument("--modes", default="sync,video-first")
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--srt-latency-ms", type=int, default=20)
    ap.add_argument("--ffmpeg", default="ffmpeg")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "flash_beep.ts"
        encode_source(src, args.seconds, args.audio, args.ffmpeg)
        units = load_units(src)
        for mode in args.modes.split(","):
            prov = provision(args.api, args.username, args.password)
            try:
                results.append(run_mode(prov, units, args.audio, mode == "sync", args.seconds, args.srt_latency_ms))
            finally:
                prov.delete()
            print(json.dumps(results[-1], indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
