"""An egress worker on this loop, driven over its real sockets as the host
drives it: calls and their errors, the feed routed to the stream's fan-out,
keyframe requests, periodic figures, ordered stop, the end of the host
(media/webrtc/egress_worker.py)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

from media.webrtc import feed as feeds
from media.webrtc.egress_worker import ControlChannel, EgressWorker, WorkerConfig, WorkerStats
from media.webrtc.fanout import EndedEvent
from media.webrtc.sdp import parse_offer

OFFER = (Path(__file__).resolve().parents[1] / "fixtures" / "sdp" / "chromium_whep_offer.sdp").read_text()


class Host:
    """The host's end: a control channel, the feed sender, the messages."""

    def __init__(self) -> None:
        self.control, worker_control = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        feed_main, self.worker_feed = feeds.socketpair()
        self.worker_control = worker_control
        self.feed = feeds.FeedSender(feed_main)
        self.messages: list[tuple] = []
        self.replies: dict[int, tuple] = {}
        self.ended = asyncio.Event()
        self.channel = ControlChannel(self.control, self._on, self.ended.set)
        self.ids = 0

    def _on(self, msg: tuple) -> None:
        if msg[0] == "reply":
            self.replies[msg[1]] = msg
        else:
            self.messages.append(msg)

    async def call(self, method: str, *args: Any) -> tuple:
        self.ids += 1
        call_id = self.ids
        self.channel.send(("call", call_id, method, args))
        for _ in range(500):
            if call_id in self.replies:
                return self.replies.pop(call_id)[2:]
            await asyncio.sleep(0.01)
        raise AssertionError(f"no reply to {method}")

    async def message(self, kind: str) -> tuple:
        for _ in range(500):
            for m in self.messages:
                if m[0] == kind:
                    self.messages.remove(m)
                    return m
            await asyncio.sleep(0.01)
        raise AssertionError(f"no {kind!r} message; got {[m[0] for m in self.messages]}")


async def _running(host: Host) -> tuple[EgressWorker, asyncio.Task]:
    worker = EgressWorker(WorkerConfig(index=0, stats_interval=0.05), host.worker_control, host.worker_feed, None)
    task = asyncio.get_running_loop().create_task(worker.run())
    host.channel.start()
    ready = await host.message("ready")
    assert ready[2] is None  # no ICE relay given: aioice's own sockets
    return worker, task


def test_calls_feed_keyframes_figures_and_ordered_stop() -> None:
    async def main() -> None:
        host = Host()
        worker, task = await _running(host)
        offer = parse_offer(OFFER)
        # The errors the in-process service raises, by kind, for the host to re-raise.
        ok, (kind, text) = await host.call("create", "cam", OFFER, offer, "u:1", None, None, True, True)
        assert not ok and kind == "UnsupportedMedia" and "B-frames" in text
        bad = OFFER.replace("a=recvonly", "a=sendonly")
        ok, (kind, _text) = await host.call("create", "cam", bad, parse_offer(bad), "u:1", None, None, False, True)
        assert not ok and kind == "SdpError"
        assert (await host.call("pin", "nope", "low"))[1][0] == "SessionGone"
        assert (await host.call("rm -rf", 1))[1][0] == "ValueError"
        assert not worker.service.sessions  # the refused offer's session is gone again
        # The feed reaches the fan-out of a stream the host opened, and only that.
        assert await host.call("open", "cam") == (True, True)
        assert "cam" in worker.service.fanouts
        host.feed.send(EndedEvent("other"))
        host.feed.send(EndedEvent("cam"))
        for _ in range(200):
            if "cam" not in worker.service.fanouts:
                break
            await asyncio.sleep(0.01)
        assert "cam" not in worker.service.fanouts and worker.feed_events == 2
        assert await host.call("close_stream", "cam") == (True, False)
        # A keyframe request goes to the host; its answer is the next one's.
        assert worker.request_keyframe("cam") == 0
        assert await host.message("keyframe") == ("keyframe", "cam")
        host.channel.send(("keyframe_result", "cam", 2))
        await asyncio.sleep(0.05)
        assert worker.request_keyframe("cam") == 2
        host.messages = [m for m in host.messages if m[0] != "stats"]  # figures from before the feed
        stats = (await host.message("stats"))[1]
        assert isinstance(stats, WorkerStats) and stats.feed_events == 2 and stats.cpu_s > 0
        # Ordered stop: the last figures, then "stopped", then the worker ends.
        host.messages.clear()
        host.channel.send(("stop",))
        await asyncio.wait_for(task, 5)
        kinds = [m[0] for m in host.messages]
        assert kinds[-2:] == ["stats", "stopped"], kinds
        host.channel.close()

    asyncio.run(main())


def test_the_worker_ends_when_the_host_goes_away() -> None:
    async def main() -> None:
        host = Host()
        _worker, task = await _running(host)
        host.channel.close()  # what the worker sees when the server process dies
        await asyncio.wait_for(task, 5)

    asyncio.run(main())


def test_a_viewers_peer_connection_carries_no_receive_side_estimator() -> None:
    """aiortc gives every video receiver a REMB estimator of 1,000 GC-tracked
    buckets; a WHEP viewer sends no media, so its session drops it (and the
    WHIP ingest's capturing receiver too)."""
    import gc
    import types

    from aiortc import RTCPeerConnection

    from media.webrtc import aiortc_adapter as adapter

    async def main() -> None:
        host = Host()
        worker, task = await _running(host)
        assert await host.call("open", "cam") == (True, True)
        ok, reply = await host.call("create", "cam", OFFER, parse_offer(OFFER), "u:1", None, None, False, True)
        assert ok, reply
        session = worker.service.sessions[reply["id"]]
        transceivers = session.pc.getTransceivers()
        assert sorted(t.kind for t in transceivers) == ["audio", "video"]
        assert all(getattr(t.receiver, adapter._ESTIMATOR) is None for t in transceivers)
        # What it saves: the objects one estimator keeps alive.
        before = len(gc.get_objects())
        pc = RTCPeerConnection()
        pc.addTransceiver("video", direction="sendonly")
        assert len(gc.get_objects()) - before > 1000
        await pc.close()
        whip = adapter.CapturingReceiver("video", types.SimpleNamespace(state="new"))
        assert getattr(whip, adapter._ESTIMATOR) is None
        host.channel.send(("stop",))
        await asyncio.wait_for(task, 5)
        host.channel.close()

    asyncio.run(main())
