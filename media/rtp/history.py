"""Per-layer packet history for NACK-driven retransmission (RFC 4585 §3.4).

One :class:`PacketHistory` per simulcast layer holds the layer packets most
recently produced (shared by every viewer of the layer, so its cost does not
grow with the audience). It is a ring indexed by the layer-local 16-bit
sequence number, bounded both by ``capacity`` slots and by ``max_age``
seconds: a packet older than that is useless to a receiver whose jitter
buffer has moved on, and resending it would only add load.

A viewer's NACK names sequence numbers in the viewer's space; the viewer's
:class:`media.rtp.rewrite.Rewriter` maps each back to ``(layer, layer seq,
layer timestamp)`` and fetches the payload here. The timestamp is checked
as well as the sequence number, so after a publisher restart (new random
seq/ts space, history cleared) a stale mapping cannot fetch an unrelated
packet that happens to reuse the slot.
"""

from __future__ import annotations

from media.rtp.packet import LayerPacket

__all__ = ["PacketHistory"]


class PacketHistory:
    """Ring of the last ``capacity`` layer packets (power of two, ≤ 32768)."""

    __slots__ = ("capacity", "max_age", "_mask", "_packets", "_times", "_count")

    def __init__(self, capacity: int = 1024, max_age: float = 1.0) -> None:
        if capacity < 1 or capacity & (capacity - 1) or capacity > 0x8000:
            raise ValueError("capacity must be a power of two between 1 and 32768")
        if max_age <= 0:
            raise ValueError("max_age must be positive")
        self.capacity = capacity
        self.max_age = max_age
        self._mask = capacity - 1
        self._packets: list[LayerPacket | None] = [None] * capacity
        self._times: list[float] = [0.0] * capacity
        self._count = 0

    def put(self, packet: LayerPacket, now: float) -> None:
        """Remember *packet* (produced at *now*); a discontinuity clears the ring."""
        if packet.discontinuity:
            self.clear()
        i = packet.seq & self._mask
        if self._packets[i] is None:
            self._count += 1
        self._packets[i] = packet
        self._times[i] = now

    def get(self, seq: int, now: float, timestamp: int | None = None) -> LayerPacket | None:
        """The packet with layer sequence number *seq*, if still held and fresh.

        With *timestamp*, the stored packet's RTP timestamp must match too.
        """
        i = seq & self._mask
        p = self._packets[i]
        if p is None or p.seq != (seq & 0xFFFF):
            return None
        if now - self._times[i] > self.max_age:
            return None
        if timestamp is not None and p.timestamp != timestamp:
            return None
        return p

    def age(self, seq: int, now: float) -> float | None:
        """Seconds since the packet with *seq* was produced, if held."""
        i = seq & self._mask
        p = self._packets[i]
        if p is None or p.seq != (seq & 0xFFFF):
            return None
        return now - self._times[i]

    def recent_bytes(self, now: float, window: float) -> int:
        """Payload bytes produced in the last *window* seconds (a scan of the
        ring: for a rare decision such as a probe's rate, not per packet)."""
        horizon = now - window
        times = self._times
        return sum(len(p.payload) for i, p in enumerate(self._packets)
                   if p is not None and horizon < times[i] <= now)

    def clear(self) -> None:
        self._packets = [None] * self.capacity
        self._count = 0

    def __len__(self) -> int:
        return self._count
