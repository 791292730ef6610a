"""Time-limited TURN credentials (issue 14: the "TURN REST API" scheme that
coturn checks with ``use-auth-secret``) and the shape of their config."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from pydantic import ValidationError

from server.config import IceServer, WebRtcSettings
from server.webrtc_http import turn_rest_credentials

SECRET = "north-hall-turn-secret"


def test_credentials_are_hmac_sha1_of_an_expiring_username() -> None:
    username, credential = turn_rest_credentials(SECRET, "cam1", now=1_800_000_000.7, ttl_s=3600)
    assert username == "1800003600:cam1"
    # coturn recomputes exactly this (turn_rest_api: base64(hmac-sha1(secret, username)))
    want = base64.b64encode(hmac.new(SECRET.encode(), b"1800003600:cam1", hashlib.sha1).digest()).decode()
    assert credential == want
    # another moment, another stream: other credentials
    assert turn_rest_credentials(SECRET, "cam1", now=1_800_000_100, ttl_s=3600) != (username, credential)
    assert turn_rest_credentials(SECRET, "cam2", now=1_800_000_000, ttl_s=3600)[0] == "1800003600:cam2"


def test_a_secret_server_is_for_clients_only() -> None:
    w = WebRtcSettings(ice_servers=[
        {"urls": "stun:stun.example.net:3478"},
        {"urls": "turn:a.example.net:3478", "username": "u", "credential": "p"},
        {"urls": "turn:b.example.net:3478", "secret": SECRET, "ttl_s": 600},
    ])
    # the server's own aiortc agent gets exactly RTCIceServer's fields
    assert w.agent_ice_servers() == [{"urls": "stun:stun.example.net:3478"},
                                     {"urls": "turn:a.example.net:3478", "username": "u", "credential": "p"}]


@pytest.mark.parametrize("bad", [
    {"urls": "turn:t.example.net", "secret": SECRET, "username": "u"},       # both kinds
    {"urls": "turn:t.example.net", "secret": SECRET, "credential": "p"},
    {"urls": "stun:s.example.net", "secret": SECRET},                       # STUN needs none
    {"urls": "turn:t.example.net", "secret": "short"},                      # guessable
    {"urls": "turn:t.example.net", "secret": SECRET, "ttl_s": 10},          # shorter than a call setup
    {"urls": "turn:t.example.net", "secret": SECRET, "ttl_s": 30 * 86400},  # a month is not time-limited
])
def test_bad_turn_config_is_refused(bad) -> None:
    with pytest.raises(ValidationError):
        IceServer(**bad)
