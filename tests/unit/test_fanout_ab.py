"""loadtests/fanout_ab.py's variants: ``--set LABEL:section.key=value`` →
the server's environment settings per variant."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

AB_PATH = pathlib.Path(__file__).resolve().parents[2] / "loadtests" / "fanout_ab.py"
_spec = importlib.util.spec_from_file_location("loadtests_fanout_ab", AB_PATH)
assert _spec is not None and _spec.loader is not None
fanout_ab = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fanout_ab)


def test_settings_with_one_label_form_one_variant_in_first_seen_order() -> None:
    variants = fanout_ab.parse_variants([
        "shared:webrtc.ice_mux=true", "per-session:webrtc.ice_mux=false", "shared:webrtc.ice_udp_port=0"])
    assert list(variants) == ["shared", "per-session"]
    assert variants["shared"] == {"RETURNFEED_WEBRTC__ICE_MUX": "true", "RETURNFEED_WEBRTC__ICE_UDP_PORT": "0"}
    assert variants["per-session"] == {"RETURNFEED_WEBRTC__ICE_MUX": "false"}


def test_a_value_may_contain_colons_and_equals_signs() -> None:
    variants = fanout_ab.parse_variants(['v:webrtc.ice_announce=["a=b:1"]'])
    assert variants == {"v": {"RETURNFEED_WEBRTC__ICE_ANNOUNCE": '["a=b:1"]'}}


@pytest.mark.parametrize("spec", ["webrtc.ice_mux=true", "v:ice_mux=true", "v:webrtc.ice_mux", ":webrtc.ice_mux=1"])
def test_malformed_settings_are_refused(spec: str) -> None:
    with pytest.raises(SystemExit, match="LABEL:section.key=value"):
        fanout_ab.parse_variants([spec])


def test_no_settings_no_variants() -> None:
    assert fanout_ab.parse_variants([]) == {}


def test_server_drops_keep_only_grown_drop_counters() -> None:
    changes = [
        {"series": "returnfeed_webrtc_ice_mux_dropped_packets", "before": 0, "after": 12, "delta": 12},
        {"series": "returnfeed_webrtc_send_errors", "before": 3, "after": 5, "delta": 2},
        {"series": "returnfeed_webrtc_packets_sent", "before": 0, "after": 900, "delta": 900},
        {"series": "returnfeed_webrtc_viewers_dropped", "before": None, "after": 0, "delta": None},
    ]
    assert fanout_ab.server_drops(changes) == {"returnfeed_webrtc_ice_mux_dropped_packets": 12,
                                               "returnfeed_webrtc_send_errors": 2}
