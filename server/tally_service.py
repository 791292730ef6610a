"""Tally wiring: per-production state + hub + adapters, persistence, clustering.

One :class:`ProductionTally` per production, created on first use:

* **Sources** are the production's streams (driven by the director) plus
  the sources listed in the production's tally configuration
  (``productions.settings["tally"]``), which may also hand a source to an
  external switcher (vMix input, OBS scenes, TSL address).
* **Adapters** from the same configuration: ``vmix``, ``obs``, ``tsl_in``
  (UDP/TCP listener), ``tsl_out`` (UDP/TCP to displays/multiviewers).
* **Configuration changes** (``apply``) happen in place: the state machine
  replaces its source definitions as one sequenced change, unchanged
  adapters keep running, and clients stay connected.
* **Persistence**: every change is queued (never awaited by the hub) by the
  production's :class:`~server.tally_persist.TallyPersister`, whose writer
  task appends it to ``tally_events`` (who, origin, changed sources) and
  upserts ``tally_state`` through :meth:`TallyService.persist`; the state is
  restored from there on restart.
* **Several nodes** share one database: after writing, the writer sends
  ``NOTIFY returnfeed_tally`` with the production and sequence number; the
  other nodes read the row and :meth:`~tally.state.TallyState.adopt` it, so
  their clients get the same change with the same ``seq``. The row is only
  written when its ``seq`` is lower than ours; if another node got there
  first, this node adopts the stored state instead (last writer loses,
  every node converges on the database's order). The ``LISTEN`` rides on the
  database supervisor's connection, so it is re-subscribed after a restart
  or failover, and every loaded production then re-reads ``tally_state``
  (notifications sent while disconnected are lost): no node keeps a stale
  program.

The configuration itself (what ``PUT /api/v1/productions/{id}/tally/config``
takes) is described and checked in :mod:`server.tally_config`, the adapters
built from it in :mod:`server.tally_adapters`; all SQL is in
:mod:`server.repo`.

    TallyService ─┬─ ProductionTally (one per production)
                  │    ├─ TallyState ── TallyHub (WebSocket clients)
                  │    ├─ RunningAdapter… (vMix, OBS, TSL in/out)
                  │    └─ TallyPersister ── writer task → persist()
                  └─ LISTEN returnfeed_tally → adopt tasks (owned, awaited on stop)
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from prometheus_client import Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from tally.errors import SnapshotError, TallyError
from tally.hub import TallyHub
from tally.protocol import Command
from tally.state import DIRECTOR, SourceConfig, TallyChange, TallyState

from . import repo
from .log import event
from .tally_adapters import RunningAdapter, adapter_failed, adapter_key, build_adapter, close_adapter, start_adapter
from .tally_config import TallyConfigError, load_config, validate_config
from .tally_persist import Batch, TallyPersister
from .tasks import cancel_and_wait

log = logging.getLogger("returnfeed.tally")

CHANNEL = "returnfeed_tally"
MAX_PENDING = 10_000


@dataclass(slots=True)
class ProductionTally:
    """One production's live tally: state, hub, adapters and persister."""

    production_id: int
    name: str
    state: TallyState
    hub: TallyHub
    persister: TallyPersister
    adapters: list[RunningAdapter] = field(default_factory=list)
    closed: bool = False
    stream_names: list[str] = field(default_factory=list)
    #: What of the stored configuration could not be used or started
    #: (``load_config``, adapter start failures); shown in the snapshot.
    problems: list[dict[str, Any]] = field(default_factory=list)

    async def close(self) -> None:
        """Adapters, then clients (1001), then the writer (drains what it can)."""
        self.closed = True
        for a in self.adapters:
            await close_adapter(self.production_id, a)
        self.hub.close()
        await self.persister.close()


class TallyService:
    """Every production's tally on this node (see the module docstring)."""

    def __init__(self, db: Any, *, queue_max: int = MAX_PENDING) -> None:
        self.db = db
        self.queue_max = queue_max
        self.node = secrets.token_hex(6)
        self.productions: dict[int, ProductionTally] = {}
        self._locks: dict[int, asyncio.Lock] = {}
        #: Adopt tasks started by notifications: kept here, cancelled and
        #: awaited by ``stop``.
        self._tasks: set[asyncio.Task] = set()
        self._stopping = False
        self.persisted = Histogram(
            "returnfeed_tally_persist_seconds", "Tally change to its database write (audit) completing",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1), registry=None)
        self.delivered = Histogram(
            "returnfeed_tally_delivery_seconds",
            "Tally change to its frame written to every connected client's socket",
            buckets=(0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.025, 0.05, 0.1, 0.25), registry=None)
        self.notifications = 0

    async def start(self) -> None:
        await self.db.listen(CHANNEL, self._on_notify)
        self.db.on_reconnect.append(self.resync)

    async def stop(self) -> None:
        self._stopping = True  # no new adopt task from here on
        await asyncio.gather(*(cancel_and_wait(t) for t in list(self._tasks)))
        for p in list(self.productions.values()):
            await p.close()
        self.productions.clear()

    async def resync(self) -> None:
        """The database is back: take any state another node stored while
        this one could not hear its notifications."""
        for p in list(self.productions.values()):
            if not p.closed:
                await self._adopt_from_db(p)

    # -- productions ---------------------------------------------------------------

    async def get(self, production_id: int) -> ProductionTally:
        p = self.productions.get(production_id)
        if p is not None and not p.closed:
            return p
        lock = self._locks.setdefault(production_id, asyncio.Lock())
        async with lock:
            p = self.productions.get(production_id)
            if p is None or p.closed:
                p = await self._load(production_id)
                self.productions[production_id] = p
        return p

    async def reload(self, production_id: int) -> None:
        """Drop the production's tally (clients are closed with 1001 and
        reconnect); the next ``get`` rebuilds it. Configuration changes use
        ``apply``, which keeps clients connected."""
        p = self.productions.pop(production_id, None)
        if p is not None:
            await p.close()

    async def on_streams_changed(self) -> None:
        """Streams were added, renamed or removed: apply the new source list
        to the productions whose streams no longer match (in place)."""
        names = await repo.stream_names_by_production(self.db.pool)
        for pid, p in list(self.productions.items()):
            if p.stream_names != names.get(pid, []):
                await self.apply(pid)

    async def apply(self, production_id: int) -> ProductionTally:
        """Apply the stored configuration and stream list to a running
        production in place (issue 10: a PUT of the tally config must not
        disconnect anybody or wipe state).

        The hub, its clients and the writer stay. Adapters whose key
        (``adapter_key``) is unchanged keep running, so their sources keep
        what they reported; changed or removed ones are closed (their
        sources turn ``unknown`` as a normal delta) and new ones started
        after the sources are replaced. Every visible effect goes through
        the state machine, so clients get ordinary deltas with the next
        ``seq``, and the writer records them (origin ``config``)."""
        p = self.productions.get(production_id)
        if p is None or p.closed:
            return await self.get(production_id)
        lock = self._locks.setdefault(production_id, asyncio.Lock())
        async with lock:
            _name, streams, cfg, sources, problems = await self._read_config(production_id)
            specs = cfg.get("adapters", [])
            running: dict[str, list[RunningAdapter]] = {}
            for a in p.adapters:
                running.setdefault(a.key, []).append(a)
            plan: list[tuple[dict[str, Any], RunningAdapter | None]] = []
            for spec in specs:
                same = running.get(adapter_key(spec, sources))
                plan.append((spec, same.pop() if same else None))
            for a in (a for group in running.values() for a in group):
                await close_adapter(production_id, a)
            p.state.reconfigure(sources, default_transition=cfg.get("transition_s", 1.0), now=time.monotonic())
            p.stream_names = [s["name"] for s in streams]
            adapters = []
            for i, (spec, kept) in enumerate(plan):
                if kept is not None:
                    adapters.append(kept)
                    continue
                try:
                    adapters.append(await start_adapter(p.state, spec))
                except Exception as exc:  # a switcher that cannot start is reported, never fatal
                    problems.append(adapter_failed(production_id, i, spec, exc))
            started = sum(1 for _, kept in plan if kept is None)
            p.adapters = adapters
            p.problems = problems
            event(log, logging.INFO, "tally.applied", production=production_id, sources=len(sources),
                  seq=p.state.seq, adapters_kept=len(plan) - started, adapters_started=started)
        return p

    async def _read_config(self, production_id: int
                           ) -> tuple[str, list[Any], dict[str, Any], list[SourceConfig], list[dict[str, Any]]]:
        """The production's name, its streams, the usable part of its tally
        config, the sources they make and what had to be left out (KeyError:
        no such production)."""
        pool = self.db.pool
        prod = await repo.production_name_settings(pool, production_id)
        if prod is None:
            raise KeyError(production_id)
        streams = await repo.stream_labels(pool, production_id)
        return (prod["name"], streams, *self._configure(production_id, (prod["settings"] or {}).get("tally"), streams))

    async def _load(self, production_id: int) -> ProductionTally:
        name, streams, cfg, sources, problems = await self._read_config(production_id)
        row = await repo.tally_state(self.db.pool, production_id)
        state = None
        if row is not None:
            try:
                state = TallyState.from_dict(row["state"], sources=sources)
            except SnapshotError as exc:
                event(log, logging.WARNING, "tally.restore_failed", production=production_id, error=str(exc))
        if state is None:
            seq = row["seq"] if row is not None else 0
            state = TallyState(name, sources, default_transition=cfg.get("transition_s", 1.0), seq=seq)
        hub = TallyHub(state)
        hub.on_delivered = lambda seconds, clients: self.delivered.observe(seconds)
        persister = TallyPersister(self.db, production_id, self.queue_max,
                                   write=functools.partial(self.persist, production_id), snapshot=state.to_dict)
        p = ProductionTally(production_id, name, state, hub, persister,
                            stream_names=[s["name"] for s in streams], problems=problems)
        state.add_listener(persister.on_change)
        hub.start()
        persister.start()
        for i, spec in enumerate(cfg.get("adapters", [])):
            try:
                p.adapters.append(await start_adapter(state, spec))
            except Exception as exc:  # a switcher that cannot start is reported, never fatal
                p.problems.append(adapter_failed(production_id, i, spec, exc))
        event(log, logging.INFO, "tally.loaded", production=production_id, sources=len(sources), seq=state.seq,
              adapters=len(p.adapters))
        return p

    def _configure(self, production_id: int, raw: Any, streams: list[Any]
                   ) -> tuple[dict[str, Any], list[SourceConfig], list[dict[str, Any]]]:
        """The usable part of a stored configuration, its sources, and what
        had to be left out (logged)."""
        cfg, problems = load_config(raw)
        try:
            sources = self._sources(streams, cfg)
            TallyState("check", sources)
        except (TallyError, TypeError, ValueError) as exc:
            problems.append({"error": f"sources: {exc}"})
            cfg = {**cfg, "sources": {}}
            sources = self._sources(streams, cfg)
        for problem in problems:
            event(log, logging.ERROR, "tally.config_unusable", production=production_id, **problem)
        return cfg, sources, problems

    async def check(self, production_id: int, cfg: dict[str, Any]) -> None:
        """Raise :class:`TallyConfigError` unless ``cfg`` (validated) would
        start with the production's streams: sources built, every adapter
        constructed against a scratch state (its mappings checked), nothing
        started or opened."""
        streams = await repo.stream_labels(self.db.pool, production_id)
        try:
            state = TallyState("check", self._sources(streams, cfg),
                               default_transition=cfg.get("transition_s", 1.0))
        except (TallyError, TypeError, ValueError) as exc:
            raise TallyConfigError(f"sources: {exc}") from None
        for i, spec in enumerate(cfg.get("adapters", [])):
            try:
                build_adapter(state, spec)
            except (TallyError, TypeError, ValueError) as exc:
                raise TallyConfigError(f"adapters[{i}] ({spec['type']}): {exc}") from None

    @staticmethod
    def _sources(streams: Iterable[Any], cfg: dict[str, Any]) -> list[SourceConfig]:
        extra = dict(cfg.get("sources", {}))
        out = []
        for s in streams:
            overrides = extra.pop(s["name"], {})
            out.append(SourceConfig.from_dict({"name": s["name"], "label": s["label"] or "", **overrides}))
        for name, spec in extra.items():
            out.append(SourceConfig.from_dict({"name": name, **spec}))
        return out

    # -- persistence and clustering ---------------------------------------------------

    async def persist(self, production_id: int, batch: Batch) -> None:
        """Store one batch of a production's changes (its persister's ``write``):
        the audit rows, the state unless another node stored a later one, and
        the cluster notification, in one transaction."""
        start = time.monotonic()
        last_change, snapshot = batch[-1]
        async with self.db.pool.acquire() as conn, conn.transaction():
            await repo.append_tally_events(conn, production_id, [
                (c.seq, {n: st.to_json() for n, st in c.sources.items()}, c.who[:200], c.origin) for c, _ in batch])
            stored = await repo.store_tally_state(conn, production_id, last_change.seq, snapshot)
            if stored is not None:
                await repo.notify(conn, CHANNEL, json.dumps(
                    {"production": production_id, "seq": stored, "node": self.node}))
        self.persisted.observe(time.monotonic() - start)
        if stored is None:
            # Another node wrote this sequence number first: converge on its state.
            event(log, logging.WARNING, "tally.conflict", production=production_id, seq=last_change.seq)
            p = self.productions.get(production_id)
            if p is not None and not p.closed:
                await self._adopt_logged(p)  # the batch is stored: never retried for a failed read

    def _on_notify(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        try:
            msg = json.loads(payload)
            production, seq, node = int(msg["production"]), int(msg["seq"]), str(msg["node"])
        except (ValueError, KeyError, TypeError):
            return
        self.notifications += 1
        if node == self.node:
            return
        p = self.productions.get(production)
        if p is None or p.closed or self._stopping or seq <= p.state.seq:
            return
        task = asyncio.get_running_loop().create_task(self._adopt_logged(p))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _adopt_logged(self, p: ProductionTally) -> None:
        try:
            await self._adopt_from_db(p)
        except Exception as exc:  # the resync after the database returns catches up
            event(log, logging.WARNING, "tally.adopt_deferred", production=p.production_id,
                  error=f"{type(exc).__name__}: {exc}")

    def pending_writes(self) -> int:
        return sum(len(p.persister.pending) for p in self.productions.values())

    def dropped_writes(self) -> int:
        return sum(p.persister.dropped for p in self.productions.values())

    async def _adopt_from_db(self, p: ProductionTally) -> None:
        row = await repo.tally_state(self.db.pool, p.production_id)
        if row is None:
            return
        try:
            p.state.adopt(row["state"], now=time.monotonic())
        except SnapshotError as exc:
            event(log, logging.WARNING, "tally.adopt_failed", production=p.production_id, error=str(exc))

    # -- observation -----------------------------------------------------------------------

    def collect(self) -> Iterable[Metric]:
        clients = GaugeMetricFamily("returnfeed_tally_clients", "Connected tally WebSocket clients",
                                    labels=["production"])
        seq = GaugeMetricFamily("returnfeed_tally_seq", "Tally sequence number", labels=["production"])
        adapters = GaugeMetricFamily("returnfeed_tally_adapter_connected",
                                     "1 when a switcher adapter is connected and in sync", labels=["production", "type"])
        missing = CounterMetricFamily("returnfeed_tally_clients_missing",
                                      "Clients closed for missing heartbeats", labels=["production"])
        slow = CounterMetricFamily("returnfeed_tally_clients_slow", "Clients closed for not keeping up",
                                   labels=["production"])
        deltas = CounterMetricFamily("returnfeed_tally_deltas", "Tally deltas broadcast", labels=["production"])
        queued = GaugeMetricFamily("returnfeed_tally_writes_queued",
                                   "Tally changes waiting for the database", labels=["production"])
        dropped = CounterMetricFamily("returnfeed_tally_writes_dropped",
                                      "Tally changes dropped because the write queue was full",
                                      labels=["production"])
        for p in list(self.productions.values()):
            label = [str(p.production_id)]
            clients.add_metric(label, len(p.hub.clients))
            seq.add_metric(label, p.state.seq)
            missing.add_metric(label, p.hub.stats.missing_closed)
            slow.add_metric(label, p.hub.stats.slow_closed)
            deltas.add_metric(label, p.hub.stats.deltas)
            queued.add_metric(label, len(p.persister.pending))
            dropped.add_metric(label, p.persister.dropped)
            for a in p.adapters:
                c = a.connected
                if c is not None:
                    adapters.add_metric([str(p.production_id), a.kind], 1 if c else 0)
        yield from (clients, seq, adapters, missing, slow, deltas, queued, dropped)
        yield from self.persisted.collect()
        yield from self.delivered.collect()

    def command(self, p: ProductionTally, command: Command, *, who: str) -> TallyChange | None:
        """A director's switching command from the REST route: the hub's
        command path, the one WebSocket clients use (raises ``CommandRejected``).
        The delta goes out with the hub's normal flush."""
        return p.hub.command(command, who=who)

    def snapshot(self, p: ProductionTally) -> dict[str, Any]:
        adapters = [{"type": a.kind, "authority": a.authority, "connected": a.connected} for a in p.adapters]
        # Adapters that could not be used or started: reported, never fatal.
        adapters += [{"type": f.get("type"), "authority": None, "connected": False, "error": f["error"]}
                     for f in p.problems if "adapter" in f]
        out = {"production": p.name, "production_id": p.production_id, "seq": p.state.seq,
               "program": p.state.program, "preview": p.state.preview,
               "sources": {n: st.to_json() for n, st in p.state.states().items()},
               "adapters": adapters}
        errors = [f for f in p.problems if "adapter" not in f]
        if errors:
            out["config_errors"] = errors
        return out


__all__ = ["TallyService", "ProductionTally", "validate_config", "load_config", "TallyConfigError", "DIRECTOR"]
