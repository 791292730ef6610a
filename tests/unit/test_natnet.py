"""tests/natnet.py, the NAT namespaces of tests/e2e/test_nat.py: the rules
it renders, and that nothing of a failed or crashed run stays behind (the
latter needs root, as the e2e test does)."""

from __future__ import annotations

import os
import subprocess

import pytest

from natnet import PREFIX, PUBLIC_ADDR, SERVER_ADDR, NatNetwork, Published, netns_unavailable, remove_leftovers


def _dead_pid() -> int:
    for pid in range(4_000_000, 3_000_000, -1):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            continue
    raise RuntimeError("no free pid found")


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.split()}


def test_only_the_published_ports_are_forwarded() -> None:
    net = NatNetwork("1", (Published("tcp", 8443), Published("udp", 8189), Published("tcp", 8189),
                           Published("udp", 8890)))
    rules = net._nat_rules()
    assert f'ip daddr {PUBLIC_ADDR} tcp dport {{ 8189, 8443 }} counter dnat to {SERVER_ADDR}' in rules
    assert f'ip daddr {PUBLIC_ADDR} udp dport {{ 8189, 8890 }} counter dnat to {SERVER_ADDR}' in rules
    # Forwarded inbound only when DNATed to a published port; everything else is counted and dropped.
    assert "policy drop;" in rules and 'counter drop comment "inbound-dropped"' in rules
    assert rules.count("ct status dnat accept") == 2


def test_names_carry_the_prefix_and_the_owner() -> None:
    net = NatNetwork.for_this_process([Published("udp", 8189)])
    assert net.namespaces == (f"{PREFIX}{os.getpid()}s", f"{PREFIX}{os.getpid()}n", f"{PREFIX}{os.getpid()}c")
    assert PREFIX != "rfn-"  # tests/netns.py's: neither run's cleanup touches the other's


@pytest.mark.parametrize("proto, port", [("sctp", 1), ("udp", 0), ("tcp", 65536)])
def test_a_bad_published_port_is_refused(proto: str, port: int) -> None:
    with pytest.raises(ValueError):
        Published(proto, port)


@pytest.fixture
def root_netns() -> None:
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)


def test_a_create_that_fails_half_way_leaves_nothing_after_destroy(root_netns: None) -> None:
    net = NatNetwork(f"{os.getpid()}f", (Published("udp", 8189),))
    # The NAT namespace exists already: create() makes the server's, then fails.
    subprocess.run(["ip", "netns", "add", net.nat], check=True)
    try:
        with pytest.raises(RuntimeError, match=net.nat):
            net.create()
        assert net.server in _namespaces()
    finally:
        net.destroy()
    assert not net.exists()


def test_leftovers_of_a_crashed_run_are_removed(root_netns: None) -> None:
    crashed = NatNetwork(str(_dead_pid()), (Published("udp", 8189),))
    try:
        crashed.create()
        removed = remove_leftovers()
        assert set(crashed.namespaces) <= set(removed), removed
        assert not crashed.exists()
    finally:
        crashed.destroy()
