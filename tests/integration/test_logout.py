"""Logout ends the login everywhere (issue 9, item 14).

A logged-out access token stops working at once on the node that logged it
out and, through NOTIFY, on every other node sharing the database; a
refresh with the logged-out token is a plain 401 "logged out", not a
token-theft alarm.
"""

from __future__ import annotations

import time

import pytest

from helpers import ServerProcess, http, login

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def second_node(api_server, module_db_url, tmp_path_factory) -> ServerProcess:
    srv = ServerProcess(tmp_path_factory.mktemp("node2"), env={"DATABASE_URL": module_db_url})
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def test_logout_invalidates_access_token_and_refresh_is_not_theft(api_server) -> None:
    base = api_server.url
    s = login(base, "admin", api_server.admin_password)
    other = login(base, "admin", api_server.admin_password)
    assert http("GET", f"{base}/api/v1/auth/me", token=s["access_token"]).status == 200
    assert http("POST", f"{base}/api/v1/auth/logout", {"refresh_token": s["refresh_token"]}).status == 204

    r = http("GET", f"{base}/api/v1/auth/me", token=s["access_token"])
    assert r.status == 401 and r.json()["error"] == "unauthorized"
    assert "logged out" in r.json()["detail"]

    r = http("POST", f"{base}/api/v1/auth/refresh", {"refresh_token": s["refresh_token"]})
    assert r.status == 401 and "logged out" in r.json()["detail"]
    assert not [line for line in api_server.output if "auth.refresh_reuse" in line]
    # Another login of the same user is untouched.
    assert http("GET", f"{base}/api/v1/auth/me", token=other["access_token"]).status == 200


def test_access_token_from_before_a_rotation_dies_with_the_logout(api_server) -> None:
    base = api_server.url
    s1 = login(base, "admin", api_server.admin_password)
    s2 = http("POST", f"{base}/api/v1/auth/refresh", {"refresh_token": s1["refresh_token"]}).json()
    assert http("POST", f"{base}/api/v1/auth/logout", {"refresh_token": s2["refresh_token"]}).status == 204
    for token in (s1["access_token"], s2["access_token"]):
        assert http("GET", f"{base}/api/v1/auth/me", token=token).status == 401


def test_rotated_token_replay_is_still_theft(api_server) -> None:
    base = api_server.url
    s1 = login(base, "admin", api_server.admin_password)
    s2 = http("POST", f"{base}/api/v1/auth/refresh", {"refresh_token": s1["refresh_token"]}).json()
    r = http("POST", f"{base}/api/v1/auth/refresh", {"refresh_token": s1["refresh_token"]})
    assert r.status == 401 and "already used" in r.json()["detail"]
    # The theft response ends the login, access token included.
    assert http("GET", f"{base}/api/v1/auth/me", token=s2["access_token"]).status == 401


def test_logout_reaches_other_nodes(api_server, second_node) -> None:
    s = login(api_server.url, "admin", api_server.admin_password)
    assert http("GET", f"{second_node.url}/api/v1/auth/me", token=s["access_token"]).status == 200
    assert http("POST", f"{api_server.url}/api/v1/auth/logout", {"refresh_token": s["refresh_token"]}).status == 204
    # Well under the directory's periodic refresh: only the NOTIFY gets there in time.
    deadline = time.monotonic() + 10.0
    status = 200
    while time.monotonic() < deadline:
        status = http("GET", f"{second_node.url}/api/v1/auth/me", token=s["access_token"]).status
        if status == 401:
            break
        time.sleep(0.05)
    assert status == 401
