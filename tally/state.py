"""Sans-I/O tally state machine, one per production.

Model
-----
A production has *sources* (cameras, players …), each with a name, a label,
the *authority* that drives it and optional mappings to external switchers
(vMix input number, TSL address, OBS scenes). Every source sits on zero or
more *buses*: ``program`` > ``preview`` > ``aux`` (priority order). The state
a tally light shows is derived from the buses:

* ``program`` when the source is on the program bus (on air — red),
* ``preview`` when it is on preview only (green),
* ``off`` otherwise (an aux bus alone does not light a tally; it is reported
  in the ``aux`` flag and the ``buses`` list),
* ``unknown`` when the authority driving the source has lost its link.
  A source is never left showing a stale red: losing the authority clears
  what it reported, and the source stays ``unknown`` until the authority
  reports again.

Two kinds of authority drive sources:

``director`` (the local M/E)
    The control room's commands: ``cut(source)`` puts the source on program
    (cutting the preview source swaps program and preview like a mixer's CUT
    button; a hot cut to another source leaves preview alone and the old
    program drops to off); ``set_preview(source)``; ``take(duration)`` is an auto
    transition — while it runs, both the outgoing and the incoming source
    are on program (red during a dissolve), and when ``tick(now)`` passes the
    end (or ``finish_transition(now)`` is called) program and preview swap,
    like a vision mixer's AUTO. A ``cut`` during a transition completes the
    transition first and then cuts, as one change. ``set_bus(source, bus,
    on)`` sets extra flags (a keyer or PiP on air counts as program).

an external adapter (``"vmix"``, ``"obs"``, ``"tsl:studio-a"`` …)
    The adapter is the source of truth for the sources whose ``authority``
    names it. ``report(authority, buses, full=True)`` replaces the buses of
    all its sources (vMix and OBS report the full set; TSL reports single
    displays with ``full=False``). ``authority_lost(authority)`` turns all
    its sources ``unknown``; ``authority_restored`` (or any report) makes
    them known again. External sources start ``unknown``: after a restart
    nothing is known until the adapter has spoken.

Commands that would touch a source of another authority are refused
(``CommandRejected``) and change nothing.

Time is explicit: every mutating call takes ``now`` (seconds on a monotonic
clock); the state machine never reads a clock and never sleeps.

Changes, sequence numbers and coalescing
----------------------------------------
Every applied call that changes at least one source's visible state
increments the production's sequence number ``seq`` and returns a
``TallyChange`` (seq, changed sources → new state, who, origin, at) for the
audit log; listeners registered with ``add_listener`` receive it
synchronously. A call that changes nothing returns ``None`` and does not
consume a sequence number. There is no debounce: the change is emitted at
the leading edge, immediately.

Coalescing lives in the *consumer*, not in the state machine: each consumer
owns a ``DeltaAccumulator`` that merges changes (latest state per source,
highest seq) until it drains it with ``take()``. The WebSocket hub drains once
per event-loop iteration, so a switcher flooding changes faster than the hub
can write them produces one delta with the latest state of every changed
source; the TSL output and the database writer drain at their own pace.
A single pending delta inside the state machine could serve only one
consumer — a second consumer draining it would steal the first one's changes.

Persistence
-----------
``to_dict()`` / ``TallyState.from_dict()`` use a plain JSON-compatible dict
(the server stores it in PostgreSQL). It holds the source definitions, the
sequence number, the director's program/preview (a transition in progress is
stored as completed) and director flags. What external adapters reported is
not stored: after a restore their sources are ``unknown`` until they report.
"""

from __future__ import annotations

import logging
import traceback
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from tally.errors import CommandRejected, ConfigError, SnapshotError
from tally.log import event

log = logging.getLogger(__name__)

DIRECTOR = "director"
"""The authority name of the local M/E driven by the control room."""

MAX_NAME_LENGTH = 64
MAX_LABEL_LENGTH = 64
MAX_TRANSITION_SECONDS = 60.0
SNAPSHOT_VERSION = 1


class Bus(StrEnum):
    """A bus a source can be on, in priority order."""

    PROGRAM = "program"
    PREVIEW = "preview"
    AUX = "aux"


BUS_PRIORITY: tuple[Bus, ...] = (Bus.PROGRAM, Bus.PREVIEW, Bus.AUX)


class Tally(StrEnum):
    """What a tally light shows (the ``state`` field of the protocol)."""

    PROGRAM = "program"
    PREVIEW = "preview"
    OFF = "off"
    UNKNOWN = "unknown"


class Origin(StrEnum):
    """Why a change happened (recorded in ``TallyChange.origin``)."""

    CUT = "cut"
    PREVIEW = "preview"
    TAKE = "take"
    TRANSITION_END = "transition_end"
    SET_BUS = "set_bus"
    REPORT = "report"
    AUTHORITY_LOST = "authority_lost"
    AUTHORITY_RESTORED = "authority_restored"
    PEER = "peer"  # adopted from another server node (adopt())
    CONFIG = "config"  # source definitions changed (reconfigure())


def _check_name(value: object, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_NAME_LENGTH:
        raise ConfigError(f"{what} must be a string of 1..{MAX_NAME_LENGTH} characters: {value!r}")
    if any(ch.isspace() or not ch.isprintable() for ch in value):
        raise ConfigError(f"{what} must not contain spaces or control characters: {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class SourceConfig:
    """A source's definition. ``label`` defaults to ``name``."""

    name: str
    label: str = ""
    authority: str = DIRECTOR
    vmix_input: int | None = None
    tsl_address: int | None = None
    obs_scenes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_name(self.name, "source name")
        _check_name(self.authority, "authority")
        if not isinstance(self.label, str) or len(self.label) > MAX_LABEL_LENGTH:
            raise ConfigError(f"label of {self.name} must be a string of at most {MAX_LABEL_LENGTH} characters")
        if not self.label:
            object.__setattr__(self, "label", self.name)
        if self.vmix_input is not None and (
            isinstance(self.vmix_input, bool) or not isinstance(self.vmix_input, int) or self.vmix_input < 1
        ):
            raise ConfigError(f"vmix_input of {self.name} must be an integer >= 1")
        # TSL 5.0 "INDEX (16 bit) 0 - 65534 ... 0xFFFF broadcast": 0 is a valid
        # address, 0xFFFF is reserved for broadcast.
        if self.tsl_address is not None and (
            isinstance(self.tsl_address, bool)
            or not isinstance(self.tsl_address, int)
            or not 0 <= self.tsl_address <= 0xFFFE
        ):
            raise ConfigError(f"tsl_address of {self.name} must be an integer 0..65534")
        scenes = tuple(self.obs_scenes)
        if not all(isinstance(s, str) and s for s in scenes):
            raise ConfigError(f"obs_scenes of {self.name} must be non-empty strings")
        object.__setattr__(self, "obs_scenes", scenes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "label": self.label,
            "authority": self.authority,
            "vmix_input": self.vmix_input,
            "tsl_address": self.tsl_address,
            "obs_scenes": list(self.obs_scenes),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SourceConfig:
        if not isinstance(data, Mapping):
            raise ConfigError("a source definition must be an object")
        unknown = set(data) - {"name", "label", "authority", "vmix_input", "tsl_address", "obs_scenes"}
        if unknown:
            raise ConfigError(f"unknown source fields: {sorted(unknown)}")
        scenes = data.get("obs_scenes", ())
        if not isinstance(scenes, list | tuple):
            raise ConfigError("obs_scenes must be a list")
        return cls(
            name=data.get("name"),  # type: ignore[arg-type]  # validated in __post_init__
            label=data.get("label") or "",
            authority=data.get("authority", DIRECTOR),
            vmix_input=data.get("vmix_input"),
            tsl_address=data.get("tsl_address"),
            obs_scenes=tuple(scenes),
        )


@dataclass(frozen=True, slots=True)
class SourceState:
    """The visible tally state of one source."""

    state: Tally
    buses: tuple[Bus, ...]
    label: str
    authority: str
    #: The source was removed from the production by a configuration
    #: change: this is its last state (``unknown``, so a client that does
    #: not know the flag shows "tally lost", never a stale colour).
    removed: bool = False

    @property
    def aux(self) -> bool:
        return Bus.AUX in self.buses

    def to_json(self) -> dict[str, Any]:
        """The protocol's per-source object."""
        out = {
            "state": self.state.value,
            "buses": [b.value for b in self.buses],
            "aux": Bus.AUX in self.buses,
            "label": self.label,
            "authority": self.authority,
        }
        if self.removed:
            out["removed"] = True
        return out


@dataclass(frozen=True, slots=True)
class TallyChange:
    """One applied change, for listeners and the audit log."""

    seq: int
    sources: Mapping[str, SourceState]
    who: str
    origin: str
    at: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "who": self.who,
            "origin": self.origin,
            "at": self.at,
            "sources": {name: st.to_json() for name, st in self.sources.items()},
        }


@dataclass(frozen=True, slots=True)
class Transition:
    """An auto transition in progress on the director's M/E."""

    from_source: str | None
    to_source: str
    started: float
    duration: float

    @property
    def ends(self) -> float:
        return self.started + self.duration


@dataclass(frozen=True, slots=True)
class Delta:
    """Coalesced changes: the latest state of every source changed since the
    previous drain; ``seq`` is the highest sequence number merged."""

    seq: int
    first_seq: int
    sources: Mapping[str, SourceState]


@dataclass(slots=True)
class DeltaAccumulator:
    """Merges ``TallyChange``s for one consumer until it drains them."""

    _sources: dict[str, SourceState] = field(default_factory=dict)
    _seq: int = 0
    _first: int = 0
    merged: int = 0
    """How many changes were folded into deltas (for metrics)."""

    def add(self, change: TallyChange) -> None:
        if not self._sources:
            self._first = change.seq
        self._sources.update(change.sources)
        if change.seq > self._seq:
            self._seq = change.seq
        self.merged += 1

    @property
    def pending(self) -> bool:
        return bool(self._sources)

    def take(self) -> Delta | None:
        if not self._sources:
            return None
        delta = Delta(self._seq, self._first, MappingProxyType(self._sources))
        self._sources = {}
        return delta


Listener = Callable[[TallyChange], None]


class TallyState:
    """The tally state of one production (see the module docstring)."""

    def __init__(
        self,
        production: str,
        sources: Iterable[SourceConfig],
        *,
        default_transition: float = 1.0,
        seq: int = 0,
    ) -> None:
        if not isinstance(production, str) or not production:
            raise ConfigError("production must be a non-empty string")
        self.production = production
        self._sources: dict[str, SourceConfig] = {}
        for cfg in sources:
            if not isinstance(cfg, SourceConfig):
                raise ConfigError(f"expected SourceConfig, got {type(cfg).__name__}")
            if cfg.name in self._sources:
                raise ConfigError(f"duplicate source name {cfg.name!r}")
            self._sources[cfg.name] = cfg
        self.default_transition = _check_duration(default_transition, ConfigError)
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise ConfigError("seq must be a non-negative integer")
        self._seq = seq
        self._program: str | None = None
        self._preview: str | None = None
        self._transition: Transition | None = None
        # Buses set by set_bus() (director flags) or report() (adapters).
        self._ext: dict[str, frozenset[Bus]] = {name: frozenset() for name in self._sources}
        # External sources start unknown: nothing is known until their
        # authority reports.
        self._lost: set[str] = {n for n, c in self._sources.items() if c.authority != DIRECTOR}
        self._listeners: list[Listener] = []
        self._current: dict[str, SourceState] = {}
        self._current = self._compute_all()

    # ------------------------------------------------------------------ views

    @property
    def seq(self) -> int:
        return self._seq

    @property
    def program(self) -> str | None:
        """The director's program source (the incoming one during a take)."""
        return self._transition.to_source if self._transition else self._program

    @property
    def preview(self) -> str | None:
        return self._preview

    @property
    def transition(self) -> Transition | None:
        return self._transition

    @property
    def sources(self) -> Mapping[str, SourceConfig]:
        return MappingProxyType(self._sources)

    def states(self) -> Mapping[str, SourceState]:
        """Read-only view of every source's current state."""
        return MappingProxyType(self._current)

    def source_state(self, name: str) -> SourceState:
        try:
            return self._current[name]
        except KeyError:
            raise CommandRejected("unknown_source", f"no source named {name!r}") from None

    def authorities(self) -> frozenset[str]:
        return frozenset(c.authority for c in self._sources.values())

    def is_lost(self, authority: str) -> bool:
        """True when any source of ``authority`` is unknown."""
        return any(self._sources[n].authority == authority for n in self._lost)

    def next_deadline(self) -> float | None:
        """When ``tick`` next has work to do (the end of a transition)."""
        return self._transition.ends if self._transition else None

    # Mappings derived from the source definitions, for the adapters.

    def vmix_inputs(self, authority: str) -> dict[int, tuple[str, ...]]:
        out: dict[int, tuple[str, ...]] = {}
        for c in self._sources.values():
            if c.authority == authority and c.vmix_input is not None:
                out[c.vmix_input] = out.get(c.vmix_input, ()) + (c.name,)
        return out

    def tsl_addresses(self, authority: str | None = None) -> dict[int, tuple[str, ...]]:
        """TSL address → sources; ``authority=None`` maps every source (for
        outputs, which show everything)."""
        out: dict[int, tuple[str, ...]] = {}
        for c in self._sources.values():
            if (authority is None or c.authority == authority) and c.tsl_address is not None:
                out[c.tsl_address] = out.get(c.tsl_address, ()) + (c.name,)
        return out

    def obs_scenes(self, authority: str) -> dict[str, tuple[str, ...]]:
        out: dict[str, tuple[str, ...]] = {}
        for c in self._sources.values():
            if c.authority == authority:
                for scene in c.obs_scenes:
                    out[scene] = out.get(scene, ()) + (c.name,)
        return out

    # -------------------------------------------------------------- listeners

    def check_mapping(self, authority: str, mapping: Mapping[Any, Iterable[str]], what: str) -> None:
        """Raise ConfigError unless every source an adapter's mapping names
        exists and is driven by that adapter's ``authority``."""
        for names in mapping.values():
            for name in names:
                cfg = self._sources.get(name)
                if cfg is None or cfg.authority != authority:
                    raise ConfigError(f"{what} mapping names {name!r}, which {authority} does not drive")

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        try:
            self._listeners.remove(listener)
        except ValueError:
            pass

    # ------------------------------------------------------ director commands

    def cut(self, source: str, *, now: float, who: str = DIRECTOR) -> TallyChange | None:
        """Cut: ``source`` goes on program at once.

        Like a vision mixer's CUT button, cutting the source that is on
        preview swaps the buses (the outgoing program source lands on
        preview, green); a hot cut to any other source changes program only.
        """
        self._require_director(source)
        if self._transition is not None:
            self._settle()
        if source == self._preview and self._program is not None:
            self._preview = self._program
        self._program = source
        return self._commit(Origin.CUT, who, now)

    def set_preview(self, source: str, *, now: float, who: str = DIRECTOR) -> TallyChange | None:
        self._require_director(source)
        if self._transition is not None:
            raise CommandRejected("transition_in_progress", "preview cannot change during a transition")
        self._preview = source
        return self._commit(Origin.PREVIEW, who, now)

    def take(self, duration: float | None = None, *, now: float, who: str = DIRECTOR) -> TallyChange | None:
        """Auto transition from program to preview over ``duration`` seconds
        (the production default when ``None``; 0 swaps at once)."""
        if self._transition is not None:
            raise CommandRejected("transition_in_progress", "a transition is already running")
        if self._preview is None:
            raise CommandRejected("no_preview", "nothing is on preview")
        if self._preview == self._program:
            raise CommandRejected("no_preview", "preview and program are the same source")
        d = self.default_transition if duration is None else _check_duration(duration, _bad_duration)
        if d == 0:
            self._program, self._preview = self._preview, self._program
        else:
            self._transition = Transition(self._program, self._preview, now, d)
        return self._commit(Origin.TAKE, who, now)

    def finish_transition(self, now: float, who: str = DIRECTOR) -> TallyChange | None:
        """Complete a running transition now (program and preview swap)."""
        if self._transition is None:
            return None
        self._settle()
        return self._commit(Origin.TRANSITION_END, who, now)

    def tick(self, now: float) -> TallyChange | None:
        """Complete a transition whose time is up."""
        if self._transition is not None and now >= self._transition.ends:
            return self.finish_transition(now)
        return None

    # -------------------------------------------------------- adapter inputs

    def set_bus(
        self, source: str, bus: Bus | str, on: bool, *, authority: str = DIRECTOR, now: float, who: str | None = None
    ) -> TallyChange | None:
        """Set or clear one bus flag of ``source`` (a keyer on air counts as
        program). ``authority`` must be the one driving the source. While the
        authority is lost the flag is recorded but the source stays unknown."""
        cfg = self._require(source)
        b = _as_bus(bus)
        if cfg.authority != authority:
            raise CommandRejected(
                "external_authority", f"{source} is driven by {cfg.authority}, not {authority}"
            )
        cur = self._ext[source]
        self._ext[source] = cur | {b} if on else cur - {b}
        return self._commit(Origin.SET_BUS, who or authority, now)

    def report(
        self,
        authority: str,
        buses: Mapping[str, Iterable[Bus | str]],
        *,
        full: bool = True,
        now: float,
        who: str | None = None,
    ) -> TallyChange | None:
        """An external authority reports the buses of its sources.

        ``full=True``: the report is the complete picture; sources of the
        authority that are absent are off, and all of them become known.
        ``full=False``: only the listed sources are updated (TSL sends one
        display at a time)."""
        if authority == DIRECTOR:
            raise CommandRejected("forbidden", "the director's M/E is driven by cut/preview/take")
        staged: dict[str, frozenset[Bus]] = {}
        for name, bs in buses.items():
            cfg = self._require(name)
            if cfg.authority != authority:
                raise CommandRejected("external_authority", f"{name} is driven by {cfg.authority}, not {authority}")
            staged[name] = frozenset((_as_bus(bs),) if isinstance(bs, str) else (_as_bus(b) for b in bs))
        for name, cfg in self._sources.items():
            if cfg.authority != authority:
                continue
            if name in staged:
                self._ext[name] = staged[name]
                self._lost.discard(name)
            elif full:
                self._ext[name] = frozenset()
                self._lost.discard(name)
        return self._commit(Origin.REPORT, who or authority, now)

    def authority_lost(self, authority: str, *, now: float, who: str | None = None) -> TallyChange | None:
        """The link to ``authority`` is gone: its sources become unknown and
        what it reported is forgotten (never a stale red)."""
        self._require_external(authority)
        for name, cfg in self._sources.items():
            if cfg.authority == authority:
                self._lost.add(name)
                self._ext[name] = frozenset()
        return self._commit(Origin.AUTHORITY_LOST, who or authority, now)

    def authority_restored(self, authority: str, *, now: float, who: str | None = None) -> TallyChange | None:
        """The link is back: its sources are known again (off until it
        reports; adapters that can should call ``report`` instead)."""
        self._require_external(authority)
        for name, cfg in self._sources.items():
            if cfg.authority == authority:
                self._lost.discard(name)
        return self._commit(Origin.AUTHORITY_RESTORED, who or authority, now)

    # ---------------------------------------------------------- configuration

    def reconfigure(
        self,
        sources: Iterable[SourceConfig],
        *,
        default_transition: float | None = None,
        now: float,
        who: str = "config",
    ) -> TallyChange | None:
        """Replace the source definitions in place (a configuration change).

        Everything that did not change keeps its state: a source whose
        authority is the same keeps what that authority reported (or its
        ``unknown``) and its place on the director's buses. A source handed
        to another authority starts over like a new one: ``unknown`` when
        external (until its authority reports), off when the director drives
        it. The director's program/preview forget sources that are gone or no
        longer director-driven; a transition involving one is completed
        first. A removed source is sent one last time as ``unknown`` with
        ``removed`` set and is absent from later snapshots.

        All of it is one ordinary change with the next ``seq`` (``None``
        when nothing visible changed, e.g. the same configuration again).
        Invalid definitions raise ``ConfigError`` and change nothing."""
        new: dict[str, SourceConfig] = {}
        for cfg in sources:
            if not isinstance(cfg, SourceConfig):
                raise ConfigError(f"expected SourceConfig, got {type(cfg).__name__}")
            if cfg.name in new:
                raise ConfigError(f"duplicate source name {cfg.name!r}")
            new[cfg.name] = cfg
        transition = (self.default_transition if default_transition is None
                      else _check_duration(default_transition, ConfigError))
        old = self._sources

        def director_source(name: str | None) -> bool:
            return name is not None and name in new and new[name].authority == DIRECTOR

        t = self._transition
        if t is not None and not (director_source(t.to_source)
                                  and (t.from_source is None or director_source(t.from_source))):
            self._settle()
        if not director_source(self._program):
            self._program = None
        if not director_source(self._preview):
            self._preview = None
        ext: dict[str, frozenset[Bus]] = {}
        lost: set[str] = set()
        for name, cfg in new.items():
            prev = old.get(name)
            if prev is not None and prev.authority == cfg.authority:
                ext[name] = self._ext[name]
                if name in self._lost:
                    lost.add(name)
            else:
                ext[name] = frozenset()
                if cfg.authority != DIRECTOR:
                    lost.add(name)
        gone = {
            name: SourceState(Tally.UNKNOWN, (), cfg.label, cfg.authority, removed=True)
            for name, cfg in old.items()
            if name not in new
        }
        self._sources, self._ext, self._lost = new, ext, lost
        self.default_transition = transition
        return self._commit(Origin.CONFIG, who, now, gone)

    # ------------------------------------------------------------ persistence

    def to_dict(self) -> dict[str, Any]:
        program, preview = self._program, self._preview
        if self._transition is not None:
            program, preview = self._transition.to_source, self._transition.from_source
        flags = {
            name: [b.value for b in BUS_PRIORITY if b in self._ext[name]]
            for name, cfg in self._sources.items()
            if cfg.authority == DIRECTOR and self._ext[name]
        }
        return {
            "version": SNAPSHOT_VERSION,
            "production": self.production,
            "seq": self._seq,
            "default_transition": self.default_transition,
            "sources": [c.to_dict() for c in self._sources.values()],
            "program": program,
            "preview": preview,
            "flags": flags,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, sources: Iterable[SourceConfig] | None = None) -> TallyState:
        """Restore a state saved with ``to_dict``.

        With ``sources`` (the current configuration) the saved definitions
        are ignored and saved director state referring to sources that no
        longer exist (or are no longer director-driven) is dropped."""
        if not isinstance(data, Mapping):
            raise SnapshotError("tally snapshot must be an object")
        if data.get("version") != SNAPSHOT_VERSION:
            raise SnapshotError(f"unsupported tally snapshot version {data.get('version')!r}")
        strict = sources is None  # saved definitions: everything must match
        try:
            if sources is None:
                raw = data.get("sources")
                if not isinstance(raw, list):
                    raise SnapshotError("snapshot sources must be a list")
                sources = [SourceConfig.from_dict(s) for s in raw]
            state = cls(
                data.get("production"),  # type: ignore[arg-type]  # validated in __init__
                sources,
                default_transition=data.get("default_transition", 1.0),
                seq=data.get("seq"),  # type: ignore[arg-type]
            )
        except ConfigError as exc:
            raise SnapshotError(f"invalid tally snapshot: {exc}") from exc

        def director_source(key: str) -> str | None:
            value = data.get(key)
            if value is None:
                return None
            if not isinstance(value, str):
                raise SnapshotError(f"snapshot {key} must be a source name or null")
            cfg = state._sources.get(value)
            if cfg is None or cfg.authority != DIRECTOR:
                if strict:
                    raise SnapshotError(f"snapshot {key} {value!r} is not a director source")
                return None
            return value

        state._program = director_source("program")
        state._preview = director_source("preview")
        flags = data.get("flags", {})
        if not isinstance(flags, Mapping):
            raise SnapshotError("snapshot flags must be an object")
        for name, bs in flags.items():
            cfg = state._sources.get(name)
            if cfg is None or cfg.authority != DIRECTOR:
                if strict:
                    raise SnapshotError(f"snapshot flags name unknown director source {name!r}")
                continue
            if not isinstance(bs, list):
                raise SnapshotError("snapshot flag buses must be a list")
            try:
                state._ext[name] = frozenset(Bus(b) for b in bs)
            except ValueError as exc:
                raise SnapshotError(f"unknown bus in snapshot flags: {bs!r}") from exc
        state._current = state._compute_all()
        return state

    def adopt(self, data: Mapping[str, Any], *, now: float, who: str = "peer") -> TallyChange | None:
        """Take the director state and sequence number of a snapshot saved by
        another server node (``to_dict`` there, shared through the database).

        Only a snapshot with a higher ``seq`` is taken. The change it causes is
        emitted with the snapshot's ``seq``, so clients of every node see the
        same sequence. What local adapters reported is kept."""
        other = TallyState.from_dict(data, sources=self._sources.values())
        if other._seq <= self._seq:
            return None
        self._program, self._preview, self._transition = other._program, other._preview, None
        for name, cfg in self._sources.items():
            if cfg.authority == DIRECTOR:
                self._ext[name] = other._ext[name]
        self._seq = other._seq - 1
        change = self._commit(Origin.PEER, who, now)
        if change is None:
            self._seq = other._seq  # nothing visible changed; follow the sequence anyway
        return change

    # --------------------------------------------------------------- internals

    def _require(self, source: str) -> SourceConfig:
        cfg = self._sources.get(source) if isinstance(source, str) else None
        if cfg is None:
            raise CommandRejected("unknown_source", f"no source named {source!r}")
        return cfg

    def _require_director(self, source: str) -> SourceConfig:
        cfg = self._require(source)
        if cfg.authority != DIRECTOR:
            raise CommandRejected(
                "external_authority", f"{source} is driven by {cfg.authority}; switch it there"
            )
        return cfg

    def _require_external(self, authority: str) -> None:
        if authority == DIRECTOR:
            raise CommandRejected("forbidden", "the director authority is local and cannot be lost")

    def _settle(self) -> None:
        t = self._transition
        assert t is not None
        self._program, self._preview = t.to_source, t.from_source
        self._transition = None

    def _me_buses(self) -> dict[str, set[Bus]]:
        me: dict[str, set[Bus]] = {}
        t = self._transition
        if t is not None:
            # Auto transition: both sources are on air during the mix; the
            # incoming one is still selected on the preview row.
            if t.from_source is not None:
                me.setdefault(t.from_source, set()).add(Bus.PROGRAM)
            me.setdefault(t.to_source, set()).update((Bus.PROGRAM, Bus.PREVIEW))
        else:
            if self._program is not None:
                me.setdefault(self._program, set()).add(Bus.PROGRAM)
            if self._preview is not None:
                me.setdefault(self._preview, set()).add(Bus.PREVIEW)
        return me

    def _compute_all(self) -> dict[str, SourceState]:
        me = self._me_buses()
        out: dict[str, SourceState] = {}
        for name, cfg in self._sources.items():
            if name in self._lost:
                out[name] = SourceState(Tally.UNKNOWN, (), cfg.label, cfg.authority)
                continue
            active = set(self._ext[name])
            if cfg.authority == DIRECTOR:
                active |= me.get(name, set())
            buses = tuple(b for b in BUS_PRIORITY if b in active)
            if Bus.PROGRAM in active:
                tally = Tally.PROGRAM
            elif Bus.PREVIEW in active:
                tally = Tally.PREVIEW
            else:
                tally = Tally.OFF
            out[name] = SourceState(tally, buses, cfg.label, cfg.authority)
        return out

    def _commit(self, origin: Origin, who: str, now: float,
                gone: Mapping[str, SourceState] | None = None) -> TallyChange | None:
        new = self._compute_all()
        old = self._current
        changed = {name: st for name, st in new.items() if old.get(name) != st}
        if gone:
            changed.update(gone)
        self._current = new
        if not changed:
            return None
        self._seq += 1
        change = TallyChange(self._seq, MappingProxyType(changed), who, origin.value, now)
        for listener in tuple(self._listeners):
            try:
                listener(change)
            except Exception as exc:  # one consumer must not break the others
                event(log, logging.ERROR, "tally.listener_failed", listener=repr(listener), seq=change.seq,
                      error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        return change


def _bad_duration(detail: str) -> CommandRejected:
    return CommandRejected("bad_duration", detail)


def _check_duration(value: object, error: Callable[[str], Exception]) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise error(f"transition duration must be a number of seconds: {value!r}")
    if not 0 <= value <= MAX_TRANSITION_SECONDS:
        raise error(f"transition duration must be 0..{MAX_TRANSITION_SECONDS:g} s: {value!r}")
    return float(value)


def _as_bus(value: Bus | str) -> Bus:
    try:
        return Bus(value)
    except ValueError:
        raise CommandRejected("bad_field", f"unknown bus {value!r}") from None
