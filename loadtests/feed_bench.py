"""The packet feed's cost (issue 15): a stream's packet events from the
ingest process to one egress worker process, in µs of CPU per packet.

A 1.15 Mbit/s H.264 stream at 30 fps (2 s GOP: a ~40-packet keyframe, then
4-5 packets a frame) and 48 kbit/s Opus (one ~130-byte packet every 20 ms)
are replayed at ``--speed`` × real time from this process to a second
process (spawned with this script) over each transport:

* ``event``  — the product (media/webrtc/feed.py): one SOCK_SEQPACKET
  message per PacketsEvent, ``FeedSender.send`` → ``FeedReceiver`` on an
  asyncio loop;
* ``packet`` — one ``sendmsg`` per packet (its own header + the payload,
  gathered) on the same socket and receiver;
* ``shm``    — a single-producer single-consumer ring in
  ``multiprocessing.shared_memory`` holding the same messages, with an
  eventfd doorbell rung only when the consumer said it is going to sleep.

Each event is sent alone and followed by a pause (the frame interval ÷
speed), so the worker wakes per frame as it would live, and pays its loop's
wake-up, not only the copy. CPU is each side's thread CPU time
(``time.thread_time``: sleeping and waiting cost nothing), so a shared
machine's other load does not enter it. The receiver also reports the
hand-off latency (send → decoded, monotonic clock, same in both processes).
The figures of one sitting are in loadtests/README.md, "Packet feed".

    .venv/bin/python loadtests/feed_bench.py [--media-seconds 60] [--speed 10] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import replace
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from media.rtp.packet import LayerPacket  # noqa: E402
from media.rtp.rewrite import MediaAnchor  # noqa: E402
from media.webrtc import feed  # noqa: E402
from media.webrtc.fanout import AUDIO_LAYER, EndedEvent, PacketsEvent  # noqa: E402

END = "bench-end"
FPS = 30
VIDEO_BPS = 1_150_000
GOP_S = 2.0
KEYFRAME_BYTES = 40 * 1200
OPUS_BYTES = 130
MAX_PAYLOAD = 1200


# -- the workload ---------------------------------------------------------------------


def workload(media_seconds: float, seed: int = 15) -> list[tuple[float, PacketsEvent]]:
    """(media time, event) in media-time order: what a StreamPacketizer emits
    for the stream described in the module docstring."""
    rng = random.Random(seed)
    delta_bytes = (VIDEO_BPS / 8 * GOP_S - KEYFRAME_BYTES) / (FPS * GOP_S - 1)
    out: list[tuple[float, PacketsEvent]] = []
    vseq = aseq = 0
    for i in range(int(media_seconds * FPS)):
        t = i / FPS
        key = i % int(FPS * GOP_S) == 0
        size = KEYFRAME_BYTES if key else max(200, int(rng.gauss(delta_bytes, delta_bytes * 0.15)))
        pkts = []
        while size > 0:
            n = min(size, MAX_PAYLOAD)
            pkts.append(LayerPacket(vseq & 0xFFFF, i * 3000 & 0xFFFFFFFF, False, rng.randbytes(n),
                                    keyframe_start=key and not pkts))
            vseq += 1
            size -= n
        pkts[-1] = replace(pkts[-1], marker=True)
        out.append((t, PacketsEvent("cam1", "high", tuple(pkts), MediaAnchor(i * 3000, 100.0 + t), 0.0, None)))
    for k in range(int(media_seconds * 50)):
        t = k / 50
        pkt = LayerPacket(aseq & 0xFFFF, k * 960, False, rng.randbytes(OPUS_BYTES), keyframe_start=True)
        aseq += 1
        out.append((t, PacketsEvent("cam1", AUDIO_LAYER, (pkt,), MediaAnchor(k * 960, 100.0 + t), 0.0, None)))
    out.sort(key=lambda item: item[0])
    return out


# -- transports: sender side -----------------------------------------------------------------


class EventSender:
    """The product: one message per event (FeedSender)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sender = feed.FeedSender(sock)

    def send(self, ev) -> bool:
        return self.sender.send(ev)

    def close(self) -> None:
        self.sender.close()


_HEAD = struct.Struct("!BBBBHHdddI")
_PKT = struct.Struct("!HIBH")


class PacketSender:
    """One sendmsg per packet: each packet its own one-packet message (the
    same wire format, so the same receiver decodes it), header and payload
    gathered by the kernel rather than joined here."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.dropped = 0

    def send(self, ev) -> bool:
        if type(ev) is not PacketsEvent:
            try:
                self.sock.send(feed.encode(ev)[0])
            except BlockingIOError:
                self.dropped += 1
                return False
            return True
        stream, layer = ev.stream.encode(), ev.layer.encode()
        names = stream + layer
        flags = 2 if ev.anchor is not None else 0
        ats, aat = (ev.anchor.timestamp, ev.anchor.at) if ev.anchor is not None else (0, 0.0)
        head = _HEAD.pack(1, 1, flags, len(layer), len(stream), 1, ev.arrival, 0.0, aat, ats) + names
        sendmsg = self.sock.sendmsg
        for p in ev.packets:
            pf = (1 if p.marker else 0) | (2 if p.keyframe_start else 0) | (4 if p.discontinuity else 0)
            try:
                sendmsg((head, _PKT.pack(p.seq, p.timestamp, pf, len(p.payload)), p.payload))
            except BlockingIOError:
                self.dropped += 1
                return False
        return True

    def close(self) -> None:
        pass


# Shared-memory ring: [0:8] bytes written, [8:16] bytes read, [16:24] the
# consumer is (going) asleep; records from DATA: u32 length + message,
# 8-aligned; a length of WRAP sends the reader back to the start.
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
DATA = 64
WRAP = 0xFFFFFFFF


class ShmSender:
    def __init__(self, shm: shared_memory.SharedMemory, efd: int, size: int) -> None:
        self.shm, self.buf, self.efd, self.size = shm, shm.buf, efd, size
        self.write = 0
        self.dropped = 0
        self.doorbells = 0

    def send(self, ev) -> bool:
        buf, size = self.buf, self.size
        for msg in feed.encode(ev):
            need = (4 + len(msg) + 7) & ~7
            read = _U64.unpack_from(buf, 8)[0]
            pos = self.write % size
            pad = size - pos if pos + need > size else 0
            if self.write + pad + need - read > size:
                self.dropped += 1
                return False
            if pad:
                _U32.pack_into(buf, DATA + pos, WRAP)
                self.write += pad
                pos = 0
            _U32.pack_into(buf, DATA + pos, len(msg))
            buf[DATA + pos + 4:DATA + pos + 4 + len(msg)] = msg
            self.write += need
            _U64.pack_into(buf, 0, self.write)
        if _U64.unpack_from(buf, 16)[0]:
            os.eventfd_write(self.efd, 1)
            self.doorbells += 1
        return True

    def close(self) -> None:
        self.buf = None
        self.shm.close()


# -- receiver (the second process) --------------------------------------------------------------


def kind_of(ev: PacketsEvent) -> str:
    if ev.layer == AUDIO_LAYER:
        return "audio"
    return "keyframe" if ev.packets[0].keyframe_start else "delta"


class Tally:
    """Counts what arrives; each event is charged the thread CPU time since
    the previous one (events come one per wake-up: that is its wake-up,
    read and decode)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.events = self.packets = 0
        self.latencies: list[float] = []
        self.cpu0: float | None = None
        self.last = 0.0
        self.by_kind: dict[str, list[float]] = {}  # kind → [cpu s, packets]
        self.done = loop.create_future()

    def on_event(self, ev) -> None:
        cpu = time.thread_time()
        if self.cpu0 is None:
            self.cpu0 = self.last = cpu
        if type(ev) is EndedEvent:
            if ev.stream == END and not self.done.done():
                self.done.set_result(cpu - self.cpu0)
            return
        now = time.monotonic()
        self.events += 1
        self.packets += len(ev.packets)
        if self.events > 1:
            acc = self.by_kind.setdefault(kind_of(ev), [0.0, 0])
            acc[0] += cpu - self.last
            acc[1] += len(ev.packets)
        self.last = cpu
        if ev.arrival:
            self.latencies.append(now - ev.arrival)


async def receive(transport: str, fd: int, shm_name: str | None, size: int) -> dict:
    loop = asyncio.get_running_loop()
    tally = Tally(loop)
    if transport in ("event", "packet"):
        sock = socket.socket(fileno=fd)
        receiver = feed.FeedReceiver(sock, tally.on_event, max_per_wakeup=256)
        receiver.start()
        cpu = await tally.done
        receiver.close()
        errors = receiver.errors
    else:
        shm = shared_memory.SharedMemory(name=shm_name)
        # Attaching registers it with this process's resource tracker (before
        # Python 3.13), which would unlink the parent's segment at exit.
        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
        buf = shm.buf
        read = 0
        errors = 0

        def drain() -> None:
            nonlocal read, errors
            os.eventfd_read(fd)
            while True:
                _U64.pack_into(buf, 16, 0)
                write = _U64.unpack_from(buf, 0)[0]
                while read < write:
                    pos = read % size
                    length = _U32.unpack_from(buf, DATA + pos)[0]
                    if length == WRAP:
                        read += size - pos
                        continue
                    try:
                        ev = feed.decode(buf[DATA + pos + 4:DATA + pos + 4 + length])
                    except feed.FeedError:
                        errors += 1
                    else:
                        tally.on_event(ev)
                    read += (4 + length + 7) & ~7
                    _U64.pack_into(buf, 8, read)
                # Going to sleep: say so, then look once more (a message
                # written before the flag was seen rang no doorbell).
                _U64.pack_into(buf, 16, 1)
                if _U64.unpack_from(buf, 0)[0] == read:
                    return

        _U64.pack_into(buf, 16, 1)
        loop.add_reader(fd, drain)
        cpu = await tally.done
        loop.remove_reader(fd)
        del buf
        shm.close()
    lat = sorted(tally.latencies)
    return {"events": tally.events, "packets": tally.packets, "cpu_s": cpu, "errors": errors,
            "recv_us_by_kind": {k: 1e6 * c / n for k, (c, n) in tally.by_kind.items()},
            "latency_p50_us": 1e6 * lat[len(lat) // 2] if lat else None,
            "latency_p99_us": 1e6 * lat[int(len(lat) * 0.99)] if lat else None}


def child_main(args: argparse.Namespace) -> None:
    os.sched_setaffinity(0, {args.child_cpu}) if args.child_cpu is not None else None
    result = asyncio.run(receive(args.child, args.fd, args.shm, args.ring))
    print(json.dumps(result))


# -- one run ----------------------------------------------------------------------------------


def run(transport: str, events: list[tuple[float, PacketsEvent]], speed: float, ring: int,
        child_cpu: int | None, parent_cpu: int | None) -> dict:
    shm = None
    if transport == "shm":
        shm = shared_memory.SharedMemory(create=True, size=DATA + ring)
        shm.buf[:DATA] = bytes(DATA)
        fd = os.eventfd(0, os.EFD_NONBLOCK)
        sender = ShmSender(shm, fd, ring)
        child_fd = fd
    else:
        main_end, worker_end = feed.socketpair()
        sender = EventSender(main_end) if transport == "event" else PacketSender(main_end)
        child_fd = worker_end.fileno()
    cmd = [sys.executable, __file__, "--child", transport, "--fd", str(child_fd), "--ring", str(ring)]
    if shm is not None:
        cmd += ["--shm", shm.name]
    if child_cpu is not None:
        cmd += ["--child-cpu", str(child_cpu)]
    proc = subprocess.Popen(cmd, pass_fds=[child_fd], stdout=subprocess.PIPE, text=True)
    if transport != "shm":
        worker_end.close()
    if parent_cpu is not None:
        os.sched_setaffinity(0, {parent_cpu})
    time.sleep(1.0)  # the child's interpreter and loop are up
    cpu = 0.0
    dropped = 0
    packets = 0
    by_kind: dict[str, list[float]] = {}
    t0 = time.monotonic()
    for t, ev in events:
        due = t0 + t / speed
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        ev = replace(ev, arrival=time.monotonic())
        c = time.thread_time()
        ok = sender.send(ev)
        spent = time.thread_time() - c
        cpu += spent
        packets += len(ev.packets)
        acc = by_kind.setdefault(kind_of(ev), [0.0, 0])
        acc[0] += spent
        acc[1] += len(ev.packets)
        dropped += not ok
    time.sleep(0.05)
    while not sender.send(EndedEvent(END)):
        time.sleep(0.01)
    out, _ = proc.communicate(timeout=60)
    sender.close()
    if shm is not None:
        os.close(fd)
        shm.unlink()
    else:
        main_end.close()
    child = json.loads(out)
    per_packet = {"send_us": 1e6 * cpu / packets, "recv_us": 1e6 * child["cpu_s"] / max(1, child["packets"])}
    per_packet["total_us"] = per_packet["send_us"] + per_packet["recv_us"]
    return {"transport": transport, "events": len(events), "packets": packets, "dropped_events": dropped,
            "received_packets": child["packets"], "decode_errors": child["errors"],
            "latency_p50_us": child["latency_p50_us"], "latency_p99_us": child["latency_p99_us"],
            "doorbells": getattr(sender, "doorbells", None), **per_packet,
            "total_us_by_kind": {k: 1e6 * c / n + child["recv_us_by_kind"].get(k, 0.0)
                                 for k, (c, n) in by_kind.items()}}


def codec_only(events: list[tuple[float, PacketsEvent]], rounds: int = 3) -> dict:
    """encode and decode alone, in this process (the rest is system calls and wake-ups)."""
    evs = [ev for _, ev in events]
    packets = sum(len(ev.packets) for ev in evs)
    best_enc = best_dec = float("inf")
    for _ in range(rounds):
        c = time.thread_time()
        messages = [m for ev in evs for m in feed.encode(ev)]
        best_enc = min(best_enc, time.thread_time() - c)
        c = time.thread_time()
        for m in messages:
            feed.decode(m)
        best_dec = min(best_dec, time.thread_time() - c)
    return {"encode_us": 1e6 * best_enc / packets, "decode_us": 1e6 * best_dec / packets}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--media-seconds", type=float, default=60.0)
    ap.add_argument("--speed", type=float, default=10.0, help="× real time")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of every transport")
    ap.add_argument("--transports", default="event,packet,shm")
    ap.add_argument("--ring", type=int, default=4 << 20, help="shm ring bytes")
    ap.add_argument("--pin", action="store_true", help="sender on CPU 0, receiver on CPU 1")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--fd", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--shm", help=argparse.SUPPRESS)
    ap.add_argument("--child-cpu", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main(args)
        return
    events = workload(args.media_seconds)
    video = [ev for _, ev in events if ev.layer != AUDIO_LAYER]
    keyframes = [ev for ev in video if ev.packets[0].keyframe_start]
    deltas = [ev for ev in video if not ev.packets[0].keyframe_start]
    shape = {"video_frames": len(video), "keyframe_packets": len(keyframes[0].packets),
             "delta_packets_mean": statistics.mean(len(ev.packets) for ev in deltas),
             "audio_packets": len(events) - len(video),
             "packets": sum(len(ev.packets) for _, ev in events)}
    results = []
    for _ in range(args.rounds):
        for transport in args.transports.split(","):
            results.append(run(transport, events, args.speed, args.ring, 1 if args.pin else None,
                               0 if args.pin else None))
    summary = {}
    for transport in args.transports.split(","):
        rs = [r for r in results if r["transport"] == transport]
        summary[transport] = {k: statistics.median(r[k] for r in rs)
                              for k in ("send_us", "recv_us", "total_us", "latency_p50_us", "latency_p99_us")}
        for kind in ("keyframe", "delta", "audio"):
            summary[transport][f"{kind}_us"] = statistics.median(r["total_us_by_kind"][kind] for r in rs)
        summary[transport]["dropped_events"] = sum(r["dropped_events"] for r in rs)
        summary[transport]["lost_packets"] = sum(r["packets"] - r["received_packets"] for r in rs)
    report = {"shape": shape, "speed": args.speed, "codec": codec_only(events), "runs": results,
              "median": summary}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"workload: {shape['video_frames']} video frames (keyframe {shape['keyframe_packets']} packets, "
          f"others {shape['delta_packets_mean']:.1f} on average), {shape['audio_packets']} Opus packets, "
          f"{shape['packets']} packets; replayed at {args.speed:g}x")
    print(f"codec alone: encode {report['codec']['encode_us']:.2f} µs/packet, "
          f"decode {report['codec']['decode_us']:.2f} µs/packet")
    print("µs of CPU per packet (both processes), medians of the rounds; hand-off latency in µs")
    print(f"{'transport':<10}{'send':>7}{'recv':>7}{'total':>7}{'keyframe':>10}{'delta':>7}{'audio':>7}"
          f"{'p50':>7}{'p99':>7}{'dropped':>9}{'lost':>6}")
    for transport, s in summary.items():
        print(f"{transport:<10}{s['send_us']:>7.2f}{s['recv_us']:>7.2f}{s['total_us']:>7.2f}{s['keyframe_us']:>10.2f}"
              f"{s['delta_us']:>7.2f}{s['audio_us']:>7.2f}{s['latency_p50_us']:>7.0f}{s['latency_p99_us']:>7.0f}"
              f"{s['dropped_events']:>9}{s['lost_packets']:>6}")


if __name__ == "__main__":
    main()
