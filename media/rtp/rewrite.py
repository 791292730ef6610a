"""Per-viewer, per-track RTP header rewriting (the forwarding hot path).

Layer packets (:class:`media.rtp.packet.LayerPacket`) are produced once per
simulcast layer. For each viewer track a :class:`Rewriter` turns them into
RTP packets in the viewer's space: the viewer's SSRC and negotiated payload
type, a viewer sequence number and timestamp, and the header extensions the
viewer negotiated (with its ids): sdes:mid (RFC 8843 §15.1), abs-send-time
(6.18 fixed-point seconds from ``now``) and transport-wide sequence number
(draft-holmer-rmcat-transport-wide-cc-extensions-01 §2, one counter per
viewer transport: :class:`TransportSeq`).

Hot path: a ``bytearray`` template of header + extension block is built once;
per packet one ``struct.pack_into`` writes M/PT/seq/ts (plus one per dynamic
extension) and ``b"".join((template, payload))`` makes the bytes in a single
allocation (``pylibsrtp`` wants ``bytes``).

Continuity rules (DESIGN.md invariant 2; libsrtp rejects a reused index):

* Within one run of a layer the viewer sequence number advances by exactly
  what the layer's does: +1 per packet when the layer has no loss. A gap of
  up to ``max_gap`` (upstream loss on a WHIP layer) is kept as a gap, so the
  viewer NACKs it and a late packet can still fill the hole (it is forwarded
  with the viewer sequence number reserved for it, once). Packetized SRT
  layers have no gaps, so there the viewer sequence is strictly +1.
* A layer switch, a publisher restart (``LayerPacket.discontinuity``) or a
  jump larger than ``max_gap`` re-bases: the next packet sent gets the last
  viewer sequence number + 1 and the timestamp last_ts + elapsed wall time ×
  clock rate (at least +1), so the jitter buffer sees normal progress.
  Viewer sequence numbers therefore never go backwards.
* A switch happens only at a keyframe start of the target layer
  (``request_switch``); until then the old layer keeps flowing (no freeze)
  and target packets are dropped — or, for a switch away from a congested
  link (``stop_current``), the old layer stops at once. After a restart or a big jump mid-GOP, the
  layer is dropped until its next keyframe; :attr:`Rewriter.waiting_for_keyframe`
  tells the egress to ask for one (GOP cache / upstream PLI).

A bounded map (viewer seq → layer, layer seq, layer ts, viewer ts) turns a
viewer NACK back into layer packets held by :class:`media.rtp.history.PacketHistory`;
:meth:`Rewriter.retransmit` resends them plainly (same seq/ts; the SRTP
policy needs ``allow_repeat_tx``, which aiortc sets) or as RTX (RFC 4588 §4:
RTX SSRC and PT, own sequence numbers, payload = original seq + payload).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Iterable, Mapping, NamedTuple, Sequence

from media.rtp.budget import RetransmitBudget
from media.rtp.history import PacketHistory
from media.rtp.packet import ONE_BYTE_PROFILE, RTP_HEADER_SIZE, TWO_BYTE_PROFILE, LayerPacket
from media.rtp.rtcp import SenderReport, build_sr

__all__ = ["TrackParams", "TransportSeq", "NackTarget", "MediaAnchor", "Rewriter"]

_SEQ_TS = struct.Struct("!BHI")
#: One NACK-map entry: viewer seq (extended), layer, layer seq, layer ts,
#: viewer ts; native int64s in a bytearray, so entering a packet allocates
#: nothing (a tuple per packet was 10 % of a worker's CPU in allocation and
#: garbage collection) and the C fan-out (media/webrtc/_fastsend.c) writes
#: the same bytes.
_ENTRY = struct.Struct("=5q")
_ENTRY_SIZE = _ENTRY.size
_U32 = struct.Struct("!I")
_U16 = struct.Struct("!H")
_join = b"".join


@dataclass(frozen=True, slots=True)
class TrackParams:
    """What the viewer negotiated for one sending track (from the SDP answer).

    Extension ids of ``None`` mean "not negotiated: do not send it".
    """

    ssrc: int
    payload_type: int
    clock_rate: int
    mid: str | None = None
    mid_id: int | None = None
    abs_send_time_id: int | None = None
    transport_cc_id: int | None = None
    rtx_ssrc: int | None = None
    rtx_payload_type: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.payload_type <= 127:
            raise ValueError("payload_type must be 0..127")
        if self.clock_rate <= 0:
            raise ValueError("clock_rate must be positive")
        if (self.rtx_ssrc is None) != (self.rtx_payload_type is None):
            raise ValueError("RTX needs both rtx_ssrc and rtx_payload_type")
        if (self.mid is None) != (self.mid_id is None):
            raise ValueError("the mid extension needs both mid and mid_id")
        ids = [i for i in (self.mid_id, self.abs_send_time_id, self.transport_cc_id) if i is not None]
        if len(set(ids)) != len(ids) or any(not 1 <= i <= 255 for i in ids):
            raise ValueError("header extension ids must be distinct and in 1..255")


class TransportSeq:
    """Transport-wide sequence counter, shared by every track of one viewer transport."""

    __slots__ = ("value",)

    def __init__(self, initial: int = 0) -> None:
        self.value = initial & 0xFFFF


class NackTarget(NamedTuple):
    """A viewer sequence number traced back to the layer packet it carried."""

    viewer_seq: int
    layer: int
    layer_seq: int
    layer_ts: int
    viewer_ts: int


class MediaAnchor(NamedTuple):
    """Where a layer's RTP timeline sits on its stream's presentation clock.

    The layer RTP timestamp ``timestamp`` (layer space, before a viewer's
    offset) is presented at ``at`` (monotonic seconds). Every track of a
    stream whose sources share one media clock (the PTS of one MPEG-TS, the
    AAC→Opus transcoder's output stamped on that PTS) gets its anchors from
    the same clock, so equal PTS mean equal ``at`` across tracks and layers.
    """

    timestamp: int
    at: float


class _Template:
    """Header + extension block with the offsets of the per-packet fields."""

    __slots__ = ("buf", "abs_off", "abs_top", "twcc_off")

    def __init__(self, params: TrackParams, ssrc: int, payload_type: int) -> None:
        dynamic: list[tuple[int, int]] = []  # (id, value length)
        if params.abs_send_time_id is not None:
            dynamic.append((params.abs_send_time_id, 3))
        if params.transport_cc_id is not None:
            dynamic.append((params.transport_cc_id, 2))
        fixed: list[tuple[int, bytes]] = []
        if params.mid is not None and params.mid_id is not None:
            mid = params.mid.encode()
            if not 1 <= len(mid) <= 255:
                raise ValueError("mid must be 1..255 bytes")
            fixed.append((params.mid_id, mid))
        ids = [i for i, _ in dynamic] + [i for i, _ in fixed]
        two_byte = any(i > 14 for i in ids) or any(len(v) > 16 for _, v in fixed)
        ext = bytearray()
        offsets: dict[int, int] = {}
        for ext_id, length in dynamic:
            ext += bytes((ext_id, length)) if two_byte else bytes(((ext_id << 4) | (length - 1),))
            offsets[ext_id] = len(ext)
            ext += b"\x00" * length
        for ext_id, value in fixed:
            ext += bytes((ext_id, len(value))) if two_byte else bytes(((ext_id << 4) | (len(value) - 1),))
            ext += value
        ext += b"\x00" * (-len(ext) % 4)
        has_ext = bool(ext)
        buf = bytearray(
            struct.pack("!BBHII", 0x90 if has_ext else 0x80, payload_type, 0, 0, ssrc)
        )
        if has_ext:
            buf += _U16.pack(TWO_BYTE_PROFILE if two_byte else ONE_BYTE_PROFILE)
            buf += _U16.pack(len(ext) // 4)
            buf += ext
        base = RTP_HEADER_SIZE + 4
        self.buf = buf
        self.abs_off = 0
        self.abs_top = 0
        self.twcc_off = 0
        if params.abs_send_time_id is not None:
            # Written as one 32-bit word starting at the byte before the
            # value (the element's header or length byte, which is constant).
            off = base + offsets[params.abs_send_time_id]
            self.abs_off = off - 1
            self.abs_top = buf[off - 1] << 24
        if params.transport_cc_id is not None:
            self.twcc_off = base + offsets[params.transport_cc_id]


def _random16() -> int:
    return int.from_bytes(os.urandom(2), "big")


def _random32() -> int:
    return int.from_bytes(os.urandom(4), "big")


class Rewriter:
    """Rewrite layer packets into one viewer track's RTP space.

    ``rewrite(layer, packet, now)`` returns the RTP packet bytes to protect
    and send, or ``None`` when the packet is not for this viewer (other
    layer, waiting for a keyframe, duplicate, too late). ``now`` is a
    monotonic clock in seconds, used for abs-send-time, timestamp re-basing
    and sender reports.
    """

    __slots__ = (
        "params",
        "max_gap",
        "nack_min_interval",
        "_tmpl",
        "_rtx_tmpl",
        "_twcc",
        "_mpt",
        "_rtx_mpt",
        "_map",
        "_rtx_sent",
        "_mask",
        "_layer",
        "_target",
        "_lseq",
        "_vseq",
        "_epoch_vseq",
        "_ts_off",
        "_next_vts",
        "_last_vts",
        "_last_now",
        "_started",
        "_rtx_seq",
        "packets_sent",
        "octets_sent",
        "retransmitted",
        "retransmitted_bytes",
        "rtx_too_old",
        "rtx_over_budget",
        "probe_bytes",
        "_probe_cursor",
        "unrecoverable",
        "switches",
        "rebases",
        "dropped_late",
    )

    def __init__(
        self,
        params: TrackParams,
        initial_layer: int = 0,
        *,
        transport_seq: TransportSeq | None = None,
        initial_seq: int | None = None,
        initial_ts: int | None = None,
        initial_rtx_seq: int | None = None,
        map_size: int = 1024,
        max_gap: int = 128,
        nack_min_interval: float = 0.01,
    ) -> None:
        if map_size < 16 or map_size & (map_size - 1) or map_size > 0x8000:
            raise ValueError("map_size must be a power of two between 16 and 32768")
        if not 1 <= max_gap < map_size:
            raise ValueError("max_gap must be in 1..map_size-1")
        if params.transport_cc_id is not None and transport_seq is None:
            raise ValueError("transport-cc negotiated: pass the transport's TransportSeq")
        self.params = params
        self.max_gap = max_gap
        self.nack_min_interval = nack_min_interval
        self._tmpl = _Template(params, params.ssrc, params.payload_type)
        self._rtx_tmpl = (
            _Template(params, params.rtx_ssrc, params.rtx_payload_type)
            if params.rtx_ssrc is not None and params.rtx_payload_type is not None
            else None
        )
        self._twcc = transport_seq
        pt = params.payload_type
        self._mpt = (pt, pt | 0x80)
        rpt = params.rtx_payload_type if params.rtx_payload_type is not None else 0
        self._rtx_mpt = (rpt, rpt | 0x80)
        #: viewer seq → (viewer seq, layer, layer seq, layer ts, viewer ts),
        #: ``_ENTRY`` at ``(vseq & mask) * _ENTRY.size``; -1: never written.
        self._map = bytearray(b"\xff") * (map_size * _ENTRY.size)
        self._rtx_sent: dict[int, float] = {}
        self._mask = map_size - 1
        self._layer: int | None = None
        self._target: int | None = initial_layer
        self._lseq = 0
        # Extended (never wrapping) viewer sequence number of the last
        # in-order packet; the wire value is its low 16 bits.
        first = _random16() if initial_seq is None else initial_seq & 0xFFFF
        self._vseq = first - 1 + 0x10000  # keep it positive for late-packet math
        self._epoch_vseq = self._vseq
        self._ts_off = 0
        self._next_vts = _random32() if initial_ts is None else initial_ts & 0xFFFFFFFF
        self._last_vts = 0
        self._last_now = 0.0
        self._started = False
        self._rtx_seq = _random16() if initial_rtx_seq is None else initial_rtx_seq & 0xFFFF
        self.packets_sent = 0
        self.octets_sent = 0
        self.retransmitted = 0
        self.retransmitted_bytes = 0
        self.rtx_too_old = 0
        self.rtx_over_budget = 0
        self.probe_bytes = 0
        self._probe_cursor = 0
        self.unrecoverable = 0
        self.switches = 0
        self.rebases = 0
        self.dropped_late = 0

    # -- state -----------------------------------------------------------------

    @property
    def current_layer(self) -> int | None:
        """Layer being forwarded (None before the first keyframe)."""
        return self._layer

    @property
    def target_layer(self) -> int | None:
        """Layer a switch is waiting for (its next keyframe start), or None."""
        return self._target

    @property
    def waiting_for_keyframe(self) -> bool:
        """True while nothing is forwarded until a keyframe (ask for one)."""
        return self._layer is None

    @property
    def last_seq(self) -> int:
        """Viewer sequence number of the newest packet sent (16 bits)."""
        return self._vseq & 0xFFFF

    @property
    def last_timestamp(self) -> int:
        return self._last_vts

    def request_switch(self, layer: int, *, stop_current: bool = False) -> None:
        """Switch to *layer* at its next keyframe start; the current layer
        flows until then, unless *stop_current*: a link that cannot carry the
        current layer only loses its packets, and they would crowd out the
        target's keyframe (the picture holds still until it arrives)."""
        if layer == self._layer:
            self._target = None
            return
        self._target = layer
        if stop_current and self._layer is not None:
            self.switches += 1  # counted here: the rebase will see no current layer
            self._layer = None

    # -- hot path --------------------------------------------------------------

    def rewrite(self, layer: int, packet: LayerPacket, now: float) -> bytes | None:
        if layer == self._layer and not packet.discontinuity:
            seq = packet.seq
            d = (seq - self._lseq) & 0xFFFF
            if 0 < d <= self.max_gap:
                vext = self._vseq + d
                self._vseq = vext
                self._lseq = seq
                vts = (packet.timestamp + self._ts_off) & 0xFFFFFFFF
                self._last_vts = vts
                self._last_now = now
                t = self._tmpl
                buf = t.buf
                _SEQ_TS.pack_into(buf, 1, self._mpt[packet.marker], vext & 0xFFFF, vts)
                if t.abs_off:
                    _U32.pack_into(buf, t.abs_off, t.abs_top | (int(now * 262144.0) & 0xFFFFFF))
                if t.twcc_off:
                    tw = self._twcc
                    _U16.pack_into(buf, t.twcc_off, tw.value)
                    tw.value = (tw.value + 1) & 0xFFFF
                payload = packet.payload
                _ENTRY.pack_into(self._map, (vext & self._mask) * _ENTRY_SIZE, vext, layer, seq, packet.timestamp, vts)
                self.packets_sent += 1
                self.octets_sent += len(payload)
                return _join((buf, payload))
            if d == 0:
                return None  # duplicate
            if d >= 0x8000:
                return self._late(layer, packet, (self._lseq - seq) & 0xFFFF, now)
            # Forward jump beyond max_gap: treat like a restart of the layer.
        return self._slow(layer, packet, now)

    def rewrite_frame(self, layer: int, packets: list[LayerPacket], now: float) -> list[bytes]:
        """:meth:`rewrite` of each packet of one frame (same ``now``), the
        packets not for this viewer left out — the same bytes and state as
        calling it per packet. The fan-out calls this once per viewer per
        frame: the in-order case runs with the template, counters and
        extension offsets in locals, and any other packet (the first of a
        run, a gap, a late one, a discontinuity) goes through
        :meth:`rewrite` with the state written back first.
        """
        if len(packets) == 1:  # audio, a one-packet frame: nothing to hoist
            data = self.rewrite(layer, packets[0], now)
            return [] if data is None else [data]
        out: list[bytes] = []
        if layer != self._layer:
            for p in packets:
                data = self.rewrite(layer, p, now)
                if data is not None:
                    out.append(data)
            return out
        t = self._tmpl
        buf = t.buf
        abs_off = t.abs_off
        if abs_off:
            # One now for the whole frame: one abs-send-time for all of it.
            _U32.pack_into(buf, abs_off, t.abs_top | (int(now * 262144.0) & 0xFFFFFF))
        twcc_off = t.twcc_off
        tw = self._twcc
        mpt = self._mpt
        ts_off = self._ts_off
        vmap = self._map
        put = _ENTRY.pack_into
        mask = self._mask
        max_gap = self.max_gap
        pack_seq_ts = _SEQ_TS.pack_into
        append = out.append
        vseq = self._vseq
        lseq = self._lseq
        vts = self._last_vts
        sent = octets = 0
        for p in packets:
            seq = p.seq
            d = (seq - lseq) & 0xFFFF
            if 0 < d <= max_gap and not p.discontinuity and layer == self._layer:
                vseq += d
                lseq = seq
                ts = p.timestamp
                vts = (ts + ts_off) & 0xFFFFFFFF
                pack_seq_ts(buf, 1, mpt[p.marker], vseq & 0xFFFF, vts)
                if twcc_off:
                    _U16.pack_into(buf, twcc_off, tw.value)  # type: ignore[union-attr]
                    tw.value = (tw.value + 1) & 0xFFFF  # type: ignore[union-attr]
                payload = p.payload
                put(vmap, (vseq & mask) * _ENTRY_SIZE, vseq, layer, seq, ts, vts)
                sent += 1
                octets += len(payload)
                append(_join((buf, payload)))
                continue
            # Anything else: the per-packet rules, on the state so far.
            if sent:
                self._vseq, self._lseq, self._last_vts, self._last_now = vseq, lseq, vts, now
                self.packets_sent += sent
                self.octets_sent += octets
                sent = octets = 0
            data = self.rewrite(layer, p, now)
            if data is not None:
                append(data)
            # (It wrote the same abs-send-time into the template: same now.)
            vseq, lseq, vts, ts_off = self._vseq, self._lseq, self._last_vts, self._ts_off
        if sent:
            self._vseq, self._lseq, self._last_vts, self._last_now = vseq, lseq, vts, now
            self.packets_sent += sent
            self.octets_sent += octets
        return out

    # -- slow paths ------------------------------------------------------------

    def _slow(self, layer: int, packet: LayerPacket, now: float) -> bytes | None:
        if layer == self._target and packet.keyframe_start:
            if self._layer is not None:
                self.switches += 1
            self._rebase(layer, packet, now)
            return self._emit(layer, packet, self._vseq, now)
        if layer == self._layer:
            # Restart (flagged or a jump beyond max_gap) of the current layer.
            if packet.keyframe_start:
                self._rebase(layer, packet, now)
                return self._emit(layer, packet, self._vseq, now)
            # Mid-GOP: its predecessors are unusable; wait for the next
            # keyframe of this layer (or of a pending target, whichever first).
            self._layer = None
            if self._target is None:
                self._target = layer
            return None
        return None

    def _rebase(self, layer: int, packet: LayerPacket, now: float) -> None:
        self.rebases += 1
        if self._started:
            step = max(1, round((now - self._last_now) * self.params.clock_rate))
            vts = (self._last_vts + step) & 0xFFFFFFFF
        else:
            vts = self._next_vts
            self._started = True
        self._ts_off = (vts - packet.timestamp) & 0xFFFFFFFF
        self._layer = layer
        if self._target == layer:
            self._target = None  # a pending switch to another layer stays pending
        self._lseq = packet.seq
        self._vseq += 1
        self._epoch_vseq = self._vseq
        self._last_vts = vts
        self._last_now = now

    def _late(self, layer: int, packet: LayerPacket, back: int, now: float) -> bytes | None:
        """An older packet of the current run: fill the hole it left, once."""
        vext = self._vseq - back
        if back > self._mask or vext <= self._epoch_vseq:
            self.dropped_late += 1
            return None
        if self._entry(vext) is not None:
            return None  # already sent
        return self._emit(layer, packet, vext, now, in_order=False)

    def _emit(
        self, layer: int, packet: LayerPacket, vext: int, now: float, in_order: bool = True
    ) -> bytes:
        vts = (packet.timestamp + self._ts_off) & 0xFFFFFFFF
        if in_order:
            self._last_vts = vts
            self._last_now = now
        _ENTRY.pack_into(self._map, (vext & self._mask) * _ENTRY_SIZE, vext, layer, packet.seq, packet.timestamp, vts)
        self.packets_sent += 1
        self.octets_sent += len(packet.payload)
        return self._build(self._tmpl, self._mpt[packet.marker], vext & 0xFFFF, vts, packet.payload, now)

    def _build(self, t: _Template, mpt: int, seq: int, ts: int, payload: bytes, now: float) -> bytes:
        buf = t.buf
        _SEQ_TS.pack_into(buf, 1, mpt, seq, ts)
        if t.abs_off:
            _U32.pack_into(buf, t.abs_off, t.abs_top | (int(now * 262144.0) & 0xFFFFFF))
        if t.twcc_off:
            tw = self._twcc
            assert tw is not None
            _U16.pack_into(buf, t.twcc_off, tw.value)
            tw.value = (tw.value + 1) & 0xFFFF
        return _join((buf, payload))

    # -- NACK ------------------------------------------------------------------

    def _entry(self, vext: int) -> tuple[int, int, int, int, int] | None:
        """The map's entry for extended viewer seq ``vext`` (viewer seq,
        layer, layer seq, layer ts, viewer ts), None if another (or none)
        holds its slot."""
        entry = _ENTRY.unpack_from(self._map, (vext & self._mask) * _ENTRY_SIZE)
        return entry if entry[0] == vext else None

    def translate_nack(self, lost: Iterable[int]) -> list[NackTarget]:
        """Map viewer sequence numbers (16-bit, from a Generic NACK) to layer packets.

        Numbers not sent, or older than the map, are left out.
        """
        out: list[NackTarget] = []
        top = self._vseq
        mask = self._mask
        for s in lost:
            back = (top - s) & 0xFFFF
            if back > mask:
                continue
            vext = top - back
            entry = self._entry(vext)
            if entry is not None:
                out.append(NackTarget(vext & 0xFFFF, entry[1], entry[2], entry[3], entry[4]))
        return out

    def retransmit(
        self,
        lost: Iterable[int],
        histories: Sequence[PacketHistory] | Mapping[int, PacketHistory],
        now: float,
        *,
        budget: RetransmitBudget | None = None,
        max_age: float | None = None,
    ) -> list[bytes]:
        """Packets answering a viewer NACK, fetched from the per-layer histories.

        RTX (RFC 4588 §4) when negotiated, else the original packet again. A
        packet already resent less than ``nack_min_interval`` ago is skipped;
        one no longer in the history is counted in ``unrecoverable``; one
        produced more than *max_age* seconds ago (past the viewer's playout
        window) in ``rtx_too_old``; one the *budget* cannot pay for in
        ``rtx_over_budget``. ``retransmitted_bytes`` counts what is returned.
        """
        out: list[bytes] = []
        sent = self._rtx_sent
        for target in self.translate_nack(lost):
            try:
                history = histories[target.layer]
            except (IndexError, KeyError):
                history = None
            packet = (
                history.get(target.layer_seq, now, timestamp=target.layer_ts)
                if history is not None
                else None
            )
            if packet is None:
                self.unrecoverable += 1
                continue
            if max_age is not None:
                age = history.age(target.layer_seq, now)
                if age is not None and age > max_age:
                    self.rtx_too_old += 1
                    continue
            key = target.viewer_seq
            last = sent.get(key)
            if last is not None and now - last < self.nack_min_interval:
                continue
            rtx = self._rtx_tmpl
            size = len(rtx.buf) + 2 + len(packet.payload) if rtx is not None else (
                len(self._tmpl.buf) + len(packet.payload))
            if budget is not None and not budget.take(size, now):
                self.rtx_over_budget += 1
                continue
            sent[key] = now
            out.append(self._resend(target, packet, now))
            self.retransmitted += 1
            self.retransmitted_bytes += size
        if len(sent) > 4 * (self._mask + 1):
            horizon = now - max(self.nack_min_interval, 1.0)
            for k in [k for k, t in sent.items() if t < horizon]:
                del sent[k]
        return out

    def _resend(self, target: NackTarget, packet: LayerPacket, now: float) -> bytes:
        if self._rtx_tmpl is not None:
            rtx_seq = self._rtx_seq
            self._rtx_seq = (rtx_seq + 1) & 0xFFFF
            payload = _U16.pack(target.viewer_seq) + packet.payload
            return self._build(
                self._rtx_tmpl, self._rtx_mpt[packet.marker], rtx_seq, target.viewer_ts, payload, now
            )
        return self._build(
            self._tmpl, self._mpt[packet.marker], target.viewer_seq, target.viewer_ts, packet.payload, now
        )

    # -- probing ---------------------------------------------------------------

    @property
    def can_probe(self) -> bool:
        """Probe packets need RTX: on the media SSRC they would be duplicates
        the viewer counts against its sequence space."""
        return self._rtx_tmpl is not None

    def probe(
        self,
        nbytes: int,
        histories: Sequence[PacketHistory] | Mapping[int, PacketHistory],
        now: float,
        *,
        span: int = 64,
    ) -> list[bytes]:
        """RTX copies (RFC 4588 §4) of recently sent packets adding up to about
        *nbytes*, for bandwidth probing (:mod:`media.rtp.probe`).

        They cycle over the last *span* packets sent: recent enough that every
        receiver takes them as duplicates (aiortc's jitter buffer resets on a
        packet more than 100 behind), still in the history.
        """
        out: list[bytes] = []
        rtx = self._rtx_tmpl
        if rtx is None or not self._started or nbytes <= 0:
            return out
        top = self._vseq
        span = max(1, min(span, self._mask))
        total = 0
        misses = 0
        cursor = self._probe_cursor
        while total < nbytes and misses < span:
            cursor = cursor % span + 1
            vext = top - cursor + 1
            entry = self._entry(vext)
            packet = None
            if entry is not None:
                try:
                    history = histories[entry[1]]
                except (IndexError, KeyError):
                    history = None
                if history is not None:
                    packet = history.get(entry[2], now, timestamp=entry[3])
            if packet is None:
                misses += 1
                continue
            rtx_seq = self._rtx_seq
            self._rtx_seq = (rtx_seq + 1) & 0xFFFF
            data = self._build(
                rtx, self._rtx_mpt[packet.marker], rtx_seq, entry[4],
                _U16.pack(vext & 0xFFFF) + packet.payload, now,
            )
            out.append(data)
            total += len(data)
        self._probe_cursor = cursor
        self.probe_bytes += total
        return out

    # -- RTCP ------------------------------------------------------------------

    def sender_report(
        self, now: float, wall_time: float, anchors: Mapping[int, MediaAnchor] | None = None
    ) -> SenderReport:
        """SR for this track (RFC 3550 §6.4.1) at monotonic *now* / Unix *wall_time*.

        RFC 3550 §6.4.1: the RTP timestamp "corresponds to the same time as
        the NTP timestamp (above), but in the same units and with the same
        random offset as the RTP timestamps in data packets. This
        correspondence may be used for intra- and inter-media
        synchronization". With ``anchors`` (layer index → :class:`MediaAnchor`,
        from the fan-out) it is the viewer timestamp of the media presented
        at *now* on the stream's clock: the current layer's anchor plus this
        viewer's offset for that layer, which a switch or re-base changes
        (and the next report follows). Audio and video of one viewer then
        map equal PTS to one NTP time, whatever the arrival delays (AAC→Opus
        transcoding, network jitter) — the browser's lip sync. Without an
        anchor for the current layer the last packet's timestamp is
        extrapolated to *now*.
        """
        anchor = anchors.get(self._layer) if anchors is not None and self._layer is not None else None
        if anchor is not None:
            rtp_ts = (
                anchor.timestamp + self._ts_off + round((now - anchor.at) * self.params.clock_rate)
            ) & 0xFFFFFFFF
        elif self._started:
            rtp_ts = (self._last_vts + round((now - self._last_now) * self.params.clock_rate)) & 0xFFFFFFFF
        else:
            rtp_ts = self._next_vts
        return build_sr(self.params.ssrc, wall_time, rtp_ts, self.packets_sent, self.octets_sent)
