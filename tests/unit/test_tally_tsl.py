"""TSL UMD 3.1 / 5.0 codec (byte fixtures, round trips, fuzz) and adapters."""

from __future__ import annotations

import asyncio
import pathlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tally.errors import ConfigError, TslError
from tally.state import Bus, SourceConfig, Tally, TallyState
from tally.tsl import (
    BROADCAST,
    MAX_V5_PACKET,
    TallyColour,
    TslInput,
    TslOutput,
    TslV5Message,
    TslV5Packet,
    TslV5StreamDecoder,
    TslV31Message,
    build_v5_packets,
    parse_v5_datagram,
    parse_v31_datagram,
    v5_buses,
    v31_buses,
    wrap_dle_stx,
)

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "tally"


def fx(name: str) -> bytes:
    lines = (FIXTURES / name).read_text().splitlines()
    return bytes.fromhex(" ".join(line.split("#", 1)[0] for line in lines))


# ------------------------------------------------------------------ TSL 3.1


def test_v31_parse_fixture_and_round_trip():
    data = fx("tsl31_addr5_program.hex")
    assert len(data) == 18
    msg = TslV31Message.parse(data)
    assert msg == TslV31Message(5, (True, False, False, False), 3, "CAM 5")
    assert msg.serialize() == data
    assert bytes(msg) == data


def test_v31_address_zero():
    data = fx("tsl31_addr0_preview.hex")
    msg = TslV31Message.parse(data)
    assert msg.address == 0 and msg.tally == (False, True, False, False) and msg.text == "ZERO"
    assert TslV31Message(0, (False, True, False, False), 3, "ZERO").serialize() == data


def test_v31_two_messages_in_one_datagram():
    msgs = parse_v31_datagram(fx("tsl31_two_messages.hex"))
    assert [m.address for m in msgs] == [126, 1]
    assert msgs[0].tally == (True, True, True, True) and msgs[0].brightness == 0
    assert msgs[1].tally == (False,) * 4 and msgs[1].text == "ONE"


@pytest.mark.parametrize("name", ["tsl31_bad_header.hex", "tsl31_bad_control.hex", "tsl31_truncated.hex"])
def test_v31_rejects_malformed(name):
    with pytest.raises(TslError):
        parse_v31_datagram(fx(name))


def test_v31_build_rules():
    # Non-ASCII is replaced, long labels truncated to 16 characters.
    data = TslV31Message(10, (False, False, True, True), 1, "Kämera mit langem Namen").serialize()
    assert data[0] == 0x8A and data[1] == 0x0C | 0x10
    assert data[2:] == b"K?mera mit lange"
    with pytest.raises(TslError):
        TslV31Message(127)
    with pytest.raises(TslError):
        TslV31Message(1, brightness=4)
    with pytest.raises(TslError):
        parse_v31_datagram(b"")


def test_v31_bus_mapping():
    msg = TslV31Message(1, (True, True, True, False))
    assert v31_buses(msg) == {Bus.PROGRAM, Bus.PREVIEW}
    assert v31_buses(msg, {3: Bus.AUX}) == {Bus.AUX}


# ------------------------------------------------------------------ TSL 5.0


def test_v5_parse_fixture_and_round_trip():
    data = fx("tsl5_one_dmsg.hex")
    pkt = TslV5Packet.parse(data)
    assert pkt == TslV5Packet(0, (TslV5Message(1, TallyColour.RED, TallyColour.OFF, TallyColour.RED, 3, "CAM1"),))
    assert pkt.messages[0].control == 0x00D1
    assert pkt.serialize() == data
    assert parse_v5_datagram(data) == [pkt]


def test_v5_udp_with_and_without_dle_stx():
    raw = fx("tsl5_one_dmsg.hex")
    wrapped = fx("tsl5_one_dmsg_wrapped.hex")
    assert wrapped == b"\xfe\x02" + raw
    assert parse_v5_datagram(wrapped) == parse_v5_datagram(raw)
    assert TslV5Packet.parse(raw).serialize_wrapped() == wrapped


def test_v5_broadcast_screen_index_zero_and_broadcast_index():
    pkt = TslV5Packet.parse(fx("tsl5_broadcast_addr0.hex"))
    assert pkt.screen == BROADCAST
    first, second = pkt.messages
    assert first.index == 0 and first.text == "A"
    assert (first.right, first.text_tally, first.left) == (TallyColour.GREEN,) * 3
    assert second.index == BROADCAST and second.text == "" and second.control == 0xC0
    assert pkt.serialize() == fx("tsl5_broadcast_addr0.hex")


def test_v5_utf16():
    data = fx("tsl5_utf16.hex")
    pkt = TslV5Packet.parse(data)
    assert pkt.utf16 and pkt.screen == 7
    assert pkt.messages[0].text == "Kä" and pkt.messages[0].right is TallyColour.AMBER
    assert pkt.serialize() == data


def test_v5_tcp_stuffing_of_fe():
    wrapped = fx("tsl5_tcp_stuffed.hex")
    dec = TslV5StreamDecoder()
    (pkt,) = dec.feed(wrapped)
    assert dec.errors == 0
    assert pkt.messages[0].index == 0xFE and pkt.messages[0].text == "C4"
    assert pkt.serialize_wrapped() == wrapped
    assert wrap_dle_stx(b"\xfe\x00\xfe") == b"\xfe\x02\xfe\xfe\x00\xfe\xfe"


def test_v5_pbc_containing_fe_is_stuffed_too():
    # PBC = 254 = 0xFE: the byte count itself is stuffed, but counts unstuffed bytes.
    msg = TslV5Message(3, TallyColour.RED, text="x" * (254 - 4 - 6))
    pkt = TslV5Packet(0, (msg,))
    raw = pkt.serialize()
    assert raw[:2] == b"\xfe\x00" and len(raw) == 256
    wrapped = pkt.serialize_wrapped()
    assert wrapped[:5] == b"\xfe\x02\xfe\xfe\x00"
    assert TslV5StreamDecoder().feed(wrapped) == [pkt]


@pytest.mark.parametrize(
    "name", ["tsl5_bad_pbc.hex", "tsl5_bad_length.hex", "tsl5_control_data.hex", "tsl5_odd_utf16.hex"]
)
def test_v5_rejects_malformed(name):
    with pytest.raises(TslError):
        parse_v5_datagram(fx(name))


def test_v5_rejects_truncations_of_valid_packets():
    data = fx("tsl5_broadcast_addr0.hex")
    for cut in range(len(data)):
        with pytest.raises(TslError):
            TslV5Packet.parse(data[:cut])


def test_v5_scontrol_kept_opaque():
    raw = bytes.fromhex("0600 00 02 0100 aabb")
    pkt = TslV5Packet.parse(raw)
    assert pkt.scontrol == b"\xaa\xbb" and pkt.messages == ()
    assert pkt.serialize() == raw


def test_stream_decoder_any_chunking():
    packets = [
        TslV5Packet(0, (TslV5Message(i, TallyColour(i % 4), text=f"S{i}\u00fe"[:2]),)) for i in range(250, 258)
    ]
    stream = b"".join(p.serialize_wrapped() for p in packets)
    for size in (1, 2, 3, 7, 64, len(stream)):
        dec = TslV5StreamDecoder()
        out = []
        for i in range(0, len(stream), size):
            out += dec.feed(stream[i : i + size])
        assert out == packets and dec.errors == 0


def test_stream_decoder_resyncs_after_garbage_and_truncation():
    good = TslV5Packet.parse(fx("tsl5_one_dmsg.hex"))
    stream = (
        b"junk"
        + good.serialize_wrapped()[:9]  # truncated by the next DLE/STX
        + good.serialize_wrapped()
        + b"\xfe\x07"  # lone DLE
        + good.serialize_wrapped()
        + wrap_dle_stx(fx("tsl5_bad_length.hex"))
        + good.serialize_wrapped()
    )
    dec = TslV5StreamDecoder()
    assert dec.feed(stream) == [good, good, good]
    assert dec.errors >= 4 and isinstance(dec.last_error, TslError)


def test_stream_decoder_rejects_oversized_pbc():
    dec = TslV5StreamDecoder()
    assert dec.feed(b"\xfe\x02\xff\x7f" + b"\x00" * 10) == []
    assert dec.errors == 1


def test_build_v5_packets_splits_at_2048_bytes():
    msgs = [TslV5Message(i, TallyColour.RED, text="L" * 60) for i in range(100)]
    packets = build_v5_packets(msgs, screen=3)
    assert len(packets) > 1
    assert all(len(p.serialize()) <= MAX_V5_PACKET for p in packets)
    assert [m for p in packets for m in p.messages] == msgs
    with pytest.raises(TslError):
        build_v5_packets([TslV5Message(1, text="x" * 3000)])


def test_v5_colour_mapping():
    amber = TslV5Message(1, right=TallyColour.AMBER)
    assert v5_buses(amber) == {Bus.PROGRAM, Bus.PREVIEW}
    assert v5_buses(TslV5Message(1, left=TallyColour.GREEN)) == {Bus.PREVIEW}
    assert v5_buses(TslV5Message(1, left=TallyColour.GREEN), ("right",)) == set()
    assert v5_buses(TslV5Message(1, text_tally=TallyColour.RED), ("text",)) == {Bus.PROGRAM}


# -------------------------------------------------------------------- fuzz


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_v5_datagram(data):
    try:
        parse_v5_datagram(data)
    except TslError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=100))
def test_fuzz_v31_datagram(data):
    try:
        for msg in parse_v31_datagram(data):
            assert TslV31Message.parse(msg.serialize()).tally == msg.tally
    except TslError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=12))
def test_fuzz_stream_decoder(chunks):
    dec = TslV5StreamDecoder()
    for chunk in chunks:
        for pkt in dec.feed(chunk):
            assert isinstance(pkt, TslV5Packet)


dmsgs = st.builds(
    TslV5Message,
    index=st.integers(0, 0xFFFF),
    right=st.sampled_from(TallyColour),
    text_tally=st.sampled_from(TallyColour),
    left=st.sampled_from(TallyColour),
    brightness=st.integers(0, 3),
    text=st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=20),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(dmsgs, min_size=1, max_size=8), st.integers(0, 0xFFFF), st.booleans(), st.integers(1, 9))
def test_fuzz_v5_round_trip_through_stream(messages, screen, utf16, chunk):
    pkt = TslV5Packet(screen, tuple(messages), utf16)
    assert TslV5Packet.parse(pkt.serialize()) == pkt
    wrapped = pkt.serialize_wrapped() * 2
    dec = TslV5StreamDecoder()
    out = []
    for i in range(0, len(wrapped), chunk):
        out += dec.feed(wrapped[i : i + chunk])
    assert out == [pkt, pkt] and dec.errors == 0


# ---------------------------------------------------------------- adapters


def tsl_state() -> TallyState:
    return TallyState(
        "p",
        [
            SourceConfig("cam0", "Cam Zero", authority="tsl", tsl_address=0),
            SourceConfig("cam1", "Cam One", authority="tsl", tsl_address=1),
            SourceConfig("cam2", authority="tsl", tsl_address=2),
            SourceConfig("dir1", "Director 1", tsl_address=9),
        ],
    )


def test_input_v31_mapping_sans_io():
    s = tsl_state()
    inp = TslInput(s, authority="tsl", version=3)
    ch = inp.feed_datagram(fx("tsl31_addr0_preview.hex"), now=1.0)
    assert ch.sources["cam0"].state is Tally.PREVIEW
    assert s.source_state("cam1").state is Tally.UNKNOWN  # not reported yet
    inp.feed_datagram(TslV31Message(1, (True, False, False, False)).serialize(), now=2.0)
    assert s.source_state("cam1").state is Tally.PROGRAM
    assert inp.feed_datagram(b"garbage", now=3.0) is None and inp.errors == 1


def test_input_v5_broadcast_amber_and_screen_filter():
    s = tsl_state()
    inp = TslInput(s, authority="tsl", version=5, screen=1)
    pkt = TslV5Packet(BROADCAST, (TslV5Message(BROADCAST, left=TallyColour.AMBER),))
    inp.handle_v5(pkt, now=0)
    for name in ("cam0", "cam1", "cam2"):
        assert s.source_state(name).buses == (Bus.PROGRAM, Bus.PREVIEW)
    assert s.source_state("dir1").state is Tally.OFF  # not driven by tsl
    other_screen = TslV5Packet(2, (TslV5Message(0, left=TallyColour.OFF),))
    assert inp.handle_v5(other_screen, now=1) is None
    inp.handle_v5(TslV5Packet(1, (TslV5Message(0, right=TallyColour.GREEN),)), now=2)
    assert s.source_state("cam0").state is Tally.PREVIEW


def test_input_lost_timeout_is_optional():
    s = tsl_state()
    quiet = TslInput(s, authority="tsl", version=3)
    quiet.feed_datagram(fx("tsl31_addr0_preview.hex"), now=0)
    assert quiet.check(1000.0) is None
    inp = TslInput(s, authority="tsl", version=3, lost_after=2.0)
    inp.feed_datagram(fx("tsl31_addr0_preview.hex"), now=10)
    assert inp.check(11.9) is None
    ch = inp.check(12.0)
    assert ch is not None and s.source_state("cam0").state is Tally.UNKNOWN
    assert inp.check(13.0) is None  # lost once, not repeatedly
    inp.feed_datagram(fx("tsl31_addr0_preview.hex"), now=14)
    assert s.source_state("cam0").state is Tally.PREVIEW


def test_input_config_errors():
    s = tsl_state()
    with pytest.raises(ConfigError):
        TslInput(s, authority="tsl", addresses={5: "dir1"})
    with pytest.raises(ConfigError):
        TslInput(s, authority="tsl", version=3, addresses={200: "cam0"})
    with pytest.raises(ConfigError):
        TslInput(s, authority="tsl", version=4)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        TslInput(s, authority="tsl", lamps=("middle",))


def test_output_encode_v31_and_v5():
    s = tsl_state()
    s.cut("dir1", now=0)
    s.report("tsl", {"cam0": ["preview"], "cam1": ["program", "preview"]}, full=False, now=0)
    out3 = TslOutput(s, version=3, addresses={"dir1": 9, "cam0": 0, "cam2": 2})
    msgs = [TslV31Message.parse(b) for b in out3.encode(s.states())]
    by_addr = {m.address: m for m in msgs}
    assert by_addr[9].tally == (True, False, False, False) and by_addr[9].text == "Director 1"
    assert by_addr[0].tally == (False, True, False, False)
    assert by_addr[2].tally == (False,) * 4  # unknown: lamps off
    out5 = TslOutput(s, version=5, screen=4, lamps=("left", "right"))
    (raw,) = out5.encode(s.states())
    pkt = TslV5Packet.parse(raw)
    assert pkt.screen == 4
    by_idx = {m.index: m for m in pkt.messages}
    assert by_idx[9].left is TallyColour.RED and by_idx[9].text_tally is TallyColour.OFF
    assert by_idx[0].right is TallyColour.GREEN and by_idx[0].text == "Cam Zero"
    assert by_idx[1].left is TallyColour.AMBER  # program + preview
    assert by_idx[2].left is TallyColour.OFF


async def test_udp_input_to_state_and_udp_output_round_trip():
    """Output → UDP → Input: a cut on the director reaches a second state."""
    src = TallyState("a", [SourceConfig("cam1", tsl_address=0), SourceConfig("cam2", tsl_address=1)])
    dst = TallyState(
        "b", [SourceConfig("cam1", authority="tsl", tsl_address=0), SourceConfig("cam2", authority="tsl", tsl_address=1)]
    )
    inp = TslInput(dst, authority="tsl", version=5)
    host, port = await inp.listen_udp("127.0.0.1", 0)
    out = TslOutput(src, version=5, refresh_interval=0.05, dle_stx_udp=True)
    await out.start_udp(host, port)
    try:
        src.cut("cam2", now=0)
        for _ in range(100):
            if dst.source_state("cam2").state is Tally.PROGRAM:
                break
            await asyncio.sleep(0.005)
        assert dst.source_state("cam2").state is Tally.PROGRAM
        assert dst.source_state("cam1").state is Tally.UNKNOWN  # the change carried cam2 only
        for _ in range(100):
            if dst.source_state("cam1").state is Tally.OFF:
                break
            await asyncio.sleep(0.005)
        assert dst.source_state("cam1").state is Tally.OFF  # from the periodic full refresh
        sent = out.sent
        await asyncio.sleep(0.12)
        assert out.sent > sent  # refresh keeps resending
    finally:
        await out.close()
        await inp.close()


async def test_udp_input_lost_timer():
    s = tsl_state()
    inp = TslInput(s, authority="tsl", version=3, lost_after=0.05)
    host, port = await inp.listen_udp("127.0.0.1", 0)
    loop = asyncio.get_running_loop()
    tx, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, remote_addr=(host, port))
    try:
        tx.sendto(fx("tsl31_addr0_preview.hex"))
        for _ in range(100):
            if s.source_state("cam0").state is Tally.PREVIEW:
                break
            await asyncio.sleep(0.005)
        assert s.source_state("cam0").state is Tally.PREVIEW
        await asyncio.sleep(0.1)
        assert s.source_state("cam0").state is Tally.UNKNOWN
    finally:
        tx.close()
        await inp.close()


async def test_tcp_input_chunked_stuffed_stream_and_disconnect_keeps_state():
    s = tsl_state()
    inp = TslInput(s, authority="tsl", version=5, addresses={0xFE: "cam1", 0: "cam0"})
    host, port = await inp.listen_tcp("127.0.0.1", 0)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        stream = fx("tsl5_tcp_stuffed.hex") + TslV5Packet(0, (TslV5Message(0, left=TallyColour.GREEN),)).serialize_wrapped()
        for i in range(len(stream)):  # one byte at a time
            writer.write(stream[i : i + 1])
            await writer.drain()
        for _ in range(100):
            if s.source_state("cam0").state is Tally.PREVIEW:
                break
            await asyncio.sleep(0.005)
        assert s.source_state("cam1").state is Tally.PROGRAM
        assert s.source_state("cam0").state is Tally.PREVIEW
    finally:
        writer.close()
    # A closed TCP connection is not a lost source: TSL 5.0 has no session
    # (one-shot senders close after every message).
    await writer.wait_closed()
    for _ in range(20):
        if not inp._tcp_conns:
            break
        await asyncio.sleep(0.005)
    assert not inp._tcp_conns
    assert s.source_state("cam1").state is Tally.PROGRAM
    assert s.source_state("cam0").state is Tally.PREVIEW
    await inp.close()  # nobody listens any more: never a stale red
    assert s.source_state("cam1").state is Tally.UNKNOWN


async def test_tcp_one_shot_senders_then_silence_loses_authority():
    """Each message on its own connection keeps tally; only lost_after of
    silence (any transport) turns the sources unknown."""
    s = tsl_state()
    inp = TslInput(s, authority="tsl", version=5, addresses={0xFE: "cam1", 0: "cam0"}, lost_after=0.15)
    host, port = await inp.listen_tcp("127.0.0.1", 0)

    async def one_shot(colour: TallyColour) -> None:
        _, writer = await asyncio.open_connection(host, port)
        writer.write(TslV5Packet(0, (TslV5Message(0xFE, left=colour),)).serialize_wrapped())
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    async def until(state: Tally) -> None:
        for _ in range(200):
            if s.source_state("cam1").state is state:
                return
            await asyncio.sleep(0.005)
        raise AssertionError(f"cam1 is {s.source_state('cam1').state}, expected {state}")

    try:
        for colour, expect in ((TallyColour.RED, Tally.PROGRAM), (TallyColour.GREEN, Tally.PREVIEW)):
            await one_shot(colour)
            await until(expect)
            await asyncio.sleep(0.05)  # connection closed, well inside lost_after
            assert s.source_state("cam1").state is expect
        await until(Tally.UNKNOWN)  # silence
        await one_shot(TallyColour.RED)
        await until(Tally.PROGRAM)
    finally:
        await inp.close()


async def test_tcp_output_connects_sends_wrapped_and_reconnects():
    s = TallyState("p", [SourceConfig("cam1", tsl_address=0xFE), SourceConfig("cam2", tsl_address=2)])
    received: asyncio.Queue[TslV5Packet] = asyncio.Queue()
    conns: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conns.append(writer)
        dec = TslV5StreamDecoder()
        while data := await reader.read(4096):
            for pkt in dec.feed(data):
                received.put_nowait(pkt)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    out = TslOutput(s, version=5, refresh_interval=10, backoff_initial=0.02, backoff_max=0.05)
    await out.start_tcp("127.0.0.1", port)
    try:
        first = await asyncio.wait_for(received.get(), 2)  # full state on connect
        assert {m.index for m in first.messages} == {0xFE, 2}
        s.cut("cam1", now=0)
        pkt = await asyncio.wait_for(received.get(), 2)  # sent on change
        assert [(m.index, m.left) for m in pkt.messages] == [(0xFE, TallyColour.RED)]
        conns[0].transport.abort()  # the display drops the connection
        again = await asyncio.wait_for(received.get(), 2)  # reconnect + full state
        assert {m.index: m.left for m in again.messages}[0xFE] is TallyColour.RED
        assert len(conns) == 2
    finally:
        await out.close()
        server.close()
        for w in conns:
            w.transport.abort()
        await server.wait_closed()


def test_adapters_under_uvloop():
    """The server runs on uvloop: the same I/O scenarios must hold there."""
    uvloop = pytest.importorskip("uvloop", reason="uvloop is a declared dependency")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(test_udp_input_to_state_and_udp_output_round_trip())
        runner.run(test_udp_input_lost_timer())
        runner.run(test_tcp_input_chunked_stuffed_stream_and_disconnect_keeps_state())
        runner.run(test_tcp_one_shot_senders_then_silence_loses_authority())
        runner.run(test_tcp_output_connects_sends_wrapped_and_reconnects())
