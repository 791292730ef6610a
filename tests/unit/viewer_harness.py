"""A stream, its fan-out and viewers around :class:`ViewerEgress`, with an
explicit clock and no sockets: what WhepSession does, datagrams recorded
instead of sent (shared by test_viewer_core.py and test_fanout.py)."""

from __future__ import annotations

from dataclasses import dataclass

from media.layer import AUDIO, Layer
from media.rtp.layers import LayerPolicy
from media.rtp.packet import LayerPacket, RtpPacket
from media.rtp.rewrite import Rewriter, TrackParams
from media.rtp.rtcp import ReceiverReport, ReportBlock, ntp_from_unix, ntp_middle32
from media.stream import SourceInfo, StreamHub
from media.webrtc.fanout import JoinPolicy, StreamFanout
from media.webrtc.viewer import SendKind, ViewerEgress

FPS = 25
GOP = 25  # a keyframe a second
#: Frame sizes and fill bytes per layer: the fill byte tells which layer a
#: datagram carried.
LAYERS = {"low": (1000, 0x11), "mid": (2500, 0x33), "high": (5000, 0x22)}
VIDEO_SSRC, RTX_SSRC, AUDIO_SSRC = 1111, 2222, 3333
WALL0 = 1_700_000_000.0


@dataclass(frozen=True)
class Unit:
    codec: str
    pts: int
    keyframe: bool
    data: bytes
    dts: int | None = None
    pid: int | None = None


def au(layer: str, i: int, gop: int = GOP) -> Unit:
    size, fill = LAYERS[layer]
    key = i % gop == 0
    nal = bytes([0x65 if key else 0x41]) + bytes([fill]) * (size - 1)
    return Unit("h264", i * 90000 // FPS, key, b"\x00\x00\x00\x01" + nal)


def layer_of(datagram: bytes) -> str:
    fill = RtpPacket.parse(datagram).payload[-1]
    return next(name for name, (_, f) in LAYERS.items() if f == fill)


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Studio:
    """One stream with a publisher per layer, its fan-out, and a frame clock."""

    def __init__(self, layers: tuple[str, ...] = ("high", "low"), *, join: JoinPolicy = JoinPolicy(),
                 keyframes: int | None = None, gop: int = GOP) -> None:
        self.clock = Clock()
        stream = StreamHub().get_or_create("cam1")
        self.pubs = {name: stream.attach_publisher(SourceInfo("srt"), layer=name, now=self.clock.now)
                     for name in layers}
        self.keyframe_requests = 0

        def request_keyframe(name: str) -> int:
            self.keyframe_requests += 1
            return keyframes or 0

        self.fanout = StreamFanout(stream, clock=self.clock, join=join,
                                   request_keyframe=None if keyframes is None else request_keyframe)
        self.fanout.start()
        self.frame = 0
        self.gop = gop

    def step(self) -> None:
        """One frame period: a frame on every layer."""
        self.clock.now = round(self.clock.now + 1 / FPS, 6)
        # The fan-out's pacing timer needs a running loop; driven by hand here.
        self.fanout.pump_replays(self.clock.now)
        for name, pub in self.pubs.items():
            pub.publish(au(name, self.frame, self.gop))
        self.frame += 1

    def run_frames(self, n: int) -> None:
        for _ in range(n):
            self.step()


class Viewer:
    """The fan-out's sink: ViewerEgress plus a recording send path."""

    def __init__(self, studio: Studio, *, pin: str | None = None, rtx: bool = True,
                 policy: LayerPolicy = LayerPolicy(), send_failure_timeout: float = 5.0) -> None:
        self.studio = studio
        self.core = ViewerEgress(studio.fanout, self, cname=b"test", policy=policy, pin=pin,
                                 send_failure_timeout=send_failure_timeout)
        start = self.core.initial_layer(studio.fanout.ordered_layers)
        self.video = Rewriter(TrackParams(
            ssrc=VIDEO_SSRC, payload_type=102, clock_rate=90000, rtx_ssrc=RTX_SSRC if rtx else None,
            rtx_payload_type=103 if rtx else None), initial_layer=start)
        self.audio = Rewriter(TrackParams(ssrc=AUDIO_SSRC, payload_type=111, clock_rate=48000),
                              initial_layer=AUDIO)
        self.core.set_track("video", self.video, VIDEO_SSRC)
        self.core.set_track("audio", self.audio, AUDIO_SSRC)
        self.sent: list[tuple[float, bytes]] = []
        self.rtcp: list[tuple[float, bytes]] = []
        self.layer_updates: list[tuple[Layer, ...]] = []
        #: What the next sends report: a full socket buffer, failing since.
        self.overflow = False
        self.failing_since: float | None = None
        self.ended = False
        # The receiver's counters (RFC 3550 §6.4.1) as it reports them.
        self.highest = 0
        self.lost = 0

    def attach(self) -> None:
        now = self.studio.clock.now
        self.studio.fanout.attach(self, self.core.initial_layer(self.studio.fanout.ordered_layers), now)
        self.core.start(now)

    # -- the fan-out's sink

    def on_layers_changed(self, layers: tuple[Layer, ...]) -> None:
        self.layer_updates.append(layers)
        self.core.on_layers(layers, self.studio.clock.now)

    def on_packets(self, index: int, packets: list[LayerPacket], now: float) -> None:
        out = self.core.on_packets(index, packets, now)
        if out:
            self.sent += [(now, d) for d in out]
            if index != AUDIO:
                self.highest += len(out)
            self.core.on_sent(SendKind.MEDIA, len(out), sum(len(d) for d in out), self.overflow,
                              self.failing_since, now, index)

    def on_stream_ended(self) -> None:
        self.ended = True

    # -- the viewer's RTCP and the core's timer

    def report(self, *, lost: int = 0, rtt: float = 0.02) -> list[bytes]:
        """A receiver report for the video SSRC, ``lost`` more packets lost,
        the RTT ``rtt`` (its LSR/DLSR against the core's NTP now)."""
        now = self.studio.clock.now
        ntp = ntp_from_unix(WALL0 + now)
        self.lost += lost
        block = ReportBlock(ssrc=VIDEO_SSRC, fraction_lost=0, packets_lost=self.lost,
                            highest_seq=self.highest, jitter=0,
                            lsr=(ntp_middle32(ntp) - int(rtt * 65536)) & 0xFFFFFFFF, dlsr=0)
        return self.core.on_rtcp("video", ReceiverReport(ssrc=9, reports=(block,)), now, ntp)

    def timers(self) -> None:
        """Fire the core's timer while it is due, as WhepSession does."""
        now = self.studio.clock.now
        while (at := self.core.get_timer()) is not None and at <= now:
            rtp, rtcp = self.core.handle_timer(now, WALL0 + now)
            self.sent += [(now, d) for d in rtp]
            self.rtcp += [(now, d) for d in rtcp]
            if rtp:
                self.core.on_sent(SendKind.PROBE, len(rtp), sum(len(d) for d in rtp), self.overflow,
                                  self.failing_since, now)
            if rtcp:
                self.core.on_sent(SendKind.REPORT, len(rtcp), 0, False, self.failing_since, now)
            if self.core.get_timer() == at:
                break

    def events(self) -> list:
        out, self.core.events = self.core.events, []
        return out

    def layers_sent(self, since: float = float("-inf")) -> list[str]:
        return [layer_of(d) for at, d in self.sent if at >= since and RtpPacket.parse(d).ssrc == VIDEO_SSRC]
