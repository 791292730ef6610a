"""The benchmark's arithmetic for egress workers (loadtests/fanout_ab.py):
the server's CPU is its main process's plus every worker's."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

AB_PATH = pathlib.Path(__file__).resolve().parents[2] / "loadtests" / "fanout_ab.py"
_spec = importlib.util.spec_from_file_location("loadtests_fanout_ab_egress", AB_PATH)
assert _spec is not None and _spec.loader is not None
fanout_ab = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fanout_ab)


def test_worker_cpu_joins_the_main_process_figure() -> None:
    sv = {"cpu_s": 3.0, "core_pct": 10.0, "us_per_packet": 2.0, "metrics": [
        {"series": 'returnfeed_egress_worker_cpu_seconds_total{worker="0"}', "delta": 4.0},
        {"series": 'returnfeed_egress_worker_cpu_seconds_total{worker="1"}', "delta": 5.0},
        {"series": "returnfeed_webrtc_packets_sent_total", "delta": 1e6}]}
    fanout_ab.add_worker_cpu(sv)
    assert sv["cpu_s"] == 12.0 and sv["main_cpu_s"] == 3.0 and sv["worker_cpu_s"] == 9.0
    assert sv["core_pct"] == pytest.approx(40.0) and sv["us_per_packet"] == pytest.approx(8.0)


def test_without_workers_the_figure_is_unchanged() -> None:
    sv = {"cpu_s": 3.0, "core_pct": 10.0, "us_per_packet": 2.0, "metrics": []}
    fanout_ab.add_worker_cpu(sv)
    assert sv == {"cpu_s": 3.0, "core_pct": 10.0, "us_per_packet": 2.0, "metrics": []}
