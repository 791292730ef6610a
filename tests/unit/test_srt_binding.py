"""ctypes layout of the libsrt binding: fails loudly when srt.h and we disagree.

Two layers of checks:

* numbers taken from libsrt 1.5.1's ``srt.h`` (x86-64/arm64 LP64), always run;
* a tiny C program compiled against the installed ``srt/srt.h`` prints
  ``sizeof``/``offsetof`` of every struct field and every enum constant we
  mirror, compared one by one. Needs ``cc`` and the header package
  (Debian/Ubuntu ``libsrt-gnutls-dev`` or ``libsrt-openssl-dev``).
"""

from __future__ import annotations

import ctypes
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from media.errors import SrtApiError, SrtUnavailable
from media.srt import binding
from media.srt.binding import (
    SRT_EPOLL_EVENT,
    SRT_MSGCTRL,
    SRT_TRACEBSTATS,
    SRT_TRACEBSTATS_FIELDS,
    EpollFlag,
    EpollOpt,
    KmState,
    RejectReason,
    SockOpt,
    SockStatus,
    SrtErrno,
    SrtLibrary,
    decode_sockaddr,
    encode_sockaddr,
    format_peer,
)

LP64 = ctypes.sizeof(ctypes.c_void_p) == 8


# -- numbers from srt.h (libsrt 1.5.1) -------------------------------------


@pytest.mark.skipif(not LP64, reason="offsets below are for LP64 (64-bit Linux/macOS)")
def test_struct_sizes_and_offsets_match_srt_h() -> None:
    assert len(SRT_TRACEBSTATS_FIELDS) == 82
    assert ctypes.sizeof(SRT_TRACEBSTATS) == 496
    expected = {
        "pktRcvLossTotal": 28,
        "pktRecv": 144,
        "pktRcvRetrans": 164,
        "pktRcvBelated": 224,
        "msRTT": 328,
        "mbpsBandwidth": 336,
        "msRcvTsbPdDelay": 392,
        "byteRecvUnique": 488,
    }
    for name, offset in expected.items():
        assert getattr(SRT_TRACEBSTATS, name).offset == offset, name
    assert ctypes.sizeof(SRT_MSGCTRL) == 48
    assert SRT_MSGCTRL.srctime.offset == 16
    assert SRT_MSGCTRL.msgno.offset == 28
    assert SRT_MSGCTRL.grpdata_size.offset == 40
    assert ctypes.sizeof(SRT_EPOLL_EVENT) == 8


def test_constants_match_srt_h() -> None:
    assert SockOpt.RCVLATENCY == 43
    assert SockOpt.PEERLATENCY == 44
    assert SockOpt.LATENCY == 23
    assert SockOpt.PASSPHRASE == 26
    assert SockOpt.PBKEYLEN == 27
    assert SockOpt.KMSTATE == 28
    assert SockOpt.STREAMID == 46
    assert SockOpt.MESSAGEAPI == 48
    assert SockOpt.PAYLOADSIZE == 49
    assert SockOpt.TRANSTYPE == 50
    assert SockOpt.IPV6ONLY == 54
    assert SockOpt.RETRANSMITALGO == 61
    assert (SockOpt.RCVSYN, SockOpt.SNDSYN, SockOpt.RCVBUF, SockOpt.UDP_RCVBUF, SockOpt.REUSEADDR) == (2, 1, 6, 9, 15)
    assert (EpollOpt.IN, EpollOpt.OUT, EpollOpt.ERR, EpollOpt.ET) == (1, 4, 8, 1 << 31)
    assert EpollFlag.ENABLE_EMPTY == 1
    assert (SockStatus.CONNECTED, SockStatus.BROKEN, SockStatus.NONEXIST) == (5, 6, 9)
    assert (SrtErrno.ECONNREJ, SrtErrno.ECONNLOST, SrtErrno.EASYNCSND, SrtErrno.EASYNCRCV) == (1002, 2001, 6001, 6002)
    assert (RejectReason.BADSECRET, RejectReason.UNSECURE, RejectReason.TIMEOUT) == (10, 11, 16)
    assert (binding.SRT_REJC_PREDEFINED, binding.SRT_REJC_USERDEFINED) == (1000, 2000)
    assert (RejectReason.X_FORBIDDEN, RejectReason.X_NOTFOUND, RejectReason.X_CONFLICT) == (1403, 1404, 1409)
    assert KmState.SECURED == 2


# -- compiled against the installed header ---------------------------------

def _srt_header_compiles() -> bool:
    """True when ``cc`` finds ``<srt/srt.h>`` on its default include path."""
    if shutil.which("cc") is None:
        return False
    probe = subprocess.run(
        ["cc", "-fsyntax-only", "-x", "c", "-"],
        input="#include <srt/srt.h>\n#include <srt/access_control.h>\nint main(void){return 0;}\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    return probe.returncode == 0


def _c_enum_name(enum_cls: type, member: str) -> str | None:
    if enum_cls is SockOpt:
        return f"SRTO_{member}"
    if enum_cls is SockStatus:
        return f"SRTS_{member}"
    if enum_cls is SrtErrno:
        return f"SRT_{member}"
    if enum_cls is EpollOpt:
        return None if member == "NONE" else f"SRT_EPOLL_{member}"
    if enum_cls is EpollFlag:
        return f"SRT_EPOLL_{member}"
    if enum_cls is KmState:
        return f"SRT_KM_S_{member}"
    if enum_cls is RejectReason:
        return f"SRT_REJX_{member[2:]}" if member.startswith("X_") else f"SRT_REJ_{member}"
    return None


@pytest.mark.skipif(
    not _srt_header_compiles(),
    reason="needs a C compiler (cc) and srt/srt.h: apt-get install libsrt-gnutls-dev (test-only dependency)",
)
def test_layout_against_compiled_header(tmp_path: Path) -> None:
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <srt/srt.h>", "#include <srt/access_control.h>"]
    lines.append("int main(void) {")
    checks: list[tuple[str, int]] = []

    def emit(label: str, c_expr: str, ours: int) -> None:
        lines.append(f'  printf("%s %lld\\n", "{label}", (long long)({c_expr}));')
        checks.append((label, ours))

    for struct_name, cls in (("SRT_TRACEBSTATS", SRT_TRACEBSTATS), ("SRT_MSGCTRL", SRT_MSGCTRL), ("SRT_EPOLL_EVENT", SRT_EPOLL_EVENT)):
        emit(f"sizeof:{struct_name}", f"sizeof({struct_name})", ctypes.sizeof(cls))
        for field, ctype in cls._fields_:
            emit(f"offset:{struct_name}.{field}", f"offsetof({struct_name}, {field})", getattr(cls, field).offset)
            emit(
                f"size:{struct_name}.{field}",
                f"sizeof((({struct_name}*)0)->{field})",
                ctypes.sizeof(ctype),
            )
    for enum_cls in (SockOpt, SockStatus, SrtErrno, EpollOpt, EpollFlag, KmState, RejectReason):
        for member in enum_cls:
            c_name = _c_enum_name(enum_cls, member.name)
            if c_name is None:
                continue
            # EpollOpt.ET is 1u<<31: compare as unsigned 32-bit
            expr = f"(unsigned int)({c_name})" if enum_cls is EpollOpt else c_name
            emit(f"enum:{c_name}", expr, int(member) & 0xFFFFFFFF if enum_cls is EpollOpt else int(member))
    emit("const:SRT_REJC_PREDEFINED", "SRT_REJC_PREDEFINED", binding.SRT_REJC_PREDEFINED)
    emit("const:SRT_REJC_USERDEFINED", "SRT_REJC_USERDEFINED", binding.SRT_REJC_USERDEFINED)
    emit("const:SRT_REJ_E_SIZE", "SRT_REJ_E_SIZE", binding.SRT_REJ_E_SIZE)
    emit("const:SRT_LIVE_DEF_PLSIZE", "SRT_LIVE_DEF_PLSIZE", binding.SRT_LIVE_DEF_PLSIZE)
    emit("const:SRT_LIVE_MAX_PLSIZE", "SRT_LIVE_MAX_PLSIZE", binding.SRT_LIVE_MAX_PLSIZE)
    lines.append("  return 0;\n}")
    src = tmp_path / "layout.c"
    src.write_text("\n".join(lines))
    exe = tmp_path / "layout"
    subprocess.run(["cc", "-w", "-o", str(exe), str(src)], check=True, capture_output=True, timeout=60)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True, timeout=10).stdout.split("\n")
    got = dict(line.rsplit(" ", 1) for line in out if line)
    mismatches = [(label, ours, int(got[label])) for label, ours in checks if int(got[label]) != ours]
    assert not mismatches, f"binding disagrees with srt.h: {mismatches}"
    assert int(got["sizeof:SRT_TRACEBSTATS"]) == ctypes.sizeof(SRT_TRACEBSTATS)


# -- loading and errors ------------------------------------------------------


def test_unavailable_says_what_to_install() -> None:
    with pytest.raises(SrtUnavailable) as info:
        SrtLibrary.open(candidates=["libsrt-does-not-exist.so.9"])
    text = str(info.value)
    assert "apt-get install libsrt1.5-gnutls" in text
    assert "libsrt1.5-openssl" in text
    assert "brew install srt" in text
    assert "libsrt-does-not-exist.so.9" in text


def test_candidates_in_documented_order() -> None:
    assert binding.LIBRARY_CANDIDATES[:4] == (
        "libsrt.so.1.5",
        "libsrt-gnutls.so.1.5",
        "libsrt-openssl.so.1.5",
        "libsrt.so",
    )


def test_loaded_version(lib: SrtLibrary) -> None:
    assert lib.version >= (1, 5, 0)
    assert lib.version_string.startswith("1.5")


def test_errors_become_srt_api_error(lib: SrtLibrary) -> None:
    with pytest.raises(SrtApiError) as info:
        lib.listen(123456, 5)  # no such socket
    assert info.value.code == SrtErrno.EINVSOCK
    assert info.value.call == "srt_listen"
    assert info.value.text  # srt_getlasterror_str text
    sock = lib.create_socket()
    try:
        with pytest.raises(SrtApiError) as info2:
            lib.setsockflag(sock, SockOpt.PASSPHRASE, "short")  # < 10 chars
        assert info2.value.code == SrtErrno.EINVPARAM
        with pytest.raises(ValueError):
            lib.getsockflag(sock, SockOpt.PASSPHRASE)
    finally:
        lib.close_socket(sock)


def test_socket_options_round_trip(lib: SrtLibrary) -> None:
    sock = lib.create_socket()
    try:
        lib.setsockflag(sock, SockOpt.RCVLATENCY, 20)
        assert lib.getsockflag(sock, SockOpt.RCVLATENCY) == 20
        lib.setsockflag(sock, SockOpt.RCVSYN, False)
        assert lib.getsockflag(sock, SockOpt.RCVSYN) is False
        lib.setsockflag(sock, SockOpt.STREAMID, "publish:cam1")
        assert lib.getsockflag(sock, SockOpt.STREAMID) == "publish:cam1"
        lib.setsockflag(sock, SockOpt.MAXBW, 1_000_000)
        assert lib.getsockflag(sock, SockOpt.MAXBW) == 1_000_000
        assert lib.getsockflag(sock, SockOpt.PAYLOADSIZE) == 1316
        assert lib.getsockstate(sock) == SockStatus.INIT
        lib.bind(sock, "127.0.0.1", 0)
        host, port = lib.getsockname(sock)
        assert host == "127.0.0.1" and port > 0
        assert lib.getsockstate(sock) == SockStatus.OPENED
    finally:
        lib.close_socket(sock)
    assert lib.getsockstate(sock) in (SockStatus.CLOSED, SockStatus.NONEXIST)


def test_reject_reason_text(lib: SrtLibrary) -> None:
    assert "passphrase" in lib.reject_reason_str(RejectReason.BADSECRET).lower()
    assert lib.reject_reason_str(1404)
    assert lib.strerror(SrtErrno.ECONNREJ)


def test_sockaddr_round_trip() -> None:
    for host, port in (("127.0.0.1", 9000), ("0.0.0.0", 0), ("::1", 8890), ("2001:db8::5", 65535)):
        assert decode_sockaddr(encode_sockaddr(host, port)) == (host, port)
    raw4 = encode_sockaddr("10.1.2.3", 8890)
    assert len(raw4) == 16 and raw4[4:8] == socket.inet_aton("10.1.2.3")
    assert len(encode_sockaddr("::1", 1)) == 28
    with pytest.raises(ValueError):
        encode_sockaddr("localhost", 1)
    with pytest.raises(ValueError):
        encode_sockaddr("127.0.0.1", 70000)
    with pytest.raises(ValueError):
        decode_sockaddr(b"\x00")
    assert format_peer("::1", 5) == "[::1]:5"
    assert format_peer("1.2.3.4", 5) == "1.2.3.4:5"


def test_msgctrl_defaults() -> None:
    ctrl = SRT_MSGCTRL()
    ctrl.reset()
    assert (ctrl.msgttl, ctrl.pktseq, ctrl.msgno, ctrl.boundary) == (-1, -1, -1, 0)


def test_no_ctypes_outside_binding() -> None:
    """The whole ctypes surface lives in binding.py."""
    pkg = Path(binding.__file__).parent
    for path in pkg.glob("*.py"):
        if path.name != "binding.py":
            assert "import ctypes" not in path.read_text(), path.name
    assert sys.modules["media.srt.binding"] is binding
