from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from media.webrtc.sdp import SdpError, choose_h264, choose_h264_ingest, choose_opus, h264_profile, parse_offer

OFFER = (Path(__file__).parent.parent / "fixtures" / "sdp" / "chromium_whep_offer.sdp").read_text()


def test_parses_real_chromium_offer() -> None:
    offer = parse_offer(OFFER)
    video, audio = offer.section("video"), offer.section("audio")
    assert video and audio and video.direction == "recvonly" and audio.direction == "recvonly"
    assert video.mid == "0" and audio.mid == "1"
    assert offer.candidates >= 1
    assert "urn:ietf:params:rtp-hdrext:sdes:mid" in video.extmap
    assert any(c.name == "h264" for c in video.codecs)
    assert choose_opus(audio).clock_rate == 48000


def test_h264_choice_matches_source_profile() -> None:
    video = parse_offer(OFFER).section("video")
    main = choose_h264(video, "4d0028")
    assert h264_profile(main.codec.profile_level_id) == "main" and main.answer_profile_level_id == "4d0028"
    # the answer keeps the offered profile and constraint flags, with the source's level
    constrained_high = parse_offer(OFFER.replace("profile-level-id=4d001f", "profile-level-id=640c1f")).section("video")
    ch = choose_h264(constrained_high, "640020")
    assert ch.answer_profile_level_id == "640c20"
    assert main.rtx is not None and main.rtx.fmtp["apt"] == str(main.codec.payload_type)
    cb = choose_h264(video, "42e01f")
    assert cb.codec.profile_level_id == "42e01f" and cb.codec.packetization_mode == 1
    # This Chromium offers no High profile, but High 4:4:4 Predictive, whose
    # decoders decode High: sent under that, never under Constrained Baseline.
    high = choose_h264(video, "640028")
    assert h264_profile(high.codec.profile_level_id) == "high-444" and high.answer_profile_level_id == "f40028"
    assert "lacks the source profile (high)" in high.reason and "also decode high" in high.reason
    # A Main source goes under the offered Main; a CB source under CB.
    assert choose_h264(video, "4d0028").codec.profile_level_id == "4d001f"


def test_h264_source_no_offered_profile_decodes_is_refused_with_reason() -> None:
    # A viewer (e.g. a hardware-decoding player) that offers only Constrained
    # Baseline cannot be sent a High stream: 422 with what it would need.
    only_cb = parse_offer(OFFER.replace("profile-level-id=4d001f", "profile-level-id=42e01f")
                          .replace("profile-level-id=f4001f", "profile-level-id=42e01f")).section("video")
    with pytest.raises(SdpError, match=r"H\.264 high \(profile-level-id 640028\).*offered: baseline, "
                                       r"constrained-baseline.*supports H\.264 high"):
        choose_h264(only_cb, "640028")
    assert choose_h264(only_cb, "42c01f").codec.profile_level_id in ("42e01f", "42001f")


FFMPEG9_WHIP_VIDEO = (
    "v=0\r\no=FFmpeg 1 2 IN IP4 127.0.0.1\r\ns=FFmpegPublishSession\r\nt=0 0\r\na=group:BUNDLE 1\r\n"
    "m=video 9 UDP/TLS/RTP/SAVPF 106 105\r\nc=IN IP4 0.0.0.0\r\na=ice-ufrag:d74c822a\r\n"
    "a=ice-pwd:94a9f17c0725f8f2314f4e075cac58c7\r\na=fingerprint:sha-256 0C:88:4E:68\r\na=setup:passive\r\n"
    "a=mid:1\r\na=sendonly\r\na=rtcp-mux\r\na=rtpmap:106 H264/90000\r\n"
    "a=fmtp:106 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=64001f\r\n"
    "a=rtcp-fb:106 nack\r\na=rtpmap:105 rtx/90000\r\na=fmtp:105 apt=106\r\n")


def test_ingest_choice_states_what_the_publisher_sends() -> None:
    # ffmpeg 9's WHIP offer (captured) lists only its encoder's profile.
    ffmpeg = choose_h264_ingest(parse_offer(FFMPEG9_WHIP_VIDEO).section("video"))
    assert ffmpeg.answer_profile_level_id == "64001f" and ffmpeg.codec.payload_type == 106
    assert ffmpeg.reason == "publisher sends high (profile-level-id 64001f); viewers need a decoder for it"
    assert "lacks" not in ffmpeg.reason
    browser = choose_h264_ingest(parse_offer(OFFER).section("video"))  # offers several: CB answered
    assert browser.answer_profile_level_id == "42e01f"
    assert browser.reason == "publisher sends constrained-baseline (profile-level-id 42e01f)"


@pytest.mark.parametrize("plid, family", [("42e01f", "constrained-baseline"), ("42001f", "baseline"),
                                          ("4d001f", "main"), ("4de01f", "constrained-baseline"),
                                          ("640c1f", "high"), ("f4001f", "high-444"), (None, "constrained-baseline"),
                                          ("zzzzzz", "unknown")])
def test_profile_families(plid, family) -> None:
    assert h264_profile(plid) == family


@pytest.mark.parametrize("mutate, needle", [
    (lambda s: "", "v=0"),
    (lambda s: "hello", "v=0"),
    (lambda s: s.split("m=video")[0], "no audio or video"),
    (lambda s: s.replace("a=ice-ufrag", "a=x-ufrag"), "ICE credentials"),
    (lambda s: s.replace("a=fingerprint", "a=x-fingerprint"), "fingerprint"),
    (lambda s: s.replace("a=mid:", "a=x-mid:"), "a=mid"),
    (lambda s: s + "m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:5\r\n", "more than one video"),
    (lambda s: s.replace("a=rtpmap:102", "a=rtpmap:x102"), "rtpmap"),
])
def test_bad_offers_refused(mutate, needle) -> None:
    with pytest.raises(SdpError, match=needle):
        parse_offer(mutate(OFFER))


def test_hostile_sizes_refused() -> None:
    many = OFFER.replace("a=mid:0", "a=mid:0\r\n" + "a=candidate:1 1 udp 1 192.0.2.1 9 typ host\r\n" * 5000)
    with pytest.raises(SdpError, match="lines|candidates"):
        parse_offer(many, max_bytes=10_000_000)
    with pytest.raises(SdpError, match="larger"):
        parse_offer(OFFER.encode() + b"a=x\r\n" * 20000)
    with pytest.raises(SdpError, match="UTF-8"):
        parse_offer(b"v=0\r\n\xff\xfe")


def test_no_h264_no_opus() -> None:
    video = parse_offer(OFFER.replace("H264/90000", "H265/90000")).section("video")
    with pytest.raises(SdpError, match="H.264"):
        choose_h264(video, "42e01f")
    audio = parse_offer(OFFER.replace("opus/48000", "foo/48000")).section("audio")
    with pytest.raises(SdpError, match="Opus"):
        choose_opus(audio)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400) | st.binary(max_size=400).map(lambda b: b.decode("latin-1")))
def test_fuzz_parse_offer_only_raises_sdp_error(text: str) -> None:
    try:
        parse_offer("v=0\r\n" + text)
    except SdpError:
        pass
