"""What an ingest hands a stream: one coded unit (MediaMTX's ``internal/unit``).

One name per concept on the media path::

    TS demuxer ── media.mpegts.AccessUnit ─┐
    WHIP RTP   ── media.webrtc.whip.RtpUnit ├─ Unit ─→ Publisher.publish()
    transcoder ── media.transcode.OpusPacket┘              │
                                                Stream stamps seq/track/epoch
                                                           ↓
                                       media.stream.Frame ─→ readers

:class:`Unit` is the contract (a protocol, nothing to inherit); the types on
the left are its concrete producers. The H.264 depacketizer's output
(:class:`media.rtp.h264.NalUnits`) is not a Unit: it is the NAL units of one
access unit before they become Annex-B bytes.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["Unit"]


class Unit(Protocol):
    """What ``Publisher.publish`` needs; optional attributes it reads with
    getattr: pid, arrival, sps, clock_rate, layer."""

    codec: str
    pts: int | None
    dts: int | None
    keyframe: bool
    data: bytes
