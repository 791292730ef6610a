"""A production's tally configuration: complete validation of what is stored.

The sources and switcher adapters of a production live in
``productions.settings["tally"]``. A PUT is refused unless everything an
adapter needs to start checks out (:func:`validate_config`); a configuration
stored before those checks (or by hand) is used as far as it can be
(:func:`load_config`), the rest reported, never fatal.

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

from typing import Any

from tally.errors import ConfigError
from tally.state import SourceConfig

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
