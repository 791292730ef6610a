"""Who the client is behind a reverse proxy: the one place that turns a
request into the client address (rate limits, caps, audit, logs) and the
scheme the client used (the URLs the API and the QR codes carry).

::

    TCP peer ∉ http.trusted_proxies ──▶ the peer itself; headers ignored
    TCP peer ∈ trusted ──▶ the proxy header's chain, walked from the right:
        X-Forwarded-For: client, proxy1, proxy2   (+ peer = proxy3)
                                  ◀── skip every trusted hop; the first
                                      untrusted one is the client

Walking from the right is what makes it safe: a client can write anything
into the left of the chain, but each trusted proxy appends the address it
saw, so the rightmost address no trusted proxy vouches for is the last one a
client could not forge (RFC 7239 §5.2 keeps the same order: "the first
proxy's for= is the client", later proxies append).

Only one header is read (``http.proxy_header``): a proxy appends to the one
it knows and passes the other through untouched, so reading both would let
a client forge the second. nginx (``$proxy_add_x_forwarded_for``) and Caddy
write ``X-Forwarded-For``; ``Forwarded`` is for proxies configured to write it.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Iterable, Sequence

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from .keys import SETTINGS

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@functools.lru_cache(maxsize=16)
def trusted_networks(cidrs: tuple[str, ...]) -> tuple[IpNetwork, ...]:
    """Parsed once per configuration (validated by server.config)."""
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        addr = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    # An IPv4 client reaching a dual-stack socket is seen as ::ffff:a.b.c.d.
    mapped = getattr(addr, "ipv4_mapped", None)
    return mapped or addr


def is_trusted(address: str, networks: Sequence[IpNetwork]) -> bool:
    addr = _ip(address)
    return addr is not None and any(addr.version == n.version and addr in n for n in networks)


def node_address(node: str) -> str:
    """An RFC 7239 §6 node or an X-Forwarded-For entry without its port:
    ``192.0.2.43:47011``, ``"[2001:db8:cafe::17]:4711"``, ``2001:db8::1``."""
    node = node.strip().strip('"').strip()
    if node.startswith("["):
        return node[1:node.find("]")] if "]" in node else node[1:]
    if node.count(":") == 1:  # IPv4 (or a name) with a port; bare IPv6 has several colons
        return node.split(":", 1)[0]
    return node


def client_from_chain(peer: str, chain: Sequence[str], networks: Sequence[IpNetwork]) -> str:
    """The client address given the TCP peer and the forwarded chain (left:
    nearest the client). Sans-I/O; see the module docstring for the walk."""
    if not networks or not is_trusted(peer, networks):
        return peer
    nearest_trusted = peer
    for hop in reversed([node_address(h) for h in chain if h.strip()]):
        addr = _ip(hop)
        if addr is None:
            # "unknown" or an obfuscated node (RFC 7239 §6.2/§6.3): nothing
            # further left can be believed; the last proxy we trust stands in.
            return nearest_trusted
        if not is_trusted(hop, networks):
            return str(addr)
        nearest_trusted = str(addr)
    return nearest_trusted


def _split(values: Iterable[str]) -> list[str]:
    # Several header lines are one comma-separated list (RFC 9110 §5.3).
    return [part for value in values for part in value.split(",")]


def forwarded_for(headers: "CIMultiDictProxy[str] | CIMultiDict[str]", header: str) -> list[str]:
    """The chain of client addresses in the configured proxy header."""
    if header == "forwarded":
        nodes = []
        for element in _split(headers.getall("Forwarded", [])):
            for pair in element.split(";"):
                name, _, value = pair.strip().partition("=")
                if name.strip().lower() == "for":
                    nodes.append(value)
        return nodes
    return _split(headers.getall("X-Forwarded-For", []))


def _forwarded_proto(request: web.BaseRequest, header: str) -> str | None:
    # The nearest proxy's view: the last value of the list.
    if header == "forwarded":
        protos = [pair.strip().partition("=")[2].strip('"').lower()
                  for element in _split(request.headers.getall("Forwarded", []))
                  for pair in element.split(";") if pair.strip().lower().startswith("proto=")]
    else:
        protos = [p.strip().lower() for p in _split(request.headers.getall("X-Forwarded-Proto", []))]
    return protos[-1] if protos and protos[-1] in ("http", "https") else None


def _peer(request: web.BaseRequest) -> str | None:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return str(peer[0]) if peer else None


def client_address(request: web.BaseRequest) -> str:
    """The client's IP address for rate limits, caps, audit and logs."""
    peer = _peer(request)
    if peer is None:
        return "unknown"
    settings = request.app.get(SETTINGS) if isinstance(request, web.Request) else None
    if settings is None or not settings.http.trusted_proxies:
        return peer
    networks = trusted_networks(tuple(settings.http.trusted_proxies))
    if not is_trusted(peer, networks):
        return peer
    return client_from_chain(peer, forwarded_for(request.headers, settings.http.proxy_header), networks)


def request_scheme(request: web.Request) -> str:
    """``https`` when this connection is TLS, or when a trusted proxy says
    the client used HTTPS (``X-Forwarded-Proto`` or ``Forwarded: proto=``)."""
    if request.secure:
        return "https"
    settings = request.app.get(SETTINGS)
    peer = _peer(request)
    if settings is None or not settings.http.trusted_proxies or peer is None:
        return request.scheme
    if not is_trusted(peer, trusted_networks(tuple(settings.http.trusted_proxies))):
        return request.scheme
    return _forwarded_proto(request, settings.http.proxy_header) or request.scheme
