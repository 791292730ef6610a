"""The HTTP API against a real server process and a real PostgreSQL."""

from __future__ import annotations

import time

import pytest

from helpers import http, login, metrics_url

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def admin(api_server) -> str:
    return login(api_server.url, "admin", api_server.admin_password)["access_token"]


@pytest.fixture(scope="module")
def world(api_server, admin) -> dict:
    """A production with a director, a camera operator and a viewer."""
    base = api_server.url
    users = {}
    for name, role in (("dir1", "director"), ("cam1op", "camera"), ("view1", "viewer"), ("dir2", "director")):
        r = http("POST", f"{base}/api/v1/users", {"username": name, "password": f"{name}-password", "role": role},
                 token=admin)
        assert r.status == 201, r.body
        users[name] = login(base, name, f"{name}-password")["access_token"]
    r = http("POST", f"{base}/api/v1/productions", {"name": "Main show"}, token=users["dir1"])
    assert r.status == 201, r.body
    prod = r.json()
    for name, role in (("cam1op", "camera"), ("view1", "viewer")):
        r = http("PUT", f"{base}/api/v1/productions/{prod['id']}/members/{name}", {"role": role},
                 token=users["dir1"])
        assert r.status == 200, r.body
    r = http("POST", f"{base}/api/v1/streams", {"name": "cam1", "production": "Main show"}, token=users["dir1"])
    assert r.status == 201, r.body
    return {"prod": prod, "tokens": users, "stream": r.json()}


def test_healthz_and_metrics(api_server) -> None:
    r = http("GET", f"{api_server.url}/healthz")
    assert r.status == 200
    body = r.json()
    assert body["status"] == "ok" and body["database"] == "ok" and "versions" in body
    m = http("GET", metrics_url(api_server.url)).body.decode()
    assert "returnfeed_http_requests_total" in m and "returnfeed_db_pool_connections" in m
    assert "returnfeed_uptime_seconds" in m


def test_login_errors_do_not_reveal_users(api_server) -> None:
    base = api_server.url
    a = http("POST", f"{base}/api/v1/auth/login", {"username": "admin", "password": "wrong-password"})
    b = http("POST", f"{base}/api/v1/auth/login", {"username": "ghost-user", "password": "wrong-password"})
    assert a.status == b.status == 401
    assert a.json() == b.json()


def test_login_rate_limited(api_server) -> None:
    base = api_server.url
    statuses = [http("POST", f"{base}/api/v1/auth/login", {"username": "victim", "password": "nope-nope"}).status
                for _ in range(6)]
    assert statuses[:5] == [401] * 5 and statuses[5] == 429
    r = http("POST", f"{base}/api/v1/auth/login", {"username": "victim", "password": "nope-nope"})
    assert r.status == 429 and int(r.headers["Retry-After"]) >= 1 and r.json()["error"] == "too_many_requests"


def _login_from(base: str, source_ip: str, username: str, password: str) -> int:
    """POST a login from a chosen loopback address; returns the status."""
    import http.client
    import json as _json
    from urllib.parse import urlsplit

    u = urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=15, source_address=(source_ip, 0))
    try:
        conn.request("POST", "/api/v1/auth/login", _json.dumps({"username": username, "password": password}),
                     {"Content-Type": "application/json"})
        r = conn.getresponse()
        r.read()
        return r.status
    finally:
        conn.close()


def test_strangers_failures_do_not_lock_the_owner_out(api_server, admin) -> None:
    """Issue 9 item 13: wrong passwords from one address slow that address
    down; the account's owner elsewhere still logs in."""
    base = api_server.url
    r = http("POST", f"{base}/api/v1/users", {"username": "lockvictim", "password": "lockvictim-pw", "role": "director"},
             token=admin)
    assert r.status == 201, r.body
    statuses = [_login_from(base, "127.0.0.3", "lockvictim", "wrong-password") for _ in range(6)]
    assert statuses == [401] * 5 + [429]
    assert _login_from(base, "127.0.0.4", "lockvictim", "lockvictim-pw") == 200
    assert _login_from(base, "127.0.0.3", "lockvictim", "lockvictim-pw") == 429  # the stranger's address waits


def test_refresh_rotates_and_reuse_revokes_family(api_server) -> None:
    base = api_server.url
    s1 = login(base, "admin", api_server.admin_password)
    r = http("POST", f"{base}/api/v1/auth/refresh", {"refresh_token": s1["refresh_token"]})
    assert r.status == 200
    s2 = r.json()
    assert s2["refresh_token"] != s1["refresh_token"]
    assert http("GET", f"{base}/api/v1/auth/me", token=s2["access_token"]).json()["username"] == "admin"
    # Replaying the old token: refused, and the whole family dies.
    assert http("POST", f"{base}/api/v1/auth/refresh", {"refresh_token": s1["refresh_token"]}).status == 401
    assert http("POST", f"{base}/api/v1/auth/refresh", {"refresh_token": s2["refresh_token"]}).status == 401


def test_logout_revokes(api_server) -> None:
    base = api_server.url
    s = login(base, "admin", api_server.admin_password)
    assert http("POST", f"{base}/api/v1/auth/logout", {"refresh_token": s["refresh_token"]}).status == 204
    assert http("POST", f"{base}/api/v1/auth/refresh", {"refresh_token": s["refresh_token"]}).status == 401


def test_bad_tokens_401(api_server) -> None:
    base = api_server.url
    assert http("GET", f"{base}/api/v1/streams").status == 401
    r = http("GET", f"{base}/api/v1/streams", token="garbage.token.here")
    assert r.status == 401 and r.json()["error"] == "unauthorized"
    r = http("GET", f"{base}/api/v1/streams", headers={"Authorization": "Basic YWRtaW46YWRtaW4="})
    assert r.status == 401
    import jwt

    forged = jwt.encode({"iss": "returnfeed", "aud": "returnfeed:access", "sub": "1", "name": "admin",
                         "role": "admin", "iat": int(time.time()), "exp": int(time.time()) + 60},
                        "not-the-server-secret-but-long-enough-to-sign", algorithm="HS256")
    assert http("GET", f"{base}/api/v1/users", token=forged).status == 401


def test_roles_and_production_membership(api_server, world) -> None:
    base = api_server.url
    t = world["tokens"]
    pid = world["prod"]["id"]
    # camera/viewer cannot create productions or streams
    assert http("POST", f"{base}/api/v1/productions", {"name": "x"}, token=t["cam1op"]).status == 403
    assert http("POST", f"{base}/api/v1/streams", {"name": "camx", "production": pid},
                token=t["view1"]).status == 403
    # a director of another production cannot touch this one
    assert http("POST", f"{base}/api/v1/streams", {"name": "camx", "production": pid},
                token=t["dir2"]).status == 403
    assert http("GET", f"{base}/api/v1/productions/{pid}", token=t["dir2"]).status == 403
    # non-admins cannot manage users
    assert http("GET", f"{base}/api/v1/users", token=t["dir1"]).status == 403
    # members see the stream; only directors see its passphrase
    cam_view = http("GET", f"{base}/api/v1/streams/cam1", token=t["cam1op"]).json()
    assert "passphrase" not in cam_view and "srt_url" not in cam_view
    dir_view = http("GET", f"{base}/api/v1/streams/cam1", token=t["dir1"]).json()
    assert len(dir_view["passphrase"]) >= 10
    assert [s["name"] for s in http("GET", f"{base}/api/v1/streams", token=t["dir2"]).json()["streams"]] == []


def test_stream_create_shape(api_server, world) -> None:
    s = world["stream"]
    for key in ("name", "passphrase", "srt_url", "whip_url", "whep_url", "live", "tracks", "layers"):
        assert key in s, key
    assert s["srt_url"].startswith("srt://") and "streamid=publish:cam1" in s["srt_url"]
    assert f"passphrase={s['passphrase']}" in s["srt_url"]
    assert s["whep_url"].endswith("/whep/cam1") and s["whip_url"].endswith("/whip/cam1")
    assert s["live"] is False


def test_stream_latency_create_update_and_urls(api_server, world) -> None:
    base = api_server.url
    t = world["tokens"]["dir1"]
    pid = world["prod"]["id"]
    # the server's default (srt.latency_ms 120) when not given
    d = world["stream"]
    assert (d["latency_ms"], d["latency_default"]) == (120, True)
    assert d["srt_url"].endswith("&latency=120000") and d["srt_url_ms"].endswith("&latency=120")
    r = http("POST", f"{base}/api/v1/streams", {"name": "lowlat", "production": pid, "latency_ms": 20}, token=t)
    assert r.status == 201, r.body
    s = r.json()
    assert (s["latency_ms"], s["latency_default"]) == (20, False)
    # FFmpeg/OBS read latency= in microseconds, srt-live-transmit/GStreamer in milliseconds
    assert "latency=20000" in s["srt_url"] and "latency=20000" in s["srt_read_url"]
    assert s["srt_url_ms"].endswith("&latency=20") and s["srt_read_url_ms"].endswith("&latency=20")
    assert s["srt_url_ms"].replace("latency=20", "latency=20000") == s["srt_url"]
    for bad in (19, 8001, 0, -5, "20", 20.5, True):
        r = http("POST", f"{base}/api/v1/streams", {"name": "lowlat2", "production": pid, "latency_ms": bad}, token=t)
        assert r.status == 400, bad
        assert r.json()["error"] == "bad_request" and "latency_ms" in r.json()["detail"]
    # PATCH: change, refuse out of range (unchanged), reset with null
    r = http("PATCH", f"{base}/api/v1/streams/lowlat", {"latency_ms": 250}, token=t)
    assert r.status == 200 and r.json()["latency_ms"] == 250 and "latency=250000" in r.json()["srt_url"]
    for bad in (10, 9000, "fast"):
        r = http("PATCH", f"{base}/api/v1/streams/lowlat", {"latency_ms": bad}, token=t)
        assert r.status == 400 and "latency_ms" in r.json()["detail"]
    assert http("GET", f"{base}/api/v1/streams/lowlat", token=t).json()["latency_ms"] == 250
    r = http("PATCH", f"{base}/api/v1/streams/lowlat", {"label": "kept"}, token=t)
    assert r.json()["latency_ms"] == 250  # untouched when not sent
    r = http("PATCH", f"{base}/api/v1/streams/lowlat", {"latency_ms": None}, token=t)
    assert (r.json()["latency_ms"], r.json()["latency_default"]) == (120, True)
    # only directors change it; members see the value
    assert http("PATCH", f"{base}/api/v1/streams/lowlat", {"latency_ms": 40},
                token=world["tokens"]["cam1op"]).status == 403
    assert http("GET", f"{base}/api/v1/streams/lowlat", token=world["tokens"]["view1"]).json()["latency_ms"] == 120
    # publish links carry the stream's latency too
    http("PATCH", f"{base}/api/v1/streams/lowlat", {"latency_ms": 30}, token=t)
    link = http("POST", f"{base}/api/v1/streams/lowlat/links", {"action": "publish"}, token=t).json()
    assert "latency=30000" in link["srt_url"] and link["srt_url_ms"].endswith("&latency=30")


def test_stream_name_conflicts_and_validation(api_server, world) -> None:
    base = api_server.url
    t = world["tokens"]["dir1"]
    pid = world["prod"]["id"]
    assert http("POST", f"{base}/api/v1/streams", {"name": "cam1", "production": pid}, token=t).status == 409
    for bad in ("", "has space", "a/b", "publish:x", "x" * 65, 5):
        r = http("POST", f"{base}/api/v1/streams", {"name": bad, "production": pid}, token=t)
        assert r.status == 400, bad
        assert set(r.json()) >= {"error", "detail"}
    assert http("POST", f"{base}/api/v1/streams", {"name": "ok2", "production": 99999}, token=t).status == 404
    assert http("POST", f"{base}/api/v1/streams", {"name": "ok2", "production": pid, "pbkeylen": 20},
                token=t).status == 400


def test_literal_names_roundtrip(api_server, admin) -> None:
    base = api_server.url
    for name in ("Robert'); DROP TABLE productions;--", 'Quote "double" \\ back', "Überraschung 🎬 直播",
                 "%s %d {0} $1"):
        r = http("POST", f"{base}/api/v1/productions", {"name": name}, token=admin)
        assert r.status == 201, r.body
        got = http("GET", f"{base}/api/v1/productions/{r.json()['id']}", token=admin).json()
        assert got["name"] == name
    r = http("POST", f"{base}/api/v1/users", {"username": "Zoë'--", "password": "long-password", "role": "viewer"},
             token=admin)
    assert r.status == 201 and r.json()["username"] == "Zoë'--"
    assert login(base, "Zoë'--", "long-password")["user"]["username"] == "Zoë'--"


def test_bad_input_gets_json_errors(api_server, admin) -> None:
    base = api_server.url
    r = http("POST", f"{base}/api/v1/productions", raw=b"{not json", token=admin,
             headers={"Content-Type": "application/json"})
    assert r.status == 400 and r.json()["error"] == "bad_request"
    r = http("POST", f"{base}/api/v1/productions", raw=b"[1,2]", token=admin,
             headers={"Content-Type": "application/json"})
    assert r.status == 400
    r = http("POST", f"{base}/api/v1/productions", {"name": 12}, token=admin)
    assert r.status == 400 and "name" in r.json()["detail"]
    r = http("POST", f"{base}/api/v1/productions", raw=b"name=x", token=admin,
             headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status == 415
    r = http("POST", f"{base}/api/v1/productions", raw=b'{"name": "' + b"x" * 2_000_000 + b'"}', token=admin,
             headers={"Content-Type": "application/json"})
    assert r.status == 413 and r.json()["error"] == "payload_too_large"
    r = http("DELETE", f"{base}/healthz")
    assert r.status == 405 and r.json()["error"] == "method_not_allowed"
    r = http("GET", f"{base}/api/v1/productions/abc", token=admin)
    assert r.status == 404 and r.json()["error"] == "not_found"


def test_signed_links_scope_and_expiry(api_server, world) -> None:
    base = api_server.url
    t = world["tokens"]
    r = http("POST", f"{base}/api/v1/streams/cam1/links", {"action": "read", "ttl_s": 60}, token=t["dir1"])
    assert r.status == 201, r.body
    link = r.json()
    assert "token=" in link["whep_url"]
    # usable as bearer and as ?token=, but only for its stream
    assert http("GET", f"{base}/api/v1/streams/cam1", token=link["token"]).status == 200
    assert http("GET", f"{base}/api/v1/streams/cam1?token={link['token']}").status == 200
    # cannot act as a user
    assert http("GET", f"{base}/api/v1/users", token=link["token"]).status == 401
    assert http("POST", f"{base}/api/v1/streams", {"name": "z", "production": 1}, token=link["token"]).status == 401
    # cameras cannot mint links
    assert http("POST", f"{base}/api/v1/streams/cam1/links", {"action": "read"}, token=t["cam1op"]).status == 403
    # revocation
    assert http("POST", f"{base}/api/v1/links/revoke", {"token": link["token"]}, token=t["dir1"]).status == 204
    assert http("GET", f"{base}/api/v1/streams/cam1", token=link["token"]).status == 401
    # expiry
    r = http("POST", f"{base}/api/v1/streams/cam1/links", {"action": "publish", "ttl_s": 10}, token=t["dir1"])
    short = r.json()
    assert r.status == 201 and "srt_url" in short and "s=" in short["srt_url"]
    bad_ttl = http("POST", f"{base}/api/v1/streams/cam1/links", {"action": "read", "ttl_s": 10**9}, token=t["dir1"])
    assert bad_ttl.status == 400


def test_cors_preflight(api_server) -> None:
    r = http("OPTIONS", f"{api_server.url}/api/v1/streams",
             headers={"Origin": "https://player.example", "Access-Control-Request-Method": "POST"})
    assert r.status == 204
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    assert "Authorization" in r.headers["Access-Control-Allow-Headers"]
    assert "Location" in r.headers["Access-Control-Expose-Headers"]
