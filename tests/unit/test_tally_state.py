"""Tally state machine: cut, preview, take, authorities, coalescing, persistence."""

from __future__ import annotations

import json

import pytest

from tally.errors import CommandRejected, ConfigError, SnapshotError
from tally.state import (
    DIRECTOR,
    Bus,
    DeltaAccumulator,
    SourceConfig,
    Tally,
    TallyChange,
    TallyState,
)


def make_state(**kw) -> TallyState:
    return TallyState(
        "prod",
        [
            SourceConfig("cam1", "Camera 1", tsl_address=0),
            SourceConfig("cam2", "Camera 2", tsl_address=1),
            SourceConfig("cam3"),
            SourceConfig("v1", authority="vmix", vmix_input=1),
            SourceConfig("v2", authority="vmix", vmix_input=2),
            SourceConfig("o1", authority="obs", obs_scenes=("Wide", "Both")),
            SourceConfig("o2", authority="obs", obs_scenes=("Close", "Both")),
        ],
        **kw,
    )


def tallies(state: TallyState) -> dict[str, str]:
    return {n: s.state.value for n, s in state.states().items()}


def test_initial_state_director_off_external_unknown():
    s = make_state()
    assert s.seq == 0
    t = tallies(s)
    assert t["cam1"] == t["cam2"] == t["cam3"] == "off"
    assert t["v1"] == t["v2"] == t["o1"] == t["o2"] == "unknown"
    assert s.source_state("cam1").label == "Camera 1"
    assert s.source_state("cam3").label == "cam3"


def test_cut_moves_program_and_returns_change():
    s = make_state()
    ch = s.cut("cam1", now=1.0, who="alice")
    assert isinstance(ch, TallyChange)
    assert ch.seq == 1 and ch.who == "alice" and ch.origin == "cut" and ch.at == 1.0
    assert dict(ch.sources) == {"cam1": s.source_state("cam1")}
    assert s.source_state("cam1").state is Tally.PROGRAM
    ch = s.cut("cam2", now=2.0)
    assert set(ch.sources) == {"cam1", "cam2"}
    assert ch.sources["cam1"].state is Tally.OFF
    assert ch.sources["cam2"].state is Tally.PROGRAM
    assert s.program == "cam2"


def test_cut_to_current_program_is_noop_without_seq():
    s = make_state()
    s.cut("cam1", now=0)
    assert s.cut("cam1", now=1) is None
    assert s.seq == 1


def test_previous_program_stays_green_if_on_preview():
    s = make_state()
    s.set_preview("cam1", now=0)
    s.cut("cam1", now=1)
    st = s.source_state("cam1")
    assert st.state is Tally.PROGRAM and st.buses == (Bus.PROGRAM, Bus.PREVIEW)
    ch = s.cut("cam2", now=2)
    assert ch.sources["cam1"].state is Tally.PREVIEW
    assert ch.sources["cam1"].buses == (Bus.PREVIEW,)


def test_preview_command():
    s = make_state()
    s.cut("cam1", now=0)
    ch = s.set_preview("cam2", now=1)
    assert dict(ch.sources) == {"cam2": s.source_state("cam2")}
    assert s.source_state("cam2").state is Tally.PREVIEW
    ch = s.set_preview("cam3", now=2)
    assert ch.sources["cam2"].state is Tally.OFF and ch.sources["cam3"].state is Tally.PREVIEW


def test_take_mix_both_on_air_then_swap():
    s = make_state()
    s.cut("cam1", now=0)
    s.set_preview("cam2", now=0)
    ch = s.take(1.0, now=10.0)
    assert ch.origin == "take"
    assert s.source_state("cam1").state is Tally.PROGRAM
    assert s.source_state("cam2").state is Tally.PROGRAM
    assert s.next_deadline() == 11.0
    assert s.tick(10.5) is None
    ch = s.tick(11.0)
    assert ch is not None and ch.origin == "transition_end"
    assert s.source_state("cam2").state is Tally.PROGRAM
    assert s.source_state("cam1").state is Tally.PREVIEW  # swapped like AUTO
    assert s.program == "cam2" and s.preview == "cam1"
    assert s.transition is None and s.next_deadline() is None


def test_take_default_duration_and_zero():
    s = make_state(default_transition=0.5)
    s.cut("cam1", now=0)
    s.set_preview("cam2", now=0)
    s.take(now=1.0)
    assert s.next_deadline() == 1.5
    s.finish_transition(1.2)
    s.take(0, now=2.0)  # instant swap
    assert s.transition is None
    assert s.program == "cam1" and s.preview == "cam2"


def test_take_rejections_change_nothing():
    s = make_state()
    with pytest.raises(CommandRejected) as e:
        s.take(now=0)
    assert e.value.code == "no_preview"
    s.cut("cam1", now=0)
    s.set_preview("cam1", now=0)
    with pytest.raises(CommandRejected):
        s.take(now=0)
    s.set_preview("cam2", now=0)
    for bad in (-1, 61, float("nan"), True, "1"):
        with pytest.raises(CommandRejected) as e:
            s.take(bad, now=0)  # type: ignore[arg-type]
        assert e.value.code == "bad_duration"
    s.take(1, now=0)
    seq = s.seq
    with pytest.raises(CommandRejected) as e:
        s.take(1, now=0.1)
    assert e.value.code == "transition_in_progress"
    with pytest.raises(CommandRejected):
        s.set_preview("cam3", now=0.1)
    assert s.seq == seq


def test_cut_during_transition_completes_it_first():
    s = make_state()
    s.cut("cam1", now=0)
    s.set_preview("cam2", now=0)
    s.take(2, now=0)
    ch = s.cut("cam3", now=1)
    assert s.transition is None
    assert s.program == "cam3" and s.preview == "cam1"
    assert ch.sources["cam1"].state is Tally.PREVIEW
    assert ch.sources["cam2"].state is Tally.OFF
    assert ch.sources["cam3"].state is Tally.PROGRAM


def test_unknown_source_and_external_authority_rejected():
    s = make_state()
    for call in (lambda: s.cut("nope", now=0), lambda: s.set_preview("nope", now=0)):
        with pytest.raises(CommandRejected) as e:
            call()
        assert e.value.code == "unknown_source"
    with pytest.raises(CommandRejected) as e:
        s.cut("v1", now=0)
    assert e.value.code == "external_authority"
    with pytest.raises(CommandRejected):
        s.report("vmix", {"cam1": [Bus.PROGRAM]}, now=0)
    with pytest.raises(CommandRejected):
        s.report(DIRECTOR, {"cam1": [Bus.PROGRAM]}, now=0)
    with pytest.raises(CommandRejected):
        s.authority_lost(DIRECTOR, now=0)
    assert s.seq == 0


def test_external_report_full_and_partial():
    s = make_state()
    ch = s.report("vmix", {"v1": [Bus.PROGRAM]}, now=1)
    assert ch.who == "vmix" and ch.origin == "report"
    assert s.source_state("v1").state is Tally.PROGRAM
    assert s.source_state("v2").state is Tally.OFF  # full: absent = off, known
    assert s.source_state("v1").authority == "vmix"
    s.report("vmix", {"v2": ["preview"]}, now=2)
    assert s.source_state("v1").state is Tally.OFF
    assert s.source_state("v2").state is Tally.PREVIEW
    # partial keeps the others
    s.report("vmix", {"v1": ["program"]}, full=False, now=3)
    assert s.source_state("v1").state is Tally.PROGRAM
    assert s.source_state("v2").state is Tally.PREVIEW
    # other authorities untouched
    assert s.source_state("o1").state is Tally.UNKNOWN


def test_authority_lost_never_stale_red_and_restore():
    s = make_state()
    s.report("vmix", {"v1": [Bus.PROGRAM], "v2": [Bus.PREVIEW]}, now=1)
    ch = s.authority_lost("vmix", now=2)
    assert ch.origin == "authority_lost"
    assert {n: st.state for n, st in ch.sources.items()} == {"v1": Tally.UNKNOWN, "v2": Tally.UNKNOWN}
    assert s.source_state("v1").buses == ()
    assert s.is_lost("vmix")
    assert s.authority_lost("vmix", now=3) is None  # already unknown
    # restore without a report: known again, but what was red is forgotten
    ch = s.authority_restored("vmix", now=4)
    assert s.source_state("v1").state is Tally.OFF
    assert not s.is_lost("vmix")
    # a report after loss restores implicitly
    s.authority_lost("vmix", now=5)
    s.report("vmix", {"v2": [Bus.PROGRAM]}, now=6)
    assert s.source_state("v2").state is Tally.PROGRAM and s.source_state("v1").state is Tally.OFF


def test_partial_report_after_loss_restores_only_reported():
    s = make_state()
    s.report("vmix", {"v1": [Bus.PROGRAM]}, full=False, now=1)
    assert s.source_state("v1").state is Tally.PROGRAM
    assert s.source_state("v2").state is Tally.UNKNOWN


def test_set_bus_keyer_counts_as_program_and_aux():
    s = make_state()
    ch = s.set_bus("cam3", Bus.PROGRAM, True, now=1)
    assert ch.origin == "set_bus"
    assert s.source_state("cam3").state is Tally.PROGRAM
    s.cut("cam1", now=2)  # a keyer stays on air across cuts
    assert s.source_state("cam3").state is Tally.PROGRAM
    s.set_bus("cam3", Bus.PROGRAM, False, now=3)
    s.set_bus("cam3", "aux", True, now=4)
    st = s.source_state("cam3")
    assert st.state is Tally.OFF and st.aux and st.buses == (Bus.AUX,)
    s.report("obs", {}, now=5)
    s.set_bus("o1", Bus.PROGRAM, True, authority="obs", now=6)
    assert s.source_state("o1").state is Tally.PROGRAM
    with pytest.raises(CommandRejected):
        s.set_bus("o1", Bus.PROGRAM, True, now=7)  # director cannot
    with pytest.raises(CommandRejected):
        s.set_bus("cam1", "nope", True, now=7)


def test_seq_strictly_monotonic_and_listeners():
    s = make_state()
    seen: list[int] = []
    s.add_listener(lambda ch: seen.append(ch.seq))

    def broken(ch):
        raise RuntimeError("boom")

    s.add_listener(broken)  # must not break the others or the command
    s.cut("cam1", now=0)
    s.set_preview("cam2", now=0)
    s.report("vmix", {"v1": ["program"]}, now=0)
    s.take(0.5, now=0)
    s.tick(1)
    s.authority_lost("vmix", now=2)
    assert seen == list(range(1, 7))
    assert s.seq == 6
    s.remove_listener(broken)
    s.remove_listener(broken)


def test_delta_accumulator_coalesces_latest_per_source():
    s = make_state()
    acc = DeltaAccumulator()
    s.add_listener(acc.add)
    assert acc.take() is None
    for i in range(50):  # a flooding switcher
        s.cut("cam1" if i % 2 else "cam2", now=i)
    s.set_preview("cam3", now=99)
    d = acc.take()
    assert d is not None
    assert d.seq == s.seq == 51 and d.first_seq == 1
    assert set(d.sources) == {"cam1", "cam2", "cam3"}
    assert d.sources["cam1"].state is Tally.PROGRAM  # the latest state
    assert d.sources["cam2"].state is Tally.OFF
    assert d.sources["cam3"].state is Tally.PREVIEW
    assert acc.take() is None and not acc.pending
    s.cut("cam2", now=100)
    d2 = acc.take()
    assert d2.seq == 52 and set(d2.sources) == {"cam1", "cam2"}


def test_two_consumers_coalesce_independently():
    s = make_state()
    a, b = DeltaAccumulator(), DeltaAccumulator()
    s.add_listener(a.add)
    s.add_listener(b.add)
    s.cut("cam1", now=0)
    assert a.take().seq == 1
    s.cut("cam2", now=1)
    db = b.take()
    assert db.seq == 2 and set(db.sources) == {"cam1", "cam2"}


def test_snapshot_restore_round_trip_via_json():
    s = make_state(default_transition=0.75)
    s.cut("cam1", now=0)
    s.set_preview("cam2", now=0)
    s.set_bus("cam3", Bus.AUX, True, now=0)
    s.report("vmix", {"v1": ["program"]}, now=0)
    s.take(now=1)  # stored as completed
    data = json.loads(json.dumps(s.to_dict()))
    r = TallyState.from_dict(data)
    assert r.seq == s.seq and r.production == "prod" and r.default_transition == 0.75
    assert r.program == "cam2" and r.preview == "cam1" and r.transition is None
    assert r.source_state("cam3").aux
    assert r.source_state("v1").state is Tally.UNKNOWN  # external: unknown until it reports
    assert r.sources["o1"].obs_scenes == ("Wide", "Both")
    ch = r.cut("cam3", now=5)
    assert ch.seq == s.seq + 1  # the sequence continues


def test_restore_with_current_config_drops_vanished_sources():
    s = make_state()
    s.cut("cam3", now=0)
    s.set_preview("cam1", now=0)
    data = s.to_dict()
    r = TallyState.from_dict(data, sources=[SourceConfig("cam1"), SourceConfig("cam9")])
    assert r.program is None and r.preview == "cam1"
    assert set(r.states()) == {"cam1", "cam9"}


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(version=99),
        lambda d: d.update(seq=-1),
        lambda d: d.update(seq="3"),
        lambda d: d.update(program=5),
        lambda d: d.update(program="v1"),
        lambda d: d.update(program="ghost"),
        lambda d: d.update(flags={"cam1": ["purple"]}),
        lambda d: d.update(flags=[]),
        lambda d: d.update(sources="x"),
        lambda d: d["sources"].append({"name": "cam1"}),
        lambda d: d["sources"].append({"name": "bad name"}),
        lambda d: d["sources"].append({"name": "x", "colour": 1}),
        lambda d: d.update(production=""),
        lambda d: d.update(default_transition=1e9),
    ],
)
def test_restore_rejects_corrupt_snapshots(mutate):
    data = make_state().to_dict()
    mutate(data)
    with pytest.raises(SnapshotError):
        TallyState.from_dict(data)


def test_restore_rejects_non_mapping():
    with pytest.raises(SnapshotError):
        TallyState.from_dict([])  # type: ignore[arg-type]


def test_config_validation_and_mappings():
    with pytest.raises(ConfigError):
        TallyState("p", [SourceConfig("a"), SourceConfig("a")])
    with pytest.raises(ConfigError):
        SourceConfig("x", tsl_address=0xFFFF)
    with pytest.raises(ConfigError):
        SourceConfig("x", vmix_input=0)
    with pytest.raises(ConfigError):
        SourceConfig("")
    s = make_state()
    assert s.vmix_inputs("vmix") == {1: ("v1",), 2: ("v2",)}
    assert s.obs_scenes("obs") == {"Wide": ("o1",), "Both": ("o1", "o2"), "Close": ("o2",)}
    assert s.tsl_addresses() == {0: ("cam1",), 1: ("cam2",)}
    assert s.tsl_addresses("vmix") == {}
    assert s.authorities() == {"director", "vmix", "obs"}


def test_change_to_dict_is_json():
    s = make_state()
    ch = s.cut("cam1", now=3.5, who="bob")
    d = json.loads(json.dumps(ch.to_dict()))
    assert d == {
        "seq": 1,
        "who": "bob",
        "origin": "cut",
        "at": 3.5,
        "sources": {
            "cam1": {"state": "program", "buses": ["program"], "aux": False, "label": "Camera 1", "authority": "director"}
        },
    }


def test_adopt_takes_newer_peer_snapshot_with_its_seq() -> None:
    from tally.state import SourceConfig, TallyState

    srcs = [SourceConfig("cam1"), SourceConfig("cam2"), SourceConfig("ext", authority="vmix", vmix_input=1)]
    a = TallyState("p", srcs)
    b = TallyState("p", srcs)
    a.cut("cam1", now=0.0)
    a.set_preview("cam2", now=0.0)
    seen = []
    b.add_listener(seen.append)
    change = b.adopt(a.to_dict(), now=1.0)
    assert change is not None and change.seq == a.seq == b.seq == 2 and change.origin == "peer"
    assert b.source_state("cam1").state == "program" and b.source_state("cam2").state == "preview"
    assert b.source_state("ext").state == "unknown"  # external state is each node's own
    assert seen == [change]
    assert b.adopt(a.to_dict(), now=2.0) is None  # not newer: ignored
    stale = a.to_dict()
    a.cut("cam2", now=3.0)
    b.adopt(a.to_dict(), now=3.0)
    assert b.adopt(stale, now=4.0) is None and b.program == "cam2"


def test_cut_of_the_preview_source_swaps_like_a_mixer() -> None:
    from tally.state import SourceConfig, TallyState

    st = TallyState("p", [SourceConfig("cam1"), SourceConfig("cam2"), SourceConfig("cam3")])
    st.cut("cam1", now=0.0)
    st.set_preview("cam2", now=0.0)
    change = st.cut("cam2", now=1.0)  # CUT button: preview → program, program → preview
    assert st.program == "cam2" and st.preview == "cam1"
    assert {n: s.state for n, s in change.sources.items()} == {"cam1": "preview", "cam2": "program"}
    st.cut("cam3", now=2.0)  # hot cut to a source not on preview: preview stays
    assert st.program == "cam3" and st.preview == "cam1"
    assert st.source_state("cam2").state == "off"


# ------------------------------------------------------------ reconfigure


def test_reconfigure_same_definitions_changes_nothing():
    s = make_state()
    s.cut("cam1", now=0)
    s.set_preview("cam2", now=0)
    s.report("vmix", {"v1": ["program"]}, now=0)
    seen: list[TallyChange] = []
    s.add_listener(seen.append)
    before, seq = tallies(s), s.seq
    assert s.reconfigure(list(s.sources.values()), now=1) is None
    assert tallies(s) == before and s.seq == seq and seen == []


def test_reconfigure_keeps_reported_state_and_is_one_sequenced_change():
    s = make_state()
    s.cut("cam1", now=0)
    s.set_preview("cam3", now=0)
    s.report("vmix", {"v1": ["program"], "v2": ["preview"]}, now=0)
    seq = s.seq
    seen: list[TallyChange] = []
    s.add_listener(seen.append)
    new = [
        SourceConfig("cam1", "Camera One"),               # label changed
        SourceConfig("cam2", "Camera 2", tsl_address=1),  # same
        SourceConfig("v1", authority="vmix", vmix_input=1),
        SourceConfig("v2", authority="vmix", vmix_input=2),
        SourceConfig("o1", authority="obs", obs_scenes=("Wide", "Both")),
        SourceConfig("o2", authority="obs", obs_scenes=("Close", "Both")),
        SourceConfig("cam4", authority="tsl:desk", tsl_address=4),  # new, external
        SourceConfig("cam5"),                              # new, director
    ]  # cam3 (on preview) removed
    change = s.reconfigure(new, default_transition=2.0, now=1, who="admin")
    assert change is not None and seen == [change]
    assert change.seq == seq + 1 == s.seq and change.origin == "config" and change.who == "admin"
    assert set(change.sources) == {"cam1", "cam3", "cam4", "cam5"}
    assert change.sources["cam1"].label == "Camera One" and change.sources["cam1"].state is Tally.PROGRAM
    gone = change.sources["cam3"]
    assert gone.removed and gone.state is Tally.UNKNOWN and gone.to_json()["removed"] is True
    assert change.sources["cam4"].state is Tally.UNKNOWN and change.sources["cam5"].state is Tally.OFF
    assert "removed" not in change.sources["cam5"].to_json()
    # what vMix reported is kept; preview forgot the removed source
    assert tallies(s)["v1"] == "program" and tallies(s)["v2"] == "preview"
    assert s.preview is None and s.program == "cam1" and "cam3" not in s.states()
    assert s.default_transition == 2.0
    with pytest.raises(CommandRejected):
        s.cut("cam3", now=2)


def test_reconfigure_authority_handover_and_transition():
    s = make_state()
    s.cut("cam1", now=0)
    s.set_preview("cam2", now=0)
    s.take(5.0, now=0)
    # cam2 (incoming) goes to a switcher mid-transition: the take completes
    # first, then cam2 leaves the director's buses and waits for its switcher
    new = [SourceConfig("cam1"), SourceConfig("cam2", authority="tsl", tsl_address=1), SourceConfig("cam3")]
    change = s.reconfigure(new, now=1)
    assert s.transition is None and s.program is None and s.preview == "cam1"
    assert tallies(s) == {"cam1": "preview", "cam2": "unknown", "cam3": "off"}
    assert {"v1", "o1"} <= {n for n, st in change.sources.items() if st.removed}
    s.report("tsl", {"cam2": ["program"]}, full=False, now=2)
    assert tallies(s)["cam2"] == "program"
    # and back to the director: off, no leftover from the switcher
    s.reconfigure([SourceConfig("cam1"), SourceConfig("cam2"), SourceConfig("cam3")], now=3)
    assert tallies(s)["cam2"] == "off"


def test_reconfigure_refuses_bad_definitions_without_change():
    s = make_state()
    s.cut("cam1", now=0)
    seq, before = s.seq, tallies(s)
    with pytest.raises(ConfigError):
        s.reconfigure([SourceConfig("a"), SourceConfig("a")], now=1)
    with pytest.raises(ConfigError):
        s.reconfigure([SourceConfig("a")], default_transition=99, now=1)
    assert s.seq == seq and tallies(s) == before
