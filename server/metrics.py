"""Prometheus metrics, all named ``returnfeed_*``.

Each application owns its own :class:`CollectorRegistry` (tests run several
apps in one process). Values that already live elsewhere (pool size, uptime)
are read at scrape time by a collector rather than copied on every change.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import TYPE_CHECKING, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily, Metric,
)
from prometheus_client.registry import Collector

from media.histogram import GcPauses, LatencyCounts

if TYPE_CHECKING:
    from .db import Database

VERSION = "0.1.0"

#: This process's garbage-collector pauses; ``server.main`` installs it
#: once the server has started.
PROCESS_GC = GcPauses()


def gc_pause_family(by_process: dict[str, list[LatencyCounts]]) -> HistogramMetricFamily:
    """``returnfeed_gc_pause_seconds{process, generation}`` from each kind
    of process's per-generation counts."""
    fam = HistogramMetricFamily(
        "returnfeed_gc_pause_seconds",
        "Garbage-collector pauses (generation 2: full collections, which stall every viewer of the process)",
        labels=["process", "generation"])
    for process, generations in by_process.items():
        for gen, counts in enumerate(generations):
            fam.add_metric([process, str(gen)], counts.cumulative(), counts.total)
    return fam


class _DynamicCollector(Collector):
    def __init__(self, db: "Database", started: float) -> None:
        self.db = db
        self.started = started
        self.extra: list[Callable[[], Iterable[Metric]]] = []
        #: Each kind of process's garbage-collector pauses, per generation:
        #: one ``returnfeed_gc_pause_seconds`` family for all of them (a
        #: family named twice in one scrape is refused by Prometheus).
        self.gc_sources: dict[str, Callable[[], list[LatencyCounts]]] = {
            "server": lambda: PROCESS_GC.by_generation}

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily("returnfeed_uptime_seconds", "Seconds since the server started",
                                value=time.time() - self.started)
        yield gc_pause_family({process: fn() for process, fn in self.gc_sources.items()})
        info = InfoMetricFamily("returnfeed_build", "ReturnFeed build information")
        info.add_metric([], {"version": VERSION, "python": sys.version.split()[0]})
        yield info
        pool = self.db.pool
        size = GaugeMetricFamily("returnfeed_db_pool_connections", "Database pool connections",
                                 labels=["state"])
        if pool is not None:
            total = pool.get_size()
            idle = pool.get_idle_size()
            size.add_metric(["idle"], idle)
            size.add_metric(["busy"], total - idle)
        yield size
        yield GaugeMetricFamily("returnfeed_db_pool_max", "Database pool maximum size",
                                value=pool.get_max_size() if pool is not None else 0)
        db = self.db
        yield GaugeMetricFamily("returnfeed_db_available",
                                "1 while the database supervisor's last probe succeeded", value=1 if db.available else 0)
        yield CounterMetricFamily("returnfeed_db_outages", "Times the database became unavailable", value=db.outages)
        yield CounterMetricFamily("returnfeed_db_embedded_restarts", "Restarts of a dead embedded PostgreSQL",
                                  value=db.restarts)
        yield GaugeMetricFamily("returnfeed_db_deferred_writes", "Writes of live actions waiting for the database",
                                value=len(db.deferred))
        yield CounterMetricFamily("returnfeed_db_deferred_dropped",
                                  "Writes of live actions dropped because their queue was full",
                                  value=db.deferred.dropped)
        try:
            # Soak tests watch this for leaks: it must stay flat after warm-up.
            tasks = len(asyncio.all_tasks())
        except RuntimeError:  # scraped outside the event loop
            tasks = 0
        yield GaugeMetricFamily("returnfeed_asyncio_tasks", "asyncio tasks alive in the server's event loop",
                                value=tasks)
        for fn in self.extra:
            yield from fn()


class Metrics:
    def __init__(self, db: "Database") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.dynamic = _DynamicCollector(db, time.time())
        self.registry.register(self.dynamic)
        self.http_requests = Counter(
            "returnfeed_http_requests", "HTTP requests by route and status",
            ["method", "route", "status"], registry=self.registry,
        )
        self.http_duration = Histogram(
            "returnfeed_http_request_duration_seconds", "HTTP request handling time",
            ["route"], registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.logins = Counter("returnfeed_auth_logins", "Login attempts by result", ["result"],
                              registry=self.registry)

    def observe_http(self, method: str, route: str, status: int, seconds: float) -> None:
        self.http_requests.labels(method, route, str(status)).inc()
        self.http_duration.labels(route).observe(seconds)

    def add_collector(self, fn: Callable[[], Iterable[Metric]]) -> None:
        """Register a function yielding metric families at scrape time."""
        self.dynamic.extra.append(fn)

    def add_gc_source(self, process: str, fn: Callable[[], list[LatencyCounts]]) -> None:
        """Another kind of process's garbage-collector pauses (per
        generation), read at scrape time into ``returnfeed_gc_pause_seconds``."""
        self.dynamic.gc_sources[process] = fn

    def render(self) -> bytes:
        return generate_latest(self.registry)
