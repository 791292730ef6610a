"""The answer's DTLS role (media/webrtc/aiortc_adapter.py, RFC 8842 §5.3).

Real aiortc peer connections in one process: an ``actpass`` offer (what
browsers send) is answered ``passive``; a ``passive`` offer (ffmpeg 9's WHIP
default) ``active``, and then our first flight is resent early (one copy
after 10 ms, then the RFC 9147 timer) when the peer swallows it, instead of
after OpenSSL's 1 s. The ffmpeg
peer itself is in tests/e2e/test_peers.py; the figures in
loadtests/whip_connect.py.
"""

from __future__ import annotations

import asyncio

from aiortc import RTCPeerConnection, RTCSessionDescription

from media.webrtc import aiortc_adapter as adapter


async def _answer(offer_sdp: str) -> tuple[RTCPeerConnection, str, str]:
    pc = RTCPeerConnection()
    pc.addTransceiver("video", direction="recvonly")
    await pc.setRemoteDescription(RTCSessionDescription(offer_sdp, "offer"))
    role = adapter.choose_dtls_role(pc)
    await pc.setLocalDescription(await pc.createAnswer())
    return pc, role, pc.localDescription.sdp


async def _offerer() -> RTCPeerConnection:
    pc = RTCPeerConnection()
    pc.addTransceiver("video", direction="sendonly")
    await pc.setLocalDescription(await pc.createOffer())
    return pc


async def test_actpass_offer_is_answered_passive_and_connects() -> None:
    offerer = await _offerer()
    assert "a=setup:actpass" in offerer.localDescription.sdp
    answerer, role, answer = await _answer(offerer.localDescription.sdp)
    try:
        assert role == "server" and "a=setup:passive" in answer and "a=setup:active" not in answer
        await offerer.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        for _ in range(200):
            if answerer.connectionState == "connected" and offerer.connectionState == "connected":
                break
            await asyncio.sleep(0.05)
        assert answerer.connectionState == offerer.connectionState == "connected"
    finally:
        await offerer.close()
        await answerer.close()


async def test_passive_offer_is_answered_active() -> None:
    offerer = await _offerer()
    passive = offerer.localDescription.sdp.replace("a=setup:actpass", "a=setup:passive")
    answerer, role, answer = await _answer(passive)
    try:
        assert role == "client" and "a=setup:active" in answer
    finally:
        await offerer.close()
        await answerer.close()


class _FakeIce:
    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue()

    async def _send(self, data: bytes) -> None:
        self.sent.append(data)

    async def _recv(self) -> bytes:
        return await self.inbox.get()


class _FakeDtls:
    def __init__(self) -> None:
        self.transport = _FakeIce()
        self.state = "connecting"


async def test_first_flight_is_resent_until_the_peer_answers() -> None:
    dtls = _FakeDtls()
    ice = dtls.transport
    adapter._resend_first_flight(dtls, early=0.01, first=0.05, until=1.0)
    hello = b"\x16\xfe\xfd" + b"\x00" * 40
    await ice._send(b"\x00\x01STUN")  # not DTLS: never resent
    await ice._send(hello)
    await asyncio.sleep(0.1)  # the early copy at 10 ms, the timer's at 60 ms
    assert ice.sent[0] == b"\x00\x01STUN" and ice.sent[1:] == [hello, hello, hello]
    ice.inbox.put_nowait(b"\x16\xfe\xfd" + b"\x01" * 40)  # the peer's ServerHello
    assert (await ice._recv()).startswith(b"\x16")
    await asyncio.sleep(0.2)
    assert ice.sent.count(hello) == 3  # heard from the peer: OpenSSL's own timers from here on


async def test_first_flight_resends_stop_at_openssls_own_timer() -> None:
    dtls = _FakeDtls()
    adapter._resend_first_flight(dtls, early=0.01, first=0.05, until=0.1)
    hello = b"\x16\xfe\xfd" + b"\x00" * 40
    await dtls.transport._send(hello)
    await asyncio.sleep(0.4)
    assert dtls.transport.sent == [hello] * 3  # at 10 and 60 ms; the next (160 ms) is past OpenSSL's timer


async def test_connected_transport_is_never_resent_to() -> None:
    dtls = _FakeDtls()
    adapter._resend_first_flight(dtls, early=0.01, first=0.05, until=1.0)
    hello = b"\x16\xfe\xfd" + b"\x00" * 40
    await dtls.transport._send(hello)
    dtls.state = "connected"
    await asyncio.sleep(0.1)
    assert dtls.transport.sent == [hello]
