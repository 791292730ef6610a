"""Switcher adapters of a production's tally: build, start, close.

One adapter per entry of the configuration's ``adapters`` list:

* ``vmix`` — :class:`tally.vmix.VmixClient` (TCP API subscription);
* ``obs`` — :class:`tally.obs.ObsClient` (OBS WebSocket v5);
* ``tsl_in`` — :class:`tally.tsl.TslInput` (UDP or TCP listener);
* ``tsl_out`` — :class:`tally.tsl.TslOutput` (UDP or TCP to displays).

Building checks the adapter's mappings against a state and opens nothing
(used to refuse a configuration before it is stored); starting opens its
sockets. :func:`adapter_key` says when a running adapter can be kept across
a configuration change.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Iterable

from tally.obs import ObsClient
from tally.state import SourceConfig, TallyState
from tally.tsl import TslInput, TslOutput
from tally.vmix import VmixClient

from .log import event

log = logging.getLogger("returnfeed.tally")

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
class RunningAdapter:
    """A constructed switcher adapter, its configuration and what it depends on (``key``)."""

    spec: dict[str, Any]
    obj: Any
    kind: str
    authority: str | None
    key: str = ""

    @property
    def connected(self) -> bool | None:
        return getattr(self.obj, "synced", None)


def build_adapter(state: TallyState, spec: dict[str, Any]) -> RunningAdapter:
    """Construct (not start) an adapter: mappings are checked against
    ``state``; no socket is opened."""
    t = spec["type"]
    if t == "vmix":
        authority = spec.get("authority", "vmix")
        obj: Any = VmixClient(state, spec["host"], int(spec.get("port", 8099)), authority=authority)
        return RunningAdapter(spec, obj, t, authority)
    if t == "obs":
        authority = spec.get("authority", "obs")
        obj = ObsClient(state, spec["url"], password=spec.get("password"), authority=authority)
        return RunningAdapter(spec, obj, t, authority)
    version = int(spec.get("version", 5))
    if t == "tsl_in":
        authority = spec.get("authority", "tsl")
        addresses = {int(k): v for k, v in (spec.get("addresses") or {}).items()} or None
        obj = TslInput(state, authority=authority, version=version, addresses=addresses,
                       lost_after=spec.get("lost_after"))
        return RunningAdapter(spec, obj, t, authority)
    obj = TslOutput(state, version=version, addresses=spec.get("addresses") or None)
    return RunningAdapter(spec, obj, t, None)


async def start_adapter(state: TallyState, spec: dict[str, Any]) -> RunningAdapter:
    adapter = build_adapter(state, spec)
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


async def close_adapter(production_id: int, adapter: RunningAdapter) -> None:
    """Close one adapter; a failure is logged, never raised (the others still close)."""
    try:
        await adapter.obj.close()
    except Exception as exc:
        event(log, logging.ERROR, "tally.adapter_close_failed", production=production_id, type=adapter.kind,
              error=f"{type(exc).__name__}: {exc}")


def adapter_failed(production_id: int, index: int, spec: dict[str, Any], exc: Exception) -> dict[str, Any]:
    """Log an adapter that could not start; the problem entry the snapshot shows."""
    event(log, logging.ERROR, "tally.adapter_failed", production=production_id, type=spec.get("type"),
          error=f"{type(exc).__name__}: {exc}")
    return {"adapter": index, "type": spec.get("type"), "error": str(exc) or type(exc).__name__}
