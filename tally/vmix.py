"""vMix TCP API tally client.

Protocol (vMix TCP API, port 8099, ASCII lines terminated by ``\\r\\n``):

* On connect vMix greets with ``VERSION OK <version>``.
* ``SUBSCRIBE TALLY`` → ``SUBSCRIBE OK TALLY``; from then on vMix pushes
  ``TALLY OK <digits>`` on every change, one digit per input starting with
  input 1: ``0`` off, ``1`` program, ``2`` preview.
* ``TALLY`` asks for the current tally once (answered ``TALLY OK …``); we
  send it right after subscribing to get the initial state, and then as a
  probe whenever nothing has been received for ``probe_interval`` seconds:
  vMix has no keepalive, and a half-open TCP connection would otherwise keep
  showing the last colours. No answer within ``probe_timeout`` → the link is
  declared lost (``authority_lost``) and the client reconnects.
* Errors are ``<COMMAND> ER <message>``.

TCP delivers bytes, not lines: ``LineSplitter`` (sans-I/O) re-splits chunks
into lines, accepts ``\\n`` alone as a terminator and refuses lines longer
than ``max_line`` (the connection is then reset).

Mapping: vMix input number (1-based) → sources. A full report is made on
every ``TALLY OK`` line: mapped inputs beyond the digit string are off.
Reconnects use exponential backoff (``backoff_initial`` doubling up to
``backoff_max``), reset after a session that got as far as a tally.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from tally.adapter import ReconnectingClient
from tally.errors import ConfigError, HandshakeFailed, VmixError
from tally.log import event
from tally.state import Bus, TallyChange, TallyState

log = logging.getLogger(__name__)

DEFAULT_PORT = 8099
MAX_LINE = 64 * 1024


class LineSplitter:
    """Splits a byte stream into text lines (sans-I/O)."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        if max_line < 1:
            raise ConfigError("max_line must be positive")
        self.max_line = max_line
        self._buf = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> list[str]:
        """Return the complete lines in ``data`` (without terminators).

        Raises ``VmixError`` when a line exceeds ``max_line`` bytes; the
        splitter is then reset."""
        buf = self._buf
        buf += data
        lines: list[str] = []
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            end = nl - 1 if nl > start and buf[nl - 1] == 0x0D else nl
            if end - start > self.max_line:
                buf.clear()
                raise VmixError(f"vMix line longer than {self.max_line} bytes")
            lines.append(buf[start:end].decode("utf-8", "replace"))
            start = nl + 1
        del buf[:start]
        if len(buf) > self.max_line + 1:
            buf.clear()
            raise VmixError(f"vMix line longer than {self.max_line} bytes")
        return lines


# ------------------------------------------------------------ vMix messages


@dataclass(frozen=True, slots=True)
class VmixTally:
    """``TALLY OK <digits>``: per-input state from input 1 (0/1/2)."""

    states: tuple[int, ...]

    OFF = 0
    PROGRAM = 1
    PREVIEW = 2

    @classmethod
    def parse(cls, line: str) -> VmixTally:
        parts = line.split(" ")
        if len(parts) != 3 or parts[0] != "TALLY" or parts[1] != "OK":
            raise VmixError(f"not a TALLY OK line: {line[:80]!r}")
        digits = parts[2]
        if not digits.isascii() or any(ch not in "012" for ch in digits):
            raise VmixError(f"vMix tally digits must be 0, 1 or 2: {digits[:80]!r}")
        return cls(tuple(ord(ch) - 48 for ch in digits))

    def serialize(self) -> bytes:
        return b"TALLY OK " + bytes(48 + s for s in self.states) + b"\r\n"

    def buses(self, vmix_input: int) -> frozenset[Bus]:
        if 1 <= vmix_input <= len(self.states):
            s = self.states[vmix_input - 1]
            if s == self.PROGRAM:
                return frozenset({Bus.PROGRAM})
            if s == self.PREVIEW:
                return frozenset({Bus.PREVIEW})
        return frozenset()


@dataclass(frozen=True, slots=True)
class VmixReply:
    """Any other reply: ``<COMMAND> <OK|ER> [text]``."""

    command: str
    ok: bool
    text: str


VmixMessage = VmixTally | VmixReply


def parse_line(line: str) -> VmixMessage:
    """Parse one vMix reply line; raises ``VmixError`` if malformed."""
    if line.startswith("TALLY OK"):
        return VmixTally.parse(line)
    parts = line.split(" ", 2)
    if len(parts) < 2 or not parts[0] or parts[1] not in ("OK", "ER"):
        raise VmixError(f"unrecognised vMix line: {line[:80]!r}")
    return VmixReply(parts[0], parts[1] == "OK", parts[2] if len(parts) > 2 else "")


# ------------------------------------------------------------------ client


def _normalise(mapping: Mapping[int, str | Sequence[str]]) -> dict[int, tuple[str, ...]]:
    out: dict[int, tuple[str, ...]] = {}
    for number, names in mapping.items():
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            raise ConfigError(f"vMix input numbers start at 1: {number!r}")
        out[number] = (names,) if isinstance(names, str) else tuple(names)
    return out


class VmixClient(ReconnectingClient):
    """Keeps a subscription to vMix tally and reports it to a ``TallyState``."""

    def __init__(
        self,
        state: TallyState,
        host: str,
        port: int = DEFAULT_PORT,
        *,
        authority: str = "vmix",
        inputs: Mapping[int, str | Sequence[str]] | None = None,
        backoff_initial: float = 0.5,
        backoff_max: float = 10.0,
        connect_timeout: float = 3.0,
        probe_interval: float | None = 1.0,
        probe_timeout: float = 3.0,
        max_line: int = MAX_LINE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(state, authority, backoff_initial=backoff_initial, backoff_max=backoff_max, clock=clock)
        self.host = host
        self.port = port
        self._task_name = f"vmix-{host}:{port}"
        self.inputs = state.vmix_inputs(authority) if inputs is None else _normalise(inputs)
        state.check_mapping(authority, self.inputs, "vMix")
        self.connect_timeout = connect_timeout
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.max_line = max_line
        self._got_tally = False
        self.connects = 0
        self.errors = 0
        self.version: str | None = None
        self.last_delay: float | None = None

    def handle_tally(self, tally: VmixTally, now: float) -> TallyChange | None:
        """Map one ``TALLY OK`` to a full report (sans-I/O entry point)."""
        report: dict[str, frozenset[Bus]] = {}
        for number, names in self.inputs.items():
            buses = tally.buses(number)
            for name in names:
                report[name] = report.get(name, frozenset()) | buses
        return self.state.report(self.authority, report, full=True, now=now)

    async def _run(self) -> None:
        delay = self.backoff_initial
        while not self._closing:
            self._got_tally = False
            try:
                await self._session()
            except (OSError, TimeoutError, EOFError) as exc:
                event(log, logging.WARNING, "vmix.connection_failed", host=self.host, port=self.port,
                      error=str(exc) or type(exc).__name__)
            except HandshakeFailed as exc:
                self.errors += 1
                event(log, logging.ERROR, "vmix.refused", host=self.host, port=self.port, error=str(exc))
            except VmixError as exc:
                self.errors += 1
                event(log, logging.WARNING, "vmix.protocol_error", host=self.host, port=self.port, error=str(exc))
            finally:
                self._lost()
            if self._got_tally:
                delay = self.backoff_initial
            self.last_delay = delay
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff_max)

    async def _session(self) -> None:
        """One connection; returns only by raising (EOF, timeout, error)."""
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow
        # a cancellation that races with completion, and close() would then
        # wait for a task that keeps reconnecting.
        async with asyncio.timeout(self.connect_timeout):
            reader, writer = await asyncio.open_connection(self.host, self.port)
        self.connects += 1
        try:
            splitter = LineSplitter(self.max_line)
            writer.write(b"SUBSCRIBE TALLY\r\n")
            subscribed = False
            last_rx = self._clock()
            wait = self.probe_interval if self.probe_interval is not None else self.probe_timeout
            while not self._closing:
                try:
                    async with asyncio.timeout(wait):
                        data = await reader.read(65536)
                except TimeoutError:
                    if self._clock() - last_rx >= self.probe_timeout:
                        raise TimeoutError(f"no reply from vMix for {self.probe_timeout:g} s") from None
                    if subscribed and self.probe_interval is not None:
                        writer.write(b"TALLY\r\n")
                    continue
                if not data:
                    raise EOFError("vMix closed the connection")
                last_rx = self._clock()
                for line in splitter.feed(data):
                    if not line:
                        continue
                    try:
                        msg = parse_line(line)
                    except VmixError as exc:
                        self.errors += 1
                        event(log, logging.WARNING, "vmix.line_ignored", host=self.host, port=self.port, error=str(exc))
                        continue
                    if isinstance(msg, VmixTally):
                        if not subscribed:
                            continue
                        self.handle_tally(msg, self._clock())
                        self._got_tally = True
                        self._synced.set()
                    elif msg.command == "VERSION" and msg.ok:
                        self.version = msg.text
                    elif msg.command == "SUBSCRIBE":
                        if not msg.ok:
                            raise HandshakeFailed(f"SUBSCRIBE TALLY refused: {msg.text}")
                        if not subscribed:
                            subscribed = True
                            writer.write(b"TALLY\r\n")
                    elif msg.command == "TALLY" and not msg.ok:
                        raise HandshakeFailed(f"TALLY refused: {msg.text}")
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()
