"""server.proxy: the client address behind trusted reverse proxies, walked
from the right (module docstring), and the scheme a trusted proxy reports."""

from __future__ import annotations

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from server.config import Settings
from server.keys import SETTINGS
from server.proxy import client_address, client_from_chain, forwarded_for, node_address, request_scheme, trusted_networks

NETS = trusted_networks(("10.0.0.0/8", "2001:db8:1::/48"))


def test_untrusted_peer_ignores_the_chain() -> None:
    assert client_from_chain("198.51.100.1", ["203.0.113.9"], NETS) == "198.51.100.1"
    assert client_from_chain("198.51.100.1", ["203.0.113.9"], ()) == "198.51.100.1"


def test_walk_from_the_right_skips_trusted_hops() -> None:
    # A client that writes its own X-Forwarded-For gets it prepended to, never believed.
    assert client_from_chain("10.0.0.2", ["1.2.3.4", "203.0.113.9", "10.0.0.7"], NETS) == "203.0.113.9"
    assert client_from_chain("10.0.0.2", ["203.0.113.9"], NETS) == "203.0.113.9"
    # Every hop trusted: the leftmost one is the client (an internal caller).
    assert client_from_chain("10.0.0.2", ["10.1.1.1", "10.0.0.7"], NETS) == "10.1.1.1"
    # No header from a trusted peer: the peer is the client.
    assert client_from_chain("10.0.0.2", [], NETS) == "10.0.0.2"


def test_unusable_hop_stops_the_walk_at_the_last_trusted() -> None:
    # RFC 7239 §6.2/6.3: "unknown" and obfuscated nodes carry no address.
    assert client_from_chain("10.0.0.2", ["203.0.113.9", "unknown", "10.0.0.7"], NETS) == "10.0.0.7"
    assert client_from_chain("10.0.0.2", ["_hidden"], NETS) == "10.0.0.2"


def test_ipv6_and_mapped_addresses() -> None:
    assert client_from_chain("2001:db8:1::5", ['"[2001:db8:cafe::17]:4711"'], NETS) == "2001:db8:cafe::17"
    assert client_from_chain("::ffff:10.0.0.2", ["203.0.113.9"], NETS) == "203.0.113.9"


@pytest.mark.parametrize("node, address", [
    ("192.0.2.43", "192.0.2.43"), ("192.0.2.43:47011", "192.0.2.43"), ('"[2001:db8::1]:4711"', "2001:db8::1"),
    ("2001:db8::1", "2001:db8::1"), (' "[2001:db8::2]" ', "2001:db8::2"), ("unknown", "unknown"),
])
def test_node_address(node: str, address: str) -> None:
    assert node_address(node) == address


def test_forwarded_header_parsing() -> None:
    # RFC 7239 §4 examples: several elements, several lines, parameters in any order.
    headers = CIMultiDict([("Forwarded", 'for=192.0.2.60;proto=http;by=203.0.113.43'),
                           ("Forwarded", 'For="[2001:db8:cafe::17]:4711", for=10.0.0.7'),
                           ("X-Forwarded-For", "6.6.6.6")])
    assert forwarded_for(headers, "forwarded") == ["192.0.2.60", '"[2001:db8:cafe::17]:4711"', "10.0.0.7"]
    assert forwarded_for(headers, "x-forwarded-for") == ["6.6.6.6"]


def _request(peer: str, headers: dict[str, str], **http: object) -> web.Request:
    app = web.Application()
    app[SETTINGS] = Settings.model_validate({"http": http})

    class Transport:
        def get_extra_info(self, name: str, default: object = None) -> object:
            return (peer, 40000) if name == "peername" else default

    return make_mocked_request("GET", "/", headers=headers, app=app, transport=Transport())


def test_client_address_and_scheme_from_a_request() -> None:
    trusted = {"trusted_proxies": ["10.0.0.0/8"]}
    spoof = {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"}
    assert client_address(_request("10.0.0.2", spoof, **trusted)) == "203.0.113.9"
    assert request_scheme(_request("10.0.0.2", spoof, **trusted)) == "https"
    assert client_address(_request("198.51.100.1", spoof, **trusted)) == "198.51.100.1"
    assert request_scheme(_request("198.51.100.1", spoof, **trusted)) == "http"
    assert client_address(_request("10.0.0.2", spoof)) == "10.0.0.2"  # nothing trusted by default
    # Only the configured header is read: a proxy that writes Forwarded passes
    # a client's X-Forwarded-For through untouched.
    both = {"Forwarded": "for=203.0.113.5;proto=https", "X-Forwarded-For": "6.6.6.6"}
    fwd = {**trusted, "proxy_header": "forwarded"}
    assert client_address(_request("10.0.0.2", both, **fwd)) == "203.0.113.5"
    assert request_scheme(_request("10.0.0.2", both, **fwd)) == "https"


def test_trusted_proxies_must_be_networks() -> None:
    from server.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match="trusted_proxies"):
        load_settings(None, {"http.trusted_proxies": ["10.0.0.0/8", "not-a-network"]}, environ={})
    s = load_settings(None, environ={"RETURNFEED_HTTP__TRUSTED_PROXIES": "10.0.0.0/8, 192.168.1.1"})
    assert s.http.trusted_proxies == ["10.0.0.0/8", "192.168.1.1"]


def test_one_place_reads_the_peer_address() -> None:
    """Every client address in server/ comes from server.proxy; only the
    connection guard reads the TCP peer itself (it runs before any header
    exists, and asks server.proxy whether that peer is a trusted proxy)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "server"
    readers = {str(p.relative_to(root)) for p in root.rglob("*.py")
               if re.search(r"peername|request\.remote\b|\.remote\s*\)", p.read_text())}
    assert readers == {"proxy.py", "http_guard.py"}
