"""ReturnFeed media/rtp package: RTP for the passthrough forwarding path.

Packetize once per layer, rewrite per viewer (DESIGN.md "WebRTC forwarding
on aiortc"). All modules are sans-I/O; time is passed in as ``now``.

* ``packet``  — RTP header view (RFC 3550 §5.1), header extensions
  (RFC 8285), :class:`~media.rtp.packet.LayerPacket`.
* ``h264``    — RFC 6184 packetizer (single NAL / STAP-A / FU-A) and
  depacketizer.
* ``opus``    — RFC 7587 packetizer.
* ``rtcp``    — SR/RR/SDES/BYE, Generic NACK, PLI, FIR, REMB; RTT.
* ``history`` — per-layer packet ring for NACK retransmission.
* ``rewrite`` — per-viewer header rewrite, layer switching, NACK/RTX, SR.
* ``layers``  — per-viewer layer selection rules.
"""
