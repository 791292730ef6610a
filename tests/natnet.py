"""A server behind a NAT, and a client on the "public" side: three Linux
network namespaces wired like a small office router or a cloud instance
with a 1:1 public address.

Layout (nothing of it is in the host's own namespace: the three are joined
only to each other, so the fixed addresses below cannot clash with this
machine's routes or with another run's namespaces)::

    rfx-<pid>s (server)          rfx-<pid>n (NAT)                      rfx-<pid>c (client)
    ┌───────────────────┐  veth  ┌──────────────────────────────┐  veth  ┌──────────────────┐
    │ eth0 10.77.0.2/24 │◄──────►│ in0 10.77.0.1/24             │        │ Chromium, ffmpeg │
    │ default via .1    │        │ pub0 203.0.113.1/24 ◄────────┼───────►│ eth0 203.0.113.2 │
    └───────────────────┘        │ masquerade out, DNAT of the  │        │ (no route to 10/8)│
                                 │ published ports, drop others │        └──────────────────┘
                                 └──────────────────────────────┘

* **server**: only the private address; its default route is the NAT, so
  what it sends to the client leaves masqueraded as ``203.0.113.1``.
* **nat**: forwards between its two legs; ``nat prerouting`` DNATs exactly
  the published (protocol, port) pairs arriving on ``pub0`` for its public
  address to the server, the same port on both sides (as ``docker run -p
  8189:8189/udp`` does: the announced ICE candidate carries the server's own
  port); ``filter forward`` (policy drop) lets through what the server opened
  (conntrack ``established,related``) and new connections that were DNATed,
  and counts the rest as dropped — "every other inbound port". The NAT's own
  input takes nothing from ``pub0``.
* **client**: one address in 203.0.113.0/24 (TEST-NET-3, RFC 5737: a
  "public" address that cannot leak anywhere) and no other route, so the
  server's private address is unreachable from it: whatever works, works
  through the NAT's public address.

:meth:`NatNetwork.block_udp` drops all UDP on the client–NAT link (both
directions, before conntrack and NAT), for ICE-TCP.

Running programs inside:

* a subprocess: :meth:`NatNetwork.command` prefixes ``ip netns exec``;
* Python code of the test process (API calls through the NAT, or starting
  ``tests/helpers.ServerProcess`` so its child lands in the server
  namespace): :meth:`NatNetwork.call` runs a function in a fresh thread
  that has joined the namespace with ``setns(2)`` (a network namespace is
  per thread; sockets and children a thread makes belong to the namespace
  it is in at that moment — the rest of the test process is unaffected);
* Chromium under Playwright: :meth:`NatNetwork.wrapper` writes an
  executable that ``exec``\\s the browser inside the client namespace.
  Playwright talks to the browser over a pipe (``--remote-debugging-pipe``),
  which crosses namespaces; a CDP port would not (it would listen inside the
  client namespace, unreachable from the test process).

Every object here is named with the ``rfx-`` prefix (tests/netns.py uses
``rfn-``) and ends in the creating process's id; :func:`remove_leftovers`
deletes those of runs whose process is gone, :meth:`NatNetwork.destroy`
this run's (callers put it in a ``finally``). Deleting a namespace deletes
its veth ends and nft tables with it, so there is nothing else to remove.
"""

from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import netns
from netns import owner_alive, run

__all__ = ["CLIENT_ADDR", "NAT_INSIDE_ADDR", "PREFIX", "PUBLIC_ADDR", "SERVER_ADDR", "NatNetwork", "Published",
           "netns_unavailable", "remove_leftovers"]

PREFIX = "rfx-"
NFT_TABLE = "rfx_nat"
NFT_BLOCK_TABLE = "rfx_block"
SERVER_ADDR = "10.77.0.2"
NAT_INSIDE_ADDR = "10.77.0.1"
INSIDE_PREFIX = 24
PUBLIC_ADDR = "203.0.113.1"  # the NAT's public address: what the server announces
CLIENT_ADDR = "203.0.113.2"
PUBLIC_PREFIX = 24
CLONE_NEWNET = 0x40000000  # <sched.h>

T = TypeVar("T")


def netns_unavailable() -> str | None:
    """Why these namespaces cannot be made here, or ``None`` when they can
    (including the NAT: a masquerade table is loaded in a probe namespace)."""

    def nat(probe: str) -> str | None:
        loaded = run("ip", "netns", "exec", probe, "nft", "-f", "-", check=False,
                     stdin="table ip probe {\n chain post {\n  type nat hook postrouting priority srcnat;\n"
                           "  masquerade\n }\n}\n")
        return f"nftables NAT unavailable: {loaded.stderr.strip()}" if loaded.returncode != 0 else None

    return netns.netns_unavailable(("ip", "nft"), PREFIX, nat)


def _namespaces() -> list[str]:
    return [line.split()[0] for line in run("ip", "netns", "list", check=False).stdout.splitlines() if line.split()]


def remove_leftovers() -> list[str]:
    """Delete the ``rfx-`` namespaces of runs whose process is gone (this
    process's own too: a fixture of this run that did not finish); returns
    their names."""
    removed = []
    for name in _namespaces():
        if name.startswith(PREFIX) and not owner_alive(name, PREFIX):
            run("ip", "netns", "del", name, check=False)
            removed.append(name)
    return removed


def _setns(namespace: str) -> None:
    """Move the calling thread (only it) into a named network namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {namespace}: {os.strerror(err)}")
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class Published:
    """A port the NAT forwards to the server (same number on both sides)."""

    proto: str  # "tcp" | "udp"
    port: int

    def __post_init__(self) -> None:
        if self.proto not in ("tcp", "udp") or not 0 < self.port < 65536:
            raise ValueError(f"bad published port {self.proto}/{self.port}")


@dataclass(slots=True)
class NatNetwork:
    """The three namespaces; ``create`` them, ``destroy`` them."""

    tag: str
    published: tuple[Published, ...]
    server: str = field(init=False)
    nat: str = field(init=False)
    client: str = field(init=False)
    udp_blocked: bool = field(init=False, default=False)

    @classmethod
    def for_this_process(cls, published: Iterable[Published]) -> "NatNetwork":
        """Named after this process, so a concurrent run's cleanup leaves it alone."""
        return cls(str(os.getpid()), tuple(published))

    def __post_init__(self) -> None:
        self.server = f"{PREFIX}{self.tag}s"
        self.nat = f"{PREFIX}{self.tag}n"
        self.client = f"{PREFIX}{self.tag}c"

    @property
    def namespaces(self) -> tuple[str, str, str]:
        return self.server, self.nat, self.client

    # -- lifecycle -------------------------------------------------------------------

    def create(self) -> "NatNetwork":
        """Build the namespaces, links, routes and NAT rules (a failure half
        way leaves only namespaces, which :meth:`destroy` removes)."""
        s, n, c = self.namespaces
        for ns in self.namespaces:
            run("ip", "netns", "add", ns)
            run("ip", "-n", ns, "link", "set", "lo", "up")
        # Both veth pairs are made inside the NAT namespace with their peer
        # end moved straight into its neighbour: no interface ever exists in
        # the host's namespace, so nothing can be left behind there.
        run("ip", "-n", n, "link", "add", "in0", "type", "veth", "peer", "name", "eth0", "netns", s)
        run("ip", "-n", n, "link", "add", "pub0", "type", "veth", "peer", "name", "eth0", "netns", c)
        run("ip", "-n", n, "addr", "add", f"{NAT_INSIDE_ADDR}/{INSIDE_PREFIX}", "dev", "in0")
        run("ip", "-n", n, "addr", "add", f"{PUBLIC_ADDR}/{PUBLIC_PREFIX}", "dev", "pub0")
        run("ip", "-n", s, "addr", "add", f"{SERVER_ADDR}/{INSIDE_PREFIX}", "dev", "eth0")
        run("ip", "-n", c, "addr", "add", f"{CLIENT_ADDR}/{PUBLIC_PREFIX}", "dev", "eth0")
        for ns, dev in ((n, "in0"), (n, "pub0"), (s, "eth0"), (c, "eth0")):
            run("ip", "-n", ns, "link", "set", dev, "up")
        run("ip", "-n", s, "route", "add", "default", "via", NAT_INSIDE_ADDR)
        run("ip", "netns", "exec", n, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        run("ip", "netns", "exec", n, "nft", "-f", "-", stdin=self._nat_rules())
        return self

    def destroy(self) -> None:
        """Remove the three namespaces (and with them every link and rule);
        safe to call twice or after a partial :meth:`create`."""
        for ns in self.namespaces:
            run("ip", "netns", "del", ns, check=False)

    def exists(self) -> bool:
        present = _namespaces()
        return any(ns in present for ns in self.namespaces)

    # -- rules -----------------------------------------------------------------------

    def _nat_rules(self) -> str:
        by_proto: dict[str, list[int]] = {"tcp": [], "udp": []}
        for p in self.published:
            by_proto[p.proto].append(p.port)
        dnat = []
        accept = []
        for proto, ports in by_proto.items():
            if ports:
                ports_set = "{ " + ", ".join(str(p) for p in sorted(set(ports))) + " }"
                dnat.append(f'iifname "pub0" ip daddr {PUBLIC_ADDR} {proto} dport {ports_set} '
                            f"counter dnat to {SERVER_ADDR}")
                accept.append(f'iifname "pub0" oifname "in0" ip daddr {SERVER_ADDR} {proto} dport {ports_set} '
                              "ct status dnat accept")
        body_dnat = "\n".join(f"    {r}" for r in dnat)
        body_accept = "\n".join(f"    {r}" for r in accept)
        return (
            f"table ip {NFT_TABLE} {{\n"
            "  chain prerouting {\n    type nat hook prerouting priority dstnat; policy accept;\n"
            f"{body_dnat}\n  }}\n"
            "  chain postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n"
            f'    oifname "pub0" ip saddr 10.77.0.0/{INSIDE_PREFIX} masquerade\n  }}\n'
            "  chain forward {\n    type filter hook forward priority filter; policy drop;\n"
            "    ct state established,related accept\n"
            '    iifname "in0" oifname "pub0" accept\n'
            f"{body_accept}\n"
            "    counter drop comment \"inbound-dropped\"\n  }\n"
            "  chain input {\n    type filter hook input priority filter; policy accept;\n"
            '    iifname "pub0" ct state established,related accept\n'
            '    iifname "pub0" counter drop comment "input-dropped"\n  }\n'
            "}\n")

    def block_udp(self, blocked: bool) -> None:
        """Drop every UDP packet on the client–NAT link (both directions),
        or stop doing so. ``raw`` priority: before conntrack and NAT, so no
        mapping is made for a packet that is dropped."""
        script = f"table inet {NFT_BLOCK_TABLE}\ndelete table inet {NFT_BLOCK_TABLE}\n"
        if blocked:
            script += (f"table inet {NFT_BLOCK_TABLE} {{\n"
                       "  chain pre {\n    type filter hook prerouting priority raw; policy accept;\n"
                       '    iifname "pub0" meta l4proto udp counter drop comment "udp-in"\n  }\n'
                       "  chain out {\n    type filter hook postrouting priority raw; policy accept;\n"
                       '    oifname "pub0" meta l4proto udp counter drop comment "udp-out"\n  }\n'
                       "}\n")
        run("ip", "netns", "exec", self.nat, "nft", "-f", "-", stdin=script)
        self.udp_blocked = blocked

    def counters(self) -> dict[str, int]:
        """Packets counted so far by the NAT's rules: ``dnat-tcp``,
        ``dnat-udp`` (connections DNATed: nat chains see a connection's first
        packet only), ``inbound-dropped``, ``input-dropped``, and ``udp-in`` /
        ``udp-out`` while UDP is blocked."""
        out: dict[str, int] = {}
        text = run("ip", "netns", "exec", self.nat, "nft", "list", "ruleset").stdout
        for line in text.splitlines():
            if "counter packets" not in line:
                continue
            packets = int(line.split("counter packets")[1].split()[0])
            if "comment" in line:
                out[line.split('comment "')[1].split('"')[0]] = packets
            elif " dnat to " in line:
                proto = "tcp" if " tcp dport " in line else "udp"
                out[f"dnat-{proto}"] = out.get(f"dnat-{proto}", 0) + packets
        return out

    # -- programs inside -------------------------------------------------------------

    @staticmethod
    def command(namespace: str, argv: list[str]) -> list[str]:
        """``argv`` run inside ``namespace``."""
        return ["ip", "netns", "exec", namespace, *argv]

    @staticmethod
    def call(namespace: str, fn: Callable[[], T], timeout: float | None = None) -> T:
        """Run ``fn`` in a fresh thread inside ``namespace`` and return its
        result (its exception is re-raised here). Sockets it opens and
        processes it starts belong to that namespace, also after it returns."""
        out: dict[str, Any] = {}

        def target() -> None:
            try:
                _setns(namespace)
                out["value"] = fn()
            except BaseException as exc:  # re-raised in the caller
                out["error"] = exc

        thread = threading.Thread(target=target, name=f"in-{namespace}", daemon=True)
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            raise TimeoutError(f"call inside {namespace} did not finish in {timeout} s")
        if "error" in out:
            raise out["error"]
        return out.get("value")  # type: ignore[return-value]

    def wrapper(self, directory: Path, namespace: str, program: str) -> Path:
        """An executable that runs ``program`` inside ``namespace`` (for
        Playwright's ``executable_path``)."""
        path = directory / f"{namespace}-{Path(program).name}"
        path.write_text(f'#!/bin/sh\nexec ip netns exec {namespace} {program} "$@"\n')
        path.chmod(0o755)
        return path
