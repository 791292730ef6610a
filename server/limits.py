"""Caps on open connections, counted under several keys at once.

Sans-I/O: the HTTP layer asks :meth:`ConnectionCaps.acquire` before it
serves a connection and calls :meth:`ConnectionCaps.release` when it ends.
A cap of 0 disables that kind of key.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class ConnectionCaps:
    #: kind ("link", "ip", "production", ...) → most open connections per key.
    caps: dict[str, int]
    _open: dict[tuple[str, str], int] = field(default_factory=dict)

    def acquire(self, keys: dict[str, str]) -> str | None:
        """Count one connection under every ``kind → key`` of ``keys``, or
        none of them and return the first kind whose cap is reached."""
        for kind, key in keys.items():
            cap = self.caps.get(kind, 0)
            if cap > 0 and self._open.get((kind, key), 0) >= cap:
                return kind
        for kind, key in keys.items():
            self._open[(kind, key)] = self._open.get((kind, key), 0) + 1
        return None

    def release(self, keys: dict[str, str]) -> None:
        for kind, key in keys.items():
            n = self._open.get((kind, key), 0) - 1
            if n > 0:
                self._open[(kind, key)] = n
            else:
                self._open.pop((kind, key), None)

    def open(self, kind: str, key: str) -> int:
        return self._open.get((kind, key), 0)

    def __len__(self) -> int:
        """Keys with open connections (memory stays bounded by what is open)."""
        return len(self._open)
