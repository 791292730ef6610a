"""StreamFanout (media/webrtc/fanout.py) with an explicit clock and no
sockets: layers ordered low → high whatever their arrival, a viewer joins
at a keyframe, switches layers at the new layer's keyframe, a replaying
viewer's NACKs are answered, and a viewer that cannot keep up never holds
the others back. (The join replay's pacing: test_fanout_join.py.)
"""

from __future__ import annotations

import pytest
from viewer_harness import RTX_SSRC, VIDEO_SSRC, Studio, Viewer, layer_of

from media.layer import AUDIO, Layer, layer_named, order_layers
from media.rtp.packet import LayerPacket, RtpPacket
from media.rtp.rtcp import Nack
from media.stream import layer_names
from media.webrtc.fanout import JoinPolicy


class Sink:
    def __init__(self) -> None:
        self.packets: list[tuple[int, LayerPacket]] = []
        self.layers: list[tuple[Layer, ...]] = []
        self.ended = False

    def on_packets(self, index: int, packets: list[LayerPacket], now: float) -> None:
        self.packets += [(index, p) for p in packets]

    def on_layers_changed(self, layers: tuple[Layer, ...]) -> None:
        self.layers.append(layers)

    def on_stream_ended(self) -> None:
        self.ended = True


def test_order_layers_is_the_one_boundary_from_names() -> None:
    assert order_layers(["high", "low", "mid"]) == (Layer(0, "low"), Layer(1, "mid"), Layer(2, "high"))
    # The stream's rule: other names below low, in reverse name order, so
    # layer_names' low2, low3 … (the 4th, 5th largest) rank under low.
    assert [layer.name for layer in order_layers(["low2", "high", "low3", "low", "mid"])] == [
        "low3", "low2", "low", "mid", "high"]
    assert [layer.name for layer in order_layers(["high", "cam", "low", "b", "cam"])] == [
        "cam", "b", "low", "high"]
    assert [layer.name for layer in order_layers(layer_names(5))] == list(reversed(layer_names(5)))
    assert order_layers([]) == ()
    layers = order_layers(["low", "high"])
    assert layer_named(layers, "high") == Layer(1, "high") and layer_named(layers, "mid") is None
    assert Layer(0, "low") < Layer(1, "high") and str(Layer(1, "high")) == "high"


def test_layers_are_indexed_low_to_high_whatever_order_they_appear_in() -> None:
    studio = Studio(("high", "low", "mid"))
    sink = Sink()
    studio.fanout.attach(sink, None, studio.clock.now)  # before any frame: told as layers appear
    studio.pubs["high"].publish(_unit("high"))
    studio.pubs["low"].publish(_unit("low"))
    assert studio.fanout.layers == ["low", "high"]
    assert sink.layers[-1] == (Layer(0, "low"), Layer(1, "high"))
    studio.run_frames(2)
    assert studio.fanout.ordered_layers == (Layer(0, "low"), Layer(1, "mid"), Layer(2, "high"))
    assert sink.layers[-1] == studio.fanout.ordered_layers
    # Every packet reaches the sink under its layer's current index.
    last = {index: p for index, p in sink.packets}
    assert set(last) == {0, 1, 2}
    assert set(studio.fanout.histories()) == {0, 1, 2, AUDIO}
    for layer in studio.fanout.ordered_layers:
        assert studio.fanout.histories()[layer.index].get(last[layer.index].seq, studio.clock.now) is not None


def _unit(layer: str):
    from viewer_harness import au
    return au(layer, 0)


def test_a_viewer_joining_mid_gop_starts_at_its_layers_keyframe_then_runs_live() -> None:
    studio = Studio()
    studio.run_frames(30)  # 5 frames into the second GOP
    viewer = Viewer(studio, pin="low")
    viewer.attach()
    studio.run_frames(30)
    video = [RtpPacket.parse(d) for _, d in viewer.sent if RtpPacket.parse(d).ssrc == VIDEO_SSRC]
    # The cached GOP of the low layer from its keyframe (IDR, NAL type 5), then live.
    assert video[0].payload[0] & 0x1F == 5
    assert {layer_of(d) for _, d in viewer.sent} == {"low"}
    seqs = [p.sequence_number for p in video]
    assert seqs == [(seqs[0] + i) & 0xFFFF for i in range(len(seqs))]
    assert len(video) == 35  # 5 replayed frames + 30 live, one packet each
    assert studio.fanout.stats.joins_replayed == 1


def test_a_replaying_viewers_nacks_are_answered_from_what_was_replayed() -> None:
    studio = Studio()
    studio.run_frames(25)  # the last frame of a GOP: its keyframe is ~1 s old
    viewer = Viewer(studio, pin="low")
    key = studio.fanout.gop_packets(0)[0]
    viewer.attach()
    studio.run_frames(3)
    now = studio.clock.now
    # The shared history (1 s) no longer holds the keyframe; the viewer got
    # it from the replay a moment ago, well within its playout window.
    assert studio.fanout.histories()[0].get(key.seq, now) is None
    first = RtpPacket.parse(viewer.sent[0][1])
    out = viewer.core.on_rtcp("video", Nack(9, VIDEO_SSRC, (first.sequence_number,)), now, 0)
    assert [RtpPacket.parse(d).ssrc for d in out] == [RTX_SSRC]
    assert int.from_bytes(RtpPacket.parse(out[0]).payload[:2], "big") == first.sequence_number
    # Seconds later it is past any playout window: counted, not sent.
    studio.run_frames(25)
    out = viewer.core.on_rtcp("video", Nack(9, VIDEO_SSRC, (first.sequence_number + 1,)), studio.clock.now, 0)
    assert out == [] and viewer.core.stats.retransmits_dropped == 1


def test_a_layer_switch_happens_at_the_new_layers_keyframe_for_that_viewer_only() -> None:
    studio = Studio()
    studio.run_frames(25)
    switching, staying = Viewer(studio), Viewer(studio)
    switching.attach()
    staying.attach()
    studio.run_frames(3)
    t = studio.clock.now
    switching.core.pin("low", t)
    studio.run_frames(30)
    after = switching.layers_sent(since=t + 1e-6)
    k = after.index("low")
    assert set(after[:k]) == {"high"} and set(after[k:]) == {"low"}
    first_low = [RtpPacket.parse(d) for at, d in switching.sent if at > t and layer_of(d) == "low"][0]
    assert first_low.payload[0] & 0x1F == 5  # the low layer's IDR
    assert set(staying.layers_sent(since=t + 1e-6)) == {"high"}
    # One run of sequence numbers across the switch (RFC 3550 §5.1).
    seqs = [RtpPacket.parse(d).sequence_number for at, d in switching.sent
            if RtpPacket.parse(d).ssrc == VIDEO_SSRC]
    assert seqs == [(seqs[0] + i) & 0xFFFF for i in range(len(seqs))]


def test_a_viewer_that_cannot_catch_up_skips_to_live_and_never_holds_the_others() -> None:
    # A replay pace too slow for the layer (10 kbit/s against 1 Mbit/s): its
    # queue outgrows the limit.
    policy = JoinPolicy(min_bps=10_000, max_bps=10_000, max_queue_bytes=120_000,
                        fresh_keyframe_after_s=10.0)
    studio = Studio(("high",), join=policy, keyframes=0, gop=1000)  # no keyframe to skip to
    live = Sink()
    studio.fanout.attach(live, 0, studio.clock.now)  # from the start: nothing to replay
    studio.run_frames(20)
    slow = Sink()
    studio.fanout.attach(slow, 0, studio.clock.now)
    live.packets.clear()
    slow.packets.clear()
    studio.run_frames(3)
    # The other viewers get every live packet at once; the slow one is still
    # in its replay (older packets only), its live packets queued.
    assert len(live.packets) == 3 * 5
    assert slow.packets and max(p.seq for _, p in slow.packets) < live.packets[0][1].seq
    assert studio.fanout.stats.replay_skipped_to_keyframe == 0
    studio.run_frames(5)  # 100 kB of GOP + 5 kB a frame passes 120 kB
    assert studio.fanout.stats.replay_skipped_to_keyframe == 1
    # The slow one skipped its queue: straight to live, flagged so its
    # rewriter restarts there, and the source was asked for a keyframe.
    skipped = [p for _, p in slow.packets if p.discontinuity]
    assert len(skipped) == 1 and studio.keyframe_requests >= 1
    tail = slow.packets[-5:]
    assert [p.seq for _, p in tail] == [p.seq for _, p in live.packets[-5:]]


def test_a_stream_that_ends_tells_its_viewers_and_its_owner_once() -> None:
    studio = Studio()
    closed = []
    studio.fanout._on_closed = closed.append
    sink = Sink()
    studio.fanout.attach(sink, None, studio.clock.now)
    studio.fanout.close()
    studio.fanout.close()
    assert sink.ended and closed == [studio.fanout]


@pytest.mark.parametrize("pin", ["low", "high"])
def test_initial_layer_is_the_pinned_one_else_the_highest(pin: str) -> None:
    studio = Studio()
    studio.run_frames(1)
    assert Viewer(studio, pin=pin).core.initial_layer() == 0  # no layers known to the core yet
    assert Viewer(studio, pin=pin).core.initial_layer(studio.fanout.ordered_layers) == (
        0 if pin == "low" else 1)
    assert Viewer(studio).core.initial_layer(studio.fanout.ordered_layers) == 1
