"""The viewer send path: GSO batches within the kernel's limits, transient
errors counted and survived (media/webrtc/aiortc_adapter.py DatagramSender)."""

from __future__ import annotations

import errno
import socket

import pytest

from helpers import udp_socket_pair
from media.webrtc.aiortc_adapter import GSO_MAX_BYTES, GSO_MAX_SEGMENTS, DatagramSender


@pytest.fixture()
def pair():
    with udp_socket_pair() as tx_rx:
        yield tx_rx


def _receive(rx: socket.socket, n: int) -> list[bytes]:
    return [rx.recv(65535) for _ in range(n)]


def _keyframe(total: int, size: int = 1228) -> list[bytes]:
    """The FU-A run of one large NAL: equal-size datagrams, then a shorter last one."""
    full, rest = divmod(total, size)
    out = [bytes([i & 0xFF]) * size for i in range(full)]
    if rest:
        out.append(b"\xee" * rest)
    return out


@pytest.mark.parametrize("total", [79_000, 140_000, 1_200_000])  # 720p, 1080p single slice, 4K keyframe
def test_large_keyframe_arrives_whole_and_in_order(pair, total) -> None:
    tx, rx = pair
    sender = DatagramSender(tx, rx.getsockname())
    datas = _keyframe(total)
    sent = sender.send_batch(datas, now=1.0)
    got = _receive(rx, len(datas))
    assert got == datas
    assert sent == total
    assert sender.errors == 0 and sender.failing_since is None and sender.backlogged == 0


class _Sock:
    """A socket double that records sends and fails as scripted."""

    def __init__(self, fail=None) -> None:
        self.gso_calls: list[tuple[int, int]] = []
        self.single: list[bytes] = []
        self.fail = fail or (lambda kind, data: None)

    def sendmsg(self, buffers, ancdata, flags, addr):
        data = buffers[0]
        self.fail("gso", data)
        self.gso_calls.append((len(data), int.from_bytes(ancdata[0][2], "little")))
        return len(data)

    def sendto(self, data, addr):
        self.fail("one", data)
        self.single.append(data)
        return len(data)


def test_gso_batches_respect_count_and_byte_limits() -> None:
    sock = _Sock()
    sender = DatagramSender(sock, ("127.0.0.1", 9))
    sender.gso = True
    datas = _keyframe(1228 * 200)
    assert sender.send_batch(datas) == 1228 * 200
    assert sock.gso_calls, "runs of equal size go out with GSO"
    for nbytes, segment in sock.gso_calls:
        assert segment == 1228
        assert nbytes <= GSO_MAX_BYTES and nbytes // segment <= GSO_MAX_SEGMENTS


def test_any_gso_error_falls_back_to_single_sends() -> None:
    def fail(kind, data):
        if kind == "gso":
            raise OSError(errno.EMSGSIZE, "Message too long")

    sock = _Sock(fail)
    sender = DatagramSender(sock, ("127.0.0.1", 9))
    sender.gso = True
    datas = _keyframe(1228 * 10)
    assert sender.send_batch(datas) == 1228 * 10
    assert sock.single == datas
    assert sender.gso_fallbacks >= 1 and sender.gso, "EMSGSIZE does not turn GSO off for good"
    assert sender.errors == 0


def test_gso_unsupported_turns_it_off_for_this_socket() -> None:
    def fail(kind, data):
        if kind == "gso":
            raise OSError(errno.EIO, "Input/output error")

    sock = _Sock(fail)
    sender = DatagramSender(sock, ("127.0.0.1", 9))
    sender.gso = True
    datas = _keyframe(1228 * 4)
    sender.send_batch(datas)
    sender.send_batch(datas)
    assert sock.single == datas + datas
    assert not sender.gso and sender.gso_fallbacks == 1


@pytest.mark.parametrize("code", [errno.EPERM, errno.ENOBUFS, errno.ECONNREFUSED, errno.EMSGSIZE,
                                  errno.EHOSTUNREACH, errno.ENETUNREACH])
def test_transient_errors_are_counted_and_survived(code) -> None:
    calls = {"n": 0}

    def fail(kind, data):
        calls["n"] += 1
        if calls["n"] % 3 == 0:  # a firewall dropping one packet in three
            raise OSError(code, "refused")

    sock = _Sock(fail)
    sender = DatagramSender(sock, ("127.0.0.1", 9))
    sender.gso = False
    datas = [bytes([i]) * 100 for i in range(30)]
    sent = sender.send_batch(datas, now=5.0)
    assert len(sock.single) == 20 and sent == 2000
    assert sender.errors == 10 and sender.errors_by_errno == {code: 10}
    assert sender.last_errno == code
    # the last send succeeded: not failing
    sender.send(b"x" * 10, now=6.0)
    assert sender.failing_since is None


def test_failing_since_marks_an_unbroken_run_of_failures() -> None:
    state = {"fail": True}

    def fail(kind, data):
        if state["fail"]:
            raise OSError(errno.EPERM, "Operation not permitted")

    sock = _Sock(fail)
    sender = DatagramSender(sock, ("127.0.0.1", 9))
    sender.gso = False
    sender.send(b"a", now=10.0)
    sender.send(b"b", now=12.0)
    assert sender.failing_since == 10.0
    state["fail"] = False
    sender.send(b"c", now=13.0)
    assert sender.failing_since is None
    assert sender.errors == 2


def test_full_buffer_drops_for_this_viewer_only() -> None:
    def fail(kind, data):
        raise BlockingIOError(errno.EAGAIN, "full")

    sender = DatagramSender(_Sock(fail), ("127.0.0.1", 9))
    sender.gso = True
    assert sender.send_batch(_keyframe(1228 * 5)) == 0
    assert sender.backlogged == 5 and sender.errors == 0 and sender.failing_since is None


def test_a_closed_socket_is_not_transient() -> None:
    def fail(kind, data):
        raise OSError(errno.EBADF, "Bad file descriptor")

    sender = DatagramSender(_Sock(fail), ("127.0.0.1", 9))
    sender.gso = False
    with pytest.raises(OSError):
        sender.send(b"x")


def test_a_viewer_moving_between_pairs_never_closes_the_shared_ice_socket() -> None:
    """FastPath follows the nominated pair from the shared ICE socket to an
    ICE-TCP connection and back: the viewer's counters carry over, and the
    shared socket — every session's — stays open."""
    from types import SimpleNamespace

    from media.webrtc.aiortc_adapter import FastPath

    shared = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    shared.bind(("127.0.0.1", 0))
    try:
        class MuxTransport:
            mux_socket = shared

            @staticmethod
            def ancillary_for(addr):
                return []

            @staticmethod
            def wire_addr(addr):
                return addr

        class Framed:
            framed = True

            @staticmethod
            def framed_sender(addr):
                return SimpleNamespace(addr=addr, backlogged=0, errors=0, gso_fallbacks=0, errors_by_errno={},
                                       failing_since=None, last_errno=None,
                                       sock=SimpleNamespace(close=lambda: None))

        conn = SimpleNamespace(_nominated={})
        fast = FastPath(SimpleNamespace(_tx_srtp=object(), transport=SimpleNamespace(_connection=conn)))
        conn._nominated[1] = SimpleNamespace(protocol=SimpleNamespace(transport=MuxTransport()),
                                             remote_addr=("127.0.0.1", 9))
        udp = fast._current()
        udp.backlogged = 3
        conn._nominated[1] = SimpleNamespace(protocol=SimpleNamespace(transport=Framed()),
                                             remote_addr=("127.0.0.1", 10))
        tcp = fast._current()
        assert tcp is not udp and tcp.backlogged == 3
        assert shared.fileno() != -1  # not closed by the move to TCP
        conn._nominated[1] = SimpleNamespace(protocol=SimpleNamespace(transport=MuxTransport()),
                                             remote_addr=("127.0.0.1", 9))
        assert fast._current().sock is shared and fast.sender.backlogged == 3
        fast.close()
        assert shared.fileno() != -1
    finally:
        shared.close()
