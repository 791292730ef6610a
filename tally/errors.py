"""Errors raised by the tally package.

Hierarchy::

    TallyError                      base of everything tally/ raises
    ├── LocalTallyError             our side refuses or is misconfigured
    │   ├── CommandRejected         a command we refuse (unknown source,
    │   │                           forbidden, no preview, transition in
    │   │                           progress, bad duration); carries a
    │   │                           machine-readable ``code`` for the client
    │   ├── ConfigError             inconsistent sources/mappings/options
    │   └── SnapshotError           a persisted state dict cannot be restored
    └── ProtocolError               a peer sent data we cannot use
        ├── MessageError            malformed client WebSocket message
        │                           (bad JSON, too large, unknown type, wrong
        │                           field type); carries ``code`` like
        │                           CommandRejected
        ├── TslError                malformed TSL UMD 3.1 / 5.0 bytes
        ├── VmixError               malformed vMix TCP API data
        ├── ObsError                malformed OBS WebSocket v5 data
        └── HandshakeFailed         the peer refused or broke a handshake
                                    (vMix ``SUBSCRIBE ER``, OBS close 4009
                                    AuthenticationFailed, 4010 unsupported
                                    RPC version, 4011 session invalidated)

Local errors are answered to whoever issued the command (a WebSocket client
gets ``{"type": "error", "code": ..., "detail": ...}``) and change nothing.
Remote errors are counted and logged by the adapter that reads the bytes; a
malformed packet is dropped, a broken stream is closed and reconnected, and
they never propagate out of an adapter task. Third-party exceptions (``json``,
``struct``, ``websockets``, ``OSError``) are translated into these at the
module boundary.
"""

from __future__ import annotations


class TallyError(Exception):
    """Base class for tally errors."""


class LocalTallyError(TallyError):
    """Our side refuses a request or is misconfigured."""


class CommandRejected(LocalTallyError):
    """A command was refused; nothing changed.

    ``code`` is a short machine-readable token sent to clients (see
    ``tally.protocol.ErrorCode``), ``detail`` a human-readable sentence.
    """

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


class ConfigError(LocalTallyError):
    """Sources, mappings or adapter options are inconsistent."""


class SnapshotError(LocalTallyError):
    """A persisted tally state dict is malformed or inconsistent."""


class ProtocolError(TallyError):
    """A peer sent data we cannot use."""


class MessageError(ProtocolError):
    """A client WebSocket message is malformed.

    ``code`` is the error code answered to the client.
    """

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


class TslError(ProtocolError):
    """Malformed TSL UMD data."""


class VmixError(ProtocolError):
    """Malformed vMix TCP API data."""


class ObsError(ProtocolError):
    """Malformed OBS WebSocket v5 data."""


class HandshakeFailed(ProtocolError):
    """A peer refused or broke the session handshake."""
