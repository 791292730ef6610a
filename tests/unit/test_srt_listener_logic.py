"""Listener logic without sockets: decisions, the reject rate limiter, log lines."""

from __future__ import annotations

import json
import logging

import pytest

from media.log import event
from media.srt import listener as listener_mod
from media.srt.listener import Decision, ListenerCounters, RateLimit, RejectRateLimiter, reject_unparsable
from server.log import _JsonFormatter, _TextFormatter


def test_decision_validation() -> None:
    ok = Decision.allow(passphrase="0123456789", pbkeylen=32, latency_ms=20)
    assert ok.accept and ok.passphrase == "0123456789" and ok.pbkeylen == 32 and ok.latency_ms == 20
    no = Decision.deny(1404, "not found")
    assert not no.accept and no.reason_code == 1404 and no.reason == "not found"
    assert Decision.deny(2001, "app-defined").reason_code == 2001
    with pytest.raises(ValueError, match="1000..2999"):
        Decision.deny(404, "HTTP code instead of SRT code")
    with pytest.raises(ValueError, match="1000..2999"):
        Decision(False)
    with pytest.raises(ValueError, match="10 to 79"):
        Decision.allow(passphrase="short")
    with pytest.raises(ValueError, match="10 to 79"):
        Decision.allow(passphrase="x" * 80)
    with pytest.raises(ValueError, match="pbkeylen"):
        Decision.allow(passphrase="0123456789", pbkeylen=20)
    with pytest.raises(ValueError, match="latency"):
        Decision.allow(latency_ms=-1)
    with pytest.raises(AttributeError):
        ok.accept = False  # type: ignore[misc]


def test_reject_unparsable_carries_parser_code() -> None:
    d = reject_unparsable("#!::r=cam1,m=bidirectional")
    assert (d.accept, d.reason_code) == (False, 1405)
    assert "bidirectional" in d.reason
    d = reject_unparsable("garbage")
    assert d.reason_code == 1400
    # parseable: still a reject (the caller asked for it), generic reason
    assert reject_unparsable("publish:cam1").reason_code == 1400


def test_rate_limiter_token_bucket() -> None:
    lim = RejectRateLimiter(RateLimit(burst=3, per_second=1.0))
    t = 100.0
    assert not lim.blocked("1.2.3.4", t)
    assert lim.charge("1.2.3.4", t) is False
    assert lim.charge("1.2.3.4", t) is False
    assert lim.charge("1.2.3.4", t) is True  # the charge that empties the bucket
    assert lim.blocked("1.2.3.4", t)
    assert lim.charge("1.2.3.4", t) is False  # already blocked: no second "tripped"
    assert not lim.blocked("5.6.7.8", t)  # per IP
    assert lim.blocked("1.2.3.4", t + 0.5)
    assert not lim.blocked("1.2.3.4", t + 1.0)  # one token back after 1 s
    lim.charge("1.2.3.4", t + 1.0)
    assert lim.blocked("1.2.3.4", t + 1.0)
    assert not lim.blocked("1.2.3.4", t + 100)  # refills, capped at burst
    for _ in range(2):
        lim.charge("1.2.3.4", t + 100)
    assert not lim.blocked("1.2.3.4", t + 100)


def test_rate_limiter_memory_is_bounded() -> None:
    lim = RejectRateLimiter(RateLimit(burst=2, per_second=1.0, max_hosts=100))
    for i in range(1000):
        lim.charge(f"10.0.{i // 256}.{i % 256}", 0.0)
    assert len(lim) <= 100
    # the most recent offenders are kept
    lim.charge("10.0.3.231", 0.0)
    assert lim.blocked("10.0.3.231", 0.0)
    # full buckets are pruned first
    lim2 = RejectRateLimiter(RateLimit(burst=2, per_second=1.0, max_hosts=3))
    lim2.charge("a", 0.0)
    lim2.charge("b", 0.0)
    lim2.charge("c", 10.0)
    lim2.charge("d", 10.0)  # a and b have refilled by now: pruned
    assert len(lim2) == 2


def test_rate_limit_validation() -> None:
    with pytest.raises(ValueError):
        RateLimit(burst=0)
    with pytest.raises(ValueError):
        RateLimit(per_second=0)


def test_counters_as_dict_is_a_snapshot() -> None:
    c = ListenerCounters()
    c.rejected_by_reason[1404] = 2
    snap = c.as_dict()
    c.rejected_by_reason[1404] = 3
    assert snap["rejected_by_reason"] == {1404: 2}
    assert set(snap) >= {"accepted", "rejected", "rate_limited", "handshake_failed", "active", "parse_errors"}


def test_log_events_reach_the_json_and_text_output_as_fields(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="returnfeed.srt")
    event(listener_mod.log, logging.INFO, "srt.reject", code=1404, peer="1.2.3.4:5", streamid='a b"c', reason="")
    (record,) = caplog.records
    assert record.name == "returnfeed.srt"
    assert record.getMessage() == "srt.reject"
    assert record.fields == {"code": 1404, "peer": "1.2.3.4:5", "streamid": 'a b"c', "reason": ""}
    line = json.loads(_JsonFormatter().format(record))
    assert line["event"] == "srt.reject" and line["logger"] == "returnfeed.srt"
    assert {k: line[k] for k in ("code", "peer", "streamid", "reason")} == record.fields
    assert _TextFormatter().format(record).endswith("""srt.reject code=1404 peer=1.2.3.4:5 streamid='a b"c' reason=""")
    caplog.clear()
    # A caller-chosen stream ID cannot break the text line in two.
    event(listener_mod.log, logging.INFO, "srt.x", streamid="a\nb")
    text = _TextFormatter().format(caplog.records[0])
    assert "\n" not in text and text.endswith("srt.x streamid='a\\nb'")
    assert json.loads(_JsonFormatter().format(caplog.records[0]))["streamid"] == "a\nb"