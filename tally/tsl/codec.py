"""TSL UMD 3.1 and 5.0 codec: sans-I/O framing, parse and build (no asyncio).

TSL UMD protocol V3.1 (one 18-byte message per display; UDP, or RS-422 at
38k4 8E1 on the original bus):

* ``HEADER`` (1 byte): "Display address (0~126) + 80 hex".
* ``CONTROL`` (1 byte): "bit 0: Tally 1, bit 1: Tally 2, bit 2: Tally 3,
  bit 3: Tally 4, bits 4-5: brightness data, bit 6: reserved, bit 7:
  cleared to 0". Brightness 0..3 (0, 1/7, 1/2, full).
* ``DISPLAY DATA`` (16 bytes): "16 displayable ASCII characters".

TSL UMD protocol V5.0 (16-bit values "sent as little-endian, i.e. LSB/MSB"):

* Physical layer: "Packets are sent via UDP. Maximum packet length is 2048
  bytes. Optionally, the protocol can operate over TCP/IP, or any other byte
  stream interface, with the following wrapper scheme: DLE is defined as 0xFE,
  STX is defined as 0x02. Packet start is delimited by the sequence DLE/STX.
  Any occurrence of the DLE character in the packet is byte stuffed to
  DLE/DLE. Any byte count fields in the packet are not affected by the byte
  stuffing." Some UDP devices also wrap datagrams that way: we accept both.
* Packet: ``PBC / VER / FLAGS / SCREEN / (<DMSG> (/<DMSG>)…) or (SCONTROL)``.
  ``PBC`` (16 bit) "total byte count of following packet"; ``VER`` (8 bit)
  minor version (5.00 → 0); ``FLAGS`` (8 bit) "bit 0: clear for ASCII based
  strings in packet, set for Unicode UTF-16LE; bit 1: if set, data after
  SCREEN is screen control data (SCONTROL) – otherwise it is display message
  data (DMSG); bits 2-7 reserved (clear to 0)"; ``SCREEN`` (16 bit) screen
  index, 0xFFFF = broadcast.
* ``DMSG``: ``INDEX`` (16 bit, 0..65534, 0xFFFF = broadcast), ``CONTROL``
  (16 bit: bits 0-1 right-hand tally, bits 2-3 text tally, bits 4-5
  left-hand tally, bits 6-7 brightness, bits 8-14 reserved, bit 15 "control
  data": cleared = display data follows), ``LENGTH`` (16 bit byte count of
  TEXT), ``TEXT``. Tally colours: 0 off, 1 red, 2 green, 3 amber.
  Control data (bit 15) and SCONTROL are not defined in 5.0: a DMSG with bit
  15 set cannot be skipped reliably, so such a packet is rejected; an SCONTROL
  packet is kept as opaque bytes.

``TslV5StreamDecoder`` re-frames a TCP byte stream (any chunking) into
packets; it resynchronises at the next DLE/STX after garbage, counting
errors instead of raising.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar

from tally.errors import ConfigError, TslError
from tally.state import Bus

DLE = 0xFE
STX = 0x02
_DLE_B = b"\xfe"
_DLE_STX = b"\xfe\x02"
BROADCAST = 0xFFFF
MAX_V5_PACKET = 2048  # "Maximum packet length is 2048 bytes"
V31_SIZE = 18
V31_MAX_ADDRESS = 126  # "Display address (0~126) + 80 hex"
_V5_HEADER = struct.Struct("<HBBH")  # PBC, VER, FLAGS, SCREEN
_V5_DMSG = struct.Struct("<HHH")  # INDEX, CONTROL, LENGTH
_FLAG_UTF16 = 0x01
_FLAG_SCONTROL = 0x02
_CONTROL_DATA = 0x8000


class TallyColour(IntEnum):
    """TSL 5.0 lamp colours (2-bit fields of CONTROL)."""

    OFF = 0
    RED = 1
    GREEN = 2
    AMBER = 3


# ------------------------------------------------------------------ TSL 3.1


@dataclass(frozen=True, slots=True)
class TslV31Message:
    """One TSL UMD 3.1 display message (18 bytes)."""

    address: int
    tally: tuple[bool, bool, bool, bool] = (False, False, False, False)
    brightness: int = 3
    text: str = ""

    SIZE: ClassVar[int] = V31_SIZE

    def __post_init__(self) -> None:
        if not 0 <= self.address <= V31_MAX_ADDRESS:
            raise TslError(f"TSL 3.1 address must be 0..{V31_MAX_ADDRESS}: {self.address}")
        if len(self.tally) != 4:
            raise TslError("TSL 3.1 has four tallies")
        object.__setattr__(self, "tally", tuple(bool(t) for t in self.tally))
        if not 0 <= self.brightness <= 3:
            raise TslError(f"TSL 3.1 brightness must be 0..3: {self.brightness}")

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> TslV31Message:
        if len(data) != V31_SIZE:
            raise TslError(f"TSL 3.1 message must be {V31_SIZE} bytes, got {len(data)}")
        header, control = data[0], data[1]
        # HEADER: address + 0x80, so bit 7 is always set.
        if header < 0x80 or header - 0x80 > V31_MAX_ADDRESS:
            raise TslError(f"TSL 3.1 header byte 0x{header:02x} is not 0x80 + address 0..126")
        # CONTROL bit 7: "cleared to 0" for display data.
        if control & 0x80:
            raise TslError("TSL 3.1 control byte bit 7 is set (command data is not defined)")
        tally = (bool(control & 1), bool(control & 2), bool(control & 4), bool(control & 8))
        brightness = (control >> 4) & 0x03
        text = bytes(data[2:18]).decode("latin-1").rstrip(" \x00")
        return cls(header - 0x80, tally, brightness, text)

    def serialize(self) -> bytes:
        control = (
            (1 if self.tally[0] else 0)
            | (2 if self.tally[1] else 0)
            | (4 if self.tally[2] else 0)
            | (8 if self.tally[3] else 0)
            | (self.brightness << 4)
        )
        # DISPLAY DATA: 16 displayable ASCII characters, space padded.
        text = "".join(ch if " " <= ch <= "~" else "?" for ch in self.text[:16]).ljust(16)
        return bytes((0x80 + self.address, control)) + text.encode("ascii")

    __bytes__ = serialize


def parse_v31_datagram(data: bytes | bytearray | memoryview) -> list[TslV31Message]:
    """A datagram holds one or more concatenated 18-byte messages."""
    if not data or len(data) % V31_SIZE:
        raise TslError(f"TSL 3.1 datagram length {len(data)} is not a multiple of {V31_SIZE}")
    view = memoryview(data)
    return [TslV31Message.parse(view[i : i + V31_SIZE]) for i in range(0, len(data), V31_SIZE)]


# ------------------------------------------------------------------ TSL 5.0


@dataclass(frozen=True, slots=True)
class TslV5Message:
    """One TSL 5.0 DMSG (display message)."""

    index: int
    right: TallyColour = TallyColour.OFF
    text_tally: TallyColour = TallyColour.OFF
    left: TallyColour = TallyColour.OFF
    brightness: int = 3
    text: str = ""

    def __post_init__(self) -> None:
        if not 0 <= self.index <= 0xFFFF:
            raise TslError(f"TSL 5.0 index must be 0..65535: {self.index}")
        if not 0 <= self.brightness <= 3:
            raise TslError(f"TSL 5.0 brightness must be 0..3: {self.brightness}")
        for name in ("right", "text_tally", "left"):
            object.__setattr__(self, name, TallyColour(getattr(self, name)))

    @property
    def control(self) -> int:
        # CONTROL bits 0-1 RH tally, 2-3 text tally, 4-5 LH tally,
        # 6-7 brightness; bit 15 clear = display data follows.
        return int(self.right) | (int(self.text_tally) << 2) | (int(self.left) << 4) | (self.brightness << 6)

    def lamp(self, name: str) -> TallyColour:
        if name == "right":
            return self.right
        if name == "left":
            return self.left
        if name == "text":
            return self.text_tally
        raise ConfigError(f"unknown TSL 5.0 lamp {name!r} (right, text, left)")

    def serialize(self, utf16: bool = False) -> bytes:
        text = self.text.encode("utf-16-le") if utf16 else _ascii(self.text)
        return _V5_DMSG.pack(self.index, self.control, len(text)) + text


def _ascii(text: str) -> bytes:
    return "".join(ch if " " <= ch <= "~" else "?" for ch in text).encode("ascii")


@dataclass(frozen=True, slots=True)
class TslV5Packet:
    """One TSL 5.0 packet (unwrapped: starts with PBC)."""

    screen: int = 0
    messages: tuple[TslV5Message, ...] = ()
    utf16: bool = False
    version: int = 0
    scontrol: bytes | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.screen <= 0xFFFF:
            raise TslError(f"TSL 5.0 screen must be 0..65535: {self.screen}")
        if not 0 <= self.version <= 0xFF:
            raise TslError("TSL 5.0 VER is one byte")
        object.__setattr__(self, "messages", tuple(self.messages))
        if self.scontrol is not None and self.messages:
            raise TslError("a TSL 5.0 packet carries either DMSGs or SCONTROL, not both")

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> TslV5Packet:
        """Parse one unwrapped packet; ``data`` must be exactly PBC+2 bytes."""
        view = memoryview(data)
        if len(view) < _V5_HEADER.size:
            raise TslError(f"TSL 5.0 packet too short: {len(view)} bytes")
        pbc, ver, flags, screen = _V5_HEADER.unpack_from(view)
        if pbc + 2 != len(view):
            raise TslError(f"TSL 5.0 PBC {pbc} does not match {len(view) - 2} following bytes")
        if len(view) > MAX_V5_PACKET:
            raise TslError(f"TSL 5.0 packet of {len(view)} bytes exceeds {MAX_V5_PACKET}")
        utf16 = bool(flags & _FLAG_UTF16)
        if flags & _FLAG_SCONTROL:
            return cls(screen, (), utf16, ver, bytes(view[_V5_HEADER.size :]))
        pos = _V5_HEADER.size
        messages = []
        while pos < len(view):
            if pos + _V5_DMSG.size > len(view):
                raise TslError("TSL 5.0 DMSG header truncated")
            index, control, length = _V5_DMSG.unpack_from(view, pos)
            if control & _CONTROL_DATA:
                raise TslError("TSL 5.0 DMSG control data (bit 15) is not defined in 5.0")
            pos += _V5_DMSG.size
            if pos + length > len(view):
                raise TslError(f"TSL 5.0 DMSG text length {length} runs past the packet")
            raw = bytes(view[pos : pos + length])
            pos += length
            if utf16:
                if length % 2:
                    raise TslError("TSL 5.0 UTF-16LE text has an odd byte count")
                text = raw.decode("utf-16-le", "replace")
            else:
                text = raw.decode("latin-1")
            messages.append(
                TslV5Message(
                    index,
                    TallyColour(control & 3),
                    TallyColour((control >> 2) & 3),
                    TallyColour((control >> 4) & 3),
                    (control >> 6) & 3,
                    text,
                )
            )
        return cls(screen, tuple(messages), utf16, ver)

    def serialize(self) -> bytes:
        flags = (_FLAG_UTF16 if self.utf16 else 0) | (_FLAG_SCONTROL if self.scontrol is not None else 0)
        if self.scontrol is not None:
            body = self.scontrol
        else:
            body = b"".join(m.serialize(self.utf16) for m in self.messages)
        size = _V5_HEADER.size + len(body)
        if size > MAX_V5_PACKET:
            raise TslError(f"TSL 5.0 packet of {size} bytes exceeds {MAX_V5_PACKET}")
        return _V5_HEADER.pack(size - 2, self.version, flags, self.screen) + body

    __bytes__ = serialize

    def serialize_wrapped(self) -> bytes:
        """DLE/STX framing with DLE stuffing (TCP, and UDP for devices that
        expect it)."""
        return wrap_dle_stx(self.serialize())


def wrap_dle_stx(packet: bytes) -> bytes:
    # "Packet start is delimited by the sequence DLE/STX. Any occurrence of
    # the DLE character in the packet is byte stuffed to DLE/DLE."
    return _DLE_STX + packet.replace(_DLE_B, _DLE_B + _DLE_B)


def build_v5_packets(
    messages: Iterable[TslV5Message], *, screen: int = 0, utf16: bool = False
) -> list[TslV5Packet]:
    """Pack DMSGs into as few packets as fit in 2048 bytes each."""
    packets: list[TslV5Packet] = []
    batch: list[TslV5Message] = []
    size = _V5_HEADER.size
    for m in messages:
        n = len(m.serialize(utf16))
        if _V5_HEADER.size + n > MAX_V5_PACKET:
            raise TslError(f"TSL 5.0 DMSG for index {m.index} does not fit in one packet")
        if size + n > MAX_V5_PACKET:
            packets.append(TslV5Packet(screen, tuple(batch), utf16))
            batch, size = [], _V5_HEADER.size
        batch.append(m)
        size += n
    if batch:
        packets.append(TslV5Packet(screen, tuple(batch), utf16))
    return packets


class TslV5StreamDecoder:
    """Re-frames a DLE/STX-wrapped TSL 5.0 byte stream into packets.

    Feed it chunks as they arrive; it returns the packets completed by each
    chunk. A packet ends when PBC+2 unstuffed bytes have been collected.
    Garbage, a lone DLE, a truncated packet (DLE/STX before PBC is reached)
    or a malformed packet is counted in ``errors`` (``last_error`` holds the
    latest) and the decoder hunts for the next DLE/STX.
    """

    def __init__(self, max_packet: int = MAX_V5_PACKET) -> None:
        self._max = max_packet
        self._pkt = bytearray()
        self._in_packet = False
        self._after_dle = False
        self.errors = 0
        self.last_error: TslError | None = None

    @property
    def mid_packet(self) -> bool:
        """True when the bytes fed so far end inside a packet."""
        return self._in_packet or self._after_dle

    def _error(self, text: str) -> None:
        self.errors += 1
        self.last_error = TslError(text)
        self._in_packet = False
        self._pkt.clear()

    def _complete(self, out: list[TslV5Packet]) -> None:
        """Emit the packet if PBC bytes are in; drop trailing junk."""
        pkt = self._pkt
        if len(pkt) < 2:
            return
        total = (pkt[0] | (pkt[1] << 8)) + 2
        if total > self._max:
            self._error(f"TSL 5.0 PBC announces {total} bytes, more than {self._max}")
            return
        if len(pkt) < total:
            return
        junk = len(pkt) - total
        try:
            out.append(TslV5Packet.parse(bytes(pkt[:total])))
        except TslError as exc:
            self.errors += 1
            self.last_error = exc
        if junk:
            self.errors += 1
            self.last_error = TslError(f"{junk} stray bytes after a TSL 5.0 packet")
        self._in_packet = False
        pkt.clear()

    def feed(self, data: bytes | bytearray | memoryview) -> list[TslV5Packet]:
        out: list[TslV5Packet] = []
        data = bytes(data)
        i, n = 0, len(data)
        while i < n:
            if self._after_dle:
                self._after_dle = False
                b = data[i]
                if b == STX:
                    i += 1
                    if self._in_packet and self._pkt:
                        self._error("TSL 5.0 packet truncated by a new DLE/STX")
                    self._in_packet = True
                    self._pkt.clear()
                elif b == DLE and self._in_packet:
                    i += 1
                    self._pkt.append(DLE)
                    self._complete(out)
                else:
                    # A lone DLE: the packet (if any) is broken. The byte is
                    # not consumed: it may be the DLE of the next DLE/STX.
                    self._error(f"DLE followed by 0x{b:02x} (expected STX or DLE)")
                continue
            j = data.find(_DLE_B, i)
            end = n if j < 0 else j
            if self._in_packet:
                self._pkt += data[i:end]
                self._complete(out)
            elif end > i:
                self.errors += 1
                self.last_error = TslError(f"{end - i} bytes outside a DLE/STX packet")
            if j < 0:
                break
            self._after_dle = True
            i = j + 1
        return out


def parse_v5_datagram(data: bytes | bytearray | memoryview) -> list[TslV5Packet]:
    """Parse a UDP datagram: DLE/STX-wrapped packets or raw packets."""
    data = bytes(data)
    if data.startswith(_DLE_STX):
        decoder = TslV5StreamDecoder()
        packets = decoder.feed(data)
        if decoder.errors or decoder.mid_packet:
            raise decoder.last_error or TslError("TSL 5.0 datagram ends inside a packet")
        return packets
    packets = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < 2:
            raise TslError("TSL 5.0 datagram has a trailing byte")
        total = struct.unpack_from("<H", data, pos)[0] + 2
        if pos + total > len(data):
            raise TslError(f"TSL 5.0 PBC {total - 2} runs past the datagram")
        packets.append(TslV5Packet.parse(data[pos : pos + total]))
        pos += total
    if not packets:
        raise TslError("empty TSL 5.0 datagram")
    return packets


# ----------------------------------------------------------------- mapping

DEFAULT_V31_TALLIES: Mapping[int, Bus] = {1: Bus.PROGRAM, 2: Bus.PREVIEW}
DEFAULT_LAMPS: tuple[str, ...] = ("right", "text", "left")
_COLOUR_BUSES: dict[TallyColour, frozenset[Bus]] = {
    TallyColour.OFF: frozenset(),
    TallyColour.RED: frozenset({Bus.PROGRAM}),
    TallyColour.GREEN: frozenset({Bus.PREVIEW}),
    TallyColour.AMBER: frozenset({Bus.PROGRAM, Bus.PREVIEW}),
}


def v31_buses(msg: TslV31Message, tallies: Mapping[int, Bus] = DEFAULT_V31_TALLIES) -> frozenset[Bus]:
    return frozenset(bus for number, bus in tallies.items() if msg.tally[number - 1])


def v5_buses(msg: TslV5Message, lamps: Sequence[str] = DEFAULT_LAMPS) -> frozenset[Bus]:
    """Red = program, green = preview, amber = both; union over ``lamps``."""
    out: frozenset[Bus] = frozenset()
    for lamp in lamps:
        out |= _COLOUR_BUSES[msg.lamp(lamp)]
    return out
