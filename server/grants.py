"""What each open session was let in with, re-checked whenever it changes.

A WHEP viewer, a WHIP or SRT publisher, an SRT reader and a ``/ws/tally``
client are authorised once, when they connect; their sessions then last for
hours. Issue 9 item 5: revoking a link, deleting a stream or production,
removing a member or changing their role, or rotating a stream's SRT
passphrase ends every session that it covers, on every node, within a
second. Each session registers a :class:`Grant` here; the in-memory
directory re-checks all grants after every reload (the reload follows the
``returnfeed_directory`` NOTIFY of any node, or this node's own change), and
closes those that no longer hold, saying why.

Checks read only the directory's snapshot: no database round trip, so a
sweep is synchronous and also runs during a database outage.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

from .auth import LinkClaims
from .log import event

log = logging.getLogger("returnfeed.grants")

#: RFC 6455 §7.4.2: 4000–4999 are private codes. ``/ws/tally`` clients whose
#: access ended get 4403 with the reason (next to 4000 "too slow" and 4001
#: "heartbeat timeout").
WS_CLOSE_REVOKED = 4403


@dataclass(slots=True)
class Grant:
    """The credential one open session was admitted with."""

    what: str  # "whep" | "whip" | "srt-publish" | "srt-read" | "tally"
    production_id: int
    #: Ends the session; the argument says why (synchronous: schedules work).
    close: Callable[[str], None]
    #: Whether the session is still open (closed ones are forgotten).
    alive: Callable[[], bool]
    stream: str | None = None
    stream_id: int | None = None
    link: LinkClaims | None = None
    user_id: int | None = None
    #: Production roles that keep a user's session open (a director's tally
    #: socket: only "director", so a demoted director reconnects as what
    #: they are now). Empty: not re-checked (admins).
    roles: tuple[str, ...] = ()
    #: The stream passphrase an SRT session authenticated with.
    passphrase: str | None = None


def check(grant: Grant, snap: Any) -> str | None:
    """Why ``grant`` no longer holds in directory snapshot ``snap``, or None."""
    link = grant.link
    if link is not None:
        if link.jti in snap.revoked:
            return "link revoked"
        entry = snap.streams.get(link.stream)
        if entry is None or entry.id != link.stream_id or entry.production_id != link.production_id:
            return "the link's stream was deleted"
    if grant.stream is not None:
        entry = snap.streams.get(grant.stream)
        if entry is None or (grant.stream_id is not None and entry.id != grant.stream_id):
            return "stream deleted"
        if grant.passphrase is not None and entry.passphrase != grant.passphrase:
            return "stream passphrase changed"
    if grant.production_id not in snap.productions:
        return "production deleted"
    if link is None and grant.user_id is not None and grant.roles:
        now_role = snap.members.get((grant.production_id, grant.user_id))
        if now_role is None:
            return "no longer a member of the production"
        if now_role not in grant.roles:
            return f"production role changed to {now_role}"
    return None


class Grants:
    """The open sessions' grants, keyed by the session object."""

    def __init__(self) -> None:
        self._grants: dict[Any, Grant] = {}
        self._prune_at = 64
        self.closed = 0

    def __len__(self) -> int:
        return len(self._grants)

    def add(self, key: Any, grant: Grant) -> None:
        self._grants[key] = grant
        if len(self._grants) >= self._prune_at:
            # Sessions that ended without telling us: bounded, amortised.
            for k, g in list(self._grants.items()):
                if not g.alive():
                    del self._grants[k]
            self._prune_at = 2 * len(self._grants) + 64

    def discard(self, key: Any) -> None:
        self._grants.pop(key, None)

    def sweep(self, snap: Any) -> int:
        """Close every session whose grant ``snap`` no longer supports."""
        n = 0
        for key, g in list(self._grants.items()):
            if not g.alive():
                self._grants.pop(key, None)
                continue
            reason = check(g, snap)
            if reason is None:
                continue
            self._grants.pop(key, None)
            n += 1
            event(log, logging.INFO, "auth.session_closed", session=g.what, stream=g.stream,
                  production=g.production_id, reason=reason,
                  who=f"link:{g.link.jti}" if g.link is not None else f"user:{g.user_id}")
            try:
                g.close(reason)
            except Exception:  # one session's close must not spare the others
                log.exception("auth.session_close_failed")
        self.closed += n
        return n
