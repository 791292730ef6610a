"""Issue 9 item 10: idle and slow-header HTTP connections are not held for
ever, and one address cannot hold an unbounded number of connections."""

from __future__ import annotations

import json
import socket
import time

import pytest

from helpers import ServerProcess, http

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(module_db_url, tmp_path_factory):  # type: ignore[no-untyped-def]
    srv = ServerProcess(tmp_path_factory.mktemp("limits"), env={
        "DATABASE_URL": module_db_url, "RETURNFEED_ADMIN_PASSWORD": "limits-admin-pw",
        "RETURNFEED_HTTP__KEEPALIVE_TIMEOUT_S": "1.5", "RETURNFEED_HTTP__HEADER_TIMEOUT_S": "1.0",
        "RETURNFEED_HTTP__MAX_CONNECTIONS_PER_IP": "4"}).start()
    try:
        yield srv
    finally:
        srv.stop()


def _connect(srv: ServerProcess, source: str = "127.0.0.1") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=10, source_address=(source, 0))
    return s


def _read_all(s: socket.socket, timeout: float) -> tuple[bytes, float]:
    """Everything until the server closes; and how long that took."""
    start = time.monotonic()
    s.settimeout(timeout)
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return data, time.monotonic() - start
        data += chunk


def _json_body(raw: bytes) -> dict:
    return json.loads(raw.split(b"\r\n\r\n", 1)[1])


def test_idle_connection_is_closed(server) -> None:
    s = _connect(server, "127.0.0.2")
    with s:
        data, took = _read_all(s, 10)
    assert data == b"" and took < 5


def test_slow_headers_get_408_and_are_closed(server) -> None:
    s = _connect(server, "127.0.0.3")
    with s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        start = time.monotonic()
        try:
            for i in range(40):  # a header line every 0.2 s: never complete
                s.sendall(f"X-Slow-{i}: y\r\n".encode())
                time.sleep(0.2)
        except OSError:
            pass  # closed under us: what is wanted
        data, _ = _read_all(s, 10)
        took = time.monotonic() - start
    assert data.startswith(b"HTTP/1.1 408 ")
    assert _json_body(data)["error"] == "request_timeout"
    assert took < 5


def test_keepalive_requests_still_work(server) -> None:
    s = _connect(server, "127.0.0.4")
    with s:
        for _ in range(2):
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            s.settimeout(10)
            head = s.recv(65536)
            assert head.startswith(b"HTTP/1.1 200 ")
            time.sleep(0.5)  # within the keep-alive timeout


def test_connections_per_ip_are_capped(server) -> None:
    held = [_connect(server, "127.0.0.5") for _ in range(4)]
    try:
        time.sleep(0.2)
        extra = _connect(server, "127.0.0.5")
        with extra:
            data, _ = _read_all(extra, 10)
        assert data.startswith(b"HTTP/1.1 503 ")
        assert _json_body(data)["error"] == "too_many_connections"
        # Another address is not affected.
        assert http("GET", f"http://127.0.0.1:{server.port}/healthz").status == 200
    finally:
        for s in held:
            s.close()
    time.sleep(0.3)
    s = _connect(server, "127.0.0.5")  # the places are free again
    with s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data, _ = _read_all(s, 10)
    assert data.startswith(b"HTTP/1.1 200 ")
