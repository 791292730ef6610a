"""The in-memory directory the live path authorises from.

Verifying a token is pure computation; deciding what it may do needs four
small tables: streams (name → production, SRT passphrase), productions
(id ↔ name), memberships (production, user → role) and revoked link ids;
plus the logins ended (logout, refresh-token theft) within one access-token
lifetime, whose access tokens are refused before they expire.
They are loaded whole at start and kept current three ways:

* ``LISTEN returnfeed_directory``: migration 0002's triggers notify on every
  committed change to those tables, from any node or the CLI;
* a full reload whenever the database comes back (notifications sent while
  this node was disconnected are lost; PostgreSQL does not queue them);
* a slow periodic reload (``database.directory_refresh_s``) as a safety net.

During an outage the last copy is used as is: a cut, a WHEP join with a
signed link or an SRT publish never waits for PostgreSQL. A revocation made
on another node during an outage cannot reach this node until the database
is back; that is the price of staying on air, and it is bounded by the
outage.

Readers may run on other threads (the SRT listen callback): every reload
builds new dicts and swaps one reference.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .grants import Grants
from .log import event
from .tasks import cancel_and_wait

log = logging.getLogger("returnfeed.directory")

CHANNEL = "returnfeed_directory"


@dataclass(frozen=True, slots=True)
class StreamEntry:
    id: int
    name: str
    production_id: int
    production_name: str
    passphrase: str
    pbkeylen: int
    label: str
    latency_ms: int | None = None  # None: the server's srt.latency_ms


@dataclass(frozen=True, slots=True)
class ProductionEntry:
    id: int
    name: str


@dataclass(frozen=True, slots=True)
class Snapshot:
    streams: dict[str, StreamEntry] = field(default_factory=dict)
    productions: dict[int, ProductionEntry] = field(default_factory=dict)
    production_names: dict[str, int] = field(default_factory=dict)
    members: dict[tuple[int, int], str] = field(default_factory=dict)
    revoked: frozenset[str] = frozenset()
    loaded_at: float = 0.0
    #: Refresh-token families (access tokens' ``sid``) ended by a logout or
    #: a theft response: revoked without a successor (a rotation sets
    #: ``replaced_by``).
    ended_sessions: frozenset[str] = frozenset()


class Directory:
    def __init__(self, db: Any, *, refresh_s: float = 30.0, session_window_s: float = 905.0) -> None:
        self.db = db
        self.refresh_s = refresh_s
        #: How long an ended login stays on the denylist: the access-token
        #: lifetime plus clock leeway; after that its tokens are expired anyway.
        self.session_window_s = session_window_s
        self.snap = Snapshot()
        #: Called (synchronously) after every successful reload.
        self.on_change: list[Callable[[Snapshot], None]] = []
        #: Open sessions' credentials, re-checked after every change.
        self.grants = Grants()
        #: Stream name → its ``settings`` jsonb (per-stream QC/captions,
        #: server.stream_settings), swapped whole on every reload.
        self.stream_settings: dict[str, Any] = {}
        #: Called (synchronously) with ``stream_settings`` after every reload;
        #: the streams trigger's NOTIFY covers a settings change on any node.
        self.on_settings: list[Callable[[dict[str, Any]], None]] = []
        self.reloads = 0
        self.reload_failures = 0
        self._dirty = False
        self._reloading: asyncio.Task | None = None
        self._timer: asyncio.Task | None = None

    async def start(self) -> None:
        await self.reload()
        await self.db.listen(CHANNEL, self._on_notify)
        self.db.on_reconnect.append(self.reload)
        self._timer = asyncio.get_running_loop().create_task(self._periodic(), name="directory-refresh")

    async def stop(self) -> None:
        for t in (self._timer, self._reloading):
            await cancel_and_wait(t)
        self._timer = self._reloading = None

    # -- loading ---------------------------------------------------------------------

    async def reload(self) -> None:
        """Read the four tables in one snapshot transaction; swap them in."""
        async with self.db.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            streams = await conn.fetch(
                """SELECT s.id, s.name, s.production_id, p.name AS production_name, s.passphrase, s.pbkeylen,
                          s.label, s.latency_ms, s.settings
                   FROM streams s JOIN productions p ON p.id = s.production_id""")
            prods = await conn.fetch("SELECT id, name FROM productions ORDER BY id")
            members = await conn.fetch("SELECT production_id, user_id, role FROM production_members")
            revoked = await conn.fetch("SELECT jti FROM revoked_links WHERE expires_at > now()")
            ended = await conn.fetch(
                """SELECT DISTINCT family FROM refresh_tokens WHERE replaced_by IS NULL
                   AND revoked_at > now() - make_interval(secs => $1)""", float(self.session_window_s))
        names: dict[str, int] = {}
        for r in prods:
            names.setdefault(r["name"], r["id"])  # lowest id wins, as repo.find_production's ORDER
        snap = Snapshot(
            streams={r["name"]: StreamEntry(r["id"], r["name"], r["production_id"], r["production_name"],
                                            r["passphrase"], r["pbkeylen"], r["label"] or "", r["latency_ms"])
                     for r in streams},
            productions={r["id"]: ProductionEntry(r["id"], r["name"]) for r in prods},
            production_names=names,
            members={(r["production_id"], r["user_id"]): r["role"] for r in members},
            revoked=frozenset(r["jti"] for r in revoked),
            loaded_at=time.time(),
            ended_sessions=frozenset(str(r["family"]) for r in ended),
        )
        self.snap = snap
        self.stream_settings = {r["name"]: r["settings"] for r in streams}
        self.reloads += 1
        for cb in list(self.on_change):
            cb(snap)
        self.grants.sweep(snap)
        for settings_cb in list(self.on_settings):
            settings_cb(self.stream_settings)

    def _on_notify(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        # Coalesce bursts: at most one reload running and one queued.
        if self._reloading is not None and not self._reloading.done():
            self._dirty = True
            return
        self._reloading = asyncio.get_running_loop().create_task(self._reload_logged())

    async def _reload_logged(self) -> None:
        while True:
            self._dirty = False
            try:
                await self.reload()
            except Exception as exc:  # the reconnect reload catches up later
                self.reload_failures += 1
                event(log, logging.WARNING, "directory.reload_failed", error=f"{type(exc).__name__}: {exc}")
                return
            if not self._dirty:
                return

    async def _periodic(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            if self.db.available:
                await self._reload_logged()

    # -- lookups (any thread) --------------------------------------------------------------

    def stream(self, name: str) -> StreamEntry | None:
        return self.snap.streams.get(name)

    def production(self, ref: str | int) -> ProductionEntry | None:
        snap = self.snap
        if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit() and len(ref) <= 18):
            found = snap.productions.get(int(ref))
            if found is not None or isinstance(ref, int):
                return found
        pid = snap.production_names.get(str(ref))
        return snap.productions.get(pid) if pid is not None else None

    def member_role(self, production_id: int, user_id: int) -> str | None:
        return self.snap.members.get((production_id, user_id))

    def is_revoked(self, jti: str) -> bool:
        return jti in self.snap.revoked

    def link_problem(self, link: Any, entry: StreamEntry | None) -> str | None:
        """Why a signed link no longer opens anything (issue 9 item 2), or
        None: revoked, minted before links were bound to a stream id, or
        its stream deleted (a new stream of the same name is another one)."""
        if link.jti in self.snap.revoked:
            return "link revoked"
        if link.stream_id is None:
            return "link from before stream binding; ask for a new one"
        if entry is None or entry.id != link.stream_id or entry.production_id != link.production_id:
            return "the link's stream was deleted"
        return None

    def note_revoked(self, jti: str) -> None:
        """This node revoked a link: effective here before the NOTIFY round trip."""
        snap = self.snap
        self.snap = Snapshot(snap.streams, snap.productions, snap.production_names, snap.members,
                             snap.revoked | {jti}, snap.loaded_at, snap.ended_sessions)
        for cb in list(self.on_change):
            cb(self.snap)
        self.grants.sweep(self.snap)

    def session_ended(self, sid: str) -> bool:
        return sid in self.snap.ended_sessions

    def note_session_ended(self, sid: str) -> None:
        """This node ended a login: its access tokens fail here at once,
        before the NOTIFY round trip."""
        snap = self.snap
        self.snap = Snapshot(snap.streams, snap.productions, snap.production_names, snap.members,
                             snap.revoked, snap.loaded_at, snap.ended_sessions | {sid})
