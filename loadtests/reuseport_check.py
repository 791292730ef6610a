"""Does this kernel hand a viewer's datagrams to a socket connected to that
viewer, on the shared ICE port, without letting a socket that is bound but
not yet connected take anybody else's? (The way to keep the viewers' RTCP
off the server process: issue 15, loadtests/README.md "Wake-ups".)

Main's socket: ``SO_REUSEPORT`` and, optionally, a classic BPF reuseport
program that always picks the group's first socket (itself). A second
socket bound to the same port and ``connect()``-ed to peer 1 should get
peer 1's datagrams, main peer 2's; then 20 sockets bound but not
connected (the moment between a worker's ``bind`` and ``connect``) should
take none of peer 2's. Prints what each socket got: bound to the wildcard
address without and with the program, and to one address with it. Linux
only; no privileges needed.

    .venv/bin/python loadtests/reuseport_check.py
"""

from __future__ import annotations

import ctypes
import socket
import struct
import time

SO_ATTACH_REUSEPORT_CBPF = 51  # linux/asm-generic/socket.h
BPF_RET_K = 0x06


def first_socket_program() -> tuple[ctypes.Array, bytes]:
    """A struct sock_fprog of one instruction, ``ret #0`` (the group's
    first socket), and the buffer it points into (keep it alive)."""
    insn = ctypes.create_string_buffer(struct.pack("HBBI", BPF_RET_K, 0, 0, 0))
    return insn, struct.pack("H6xQ", 1, ctypes.addressof(insn))


def bound(port: int = 0, program: bytes | None = None, address: str = "0.0.0.0") -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if program is not None:
        s.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, program)
    s.bind((address, port))
    s.setblocking(False)
    return s


def drain(s: socket.socket) -> int:
    n = 0
    while True:
        try:
            s.recv(2048)
        except BlockingIOError:
            return n
        n += 1


def one(address: str, with_program: bool) -> tuple[int, int, int, int]:
    """(peer 1's datagrams the connected socket got, peer 2's the shared
    socket got, then peer 2's the shared socket got, and the bound but
    unconnected sockets got) of 100, 100, 200."""
    keep, program = first_socket_program()
    shared = bound(0, program if with_program else None, address)
    port = shared.getsockname()[1]
    peers = []
    for _ in range(2):
        p = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        p.bind(("127.0.0.1", 0))
        peers.append(p)
    viewer = bound(port, None, address)
    viewer.connect(peers[0].getsockname())
    for _ in range(100):
        peers[0].sendto(b"1", ("127.0.0.1", port))
        peers[1].sendto(b"2", ("127.0.0.1", port))
    time.sleep(0.02)
    first = drain(viewer), drain(shared)
    unconnected = [bound(port, None, address) for _ in range(20)]
    for _ in range(200):
        peers[1].sendto(b"2", ("127.0.0.1", port))
    time.sleep(0.02)
    second = drain(shared), sum(drain(s) for s in unconnected)
    for s in (*unconnected, viewer, shared, *peers):
        s.close()
    del keep
    return first + second


def main() -> None:
    runs = 10  # each with new peer ports: the kernel's pick among unconnected sockets hashes the flow
    for address, with_program in (("0.0.0.0", False), ("0.0.0.0", True), ("127.0.0.1", False),
                                  ("127.0.0.1", True)):
        got = [one(address, with_program) for _ in range(runs)]
        t = [sum(g[i] for g in got) for i in range(4)]
        print(f"bound to {address}, program {'on ' if with_program else 'off'}: connected socket {t[0]}/{100 * runs} "
              f"of its peer's, shared {t[1]}/{100 * runs} of the other's; with 20 bound, unconnected: "
              f"shared {t[2]}/{200 * runs}, unconnected {t[3]}/{200 * runs}")


if __name__ == "__main__":
    main()
