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
* **Persistence**: every change is queued (never awaited by the hub) and a
  writer task appends it to ``tally_events`` (who, origin, changed sources)
  and upserts ``tally_state``; the state is restored from there on restart.
  While the database is away the queue holds the changes, in
  order, up to ``database.write_queue_max`` per production (beyond it the
  oldest is dropped, counted in ``returnfeed_tally_writes_dropped`` and
  logged), and the writer retries the same batch once the database is back.
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

The configuration object (``PUT /api/v1/productions/{id}/tally/config``)::

    {"transition_s": 1.0,
     "sources": {"cam1": {"label": "Cam 1"},
                 "vt": {"authority": "vmix", "vmix_input": 3}},
     "adapters": [{"type": "vmix", "host": "10.0.0.5", "port": 8099},
                  {"type": "obs", "url": "ws://10.0.0.6:4455", "password": "…"},
                  {"type": "tsl_in", "version": 5, "transport": "udp", "port": 9800,
                   "authority": "tsl:studio", "addresses": {"1": "cam1"}},
                  {"type": "tsl_out", "version": 3, "transport": "udp", "host": "10.0.0.9",
                   "port": 9801, "addresses": {"cam1": 1, "cam2": 2}}]}
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable

import asyncpg
from prometheus_client import Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from tally.errors import ConfigError, SnapshotError, TallyError
from tally.hub import TallyHub
from tally.obs import ObsClient
from tally.state import DIRECTOR, SourceConfig, TallyChange, TallyState
from tally.tsl import TslInput, TslOutput
from tally.vmix import VmixClient

from .db import is_connection_error
from .errors import DatabaseUnavailable
from .log import event

log = logging.getLogger("returnfeed.tally")

CHANNEL = "returnfeed_tally"
MAX_PENDING = 10_000
#: Tries of one batch while the database answers the probe but the write
#: keeps failing for a reason that is not the row itself.
PERSIST_ATTEMPTS = 20
ADAPTER_TYPES = ("vmix", "obs", "tsl_in", "tsl_out")


class TallyConfigError(ValueError):
    """The production's tally configuration is invalid (message says where)."""


def validate_config(cfg: Any) -> dict[str, Any]:
    """Check a tally configuration object completely; return it normalised.

    Everything an adapter needs to start is checked here (types, ports
    1..65535, address maps), so what is stored can be started: a PUT is
    refused before anything is written (issue 9, item 16)."""
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise TallyConfigError("tally config must be an object")
    unknown = set(cfg) - {"transition_s", "sources", "adapters"}
    if unknown:
        raise TallyConfigError(f"unknown tally config keys: {', '.join(sorted(unknown))}")
    out: dict[str, Any] = {}
    if "transition_s" in cfg:
        out["transition_s"] = _transition(cfg["transition_s"])
    out["sources"] = _validate_sources(cfg.get("sources", {}))
    adapters = cfg.get("adapters", [])
    if not isinstance(adapters, list) or len(adapters) > 16:
        raise TallyConfigError("adapters must be a list of at most 16 adapters")
    out["adapters"] = [validate_adapter(i, a) for i, a in enumerate(adapters)]
    return out


def _transition(t: Any) -> float:
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 60:
        raise TallyConfigError("transition_s must be a number of seconds, 0..60")
    return float(t)


def _validate_sources(sources: Any) -> dict[str, Any]:
    if not isinstance(sources, dict):
        raise TallyConfigError("sources must be an object of name → settings")
    if len(sources) > 256:
        raise TallyConfigError("sources must name at most 256 sources")
    for name, s in sources.items():
        _validate_source(name, s)
    return sources


def _validate_source(name: str, s: Any) -> None:
    if not isinstance(s, dict):
        raise TallyConfigError(f"sources.{name} must be an object")
    try:
        SourceConfig.from_dict({"name": name, **s})
    except (ConfigError, TypeError) as exc:
        raise TallyConfigError(f"sources.{name}: {exc}") from None


#: Keys each adapter type takes (``type`` included), and the default port of
#: those that have one.
_ADAPTER_KEYS = {
    "vmix": {"type", "host", "port", "authority"},
    "obs": {"type", "url", "password", "authority"},
    "tsl_in": {"type", "version", "transport", "host", "port", "authority", "addresses", "lost_after"},
    "tsl_out": {"type", "version", "transport", "host", "port", "addresses"},
}


def _port(i: int, a: dict[str, Any], *, required: bool) -> None:
    if "port" not in a and not required:
        return
    port = a.get("port")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise TallyConfigError(f"adapters[{i}].port must be 1..65535")


def _text(i: int, a: dict[str, Any], key: str, *, required: bool, max_len: int = 255) -> None:
    if key not in a and not required:
        return
    value = a.get(key)
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise TallyConfigError(f"adapters[{i}].{key} must be a non-empty string of at most {max_len} characters")


def _tsl_address(i: int, address: Any, version: int) -> int:
    # TSL 3.1: "Display address (0~126)"; TSL 5.0: INDEX 0..65534 (0xFFFF broadcast).
    limit = 126 if version == 3 else 0xFFFE
    if isinstance(address, str) and address.isascii() and address.isdigit() and len(address) <= 5:
        address = int(address)
    if isinstance(address, bool) or not isinstance(address, int) or not 0 <= address <= limit:
        raise TallyConfigError(f"adapters[{i}].addresses: TSL {'3.1' if version == 3 else '5.0'} "
                               f"addresses are 0..{limit}")
    return address


def validate_adapter(i: int, a: Any) -> dict[str, Any]:
    """Check one adapter of a configuration (``i`` is its index, for messages)."""
    if not isinstance(a, dict) or a.get("type") not in ADAPTER_TYPES:
        raise TallyConfigError(f"adapters[{i}].type must be one of {', '.join(ADAPTER_TYPES)}")
    t = a["type"]
    unknown = set(a) - _ADAPTER_KEYS[t]
    if unknown:
        raise TallyConfigError(f"adapters[{i}] ({t}) has unknown keys: {', '.join(sorted(map(str, unknown)))}")
    if "authority" in a:
        _text(i, a, "authority", required=True, max_len=64)
    if t == "vmix":
        _text(i, a, "host", required=True)
        _port(i, a, required=False)
    elif t == "obs":
        _text(i, a, "url", required=True, max_len=2048)
        if not a["url"].startswith(("ws://", "wss://")):
            raise TallyConfigError(f"adapters[{i}].url must be ws://host:port or wss://host:port")
        if a.get("password") is not None:
            _text(i, a, "password", required=True, max_len=1024)
    else:
        version = a.get("version", 5)
        if isinstance(version, bool) or version not in (3, 5):
            raise TallyConfigError(f"adapters[{i}].version must be 3 or 5")
        if a.get("transport", "udp") not in ("udp", "tcp"):
            raise TallyConfigError(f"adapters[{i}].transport must be udp or tcp")
        _port(i, a, required=True)
        _text(i, a, "host", required=t == "tsl_out")
        addresses = a.get("addresses")
        if addresses is not None and not isinstance(addresses, dict):
            raise TallyConfigError(f"adapters[{i}].addresses must be an object")
        if t == "tsl_in":
            lost = a.get("lost_after")
            if lost is not None and (
                    isinstance(lost, bool) or not isinstance(lost, (int, float)) or not 0 < lost <= 86400):
                raise TallyConfigError(f"adapters[{i}].lost_after must be seconds of silence, > 0 (or null: never)")
            for address, names in (addresses or {}).items():
                _tsl_address(i, address, version)
                names = [names] if isinstance(names, str) else names
                if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
                    raise TallyConfigError(f"adapters[{i}].addresses maps a TSL address to a source name "
                                           "(or a list of them)")
        else:
            for name, address in (addresses or {}).items():
                _tsl_address(i, address, version)
    return a


def load_config(raw: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """What can be used of a *stored* configuration, and what cannot.

    A configuration stored before the checks above (or by hand) must not take
    the production's tally down: an unusable source or adapter is left out
    and reported (``problems``), the rest works."""
    problems: list[dict[str, Any]] = []
    try:
        return validate_config(raw), problems
    except TallyConfigError:
        pass
    if not isinstance(raw, dict):
        return {}, [{"error": "tally config must be an object"}]
    out: dict[str, Any] = {"sources": {}, "adapters": []}
    try:
        out["transition_s"] = _transition(raw.get("transition_s", 1.0))
    except TallyConfigError as exc:
        problems.append({"error": str(exc)})
    sources = raw.get("sources", {})
    for name, s in (sources.items() if isinstance(sources, dict) else ()):
        try:
            _validate_source(name, s)
            out["sources"][name] = s
        except TallyConfigError as exc:
            problems.append({"source": name, "error": str(exc)})
    adapters = raw.get("adapters", [])
    for i, a in enumerate(adapters[:16] if isinstance(adapters, list) else ()):
        try:
            out["adapters"].append(validate_adapter(i, a))
        except TallyConfigError as exc:
            problems.append({"adapter": i, "type": a.get("type") if isinstance(a, dict) else None,
                             "error": str(exc)})
    return out, problems


_DEFAULT_AUTHORITY = {"vmix": "vmix", "obs": "obs", "tsl_in": "tsl"}


def adapter_key(spec: dict[str, Any], sources: Iterable[SourceConfig]) -> str:
    """What an adapter depends on: its own settings and the definitions of
    the sources it maps (an input: the sources of its authority; a TSL
    output: every source's name and address). Same key → the running
    adapter is kept when a configuration is applied."""
    if spec["type"] == "tsl_out":
        relevant: list[Any] = [[s.name, s.tsl_address] for s in sources]
    else:
        authority = spec.get("authority", _DEFAULT_AUTHORITY[spec["type"]])
        relevant = [s.to_dict() for s in sources if s.authority == authority]
    return json.dumps([spec, relevant], sort_keys=True)


@dataclass(slots=True)
class _Adapter:
    spec: dict[str, Any]
    obj: Any
    kind: str
    authority: str | None
    key: str = ""

    @property
    def connected(self) -> bool | None:
        return getattr(self.obj, "synced", None)


@dataclass(slots=True)
class ProductionTally:
    service: "TallyService"
    production_id: int
    name: str
    state: TallyState
    hub: TallyHub
    adapters: list[_Adapter] = field(default_factory=list)
    pending: deque = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    writer: asyncio.Task | None = None
    dropped: int = 0
    deferred: int = 0
    failed: int = 0
    closed: bool = False
    stream_names: list[str] = field(default_factory=list)
    #: What of the stored configuration could not be used or started
    #: (``load_config``, adapter start failures); shown in the snapshot.
    problems: list[dict[str, Any]] = field(default_factory=list)

    def on_change(self, change: TallyChange) -> None:
        """State listener: queue for the writer, never await (hub runs first)."""
        if change.origin == "peer":
            return  # another node wrote it already
        self.pending.append((change, self.state.to_dict()))
        self._trim()
        self.wake.set()

    def _trim(self) -> None:
        limit = self.service.queue_max
        if len(self.pending) > limit:
            n = len(self.pending) - limit
            for _ in range(n):
                self.pending.popleft()
            self.dropped += n
            event(log, logging.ERROR, "tally.writes_dropped", production=self.production_id, dropped=n,
                  total_dropped=self.dropped, queue_max=limit)

    async def write_loop(self) -> None:
        db = self.service.db
        attempts = 0  # of the batch at the head of the queue, while the database seems up
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.pending:
                batch = list(self.pending)[:500]
                for _ in batch:
                    self.pending.popleft()
                try:
                    await self.service.persist(self, batch)
                    attempts = 0
                except Exception as exc:
                    attempts += 1
                    refused = (isinstance(exc, asyncpg.PostgresError) and not is_connection_error(exc)
                               and not isinstance(exc, DatabaseUnavailable))
                    if refused or attempts > PERSIST_ATTEMPTS:
                        # A row the database refuses would block the queue
                        # forever; later writes carry the latest state.
                        event(log, logging.ERROR, "tally.persist_failed", production=self.production_id,
                              error=f"{type(exc).__name__}: {exc}", changes=len(batch), attempts=attempts)
                        self.failed += len(batch)
                        attempts = 0
                        continue
                    # Put the batch back in front, in order, and retry once
                    # the supervisor sees the database again.
                    self.pending.extendleft(reversed(batch))
                    self._trim()
                    self.deferred += 1
                    if self.closed:
                        event(log, logging.ERROR, "tally.writes_lost_at_shutdown", production=self.production_id,
                              changes=len(self.pending))
                        return
                    if db.available:
                        await asyncio.sleep(min(0.25 * attempts, 2.0))  # lost a race with the probe
                    while not db.available and not self.closed:
                        try:
                            await asyncio.wait_for(db.wait_available(), 1.0)
                        except asyncio.TimeoutError:
                            pass
            if self.closed and not self.pending:
                return

    async def close(self) -> None:
        self.closed = True
        for a in self.adapters:
            try:
                await a.obj.close()
            except Exception:
                log.exception("tally.adapter_close_failed")
        self.hub.close()
        self.wake.set()
        if self.writer is not None:
            try:
                await asyncio.wait_for(self.writer, 5)
            except (asyncio.TimeoutError, Exception):
                self.writer.cancel()


class TallyService:
    def __init__(self, db: Any, *, queue_max: int = MAX_PENDING) -> None:
        self.db = db
        self.queue_max = queue_max
        self.node = secrets.token_hex(6)
        self.productions: dict[int, ProductionTally] = {}
        self._locks: dict[int, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task] = set()
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
        for task in list(self._tasks):
            task.cancel()
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
        rows = await self.db.pool.fetch("SELECT production_id, array_agg(name ORDER BY id) AS names "
                                        "FROM streams GROUP BY production_id")
        names = {r["production_id"]: list(r["names"]) for r in rows}
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
            running: dict[str, list[_Adapter]] = {}
            for a in p.adapters:
                running.setdefault(a.key, []).append(a)
            plan: list[tuple[dict[str, Any], _Adapter | None]] = []
            for spec in specs:
                same = running.get(adapter_key(spec, sources))
                plan.append((spec, same.pop() if same else None))
            for a in (a for group in running.values() for a in group):
                try:
                    await a.obj.close()
                except Exception:
                    log.exception("tally.adapter_close_failed")
            p.state.reconfigure(sources, default_transition=cfg.get("transition_s", 1.0), now=time.monotonic())
            p.stream_names = [s["name"] for s in streams]
            adapters = []
            for i, (spec, kept) in enumerate(plan):
                if kept is not None:
                    adapters.append(kept)
                    continue
                try:
                    adapters.append(await self._start_adapter(p.state, spec))
                except Exception as exc:  # a switcher that cannot start is reported, never fatal
                    problems.append(self._adapter_failed(production_id, i, spec, exc))
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
        prod = await pool.fetchrow("SELECT name, settings FROM productions WHERE id = $1", production_id)
        if prod is None:
            raise KeyError(production_id)
        settings = prod["settings"] if isinstance(prod["settings"], dict) else json.loads(prod["settings"] or "{}")
        streams = await pool.fetch("SELECT name, label FROM streams WHERE production_id = $1 ORDER BY id",
                                   production_id)
        return (prod["name"], streams, *self._configure(production_id, settings.get("tally"), streams))

    async def _load(self, production_id: int) -> ProductionTally:
        pool = self.db.pool
        name, streams, cfg, sources, problems = await self._read_config(production_id)
        row = await pool.fetchrow("SELECT seq, state FROM tally_state WHERE production_id = $1", production_id)
        state = None
        if row is not None:
            saved = row["state"] if isinstance(row["state"], dict) else json.loads(row["state"])
            try:
                state = TallyState.from_dict(saved, sources=sources)
            except SnapshotError as exc:
                event(log, logging.WARNING, "tally.restore_failed", production=production_id, error=str(exc))
        if state is None:
            seq = row["seq"] if row is not None else 0
            state = TallyState(name, sources, default_transition=cfg.get("transition_s", 1.0), seq=seq)
        hub = TallyHub(state)
        hub.on_delivered = lambda seconds, clients: self.delivered.observe(seconds)
        p = ProductionTally(self, production_id, name, state, hub,
                            stream_names=[s["name"] for s in streams], problems=problems)
        state.add_listener(p.on_change)
        hub.start()
        p.writer = asyncio.get_running_loop().create_task(p.write_loop(), name=f"tally-writer-{production_id}")
        for i, spec in enumerate(cfg.get("adapters", [])):
            try:
                p.adapters.append(await self._start_adapter(state, spec))
            except Exception as exc:  # a switcher that cannot start is reported, never fatal
                p.problems.append(self._adapter_failed(production_id, i, spec, exc))
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

    @staticmethod
    def _adapter_failed(production_id: int, index: int, spec: dict[str, Any], exc: Exception) -> dict[str, Any]:
        event(log, logging.ERROR, "tally.adapter_failed", production=production_id, type=spec.get("type"),
              error=f"{type(exc).__name__}: {exc}")
        return {"adapter": index, "type": spec.get("type"), "error": str(exc) or type(exc).__name__}

    async def check(self, production_id: int, cfg: dict[str, Any]) -> None:
        """Raise :class:`TallyConfigError` unless ``cfg`` (validated) would
        start with the production's streams: sources built, every adapter
        constructed against a scratch state (its mappings checked), nothing
        started or opened."""
        streams = await self.db.pool.fetch("SELECT name, label FROM streams WHERE production_id = $1 ORDER BY id",
                                           production_id)
        try:
            state = TallyState("check", self._sources(streams, cfg),
                               default_transition=cfg.get("transition_s", 1.0))
        except (TallyError, TypeError, ValueError) as exc:
            raise TallyConfigError(f"sources: {exc}") from None
        for i, spec in enumerate(cfg.get("adapters", [])):
            try:
                self._build_adapter(state, spec)
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

    async def _start_adapter(self, state: TallyState, spec: dict[str, Any]) -> _Adapter:
        adapter = self._build_adapter(state, spec)
        adapter.key = adapter_key(spec, state.sources.values())
        obj, t = adapter.obj, adapter.kind
        if t in ("vmix", "obs"):
            obj.start()
        elif t == "tsl_in":
            host, port = spec.get("host", "0.0.0.0"), int(spec.get("port", 0))
            if spec.get("transport", "udp") == "tcp":
                await obj.listen_tcp(host, port)
            else:
                await obj.listen_udp(host, port)
        elif spec.get("transport", "udp") == "tcp":
            await obj.start_tcp(spec["host"], int(spec["port"]))
        else:
            await obj.start_udp(spec["host"], int(spec["port"]))
        return adapter

    @staticmethod
    def _build_adapter(state: TallyState, spec: dict[str, Any]) -> _Adapter:
        """Construct (not start) an adapter: mappings are checked against
        ``state``; no socket is opened."""
        t = spec["type"]
        if t == "vmix":
            authority = spec.get("authority", "vmix")
            obj: Any = VmixClient(state, spec["host"], int(spec.get("port", 8099)), authority=authority)
            return _Adapter(spec, obj, t, authority)
        if t == "obs":
            authority = spec.get("authority", "obs")
            obj = ObsClient(state, spec["url"], password=spec.get("password"), authority=authority)
            return _Adapter(spec, obj, t, authority)
        version = int(spec.get("version", 5))
        if t == "tsl_in":
            authority = spec.get("authority", "tsl")
            addresses = {int(k): v for k, v in (spec.get("addresses") or {}).items()} or None
            obj = TslInput(state, authority=authority, version=version, addresses=addresses,
                           lost_after=spec.get("lost_after"))
            return _Adapter(spec, obj, t, authority)
        obj = TslOutput(state, version=version, addresses=spec.get("addresses") or None)
        return _Adapter(spec, obj, t, None)

    # -- persistence and clustering ---------------------------------------------------

    async def persist(self, p: ProductionTally, batch: list[tuple[TallyChange, dict[str, Any]]]) -> None:
        start = time.monotonic()
        last_change, snapshot = batch[-1]
        async with self.db.pool.acquire() as conn, conn.transaction():
            await conn.executemany(
                """INSERT INTO tally_events (production_id, seq, changes, actor, origin)
                   VALUES ($1, $2, $3::jsonb, $4, $5)""",
                [(p.production_id, c.seq, json.dumps({n: st.to_json() for n, st in c.sources.items()}),
                  c.who[:200], c.origin) for c, _ in batch],
            )
            stored = await conn.fetchval(
                """INSERT INTO tally_state (production_id, seq, state) VALUES ($1, $2, $3::jsonb)
                   ON CONFLICT (production_id) DO UPDATE SET seq = EXCLUDED.seq, state = EXCLUDED.state,
                          updated_at = now()
                   WHERE tally_state.seq < EXCLUDED.seq
                   RETURNING seq""",
                p.production_id, last_change.seq, json.dumps(snapshot),
            )
            if stored is not None:
                await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, json.dumps(
                    {"production": p.production_id, "seq": stored, "node": self.node}))
        self.persisted.observe(time.monotonic() - start)
        if stored is None:
            # Another node wrote this sequence number first: converge on its state.
            event(log, logging.WARNING, "tally.conflict", production=p.production_id, seq=last_change.seq)
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
        if p is None or p.closed or seq <= p.state.seq:
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
        return sum(len(p.pending) for p in self.productions.values())

    def dropped_writes(self) -> int:
        return sum(p.dropped for p in self.productions.values())

    async def _adopt_from_db(self, p: ProductionTally) -> None:
        row = await self.db.pool.fetchrow("SELECT state FROM tally_state WHERE production_id = $1", p.production_id)
        if row is None:
            return
        saved = row["state"] if isinstance(row["state"], dict) else json.loads(row["state"])
        try:
            p.state.adopt(saved, now=time.monotonic())
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
            queued.add_metric(label, len(p.pending))
            dropped.add_metric(label, p.dropped)
            for a in p.adapters:
                c = a.connected
                if c is not None:
                    adapters.add_metric([str(p.production_id), a.kind], 1 if c else 0)
        yield from (clients, seq, adapters, missing, slow, deltas, queued, dropped)
        yield from self.persisted.collect()
        yield from self.delivered.collect()

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
