"""A WHEP viewer's timeline under a shaped network, and the checks on it.

Pure data + functions (no I/O, every time on one monotonic clock in
seconds) so the rules can be read, and unit-tested, apart from the browser
harness that records the timeline (tests/e2e/test_viewer_network.py).

Inputs, all timestamped:

* :class:`Sample` — the page's ``getStats()`` inbound-rtp video, every ~250 ms:
  the decoded picture height says which layer the viewer *sees*;
* :class:`Switch` — the server's ``webrtc.layer_switch`` decisions for this
  viewer (from its JSON log): what the server *decided* and why;
* :class:`Probe` — the server's bandwidth probes for this viewer (its log),
  reported beside the switches (a probe does not move the viewer, so it is
  not an up-attempt; what it costs the picture shows in the frozen time);
* :class:`ServerView` — the server's view of the viewer about once a second
  (``GET /api/v1/streams/{s}/viewers`` where the server has it, else the
  WHEP session's GET, plus the stream's counters from /metrics):
  retransmissions, bandwidth estimate;
* :class:`Phase` — when each network condition started and ended.

The rules (ReturnFeed issue 17, "Tests (in CI)"), each a :class:`Check`:

* down within 2 s of congestion, at a keyframe;
* under a sustained constraint, at most one up-attempt per 30 s after the
  first failed one, and at most 10 % of the time frozen after the first switch;
* back to high within 10 s once the network is clean (and staying there);
* retransmitted bytes ≤ the viewer's estimated bandwidth.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Check", "Phase", "Probe", "Sample", "ServerView", "Switch", "Timeline", "RTX_PACKET_BYTES"]

DOWN_WITHIN_S = 2.0
UP_ATTEMPT_SPACING_S = 30.0
FROZEN_SHARE_MAX = 0.10
BACK_UP_WITHIN_S = 10.0
# An up-switch this soon after a probe started is that probe's outcome, not
# a new attempt.
PROBE_LEADS_S = 10.0

# An upper bound on one retransmitted packet on the wire when the server
# reports only a count: a full-size H.264 payload (aiortc packetizes at
# 1,200 bytes) + RTP header with extensions + the RTX OSN (RFC 4588 §4) +
# the SRTP tag.
RTX_PACKET_BYTES = 1250

# Field names under which the server's session view may carry the two
# quantities of the retransmission rule (first one present wins).
RTX_BYTES_FIELDS = ("retransmitted_bytes", "retransmit_bytes", "rtx_bytes",
                    "returnfeed_webrtc_retransmit_bytes_total")
ESTIMATE_FIELDS = ("estimate_bps", "estimated_bps", "estimate", "bandwidth_bps", "bandwidth", "remb_bps", "remb")


@dataclass(frozen=True, slots=True)
class Sample:
    t: float
    height: int
    frames_decoded: int
    key_frames: int
    freezes: int
    freeze_s: float
    packets_lost: int = 0
    packets_received: int = 0
    nacks: int = 0
    rtx_bytes: int = 0
    bytes_received: int = 0


@dataclass(frozen=True, slots=True)
class Switch:
    t: float
    frm: str
    to: str
    reasons: tuple[str, ...] = ()
    loss: float | None = None
    rtt: float | None = None
    bandwidth: float | None = None


@dataclass(frozen=True, slots=True)
class Probe:
    t: float
    event: str  # "started" or "failed"
    detail: str = ""
    bandwidth: float | None = None  # the viewer's REMB the server had then


@dataclass(frozen=True, slots=True)
class ServerView:
    t: float
    fields: dict[str, Any]

    def number(self, names: tuple[str, ...]) -> float | None:
        """The first of ``names`` present, searched at the top level, under
        ``stats`` and under ``stream_metrics`` (the stream's counters, the
        viewer's own while it is the stream's only viewer)."""
        for where in (self.fields, self.fields.get("stats") or {}, self.fields.get("stream_metrics") or {}):
            for name in names:
                v = where.get(name)
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    return float(v)
        return None


@dataclass(frozen=True, slots=True)
class Phase:
    start: float
    end: float
    label: str
    clean: bool
    capacity_bps: float | None = None  # the link's rate where the shaping has one


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass(slots=True)
class Timeline:
    """Everything recorded for one scenario; ``high``/``low`` are the two
    layers' picture heights."""

    high: int
    low: int
    phases: list[Phase] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    switches: list[Switch] = field(default_factory=list)
    probes: list[Probe] = field(default_factory=list)
    server: list[ServerView] = field(default_factory=list)
    shown: list[tuple[float, int]] = field(default_factory=list)  # (time, height) at each change on screen

    # -- derived ---------------------------------------------------------------------

    def constraint(self) -> Phase:
        return next(p for p in self.phases if not p.clean)

    def recovery(self) -> Phase:
        """The clean phase after the constraint."""
        c = self.constraint()
        return next(p for p in self.phases if p.clean and p.start >= c.end)

    def layer_changes(self) -> list[tuple[float, int]]:
        """(time, height) each time the picture height changes: from the
        video element's frame callbacks where recorded (frame-exact), else
        from the getStats samples (up to one sampling interval late)."""
        if self.shown:
            return list(self.shown)
        out: list[tuple[float, int]] = []
        for s in self.samples:
            if s.height and (not out or out[-1][1] != s.height):
                out.append((s.t, s.height))
        return out

    def height_at(self, t: float) -> int:
        """The picture height shown at ``t`` (0 before the first frame)."""
        height = 0
        for at, h in self.layer_changes():
            if at > t:
                break
            height = h
        return height

    def first_shown(self, after: float, height: int) -> float | None:
        """When ``height`` was first on screen at or after ``after`` (if it
        already was at ``after``, that time)."""
        if self.height_at(after) == height:
            return after
        return next((t for t, h in self.layer_changes() if t >= after and h == height), None)

    def frozen_seconds(self, start: float, end: float) -> tuple[float, float]:
        """Frozen time in [start, end] two ways: Chromium's
        ``totalFreezesDuration`` delta, and the sum of sampling intervals in
        which not one frame was decoded (a freeze still going on is not yet
        in Chromium's figure)."""
        inside = [s for s in self.samples if start <= s.t <= end]
        if len(inside) < 2:
            return 0.0, 0.0
        chromium = inside[-1].freeze_s - inside[0].freeze_s
        stalled = sum(b.t - a.t for a, b in zip(inside, inside[1:]) if b.frames_decoded == a.frames_decoded)
        return chromium, stalled

    # -- checks ----------------------------------------------------------------------

    def check_down(self) -> Check:
        c = self.constraint()
        shown = self.first_shown(c.start, self.low)
        name = f"down within {DOWN_WITHIN_S:g} s of congestion, at a keyframe"
        if shown is None or shown > c.end:
            return Check(name, False, f"never showed the low layer during '{c.label}' ({c.end - c.start:.0f} s)")
        delay = shown - c.start
        # getStats updates the height and the keyframe count as it decodes
        # (before the frame is presented): compare the sample that first has
        # the low height with the one before it.
        k = next((i for i, x in enumerate(self.samples) if x.t >= c.start and x.height == self.low), None)
        keyframe = bool(k) and self.samples[k].key_frames > self.samples[k - 1].key_frames
        ok = delay <= DOWN_WITHIN_S and keyframe
        return Check(name, ok, f"low layer shown {delay:.2f} s after '{c.label}' began"
                     + ("" if keyframe else "; no keyframe decoded at the change"))

    def up_attempts(self, start: float, end: float, *, probes: bool = False) -> list[tuple[float, str, bool]]:
        """Attempts to move the viewer up in [start, end): (time, "switch" or
        "probe", failed). An up-switch fails when a down-switch (or, with
        ``probes``, a failed probe) follows before the next attempt and
        before ``end``. With ``probes``, each probe started is an attempt
        too, and an up-switch a probe led to (within ``PROBE_LEADS_S``) is
        part of that probe's attempt."""
        ups = sorted(sw.t for sw in self.switches if sw.to == "high")
        started = sorted(pr.t for pr in self.probes if pr.event == "started") if probes else []
        attempts = [(t, "probe") for t in started]
        attempts += [(t, "switch") for t in ups if not any(0 <= t - p <= PROBE_LEADS_S for p in started)]
        attempts = sorted(a for a in attempts if start <= a[0] < end)
        failures = [sw.t for sw in self.switches if sw.to != "high"]
        if probes:
            failures += [pr.t for pr in self.probes if pr.event == "failed"]
        out = []
        for k, (t, kind) in enumerate(attempts):
            until = min(attempts[k + 1][0] if k + 1 < len(attempts) else end, end)
            out.append((t, kind, any(t < f < until for f in failures)))
        return out

    def check_up_attempts(self) -> Check:
        """Up-attempts are up-switches: what the viewer sees move. Probes
        (which do not move the viewer) are listed in the detail, spaced the
        same way, for the reader to weigh; what a failed probe costs the
        picture counts in :meth:`check_frozen`."""
        c = self.constraint()
        name = f"under '{c.label}': at most one up-attempt per {UP_ATTEMPT_SPACING_S:g} s after the first failure"

        def spacing(attempts: list[tuple[float, str, bool]]) -> tuple[list[str], list[float]]:
            listed = [f"{t - c.start:.1f}{' failed' if failed else ''}" for t, _, failed in attempts]
            first_failed = next((k for k, (_, _, failed) in enumerate(attempts) if failed), None)
            later = [t for t, _, _ in attempts[first_failed:]] if first_failed is not None else []
            return listed, [round(b - a, 1) for a, b in zip(later, later[1:])]

        switches, gaps = spacing(self.up_attempts(c.start, c.end))
        probes, probe_gaps = spacing([a for a in self.up_attempts(c.start, c.end, probes=True) if a[1] == "probe"])
        ok = all(g >= UP_ATTEMPT_SPACING_S for g in gaps)
        return Check(name, ok, f"up-switches at s {switches} after the constraint began, gaps after the first "
                     f"failure {gaps} s; probes at s {probes}, gaps after the first failed one {probe_gaps} s")

    def check_frozen(self) -> Check:
        c = self.constraint()
        name = f"under '{c.label}': ≤ {FROZEN_SHARE_MAX:.0%} of the time frozen after the first switch"
        first = next((sw.t for sw in sorted(self.switches, key=lambda x: x.t) if c.start <= sw.t < c.end), None)
        shown = self.first_shown(c.start, self.low)
        starts = [t for t in (first, shown if shown is not None and shown < c.end else None) if t is not None]
        if not starts:
            return Check(name, False, "no layer switch during the constraint")
        start = min(starts)
        span = c.end - start
        chromium, stalled = self.frozen_seconds(start, c.end)
        frozen = max(chromium, stalled)
        share = frozen / span if span > 0 else 0.0
        return Check(name, share <= FROZEN_SHARE_MAX,
                     f"frozen {frozen:.1f} s of {span:.1f} s ({share:.0%}; Chromium freezes {chromium:.1f} s, "
                     f"no frame decoded {stalled:.1f} s)")

    def check_back_up(self) -> Check:
        r = self.recovery()
        name = f"back to high within {BACK_UP_WITHIN_S:g} s once the network is clean"
        shown = self.first_shown(r.start, self.high)
        if shown is None:
            last = self.height_at(r.end)
            return Check(name, False, f"still {last}p {r.end - r.start:.0f} s after the network became clean")
        delay = shown - r.start
        return Check(name, delay <= BACK_UP_WITHIN_S, f"high layer shown {delay:.2f} s after the network became clean")

    def check_stays_high(self) -> Check:
        r = self.recovery()
        name = "stays on high while the network is clean (no flip-flop)"
        shown = self.first_shown(r.start, self.high)
        if shown is None:
            return Check(name, False, "never got back to high")
        later = [t for t, h in self.layer_changes() if shown < t <= r.end and h != self.high]
        downs = [sw for sw in self.switches if shown < sw.t <= r.end and sw.to != "high"]
        ok = not later and not downs
        detail = f"held high for {r.end - shown:.0f} s" if ok else (
            f"left high on a clean network: server switches down at s {[round(sw.t - r.start, 1) for sw in downs]}, "
            f"lower picture shown at s {[round(t - r.start, 1) for t in later]} after it became clean")
        return Check(name, ok, detail)

    def estimate_at(self, view: ServerView) -> tuple[float, str] | None:
        """The viewer's estimated bandwidth (bit/s) at ``view`` and where it
        came from: the server's own figure where its session view carries
        one, else the viewer's last REMB the server logged (with a layer
        switch or a probe); ``None`` before either is known."""
        reported = view.number(ESTIMATE_FIELDS)
        if reported is not None:
            return reported, "the server's estimate"
        logged = [(sw.t, sw.bandwidth) for sw in self.switches if sw.bandwidth]
        logged += [(pr.t, pr.bandwidth) for pr in self.probes if pr.bandwidth]
        known = [(t, bw) for t, bw in logged if t <= view.t]
        if not known:
            return None
        return float(max(known)[1] or 0.0), "the viewer's last logged REMB"

    def retransmitted_bytes(self, a: ServerView, b: ServerView) -> float | None:
        """Bytes retransmitted between two views: the server's byte counter
        where it has one, else its packet count × ``RTX_PACKET_BYTES``."""
        rb_a, rb_b = a.number(RTX_BYTES_FIELDS), b.number(RTX_BYTES_FIELDS)
        if rb_a is not None and rb_b is not None:
            return rb_b - rb_a
        n_a, n_b = a.number(("retransmits",)), b.number(("retransmits",))
        if n_a is None or n_b is None:
            return None
        return (n_b - n_a) * RTX_PACKET_BYTES

    def check_retransmissions(self) -> Check:
        """Per interval between two server views: bytes retransmitted ≤ the
        viewer's estimated bandwidth (:meth:`estimate_at`; the mean of both
        ends where the server reports it) × the interval.
        Intervals with no estimate yet are not judged; none judged is a
        failure. The share of the link's capacity (under a rate-limiting
        phase) is reported beside it: an estimate can be far above what the
        link carries (Chromium's REMB stays at Mbit/s behind a policer)."""
        name = "retransmitted bytes ≤ the viewer's estimated bandwidth"
        judged, worst, worst_link, failures, sources = 0, 0.0, 0.0, [], set()
        counted = False
        for a, b in zip(self.server, self.server[1:]):
            dt = b.t - a.t
            rtx = self.retransmitted_bytes(a, b)
            if dt <= 0 or rtx is None:
                continue
            counted = True
            phase = next((p for p in self.phases if p.start <= b.t < p.end), None)
            if phase is not None and phase.capacity_bps:
                worst_link = max(worst_link, rtx * 8 / (phase.capacity_bps * dt))
            found = self.estimate_at(b)
            if found is None:
                continue
            estimate, source = found
            before = a.number(ESTIMATE_FIELDS)
            if before is not None and b.number(ESTIMATE_FIELDS) is not None:
                # The server's estimate is known at both ends; the bytes were
                # sent in between: compare with its mean over the interval.
                estimate = (before + estimate) / 2
            sources.add(source)
            judged += 1
            ratio = rtx * 8 / (estimate * dt) if estimate > 0 else float("inf")
            worst = max(worst, ratio)
            if ratio > 1.0:
                failures.append(f"{rtx:.0f} B in {dt:.1f} s vs {estimate / 1000:.0f} kbit/s")
        if judged == 0:
            why = "no bandwidth estimate known" if counted else "no retransmission count from the server"
            return Check(name, False, f"no interval could be judged ({why})")
        return Check(name, not failures, f"{judged} intervals against {' or '.join(sorted(sources))}; "
                     f"worst {worst:.0%} of it (worst {worst_link:.0%} of the link's capacity)"
                     + (f"; over in {len(failures)}: {failures[:3]}" if failures else ""))

    def checks(self) -> list[Check]:
        return [self.check_down(), self.check_up_attempts(), self.check_frozen(), self.check_back_up(),
                self.check_stays_high(), self.check_retransmissions()]

    # -- report ----------------------------------------------------------------------

    def story(self, origin: float) -> list[str]:
        """Phases, server decisions and what the page showed, in time order
        (seconds since ``origin``)."""
        events: list[tuple[float, str]] = []
        for p in self.phases:
            events.append((p.start, f"network: {p.label}"))
        for sw in self.switches:
            events.append((sw.t, f"server: {sw.frm} → {sw.to} ({', '.join(sw.reasons)}; loss {sw.loss}, "
                                 f"rtt {sw.rtt}, bandwidth {sw.bandwidth})"))
        for pr in self.probes:
            events.append((pr.t, f"server: probe {pr.event} {pr.detail}".rstrip()))
        for t, h in self.layer_changes():
            events.append((t, f"page: showing {h}p"))
        prev: Sample | None = None
        for s in self.samples:
            if prev is not None and s.freezes > prev.freezes:
                events.append((s.t, f"page: freeze #{s.freezes} (total {s.freeze_s:.1f} s)"))
            prev = s
        return [f"{t - origin:7.2f} s  {text}" for t, text in sorted(events, key=lambda e: e[0])]
