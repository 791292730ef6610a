"""ctypes binding to the system libsrt (1.5.x): the whole C surface in one module.

Nothing outside this module touches ``ctypes`` for SRT. What lives here:

* loading the shared library (``libsrt.so.1.5``, ``libsrt-gnutls.so.1.5``,
  ``libsrt-openssl.so.1.5``, ``libsrt.so``; on macOS ``libsrt.1.5.dylib`` /
  ``libsrt.dylib``), raising :class:`~media.errors.SrtUnavailable` with an
  install hint when none loads;
* the C prototypes (``argtypes``/``restype`` for every function we call);
* the structs ``SRT_MSGCTRL``, ``SRT_EPOLL_EVENT`` and ``SRT_TRACEBSTATS``
  (``struct CBytePerfMon``), laid out exactly as in libsrt 1.5.1 ``srt.h``;
* the constants of ``srt.h`` / ``access_control.h`` as IntEnums;
* thin Python wrappers that translate a ``-1`` return into
  :class:`~media.errors.SrtApiError` carrying ``srt_getlasterror`` and
  ``srt_getlasterror_str``.

libsrt keeps its last error in thread-local storage, so a wrapper reads the
error on the thread that made the failing call, right after it.

Hot paths (the epoll thread's receive loop, the non-blocking send) call the
raw prototyped functions on :attr:`SrtLibrary.c` directly and inspect the
error number themselves; everything else goes through the wrappers.

``ctypes.CDLL`` releases the GIL for the duration of every foreign call, so a
thread blocked in ``srt_epoll_uwait`` does not stall the event loop, and a
libsrt thread running our listen callback can always take the GIL.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import enum
import socket
import struct
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Final

from media.errors import SrtApiError, SrtUnavailable

__all__ = [
    "INSTALL_HINT",
    "LIBRARY_CANDIDATES",
    "LISTEN_CALLBACK",
    "SRT_ERROR",
    "SRT_INVALID_SOCK",
    "SRT_LIVE_DEF_PLSIZE",
    "SRT_LIVE_MAX_PLSIZE",
    "SRT_MAX_STREAMID_LEN",
    "SRT_REJC_PREDEFINED",
    "SRT_REJC_USERDEFINED",
    "SRT_MSGCTRL",
    "SRT_EPOLL_EVENT",
    "SRT_TRACEBSTATS",
    "SRT_TRACEBSTATS_FIELDS",
    "EpollFlag",
    "EpollReader",
    "EpollOpt",
    "KmState",
    "LogLevel",
    "RejectReason",
    "SockOpt",
    "SockStatus",
    "SrtErrno",
    "SrtLibrary",
    "TransType",
    "decode_sockaddr",
    "encode_sockaddr",
    "format_peer",
    "read_c_string",
    "sockaddr_from_pointer",
]

# --------------------------------------------------------------------------
# Constants (srt.h / access_control.h / logging_api.h of libsrt 1.5.1)
# --------------------------------------------------------------------------

SRT_INVALID_SOCK: Final = -1
SRT_ERROR: Final = -1
#: srt.h: "SRT_LIVE_DEF_PLSIZE = 1316; // = 188*7, recommended for MPEG TS"
SRT_LIVE_DEF_PLSIZE: Final = 1316
#: srt.h: "SRT_LIVE_MAX_PLSIZE = 1456; // MTU(1500) - UDP.hdr(28) - SRT.hdr(16)"
SRT_LIVE_MAX_PLSIZE: Final = 1456
#: srt.h / access-control.md: a Stream ID is at most 512 characters.
SRT_MAX_STREAMID_LEN: Final = 512


class SockStatus(enum.IntEnum):
    """``SRT_SOCKSTATUS`` (srt.h), returned by ``srt_getsockstate``."""

    INIT = 1
    OPENED = 2
    LISTENING = 3
    CONNECTING = 4
    CONNECTED = 5
    BROKEN = 6
    CLOSING = 7
    CLOSED = 8
    NONEXIST = 9


class SockOpt(enum.IntEnum):
    """``SRT_SOCKOPT`` (srt.h): the ``SRTO_*`` option numbers."""

    MSS = 0
    SNDSYN = 1
    RCVSYN = 2
    ISN = 3
    FC = 4
    SNDBUF = 5
    RCVBUF = 6
    LINGER = 7
    UDP_SNDBUF = 8
    UDP_RCVBUF = 9
    RENDEZVOUS = 12
    SNDTIMEO = 13
    RCVTIMEO = 14
    REUSEADDR = 15
    MAXBW = 16
    STATE = 17
    EVENT = 18
    SNDDATA = 19
    RCVDATA = 20
    SENDER = 21
    TSBPDMODE = 22
    LATENCY = 23
    INPUTBW = 24
    OHEADBW = 25
    PASSPHRASE = 26
    PBKEYLEN = 27
    KMSTATE = 28
    IPTTL = 29
    IPTOS = 30
    TLPKTDROP = 31
    SNDDROPDELAY = 32
    NAKREPORT = 33
    VERSION = 34
    PEERVERSION = 35
    CONNTIMEO = 36
    DRIFTTRACER = 37
    MININPUTBW = 38
    SNDKMSTATE = 40
    RCVKMSTATE = 41
    LOSSMAXTTL = 42
    RCVLATENCY = 43
    PEERLATENCY = 44
    MINVERSION = 45
    STREAMID = 46
    CONGESTION = 47
    MESSAGEAPI = 48
    PAYLOADSIZE = 49
    TRANSTYPE = 50
    KMREFRESHRATE = 51
    KMPREANNOUNCE = 52
    ENFORCEDENCRYPTION = 53
    IPV6ONLY = 54
    PEERIDLETIMEO = 55
    BINDTODEVICE = 56
    GROUPCONNECT = 57
    GROUPMINSTABLETIMEO = 58
    GROUPTYPE = 59
    PACKETFILTER = 60
    RETRANSMITALGO = 61


class TransType(enum.IntEnum):
    """``SRT_TRANSTYPE`` (srt.h)."""

    LIVE = 0
    FILE = 1
    INVALID = 2


class KmState(enum.IntEnum):
    """``SRT_KM_STATE`` (srt.h): encryption state of a connection."""

    UNSECURED = 0
    SECURING = 1
    SECURED = 2
    NOSECRET = 3
    BADSECRET = 4


class EpollOpt(enum.IntFlag):
    """``SRT_EPOLL_OPT`` (srt.h): event bits for ``srt_epoll_*``."""

    NONE = 0x0
    IN = 0x1
    OUT = 0x4
    ERR = 0x8
    UPDATE = 0x10
    ET = 1 << 31


#: srt.h: "SRT_EPOLL_ACCEPT = SRT_EPOLL_IN", "SRT_EPOLL_CONNECT = SRT_EPOLL_OUT".
EPOLL_ACCEPT: Final = EpollOpt.IN
EPOLL_CONNECT: Final = EpollOpt.OUT


class EpollFlag(enum.IntFlag):
    """``SRT_EPOLL_FLAGS`` (srt.h), set with ``srt_epoll_set``."""

    ENABLE_EMPTY = 1
    ENABLE_OUTPUTCHECK = 2


class SrtErrno(enum.IntEnum):
    """``SRT_ERRNO`` (srt.h): ``1000 * major + minor``."""

    EUNKNOWN = -1
    SUCCESS = 0
    ECONNSETUP = 1000
    ENOSERVER = 1001
    ECONNREJ = 1002
    ESOCKFAIL = 1003
    ESECFAIL = 1004
    ESCLOSED = 1005
    ECONNFAIL = 2000
    ECONNLOST = 2001
    ENOCONN = 2002
    ERESOURCE = 3000
    ETHREAD = 3001
    ENOBUF = 3002
    ESYSOBJ = 3003
    EFILE = 4000
    EINVRDOFF = 4001
    ERDPERM = 4002
    EINVWROFF = 4003
    EWRPERM = 4004
    EINVOP = 5000
    EBOUNDSOCK = 5001
    ECONNSOCK = 5002
    EINVPARAM = 5003
    EINVSOCK = 5004
    EUNBOUNDSOCK = 5005
    ENOLISTEN = 5006
    ERDVNOSERV = 5007
    ERDVUNBOUND = 5008
    EINVALMSGAPI = 5009
    EINVALBUFFERAPI = 5010
    EDUPLISTEN = 5011
    ELARGEMSG = 5012
    EINVPOLLID = 5013
    EPOLLEMPTY = 5014
    EBINDCONFLICT = 5015
    EASYNCFAIL = 6000
    EASYNCSND = 6001
    EASYNCRCV = 6002
    ETIMEOUT = 6003
    ECONGEST = 6004
    EPEERERR = 7000


class RejectReason(enum.IntEnum):
    """Connection reject reasons.

    0..16 are ``SRT_REJECT_REASON`` (srt.h, internal to libsrt); from 1000
    (``SRT_REJC_PREDEFINED``) the ``SRT_REJX_*`` codes of
    ``access_control.h`` (1000 + an HTTP status for 14xx/15xx); from 2000
    (``SRT_REJC_USERDEFINED``) application-defined codes.
    """

    UNKNOWN = 0
    SYSTEM = 1
    PEER = 2
    RESOURCE = 3
    ROGUE = 4
    BACKLOG = 5
    IPE = 6
    CLOSE = 7
    VERSION = 8
    RDVCOOKIE = 9
    BADSECRET = 10
    UNSECURE = 11
    MESSAGEAPI = 12
    CONGESTION = 13
    FILTER = 14
    GROUP = 15
    TIMEOUT = 16
    # access_control.h
    X_FALLBACK = 1000
    X_KEY_NOTSUP = 1001
    X_FILEPATH = 1002
    X_HOSTNOTFOUND = 1003
    X_BAD_REQUEST = 1400
    X_UNAUTHORIZED = 1401
    X_OVERLOAD = 1402
    X_FORBIDDEN = 1403
    X_NOTFOUND = 1404
    X_BAD_MODE = 1405
    X_UNACCEPTABLE = 1406
    X_CONFLICT = 1409
    X_NOTSUP_MEDIA = 1415
    X_LOCKED = 1423
    X_FAILED_DEPEND = 1424
    X_ISE = 1500
    X_UNIMPLEMENTED = 1501
    X_GW = 1502
    X_DOWN = 1503
    X_VERSION = 1505
    X_NOROOM = 1507


#: srt.h "SRT_REJC_PREDEFINED": first standard server error code.
SRT_REJC_PREDEFINED: Final = 1000
#: srt.h "SRT_REJC_USERDEFINED": first application-defined code.
SRT_REJC_USERDEFINED: Final = 2000
#: srt.h "SRT_REJ_E_SIZE": one past the last internal reason.
SRT_REJ_E_SIZE: Final = 17


class LogLevel(enum.IntEnum):
    """syslog levels used by ``srt_setloglevel`` (logging_api.h)."""

    CRIT = 2
    ERR = 3
    WARNING = 4
    NOTICE = 5
    DEBUG = 7


# --------------------------------------------------------------------------
# Structs
# --------------------------------------------------------------------------


class SRT_MSGCTRL(ctypes.Structure):
    """``SRT_MSGCTRL`` (srt.h ``struct SRT_MsgCtrl_``)."""

    _fields_ = [
        ("flags", ctypes.c_int),
        ("msgttl", ctypes.c_int),
        ("inorder", ctypes.c_int),
        ("boundary", ctypes.c_int),
        ("srctime", ctypes.c_int64),
        ("pktseq", ctypes.c_int32),
        ("msgno", ctypes.c_int32),
        ("grpdata", ctypes.c_void_p),
        ("grpdata_size", ctypes.c_size_t),
    ]

    def reset(self) -> None:
        """Set the defaults of ``srt_msgctrl_default`` (srt.h)."""
        self.flags = 0
        self.msgttl = -1  # SRT_MSGTTL_INF
        self.inorder = 0
        self.boundary = 0
        self.srctime = 0
        self.pktseq = -1  # SRT_SEQNO_NONE
        self.msgno = -1  # SRT_MSGNO_NONE
        self.grpdata = None
        self.grpdata_size = 0


class SRT_EPOLL_EVENT(ctypes.Structure):
    """``SRT_EPOLL_EVENT`` (srt.h ``struct SRT_EPOLL_EVENT_STR``)."""

    _fields_ = [("fd", ctypes.c_int32), ("events", ctypes.c_int)]


_i64, _u64, _int, _dbl = ctypes.c_int64, ctypes.c_uint64, ctypes.c_int, ctypes.c_double

#: ``struct CBytePerfMon`` of libsrt 1.5.1 srt.h, field by field, in order.
SRT_TRACEBSTATS_FIELDS: Final[list[tuple[str, type]]] = [
    # global measurements
    ("msTimeStamp", _i64),
    ("pktSentTotal", _i64),
    ("pktRecvTotal", _i64),
    ("pktSndLossTotal", _int),
    ("pktRcvLossTotal", _int),
    ("pktRetransTotal", _int),
    ("pktSentACKTotal", _int),
    ("pktRecvACKTotal", _int),
    ("pktSentNAKTotal", _int),
    ("pktRecvNAKTotal", _int),
    ("usSndDurationTotal", _i64),
    ("pktSndDropTotal", _int),
    ("pktRcvDropTotal", _int),
    ("pktRcvUndecryptTotal", _int),
    ("byteSentTotal", _u64),
    ("byteRecvTotal", _u64),
    ("byteRcvLossTotal", _u64),
    ("byteRetransTotal", _u64),
    ("byteSndDropTotal", _u64),
    ("byteRcvDropTotal", _u64),
    ("byteRcvUndecryptTotal", _u64),
    # local measurements
    ("pktSent", _i64),
    ("pktRecv", _i64),
    ("pktSndLoss", _int),
    ("pktRcvLoss", _int),
    ("pktRetrans", _int),
    ("pktRcvRetrans", _int),
    ("pktSentACK", _int),
    ("pktRecvACK", _int),
    ("pktSentNAK", _int),
    ("pktRecvNAK", _int),
    ("mbpsSendRate", _dbl),
    ("mbpsRecvRate", _dbl),
    ("usSndDuration", _i64),
    ("pktReorderDistance", _int),
    ("pktRcvAvgBelatedTime", _dbl),
    ("pktRcvBelated", _i64),
    ("pktSndDrop", _int),
    ("pktRcvDrop", _int),
    ("pktRcvUndecrypt", _int),
    ("byteSent", _u64),
    ("byteRecv", _u64),
    ("byteRcvLoss", _u64),
    ("byteRetrans", _u64),
    ("byteSndDrop", _u64),
    ("byteRcvDrop", _u64),
    ("byteRcvUndecrypt", _u64),
    # instant measurements
    ("usPktSndPeriod", _dbl),
    ("pktFlowWindow", _int),
    ("pktCongestionWindow", _int),
    ("pktFlightSize", _int),
    ("msRTT", _dbl),
    ("mbpsBandwidth", _dbl),
    ("byteAvailSndBuf", _int),
    ("byteAvailRcvBuf", _int),
    ("mbpsMaxBW", _dbl),
    ("byteMSS", _int),
    ("pktSndBuf", _int),
    ("byteSndBuf", _int),
    ("msSndBuf", _int),
    ("msSndTsbPdDelay", _int),
    ("pktRcvBuf", _int),
    ("byteRcvBuf", _int),
    ("msRcvBuf", _int),
    ("msRcvTsbPdDelay", _int),
    ("pktSndFilterExtraTotal", _int),
    ("pktRcvFilterExtraTotal", _int),
    ("pktRcvFilterSupplyTotal", _int),
    ("pktRcvFilterLossTotal", _int),
    ("pktSndFilterExtra", _int),
    ("pktRcvFilterExtra", _int),
    ("pktRcvFilterSupply", _int),
    ("pktRcvFilterLoss", _int),
    ("pktReorderTolerance", _int),
    # new in 1.5.0
    ("pktSentUniqueTotal", _i64),
    ("pktRecvUniqueTotal", _i64),
    ("byteSentUniqueTotal", _u64),
    ("byteRecvUniqueTotal", _u64),
    ("pktSentUnique", _i64),
    ("pktRecvUnique", _i64),
    ("byteSentUnique", _u64),
    ("byteRecvUnique", _u64),
]


class SRT_TRACEBSTATS(ctypes.Structure):
    """``SRT_TRACEBSTATS`` = ``struct CBytePerfMon`` (srt.h, 1.5.1: 82 fields)."""

    _fields_ = SRT_TRACEBSTATS_FIELDS

    def as_dict(self) -> dict[str, int | float]:
        return {name: getattr(self, name) for name, _ in SRT_TRACEBSTATS_FIELDS}


class _Linger(ctypes.Structure):
    """``struct linger`` (sys/socket.h), the value type of SRTO_LINGER."""

    _fields_ = [("l_onoff", ctypes.c_int), ("l_linger", ctypes.c_int)]


#: ``srt_listen_callback_fn`` (srt.h):
#: ``int (void* opaq, SRTSOCKET ns, int hsversion, const struct sockaddr* peeraddr,
#: const char* streamid)``. ``streamid`` is declared ``c_void_p`` so the callback
#: gets the raw address and reads the bytes itself (``ctypes.string_at``).
LISTEN_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_void_p, ctypes.c_int32, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p
)

# --------------------------------------------------------------------------
# sockaddr helpers (libsrt takes and returns the platform's struct sockaddr)
# --------------------------------------------------------------------------

#: BSD-derived systems (macOS) prefix sockaddr with a one-byte ``sa_len``.
_BSD_SOCKADDR: Final = sys.platform == "darwin" or sys.platform.startswith(("freebsd", "openbsd", "netbsd"))
_SOCKADDR_STORAGE_SIZE: Final = 128


def _family_header(family: int, length: int) -> bytes:
    if _BSD_SOCKADDR:
        return struct.pack("BB", length, family)
    return struct.pack("=H", family)


def encode_sockaddr(host: str, port: int) -> bytes:
    """Build a ``struct sockaddr_in``/``sockaddr_in6`` for a numeric address."""
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range: {port}")
    try:
        packed4 = socket.inet_pton(socket.AF_INET, host)
    except OSError:
        packed4 = None
    if packed4 is not None:
        return _family_header(socket.AF_INET, 16) + struct.pack("!H", port) + packed4 + bytes(8)
    try:
        packed6 = socket.inet_pton(socket.AF_INET6, host)
    except OSError:
        raise ValueError(f"not a numeric IPv4/IPv6 address: {host!r}") from None
    return _family_header(socket.AF_INET6, 28) + struct.pack("!HI", port, 0) + packed6 + struct.pack("=I", 0)


def decode_sockaddr(raw: bytes) -> tuple[str, int]:
    """Parse a ``struct sockaddr_in``/``sockaddr_in6`` into ``(host, port)``."""
    if len(raw) < 4:
        raise ValueError("sockaddr too short")
    family = raw[1] if _BSD_SOCKADDR else struct.unpack_from("=H", raw, 0)[0]
    port = struct.unpack_from("!H", raw, 2)[0]
    if family == socket.AF_INET and len(raw) >= 8:
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    if family == socket.AF_INET6 and len(raw) >= 24:
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
    raise ValueError(f"unsupported address family {family}")


def sockaddr_from_pointer(address: int | None) -> tuple[str, int]:
    """Read a sockaddr that libsrt handed us by pointer (listen callback)."""
    if not address:
        raise ValueError("null sockaddr")
    head = ctypes.string_at(address, 2)
    family = head[1] if _BSD_SOCKADDR else struct.unpack("=H", head)[0]
    size = 28 if family == socket.AF_INET6 else 16
    return decode_sockaddr(ctypes.string_at(address, size))


def read_c_string(address: int | None, limit: int = SRT_MAX_STREAMID_LEN) -> bytes:
    """Copy a NUL-terminated C string (at most ``limit`` bytes) libsrt gave us."""
    if not address:
        return b""
    data = ctypes.string_at(address)
    return data[:limit] if len(data) > limit else data


def format_peer(host: str, port: int) -> str:
    """``1.2.3.4:5000`` or ``[::1]:5000``."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------

LIBRARY_CANDIDATES: Final[tuple[str, ...]] = (
    "libsrt.so.1.5",
    "libsrt-gnutls.so.1.5",
    "libsrt-openssl.so.1.5",
    "libsrt.so",
    "libsrt.1.5.dylib",
    "libsrt.dylib",
)

INSTALL_HINT: Final = (
    "libsrt 1.5 is required for SRT ingest but no libsrt shared library could be loaded "
    "(tried: {tried}). Install it: Debian/Ubuntu `apt-get install libsrt1.5-gnutls` "
    "(or `libsrt1.5-openssl`); macOS/Homebrew `brew install srt`."
)

#: Option value kinds (socket options doc of libsrt 1.5): how an option's value
#: is passed to srt_setsockflag / read from srt_getsockflag.
_BOOL_OPTS: Final = frozenset(
    {
        SockOpt.SNDSYN,
        SockOpt.RCVSYN,
        SockOpt.RENDEZVOUS,
        SockOpt.REUSEADDR,
        SockOpt.SENDER,
        SockOpt.TSBPDMODE,
        SockOpt.TLPKTDROP,
        SockOpt.NAKREPORT,
        SockOpt.DRIFTTRACER,
        SockOpt.MESSAGEAPI,
        SockOpt.ENFORCEDENCRYPTION,
    }
)
_INT64_OPTS: Final = frozenset({SockOpt.MAXBW, SockOpt.INPUTBW, SockOpt.MININPUTBW})
_STRING_OPTS: Final = frozenset(
    {SockOpt.PASSPHRASE, SockOpt.STREAMID, SockOpt.CONGESTION, SockOpt.BINDTODEVICE, SockOpt.PACKETFILTER}
)
_WRITE_ONLY_OPTS: Final = frozenset({SockOpt.PASSPHRASE})


def _prototype(lib: ctypes.CDLL) -> None:
    """Set argtypes/restype for every libsrt function we use (srt.h 1.5.1)."""
    c = ctypes
    sock = c.c_int32  # SRTSOCKET
    protos: dict[str, tuple[object, list[object]]] = {
        "srt_startup": (c.c_int, []),
        "srt_cleanup": (c.c_int, []),
        "srt_getversion": (c.c_uint32, []),
        "srt_create_socket": (sock, []),
        "srt_bind": (c.c_int, [sock, c.c_void_p, c.c_int]),
        "srt_listen": (c.c_int, [sock, c.c_int]),
        "srt_accept": (sock, [sock, c.c_void_p, c.POINTER(c.c_int)]),
        "srt_close": (c.c_int, [sock]),
        "srt_connect": (c.c_int, [sock, c.c_void_p, c.c_int]),
        "srt_getpeername": (c.c_int, [sock, c.c_void_p, c.POINTER(c.c_int)]),
        "srt_getsockname": (c.c_int, [sock, c.c_void_p, c.POINTER(c.c_int)]),
        "srt_setsockflag": (c.c_int, [sock, c.c_int, c.c_void_p, c.c_int]),
        "srt_getsockflag": (c.c_int, [sock, c.c_int, c.c_void_p, c.POINTER(c.c_int)]),
        "srt_listen_callback": (c.c_int, [sock, LISTEN_CALLBACK, c.c_void_p]),
        "srt_setrejectreason": (c.c_int, [sock, c.c_int]),
        "srt_getrejectreason": (c.c_int, [sock]),
        "srt_rejectreason_str": (c.c_char_p, [c.c_int]),
        "srt_recvmsg2": (c.c_int, [sock, c.c_void_p, c.c_int, c.POINTER(SRT_MSGCTRL)]),
        "srt_sendmsg2": (c.c_int, [sock, c.c_char_p, c.c_int, c.POINTER(SRT_MSGCTRL)]),
        "srt_epoll_create": (c.c_int, []),
        "srt_epoll_add_usock": (c.c_int, [c.c_int, sock, c.POINTER(c.c_int)]),
        "srt_epoll_update_usock": (c.c_int, [c.c_int, sock, c.POINTER(c.c_int)]),
        "srt_epoll_remove_usock": (c.c_int, [c.c_int, sock]),
        "srt_epoll_uwait": (c.c_int, [c.c_int, c.POINTER(SRT_EPOLL_EVENT), c.c_int, c.c_int64]),
        "srt_epoll_set": (c.c_int32, [c.c_int, c.c_int32]),
        "srt_epoll_release": (c.c_int, [c.c_int]),
        "srt_getlasterror": (c.c_int, [c.POINTER(c.c_int)]),
        "srt_getlasterror_str": (c.c_char_p, []),
        "srt_clearlasterror": (None, []),
        "srt_strerror": (c.c_char_p, [c.c_int, c.c_int]),
        "srt_bistats": (c.c_int, [sock, c.POINTER(SRT_TRACEBSTATS), c.c_int, c.c_int]),
        "srt_getsockstate": (c.c_int, [sock]),
        "srt_setloglevel": (None, [c.c_int]),
    }
    for name, (restype, argtypes) in protos.items():
        fn = getattr(lib, name)  # AttributeError if the library lacks it
        fn.restype = restype
        fn.argtypes = argtypes


def _load_first(candidates: Iterable[str], *, search: bool) -> tuple[ctypes.CDLL, str]:
    tried: list[str] = []
    for name in candidates:
        tried.append(name)
        try:
            return ctypes.CDLL(name), name
        except OSError:
            continue
    found = ctypes.util.find_library("srt") if search else None
    if found:
        tried.append(found)
        try:
            return ctypes.CDLL(found), found
        except OSError:
            pass
    raise SrtUnavailable(INSTALL_HINT.format(tried=", ".join(tried)))


class SrtLibrary:
    """A loaded, started libsrt.

    ``SrtLibrary.open()`` loads the first loadable candidate, sets the
    prototypes and calls ``srt_startup`` once; :meth:`close` calls
    ``srt_cleanup`` once. libsrt reference-counts startup/cleanup internally,
    so independent instances (one per listener, one per test) coexist; the
    process-wide teardown happens when the last one closes.

    The instance also keeps every listen callback it ever installed alive
    (:meth:`keep_alive`): ctypes frees the C trampoline with the Python
    object, and a libsrt thread must never call into freed memory.
    """

    def __init__(self, lib: ctypes.CDLL, name: str) -> None:
        self.c = lib
        self.name = name
        v = int(lib.srt_getversion())
        self.version: tuple[int, int, int] = ((v >> 16) & 0xFF, (v >> 8) & 0xFF, v & 0xFF)
        self._started = False
        self._closed = False
        self._lock = threading.Lock()
        self._keepalive: list[object] = []

    # -- lifecycle --------------------------------------------------------

    @classmethod
    def open(
        cls, candidates: Sequence[str] | None = None, *, log_level: LogLevel | None = LogLevel.CRIT
    ) -> SrtLibrary:
        """Load, prototype and start libsrt.

        ``candidates`` replaces :data:`LIBRARY_CANDIDATES` (then no
        ``ctypes.util.find_library`` fallback is tried).

        ``log_level`` sets libsrt's own stderr logging (process-wide,
        ``srt_setloglevel``). The default keeps only critical messages: libsrt
        logs expected events (a peer's reject, an accept on an empty queue)
        as errors, and ReturnFeed logs every connection event itself. ``None``
        leaves the level alone.
        """
        if candidates is None:
            lib, name = _load_first(LIBRARY_CANDIDATES, search=True)
        else:
            lib, name = _load_first(candidates, search=False)
        try:
            _prototype(lib)
        except AttributeError as exc:
            raise SrtUnavailable(
                f"{name} lacks a libsrt 1.5 symbol ({exc}); " + INSTALL_HINT.format(tried=name)
            ) from None
        self = cls(lib, name)
        if self.version < (1, 5, 0):
            raise SrtUnavailable(
                f"{name} is libsrt {'.'.join(map(str, self.version))}; 1.5.x is required. "
                + INSTALL_HINT.format(tried=name)
            )
        if lib.srt_startup() < 0:
            self._raise("srt_startup")
        self._started = True
        if log_level is not None:
            self.set_log_level(log_level)
        return self

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._started:
            self.c.srt_cleanup()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> SrtLibrary:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def keep_alive(self, obj: object) -> None:
        self._keepalive.append(obj)

    @property
    def version_string(self) -> str:
        return ".".join(map(str, self.version))

    # -- errors -----------------------------------------------------------

    def last_error(self) -> tuple[int, str]:
        """``(srt_getlasterror, srt_getlasterror_str)`` of the calling thread."""
        code = int(self.c.srt_getlasterror(None))
        text = self.c.srt_getlasterror_str()
        return code, (text.decode("utf-8", "replace") if text else "")

    def _raise(self, call: str) -> None:
        code, text = self.last_error()
        raise SrtApiError(call, code, text)

    def _check(self, call: str, result: int) -> int:
        if result < 0:
            self._raise(call)
        return result

    def strerror(self, code: int, errnoval: int = 0) -> str:
        text = self.c.srt_strerror(code, errnoval)
        return text.decode("utf-8", "replace") if text else ""

    def reject_reason_str(self, reason: int) -> str:
        """``srt_rejectreason_str``: text for an internal or 1000+/2000+ code."""
        text = self.c.srt_rejectreason_str(reason)
        return text.decode("utf-8", "replace") if text else ""

    def set_log_level(self, level: int) -> None:
        self.c.srt_setloglevel(int(level))

    # -- sockets ----------------------------------------------------------

    def create_socket(self) -> int:
        s = int(self.c.srt_create_socket())
        if s == SRT_INVALID_SOCK:
            self._raise("srt_create_socket")
        return s

    def bind(self, sock: int, host: str, port: int) -> None:
        addr = encode_sockaddr(host, port)
        self._check("srt_bind", self.c.srt_bind(sock, addr, len(addr)))

    def listen(self, sock: int, backlog: int) -> None:
        self._check("srt_listen", self.c.srt_listen(sock, backlog))

    def accept(self, sock: int) -> tuple[int, tuple[str, int]]:
        """``srt_accept``; returns ``(new_socket, (host, port))``."""
        buf = ctypes.create_string_buffer(_SOCKADDR_STORAGE_SIZE)
        size = ctypes.c_int(_SOCKADDR_STORAGE_SIZE)
        ns = int(self.c.srt_accept(sock, buf, ctypes.byref(size)))
        if ns == SRT_INVALID_SOCK:
            self._raise("srt_accept")
        return ns, decode_sockaddr(buf.raw[: size.value])

    def connect(self, sock: int, host: str, port: int) -> None:
        addr = encode_sockaddr(host, port)
        self._check("srt_connect", self.c.srt_connect(sock, addr, len(addr)))

    def close_socket(self, sock: int) -> None:
        self._check("srt_close", self.c.srt_close(sock))

    def getsockname(self, sock: int) -> tuple[str, int]:
        buf = ctypes.create_string_buffer(_SOCKADDR_STORAGE_SIZE)
        size = ctypes.c_int(_SOCKADDR_STORAGE_SIZE)
        self._check("srt_getsockname", self.c.srt_getsockname(sock, buf, ctypes.byref(size)))
        return decode_sockaddr(buf.raw[: size.value])

    def getpeername(self, sock: int) -> tuple[str, int]:
        buf = ctypes.create_string_buffer(_SOCKADDR_STORAGE_SIZE)
        size = ctypes.c_int(_SOCKADDR_STORAGE_SIZE)
        self._check("srt_getpeername", self.c.srt_getpeername(sock, buf, ctypes.byref(size)))
        if size.value == 0:
            # Seen with libsrt 1.5.1 on a connected *caller* socket: success,
            # but an empty address. Accepted sockets report their peer.
            raise SrtApiError("srt_getpeername", 0, "libsrt returned an empty peer address")
        return decode_sockaddr(buf.raw[: size.value])

    def getsockstate(self, sock: int) -> SockStatus:
        value = int(self.c.srt_getsockstate(sock))
        try:
            return SockStatus(value)
        except ValueError:
            return SockStatus.NONEXIST

    def setsockflag(self, sock: int, opt: SockOpt, value: int | bool | str | bytes) -> None:
        """``srt_setsockflag`` with the C type the option expects."""
        opt = SockOpt(opt)
        if opt in _STRING_OPTS:
            data = value.encode("utf-8") if isinstance(value, str) else bytes(value)  # type: ignore[arg-type]
            buf = ctypes.create_string_buffer(data, len(data) + 1)
            result = self.c.srt_setsockflag(sock, opt, buf, len(data))
        elif opt == SockOpt.LINGER:
            # struct linger {int l_onoff; int l_linger;}: value = seconds, 0 = off
            seconds = int(value)
            lin = _Linger(1 if seconds > 0 else 0, max(seconds, 0))
            result = self.c.srt_setsockflag(sock, opt, ctypes.byref(lin), ctypes.sizeof(lin))
        elif opt in _BOOL_OPTS:
            cval: ctypes._SimpleCData = ctypes.c_bool(bool(value))  # type: ignore[type-arg]
            result = self.c.srt_setsockflag(sock, opt, ctypes.byref(cval), ctypes.sizeof(cval))
        elif opt in _INT64_OPTS:
            cval = ctypes.c_int64(int(value))  # type: ignore[arg-type]
            result = self.c.srt_setsockflag(sock, opt, ctypes.byref(cval), ctypes.sizeof(cval))
        else:
            cval = ctypes.c_int32(int(value))  # type: ignore[arg-type]
            result = self.c.srt_setsockflag(sock, opt, ctypes.byref(cval), ctypes.sizeof(cval))
        if result < 0:
            self._raise(f"srt_setsockflag({opt.name})")

    def getsockflag(self, sock: int, opt: SockOpt) -> int | bool | str:
        """``srt_getsockflag``; strings come back decoded, booleans as bool."""
        opt = SockOpt(opt)
        if opt in _WRITE_ONLY_OPTS:
            raise ValueError(f"SRTO_{opt.name} cannot be read")
        if opt in _STRING_OPTS:
            buf = ctypes.create_string_buffer(SRT_MAX_STREAMID_LEN + 1)
            size = ctypes.c_int(SRT_MAX_STREAMID_LEN + 1)
            self._check(f"srt_getsockflag({opt.name})", self.c.srt_getsockflag(sock, opt, buf, ctypes.byref(size)))
            return buf.raw[: size.value].decode("utf-8", "replace")
        if opt == SockOpt.LINGER:
            lin = _Linger()
            size = ctypes.c_int(ctypes.sizeof(lin))
            self._check("srt_getsockflag(LINGER)", self.c.srt_getsockflag(sock, opt, ctypes.byref(lin), ctypes.byref(size)))
            return int(lin.l_linger) if lin.l_onoff else 0
        cval: ctypes._SimpleCData  # type: ignore[type-arg]
        if opt in _BOOL_OPTS:
            cval = ctypes.c_bool()
        elif opt in _INT64_OPTS:
            cval = ctypes.c_int64()
        else:
            cval = ctypes.c_int32()
        size = ctypes.c_int(ctypes.sizeof(cval))
        self._check(
            f"srt_getsockflag({opt.name})", self.c.srt_getsockflag(sock, opt, ctypes.byref(cval), ctypes.byref(size))
        )
        return bool(cval.value) if opt in _BOOL_OPTS else int(cval.value)

    def listen_callback(self, sock: int, callback: Callable[..., int]) -> object:
        """Install ``srt_listen_callback``; returns the CFUNCTYPE object.

        ``callback(opaque, ns, hsversion, peeraddr_ptr, streamid_ptr) -> int``
        runs on a libsrt thread and must return 0 (go on) or -1 (reject). The
        trampoline is kept alive for the lifetime of this library object.
        """
        fn = LISTEN_CALLBACK(callback)
        self.keep_alive(fn)
        self._check("srt_listen_callback", self.c.srt_listen_callback(sock, fn, None))
        return fn

    def set_reject_reason(self, sock: int, reason: int) -> None:
        self._check("srt_setrejectreason", self.c.srt_setrejectreason(sock, int(reason)))

    def get_reject_reason(self, sock: int) -> int:
        return int(self.c.srt_getrejectreason(sock))

    # -- data -------------------------------------------------------------

    def recvmsg(self, sock: int, size: int = 1500) -> bytes:
        """Blocking-or-not ``srt_recvmsg2`` of one message (tests, edge pulls)."""
        buf = ctypes.create_string_buffer(size)
        ctrl = SRT_MSGCTRL()
        ctrl.reset()
        n = self.c.srt_recvmsg2(sock, buf, size, ctypes.byref(ctrl))
        if n < 0:
            self._raise("srt_recvmsg2")
        return buf.raw[:n]

    def sendmsg(self, sock: int, data: bytes) -> int:
        """``srt_sendmsg2`` of one message (default SRT_MSGCTRL)."""
        n = self.c.srt_sendmsg2(sock, data, len(data), None)
        if n < 0:
            self._raise("srt_sendmsg2")
        return int(n)

    def send_nowait(self, sock: int, data: bytes) -> int:
        """One ``srt_sendmsg2`` (default SRT_MSGCTRL); returns 0 when queued,
        else the libsrt error number (``SRT_EASYNCSND`` when a non-blocking
        socket's send buffer is full). Never raises: this is the hot path."""
        if self.c.srt_sendmsg2(sock, data, len(data), None) >= 0:
            return 0
        return int(self.c.srt_getlasterror(None))

    def bistats(self, sock: int, *, clear: bool = False, instantaneous: bool = True) -> SRT_TRACEBSTATS:
        perf = SRT_TRACEBSTATS()
        self._check("srt_bistats", self.c.srt_bistats(sock, ctypes.byref(perf), int(clear), int(instantaneous)))
        return perf

    # -- epoll ------------------------------------------------------------

    def epoll_create(self) -> int:
        return self._check("srt_epoll_create", int(self.c.srt_epoll_create()))

    def epoll_set(self, eid: int, flags: int) -> int:
        return self._check("srt_epoll_set", int(self.c.srt_epoll_set(eid, int(flags))))

    def epoll_add(self, eid: int, sock: int, events: int) -> None:
        ev = ctypes.c_int(int(events))
        self._check("srt_epoll_add_usock", self.c.srt_epoll_add_usock(eid, sock, ctypes.byref(ev)))

    def epoll_remove(self, eid: int, sock: int) -> None:
        self._check("srt_epoll_remove_usock", self.c.srt_epoll_remove_usock(eid, sock))

    def epoll_release(self, eid: int) -> None:
        self._check("srt_epoll_release", self.c.srt_epoll_release(eid))


class EpollReader:
    """Wait on an SRT epoll and drain sockets with buffers reused across calls.

    One instance belongs to one thread (the buffers are not shared). It keeps
    the ``SRT_EPOLL_EVENT`` array, one receive buffer (1500 bytes: an SRT live
    message is at most 1456), one ``SRT_MSGCTRL`` and one sockaddr buffer, so
    the steady state allocates only the ``bytes`` of each received message.
    """

    def __init__(self, lib: SrtLibrary, eid: int, *, capacity: int = 1024, buffer_size: int = 1500) -> None:
        c = lib.c
        self._uwait = c.srt_epoll_uwait
        self._recv = c.srt_recvmsg2
        self._accept = c.srt_accept
        self._lasterror = c.srt_getlasterror
        self._eid = eid
        self.capacity = capacity
        self.buffer_size = buffer_size
        self._events = (SRT_EPOLL_EVENT * capacity)()
        self._buf = ctypes.create_string_buffer(buffer_size)
        self._buf_addr = ctypes.addressof(self._buf)
        self._ctrl = SRT_MSGCTRL()
        self._ctrl.reset()
        self._ctrl_ref = ctypes.byref(self._ctrl)
        self._addr = ctypes.create_string_buffer(_SOCKADDR_STORAGE_SIZE)
        self._addr_len = ctypes.c_int(_SOCKADDR_STORAGE_SIZE)
        self._addr_len_ref = ctypes.byref(self._addr_len)

    def wait(self, timeout_ms: int) -> list[tuple[int, int]]:
        """``srt_epoll_uwait``: ``[(socket, events), ...]``; empty on timeout.

        Raises :class:`SrtApiError` when libsrt reports an error.
        """
        n = self._uwait(self._eid, self._events, self.capacity, timeout_ms)
        if n <= 0:
            if n < 0:
                code = int(self._lasterror(None))
                raise SrtApiError("srt_epoll_uwait", code, "epoll wait failed")
            return []
        events = self._events
        return [(events[i].fd, events[i].events) for i in range(min(n, self.capacity))]

    def drain(self, sock: int, limit: int, out: list[bytes]) -> tuple[int, int]:
        """Append up to ``limit`` messages of ``sock`` to ``out``.

        Returns ``(bytes_read, error)``: ``error`` is 0 when the socket ran
        dry (``SRT_EASYNCRCV``) or ``limit`` was reached, else the libsrt
        error number (the connection is gone).
        """
        recv = self._recv
        buf = self._buf
        size = self.buffer_size
        ctrl = self._ctrl_ref
        string_at = ctypes.string_at
        addr = self._buf_addr
        total = 0
        append = out.append
        for _ in range(limit):
            r = recv(sock, buf, size, ctrl)
            if r > 0:
                append(string_at(addr, r))
                total += r
                continue
            if r < 0:
                code = int(self._lasterror(None))
                return total, (0 if code == SrtErrno.EASYNCRCV else code)
            break
        return total, 0

    def accept(self, sock: int) -> tuple[int, tuple[str, int] | None, int]:
        """Non-blocking ``srt_accept``: ``(new_socket, peer, 0)`` or
        ``(-1, None, error)`` (``SRT_EASYNCRCV`` when nothing is queued)."""
        self._addr_len.value = _SOCKADDR_STORAGE_SIZE
        ns = int(self._accept(sock, self._addr, self._addr_len_ref))
        if ns == SRT_INVALID_SOCK:
            return -1, None, int(self._lasterror(None))
        try:
            peer: tuple[str, int] | None = decode_sockaddr(self._addr.raw[: self._addr_len.value])
        except ValueError:
            peer = None
        return ns, peer, 0
