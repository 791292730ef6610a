"""``FastPath.send_frame`` protects with libsrtp's handles read once at
construction: the datagrams must be pylibsrtp's own, byte for byte, and a
packet the session's buffer cannot hold still goes through ``protect``."""

from __future__ import annotations

import os
import socket
from types import SimpleNamespace

import pylibsrtp
import pytest

from media.webrtc import aiortc_adapter as adapter


def _session(key: bytes) -> pylibsrtp.Session:
    return pylibsrtp.Session(pylibsrtp.Policy(key=key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND))


@pytest.fixture
def loopback():
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(2)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.setblocking(False)
    yield tx, rx
    tx.close()
    rx.close()


def _fast_path(tx: socket.socket, rx: socket.socket, srtp: pylibsrtp.Session) -> adapter.FastPath:
    transport = SimpleNamespace(get_extra_info=lambda name: tx)
    pair = SimpleNamespace(protocol=SimpleNamespace(transport=transport), remote_addr=rx.getsockname())
    return adapter.FastPath(SimpleNamespace(_tx_srtp=srtp, transport=SimpleNamespace(
        _connection=SimpleNamespace(_nominated={1: pair}))))


def _rtp(seq: int, size: int) -> bytes:
    return b"\x80\x60" + seq.to_bytes(2, "big") + bytes(4) + b"\x00\x00\x73\x00" + os.urandom(size - 12)


def test_send_frame_sends_exactly_what_pylibsrtp_protects(loopback) -> None:
    tx, rx = loopback
    key = os.urandom(30)
    fast = _fast_path(tx, rx, _session(key))
    twin = _session(key)  # same key, same packets: same SRTP bytes (RFC 3711 §4.1 counter mode)
    frames = [[_rtp(1, 1200), _rtp(2, 1200), _rtp(3, 400)], [_rtp(4, 160)], [_rtp(5, 1200), _rtp(6, 1200)]]
    for frame in frames:
        sent = fast.send_frame(frame)
        want = [twin.protect(bytes(p)) for p in frame]
        assert sent == sum(map(len, want))
        assert [rx.recv(2048) for _ in want] == want
    fast.close()


@pytest.mark.parametrize("packet", [_rtp(1, 1600), bytearray(_rtp(1, 300))], ids=["too long", "not bytes"])
def test_what_the_buffer_cannot_take_goes_through_protect_and_its_error(loopback, packet) -> None:
    tx, rx = loopback
    fast = _fast_path(tx, rx, _session(os.urandom(30)))
    with pytest.raises(Exception) as raised:
        _session(os.urandom(30)).protect(packet)
    with pytest.raises(type(raised.value), match=str(raised.value)):
        fast.send_frame([packet])
    fast.close()
