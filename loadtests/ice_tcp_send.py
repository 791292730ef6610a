"""Per-packet send cost of an ICE-TCP viewer against a UDP one (loopback).

Times the forwarding fast path's last step for runs of equal-size packets
(the FU-A fragments of a frame): ``DatagramSender.send_batch`` on a UDP
socket (GSO batches) and ``FramedSender.send_batch`` on an ICE-TCP
connection of a real :class:`~media.webrtc.icetcp.IceTcpListener` (RFC 4571
frames, one ``transport.write`` per batch). A thread drains each receiver,
so neither side measures a full buffer; drops are reported anyway.

Usage: ``python loadtests/ice_tcp_send.py [--batches 20000] [--run 5] [--size 1200] [--json]``.
SRTP protection is left out: it costs the same on both paths
(``rtp_microbench.py`` measures it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from aioice import Connection, stun  # noqa: E402

from media.webrtc.aiortc_adapter import DatagramSender  # noqa: E402
from media.webrtc.icetcp import FramedSender, IceTcpListener, IceTcpSession, frame  # noqa: E402


def _drain(sock: socket.socket, stop: threading.Event) -> None:
    sock.settimeout(0.2)
    while not stop.is_set():
        try:
            if not sock.recv(1 << 20):
                return
        except socket.timeout:
            continue
        except OSError:
            return


async def bench_tcp(batches: int, run: int, size: int) -> dict:
    listener = IceTcpListener("127.0.0.1", 0, write_limit=4 << 20)
    await listener.start()
    connection = Connection(ice_controlling=False)
    session = IceTcpSession(listener, connection)
    session.add_candidates(["127.0.0.1"])
    client = socket.create_connection(("127.0.0.1", listener.port))
    req = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    req.attributes["USERNAME"] = f"{connection.local_username}:bench"
    req.attributes["PRIORITY"] = 1
    req.attributes["ICE-CONTROLLING"] = 1
    req.add_message_integrity(connection.local_password.encode())
    client.sendall(frame(bytes(req)))
    while not session.links:
        await asyncio.sleep(0.01)
    stop = threading.Event()
    reader = threading.Thread(target=_drain, args=(client, stop), daemon=True)
    reader.start()
    sender = FramedSender(session, client.getsockname()[:2])
    packets = [bytes(size)] * run
    spent = 0
    for i in range(batches):
        t0 = time.perf_counter_ns()
        sender.send_batch(packets, 0.0)
        spent += time.perf_counter_ns() - t0
        if i % 8 == 7:
            await asyncio.sleep(0)  # let the transport flush what the kernel did not take
    stop.set()
    for p in list(session.protocols):
        await p.close()
    await listener.close()
    client.close()
    return {"us_per_packet": spent / 1000 / (batches * run), "dropped": sender.backlogged}


def bench_udp(batches: int, run: int, size: int) -> dict:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    rx.bind(("127.0.0.1", 0))
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    tx.setblocking(False)
    stop = threading.Event()
    reader = threading.Thread(target=_drain, args=(rx, stop), daemon=True)
    reader.start()
    sender = DatagramSender(tx, rx.getsockname())
    packets = [bytes(size)] * run
    spent = 0
    for _ in range(batches):
        t0 = time.perf_counter_ns()
        sender.send_batch(packets, 0.0)
        spent += time.perf_counter_ns() - t0
    stop.set()
    reader.join()
    tx.close()
    rx.close()
    return {"us_per_packet": spent / 1000 / (batches * run), "dropped": sender.backlogged, "gso": sender.gso}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=20000)
    ap.add_argument("--run", type=int, default=5, help="packets per batch")
    ap.add_argument("--size", type=int, default=1200)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    out = {"udp": bench_udp(a.batches, a.run, a.size), "tcp": asyncio.run(bench_tcp(a.batches, a.run, a.size)),
           "batches": a.batches, "run": a.run, "size": a.size}
    if a.json:
        print(json.dumps(out))
        return
    print(f"{a.batches} batches of {a.run} × {a.size} B")
    for name in ("udp", "tcp"):
        r = out[name]
        print(f"  {name}: {r['us_per_packet']:.2f} µs/packet, dropped {r['dropped']}")


if __name__ == "__main__":
    main()
