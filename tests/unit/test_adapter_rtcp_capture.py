"""``aiortc_adapter.capture_rtcp``: a viewer's SRTCP taken off its aioice
connection, unprotected with the DTLS transport's SRTP session and handed
over as bytes; everything else still queued for aiortc."""

from __future__ import annotations

import asyncio
import os
from types import SimpleNamespace

import aioice
import pylibsrtp
import pytest

from media.rtp.rtcp import Nack, Pli, parse_rtcp, serialize_rtcp
from media.webrtc import aiortc_adapter as adapter


def _srtp_pair() -> tuple[pylibsrtp.Session, pylibsrtp.Session]:
    key = os.urandom(30)
    return (pylibsrtp.Session(pylibsrtp.Policy(key=key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND)),
            pylibsrtp.Session(pylibsrtp.Policy(key=key, ssrc_type=pylibsrtp.Policy.SSRC_ANY_INBOUND)))


def _queued(connection: aioice.Connection) -> list[bytes]:
    out = []
    while not connection._queue.empty():
        data, _component = connection._queue.get_nowait()
        out.append(data)
    return out


async def _captured() -> None:
    tx, rx = _srtp_pair()
    connection = aioice.Connection(ice_controlling=False)
    dtls = SimpleNamespace(_rx_srtp=rx, transport=SimpleNamespace(_connection=connection))
    got: list[bytes] = []
    assert adapter.capture_rtcp(dtls, got.append)
    compound = serialize_rtcp((Nack(9, 1111, (5, 6)), Pli(9, 1111)))
    connection.data_received(tx.protect_rtcp(compound), 1)
    assert got == [compound] and _queued(connection) == []
    assert [type(p) for p in parse_rtcp(got[0])] == [Nack, Pli]
    # DTLS (RFC 7983: first byte 20..63) and SRTP media still go to aiortc.
    dtls_record = b"\x17\xfe\xfd" + bytes(20)
    rtp = tx.protect(b"\x80\x60\x00\x01" + bytes(8) + b"payload")
    connection.data_received(dtls_record, 1)
    connection.data_received(rtp, 1)
    assert _queued(connection) == [dtls_record, rtp] and len(got) == 1
    # A datagram failing SRTCP authentication is dropped, as aiortc drops it;
    # so is a replay of one already seen (RFC 3711 §3.3.2).
    forged = bytearray(tx.protect_rtcp(compound))
    forged[-1] ^= 1
    connection.data_received(bytes(forged), 1)
    replayed = tx.protect_rtcp(compound)
    connection.data_received(replayed, 1)
    connection.data_received(replayed, 1)
    assert len(got) == 2 and _queued(connection) == []


def test_srtcp_is_unprotected_and_handed_over_before_aioices_queue() -> None:
    asyncio.run(_captured())


async def _handler_errors() -> None:
    tx, rx = _srtp_pair()
    connection = aioice.Connection(ice_controlling=False)
    dtls = SimpleNamespace(_rx_srtp=rx, transport=SimpleNamespace(_connection=connection))
    calls = []

    def broken(data: bytes) -> None:
        calls.append(data)
        raise ValueError("a session's bug")

    adapter.capture_rtcp(dtls, broken)
    compound = serialize_rtcp((Pli(9, 1111),))
    connection.data_received(tx.protect_rtcp(compound), 1)  # logged, not raised
    connection.data_received(tx.protect_rtcp(compound), 1)
    assert calls == [compound, compound]


def test_a_handler_error_never_reaches_aioice() -> None:
    asyncio.run(_handler_errors())


async def _not_keyed() -> None:
    connection = aioice.Connection(ice_controlling=False)
    own = connection.data_received
    dtls = SimpleNamespace(_rx_srtp=None, transport=SimpleNamespace(_connection=connection))
    assert not adapter.capture_rtcp(dtls, lambda data: None)
    assert connection.data_received == own


def test_nothing_is_captured_before_dtls_keyed_srtp() -> None:
    asyncio.run(_not_keyed())


def test_check_internals_covers_the_rtcp_capture(monkeypatch: pytest.MonkeyPatch) -> None:
    adapter.check_internals()

    def data_received(self, data, component, extra):  # type: ignore[no-untyped-def]
        raise AssertionError

    monkeypatch.setattr(aioice.Connection, "data_received", data_received)
    with pytest.raises(adapter.AiortcInternalsChanged, match="data_received"):
        adapter.check_internals()


async def _before_stun(monkeypatch: pytest.MonkeyPatch) -> None:
    tx, rx = _srtp_pair()
    connection = aioice.Connection(ice_controlling=False)
    protocol = aioice.ice.StunProtocol(connection)
    protocol.local_candidate = SimpleNamespace(component=1)
    connection._protocols.append(protocol)
    tried_as_stun: list[bytes] = []
    parse = aioice.stun.parse_message

    def parse_message(data: bytes, *args, **kwargs):  # type: ignore[no-untyped-def]
        tried_as_stun.append(data)
        return parse(data, *args, **kwargs)

    monkeypatch.setattr(aioice.ice.stun, "parse_message", parse_message)
    got: list[bytes] = []
    adapter.capture_rtcp(SimpleNamespace(_rx_srtp=rx, transport=SimpleNamespace(_connection=connection)), got.append)
    compound = serialize_rtcp((Pli(9, 1111),))
    protocol.datagram_received(tx.protect_rtcp(compound), ("127.0.0.1", 5000))
    assert got == [compound] and tried_as_stun == []
    # Anything else still goes through aioice's STUN attempt into its queue.
    dtls_record = b"\x17\xfe\xfd" + bytes(20)
    protocol.datagram_received(dtls_record, ("127.0.0.1", 5000))
    assert tried_as_stun == [dtls_record] and _queued(connection) == [dtls_record]


def test_srtcp_on_a_host_candidate_is_never_tried_as_stun(monkeypatch: pytest.MonkeyPatch) -> None:
    asyncio.run(_before_stun(monkeypatch))
