"""Errors the HTTP stack raises before a handler runs are JSON too (issue 9,
item 17): README promises ``{error, detail}`` for every error."""

from __future__ import annotations

import json
import socket

import pytest

from helpers import http

pytestmark = pytest.mark.integration


def _raw(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return status, headers, body


@pytest.mark.parametrize("name,request_bytes,status", [
    ("long URL", b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    ("huge header", b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 20_000 + b"\r\n\r\n", 431),
    ("Content-Length with Transfer-Encoding",
     b"POST /api/v1/auth/login HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0\r\n\r\n", 400),
    ("invalid method", b"GE(T / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("garbage request line", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),
])
def test_parser_errors_are_json(api_server, name: str, request_bytes: bytes, status: int) -> None:
    got, headers, body = _raw(api_server.port, request_bytes)
    assert 400 <= got < 500, (name, got, body[:200])
    if status in (400,):
        assert got == status, (name, got)
    assert headers.get("content-type", "").startswith("application/json"), (name, headers, body[:200])
    err = json.loads(body)
    assert set(err) >= {"error", "detail"} and err["detail"], (name, err)


def test_missing_static_file_is_a_json_404(api_server) -> None:
    for path in ("/static/no-such-file.js", "/static/../server/app.py", "/static/%2e%2e/server/app.py",
                 "/static/", "/no-such-page"):
        r = http("GET", api_server.url + path)
        assert r.status == 404, (path, r.status)
        assert r.headers["Content-Type"].startswith("application/json"), (path, r.headers["Content-Type"])
        assert r.json()["error"] == "not_found" and r.json()["detail"], path


def test_existing_static_file_still_served(api_server) -> None:
    r = http("GET", api_server.url + "/static/js/api.js")
    assert r.status == 200 and r.headers["X-Content-Type-Options"] == "nosniff"
    assert r.headers["Content-Type"].startswith(("application/javascript", "text/javascript"))
    assert http("HEAD", api_server.url + "/static/js/api.js").status == 200
