"""Issue 15: a WHEP-style session in a real egress worker process (spawn)
keeps the main process's one ICE port (media/webrtc/icerelay.py).

The test process is "main": an IceMux (and an ICE-TCP listener) with an
IceRelayHub. The worker process runs a RelayedIceMux on a duplicate of the
shared UDP socket and an aiortc RTCPeerConnection whose RTP goes out through
FastPath, as WhepSession's does. An aiortc client in this process connects
to the worker's answer, which names only main's port."""

from __future__ import annotations

import asyncio
import multiprocessing
import socket
import struct
import time
from typing import Any

import pytest
from aioice import stun

from media.webrtc.icemux import IceMux, IceMuxConfig
from media.webrtc.icerelay import IceRelayHub, relay_socketpair
from media.webrtc.icetcp import IceTcpListener, frame

pytestmark = pytest.mark.integration

PAYLOAD = b"sent-by-the-worker-on-the-dup"


# -- the worker process ------------------------------------------------------------------


def _worker(handoff: Any, relay_sock: socket.socket, udp_sock: socket.socket, conn: Any) -> None:
    asyncio.run(_worker_main(handoff, relay_sock, udp_sock, conn))


async def _worker_main(handoff: Any, relay_sock: socket.socket, udp_sock: socket.socket, conn: Any) -> None:
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
    from aiortc.rtp import RtpPacket

    from media.webrtc import aiortc_adapter as adapter
    from media.webrtc.icerelay import RelayedIceMux
    from media.webrtc.icetcp import FramedSender

    loop = asyncio.get_running_loop()
    mux = RelayedIceMux(handoff, relay_sock, udp_sock)
    await mux.start()
    ready: asyncio.Future = loop.create_future()

    def on_ready(sender: adapter.ForwardingSender, parameters: Any) -> None:
        if not ready.done():
            ready.set_result((sender, parameters))

    # No STUN server: nothing here leaves 127.0.0.0/8 (aiortc's default is Google's).
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        offer = await loop.run_in_executor(None, conn.recv)
        tr = pc.addTransceiver("video", direction="sendonly")
        await pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
        mux.attach(pc)
        adapter.choose_dtls_role(pc)
        adapter.install_sender(tr, adapter.ForwardingSender("video", tr.sender.transport, lambda p: None, on_ready),
                               "relay")
        await pc.setLocalDescription(await pc.createAnswer())
        conn.send(pc.localDescription.sdp)
        while True:
            command = await loop.run_in_executor(None, conn.recv)
            if command == "send":
                sender, parameters = await asyncio.wait_for(ready, 20)
                fast = adapter.FastPath(sender.transport)
                packet = RtpPacket(payload_type=parameters.codecs[0].payloadType, sequence_number=1, timestamp=90000,
                                   ssrc=sender.ssrc, marker=1, payload=PAYLOAD).serialize()
                sent = fast.send_rtp(packet)
                # A frame's run of equal-sized packets: one GSO sendmsg on the dup.
                run = [RtpPacket(payload_type=parameters.codecs[0].payloadType, sequence_number=2 + i,
                                 timestamp=93000, ssrc=sender.ssrc, payload=PAYLOAD).serialize() for i in range(4)]
                batch = fast.send_batch(run)
                sock = fast.sender.sock
                framed = isinstance(fast.sender, FramedSender)
                conn.send({"sent": sent, "batch": batch, "gso": fast.sender.gso, "framed": framed,
                           "gso_fallbacks": fast.sender.gso_fallbacks, "errors": fast.sender.errors,
                           "port": None if framed else sock.getsockname()[1], "is_mux_socket": sock is mux.sock,
                           "requests_via_main": mux.relay_stats.requests_via_main})
            elif command == "stats":
                conn.send({"tcp_adopted": mux.relay_stats.tcp_adopted, 
                           "tcp_accepted": mux.ice_tcp.stats.accepted if mux.ice_tcp else 0})
            else:
                break
    finally:
        await pc.close()
        await mux.close()


# -- main (this process) -------------------------------------------------------------------


class Main:
    """The main process's half: mux, hub, optional ICE-TCP, and workers."""

    def __init__(self, tcp: bool = False) -> None:
        self.tcp = tcp
        self.ctx = multiprocessing.get_context("spawn")
        self.procs: dict[int, Any] = {}
        self.pipes: dict[int, Any] = {}

    async def __aenter__(self) -> "Main":
        self.mux = IceMux(IceMuxConfig(bind_address="127.0.0.1", port=0))
        await self.mux.start()
        self.listener = None
        if self.tcp:
            self.listener = IceTcpListener("127.0.0.1", 0)
            await self.listener.start()
        self.hub = IceRelayHub(self.mux, self.listener)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        for worker_id, pipe in self.pipes.items():
            try:
                pipe.send("stop")
            except OSError:
                pass
        for proc in self.procs.values():
            await asyncio.to_thread(proc.join, 10)
            if proc.is_alive():
                proc.kill()
        self.hub.close()
        if self.listener is not None:
            await self.listener.close()
        await self.mux.close()

    def spawn(self, worker_id: int) -> None:
        main_end, worker_end = relay_socketpair()
        self.hub.add_worker(worker_id, main_end)
        ours, theirs = self.ctx.Pipe()
        proc = self.ctx.Process(target=_worker, args=(self.hub.worker_handoff(), worker_end, self.hub.udp_socket,
                                                      theirs), daemon=True)
        proc.start()
        worker_end.close()
        theirs.close()
        self.procs[worker_id] = proc
        self.pipes[worker_id] = ours

    async def ask(self, worker_id: int, message: Any, timeout: float = 30) -> Any:
        pipe = self.pipes[worker_id]
        pipe.send(message)
        ok = await asyncio.to_thread(pipe.poll, timeout)
        assert ok, f"worker {worker_id} did not answer {message!r}"
        return pipe.recv()

    async def offer_answer(self, worker_id: int, offer_sdp: str) -> str:
        answer = await self.ask(worker_id, offer_sdp)
        # What the egress host does before answering the HTTP request.
        self.hub.register(_attr(answer, "ice-ufrag"), _attr(answer, "ice-pwd"), worker_id)
        return answer


def _attr(sdp: str, name: str) -> str:
    return next(ln.split(":", 1)[1].strip() for ln in sdp.splitlines() if ln.startswith(f"a={name}:"))


def _candidates(sdp: str) -> list[list[str]]:
    return [ln.split() for ln in sdp.splitlines() if ln.startswith("a=candidate:")]


class _ActiveTcp:
    """The client's side of ICE-TCP (RFC 6544 "tcptype active"), as a
    browser does it and aioice does not: a datagram for a remote address
    opens a TCP connection there and goes framed (RFC 4571); frames read
    back are the protocol's datagrams from that address."""

    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol
        self.writers: dict[tuple[str, int], asyncio.StreamWriter] = {}
        self.pending: dict[tuple[str, int], list[bytes]] = {}
        self.tasks: set[asyncio.Task] = set()
        self.closing = False

    def sendto(self, data: bytes, addr: Any) -> None:
        addr = (addr[0], addr[1])
        writer = self.writers.get(addr)
        if writer is not None:
            writer.write(frame(data))
        elif addr in self.pending:
            self.pending[addr].append(data)
        else:
            self.pending[addr] = [data]
            task = asyncio.get_running_loop().create_task(self._run(addr))
            self.tasks.add(task)

    async def _run(self, addr: tuple[str, int]) -> None:
        from media.webrtc.icetcp import Framer

        reader, writer = await asyncio.open_connection(*addr)
        self.writers[addr] = writer
        for data in self.pending.pop(addr):
            writer.write(frame(data))
        framer = Framer()
        while chunk := await reader.read(65536):
            for data in framer.feed(chunk):
                self.protocol.datagram_received(data, addr)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        for writer in self.writers.values():
            writer.close()
        for task in self.tasks:
            task.cancel()
        # aioice's StunProtocol.close waits for this.
        asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)


class Client:
    """An aiortc receiver that records which address each datagram came
    from and every decrypted RTP packet; with ``tcp``, its only candidate
    is an ICE-TCP active one."""

    def __init__(self, tcp: bool = False) -> None:
        from aiortc import RTCConfiguration, RTCPeerConnection

        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.pc.addTransceiver("video", direction="recvonly")
        self.sources: list[tuple[str, int]] = []
        self.rtp: list[bytes] = []
        self.tcp: _ActiveTcp | None = None
        if tcp:
            connection = self.pc.getTransceivers()[0].receiver.transport.transport._connection
            gather = connection.gather_candidates

            async def tcp_only() -> None:
                from aioice import Candidate
                from aioice.ice import StunProtocol

                await gather()
                for protocol in list(connection._protocols):
                    await protocol.close()  # no UDP: the worker must be reached over main's TCP port
                protocol = StunProtocol(connection)
                protocol.local_candidate = Candidate(
                    foundation="tcpactive", component=1, transport="tcp", priority=1_000_000, host="127.0.0.1",
                    port=9, type="host", tcptype="active")
                self.tcp = _ActiveTcp(protocol)
                protocol.connection_made(self.tcp)
                connection._protocols[:] = [protocol]
                connection._local_candidates[:] = [protocol.local_candidate]

            connection.gather_candidates = tcp_only

    async def offer(self) -> str:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription.sdp

    async def answer(self, sdp: str) -> None:
        from aiortc import RTCSessionDescription

        await self.pc.setRemoteDescription(RTCSessionDescription(sdp, "answer"))
        dtls = self.pc.getTransceivers()[0].receiver.transport

        async def handle(data: bytes, arrival_time_ms: int) -> None:
            # Recorded, not decoded: the worker's test payload is no VP8 frame.
            self.rtp.append(bytes(data))

        dtls._handle_rtp_data = handle
        for protocol in dtls.transport._connection._protocols:
            received = protocol.datagram_received

            def record(data: bytes, addr: Any, received: Any = received) -> None:
                self.sources.append((addr[0], addr[1]))
                received(data, addr)

            protocol.datagram_received = record

    async def connected(self, timeout: float = 20) -> None:
        for _ in range(int(timeout / 0.05)):
            if self.pc.connectionState == "connected":
                return
            assert self.pc.connectionState not in ("failed", "closed"), self.pc.connectionState
            await asyncio.sleep(0.05)
        raise AssertionError(f"not connected: {self.pc.connectionState}")

    def nominated(self) -> tuple[str, int]:
        pair = self.pc.getTransceivers()[0].receiver.transport.transport._connection._nominated[1]
        return (pair.remote_candidate.host, pair.remote_candidate.port)


async def _until(cond: Any, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if cond():
            return
        await asyncio.sleep(0.02)
    assert cond()


def test_worker_session_connects_through_main_port_and_its_fastpath_rtp_arrives_from_there() -> None:
    async def run() -> None:
        async with Main() as main:
            main.spawn(1)
            client = Client()
            try:
                answer = await main.offer_answer(1, await client.offer())
                ports = {int(c[5]) for c in _candidates(answer)}
                assert ports == {main.mux.port}, _candidates(answer)
                await client.answer(answer)
                await client.connected()
                assert client.nominated() == ("127.0.0.1", main.mux.port)
                result = await main.ask(1, "send")
                assert result["sent"] > 0 and result["is_mux_socket"] and result["port"] == main.mux.port
                assert result["batch"] == 4 * result["sent"] and result["errors"] == 0
                assert result["gso"] and result["gso_fallbacks"] == 0
                assert result["requests_via_main"] > 0 and main.hub.stats(1).requests_sent > 0
                await _until(lambda: sum(PAYLOAD in p for p in client.rtp) == 5)
                # Every datagram the client got (STUN, DTLS, SRTP) came from main's one port.
                assert set(client.sources) == {("127.0.0.1", main.mux.port)}, set(client.sources)
                assert main.hub.stats(1).relayed_packets > 0 and main.mux.counters.handler_errors == 0
            finally:
                await client.pc.close()

    asyncio.run(run())


def test_killing_a_worker_drops_its_routes_and_main_keeps_serving_another_session() -> None:
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

    async def run() -> None:
        async with Main() as main:
            main.spawn(1)
            first = Client()
            second = Client()
            local = RTCPeerConnection(RTCConfiguration(iceServers=[]))
            try:
                answer = await main.offer_answer(1, await first.offer())
                ufrag = _attr(answer, "ice-ufrag")
                await first.answer(answer)
                await first.connected()
                main.procs[1].kill()
                await asyncio.to_thread(main.procs[1].join, 10)
                await _until(lambda: 1 not in main.hub.workers)
                assert ufrag not in main.mux.table.by_ufrag and main.mux.table.by_addr == {}
                # The dead worker's peer still talks (consent, RTCP): dropped, counted.
                dropped = main.mux.counters.dropped_packets
                await _until(lambda: main.mux.counters.dropped_packets > dropped, 15)
                # A session of main itself on the same port connects.
                await local.setRemoteDescription(RTCSessionDescription(await second.offer(), "offer"))
                local.getTransceivers()[0].direction = "sendonly"
                main.mux.attach(local)
                await local.setLocalDescription(await local.createAnswer())
                await second.answer(local.localDescription.sdp)
                await second.connected()
                assert second.nominated() == ("127.0.0.1", main.mux.port)
            finally:
                await first.pc.close()
                await second.pc.close()
                await local.close()

    asyncio.run(run())


def _binding_request(username: str, password: str) -> bytes:
    msg = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    msg.attributes["USERNAME"] = username
    msg.attributes["PRIORITY"] = 1853824767
    msg.attributes["ICE-CONTROLLING"] = 42
    msg.attributes["USE-CANDIDATE"] = None
    msg.add_message_integrity(password.encode())
    msg.add_fingerprint()
    return bytes(msg)


def _recv_frame(sock: socket.socket) -> bytes:
    def exactly(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return buf

    (length,) = struct.unpack("!H", exactly(2))
    return exactly(length)


def test_ice_tcp_connection_for_a_worker_session_is_handed_to_the_worker() -> None:
    """An ICE-TCP client (RFC 4571 framed STUN, as test_ice_tcp.py's) on
    main's TCP port: main reads and verifies the first Binding request, hands
    the connection to the worker, and the worker's aioice answers on it."""
    async def run() -> None:
        async with Main(tcp=True) as main:
            main.spawn(1)
            client = Client()
            try:
                offer = await client.offer()
                answer = await main.offer_answer(1, offer)
                tcp = [c for c in _candidates(answer) if c[2].lower() == "tcp"]
                assert tcp and {int(c[5]) for c in tcp} == {main.listener.port}, tcp
                assert all(c[8:10] == ["tcptype", "passive"] for c in tcp)
                ufrag, pwd = _attr(answer, "ice-ufrag"), _attr(answer, "ice-pwd")
                username = f"{ufrag}:{_attr(offer, 'ice-ufrag')}"  # RFC 8445 §7.2.2: "LFRAG:RFRAG" as we see it

                def bind() -> tuple[list[bytes], list[Any]]:
                    with socket.create_connection(("127.0.0.1", main.listener.port), timeout=10) as sock:
                        requests = [_binding_request(username, pwd) for _ in range(2)]
                        # The first request and the head of a second: main hands over the
                        # connection with the partial frame it read; the rest follows later.
                        wire = b"".join(frame(r) for r in requests)
                        cut = len(frame(requests[0])) + 10
                        sock.sendall(wire[:cut])
                        time.sleep(0.3)
                        sock.sendall(wire[cut:])
                        got = []
                        # The worker's agent also sends a triggered check of its own.
                        while len([m for m in got if m.message_class != stun.Class.REQUEST]) < 2:
                            got.append(stun.parse_message(_recv_frame(sock)))
                        assert all(m.message_class != stun.Class.ERROR for m in got), got
                        return requests, got

                requests, got = await asyncio.to_thread(bind)
                responses = [m for m in got if m.message_class == stun.Class.RESPONSE]
                assert [m.transaction_id for m in responses] == [r[8:20] for r in requests]
                assert main.listener.stats.handed_off == 1 and main.hub.stats(1).tcp_handed_off == 1
                stats = await main.ask(1, "stats")
                assert stats == {"tcp_adopted": 1, "tcp_accepted": 1}

                # A wrong password never leaves main.
                def bad() -> bytes:
                    with socket.create_connection(("127.0.0.1", main.listener.port), timeout=10) as sock:
                        sock.sendall(frame(_binding_request(username, "x" * 22)))
                        return sock.recv(10)

                assert await asyncio.to_thread(bad) == b""
                assert main.listener.stats.refused.get("bad_integrity") == 1
                assert main.hub.stats(1).tcp_handed_off == 1
            finally:
                await client.pc.close()

    asyncio.run(run())


def test_aiortc_client_on_ice_tcp_reaches_a_worker_session_through_main_and_gets_its_rtp() -> None:
    """The whole path over ICE-TCP: checks, DTLS and the worker's FastPath
    RTP (framed on the adopted connection) between an aiortc client whose
    only candidate is TCP-active and a worker's session, through main's
    ICE-TCP port."""
    async def run() -> None:
        async with Main(tcp=True) as main:
            main.spawn(1)
            client = Client(tcp=True)
            try:
                answer = await main.offer_answer(1, await client.offer())
                # Only the TCP candidates: the client has no UDP to pair them with anyway.
                await client.answer("\r\n".join(
                    ln for ln in answer.split("\r\n")
                    if not (ln.startswith("a=candidate:") and ln.split()[2].lower() == "udp")))
                await client.connected()
                assert client.nominated() == ("127.0.0.1", main.listener.port)
                result = await main.ask(1, "send")
                assert result["framed"] and result["sent"] > 0 and result["batch"] == 4 * result["sent"]
                assert result["errors"] == 0
                await _until(lambda: sum(PAYLOAD in p for p in client.rtp) == 5)
                assert set(client.sources) == {("127.0.0.1", main.listener.port)}
                assert main.listener.stats.handed_off >= 1 and main.hub.stats(1).tcp_handed_off >= 1
            finally:
                await client.pc.close()

    asyncio.run(run())
