"""ICE-TCP: RFC 4571 framing, the listener's admission rules, the framed sender."""

from __future__ import annotations

import asyncio
import errno
import socket
import struct

import pytest
from aioice import Connection, stun
from aioice.candidate import candidate_priority

from media.webrtc import icetcp
from media.webrtc.icetcp import FRAME_MAX, FramedSender, Framer, FrameTooLarge, IceTcpListener, IceTcpSession, frame


# -- framing (RFC 4571 §2) ----------------------------------------------------------------


def test_frames_split_byte_by_byte() -> None:
    packets = [b"\x00\x01stun", b"x" * 1200, b"\x80" * 3]
    stream = b"".join(frame(p) for p in packets)
    framer = Framer()
    out: list[bytes] = []
    for i in range(len(stream)):
        out += framer.feed(stream[i:i + 1])
    assert out == packets and framer.pending == 0


def test_frames_coalesced_and_cut_anywhere() -> None:
    packets = [bytes([n]) * (n * 37 % 1400 + 1) for n in range(40)]
    stream = b"".join(frame(p) for p in packets)
    for cut in (1, 2, 3, 500, 1501, len(stream) - 1):
        framer = Framer()
        assert framer.feed(stream[:cut]) + framer.feed(stream[cut:]) == packets


def test_zero_length_frame_carries_nothing() -> None:
    framer = Framer()
    assert framer.feed(b"\x00\x00" + frame(b"abc") + b"\x00\x00") == [b"abc"]
    assert framer.pending == 0


def test_oversized_frame_is_refused_before_its_body_arrives() -> None:
    framer = Framer()
    assert framer.feed(frame(b"y" * FRAME_MAX)) == [b"y" * FRAME_MAX]
    with pytest.raises(FrameTooLarge):
        framer.feed(struct.pack("!H", FRAME_MAX + 1))


def test_tcp_candidates_rank_below_udp_host_candidates() -> None:
    # RFC 8445 §5.1.2.2 / RFC 6544 §4.2: UDP first when both work.
    tcp = icetcp.tcp_candidate_priority(1)
    assert tcp < candidate_priority(1, "host")
    # below every UDP path that is not relayed, above a relayed one
    assert candidate_priority(1, "relay") < tcp < candidate_priority(1, "srflx")
    assert icetcp.tcp_candidate_priority(1, 8190) < tcp


# -- the listener ----------------------------------------------------------------------------


def _request(ufrag: str, password: str, *, remote: str = "peer") -> bytes:
    msg = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    msg.attributes["USERNAME"] = f"{ufrag}:{remote}"
    msg.attributes["PRIORITY"] = candidate_priority(1, "prflx")
    msg.attributes["ICE-CONTROLLING"] = 1234
    msg.add_message_integrity(password.encode())
    msg.add_fingerprint()
    return bytes(msg)


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    (length,) = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), 5))
    return await asyncio.wait_for(reader.readexactly(length), 5)


async def _closed(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), 5) == b""
    except ConnectionResetError:
        return True


class _Env:
    def __init__(self, **kw: object) -> None:
        self.kw = kw

    async def __aenter__(self) -> "_Env":
        self.listener = IceTcpListener("127.0.0.1", 0, **self.kw)  # type: ignore[arg-type]
        await self.listener.start()
        self.connection = Connection(ice_controlling=False)
        self.session = IceTcpSession(self.listener, self.connection)
        self.session.add_candidates(["127.0.0.1"])
        return self

    async def __aexit__(self, *exc: object) -> None:
        for p in list(self.session.protocols):
            await p.close()
        await self.listener.close()

    async def dial(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.listener.port)

    async def settle(self, cond: object, timeout: float = 5.0) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while not cond() and loop.time() < end:  # type: ignore[operator]
            await asyncio.sleep(0.01)
        assert cond()  # type: ignore[operator]


def test_valid_first_request_binds_the_connection_and_gets_a_response() -> None:
    async def main() -> None:
        async with _Env() as env:
            reader, writer = await env.dial()
            writer.write(frame(_request(env.connection.local_username, env.connection.local_password)))
            response = stun.parse_message(await _read_frame(reader))
            assert response.message_class == stun.Class.RESPONSE
            assert response.attributes["XOR-MAPPED-ADDRESS"] == writer.get_extra_info("sockname")[:2]
            assert response.check_message_integrity(env.connection.local_password.encode())
            peer = writer.get_extra_info("sockname")[:2]
            assert list(env.session.links) == [peer]
            # The connection's address is a TCP peer-reflexive candidate
            # (aioice alone would have labelled it udp).
            learned = [c for c in env.connection._remote_candidates if (c.host, c.port) == peer]
            assert [(c.type, c.transport, c.tcptype) for c in learned] == [("prflx", "tcp", "active")]
            assert env.listener.stats.accepted == 1 and env.listener.stats.refused == {}
            writer.close()

    asyncio.run(main())


@pytest.mark.parametrize("case", ["unknown_ufrag", "bad_integrity", "not_stun", "oversized"])
def test_bad_first_frames_close_the_connection(case: str) -> None:
    async def main() -> None:
        async with _Env() as env:
            reader, writer = await env.dial()
            ufrag, pwd = env.connection.local_username, env.connection.local_password
            data = {
                "unknown_ufrag": frame(_request("zzzz" if ufrag != "zzzz" else "yyyy", pwd)),
                "bad_integrity": frame(_request(ufrag, "x" * 22)),
                "not_stun": frame(b"\x16\xfe\xfd" + b"\x00" * 40),  # a DTLS record first
                "oversized": struct.pack("!H", FRAME_MAX + 1),
            }[case]
            writer.write(data)
            assert await _closed(reader)
            assert env.listener.stats.refused == {case: 1}
            await env.settle(lambda: env.listener.open_connections == 0)
            assert env.session.links == {}
            writer.close()

    asyncio.run(main())


def test_silent_connection_times_out_and_bound_one_idles_out() -> None:
    async def main() -> None:
        async with _Env(first_request_timeout=5.0, idle_timeout=30.0) as env:
            silent_reader, silent = await env.dial()
            bound_reader, bound = await env.dial()
            bound.write(frame(_request(env.connection.local_username, env.connection.local_password)))
            await _read_frame(bound_reader)
            await env.settle(lambda: env.listener.open_connections == 2 and len(env.session.links) == 1)
            now = asyncio.get_running_loop().time()
            env.listener.sweep(now + 4.0)
            assert env.listener.open_connections == 2
            env.listener.sweep(now + 6.0)
            assert await _closed(silent_reader)
            assert env.listener.stats.timed_out == 1 and env.listener.open_connections == 1
            env.listener.sweep(now + 31.0)
            assert await _closed(bound_reader)
            assert env.listener.stats.idle_closed == 1 and env.session.links == {}
            silent.close()
            bound.close()

    asyncio.run(main())


def test_connection_limits() -> None:
    async def main() -> None:
        async with _Env(max_connections=3, max_anonymous=2, max_per_session=1) as env:
            ufrag, pwd = env.connection.local_username, env.connection.local_password
            r1, w1 = await env.dial()
            r2, w2 = await env.dial()
            await env.settle(lambda: env.listener.open_connections == 2)
            r3, w3 = await env.dial()  # a third anonymous one: over max_anonymous
            assert await _closed(r3)
            assert env.listener.stats.refused == {"limit": 1}
            w1.write(frame(_request(ufrag, pwd, remote="a")))
            await _read_frame(r1)
            w2.write(frame(_request(ufrag, pwd, remote="b")))  # a 2nd for a session allowed 1
            assert await _closed(r2)
            assert env.listener.stats.refused == {"limit": 1, "session_limit": 1}
            for w in (w1, w2, w3):
                w.close()

    asyncio.run(main())


def test_total_limit_counts_bound_connections() -> None:
    async def main() -> None:
        async with _Env(max_connections=1, max_anonymous=1) as env:
            r1, w1 = await env.dial()
            w1.write(frame(_request(env.connection.local_username, env.connection.local_password)))
            await _read_frame(r1)
            r2, w2 = await env.dial()
            assert await _closed(r2)
            assert env.listener.stats.refused == {"limit": 1}
            w1.close()
            w2.close()

    asyncio.run(main())


def test_shared_ufrag_is_told_apart_by_integrity() -> None:
    async def main() -> None:
        async with _Env() as env:
            other = Connection(ice_controlling=False, local_username=env.connection.local_username)
            twin = IceTcpSession(env.listener, other)
            twin.add_candidates(["127.0.0.1"])
            reader, writer = await env.dial()
            writer.write(frame(_request(other.local_username, other.local_password)))
            await _read_frame(reader)
            assert len(twin.links) == 1 and env.session.links == {}
            for p in list(twin.protocols):
                await p.close()
            assert env.listener.sessions(other.local_username) == [env.session]
            writer.close()

    asyncio.run(main())


def test_closing_the_ice_connection_unregisters_and_closes_its_links() -> None:
    async def main() -> None:
        async with _Env() as env:
            reader, writer = await env.dial()
            writer.write(frame(_request(env.connection.local_username, env.connection.local_password)))
            await _read_frame(reader)
            for p in list(env.session.protocols):
                await p.close()
            assert env.listener.sessions(env.connection.local_username) == []
            assert await _closed(reader)
            writer.close()

    asyncio.run(main())


# -- sending ---------------------------------------------------------------------------------


class _FakeTransport:
    def __init__(self, buffered: int = 0) -> None:
        self.buffered = buffered
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


def _session_with_link(buffered: int) -> tuple[IceTcpSession, _FakeTransport]:
    listener = IceTcpListener("127.0.0.1", 0, write_limit=10_000)

    class _Conn:
        local_username = "abcd"
        local_password = "p" * 22
        _remote_candidates: list = []
        _nominated: dict = {}

    session = IceTcpSession(listener, _Conn())
    link = icetcp._Link(listener)
    transport = _FakeTransport(buffered)
    link.transport = transport  # type: ignore[assignment]
    link.peer = ("192.0.2.7", 50000)
    session.links[link.peer] = link
    return session, transport


def test_framed_sender_writes_one_batch_per_call() -> None:
    session, transport = _session_with_link(0)
    sender = FramedSender(session, ("192.0.2.7", 50000))
    assert sender.send_batch([b"a" * 100, b"b" * 200], now=1.0) == 300
    assert transport.writes == [frame(b"a" * 100) + frame(b"b" * 200)]
    assert session.listener.stats.frames_out == 2 and sender.failing_since is None


def test_full_write_buffer_drops_and_counts_never_blocks() -> None:
    session, transport = _session_with_link(9_950)
    sender = FramedSender(session, ("192.0.2.7", 50000))
    assert sender.send_batch([b"a" * 100], now=1.0) == 0
    assert transport.writes == [] and sender.backlogged == 1
    assert session.listener.stats.frames_dropped == 1
    # A full buffer is congestion, not a dead path.
    assert sender.failing_since is None and sender.errors == 0


def test_no_connection_for_the_pair_is_an_error_that_starts_the_failure_clock() -> None:
    session, _ = _session_with_link(0)
    sender = FramedSender(session, ("192.0.2.8", 1))
    assert sender.send(b"x", now=7.0) == 0
    assert sender.errors == 1 and sender.errors_by_errno == {errno.ENOTCONN: 1}
    assert sender.failing_since == 7.0
    # and the session's own STUN/DTLS sends towards a port-9 active candidate
    # are simply not sent (a passive candidate never dials out)
    assert session.send(b"x", ("192.0.2.9", 9)) is False


def test_internals_this_module_hooks_are_still_there() -> None:
    icetcp.check_internals()


def test_any_port_on_every_address_is_one_port() -> None:
    # The candidates name one port: the IPv4 and IPv6 sockets must share it.
    async def main() -> None:
        listener = IceTcpListener(None, 0)
        await listener.start()
        try:
            assert {s.getsockname()[1] for s in listener._server.sockets} == {listener.port}  # type: ignore[union-attr]
        finally:
            await listener.close()

    asyncio.run(main())


def test_only_addresses_of_a_bound_family_are_offered() -> None:
    async def main() -> None:
        listener = IceTcpListener("127.0.0.1", 0)
        await listener.start()
        try:
            assert listener.reachable("192.0.2.1") and listener.reachable("127.0.0.1")
            assert not listener.reachable("2001:db8::1")
            assert not listener.reachable("media.example.com")  # candidates carry addresses
        finally:
            await listener.close()

    asyncio.run(main())


def test_attach_adds_passive_candidates_to_aiortcs_own_gathering_and_cleans_up() -> None:
    # Without the ICE mux: aioice gathers its own UDP sockets, the hook adds
    # TCP next to them, aiortc writes them into the SDP with their tcptype.
    from aiortc import RTCConfiguration, RTCPeerConnection

    async def main() -> None:
        listener = IceTcpListener("0.0.0.0", 0)
        await listener.start()
        # No STUN server (aiortc's default is a public one): host candidates only.
        client, server = (RTCPeerConnection(RTCConfiguration(iceServers=[])) for _ in range(2))
        try:
            client.addTransceiver("video", direction="recvonly")
            await client.setLocalDescription(await client.createOffer())
            await server.setRemoteDescription(client.localDescription)
            icetcp.attach(server, listener)
            await server.setLocalDescription(await server.createAnswer())
            lines = [ln.split(":", 1)[1].split() for ln in server.localDescription.sdp.splitlines()
                     if ln.startswith("a=candidate:")]
            udp4 = sorted(c[4] for c in lines if c[2] == "udp" and c[7] == "host" and ":" not in c[4])
            tcp = [c for c in lines if c[2] == "tcp"]
            assert udp4 and sorted(c[4] for c in tcp) == udp4
            assert all(c[5] == str(listener.port) and c[7:10] == ["host", "tcptype", "passive"] for c in tcp)
            ufrag = next(ln.split(":", 1)[1] for ln in server.localDescription.sdp.splitlines()
                         if ln.startswith("a=ice-ufrag:"))
            assert len(listener.sessions(ufrag)) == 1
        finally:
            await server.close()
            await client.close()
        assert listener.sessions(ufrag) == []
        await listener.close()

    asyncio.run(main())


def test_losing_the_nominated_pairs_connection_ends_the_ice_connection() -> None:
    # A TCP connection that closes is a path that is gone: aiortc's receive
    # loop must see it now, not when consent expires 30 s later.
    from aioice.ice import CandidatePair

    async def main() -> None:
        async with _Env() as env:
            reader, writer = await env.dial()
            writer.write(frame(_request(env.connection.local_username, env.connection.local_password)))
            await _read_frame(reader)
            peer = writer.get_extra_info("sockname")[:2]
            remote = next(c for c in env.connection._remote_candidates if (c.host, c.port) == peer)
            env.connection._nominated[1] = CandidatePair(env.session.protocols[0], remote)
            assert env.connection._queue.empty()
            writer.close()
            await env.settle(lambda: not env.connection._queue.empty())
            assert env.connection._queue.get_nowait() is None
            assert env.session.links == {}

    asyncio.run(main())


def test_a_moved_internal_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    # An aioice that no longer finds an incoming check's remote candidate by
    # address would leave the TCP prflx candidate unused: refuse to run.
    from aioice import Connection as AioiceConnection

    from media.webrtc import aiortc_adapter

    def check_incoming(self, message, addr, protocol):  # type: ignore[no-untyped-def]
        return None

    monkeypatch.setattr(AioiceConnection, "check_incoming", check_incoming)
    with pytest.raises(RuntimeError, match="check_incoming"):
        icetcp.check_internals()
    with pytest.raises(aiortc_adapter.AiortcInternalsChanged, match="ICE-TCP"):
        aiortc_adapter.check_internals()


def test_dual_stack_bind_address_listens_on_both_families() -> None:
    # webrtc.ice_bind_address = "::" (the ICE mux's dual-stack socket): the
    # TCP side must accept IPv4 viewers too, on the same port.
    async def main() -> None:
        listener = IceTcpListener("::", 0)
        await listener.start()
        try:
            assert listener.reachable("192.0.2.1")
            _, writer = await asyncio.open_connection("127.0.0.1", listener.port)
            writer.close()
            if socket.has_ipv6 and listener.reachable("::1"):
                _, writer = await asyncio.open_connection("::1", listener.port)
                writer.close()
        finally:
            await listener.close()

    asyncio.run(main())
