"""The open/close state machine every QC detector shares."""

from __future__ import annotations

from live_qc.markers import FaultTracker, Marker


def feed(tracker: FaultTracker, pattern: str, dt: float = 0.1, t0: float = 0.0):
    """One observation per character: '#' faulty, '.' clean."""
    events = []
    for i, ch in enumerate(pattern):
        t = t0 + i * dt
        events.extend((round(t, 6), e) for e in tracker.observe(t, t + dt, ch == "#"))
    return events


def test_opens_at_min_duration_with_start_back_dated():
    tr = FaultTracker("black", "", min_duration=0.5)
    events = feed(tr, "..######...")
    assert [(t, e.kind) for t, e in events] == [(0.6, "open"), (0.8, "close")]
    opened, closed = events[0][1].marker, events[1][1].marker
    assert opened.start == closed.start == 0.2
    assert opened.end is None  # the open event is a snapshot: closing does not rewrite it
    assert closed.end == 0.8


def test_shorter_fault_never_opens():
    tr = FaultTracker("silence", "", min_duration=0.5)
    assert feed(tr, "..####..####..") == []


def test_hysteresis_bridges_a_short_gap_and_ends_at_first_clean_observation():
    tr = FaultTracker("phase", "", min_duration=0.3, clear_duration=0.3)
    events = feed(tr, "#####..####....")
    kinds = [e.kind for _, e in events]
    assert kinds == ["open", "close"]
    assert events[1][1].marker.start == 0.0
    assert abs(events[1][1].marker.end - 1.1) < 1e-9


def test_gap_longer_than_hysteresis_closes_then_reopens():
    tr = FaultTracker("phase", "", min_duration=0.2, clear_duration=0.2)
    kinds = [e.kind for _, e in feed(tr, "###...###..")]
    assert kinds == ["open", "close", "open", "close"]


def test_flush_closes_an_open_marker_at_end_of_input():
    tr = FaultTracker("freeze", "", min_duration=0.2)
    events = feed(tr, "....#####")
    assert [e.kind for _, e in events] == ["open"]
    (closing,) = tr.flush(0.9)
    assert closing.kind == "close" and closing.marker.start == 0.4 and closing.marker.end == 0.9
    assert tr.flush(1.0) == []


def test_marker_json_uses_cli_field_names():
    m = Marker("black", "", 3.3712, 6.1249, "error", 0.98765, {"ratio": 1.0})
    assert m.to_json() == {"type": "black", "subtype": "", "start_s": 3.371, "end_s": 6.125,
                           "severity": "error", "confidence": 0.988, "metadata": {"ratio": 1.0}}
