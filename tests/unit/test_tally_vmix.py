"""vMix TCP tally: line splitter, parser, and the real client against a fake vMix."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tally.errors import ConfigError, VmixError
from tally.state import Bus, SourceConfig, Tally, TallyState
from tally.vmix import LineSplitter, VmixClient, VmixReply, VmixTally, parse_line

# ------------------------------------------------------------- sans-I/O


def test_line_splitter_rejoins_chunks():
    sp = LineSplitter()
    assert sp.feed(b"TALLY O") == []
    assert sp.feed(b"K 012\r") == []
    assert sp.feed(b"\nSUBSCRIBE OK TALLY\r\nVER") == ["TALLY OK 012", "SUBSCRIBE OK TALLY"]
    assert sp.feed(b"SION OK 27\n\r\n") == ["VERSION OK 27", ""]


def test_line_splitter_max_line():
    sp = LineSplitter(max_line=8)
    assert sp.feed(b"12345678\r\n") == ["12345678"]
    with pytest.raises(VmixError):
        sp.feed(b"123456789\r\n")
    sp = LineSplitter(max_line=8)
    with pytest.raises(VmixError):
        sp.feed(b"x" * 20)  # no terminator yet, already too long
    assert sp.feed(b"ok\n") == ["ok"]  # reset after the error


def test_parse_lines():
    assert parse_line("TALLY OK 0121") == VmixTally((0, 1, 2, 1))
    assert parse_line("TALLY OK ") == VmixTally(())
    assert parse_line("SUBSCRIBE OK TALLY") == VmixReply("SUBSCRIBE", True, "TALLY")
    assert parse_line("SUBSCRIBE ER Unknown topic") == VmixReply("SUBSCRIBE", False, "Unknown topic")
    assert parse_line("VERSION OK 27.0.0.49") == VmixReply("VERSION", True, "27.0.0.49")
    for bad in ("TALLY OK 0131", "TALLY OK 01 2", "TALLY OK", "hello", "", "X YES"):
        with pytest.raises(VmixError):
            parse_line(bad)


def test_tally_round_trip_and_buses():
    t = VmixTally.parse("TALLY OK 0120")
    assert t.serialize() == b"TALLY OK 0120\r\n"
    assert t.buses(2) == {Bus.PROGRAM} and t.buses(3) == {Bus.PREVIEW}
    assert t.buses(1) == set() and t.buses(5) == set() and t.buses(0) == set()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=50), max_size=10))
def test_fuzz_line_splitter_and_parser(chunks):
    sp = LineSplitter(max_line=64)
    for chunk in chunks:
        try:
            lines = sp.feed(chunk)
        except VmixError:
            continue
        for line in lines:
            assert "\n" not in line
            try:
                parse_line(line)
            except VmixError:
                pass


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([0, 1, 2]), max_size=40), st.integers(1, 7))
def test_fuzz_split_anywhere_gives_same_tally(states, chunk):
    wire = b"VERSION OK 1\r\n" + VmixTally(tuple(states)).serialize()
    sp = LineSplitter()
    lines = []
    for i in range(0, len(wire), chunk):
        lines += sp.feed(wire[i : i + chunk])
    assert parse_line(lines[1]) == VmixTally(tuple(states))


# ------------------------------------------------------------- fake vMix


class FakeVmix:
    """Speaks enough of the vMix TCP API; the test drives it."""

    def __init__(self) -> None:
        self.tally = "0000"
        self.writers: list[asyncio.StreamWriter] = []
        self.received: list[str] = []
        self.subscribe_reply = "SUBSCRIBE OK TALLY"
        self.mute = False  # stop answering (half-open link)
        self.chunk = 5  # split every write into chunks of this many bytes
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.transport.abort()
        await self.server.wait_closed()

    async def send(self, writer: asyncio.StreamWriter, text: str) -> None:
        data = text.encode()
        for i in range(0, len(data), self.chunk):  # split mid-line on purpose
            writer.write(data[i : i + self.chunk])
            await writer.drain()
            await asyncio.sleep(0)

    async def push(self, tally: str) -> None:
        self.tally = tally
        for w in list(self.writers):
            if not w.is_closing():
                await self.send(w, f"TALLY OK {tally}\r\n")

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            await self.send(writer, "VERSION OK 27.0.0.49\r\n")
            while line := await reader.readline():
                cmd = line.decode().strip()
                self.received.append(cmd)
                if self.mute:
                    continue
                if cmd == "SUBSCRIBE TALLY":
                    await self.send(writer, self.subscribe_reply + "\r\n")
                elif cmd == "TALLY":
                    await self.send(writer, f"TALLY OK {self.tally}\r\n")
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


def vmix_state() -> TallyState:
    return TallyState(
        "p",
        [
            SourceConfig("cam1", authority="vmix", vmix_input=1),
            SourceConfig("cam2", authority="vmix", vmix_input=2),
            SourceConfig("cam3", authority="vmix", vmix_input=3),
            SourceConfig("cam9", authority="vmix", vmix_input=9),
            SourceConfig("local"),
        ],
    )


async def wait_for(pred, timeout: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def running(client: VmixClient):
    client.start()
    try:
        yield client
    finally:
        await client.close()


def states(s: TallyState) -> dict[str, str]:
    return {n: st.state.value for n, st in s.states().items()}


async def test_client_subscribes_gets_initial_state_and_follows_pushes():
    fake = FakeVmix()
    fake.tally = "0120"
    port = await fake.start()
    s = vmix_state()
    client = VmixClient(s, "127.0.0.1", port, backoff_initial=0.01, backoff_max=0.05)
    async with running(client):
        await asyncio.wait_for(client.wait_synced(), 3)
        assert fake.received[:2] == ["SUBSCRIBE TALLY", "TALLY"]
        assert client.version == "27.0.0.49"
        assert states(s) == {"cam1": "off", "cam2": "program", "cam3": "preview", "cam9": "off", "local": "off"}
        await fake.push("2100")
        await wait_for(lambda: s.source_state("cam1").state is Tally.PREVIEW)
        assert s.source_state("cam2").state is Tally.PROGRAM
        assert s.source_state("cam3").state is Tally.OFF
        assert s.source_state("cam1").authority == "vmix"
    await fake.stop()
    assert s.source_state("cam2").state is Tally.UNKNOWN  # close → lost


async def test_disconnect_goes_unknown_then_reconnects_with_backoff():
    fake = FakeVmix()
    fake.tally = "1"
    port = await fake.start()
    s = vmix_state()
    client = VmixClient(s, "127.0.0.1", port, backoff_initial=0.02, backoff_max=0.04)
    async with running(client):
        await asyncio.wait_for(client.wait_synced(), 3)
        assert s.source_state("cam1").state is Tally.PROGRAM
        fake.tally = "02"
        fake.writers[0].transport.abort()  # vMix goes away
        await wait_for(lambda: s.source_state("cam1").state is Tally.UNKNOWN)
        assert s.source_state("local").state is Tally.OFF  # director sources unaffected
        await wait_for(lambda: s.source_state("cam2").state is Tally.PREVIEW)
        assert client.connects == 2
        assert s.source_state("cam1").state is Tally.OFF
    await fake.stop()


async def test_backoff_grows_and_is_capped_while_unreachable():
    fake = FakeVmix()
    port = await fake.start()
    await fake.stop()  # nothing listens on the port any more
    s = vmix_state()
    client = VmixClient(s, "127.0.0.1", port, backoff_initial=0.01, backoff_max=0.04)
    delays: list[float] = []
    async with running(client):
        for _ in range(5):
            await wait_for(lambda: client.last_delay is not None)
            delays.append(client.last_delay)
            client.last_delay = None
    assert delays[:3] == [0.01, 0.02, 0.04]
    assert max(delays) == 0.04
    assert s.source_state("cam1").state is Tally.UNKNOWN


async def test_probe_detects_half_open_link():
    fake = FakeVmix()
    fake.tally = "1"
    port = await fake.start()
    s = vmix_state()
    client = VmixClient(
        s, "127.0.0.1", port, backoff_initial=0.01, backoff_max=0.02, probe_interval=0.05, probe_timeout=0.15
    )
    async with running(client):
        await asyncio.wait_for(client.wait_synced(), 3)
        await asyncio.sleep(0.12)
        assert "TALLY" in fake.received[2:]  # probes while idle
        assert s.source_state("cam1").state is Tally.PROGRAM
        fake.mute = True  # TCP stays up, vMix stops answering
        await wait_for(lambda: s.source_state("cam1").state is Tally.UNKNOWN, 2)
        fake.mute = False
        await wait_for(lambda: s.source_state("cam1").state is Tally.PROGRAM, 2)
    await fake.stop()


async def test_subscribe_refused_keeps_unknown_and_retries():
    fake = FakeVmix()
    fake.subscribe_reply = "SUBSCRIBE ER not allowed"
    port = await fake.start()
    s = vmix_state()
    client = VmixClient(s, "127.0.0.1", port, backoff_initial=0.01, backoff_max=0.02)
    async with running(client):
        await wait_for(lambda: client.connects >= 3)
        assert client.errors >= 2
        assert s.source_state("cam1").state is Tally.UNKNOWN
    await fake.stop()


async def test_garbage_lines_are_ignored_and_overlong_line_resets():
    fake = FakeVmix()
    fake.tally = "1"
    port = await fake.start()
    s = vmix_state()
    client = VmixClient(s, "127.0.0.1", port, backoff_initial=0.01, backoff_max=0.02, max_line=100)
    async with running(client):
        await asyncio.wait_for(client.wait_synced(), 3)
        w = fake.writers[0]
        await fake.send(w, "TALLY OK 9x9\r\nrubbish\r\n")
        await fake.push("01")
        await wait_for(lambda: s.source_state("cam2").state is Tally.PROGRAM)
        assert client.errors == 2 and client.connects == 1
        w.write(b"A" * 500)  # a line that never ends
        await wait_for(lambda: client.connects == 2)
        await wait_for(lambda: s.source_state("cam2").state is Tally.PROGRAM)
    await fake.stop()


def test_mapping_must_match_authority():
    s = vmix_state()
    with pytest.raises(ConfigError):
        VmixClient(s, "h", inputs={1: "local"})
    with pytest.raises(ConfigError):
        VmixClient(s, "h", inputs={0: "cam1"})
    c = VmixClient(s, "h", inputs={4: ["cam1", "cam2"]})
    c.handle_tally(VmixTally((0, 0, 0, 1)), now=0)
    assert s.source_state("cam1").state is Tally.PROGRAM and s.source_state("cam2").state is Tally.PROGRAM
    assert s.source_state("cam3").state is Tally.OFF


def test_client_under_uvloop():
    """The server runs on uvloop: the same scenarios must hold there."""
    uvloop = pytest.importorskip("uvloop", reason="uvloop is a declared dependency")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(test_client_subscribes_gets_initial_state_and_follows_pushes())
        runner.run(test_disconnect_goes_unknown_then_reconnects_with_backoff())
        runner.run(test_probe_detects_half_open_link())
