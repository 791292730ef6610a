"""The shared ICE UDP socket: demultiplexer (sans-I/O), candidates from
config, the aioice hook's registration and cleanup, and sends on the shared
socket (media/webrtc/icemux.py)."""

from __future__ import annotations

import asyncio
import socket

import pytest
from aioice import Connection, stun

from media.webrtc import aiortc_adapter as adapter
from media.webrtc.icemux import (
    IceMux,
    IceMuxConfig,
    IceMuxConfigError,
    MuxTable,
    MuxTransport,
    candidate_addresses,
    candidate_priority,
    check_integrity,
    host_addresses,
    pktinfo,
    resolve_announce,
    stun_class,
    stun_username,
)

# RFC 5769 §2.1 "Sample Request": USERNAME "evtj:h6vY", password
# "VOkJxbRl1RmTxUk/WvJxBt", SOFTWARE, PRIORITY, ICE-CONTROLLED,
# MESSAGE-INTEGRITY, FINGERPRINT (the layout Chromium's checks have).
RFC5769_REQUEST = bytes.fromhex(
    "000100582112a442b7e7a701bc34d686fa87dfae"
    "802200105354554e207465737420636c69656e74"
    "002400046e0001ff80290008932ff9b151263b36"
    "000600096576746a3a6836765920202000080014"
    "9aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a2"
    "80280004e57a3bcf")
RFC5769_KEY = b"VOkJxbRl1RmTxUk/WvJxBt"
# A DTLS 1.2 ClientHello record header and an SRTP packet's first bytes
# (RFC 7983 §7: 20..63 DTLS, 128..191 RTP/RTCP).
DTLS = bytes.fromhex("16feff0000000000000000007a010000") + bytes(100)
SRTP = bytes.fromhex("80e0000100000000deadbeef") + bytes(120)
PEER = ("198.51.100.7", 50000)


def _request(local_ufrag: str, remote_ufrag: str, password: str, *, integrity: bool = True) -> bytes:
    """A Binding request as aioice (aiortc's ICE agent) builds its checks."""
    msg = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    msg.attributes["USERNAME"] = f"{local_ufrag}:{remote_ufrag}"
    msg.attributes["PRIORITY"] = 1853817087
    msg.attributes["ICE-CONTROLLING"] = 1
    if integrity:
        msg.add_message_integrity(password.encode())
    msg.add_fingerprint()
    return bytes(msg)


def test_rfc5769_request_parses_and_verifies() -> None:
    assert stun_class(RFC5769_REQUEST) == 0
    assert stun_username(RFC5769_REQUEST) == "evtj:h6vY"
    assert check_integrity(RFC5769_REQUEST, RFC5769_KEY)
    assert not check_integrity(RFC5769_REQUEST, b"wrong-password-000000")
    tampered = bytearray(RFC5769_REQUEST)
    tampered[30] ^= 1  # inside SOFTWARE, covered by the HMAC
    assert not check_integrity(bytes(tampered), RFC5769_KEY)
    assert stun_class(DTLS) is None and stun_class(SRTP) is None
    assert stun_class(RFC5769_REQUEST[:-4]) is None  # length no longer matches the header


def test_stun_request_routes_by_ufrag_and_teaches_the_address() -> None:
    table = MuxTable()
    entry = table.register("evtj", RFC5769_KEY, target="session-a")
    other = table.register("zzzz", b"another-password-01234", target="session-b")
    # DTLS from an address no request has proved yet: dropped, counted.
    assert table.route(DTLS, PEER) is None
    assert table.counters.dropped_unknown_address == 1
    route = table.route(RFC5769_REQUEST, PEER, "192.0.2.10")
    assert route is not None and route.entry is entry and route.entry.target == "session-a"
    assert table.by_addr[PEER] is entry and entry.addresses[PEER] == "192.0.2.10"
    assert table.local_for(PEER) == "192.0.2.10"
    assert table.route(DTLS, PEER).entry is entry
    assert table.route(SRTP, PEER).entry is entry
    assert table.route(SRTP, ("198.51.100.8", 50000)) is None
    assert other.addresses == {}
    assert table.counters.addresses_learned == 1


def test_unknown_ufrag_and_unauthenticated_stun_are_dropped() -> None:
    table = MuxTable()
    table.register("abcd", b"pw-abcd-0123456789abcd")
    assert table.route(RFC5769_REQUEST, PEER) is None  # "evtj" is nobody's
    assert table.counters.dropped_unknown_ufrag == 1
    indication = bytearray(RFC5769_REQUEST)
    indication[1] = 0x11  # Binding indication (class 01)
    assert table.route(bytes(indication), PEER) is None
    response = bytearray(RFC5769_REQUEST)
    response[1] = 0x01
    response[0] = 0x01  # Binding success response, transaction nobody sent
    assert table.route(bytes(response), PEER) is None
    assert table.counters.dropped_unknown_transaction == 1
    assert table.counters.dropped_packets == 3
    assert table.counters.dropped_bytes == 3 * len(RFC5769_REQUEST)
    assert table.by_addr == {}


def test_spoofed_request_reaches_the_agent_but_never_claims_the_address() -> None:
    table = MuxTable()
    entry = table.register("evtj", RFC5769_KEY)
    forged = _request("evtj", "h6vY", "not-the-password-00000")
    route = table.route(forged, PEER)
    # The agent still sees it, to answer 401 (RFC 8489 §9.1.3) ...
    assert route is not None and route.entry is entry
    # ... but the address is not the session's: its DTLS/SRTP is dropped.
    assert PEER not in table.by_addr and table.route(SRTP, PEER) is None
    without = _request("evtj", "h6vY", "", integrity=False)
    table.route(without, PEER)
    assert PEER not in table.by_addr
    good = _request("evtj", "h6vY", RFC5769_KEY.decode())
    table.route(good, PEER)
    assert table.route(SRTP, PEER).entry is entry


def test_addresses_per_session_are_bounded_oldest_first_and_move_to_the_last_prover() -> None:
    table = MuxTable(max_addresses=2)
    a = table.register("aaaa", b"password-of-aaaa-00000")
    b = table.register("bbbb", b"password-of-bbbb-00000")
    addrs = [("203.0.113.1", 1000 + i) for i in range(3)]
    for addr in addrs[:2]:
        table.route(_request("aaaa", "x", "password-of-aaaa-00000"), addr)
    table.route(_request("aaaa", "x", "password-of-aaaa-00000"), addrs[0])  # consent refreshes the first
    table.route(_request("aaaa", "x", "password-of-aaaa-00000"), addrs[2])
    assert list(a.addresses) == [addrs[0], addrs[2]]
    assert addrs[1] not in table.by_addr and table.counters.addresses_evicted == 1
    # The same address proves itself for another session (a reused NAT mapping).
    table.route(_request("bbbb", "x", "password-of-bbbb-00000"), addrs[0])
    assert table.by_addr[addrs[0]] is b and addrs[0] not in a.addresses


def test_responses_follow_their_transaction_and_pending_ones_are_bounded() -> None:
    table = MuxTable(max_pending=4)
    entry = table.register("aaaa", b"password-of-aaaa-00000")
    request = _request("rrrr", "aaaa", "remote-password-000000")
    table.note_request(entry, request, hint="protocol-1")
    table.note_request(entry, request, hint="protocol-1")  # a retransmission: same id
    assert len(entry.pending) == 1
    response = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.RESPONSE,
                            transaction_id=request[8:20])
    response.attributes["XOR-MAPPED-ADDRESS"] = PEER
    route = table.route(bytes(response), ("192.0.2.99", 3478))
    assert route is not None and route.entry is entry and route.hint == "protocol-1"
    assert table.by_txid == {} and entry.pending == {}
    assert table.route(bytes(response), ("192.0.2.99", 3478)) is None  # answered already
    for _ in range(10):
        table.note_request(entry, _request("rrrr", "aaaa", "remote-password-000000"))
    assert len(entry.pending) == 4 and len(table.by_txid) == 4
    table.note_request(entry, DTLS)  # not STUN: nothing to remember
    assert len(entry.pending) == 4


def test_unregister_forgets_everything() -> None:
    table = MuxTable()
    for i in range(1000):
        ufrag = f"u{i:03d}"
        entry = table.register(ufrag, b"password-0123456789abc")
        table.route(_request(ufrag, "peer", "password-0123456789abc"), ("203.0.113.5", 2000 + i % 7))
        table.note_request(entry, _request("peer", ufrag, "peer-password-0123456"))
        table.unregister(entry)
        table.unregister(entry)  # twice is harmless
        assert table.route(SRTP, ("203.0.113.5", 2000 + i % 7)) is None
    assert table.by_ufrag == {} and table.by_addr == {} and table.by_txid == {}
    assert table.counters.sessions_registered == table.counters.sessions_unregistered == 1000
    with pytest.raises(KeyError):
        table.register("same", b"k")
        table.register("same", b"k")


IFACES = {"lo": ["127.0.0.1", "::1"], "eth0": ["192.168.1.20", "2001:db8::20"], "eth1": ["10.0.0.5"],
          "docker0": ["172.17.0.1", "192.168.1.20"]}


def test_host_addresses_from_config() -> None:
    assert host_addresses(IceMuxConfig(), IFACES) == ["192.168.1.20", "10.0.0.5", "172.17.0.1"]
    assert host_addresses(IceMuxConfig(host_addresses=["eth1", "192.168.1.20", "10.0.0.5"]), IFACES) == [
        "10.0.0.5", "192.168.1.20"]
    assert host_addresses(IceMuxConfig(host_addresses=["eth1"], loopback=True), IFACES) == ["10.0.0.5", "127.0.0.1"]
    # A socket bound to one address is only reachable there.
    assert host_addresses(IceMuxConfig(bind_address="10.0.0.5"), IFACES) == ["10.0.0.5"]
    with pytest.raises(IceMuxConfigError, match="wlan9"):
        host_addresses(IceMuxConfig(host_addresses=["wlan9"]), IFACES)


def test_announced_addresses_replace_or_add_without_duplicates() -> None:
    hosts = ["192.168.1.20", "10.0.0.5"]
    assert candidate_addresses(IceMuxConfig(announce=["x"]), ["203.0.113.7"], hosts) == ["203.0.113.7"]
    assert candidate_addresses(IceMuxConfig(announce=["x"], loopback=True), ["203.0.113.7"], hosts) == [
        "203.0.113.7", "127.0.0.1"]
    assert candidate_addresses(IceMuxConfig(announce=["x"], announce_mode="add"), ["203.0.113.7", "10.0.0.5"],
                               hosts) == ["192.168.1.20", "10.0.0.5", "203.0.113.7"]
    assert candidate_addresses(IceMuxConfig(), [], hosts) == hosts
    assert resolve_announce(["203.0.113.7", "localhost", "203.0.113.7"]) == ["203.0.113.7", "127.0.0.1"]
    with pytest.raises(IceMuxConfigError, match="does not resolve"):
        resolve_announce(["no-such-host.invalid"])
    with pytest.raises(IceMuxConfigError, match="IPv6"):
        resolve_announce(["2001:db8::1"])


def test_priorities_follow_rfc8445_with_distinct_local_preferences() -> None:
    prios = [candidate_priority(i) for i in range(4)]
    assert prios[0] == 126 * 2**24 + 65535 * 2**8 + 255 == 2130706431
    assert len(set(prios)) == 4 and prios == sorted(prios, reverse=True)


def test_settings_validate_the_mux_config() -> None:
    from pydantic import ValidationError

    from server.config import WebRtcSettings

    cfg = WebRtcSettings(ice_udp_port=0, ice_announce=["media.example.com", "203.0.113.7"],
                         ice_announce_mode="add", ice_host_addresses=["eth0"]).ice_mux_config()
    assert cfg.port == 0 and cfg.announce_mode == "add" and cfg.host_addresses == ["eth0"]
    assert WebRtcSettings(ice_mux=False).ice_mux_config() is None
    for bad in ({"ice_udp_port": 70000}, {"ice_announce_mode": "nat"}, {"ice_bind_address": "any"},
                {"ice_bind_address": "eth0"}, {"ice_announce": ["not a name"]}, {"ice_host_addresses": ["a b"]}):
        with pytest.raises(ValidationError):
            WebRtcSettings(**bad)


def test_internals_the_mux_hooks_are_still_there(monkeypatch) -> None:
    from aioice import ice

    adapter.check_internals()
    monkeypatch.delattr(ice, "server_reflexive_candidate")
    with pytest.raises(adapter.AiortcInternalsChanged, match="server_reflexive_candidate"):
        adapter.check_internals()
    monkeypatch.undo()

    async def gather_elsewhere(self) -> None:  # an upgrade that gathers differently
        await asyncio.sleep(0)

    monkeypatch.setattr(Connection, "gather_candidates", gather_elsewhere)
    with pytest.raises(adapter.AiortcInternalsChanged, match="gather_candidates"):
        adapter.check_internals()


async def _started(**kw) -> IceMux:
    mux = IceMux(IceMuxConfig(port=0, **kw))
    await mux.start()
    return mux


def test_sessions_register_at_gathering_and_leave_nothing_after_1000_cycles() -> None:
    async def main() -> None:
        mux = await _started(host_addresses=["127.0.0.1"], announce=["203.0.113.7"], announce_mode="add")
        try:
            for i in range(1000):
                conn = Connection(ice_controlling=False)
                mux._hook(conn)
                await conn.gather_candidates()
                cands = conn.local_candidates
                assert [(c.host, c.port, c.transport) for c in cands] == [
                    ("127.0.0.1", mux.port, "udp"), ("203.0.113.7", mux.port, "udp")]
                assert cands[0].priority > cands[1].priority
                assert mux.session_for_ufrag(conn.local_username).connection is conn
                # A peer proves an address; a check of ours is pending.
                mux.received(_request(conn.local_username, "peer", conn.local_password), ("127.0.0.1", 40000 + i))
                conn._protocols[0].transport.sendto(_request("peer", conn.local_username, "p" * 22),
                                                    ("127.0.0.1", 9))
                assert mux.table.by_txid and mux.table.by_addr
                await conn.close()
            assert mux.sessions == {} and mux.table.by_ufrag == {}
            assert mux.table.by_addr == {} and mux.table.by_txid == {}
            assert mux.counters.sessions_registered == mux.counters.sessions_unregistered == 1000
        finally:
            await mux.close()

    asyncio.run(main())


def test_sends_leave_from_the_address_the_peer_checked_and_gso_works_on_the_shared_socket() -> None:
    """A peer on 127.0.0.1 that checked our LAN address must hear from the
    LAN address (the kernel would pick 127.0.0.1); the fast path's GSO batch
    carries the same source."""
    lan = next((ip for ip in host_addresses(IceMuxConfig()) if ip != "127.0.0.1"), None)
    if lan is None:
        pytest.skip("this host has no non-loopback IPv4 address")

    async def main() -> None:
        mux = await _started()
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer.bind(("127.0.0.1", 0))
        peer.settimeout(2)
        try:
            conn = Connection(ice_controlling=False)
            mux._hook(conn)
            await conn.gather_candidates()
            session = mux.session_for_ufrag(conn.local_username)
            addr = peer.getsockname()
            peer.sendto(_request(conn.local_username, "peer", conn.local_password), (lan, mux.port))
            for _ in range(100):
                if mux.table.local_for(addr) is not None:
                    break
                await asyncio.sleep(0.01)
            assert mux.table.local_for(addr) == lan
            # aioice's Binding response went out from the LAN address.
            data, src = peer.recvfrom(2048)
            assert stun_class(data) == 2 and src == (lan, mux.port)
            assert session.protocol.transport.ancillary_for(addr) == [pktinfo(lan)]
            sender = adapter.DatagramSender(session.protocol.transport.mux_socket, addr)
            sender.ancillary = session.protocol.transport.ancillary_for(addr)
            assert sender.send_batch([bytes([0x80]) + bytes(999)] * 5) == 5000
            assert sender.send(bytes([0x80]) + bytes(99)) == 100
            got = [peer.recvfrom(2048) for _ in range(6)]
            assert [len(d) for d, _ in got] == [1000] * 5 + [100]
            assert {s for _, s in got} == {(lan, mux.port)}
            assert sender.gso_fallbacks == 0 and sender.errors == 0
            await conn.close()
        finally:
            peer.close()
            await mux.close()

    asyncio.run(main())


def test_datagrams_nobody_owns_are_counted_on_the_socket() -> None:
    async def main() -> None:
        mux = await _started(loopback=True)
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            for data in (SRTP, DTLS, RFC5769_REQUEST):
                probe.sendto(data, ("127.0.0.1", mux.port))
            for _ in range(100):
                if mux.counters.received_packets == 3:
                    break
                await asyncio.sleep(0.01)
            c = mux.counters
            assert (c.dropped_unknown_address, c.dropped_unknown_ufrag, c.handler_errors) == (2, 1, 0)
        finally:
            probe.close()
            await mux.close()

    asyncio.run(main())


def test_a_ufrag_already_on_the_mux_is_replaced_before_the_answer() -> None:
    async def main() -> None:
        mux = await _started(loopback=True)
        try:
            first = Connection(ice_controlling=False)
            mux._hook(first)
            await first.gather_candidates()
            second = Connection(ice_controlling=False, local_username=first.local_username)
            mux._hook(second)
            await second.gather_candidates()
            assert second.local_username != first.local_username and len(second.local_username) == 8
            assert mux.session_for_ufrag(second.local_username).connection is second
            assert mux.session_for_ufrag(first.local_username).connection is first
            await first.close()
            await second.close()
            assert mux.sessions == {}
        finally:
            await mux.close()

    asyncio.run(main())


def test_registry_api_for_other_transports() -> None:
    """What ICE-TCP (media/webrtc/icetcp.py) plugs into: extra candidates at
    gathering, the session a STUN request names, and its integrity check."""
    from aioice import Candidate
    from aioice.ice import StunProtocol

    async def main() -> None:
        mux = await _started(host_addresses=["127.0.0.1"])
        offered: list = []

        def tcp_candidates(session) -> list:
            protocol = StunProtocol(session.connection)
            protocol.local_candidate = Candidate(
                foundation="tcp1", component=1, transport="tcp", priority=candidate_priority(0) - (40 << 24),
                host="127.0.0.1", port=mux.port, type="host", tcptype="passive")
            # A stand-in for ICE-TCP's connection-backed transport.
            protocol.connection_made(MuxTransport(mux, session, protocol))
            offered.append(protocol)
            return [protocol]

        mux.candidate_sources.append(tcp_candidates)
        try:
            conn = Connection(ice_controlling=False)
            mux._hook(conn)
            await conn.gather_candidates()
            assert [c.transport for c in conn.local_candidates] == ["udp", "tcp"]
            assert offered[0] in conn._protocols
            session = mux.session_for_ufrag(conn.local_username)
            assert session is not None and session.ufrag == conn.local_username
            good = _request(conn.local_username, "peer", conn.local_password)
            assert session.verify_request(good)
            assert not session.verify_request(_request(conn.local_username, "peer", "x" * 22))
            assert not session.verify_request(_request("else", "peer", conn.local_password))
            assert not session.verify_request(SRTP)
            assert mux.session_for_ufrag("nobody") is None
            await conn.close()
            assert not session.verify_request(good)  # gone with its session
        finally:
            await mux.close()

    asyncio.run(main())


def test_dual_stack_socket_serves_ipv4_and_ipv6_peers() -> None:
    """bind "::": one socket, an IPv4 and an IPv6 candidate, each family's
    peer answered from the address it checked, the fast path's GSO batch to
    both (IPv4 as IPv4-mapped on the wire, plain in ICE)."""
    async def main() -> None:
        mux = await _started(bind_address="::", host_addresses=["127.0.0.1", "::1"])
        peers = []
        try:
            assert mux.addresses == ["127.0.0.1", "::1"] and mux.sock.family == socket.AF_INET6
            conn = Connection(ice_controlling=False)
            mux._hook(conn)
            await conn.gather_candidates()
            assert [(c.host, c.port) for c in conn.local_candidates] == [("127.0.0.1", mux.port), ("::1", mux.port)]
            session = mux.session_for_ufrag(conn.local_username)
            assert set(session.protocols) == {4, 6}
            for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
                peer = socket.socket(family, socket.SOCK_DGRAM)
                peer.bind((host, 0))
                peer.settimeout(2)
                peers.append(peer)
                peer.sendto(_request(conn.local_username, "peer", conn.local_password), (host, mux.port))
                addr = peer.getsockname()[:2]
                for _ in range(100):  # the mux reads on this loop
                    if mux.table.local_for(addr) is not None:
                        break
                    await asyncio.sleep(0.01)
                data, src = peer.recvfrom(2048)
                assert stun_class(data) == 2 and (src[0], src[1]) == (host, mux.port)
                assert mux.table.by_addr[addr].target is session  # learned in ICE's plain form
                transport = session.protocol_for(addr).transport
                sender = adapter.DatagramSender(transport.mux_socket, transport.wire_addr(addr))
                sender.ancillary = transport.ancillary_for(addr)
                assert sender.send_batch([bytes([0x80]) + bytes(499)] * 4) == 2000
                got = [peer.recvfrom(2048) for _ in range(4)]
                assert [len(d) for d, _ in got] == [500] * 4 and sender.gso_fallbacks == 0
            assert session.protocol_for(("::1", 1)).local_candidate.host == "::1"
            await conn.close()
            assert mux.table.by_addr == {}
        finally:
            for peer in peers:
                peer.close()
            await mux.close()

    asyncio.run(main())


def test_a_port_in_use_names_the_setting() -> None:
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.bind(("0.0.0.0", 0))
    try:
        mux = IceMux(IceMuxConfig(port=holder.getsockname()[1], loopback=True))
        with pytest.raises(OSError, match="webrtc.ice_udp_port"):
            asyncio.run(mux.start())
        assert mux.sock is None
    finally:
        holder.close()
