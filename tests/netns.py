"""A viewer's network in a Linux network namespace, shaped on demand.

Layout (one veth pair, a private /30 that exists only between its two ends,
the first one in 10.213.0.0/16 that no route of this host covers)::

    root namespace (server, ffmpeg)              namespace rfn-<id> (Chromium)
    ┌──────────────────────────────┐  veth pair  ┌──────────────────────────────┐
    │ rfn-<id>h 10.213.x.y+1/30    │◄───────────►│ rfn-<id>v 10.213.x.y+2/30    │
    │  egress: tc tbf (a queue)    │             │  nft prerouting: policer,    │
    └──────────────────────────────┘             │  random drop (UDP from .1)   │
                                                 └──────────────────────────────┘

Where each impairment lives, and why (measured on this project's machines,
REFERENCES.md "Network emulation"; the kernel has no ``netem``):

* Policer and random loss are nftables rules in the **viewer's** namespace
  (``prerouting``): a drop in the server host's own output path makes
  ``sendmsg`` fail with ``EPERM`` instead of losing the packet, which would
  test the server's error handling, not its reaction to loss.
* The queue is ``tc tbf`` on the **host-side** veth's egress: a namespace's
  ingress cannot hold a tbf. A tbf drop is reported to the sender only on
  sockets with ``IP_RECVERR`` (``ENOBUFS``); the server's UDP sockets do not
  set it, so for them the packet is just lost, as on a real bottleneck
  (checked: 2,200 sends into a full 400 kbit/s tbf, no error).
* ``gso_max_segs 1`` on the host-side veth: the server sends runs of
  equal-size RTP packets as one ``UDP_SEGMENT`` batch, which otherwise
  crosses a veth as one large packet, so nft would count (and drop) a whole
  batch as one packet (checked: 10 batches of 5 → 10 packets seen; with
  ``gso_max_segs 1`` → 50).

Only UDP is shaped: the media path. The page's HTTP (WHEP signalling, API
reads) stays clean, so a scenario measures the layer selection and not a
signalling timeout.

Every object created here is named with the ``rfn-`` prefix; :func:`remove_leftovers`
deletes those of a crashed earlier run, :meth:`ViewerNetwork.destroy` this
run's (it also runs when a test fails: callers use it in a ``finally``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

__all__ = ["CLEAN", "PREFIX", "Shaping", "ViewerNetwork", "free_subnet", "module_network", "netns_unavailable",
           "owner_alive", "remove_leftovers", "run"]

PREFIX = "rfn-"
NFT_TABLE = "rfn_viewer"


def run(*cmd: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command (``ip``, ``nft``, ``tc``); its failure, with stderr, raises when ``check``."""
    proc = subprocess.run(cmd, input=stdin, text=True, capture_output=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def netns_unavailable(tools: tuple[str, ...] = ("ip", "tc", "nft"), prefix: str = PREFIX,
                      probe: Callable[[str], str | None] | None = None) -> str | None:
    """Why namespaces cannot be used here, or ``None`` when they can.
    ``probe`` checks more inside a fresh namespace (it gets its name) and
    says why that fails; tests/natnet.py loads its NAT table there."""
    if os.geteuid() != 0:
        return f"network namespace tests need root (ip netns, {', '.join(t for t in tools if t != 'ip')})"
    for tool in tools:
        if shutil.which(tool) is None:
            return f"{tool} not installed (apt: iproute2, nftables)"
    name = f"{prefix}probe{os.getpid()}"
    made = run("ip", "netns", "add", name, check=False)
    if made.returncode != 0:
        return f"network namespaces unavailable: {made.stderr.strip()}"
    try:
        return probe(name) if probe is not None else None
    finally:
        run("ip", "netns", "del", name, check=False)


def owner_alive(name: str, prefix: str = PREFIX) -> bool:
    """Names end in the creating process's id (``rfn-q1234``, ``rfn-q1234h``;
    tests/natnet.py's ``rfx-1234s``): is that process still running
    (another run of these tests)?"""
    digits = "".join(ch for ch in name[len(prefix):] if ch.isdigit())
    if not digits or int(digits) == os.getpid():
        return False
    try:
        os.kill(int(digits), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers() -> list[str]:
    """Delete the ``rfn-`` namespaces and host-side links of runs whose
    process is gone (a crashed run's); returns what was removed. Deleting a
    namespace removes its veth end, nft table and the pair's host end."""
    removed = []
    for line in run("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(PREFIX) and not owner_alive(name):
            run("ip", "netns", "del", name, check=False)
            removed.append(f"netns {name}")
    for line in run("ip", "-o", "link", "show", check=False).stdout.splitlines():
        parts = line.split(":")
        if len(parts) > 1:
            name = parts[1].strip().split("@")[0]
            if name.startswith(PREFIX) and not owner_alive(name):
                run("ip", "link", "del", name, check=False)
                removed.append(f"link {name}")
    return removed


def free_subnet() -> ipaddress.IPv4Network:
    """A private /30 that no route of this host's namespace covers (others
    on the machine make veth pairs too: a clash would send the server's
    packets to their namespace)."""
    used = []
    for line in run("ip", "-o", "-4", "route", "show", "table", "all", check=False).stdout.splitlines():
        first = line.split()[0] if line.split() else ""
        if first in ("default", "broadcast", "local", "unreachable", "prohibit", "blackhole"):
            first = line.split()[1] if len(line.split()) > 1 else ""
        try:
            used.append(ipaddress.IPv4Network(first, strict=False))
        except ValueError:
            continue
    for candidate in ipaddress.IPv4Network("10.213.0.0/16").subnets(new_prefix=30):
        if not any(candidate.overlaps(u) for u in used if u.prefixlen > 0):
            return candidate
    raise RuntimeError("no free /30 in 10.213.0.0/16")


@dataclass(frozen=True, slots=True)
class Shaping:
    """What the viewer's link does to the server's UDP packets.

    ``police_kbit``: a policer (drops what exceeds the rate once a bucket
    of one second of it is spent; no queue);
    ``loss_pct``: independent random drop; ``queue_kbit``: a tbf bottleneck
    whose queue holds ``queue_ms`` of traffic at that rate (tail drop beyond).
    """

    police_kbit: int | None = None
    loss_pct: int | None = None
    queue_kbit: int | None = None
    queue_ms: int = 200

    @property
    def clean(self) -> bool:
        return self.police_kbit is None and self.loss_pct is None and self.queue_kbit is None

    def describe(self) -> str:
        parts = []
        if self.police_kbit is not None:
            parts.append(f"policer {self.police_kbit} kbit/s")
        if self.loss_pct is not None:
            parts.append(f"{self.loss_pct} % random loss")
        if self.queue_kbit is not None:
            parts.append(f"tbf queue {self.queue_kbit} kbit/s ({self.queue_ms} ms)")
        return ", ".join(parts) or "clean"


CLEAN = Shaping()


@dataclass(slots=True)
class ViewerNetwork:
    """One namespace + veth pair; ``create`` it, ``shape`` it, ``destroy`` it."""

    tag: str
    namespace: str = field(init=False)
    host_if: str = field(init=False)
    ns_if: str = field(init=False)
    subnet: str = field(init=False, default="")  # the /30 chosen by create()
    host_addr: str = field(init=False, default="")
    ns_addr: str = field(init=False, default="")
    current: Shaping = field(init=False, default=CLEAN)

    @classmethod
    def for_this_process(cls) -> "ViewerNetwork":
        """Named after this process, so a concurrent run's cleanup leaves it alone."""
        return cls(f"q{os.getpid()}")

    def __post_init__(self) -> None:
        # Interface names are at most 15 bytes (IFNAMSIZ - 1).
        if len(PREFIX + self.tag) + 1 > 15:
            raise ValueError("tag too long for an interface name")
        self.namespace = PREFIX + self.tag
        self.host_if = PREFIX + self.tag + "h"
        self.ns_if = PREFIX + self.tag + "v"

    def create(self) -> "ViewerNetwork":
        subnet = free_subnet()
        self.subnet = str(subnet)
        self.host_addr, self.ns_addr = (str(a) for a in subnet.hosts())
        ns, h, v = self.namespace, self.host_if, self.ns_if
        run("ip", "netns", "add", ns)
        run("ip", "link", "add", h, "type", "veth", "peer", "name", v)
        run("ip", "link", "set", v, "netns", ns)
        run("ip", "link", "set", h, "gso_max_segs", "1")
        run("ip", "addr", "add", f"{self.host_addr}/30", "dev", h)
        run("ip", "link", "set", h, "up")
        run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "-n", ns, "addr", "add", f"{self.ns_addr}/30", "dev", v)
        run("ip", "-n", ns, "link", "set", v, "up")
        details = run("ip", "-d", "link", "show", h).stdout
        if "gso_max_segs 1 " not in details:
            raise RuntimeError(f"gso_max_segs 1 did not stick on {h}: {details}")
        self.shape(CLEAN)
        return self

    def destroy(self) -> None:
        """Remove the namespace (its veth end, nft table) and the host end
        (its qdisc); safe to call twice or after a partial ``create``."""
        run("ip", "netns", "del", self.namespace, check=False)
        run("ip", "link", "del", self.host_if, check=False)

    def exists(self) -> bool:
        names = [line.split()[0] for line in run("ip", "netns", "list").stdout.splitlines() if line.split()]
        links = run("ip", "-o", "link", "show").stdout
        return self.namespace in names or f" {self.host_if}@" in links or f" {self.host_if}:" in links

    # -- shaping ---------------------------------------------------------------------

    def shape(self, shaping: Shaping) -> None:
        """Replace whatever shaping is in place with ``shaping`` (one nft
        transaction, one qdisc replace)."""
        rules = []
        match = f"ip saddr {self.host_addr} meta l4proto udp"
        if shaping.loss_pct is not None:
            rules.append(f"{match} numgen random mod 100 < {shaping.loss_pct} counter drop")
        if shaping.police_kbit is not None:
            # In bytes (nft's "kbytes" are 1,024). The bucket holds one second
            # of the rate whatever the burst (measured: 152 kB through 400
            # kbit/s in 2 s), so the first second of congestion passes more.
            rate = shaping.police_kbit * 1000 // 8
            rules.append(f"{match} limit rate over {rate} bytes/second counter drop")
        body = "\n".join(f"    {r}" for r in rules)
        script = (f"table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n"
                  f"table inet {NFT_TABLE} {{\n  chain pre {{\n"
                  f"    type filter hook prerouting priority -300; policy accept;\n{body}\n  }}\n}}\n")
        run("ip", "netns", "exec", self.namespace, "nft", "-f", "-", stdin=script)
        if shaping.queue_kbit is not None:
            # tbf's limit counts the burst too: queue_ms of backlog on top of it.
            limit = 3000 + shaping.queue_kbit * 1000 // 8 * shaping.queue_ms // 1000
            run("tc", "qdisc", "replace", "dev", self.host_if, "root", "tbf", "rate", f"{shaping.queue_kbit}kbit",
                 "burst", "3000", "limit", str(limit))
        else:
            run("tc", "qdisc", "del", "dev", self.host_if, "root", check=False)
        self.current = shaping

    def drops(self) -> dict[str, int]:
        """Packets dropped so far by the current nft rules and the tbf."""
        out: dict[str, int] = {}
        nft = run("ip", "netns", "exec", self.namespace, "nft", "list", "table", "inet", NFT_TABLE,
                   check=False).stdout
        for line in nft.splitlines():
            if "counter packets" in line:
                kind = "loss" if "numgen" in line else "policer"
                out[kind] = int(line.split("counter packets")[1].split()[0])
        tc = run("tc", "-s", "qdisc", "show", "dev", self.host_if, check=False).stdout
        if "tbf" in tc and "dropped" in tc:
            out["queue"] = int(tc.split("dropped")[1].split(",")[0])
        return out

    def tx_bytes(self) -> int:
        """Bytes the host side has sent into the namespace (all protocols)."""
        return int(Path(f"/sys/class/net/{self.host_if}/statistics/tx_bytes").read_text())

    # -- programs inside -------------------------------------------------------------

    def wrapper(self, directory: Path, program: str) -> Path:
        """An executable that runs ``program`` inside the namespace (for
        Playwright's ``executable_path``: it talks to the browser over a
        pipe, which crosses namespaces)."""
        path = directory / f"{self.namespace}-{Path(program).name}"
        path.write_text(f'#!/bin/sh\nexec ip netns exec {self.namespace} {program} "$@"\n')
        path.chmod(0o755)
        return path


@contextlib.contextmanager
def module_network(net: Any, unavailable: Callable[[], str | None] = netns_unavailable,
                   leftovers: Callable[[], list[str]] = remove_leftovers) -> Iterator[Any]:
    """A module fixture's network (a :class:`ViewerNetwork`, or a
    tests/natnet.py ``NatNetwork`` with that module's ``unavailable`` and
    ``leftovers``): skipped where namespaces cannot be made, a crashed run's
    leftovers removed first, ``net`` created, and destroyed on exit, also
    after a failure; that it is gone is asserted."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    removed = leftovers()
    if removed:
        print(f"removed leftovers of an earlier run: {removed}")
    try:
        yield net.create()
    finally:
        net.destroy()
        assert not net.exists(), f"{net} still present after cleanup"
