"""The binding against real libsrt sockets on loopback: a transfer whose
``srt_bistats`` must add up (catches a stats-struct layout mismatch that
sizeof alone would miss), a raw listen callback, the EpollReader."""

from __future__ import annotations

import threading
import time

import pytest

from media.errors import SrtApiError
from media.srt.binding import (
    EpollFlag,
    EpollOpt,
    EpollReader,
    RejectReason,
    SockOpt,
    SockStatus,
    SrtErrno,
    SrtLibrary,
    read_c_string,
    sockaddr_from_pointer,
)

pytestmark = pytest.mark.integration


def _listener(lib: SrtLibrary, latency_ms: int = 40) -> tuple[int, int]:
    sock = lib.create_socket()
    lib.setsockflag(sock, SockOpt.RCVLATENCY, latency_ms)
    lib.bind(sock, "127.0.0.1", 0)
    lib.listen(sock, 4)
    return sock, lib.getsockname(sock)[1]


def test_transfer_and_bistats_add_up(lib: SrtLibrary) -> None:
    lsock, port = _listener(lib)
    sizes = [188 * (1 + i % 7) for i in range(300)]
    received: list[bytes] = []
    accepted: list[int] = []

    def serve() -> None:
        ns, peer = lib.accept(lsock)  # blocking
        accepted.append(ns)
        assert peer[0] == "127.0.0.1"
        lib.setsockflag(ns, SockOpt.RCVTIMEO, 3000)
        while len(received) < len(sizes):
            received.append(lib.recvmsg(ns))

    server = threading.Thread(target=serve)
    server.start()
    caller = lib.create_socket()
    try:
        lib.setsockflag(caller, SockOpt.STREAMID, "publish:cam1")
        lib.connect(caller, "127.0.0.1", port)
        assert lib.getsockstate(caller) == SockStatus.CONNECTED
        try:
            assert lib.getpeername(caller) == ("127.0.0.1", port)
        except SrtApiError:
            pass  # libsrt 1.5.1 returns an empty address for a caller socket
        for i, size in enumerate(sizes):
            assert lib.sendmsg(caller, bytes([i % 256]) * size) == size
            if i % 50 == 0:
                time.sleep(0.005)
        server.join(10)
        assert not server.is_alive()
        (ns,) = accepted
        assert lib.getsockflag(ns, SockOpt.STREAMID) == "publish:cam1"
        assert lib.getpeername(ns) == lib.getsockname(caller)
        # message boundaries and content preserved, in order
        assert [len(m) for m in received] == sizes
        assert all(m == bytes([i % 256]) * len(m) for i, m in enumerate(received))
        time.sleep(0.05)  # let an ACK carry an RTT sample
        rx = lib.bistats(ns)
        tx = lib.bistats(caller)
        assert rx.pktRecvTotal == len(sizes)
        assert rx.pktRecv == len(sizes)  # not cleared: local == total
        assert rx.pktRecvUniqueTotal == len(sizes)
        # byte counters include 44 header bytes a packet (SRT 16 + UDP 8 + IPv4 20)
        wire = sum(sizes) + 44 * len(sizes)
        assert rx.byteRecvUniqueTotal == wire
        assert rx.byteRecvTotal == wire
        assert rx.pktRcvLossTotal == 0 and rx.pktRcvDropTotal == 0 and rx.pktRcvUndecryptTotal == 0
        assert rx.msRcvTsbPdDelay == 40
        assert 0 <= rx.msRTT < 1000 and 0 <= tx.msRTT < 1000
        assert tx.pktSentUniqueTotal == len(sizes)
        assert tx.pktSentTotal >= len(sizes)
        assert tx.byteSentUniqueTotal == wire
        assert rx.byteMSS == 1500
        assert rx.msTimeStamp >= 0
        d = rx.as_dict()
        assert len(d) == 82 and d["pktRecvTotal"] == len(sizes)
        # clear=True resets the local counters, not the totals
        lib.bistats(ns, clear=True)
        again = lib.bistats(ns)
        assert again.pktRecv == 0 and again.pktRecvTotal == len(sizes)
    finally:
        lib.close_socket(caller)
        for s in accepted:
            lib.close_socket(s)
        lib.close_socket(lsock)


def test_raw_listen_callback_user_defined_reject(lib: SrtLibrary) -> None:
    lsock, port = _listener(lib)
    seen: list[tuple[int, str, tuple[str, int]]] = []

    def on_listen(opaque, ns, hsversion, peeraddr, streamid):  # type: ignore[no-untyped-def]
        seen.append((hsversion, read_c_string(streamid).decode(), sockaddr_from_pointer(peeraddr)))
        lib.set_reject_reason(ns, 2042)
        return -1

    lib.listen_callback(lsock, on_listen)
    caller = lib.create_socket()
    try:
        lib.setsockflag(caller, SockOpt.STREAMID, "#!::r=x")
        with pytest.raises(SrtApiError) as info:
            lib.connect(caller, "127.0.0.1", port)
        assert info.value.code == SrtErrno.ECONNREJ
        assert lib.get_reject_reason(caller) == 2042
        assert lib.reject_reason_str(2042)
        ((hsversion, sid, peer),) = seen
        assert hsversion == 5 and sid == "#!::r=x" and peer[0] == "127.0.0.1"
        # below SRT_REJC_PREDEFINED is libsrt's own range: refused
        with pytest.raises(SrtApiError):
            lib.set_reject_reason(caller, int(RejectReason.BADSECRET))
    finally:
        lib.close_socket(caller)
        lib.close_socket(lsock)


def test_epoll_reader_timeout_accept_and_drain(lib: SrtLibrary) -> None:
    lsock, port = _listener(lib, latency_ms=20)
    lib.setsockflag(lsock, SockOpt.RCVSYN, False)
    eid = lib.epoll_create()
    lib.epoll_set(eid, EpollFlag.ENABLE_EMPTY)
    reader = EpollReader(lib, eid, capacity=8)
    caller = lib.create_socket()
    try:
        t0 = time.monotonic()
        lib.epoll_add(eid, lsock, EpollOpt.IN)
        assert reader.wait(50) == []
        assert 0.04 <= time.monotonic() - t0 < 1.0
        assert reader.accept(lsock) == (-1, None, SrtErrno.EASYNCRCV)
        lib.connect(caller, "127.0.0.1", port)
        assert (lsock, int(EpollOpt.IN)) in reader.wait(1000)
        ns, peer, err = reader.accept(lsock)
        assert ns > 0 and err == 0 and peer is not None
        lib.setsockflag(ns, SockOpt.RCVSYN, False)
        lib.epoll_add(eid, ns, EpollOpt.IN | EpollOpt.ERR)
        for i in range(5):
            lib.sendmsg(caller, bytes([i]) * 100)
        deadline = time.monotonic() + 2
        out: list[bytes] = []
        while len(out) < 5 and time.monotonic() < deadline:
            if any(fd == ns for fd, _ in reader.wait(200)):
                assert reader.drain(ns, 100, out)[1] == 0
        assert out == [bytes([i]) * 100 for i in range(5)]
        lib.close_socket(caller)
        deadline = time.monotonic() + 3
        code = 0
        while code == 0 and time.monotonic() < deadline:
            reader.wait(100)
            code = reader.drain(ns, 10, [])[1]
        assert code == SrtErrno.ECONNLOST
        lib.close_socket(ns)
    finally:
        lib.epoll_release(eid)
        lib.close_socket(lsock)
