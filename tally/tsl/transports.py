"""TSL UMD 3.1 and 5.0 transports: the asyncio adapters around :mod:`tally.tsl.codec`.

``TslInput`` listens (UDP and/or TCP) for a switcher's tally and reports the
mapped sources to a ``TallyState`` under its own authority. Defaults: V3.1
tally 1 = program, tally 2 = preview; V5.0 lamps red = program, green =
preview, amber = both (union over the configured lamps).

When is a TSL source lost (decision)
------------------------------------
Only after *silence*: ``lost_after`` seconds without a packet, whatever the
transport, → ``authority_lost`` (sources ``unknown``); the next packet makes
them known again. A TCP connection closing is **not** a loss: 5.0 says the
protocol "can operate over TCP/IP, or any other byte stream interface" with
the DLE/STX wrapper and nothing more — no session, no keepalive — so a
sender may connect, send one packet and close (``tsl-umd-v5`` does exactly
that for every message) and the state it sent stays valid. Neither version
has a keepalive either, and senders that only send on change are
conforming, so ``lost_after`` is off unless configured: set it (a few times
the sender's repeat interval) for senders that resend their state
periodically. Closing the adapter (configuration change, shutdown) loses it.

``TslOutput`` drives tally displays and multiviewers (UDP send or TCP
connect with reconnect): it sends the changed sources on every change and
the full state every ``refresh_interval`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Literal

from tally.errors import ConfigError, TslError
from tally.log import event
from tally.state import Bus, SourceState, Tally, TallyChange, TallyState
from tally.tsl.codec import (
    BROADCAST, DEFAULT_LAMPS, DEFAULT_V31_TALLIES, V31_MAX_ADDRESS, TallyColour, TslV5Message, TslV5Packet,
    TslV5StreamDecoder, TslV31Message, build_v5_packets, parse_v5_datagram, parse_v31_datagram, v5_buses, v31_buses,
    wrap_dle_stx,
)

log = logging.getLogger(__name__)


def _normalise_addresses(mapping: Mapping[int, str | Sequence[str]]) -> dict[int, tuple[str, ...]]:
    out: dict[int, tuple[str, ...]] = {}
    for address, names in mapping.items():
        out[int(address)] = (names,) if isinstance(names, str) else tuple(names)
    return out


# -------------------------------------------------------------- TSL input


class TslInput:
    """Receives a switcher's TSL tally and reports it to a ``TallyState``."""

    def __init__(
        self,
        state: TallyState,
        *,
        authority: str,
        version: Literal[3, 5] = 5,
        addresses: Mapping[int, str | Sequence[str]] | None = None,
        screen: int | None = None,
        tallies: Mapping[int, Bus | str] = DEFAULT_V31_TALLIES,
        lamps: Sequence[str] = DEFAULT_LAMPS,
        lost_after: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if version not in (3, 5):
            raise ConfigError("TSL version must be 3 (3.1) or 5 (5.0)")
        self.state = state
        self.authority = authority
        self.version = version
        mapping = state.tsl_addresses(authority) if addresses is None else _normalise_addresses(addresses)
        state.check_mapping(authority, mapping, "TSL address")
        if version == 3 and any(not 0 <= a <= V31_MAX_ADDRESS for a in mapping):
            raise ConfigError("TSL 3.1 addresses are 0..126")
        self.addresses = mapping
        self.screen = screen
        self.tallies = {int(k): Bus(v) for k, v in tallies.items()}
        if any(not 1 <= k <= 4 for k in self.tallies):
            raise ConfigError("TSL 3.1 tally numbers are 1..4")
        for lamp in lamps:
            if lamp not in DEFAULT_LAMPS:
                raise ConfigError(f"unknown TSL 5.0 lamp {lamp!r}")
        self.lamps = tuple(lamps)
        if lost_after is not None and lost_after <= 0:
            raise ConfigError("lost_after must be positive")
        self.lost_after = lost_after
        self._clock = clock
        self._last_rx: float | None = None
        self._silent = False
        self.packets = 0
        self.errors = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tcp_conns: set[asyncio.Transport] = set()
        self._lost_timer: asyncio.TimerHandle | None = None

    # sans-I/O core --------------------------------------------------------

    def handle_v31(self, messages: Iterable[TslV31Message], now: float) -> TallyChange | None:
        update: dict[str, frozenset[Bus]] = {}
        for msg in messages:
            for name in self.addresses.get(msg.address, ()):
                update[name] = v31_buses(msg, self.tallies)
        return self._report(update, now)

    def handle_v5(self, packet: TslV5Packet, now: float) -> TallyChange | None:
        if self.screen is not None and packet.screen not in (self.screen, BROADCAST):
            return self._report({}, now)
        update: dict[str, frozenset[Bus]] = {}
        for msg in packet.messages:
            buses = v5_buses(msg, self.lamps)
            if msg.index == BROADCAST:
                for names in self.addresses.values():
                    for name in names:
                        update[name] = buses
            else:
                for name in self.addresses.get(msg.index, ()):
                    update[name] = buses
        return self._report(update, now)

    def feed_datagram(self, data: bytes, now: float) -> TallyChange | None:
        """Handle one UDP datagram; malformed data is counted and dropped."""
        try:
            if self.version == 3:
                return self.handle_v31(parse_v31_datagram(data), now)
            change = None
            for packet in parse_v5_datagram(data):
                change = self.handle_v5(packet, now) or change
            return change
        except TslError as exc:
            self.errors += 1
            event(log, logging.WARNING, "tsl.input_malformed", authority=self.authority, error=str(exc))
            return None

    def check(self, now: float) -> TallyChange | None:
        """Silence detection: after ``lost_after`` s without a packet the
        authority is lost."""
        if self.lost_after is None or self._last_rx is None:
            return None
        if now - self._last_rx >= self.lost_after and not self._silent:
            self._silent = True
            event(log, logging.WARNING, "tsl.input_silent", authority=self.authority,
                  silent_s=round(now - self._last_rx, 3))
            return self.state.authority_lost(self.authority, now=now)
        return None

    def _report(self, update: dict[str, frozenset[Bus]], now: float) -> TallyChange | None:
        self.packets += 1
        self._last_rx = now
        self._silent = False
        self._arm_lost_timer()
        if not update:
            return None
        return self.state.report(self.authority, update, full=False, now=now)

    # asyncio --------------------------------------------------------------

    async def listen_udp(self, host: str = "0.0.0.0", port: int = 0) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _TslUdpProtocol(self), local_addr=(host, port)
        )
        self._udp = transport
        return transport.get_extra_info("sockname")[:2]

    async def listen_tcp(self, host: str = "0.0.0.0", port: int = 0) -> tuple[str, int]:
        if self.version != 5:
            raise ConfigError("TSL over TCP is defined for 5.0 only")
        loop = asyncio.get_running_loop()
        self._tcp = await loop.create_server(lambda: _TslTcpProtocol(self), host, port)
        return self._tcp.sockets[0].getsockname()[:2]

    async def close(self) -> None:
        if self._lost_timer is not None:
            self._lost_timer.cancel()
            self._lost_timer = None
        if self._udp is not None:
            protocol = self._udp.get_protocol()
            self._udp.close()
            self._udp = None
            # The socket is released one loop iteration later: wait, so a new
            # input (configuration change) can bind the same port at once.
            if isinstance(protocol, _TslUdpProtocol):
                await protocol.closed
        if self._tcp is not None:
            self._tcp.close()
            for t in list(self._tcp_conns):
                t.close()
            await self._tcp.wait_closed()
            self._tcp = None
        # Nobody listens for this authority any more: what it reported can
        # no longer be corrected, so it must not stay lit.
        self.state.authority_lost(self.authority, now=self._clock())

    def _arm_lost_timer(self) -> None:
        if self.lost_after is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._lost_timer is not None:
            self._lost_timer.cancel()
        self._lost_timer = loop.call_later(self.lost_after, self._on_silence)

    def _on_silence(self) -> None:
        self._lost_timer = None
        now = self._clock()
        self.check(now)
        if self._last_rx is not None and not self._silent and self.lost_after is not None:
            # Fired early (loop clocks have millisecond granularity): re-arm.
            remaining = self._last_rx + self.lost_after - now
            self._lost_timer = asyncio.get_running_loop().call_later(max(remaining, 0.0) + 0.001, self._on_silence)

    def _tcp_closed(self, transport: asyncio.Transport) -> None:
        # Not a loss (see "When is a TSL source lost"): one-shot senders
        # close after every message. Only silence (lost_after) counts.
        self._tcp_conns.discard(transport)


class _TslUdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, owner: TslInput) -> None:
        self.owner = owner
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: object) -> None:
        self.owner.feed_datagram(data, self.owner._clock())

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class _TslTcpProtocol(asyncio.Protocol):
    def __init__(self, owner: TslInput) -> None:
        self.owner = owner
        self.decoder = TslV5StreamDecoder()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        self.transport = transport  # type: ignore[assignment]
        self.owner._tcp_conns.add(transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        before = self.decoder.errors
        packets = self.decoder.feed(data)
        if self.decoder.errors != before:
            self.owner.errors += self.decoder.errors - before
            event(log, logging.WARNING, "tsl.input_framing_error", authority=self.owner.authority,
                  error=str(self.decoder.last_error))
        now = self.owner._clock()
        for packet in packets:
            self.owner.handle_v5(packet, now)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.owner._tcp_closed(self.transport)


# ------------------------------------------------------------- TSL output


class TslOutput:
    """Sends tally to TSL displays: on every change, and the full state every
    ``refresh_interval`` seconds (a display that rebooted or missed a
    datagram recovers within a second)."""

    def __init__(
        self,
        state: TallyState,
        *,
        version: Literal[3, 5] = 5,
        addresses: Mapping[str, int] | None = None,
        screen: int = 0,
        utf16: bool = False,
        brightness: int = 3,
        lamps: Sequence[str] = DEFAULT_LAMPS,
        tallies: Mapping[Bus | str, int] | None = None,
        both: TallyColour = TallyColour.AMBER,
        refresh_interval: float = 1.0,
        dle_stx_udp: bool = False,
        backoff_initial: float = 0.5,
        backoff_max: float = 10.0,
    ) -> None:
        if version not in (3, 5):
            raise ConfigError("TSL version must be 3 (3.1) or 5 (5.0)")
        self.state = state
        self.version = version
        if addresses is None:
            addresses = {c.name: c.tsl_address for c in state.sources.values() if c.tsl_address is not None}
        for name, address in addresses.items():
            if name not in state.sources:
                raise ConfigError(f"TSL output maps unknown source {name!r}")
            limit = V31_MAX_ADDRESS if version == 3 else 0xFFFE
            if not 0 <= address <= limit:
                raise ConfigError(f"TSL address {address} for {name} is out of range 0..{limit}")
        self.addresses = dict(addresses)
        self.screen = screen
        self.utf16 = utf16
        self.brightness = brightness
        for lamp in lamps:
            if lamp not in DEFAULT_LAMPS:
                raise ConfigError(f"unknown TSL 5.0 lamp {lamp!r}")
        self.lamps = tuple(lamps)
        self.tallies = {Bus(k): int(v) for k, v in (tallies or {Bus.PROGRAM: 1, Bus.PREVIEW: 2}).items()}
        self.both = TallyColour(both)
        if refresh_interval <= 0:
            raise ConfigError("refresh_interval must be positive")
        self.refresh_interval = refresh_interval
        self.dle_stx_udp = dle_stx_udp
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.sent = 0
        self._send: Callable[[bytes], None] | None = None
        self._wrapped = False
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp_task: asyncio.Task[None] | None = None
        self._tcp_transport: asyncio.Transport | None = None
        self._refresh: asyncio.TimerHandle | None = None
        self._closing = False

    # sans-I/O core --------------------------------------------------------

    def _colour(self, st: SourceState) -> TallyColour:
        if st.state is Tally.UNKNOWN:
            return TallyColour.OFF
        on_pgm = Bus.PROGRAM in st.buses
        on_pvw = Bus.PREVIEW in st.buses
        if on_pgm and on_pvw:
            return self.both
        if on_pgm:
            return TallyColour.RED
        if on_pvw:
            return TallyColour.GREEN
        return TallyColour.OFF

    def encode(self, states: Mapping[str, SourceState]) -> list[bytes]:
        """Packets (unwrapped) for the mapped sources among ``states``."""
        items = [(self.addresses[n], st) for n, st in states.items() if n in self.addresses]
        if self.version == 3:
            out = []
            for address, st in items:
                lit = set() if st.state is Tally.UNKNOWN else set(st.buses)
                tally = [False, False, False, False]
                for bus, number in self.tallies.items():
                    if bus in lit:
                        tally[number - 1] = True
                out.append(TslV31Message(address, tuple(tally), self.brightness, st.label).serialize())  # type: ignore[arg-type]
            return out
        messages = []
        for address, st in items:
            colour = self._colour(st)
            messages.append(
                TslV5Message(
                    address,
                    right=colour if "right" in self.lamps else TallyColour.OFF,
                    text_tally=colour if "text" in self.lamps else TallyColour.OFF,
                    left=colour if "left" in self.lamps else TallyColour.OFF,
                    brightness=self.brightness,
                    text=st.label,
                )
            )
        return [p.serialize() for p in build_v5_packets(messages, screen=self.screen, utf16=self.utf16)]

    # asyncio --------------------------------------------------------------

    async def start_udp(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, remote_addr=(host, port))
        self._udp = transport
        self._wrapped = self.dle_stx_udp and self.version == 5
        self._send = transport.sendto
        self._start()

    async def start_tcp(self, host: str, port: int, *, connect_timeout: float = 3.0) -> None:
        if self.version != 5:
            raise ConfigError("TSL over TCP is defined for 5.0 only")
        self._wrapped = True
        self._tcp_task = asyncio.get_running_loop().create_task(
            self._tcp_loop(host, port, connect_timeout), name=f"tsl-out-{host}:{port}"
        )
        self._start()

    def _start(self) -> None:
        self.state.add_listener(self._on_change)
        self._refresh = asyncio.get_running_loop().call_later(self.refresh_interval, self._on_refresh)

    async def close(self) -> None:
        self._closing = True
        self.state.remove_listener(self._on_change)
        if self._refresh is not None:
            self._refresh.cancel()
            self._refresh = None
        if self._tcp_task is not None:
            self._tcp_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tcp_task
            self._tcp_task = None
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        self._send = None

    def send_states(self, states: Mapping[str, SourceState]) -> int:
        """Encode and send now; returns the number of packets sent."""
        if self._send is None:
            return 0
        n = 0
        for packet in self.encode(states):
            try:
                self._send(wrap_dle_stx(packet) if self._wrapped else packet)
            except (OSError, RuntimeError) as exc:
                event(log, logging.WARNING, "tsl.output_send_failed", error=str(exc))
                return n
            n += 1
        self.sent += n
        return n

    def _on_change(self, change: TallyChange) -> None:
        self.send_states(change.sources)

    def _on_refresh(self) -> None:
        self.send_states(self.state.states())
        if not self._closing:
            self._refresh = asyncio.get_running_loop().call_later(self.refresh_interval, self._on_refresh)

    async def _tcp_loop(self, host: str, port: int, connect_timeout: float) -> None:
        delay = self.backoff_initial
        loop = asyncio.get_running_loop()
        while not self._closing:
            lost: asyncio.Future[None] = loop.create_future()
            try:
                async with asyncio.timeout(connect_timeout):  # not wait_for: see vmix._session
                    transport, _ = await loop.create_connection(lambda: _TslOutTcpProtocol(lost), host, port)
            except (OSError, TimeoutError) as exc:
                event(log, logging.WARNING, "tsl.output_connect_failed", host=host, port=port, error=str(exc))
            else:
                delay = self.backoff_initial
                self._tcp_transport = transport  # type: ignore[assignment]
                self._send = transport.write  # type: ignore[attr-defined]
                self.send_states(self.state.states())
                try:
                    await lost
                finally:
                    self._send = None
                    self._tcp_transport = None
                    transport.close()
                event(log, logging.WARNING, "tsl.output_lost", host=host, port=port)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff_max)


class _TslOutTcpProtocol(asyncio.Protocol):
    def __init__(self, lost: asyncio.Future[None]) -> None:
        self.lost = lost

    def data_received(self, data: bytes) -> None:
        """Displays do not answer in 5.0; anything received is ignored."""

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


__all__ = ["TslInput", "TslOutput"]
