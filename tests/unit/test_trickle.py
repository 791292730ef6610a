"""Trickle-ICE fragments (RFC 8840) from a PATCH: garbage candidates are a
400 with the reason, never an exception out of aiortc (issue 9, item 15)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from unittest import mock

import pytest
from aiohttp import web
from aiohttp.streams import StreamReader
from aiohttp.test_utils import make_mocked_request
from aiortc import RTCPeerConnection
from hypothesis import given, settings, strategies as st

from media.webrtc import aiortc_adapter
from media.webrtc.sdp import SdpError, parse_trickle_candidates
from server.keys import SETTINGS
from server.config import Settings
from server.errors import BadRequest
from server.webrtc_http import patch_trickle

GOOD = "1 1 udp 2130706431 127.0.0.1 9 typ host"


@pytest.mark.parametrize("value", [
    GOOD, "842163049 1 udp 1677729535 203.0.113.7 54321 typ srflx raddr 0.0.0.0 rport 0 generation 0",
    "1 1 tcp 1518280447 192.0.2.1 9 typ host tcptype active", "abc+/ 2 UDP 1 x.local 0 typ host",
])
def test_valid_candidates_pass(value: str) -> None:
    assert parse_trickle_candidates(f"a=ice-ufrag:x\r\na=candidate:{value}\r\n") == [value]


@pytest.mark.parametrize("value", [
    "garbage", "", "1 1 udp 2130706431 127.0.0.1 9 host", "1 1 udp x 127.0.0.1 9 typ host",
    "1 1 udp 1 127.0.0.1 99999999999999999999 typ host", "1 1 udp 1 127.0.0.1 70000 typ host",
    "1 0 udp 1 127.0.0.1 9 typ host", "1 1 udp 99999999999 127.0.0.1 9 typ host",
    "1 1 udp 1 127.0.0.1 9 typ host rport x", "1 1 udp 1 127.0.0.1 9 typ host raddr",
    "f" * 33 + " 1 udp 1 127.0.0.1 9 typ host", "1 1 udp 1 127.0.0.1 9 typ host\x00",
])
def test_garbage_candidates_refused(value: str) -> None:
    with pytest.raises(SdpError):
        parse_trickle_candidates(f"a=candidate:{value}\r\n")


@given(st.text(max_size=300))
@settings(max_examples=300, deadline=None)
def test_fuzz_trickle_only_raises_sdp_error(frag: str) -> None:
    try:
        for value in parse_trickle_candidates(frag):
            # What passes the check is safe for aiortc's parser.
            from aiortc.sdp import candidate_from_sdp

            candidate_from_sdp(value)
    except SdpError:
        pass


def test_patch_with_garbage_candidate_is_400() -> None:
    async def run() -> None:
        pc = RTCPeerConnection()
        pc.addTransceiver("video", direction="recvonly")
        try:
            session = SimpleNamespace(pc=pc, etag='"e"',
                                      add_remote_candidates=lambda frag: aiortc_adapter.add_trickle_candidates(pc, frag))
            app = web.Application()
            app[SETTINGS] = Settings()
            req = make_mocked_request("PATCH", "/whep/s/x", app=app,
                                      headers={"Content-Type": "application/trickle-ice-sdpfrag"},
                                      payload=_payload(b"a=candidate:garbage\r\n"))
            with pytest.raises(BadRequest) as err:
                await patch_trickle(req, session, "restart")
            assert "candidate" in err.value.detail
        finally:
            await pc.close()

    asyncio.run(run())


def _payload(data: bytes) -> StreamReader:
    reader = StreamReader(mock.Mock(), 2**16, loop=asyncio.get_running_loop())
    reader.feed_data(data)
    reader.feed_eof()
    return reader
