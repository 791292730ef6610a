"""No client input answers 5xx (issue 9, item 15).

Every route of the server is swept with a hostile corpus: hostile path
parameters and query strings, JSON bodies nested 200 000 deep, NUL and lone
surrogates, numbers PostgreSQL cannot hold, wrong types, control characters,
NaN, garbage SDP and trickle fragments. Each answer must be a 4xx (or a
success) with, for errors, a JSON ``{error, detail}`` body. The route list is
checked against the routes the server's modules register, so a new route
cannot be left out of the sweep.
"""

from __future__ import annotations

import http.client as httpclient
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from helpers import ROOT, http, login

pytestmark = pytest.mark.integration

#: Every route, with the valid body its sweep starts from (None: no JSON body;
#: "sdp"/"trickle": the WebRTC bodies).
ROUTES: dict[tuple[str, str], Any] = {
    ("POST", "/api/v1/auth/login"): {"username": "nobody", "password": "wrong-password"},
    ("POST", "/api/v1/auth/refresh"): {"refresh_token": "not-a-token"},
    ("POST", "/api/v1/auth/logout"): {"refresh_token": "not-a-token"},
    ("GET", "/api/v1/auth/me"): None,
    ("POST", "/api/v1/users"): {"username": "swept", "password": "swept-password", "role": "viewer"},
    ("GET", "/api/v1/users"): None,
    ("POST", "/api/v1/productions"): {"name": "Swept show", "description": "d"},
    ("GET", "/api/v1/productions"): None,
    ("GET", "/api/v1/productions/{production_id}"): None,
    ("PATCH", "/api/v1/productions/{production_id}"): {"name": "Sweep show", "description": "d"},
    ("DELETE", "/api/v1/productions/{production_id}"): None,
    ("PUT", "/api/v1/productions/{production_id}/members/{username}"): {"role": "camera", "camera_stream": "s1"},
    ("DELETE", "/api/v1/productions/{production_id}/members/{username}"): None,
    ("POST", "/api/v1/streams"): {"name": "swept1", "production": 1, "label": "l", "settings": {},
                                  "pbkeylen": 16, "latency_ms": 120},
    ("GET", "/api/v1/streams"): None,
    ("GET", "/api/v1/streams/{name}"): None,
    ("PATCH", "/api/v1/streams/{name}"): {"label": "l", "settings": {}, "latency_ms": 120,
                                          "rotate_passphrase": False},
    ("DELETE", "/api/v1/streams/{name}"): None,
    ("POST", "/api/v1/streams/{name}/links"): {"action": "read", "ttl_s": 60},
    ("GET", "/api/v1/streams/{name}/viewers"): None,
    ("POST", "/api/v1/links/revoke"): {"token": "not-a-token"},
    ("GET", "/ws/tally"): None,
    ("GET", "/api/v1/productions/{production_id}/tally"): None,
    ("POST", "/api/v1/productions/{production_id}/tally"): {"type": "cut", "source": "s1", "duration": 1},
    ("GET", "/api/v1/productions/{production_id}/tally/config"): None,
    ("PUT", "/api/v1/productions/{production_id}/tally/config"): {
        "transition_s": 1, "sources": {"vt": {"label": "VT"}},
        "adapters": [{"type": "tsl_out", "host": "127.0.0.1", "port": 9, "addresses": {"s1": 1}}]},
    ("GET", "/api/v1/productions/{production_id}/tally/events"): None,
    ("POST", "/whep/{stream}"): "sdp",
    ("OPTIONS", "/whep/{stream}"): None,
    ("HEAD", "/whep/{stream}"): None,
    ("PATCH", "/whep/{stream}/{session}"): "trickle",
    ("DELETE", "/whep/{stream}/{session}"): None,
    ("GET", "/whep/{stream}/{session}"): None,
    ("POST", "/whep/{stream}/{session}/layer"): {"layer": "auto"},
    ("OPTIONS", "/whep/{stream}/{session}"): None,
    ("POST", "/whip/{stream}"): "sdp",
    ("OPTIONS", "/whip/{stream}"): None,
    ("PATCH", "/whip/{stream}/{session}"): "trickle",
    ("DELETE", "/whip/{stream}/{session}"): None,
    ("GET", "/whip/{stream}/{session}"): None,
    ("OPTIONS", "/whip/{stream}/{session}"): None,
    ("GET", "/ws/events"): None,
    ("GET", "/api/v1/streams/{name}/markers"): None,
    ("PATCH", "/api/v1/markers/{marker_id}"): {"false_positive": True, "verified": False},
    ("GET", "/api/v1/streams/{name}/notes"): None,
    ("POST", "/api/v1/streams/{name}/notes"): {"text": "swept note", "at": 1700000000},
    ("GET", "/api/v1/streams/{name}/captions"): None,
    ("GET", "/api/v1/streams/{name}/captions.{fmt}"): None,
    ("GET", "/api/v1/streams/{name}/settings"): None,
    ("PATCH", "/api/v1/streams/{name}/settings"): {"qc": {"enabled": False, "thresholds": {"black_d": 2.5}},
                                                   "captions": {"enabled": False, "language": "en"}},
    ("GET", "/healthz"): None,
    ("GET", "/metrics"): None,
    ("GET", "/control"): None,
    ("GET", "/camera/{stream}"): None,
    ("GET", "/watch/{stream}"): None,
    ("GET", "/"): None,
    ("GET", "/static/{filename}"): None,
}

DEEP = 500
HOSTILE_VALUES: list[Any] = [
    None, True, False, -1, 0, 10**30, -(10**30), 1e308, 1.5, "", "\u0000", "a\u0000b", "\ud800", "a\u0007b\u001b[2J",
    "x" * 70_000, [], {}, [1, "two"], {"\u0000": 1}, ["\ud800"], {"nested": {"\udfff": "\u0000"}},
    json.loads("[" * DEEP + "]" * DEEP),
]
RAW_JSON_BODIES = [
    b"[" * 200_000, b'{"a":' * 100_000, b"[" * 200_000 + b"]" * 200_000, b'{"name": NaN}', b'{"name": Infinity}',
    b'{"settings": {"x": NaN}, "name": "n", "production": 1}', b'{"label": "\\ud800"}', b'{"a": "\\u0000"}',
    b"\xff\xfe{}", b"{", b"null", b"1e999999", b'{"production": 1000000000000000000000000000000}',
]
SDP_BODIES = [
    b"", b"\x00" * 64, b"v=0\r\n", b"v=0\r\n" + b"a=candidate:garbage\r\n" * 10, b"v=0\r\nm=video 9 UDP 0\r\n",
    b"\xff" * 300, b"v=0\r\n" + b"a=" + b"x" * 60_000 + b"\r\n", b"v=0\r\no=- 1 1 IN IP4 0\r\ns=\x00\r\n",
]
TRICKLE_BODIES = [
    b"a=candidate:garbage\r\n", b"a=candidate:\r\n", b"a=candidate:1 1 udp x 127.0.0.1 9 typ host\r\n",
    b"a=candidate:1 1 udp 1 127.0.0.1 99999999999999999999 typ host\r\n", b"\x00\xff", b"a=ice-ufrag:\x00\r\n",
]
PATH_VALUES = ["%00", "a%00b", "%ED%A0%80", "%FF", "9" * 30, "-1", "x" * 300, "..%2F..%2Fetc%2Fpasswd", "%20"]
QUERIES = [
    "production=" + "9" * 30, "production=%00", "production=%ED%A0%80", "before_seq=" + "9" * 30,
    "before_seq=-" + "9" * 30, "limit=" + "9" * 30, "limit=-5", "token=%00", "token=garbage", "layer=%00",
    "layer=ultra", "production=1&before_seq=x",
    "from=" + "9" * 30, "to=%ED%A0%80", "from=9999-99-99T99:99", "type=%00", "format=%00",
    "before_id=" + "9" * 30, "marker_id=-1", "include_false_positive=%FF",
    "after_id=" + "9" * 30, "after_id=%00", "from=1e400", "from=-1&to=%FF",
]


def _registered_routes() -> set[tuple[str, str]]:
    """What the server's modules register (add_get/add_post/…/add_route/add_static)."""
    found: set[tuple[str, str]] = set()
    for path in (ROOT / "server").glob("*.py"):
        text = path.read_text()
        for m in re.finditer(r"\.add_(get|post|put|patch|delete)\(\s*f?\"([^\"]+)\"", text):
            found.add((m.group(1).upper(), m.group(2)))
        for m in re.finditer(r"\.add_route\(\s*\"([A-Z]+)\",\s*f?\"([^\"]+)\"", text):
            found.add((m.group(1), m.group(2)))
        if ".add_static(" in text:
            found.add(("GET", "/static/{filename}"))
    # pages.py builds its paths from STREAM_PATTERN; {name:regex} is {name}
    return {(m, re.sub(r"\{(\w+):[^}]*\}", r"{\1}", p.replace("{STREAM_PATTERN}", "{stream}"))) for m, p in found}


def test_sweep_covers_every_route() -> None:
    missing = _registered_routes() - set(ROUTES)
    assert not missing, f"routes missing from the hostile sweep: {sorted(missing)}"


class Client:
    """One keep-alive connection; reopened after the server closes it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = httpclient.HTTPConnection("127.0.0.1", port, timeout=30)
        self.checked = 0
        self.failures: list[str] = []

    def request(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> tuple[int, bytes, str]:
        for attempt in (0, 1):
            try:
                self.conn.request(method, path, body=body, headers=headers)
                resp = self.conn.getresponse()
                data = resp.read()
                if resp.getheader("Connection", "").lower() == "close":
                    self.conn.close()
                return resp.status, data, resp.getheader("Content-Type", "")
            except (httpclient.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.conn.close()
                self.conn = httpclient.HTTPConnection("127.0.0.1", self.port, timeout=30)
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def check(self, method: str, path: str, *, body: bytes | None = None, token: str | None = None,
              content_type: str | None = None) -> int:
        headers = {}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if content_type:
            headers["Content-Type"] = content_type
        status, data, ctype = self.request(method, path, body, headers)
        self.checked += 1
        what = f"{method} {path[:200]} body={body[:120] if body else body!r}"
        if status >= 500:
            self.failures.append(f"{what} -> {status} {data[:300]!r}")
        elif status >= 400 and method != "HEAD":
            if not ctype.startswith("application/json"):
                self.failures.append(f"{what} -> {status} {ctype} {data[:200]!r}")
            elif not set(json.loads(data)) >= {"error", "detail"}:
                self.failures.append(f"{what} -> {status} {data[:200]!r}")
        return status

    def assert_clean(self) -> None:
        assert not self.failures, f"{len(self.failures)} bad answers:\n" + "\n".join(self.failures[:40])


@pytest.fixture(scope="module")
def world(api_server) -> dict[str, Any]:
    base = api_server.url
    admin = login(base, "admin", api_server.admin_password)["access_token"]
    r = http("POST", f"{base}/api/v1/productions", {"name": "Sweep show"}, token=admin)
    assert r.status == 201, r.body
    pid = r.json()["id"]
    assert http("POST", f"{base}/api/v1/streams", {"name": "s1", "production": pid}, token=admin).status == 201
    r = http("POST", f"{base}/api/v1/users", {"username": "cam", "password": "cam-password", "role": "camera"},
             token=admin)
    assert r.status == 201, r.body
    link = http("POST", f"{base}/api/v1/streams/s1/links", {"action": "read"}, token=admin).json()["token"]
    return {"admin": admin, "pid": pid, "link": link}


def _fill(template: str, valid: dict[str, str], hostile: str | None) -> list[str]:
    """The path with every parameter valid, and with each in turn hostile."""
    params = re.findall(r"\{(\w+)\}", template)
    if hostile is None:
        out = template
        for p in params:
            out = out.replace("{" + p + "}", valid[p])
        return [out]
    paths = []
    for p in params:
        out = template.replace("{" + p + "}", hostile)
        for q in params:
            out = out.replace("{" + q + "}", valid[q])
        paths.append(out)
    return paths


def _bodies(base: dict[str, Any]) -> list[bytes]:
    out = list(RAW_JSON_BODIES)
    for key in [*base, "unexpected"]:
        for value in HOSTILE_VALUES:
            out.append(json.dumps({**base, key: value}).encode())
    if "adapters" in base:
        for value in HOSTILE_VALUES:
            for field in ("type", "host", "port", "addresses", "version", "transport", "url", "password",
                          "authority", "lost_after"):
                adapter = {**base["adapters"][0], field: value}
                out.append(json.dumps({**base, "adapters": [adapter]}).encode())
            out.append(json.dumps({**base, "sources": {"vt": value}}).encode())
            out.append(json.dumps({**base, "sources": {"vt": {"label": value}}}).encode())
    return out


def test_every_route_survives_hostile_input(api_server, world) -> None:
    admin, pid = world["admin"], world["pid"]
    client = Client(api_server.port)
    valid = {"production_id": str(pid), "username": "cam", "name": "s1", "stream": "s1", "session": "nosuch",
             "filename": "nosuch.js", "marker_id": "1", "fmt": "vtt"}
    # The login route last: its failures rate-limit this IP.
    ordered = sorted(ROUTES, key=lambda r: r[1] == "/api/v1/auth/login")
    for method, template in ordered:
        base = ROUTES[(method, template)]
        # DELETE with valid parameters would remove what the sweep stands on.
        paths = [] if method == "DELETE" else _fill(template, valid, None)
        for value in PATH_VALUES:
            paths += _fill(template, valid, value)
        for path in paths:
            for token in (admin, world["link"], None):
                client.check(method, path, token=token,
                             body=b"{}" if isinstance(base, dict) else None,
                             content_type="application/json" if isinstance(base, dict) else None)
            for q in QUERIES:
                client.check(method, f"{path}?{q}", token=admin)
        target = _fill(template, valid, None)[0]
        if isinstance(base, dict):
            for body in _bodies(base):
                client.check(method, target, body=body, token=admin, content_type="application/json")
        elif base == "sdp":
            for body in SDP_BODIES:
                client.check(method, target, body=body, token=admin, content_type="application/sdp")
        elif base == "trickle":
            for body in TRICKLE_BODIES:
                client.check(method, target, body=body, token=admin, content_type="application/trickle-ice-sdpfrag")
    # After the sweep the production still works: nothing stored bricked it.
    for path in (f"/api/v1/productions/{pid}", f"/api/v1/productions/{pid}/tally",
                 f"/api/v1/productions/{pid}/tally/config", "/api/v1/streams/s1"):
        assert client.check("GET", path, token=admin) == 200, path
    client.assert_clean()
    assert client.checked > 3000


def test_named_cases(api_server, world) -> None:
    """The cases the issue names, each a 400 with a JSON body."""
    admin, pid = world["admin"], world["pid"]
    client = Client(api_server.port)
    j = "application/json"
    cases = [
        ("POST", "/api/v1/productions", b"[" * 200_000),
        ("PATCH", f"/api/v1/productions/{pid}", json.dumps({"description": "a\u0000b"}).encode()),
        ("PATCH", f"/api/v1/productions/{pid}", json.dumps({"description": "\ud800"}).encode()),
        ("PATCH", "/api/v1/streams/s1", json.dumps({"label": "\u0000"}).encode()),
        ("PATCH", "/api/v1/streams/s1", json.dumps({"settings": {"k": "\ud800"}}).encode()),
        ("POST", "/api/v1/streams", json.dumps({"name": "big", "production": 10**30}).encode()),
        ("PUT", f"/api/v1/productions/{pid}/members/a%00b", json.dumps({"role": "viewer"}).encode()),
        ("PATCH", "/api/v1/streams/s1", b'{"settings": {"x": NaN}}'),
    ]
    for method, path, body in cases:
        status = client.check(method, path, body=body, token=admin, content_type=j)
        assert status in (400, 404), (method, path, status, client.failures)
    assert client.check("GET", f"/api/v1/productions/{pid}/tally/events?before_seq={'9' * 30}", token=admin) == 400
    client.assert_clean()
