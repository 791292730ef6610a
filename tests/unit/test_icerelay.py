"""The ICE relay (media/webrtc/icerelay.py): main routes worker-owned
sessions' datagrams over the relay socket, registers a worker's STUN
transactions before sending them, drops what nobody verified, and forgets a
dead worker at once; the worker side runs aioice on main's port."""

from __future__ import annotations

import asyncio
import os
import pickle
import socket

import pytest
from aioice import Connection, stun

from media.webrtc import icerelay
from media.webrtc.icemux import IceMux, IceMuxConfig, stun_class
from media.webrtc.icerelay import (
    DATA,
    REGISTER,
    SEND,
    TCP,
    UNREGISTER,
    VERIFIED,
    IceRelayHub,
    RelayedIceMux,
    RelayError,
    decode,
    encode,
    relay_socketpair,
)

# RFC 5769 §2.1 "Sample Request": USERNAME "evtj:h6vY", password
# "VOkJxbRl1RmTxUk/WvJxBt" (the layout Chromium's checks have).
RFC5769_REQUEST = bytes.fromhex(
    "000100582112a442b7e7a701bc34d686fa87dfae"
    "802200105354554e207465737420636c69656e74"
    "002400046e0001ff80290008932ff9b151263b36"
    "000600096576746a3a6836765920202000080014"
    "9aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a2"
    "80280004e57a3bcf")
RFC5769_PWD = "VOkJxbRl1RmTxUk/WvJxBt"
DTLS = bytes.fromhex("16feff0000000000000000007a010000") + bytes(100)
SRTCP = bytes.fromhex("81c90007deadbeef") + bytes(40)
PEER = ("198.51.100.7", 50000)
SPOOF = ("198.51.100.8", 50000)


def _request(local_ufrag: str, remote_ufrag: str, password: str) -> bytes:
    msg = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    msg.attributes["USERNAME"] = f"{local_ufrag}:{remote_ufrag}"
    msg.attributes["PRIORITY"] = 1853817087
    msg.attributes["ICE-CONTROLLED"] = 1
    msg.add_message_integrity(password.encode())
    msg.add_fingerprint()
    return bytes(msg)


def _response(request: bytes) -> bytes:
    msg = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.RESPONSE,
                       transaction_id=request[8:20])
    msg.attributes["XOR-MAPPED-ADDRESS"] = PEER
    msg.add_fingerprint()
    return bytes(msg)


def _messages(sock: socket.socket) -> list[icerelay.RelayMessage]:
    out = []
    sock.setblocking(False)
    while True:
        try:
            data = sock.recv(icerelay.MAX_MESSAGE)
        except BlockingIOError:
            return out
        if not data:  # the other end closed
            return out
        out.append(decode(data))


async def _until(cond, timeout: float = 3.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    assert cond()


async def _started(**kw) -> IceMux:
    mux = IceMux(IceMuxConfig(**{"port": 0, **kw}))
    await mux.start()
    return mux


def test_wire_format_round_trips_and_rejects_garbage() -> None:
    for msg in (encode(DATA, "evtj", PEER, "192.0.2.10", DTLS, VERIFIED), encode(SEND, "abcdefgh", ("::1", 9), None,
                RFC5769_REQUEST), encode(REGISTER, "u", payload=b"pw"), encode(UNREGISTER, "u"),
                encode(TCP, "u", ("10.0.0.1", 5), "10.0.0.2", b"\x00\x01x")):
        assert encode(*_fields(decode(msg))) == msg
    m = decode(encode(DATA, "evtj", PEER, "192.0.2.10", DTLS, VERIFIED))
    assert (m.kind, m.ufrag, m.remote, m.local, m.payload, m.flags) == (DATA, "evtj", PEER, "192.0.2.10", DTLS, 1)
    for garbage in (b"", b"\x01\x00", bytes([9, 0, 0, 0, 0, 0, 0, 0]), bytes([1, 0, 50, 0, 0, 0, 0, 0]) + b"x",
                    bytes([1, 0, 2, 0, 0, 0, 0, 0]) + b"\xff\xfe"):
        with pytest.raises(RelayError):
            decode(garbage)


def _fields(m: icerelay.RelayMessage) -> tuple:
    return (m.kind, m.ufrag, m.remote, m.local, m.payload, m.flags)


def test_routes_to_the_worker_by_ufrag_address_and_transaction_and_drop_the_rest() -> None:
    async def main() -> None:
        mux = await _started(loopback=True)
        hub = IceRelayHub(mux)
        main_end, worker_end = relay_socketpair()
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer.bind(("127.0.0.1", 0))
        peer.settimeout(2)
        try:
            hub.add_worker(1, main_end)
            hub.register("evtj", RFC5769_PWD, 1)
            hub.register("evtj", RFC5769_PWD, 1)  # the worker's own REGISTER again: no-op
            with pytest.raises(KeyError):
                hub.register("evtj", "another-password-000000", 1)
            assert hub.worker_of("evtj") == 1 and mux.session_for_ufrag("evtj") is None
            c = mux.counters
            # DTLS before any check: nobody proved the address.
            mux.received(DTLS, PEER, "192.0.2.10")
            assert c.dropped_unknown_address == 1 and _messages(worker_end) == []
            # A verified Binding request: to the worker, teaching the address.
            mux.received(RFC5769_REQUEST, PEER, "192.0.2.10")
            (m,) = _messages(worker_end)
            assert _fields(m) == (DATA, "evtj", PEER, "192.0.2.10", RFC5769_REQUEST, VERIFIED)
            # DTLS and SRTCP from the learned address follow.
            mux.received(DTLS, PEER, "192.0.2.10")
            mux.received(SRTCP, PEER, "192.0.2.10")
            assert [(_fields(m)[0], m.payload, m.flags) for m in _messages(worker_end)] == [
                (DATA, DTLS, VERIFIED), (DATA, SRTCP, VERIFIED)]
            # The same bytes from a spoofed address, an unknown ufrag: dropped, counted.
            mux.received(DTLS, SPOOF)
            mux.received(_request("nobody", "x", "p" * 22), PEER)
            assert _messages(worker_end) == []
            assert (c.dropped_unknown_address, c.dropped_unknown_ufrag) == (2, 1)
            # A response nobody's request asked for.
            check = _request("peer", "evtj", "q" * 22)
            mux.received(_response(check), PEER)
            assert c.dropped_unknown_transaction == 1 and _messages(worker_end) == []
            # The worker's check goes out through main, which knew its
            # transaction before sending: the response comes back to the worker.
            target = peer.getsockname()
            worker_end.send(encode(SEND, "evtj", target, None, check))
            await _until(lambda: hub.stats(1).requests_sent == 1)
            data, src = peer.recvfrom(2048)
            assert data == check and src[1] == mux.port
            mux.received(_response(check), target)
            (m,) = _messages(worker_end)
            assert m.kind == DATA and stun_class(m.payload) == 2 and m.payload[8:20] == check[8:20]
            assert m.flags == 0  # the peer's address was never verified by a request
            assert hub.stats(1).relayed_packets == 4
            # The worker closes the session: the route goes.
            worker_end.send(encode(UNREGISTER, "evtj"))
            await _until(lambda: "evtj" not in mux.table.by_ufrag)
            assert PEER not in mux.table.by_addr and hub.worker_of("evtj") is None
            # Garbage from a worker is counted, never fatal; main sends nothing but STUN requests.
            worker_end.send(b"\x07garbage")
            worker_end.send(encode(REGISTER, "pwbad", payload=b"\xff\xfe"))
            hub.register("evtj", RFC5769_PWD, 1)
            worker_end.send(encode(SEND, "evtj", target, None, DTLS))
            await _until(lambda: hub.stats(1).bad_messages == 3)
            assert hub.stats(1).requests_sent == 1 and hub.worker_of("pwbad") is None
            assert 1 in hub.workers
        finally:
            hub.close()
            worker_end.close()
            peer.close()
            await mux.close()

    asyncio.run(main())


def test_a_dead_worker_loses_its_routes_at_once_and_the_others_keep_theirs() -> None:
    async def main() -> None:
        mux = await _started(loopback=True)
        hub = IceRelayHub(mux)
        a_main, a_worker = relay_socketpair()
        b_main, b_worker = relay_socketpair()
        try:
            hub.add_worker(1, a_main)
            hub.add_worker(2, b_main)
            # Registered by the worker itself (at gathering).
            a_worker.send(encode(REGISTER, "evtj", payload=RFC5769_PWD.encode()))
            b_worker.send(encode(REGISTER, "bbbbbbbb", payload=b"b" * 22))
            await _until(lambda: hub.worker_of("evtj") == 1 and hub.worker_of("bbbbbbbb") == 2)
            mux.received(RFC5769_REQUEST, PEER, "192.0.2.10")
            other = ("198.51.100.9", 1000)
            mux.received(_request("bbbbbbbb", "x", "b" * 22), other, "192.0.2.10")
            assert len(_messages(a_worker)) == 1 and len(_messages(b_worker)) == 1
            a_worker.close()  # the worker process died: EOF
            await _until(lambda: 1 not in hub.workers)
            assert "evtj" not in mux.table.by_ufrag and PEER not in mux.table.by_addr
            mux.received(DTLS, PEER)
            assert mux.counters.dropped_unknown_address == 1
            mux.received(DTLS, other)
            assert [m.payload for m in _messages(b_worker)] == [DTLS]
            hub.remove_worker(2)
            assert mux.table.by_ufrag == {} and mux.table.by_addr == {}
            hub.remove_worker(2)  # twice: nothing left to do
        finally:
            hub.close()
            b_worker.close()
            await mux.close()

    asyncio.run(main())


def test_a_full_relay_socket_drops_and_counts() -> None:
    async def main() -> None:
        mux = await _started(loopback=True)
        hub = IceRelayHub(mux)
        main_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        main_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        try:
            hub.add_worker(1, main_end)
            hub.register("evtj", RFC5769_PWD, 1)
            mux.received(RFC5769_REQUEST, PEER)
            for _ in range(200):
                mux.received(SRTCP, PEER)
            st = hub.stats(1)
            assert st.dropped_full > 0 and st.relayed_packets + st.dropped_full == 201
            assert len(_messages(worker_end)) == st.relayed_packets
        finally:
            hub.close()
            worker_end.close()
            await mux.close()

    asyncio.run(main())


def test_handoff_pickles() -> None:
    async def main() -> None:
        mux = await _started(host_addresses=["127.0.0.1"])
        try:
            handoff = IceRelayHub(mux).worker_handoff()
            again = pickle.loads(pickle.dumps(handoff))
            assert again == handoff and again.port == mux.port and again.addresses == ("127.0.0.1",)
            assert again.tcp is None
        finally:
            await mux.close()

    asyncio.run(main())


@pytest.mark.parametrize("bind,hosts,family", [
    ("0.0.0.0", ["127.0.0.1"], "127.0.0.1"),
    # A dual-stack socket: the worker's direct sends must IPv4-map the peer
    # (wire_addr from the dup's family), and an IPv6 peer works too.
    ("::", ["127.0.0.1", "::1"], "127.0.0.1"),
    ("::", ["::1"], "::1"),
])
def test_an_aioice_session_in_a_worker_connects_through_main_and_sends_on_the_shared_socket(
        bind: str, hosts: list[str], family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Main's mux and a RelayedIceMux on a duplicate of its socket (in one
    process here; tests/integration/test_icerelay_process.py runs a real
    worker process): a plain aioice agent connects to the worker's session
    on main's port, and what the worker sends arrives from that port."""
    # The client agent on loopback: aioice would list the machine's own
    # interfaces (skipping loopback), and a CI machine may have no IPv6
    # address but ::1 — or one whose route a namespace test just changed.
    import aioice.ice

    monkeypatch.setattr(aioice.ice, "get_host_addresses",
                        lambda use_ipv4, use_ipv6: [family] if (":" in family) == use_ipv6 else [])

    async def main() -> None:
        mux = await _started(bind_address=bind, host_addresses=hosts)
        hub = IceRelayHub(mux)
        main_end, worker_end = relay_socketpair()
        hub.add_worker(7, main_end)
        dup = socket.socket(fileno=os.dup(hub.udp_socket.fileno()))
        worker = RelayedIceMux(pickle.loads(pickle.dumps(hub.worker_handoff())), worker_end, dup)
        await worker.start()
        assert worker.port == mux.port and worker.addresses == hosts
        server = Connection(ice_controlling=False)
        client = Connection(ice_controlling=True, use_ipv4=":" not in family, use_ipv6=":" in family)
        try:
            worker._hook(server)
            await server.gather_candidates()
            assert len(server.local_username) == 8  # 62^8: unique across processes
            hub.register(server.local_username, server.local_password, 7)  # as the host does from the answer
            await client.gather_candidates()
            for cand in server.local_candidates:
                await client.add_remote_candidate(cand)
            await client.add_remote_candidate(None)
            for cand in client.local_candidates:
                await server.add_remote_candidate(cand)
            await server.add_remote_candidate(None)
            client.remote_username, client.remote_password = server.local_username, server.local_password
            server.remote_username, server.remote_password = client.local_username, client.local_password
            await asyncio.wait_for(asyncio.gather(client.connect(), server.connect()), 10)
            pair = client._nominated[1]
            assert (pair.remote_candidate.host, pair.remote_candidate.port) == (family, mux.port)
            # The worker's checks went through main; data both ways.
            assert worker.relay_stats.requests_via_main > 0 and hub.stats(7).requests_sent > 0
            await server.send(b"\x80from-the-worker")
            data = await asyncio.wait_for(client.recv(), 5)
            assert data == b"\x80from-the-worker"
            await client.send(b"\x80to-the-worker")
            data = await asyncio.wait_for(server.recv(), 5)
            assert data == b"\x80to-the-worker"
            # FastPath's socket: the duplicate, from main's port.
            transport = server._nominated[1].protocol.transport
            assert transport.mux_socket is dup and transport.mux_socket.getsockname()[1] == mux.port
            await server.close()
            await _until(lambda: server.local_username not in mux.table.by_ufrag)
        finally:
            await client.close()
            await server.close()
            await worker.close()
            hub.close()
            await mux.close()
        assert mux.sock is None and worker_end.fileno() == -1

    asyncio.run(main())


def test_answer_credentials_and_totals_survive_a_removed_worker() -> None:
    creds = "a=ice-ufrag:AbCd1234\r\na=ice-pwd:" + "p" * 22 + "\r\n"
    sdp = ("v=0\r\na=group:BUNDLE 0 1\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n" + creds
           + "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\n" + creds)
    assert icerelay.answer_credentials(sdp) == ("AbCd1234", "p" * 22)
    with pytest.raises(ValueError):
        icerelay.answer_credentials("v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n")

    async def main() -> None:
        mux = await _started(loopback=True)
        hub = IceRelayHub(mux)
        main_end, worker_end = relay_socketpair()
        try:
            hub.add_worker(1, main_end)
            with pytest.raises(KeyError):
                hub.add_worker(1, main_end)
            hub.register("evtj", RFC5769_PWD, 1)
            mux.received(RFC5769_REQUEST, PEER)
            mux.received(SRTCP, PEER)
            hub.remove_worker(1)
            assert hub.totals().relayed_packets == 2 and hub.totals().registered == 1
            with pytest.raises(KeyError):
                hub.register("abcdefgh", "x" * 22, 1)  # no such worker any more
        finally:
            hub.close()
            worker_end.close()
            await mux.close()

    asyncio.run(main())


def test_worker_side_routes_relayed_datagrams_and_learns_only_verified_addresses() -> None:
    """RelayedIceMux.relayed without sockets in between: an unknown ufrag is
    counted; a VERIFIED datagram teaches the local address replies (and
    FastPath) must leave from; an unverified one teaches nothing."""
    from media.webrtc.icemux import pktinfo

    async def main() -> None:
        mux = await _started(bind_address="0.0.0.0", host_addresses=["127.0.0.1"])
        hub = IceRelayHub(mux)
        main_end, worker_end = relay_socketpair()  # main's end read here, not by the hub
        worker = RelayedIceMux(hub.worker_handoff(), worker_end, socket.socket(fileno=os.dup(mux.sock.fileno())))
        await worker.start()
        conn = Connection(ice_controlling=False)
        try:
            worker._hook(conn)
            await conn.gather_candidates()
            ufrag = conn.local_username
            (m,) = _messages(main_end)
            assert (m.kind, m.ufrag, m.payload) == (REGISTER, ufrag, conn.local_password.encode())
            got: list = []
            worker.sessions[ufrag].protocol.datagram_received = lambda data, addr: got.append((data, addr))
            worker.relayed(decode(encode(DATA, "zzzzzzzz", PEER, "192.0.2.10", DTLS, VERIFIED)))
            assert worker.counters.dropped_unknown_ufrag == 1 and got == []
            worker.relayed(decode(encode(DATA, ufrag, SPOOF, "192.0.2.10", DTLS)))
            assert worker.table.local_for(SPOOF) is None and got == [(DTLS, SPOOF)]
            worker.relayed(decode(encode(DATA, ufrag, PEER, "192.0.2.10", DTLS, VERIFIED)))
            assert worker.table.local_for(PEER) == "192.0.2.10"
            # Through the relay socket: each header decoded once, every payload exact, garbage counted.
            srtcp = b"\x80\xc9\x00\x01" + bytes(40)
            for payload in (srtcp, DTLS, srtcp[:30]):
                main_end.send(encode(DATA, ufrag, PEER, "192.0.2.10", payload, VERIFIED))
            main_end.send(encode(DATA, ufrag, SPOOF, "192.0.2.10", srtcp))
            main_end.send(encode(DATA, ufrag, PEER, "192.0.2.10", DTLS)[:12])  # its names cut short
            await _until(lambda: worker.relay_stats.bad_messages == 1)
            assert got[2:] == [(srtcp, PEER), (DTLS, PEER), (srtcp[:30], PEER), (srtcp, SPOOF)]
            assert sorted(head[1:] for head in worker._heads.values()) == [
                (PEER, "192.0.2.10", VERIFIED), (SPOOF, "192.0.2.10", 0)]
            del got[2:]
            transport = worker.sessions[ufrag].protocol.transport
            assert transport.ancillary_for(PEER) == [pktinfo("192.0.2.10")]
            # The worker's own check: via main, its response back to the sending protocol.
            check = _request("peer", ufrag, "q" * 22)
            transport.sendto(check, PEER)
            (m,) = _messages(main_end)
            assert (m.kind, m.ufrag, m.remote, m.payload) == (SEND, ufrag, PEER, check)
            worker.relayed(decode(encode(DATA, ufrag, PEER, "192.0.2.10", _response(check), VERIFIED)))
            assert worker.table.by_txid == {} and got[-1][0][8:20] == check[8:20]
            # Anything else leaves directly (here: to a documentation address, dropped by the kernel or sent).
            transport.sendto(DTLS, PEER)
            assert worker.relay_stats.sent_direct == 1 and _messages(main_end) == []
            await conn.close()
            (m,) = _messages(main_end)
            assert (m.kind, m.ufrag) == (UNREGISTER, ufrag)
            # Main exits: the worker hears it once.
            lost: list = []
            worker.on_main_lost = lambda: lost.append(True)
            main_end.close()
            await _until(lambda: worker.relay_stats.main_lost)
            assert lost == [True]
        finally:
            await conn.close()
            await worker.close()
            main_end.close()
            await mux.close()

    asyncio.run(main())


def test_a_worker_receives_its_viewers_datagrams_on_a_socket_connected_to_the_viewer() -> None:
    """receive_direct: main's port is shared (icemux.share_port) and the
    worker's socket connected to the viewer gets the viewer's datagrams,
    past main; every other peer's still reach main, also while a socket is
    bound but not yet connected; the session's end closes the socket; a
    second server cannot take the port."""
    from types import SimpleNamespace

    async def main() -> None:
        mux = await _started(bind_address="0.0.0.0", host_addresses=["127.0.0.1"], direct_receive=True)
        assert mux.direct_receive
        port = mux.port
        for direct in (True, False):  # another server on the port, sharing it or not
            with pytest.raises(OSError):
                await _started(bind_address="0.0.0.0", port=port, host_addresses=["127.0.0.1"],
                               direct_receive=direct)
        hub = IceRelayHub(mux)
        main_end, worker_end = relay_socketpair()
        worker = RelayedIceMux(hub.worker_handoff(), worker_end, socket.socket(fileno=os.dup(mux.sock.fileno())))
        await worker.start()
        conn = Connection(ice_controlling=False)
        viewer, other, idle = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3))
        try:
            viewer.bind(("127.0.0.1", 0))
            vaddr = viewer.getsockname()
            worker._hook(conn)
            await conn.gather_candidates()
            ufrag = conn.local_username
            got: list = []
            worker.sessions[ufrag].protocol.datagram_received = lambda data, addr: got.append((data, addr))
            assert not worker.receive_direct(conn)  # no nominated pair yet
            worker.relayed(decode(encode(DATA, ufrag, vaddr, "127.0.0.1", DTLS, VERIFIED)))  # main verified it
            conn._nominated[1] = SimpleNamespace(remote_addr=vaddr)  # all receive_direct reads of the pair
            limit, worker.max_direct = worker.max_direct, 0  # no descriptors to spare: the relay it stays
            assert limit > 0 and not worker.receive_direct(conn) and worker.relay_stats.direct_refused == 1
            worker.max_direct = limit
            assert worker.receive_direct(conn)
            assert worker.relay_stats.direct_opened == worker.direct_open == 1
            main_seen = mux.counters.received_packets
            srtcp = [b"\x81\xc9\x00\x07" + bytes([i]) * 40 for i in range(5)]
            for d in srtcp:
                viewer.sendto(d, ("127.0.0.1", port))
            other.sendto(b"\x80\xc8", ("127.0.0.1", port))
            await _until(lambda: len(got) == 6 and mux.counters.received_packets == main_seen + 1)
            assert got[1:] == [(d, vaddr) for d in srtcp] and worker.relay_stats.direct_received == 5
            assert hub.totals().relayed_packets == 0 and _messages(main_end)[-1].kind == REGISTER
            # A socket bound to the port, not connected (a worker between bind and connect): it takes nothing.
            idle.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            idle.bind(("0.0.0.0", port))
            idle.setblocking(False)
            for _ in range(20):
                other.sendto(b"\x80\xc8", ("127.0.0.1", port))
            await _until(lambda: mux.counters.received_packets == main_seen + 21)
            with pytest.raises(BlockingIOError):
                idle.recv(64)
            # The session ends: its socket closes and the viewer's datagrams go to main again.
            await conn.close()
            assert worker.direct_open == 0
            viewer.sendto(srtcp[0], ("127.0.0.1", port))
            await _until(lambda: mux.counters.received_packets == main_seen + 22)
            assert len(got) == 6
        finally:
            for s in (viewer, other, idle):
                s.close()
            await conn.close()
            await worker.close()
            main_end.close()
            await mux.close()

    asyncio.run(main())


def test_an_adopted_tcp_connection_keeps_the_listener_limits() -> None:
    from media.webrtc.icetcp import IceTcpListener, frame

    async def main() -> None:
        listener = IceTcpListener(None, 9, max_connections=1, max_anonymous=1)
        listener.start_adopting({socket.AF_INET})
        pairs = [socket.socketpair() for _ in range(2)]
        try:
            listener.adopt(pairs[0][0])
            await _until(lambda: listener.open_connections == 1)
            listener.adopt(pairs[1][0], frame(b"\x00\x01"))
            await _until(lambda: listener.stats.refused.get("limit") == 1)
            pairs[1][1].settimeout(2)
            assert pairs[1][1].recv(10) == b""  # closed by the worker's listener
            # The bytes main read come first: not STUN, refused.
            listener.sweep(1e12)  # the first one's first-request deadline
            assert listener.stats.timed_out == 1 and listener.open_connections == 0
            pairs.append(socket.socketpair())
            listener.adopt(pairs[2][0], frame(b"\x00\x01"))
            await _until(lambda: listener.stats.refused.get("not_stun") == 1)
            assert listener.stats.adopted == 3 and listener.open_connections == 0
        finally:
            await listener.close()
            for a, b in pairs:
                a.close()
                b.close()

    asyncio.run(main())
