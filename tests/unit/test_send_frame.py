"""The fan-out's per-frame send path (media/webrtc/aiortc_adapter.py):
protect_all gives exactly pylibsrtp's bytes, and send_runs puts a frame's
shorter last packet into its GSO run — every datagram still arrives whole
and in order, one sendmsg fewer, and failures fall back like send_batch."""

from __future__ import annotations

import errno
import os
import socket
import struct

import pylibsrtp
import pytest

from helpers import udp_socket_pair
from media.webrtc.aiortc_adapter import GSO_MAX_BYTES, GSO_MAX_SEGMENTS, DatagramSender, protect_all, send_runs


@pytest.fixture()
def pair():
    with udp_socket_pair() as tx_rx:
        yield tx_rx


class CountingSock:
    """A socket that counts sendmsg/sendto calls (and can fail sendmsg)."""

    def __init__(self, sock: socket.socket, fail: int | None = None) -> None:
        self.sock = sock
        self.fail = fail
        self.sendmsgs = 0
        self.sendtos = 0

    def sendmsg(self, *args):
        self.sendmsgs += 1
        if self.fail is not None:
            raise OSError(self.fail, os.strerror(self.fail))
        return self.sock.sendmsg(*args)

    def sendto(self, *args):
        self.sendtos += 1
        return self.sock.sendto(*args)


def _frame(sizes: list[int]) -> list[bytes]:
    return [bytes([i]) * n for i, n in enumerate(sizes)]


@pytest.mark.skipif(not DatagramSender.gso_available, reason="UDP GSO is Linux-only")
@pytest.mark.parametrize("sizes", [
    [1228, 1228, 1228, 400],  # a P frame: three fragments and a short last one
    [1228, 400],
    [60, 1228, 1228, 1228, 17],  # a keyframe's STAP-A (SPS/PPS), then its FU-As
    [1228] * 5,
    [300, 300, 1228, 1228],  # a longer one never joins a shorter run
])
def test_every_datagram_arrives_whole_in_order_with_the_short_tail_in_the_run(pair, sizes) -> None:
    tx, rx = pair
    sock = CountingSock(tx)
    sender = DatagramSender(sock, rx.getsockname())
    datas = _frame(sizes)
    assert send_runs(sender, datas, now=1.0) == sum(sizes)
    assert [rx.recv(65535) for _ in datas] == datas
    # Runs: equal sizes, optionally closed by one shorter datagram.
    runs, i = 0, 0
    while i < len(sizes):
        j = i + 1
        while j < len(sizes) and sizes[j] == sizes[i]:
            j += 1
        if j < len(sizes) and sizes[j] < sizes[i]:
            j += 1
        runs += 1
        i = j
    assert sock.sendmsgs + sock.sendtos == runs
    assert sender.backlogged == sender.errors == 0 and sender.failing_since is None


@pytest.mark.skipif(not DatagramSender.gso_available, reason="UDP GSO is Linux-only")
def test_a_large_keyframe_stays_within_the_kernels_limits(pair) -> None:
    tx, rx = pair
    sender = DatagramSender(CountingSock(tx), rx.getsockname())
    full, rest = divmod(140_000, 1228)
    datas = _frame([1228] * full + [rest])
    assert send_runs(sender, datas) == 140_000
    assert [rx.recv(65535) for _ in datas] == datas
    per_call = min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // 1228)
    assert sender.sock.sendmsgs == -(-len(datas) // per_call)


def test_a_gso_failure_resends_the_run_one_by_one_and_stops_gso(pair) -> None:
    tx, rx = pair
    sock = CountingSock(tx, fail=errno.EIO)
    sender = DatagramSender(sock, rx.getsockname())
    sender.gso = True
    datas = _frame([1228, 1228, 400])
    assert send_runs(sender, datas) == 1228 * 2 + 400
    assert [rx.recv(65535) for _ in datas] == datas
    assert sender.gso is False and sender.gso_fallbacks >= 1
    sock.fail = None
    assert send_runs(sender, datas) == 1228 * 2 + 400  # from now on, one datagram at a time
    assert [rx.recv(65535) for _ in datas] == datas


def test_a_full_buffer_drops_the_run_for_this_viewer_and_counts_it(pair) -> None:
    tx, rx = pair
    sock = CountingSock(tx, fail=errno.EAGAIN)
    sender = DatagramSender(sock, rx.getsockname())
    sender.gso = True
    assert send_runs(sender, _frame([1228, 1228, 400]), now=3.0) == 0
    assert sender.backlogged == 3


def _sessions():
    key = os.urandom(30)
    a = pylibsrtp.Session(pylibsrtp.Policy(key=key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND))
    b = pylibsrtp.Session(pylibsrtp.Policy(key=key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND))
    rx = pylibsrtp.Session(pylibsrtp.Policy(key=key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND))
    return a, b, rx


def test_protect_all_gives_pylibsrtps_bytes_and_errors() -> None:
    a, b, rx = _sessions()
    packets = [struct.pack("!BBHII", 0x80, 96, seq, 3000 * seq, 0x1234) + bytes([seq]) * (seq * 97 % 1300)
               for seq in range(40)]
    got = protect_all(b, packets)
    assert got == [a.protect(p) for p in packets]
    assert [rx.unprotect(p) for p in got] == packets
    with pytest.raises(ValueError):  # too long for libsrtp's buffer, like Session.protect
        protect_all(b, [packets[0][:12] + b"x" * 1490])
    with pytest.raises(pylibsrtp.Error):  # a reused index, like Session.protect
        protect_all(b, [packets[3]])
