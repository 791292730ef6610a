"""ICE-TCP on a real server: the answer's passive TCP candidates, and a raw
client (no aiortc) that authenticates over RFC 4571 framed STUN."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest
from aioice import stun

from helpers import ServerProcess, http, live_stream, metrics_url, wait_until

pytestmark = pytest.mark.integration

OFFER = (Path(__file__).parent.parent / "fixtures" / "sdp" / "chromium_whep_offer.sdp").read_text()


@pytest.fixture(scope="module")
def env(module_db_url, tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("srv"), env={
        "DATABASE_URL": module_db_url, "RETURNFEED_ADMIN_PASSWORD": "admin-password-1",
        "RETURNFEED_WEBRTC__ICE_TCP": "true", "RETURNFEED_WEBRTC__ICE_TCP_PORT": "0"})
    srv.start()
    with live_stream(srv, "admin-password-1", "TCP show", "tcp1", seconds=90) as admin:
        yield {"base": srv.url, "admin": admin, "server": srv}


def _answer(env) -> tuple[str, list[list[str]]]:
    r = http("POST", f"{env['base']}/whep/tcp1", raw=OFFER.encode(), token=env["admin"],
             headers={"Content-Type": "application/sdp"})
    assert r.status == 201, r.body
    sdp = r.body.decode() if isinstance(r.body, bytes) else r.body
    cands = [ln.split(":", 1)[1].split() for ln in sdp.splitlines() if ln.startswith("a=candidate:")]
    return sdp, cands


def _attr(sdp: str, name: str) -> str:
    return next(ln.split(":", 1)[1].strip() for ln in sdp.splitlines() if ln.startswith(f"a={name}:"))


def _request(username: str, password: str) -> bytes:
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


def test_answer_offers_passive_tcp_candidates_below_udp(env) -> None:
    _, cands = _answer(env)
    udp = [c for c in cands if c[2].lower() == "udp" and c[7] == "host"]
    tcp = [c for c in cands if c[2].lower() == "tcp"]
    assert udp and tcp
    # RFC 6544 §4.5: "tcptype passive", one port for all, same addresses as UDP
    assert all(c[8:10] == ["tcptype", "passive"] and c[7] == "host" for c in tcp)
    assert len({c[5] for c in tcp}) == 1 and tcp[0][5] != "9"
    assert sorted(c[4] for c in tcp) == sorted(c[4] for c in udp)
    assert max(int(c[3]) for c in tcp) < min(int(c[3]) for c in udp)


def test_raw_client_binds_over_tcp_with_the_session_credentials(env) -> None:
    sdp, cands = _answer(env)
    tcp = next(c for c in cands if c[2].lower() == "tcp" and ":" not in c[4])
    ufrag, pwd = _attr(sdp, "ice-ufrag"), _attr(sdp, "ice-pwd")
    remote_ufrag = _attr(OFFER, "ice-ufrag")
    with socket.create_connection((tcp[4], int(tcp[5])), timeout=5) as sock:
        req = _request(f"{ufrag}:{remote_ufrag}", pwd)
        sock.sendall(struct.pack("!H", len(req)) + req)
        response = stun.parse_message(_recv_frame(sock))
        assert response.message_class == stun.Class.RESPONSE
        assert response.transaction_id == stun.parse_message(req).transaction_id
        assert response.attributes["XOR-MAPPED-ADDRESS"] == sock.getsockname()[:2]
        assert response.check_message_integrity(pwd.encode())
        # The server answers with its own triggered check on the same
        # connection (RFC 8445 §7.3.1.4), addressed to our ufrag.
        check = stun.parse_message(_recv_frame(sock))
        assert check.message_class == stun.Class.REQUEST
        assert check.attributes["USERNAME"] == f"{remote_ufrag}:{ufrag}"

    with socket.create_connection((tcp[4], int(tcp[5])), timeout=5) as sock:
        req = _request(f"{ufrag}:{remote_ufrag}", "not-the-password-of-it")
        sock.sendall(struct.pack("!H", len(req)) + req)
        with pytest.raises((ConnectionError, OSError)):
            _recv_frame(sock)

    def refused() -> float:
        text = http("GET", metrics_url(env["base"])).body
        text = text.decode() if isinstance(text, bytes) else text
        line = next((ln for ln in text.splitlines()
                     if ln.startswith('returnfeed_webrtc_ice_tcp_refused_total{reason="bad_integrity"}')), None)
        return float(line.split()[-1]) if line else 0.0

    assert wait_until(lambda: refused() >= 1)
