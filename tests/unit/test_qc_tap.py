"""The live QC tap's worker side: bounded channel, StreamTap decoding, the
worker process protocol (live_qc/tap.py)."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import subprocess
import time
from pathlib import Path

import av
import pytest

from live_qc.tap import StreamTap, TapChannel, TapWorker

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")

# Black from 1.5 s to 4.0 s of a 6 s clip (black_d is 2.0 s, so it opens).
BLACK_START, BLACK_END = 1.5, 4.0


def make_clip(path: Path, audio: str = "libopus") -> Path:
    graph = (f"testsrc=s=320x180:r=25:d={BLACK_START}[a];"
             f"color=c=black:s=320x180:r=25:d={BLACK_END - BLACK_START}[b];"
             f"testsrc=s=320x180:r=25:d=2[c];[a][b][c]concat=n=3:v=1:a=0,format=yuv420p[v]")
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-filter_complex", graph,
                    "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000:duration=6",
                    "-map", "[v]", "-map", "0:a", "-c:v", "libx264", "-tune", "zerolatency", "-g", "25",
                    "-c:a", audio, "-ac", "2", "-f", "mpegts", str(path)], check=True)
    return path


def packets(path: Path) -> list[tuple]:
    """(kind, codec, t, keyframe, data) in file order, like the hub hands them
    out (H.264 access units in Annex B, audio packets)."""
    out = []
    with av.open(str(path)) as c:
        for p in c.demux():
            if p.size == 0 or p.pts is None:
                continue
            kind = p.stream.type
            codec = p.stream.codec_context.name
            out.append((kind, codec, float(p.pts * p.time_base), bool(p.is_keyframe), bytes(p)))
    return out


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> list[tuple]:
    return packets(make_clip(tmp_path_factory.mktemp("qc") / "black.ts"))


def feed(tap: StreamTap, pkts: list[tuple]) -> list:
    events = []
    for kind, codec, t, key, data in pkts:
        if kind == "video":
            events += tap.video(codec, t, key, data)
        else:
            events += tap.audio(codec, t, data)
    return events


def test_channel_drops_and_counts_when_full_and_never_blocks() -> None:
    q = multiprocessing.get_context("spawn").Queue(3)
    ch = TapChannel(q)
    assert ch.put_video("s", "h264", 0.0, True, b"k")
    assert ch.put_video("s", "h264", 0.04, False, b"p")
    assert ch.put_audio("s", "opus", 0.0, b"a")
    # Full: each put returns at once with the frame dropped and counted.
    assert not ch.put_audio("s", "opus", 0.02, b"a")
    assert not ch.put_video("s", "h264", 0.08, False, b"p")
    assert ch.drops == {("s", "audio"): 1, ("s", "video"): 1}
    for _ in range(3):
        q.get(timeout=5)
    # Room again, but video after a dropped frame waits for a keyframe.
    assert not ch.put_video("s", "h264", 0.12, False, b"p")
    assert ch.drops[("s", "video")] == 2
    assert ch.put_video("s", "h264", 0.16, True, b"k")
    assert ch.put_video("s", "h264", 0.20, False, b"p")
    q.close()
    q.join_thread()


def test_stream_tap_finds_black_in_encoded_frames(clip) -> None:
    tap = StreamTap("s")
    events = feed(tap, clip) + tap.flush()
    black = [e for e in events if e.marker.type == "black"]
    assert [e.kind for e in black] == ["open", "close"]
    origin = min(t for _, _, t, _, _ in clip)
    m = black[-1].marker
    assert abs(m.start - origin - BLACK_START) <= 0.1
    assert abs(m.end - origin - BLACK_END) <= 0.1
    assert tap.engine.meters.peaks_dbfs and len(tap.engine.meters.peaks_dbfs) == 2
    assert not [e for e in events if e.marker.subtype == "decode_error"]


def test_garbage_opens_decode_error_and_the_next_keyframe_recovers(clip) -> None:
    video = [p for p in clip if p[0] == "video"]
    keys = [i for i, p in enumerate(video) if p[3]]
    assert len(keys) >= 3
    tap = StreamTap("s")
    events = feed(tap, video[:keys[1] - 5])
    t_bad = video[keys[1] - 5][2]
    events += tap.video("h264", t_bad, False, os.urandom(2000))
    opened = [e for e in events if e.marker.subtype == "decode_error"]
    assert [e.kind for e in opened] == ["open"]
    assert opened[0].marker.type == "transport" and opened[0].marker.metadata["kind"] == "video"
    assert abs(opened[0].marker.start - t_bad) < 1e-6
    assert tap.decode_failing
    # The frames up to the next keyframe are skipped; decoding resumes there.
    rest = feed(tap, video[keys[1] - 4:])
    closed = [e for e in rest if e.marker.subtype == "decode_error"]
    assert [e.kind for e in closed] == ["close"]
    assert abs(closed[0].marker.end - video[keys[1]][2]) < 1e-6
    assert not tap.decode_failing


def test_codec_change_restarts_the_decoder(clip, tmp_path) -> None:
    aac = packets(make_clip(tmp_path / "aac.ts", audio="aac"))
    tap = StreamTap("s")
    audio_opus = [p for p in clip if p[0] == "audio"]
    audio_aac = [p for p in aac if p[0] == "audio"]
    assert audio_aac[0][1] == "aac"
    events = feed(tap, audio_opus[:50])
    t_end = audio_opus[49][2]
    shift = t_end + 0.02 - audio_aac[0][2]
    events += feed(tap, [(k, c, t + shift, key, d) for k, c, t, key, d in audio_aac[:100]])
    assert not [e for e in events if e.marker.subtype == "decode_error"]
    assert tap.engine.meters.t > t_end + 1.0  # the AAC audio was decoded and metered


def test_unsupported_codec_is_a_decode_error_marker() -> None:
    tap = StreamTap("s")
    events = tap.audio("pcm_weird", 1.0, b"\x00" * 10)
    assert [(e.kind, e.marker.type, e.marker.subtype) for e in events] == [("open", "transport", "decode_error")]


def receive_until(w: TapWorker, pred, timeout: float = 30.0) -> list[tuple]:
    got: list[tuple] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if w.results.poll(0.2):
            got += w.receive()
            if pred(got):
                return got
    raise AssertionError(f"no such result within {timeout} s; got {[m[:2] for m in got]}")


def test_worker_process_protocol(clip) -> None:
    w = TapWorker(4096)
    w.start()
    try:
        assert w.channel is not None
        assert w.channel.control(("attach", "s", {"analysis_fps": 10.0}))
        for kind, codec, t, key, data in clip:
            if kind == "video":
                assert w.channel.put_video("s", codec, t, key, data)
            else:
                assert w.channel.put_audio("s", codec, t, data)
        assert w.channel.control(("detach", "s"))
        got = receive_until(w, lambda g: any(m[0] == "state" and m[2] == "stopped" for m in g))
        states = [m[2] for m in got if m[0] == "state"]
        assert states == ["running", "stopped"]
        black = [m[2] for m in got if m[0] == "marker" and m[2].marker.type == "black"]
        assert [e.kind for e in black] == ["open", "close"]
        assert any(m[0] == "meters" for m in got)
        assert all(len(m[2].peaks_dbfs) == 2 for m in got if m[0] == "meters")
    finally:
        w.request_stop()
        w.close()
    assert not w.alive()


def test_worker_reports_cpu_per_stream_and_exits_on_stop(clip) -> None:
    w = TapWorker(4096)
    w.start()
    try:
        w.channel.control(("attach", "a", {}))
        for kind, codec, t, key, data in clip:
            if kind == "video":
                w.channel.put_video("a", codec, t, key, data)
        got = receive_until(w, lambda g: any(m[0] == "cpu" for m in g))
        cpu = [m for m in got if m[0] == "cpu"]
        assert cpu[0][1] == "a" and cpu[0][2] > 0
        w.request_stop()
        w.proc.join(10)
        assert w.proc.exitcode == 0
    finally:
        w.close()
