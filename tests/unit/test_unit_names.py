"""One name per coded-unit concept: every producer's unit carries what
``media.unit.Unit`` promises, so the stream can publish any of them."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from media.mpegts import AccessUnit
from media.stream import SourceInfo, StreamHub
from media.transcode import OpusPacket
from media.unit import Unit
from media.webrtc.whip import RtpUnit

UNIT_FIELDS = set(typing.get_type_hints(Unit))


def test_unit_promises_what_publish_reads():
    assert UNIT_FIELDS == {"codec", "pts", "dts", "keyframe", "data"}


@pytest.mark.parametrize("producer", [AccessUnit, RtpUnit, OpusPacket], ids=lambda c: c.__name__)
def test_each_producer_is_a_unit(producer):
    names = {f.name for f in dataclasses.fields(producer)} | {
        n for n, v in vars(producer).items() if isinstance(v, property)
    }
    assert UNIT_FIELDS <= names


def test_an_rtp_unit_publishes_as_a_frame():
    stream = StreamHub().get_or_create("cam")
    reader = stream.subscribe(8)
    pub = stream.attach_publisher(SourceInfo("whip"), now=0.0)
    pub.publish(RtpUnit("opus", 960, 960, True, b"\x78\x00", 48000, 1.5))
    (frame,) = reader.drain()
    assert (frame.track, frame.codec, frame.pts, frame.clock_rate, frame.arrival) == ("audio", "opus", 960, 48000, 1.5)
    assert pub.stats().frames == 1 and pub.mapped_layers() == set()
