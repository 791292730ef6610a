"""Opus RTP payload format (RFC 7587).

RFC 7587 §4.2: one Opus packet (RFC 6716 §3) per RTP payload, never split
or aggregated; the timestamp runs at 48 kHz whatever the coded bandwidth.
§4.1 leaves the marker bit to RFC 3551 (talkspurt start with DTX); the
forwarding path does not use it, so it is always 0.

Every Opus packet is independently decodable, so each layer packet is a
valid switch point (``keyframe_start=True``).
"""

from __future__ import annotations

from media.errors import RtpError
from media.rtp.packet import LayerPacket

__all__ = ["OPUS_CLOCK_RATE", "MAX_OPUS_PACKET", "OpusPacketizer", "depacketize_opus"]

#: RFC 7587 §4.2 / §7: the RTP clock rate is always 48000.
OPUS_CLOCK_RATE = 48000
#: RFC 6716 §3.2.5: at most 48 frames of at most 1275 bytes, plus framing;
#: a bound well above anything an encoder emits for one RTP packet.
MAX_OPUS_PACKET = 61440


class OpusPacketizer:
    """Wrap Opus packets as layer packets with consecutive layer seq numbers.

    The first packet produced (and the first after :meth:`restart`) is
    flagged ``discontinuity``.
    """

    __slots__ = ("_seq", "_next_discontinuity")

    def __init__(self, initial_seq: int = 0) -> None:
        self._seq = initial_seq & 0xFFFF
        self._next_discontinuity = True

    @property
    def next_seq(self) -> int:
        return self._seq

    def restart(self) -> None:
        """The source restarted: flag the next packet as a discontinuity."""
        self._next_discontinuity = True

    def packetize(self, packet: bytes, timestamp: int) -> LayerPacket:
        """One Opus packet with its 48 kHz timestamp → one layer packet."""
        if not packet:
            raise RtpError("empty Opus packet (RFC 6716 §3: at least the TOC byte)")
        if len(packet) > MAX_OPUS_PACKET:
            raise RtpError(f"Opus packet of {len(packet)} bytes is too large")
        out = LayerPacket(
            seq=self._seq,
            timestamp=timestamp & 0xFFFFFFFF,
            marker=False,
            payload=bytes(packet),
            keyframe_start=True,
            discontinuity=self._next_discontinuity,
        )
        self._seq = (self._seq + 1) & 0xFFFF
        self._next_discontinuity = False
        return out


def depacketize_opus(payload: bytes) -> bytes:
    """RTP payload → Opus packet (the identity, after a validity check)."""
    if not payload:
        raise RtpError("empty Opus RTP payload")
    return bytes(payload)
