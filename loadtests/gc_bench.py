"""What a full garbage collection costs a process holding WHEP viewers.

A full (generation 2) collection stops the whole process — every viewer
of an egress worker — for as long as it scans every object the cycle
collector tracks. This builds ``--viewers`` real WHEP sessions (aiortc
peer connections answered from Chromium's offer, not connected) in one
egress worker's service, then times ``gc.collect()`` (thread CPU time, the
minimum of ``--rounds``), under each variant:

* ``aiortc estimator kept``: aiortc's receive-side REMB estimator left on
  each video receiver (1,001 tracked objects, before it was dropped);
* ``as shipped``: the estimator dropped (``drop_receive_estimator``);
* ``+ start-up heap frozen``: also ``freeze_startup_heap()`` before the
  sessions are made, as ``worker_main`` does.

Usage: ``python loadtests/gc_bench.py --viewers 200``. Prints tracked
objects and the collection's CPU ms per variant. Connected viewers hold
more (DTLS, SRTP, rewriters, histories) than these unconnected sessions.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from media.procs import freeze_startup_heap  # noqa: E402
from media.webrtc import aiortc_adapter as adapter  # noqa: E402
from media.webrtc.egress_worker import EgressWorker, WorkerConfig  # noqa: E402
from media.webrtc.sdp import parse_offer  # noqa: E402

OFFER = (ROOT / "tests" / "fixtures" / "sdp" / "chromium_whep_offer.sdp").read_text()


async def variant(viewers: int, rounds: int, *, keep_estimator: bool, freeze: bool) -> tuple[int, float, int]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    c, d = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    worker = EgressWorker(WorkerConfig(index=0, max_viewers=viewers + 1), b, d, None)
    dropped = adapter.drop_receive_estimator
    if keep_estimator:
        adapter.drop_receive_estimator = lambda receiver: None
    gc.collect()
    frozen = freeze_startup_heap() if freeze else 0
    try:
        await worker.call_open("cam")
        offer = parse_offer(OFFER)
        for _ in range(viewers):
            await worker.call_create("cam", OFFER, offer, "u:1", None, None, False, True)
        gc.collect()
        tracked = len(gc.get_objects())
        times = []
        for _ in range(rounds):
            t0 = time.thread_time()
            gc.collect()
            times.append((time.thread_time() - t0) * 1000)
        for session in list(worker.service.sessions.values()):
            await session.close("deleted")
    finally:
        adapter.drop_receive_estimator = dropped
        gc.unfreeze()
        for s in (a, b, c, d):
            s.close()
    return tracked, min(times), frozen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--viewers", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    print(f"{args.viewers} unconnected WHEP sessions in one egress worker's service")
    print(f"{'variant':<32} {'tracked objects':>16} {'full collection, CPU ms (min)':>30}")
    for label, kw in (("aiortc estimator kept", dict(keep_estimator=True, freeze=False)),
                      ("as shipped", dict(keep_estimator=False, freeze=False)),
                      ("+ start-up heap frozen", dict(keep_estimator=False, freeze=True))):
        tracked, ms, frozen = asyncio.run(variant(args.viewers, args.rounds, **kw))
        note = f"  ({frozen} frozen, not scanned)" if frozen else ""
        print(f"{label:<32} {tracked:>16} {ms:>30.1f}{note}")


if __name__ == "__main__":
    main()
