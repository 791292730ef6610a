"""Random access points in a transport stream (sans-I/O).

An SRT ``read:`` client that joins mid-stream should start at a point a
decoder can start from: the latest PAT and PMT, then the TS packet that
starts a keyframe PES. :class:`RandomAccessScanner` finds that packet in
each chunk of original TS bytes and keeps the latest PAT/PMT packets, so
the stream hub can cache "PSI + everything since the last keyframe" and
replay it to a new reader (ISO/IEC 13818-1 §2.4.4 PSI; H.264 Annex B).

A keyframe start is a packet on a video PID with payload_unit_start_indicator
set whose PES payload carries an IDR slice (nal_unit_type 5) or an SPS (7)
within that first packet — what encoders emit at each IDR (AUD, SPS, PPS,
IDR). Packets are read in place; nothing is copied unless a RAP is found.
Once the PSI is known, a chunk without any ``00 00 01`` is skipped at
C speed; the PAT/PMT copies are then refreshed only from chunks that also
hold a start code (their content, not their continuity counter, is what a
new reader needs).
"""

from __future__ import annotations

from dataclasses import dataclass

TS = 188
_IDR, _SPS = 5, 7


@dataclass(slots=True)
class RandomAccessScanner:
    """Call :meth:`scan` with each chunk, after the demuxer saw it."""

    pmt_pid: int | None = None
    video_pids: frozenset[int] = frozenset()
    pat: bytes = b""
    pmt: bytes = b""

    def configure(self, pmt_pid: int | None, video_pids: frozenset[int]) -> None:
        self.pmt_pid = pmt_pid
        self.video_pids = video_pids

    @property
    def psi(self) -> bytes:
        return self.pat + self.pmt if self.pat and self.pmt else b""

    def scan(self, data: bytes) -> int | None:
        """Offset of the first keyframe-starting packet in ``data``, or None.

        Also records PAT/PMT packets (single-packet sections, as every
        encoder sends them) for :attr:`psi`.
        """
        if self.pat and self.pmt and data.find(b"\x00\x00\x01") < 0:
            # No start code anywhere: no PES starts here (every PES header
            # begins with 00 00 01), and the PSI is already known. Most
            # chunks of a frame's body take this C-speed exit.
            return None
        found = None
        n = len(data) - TS + 1
        video = self.video_pids
        pmt_pid = self.pmt_pid
        for off in range(0, max(n, 0), TS):
            if data[off] != 0x47:
                return found  # not aligned: leave it to the demuxer's resync
            b1 = data[off + 1]
            if not b1 & 0x40:  # payload_unit_start_indicator
                continue
            pid = ((b1 & 0x1F) << 8) | data[off + 2]
            if pid == 0:
                self.pat = data[off:off + TS]
            elif pid == pmt_pid:
                self.pmt = data[off:off + TS]
            elif found is None and pid in video and _starts_keyframe(data, off):
                found = off
        return found


def _starts_keyframe(data: bytes, off: int) -> bool:
    afc = (data[off + 3] >> 4) & 0x3
    if not afc & 0x1:
        return False
    p = off + 4
    if afc & 0x2:
        p += 1 + data[p]
    end = off + TS
    # PES header: 00 00 01 stream_id, length (2), flags (2), header_data_length (1)
    if p + 9 > end or data[p:p + 3] != b"\x00\x00\x01":
        return False
    p += 9 + data[p + 8]
    find = data.find
    while p < end:
        i = find(b"\x00\x00\x01", p, end)
        if i < 0 or i + 3 >= end:
            return False
        t = data[i + 3] & 0x1F
        if t == _IDR or t == _SPS:
            return True
        p = i + 3
    return False
