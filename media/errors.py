"""Errors raised by the media package.

Hierarchy::

    MediaError                      base of everything media/ raises
    ├── LocalMediaError             our side is misconfigured or misused
    │   ├── SrtUnavailable          no loadable libsrt (says what to install)
    │   ├── SrtApiError             a libsrt call failed (carries errno/text)
    │   ├── StreamClosed            (media.stream) the stream or reader ended
    │   ├── NoCapacity              no room for another session now: a
    │   │                           session limit, or no egress worker
    │   │                           running; HTTP 503 with its text
    │   └── SessionGone             (also a KeyError) the session asked
    │                               for has ended or never was; HTTP 404
    └── RemoteMediaError            a peer sent something we cannot use
        ├── TsError                 malformed MPEG-TS (sync, PSI CRC, PES)
        ├── BitstreamError          malformed H.264/AAC/Opus data
        ├── RtpError                malformed RTP/RTCP
        ├── UnsupportedMedia        well-formed but cannot be served
        │                           passthrough (B-frames, unknown codec)
        ├── StreamIdError           (media.srt.streamid) unparsable SRT
        │                           stream ID; carries the reject code
        ├── StreamBusy              (media.stream) a publisher is already
        │                           attached; SRT reject 1409 / HTTP 409
        └── SdpError                (media.webrtc.sdp) unusable SDP offer

Remote errors are counted and logged by whoever reads the bytes; they never
propagate out of an ingest session. Third-party exceptions (ctypes, PyAV)
are translated into these at the module boundary.
"""

from __future__ import annotations


class MediaError(Exception):
    """Base class for media errors."""


class LocalMediaError(MediaError):
    """Our configuration or use of an API is wrong."""


class SrtUnavailable(LocalMediaError):
    """No libsrt shared library could be loaded."""


class SrtApiError(LocalMediaError):
    """A libsrt call returned an error."""

    def __init__(self, call: str, code: int, text: str) -> None:
        super().__init__(f"{call} failed: {text} (srt errno {code})")
        self.call = call
        self.code = code
        self.text = text


class NoCapacity(LocalMediaError):
    """No room for another session now (a configured limit, or no egress
    worker to take it); the text says which, the client may retry."""


class SessionGone(LocalMediaError, KeyError):
    """The session a call names has ended (or never existed). A
    ``KeyError`` too, for the mappings that look sessions up by id."""

    def __str__(self) -> str:  # KeyError would quote the text
        return str(self.args[0]) if self.args else ""


class RemoteMediaError(MediaError):
    """A peer sent data we cannot use."""


class TsError(RemoteMediaError):
    """Malformed MPEG transport stream."""


class BitstreamError(RemoteMediaError):
    """Malformed elementary stream data."""


class RtpError(RemoteMediaError):
    """Malformed RTP or RTCP."""


class UnsupportedMedia(RemoteMediaError):
    """Well-formed media that cannot be forwarded passthrough."""
