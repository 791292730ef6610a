"""The viewer core's RTCP datagram entry (``ViewerEgress.on_rtcp_datagram``):
the unprotected compound packet as it comes off SRTCP, routed to the
viewer's tracks by SSRC — the job aiortc's router did before the RTCP
path skipped aiortc (media/webrtc/aiortc_adapter.py ``capture_rtcp``).
"""

from __future__ import annotations

from viewer_harness import AUDIO_SSRC, RTX_SSRC, VIDEO_SSRC, WALL0, Studio, Viewer

from media.rtp.layers import Reason
from media.rtp.packet import RtpPacket
from media.rtp.rtcp import (
    Fir, FirEntry, Nack, Pli, ReceiverReport, Remb, ReportBlock, Sdes, SdesChunk, ntp_from_unix, ntp_middle32,
    serialize_rtcp,
)
from media.webrtc.viewer import KeyframeWanted, LayerSwitched


def _rr(viewer: Viewer, ssrc: int, lost: int) -> ReceiverReport:
    ntp = ntp_from_unix(WALL0 + viewer.studio.clock.now)
    block = ReportBlock(ssrc=ssrc, fraction_lost=0, packets_lost=lost, highest_seq=viewer.highest, jitter=0,
                        lsr=(ntp_middle32(ntp) - 1310) & 0xFFFFFFFF, dlsr=0)
    return ReceiverReport(ssrc=9, reports=(block,))


def _feed(viewer: Viewer, *packets: object) -> list[bytes]:
    now = viewer.studio.clock.now
    return viewer.core.on_rtcp_datagram(serialize_rtcp(packets), now, ntp_from_unix(WALL0 + now))


def _attached() -> tuple[Studio, Viewer]:
    studio = Studio()
    studio.run_frames(30)
    viewer = Viewer(studio)
    viewer.attach()
    return studio, viewer


def test_a_compound_receiver_report_with_loss_moves_the_video_down() -> None:
    studio, viewer = _attached()
    studio.run_frames(13)
    assert _feed(viewer, _rr(viewer, VIDEO_SSRC, 0), Sdes((SdesChunk(9, ((1, b"viewer"),)),))) == []
    assert viewer.events() == []
    studio.run_frames(13)
    # Chromium's compound: RR + SDES + REMB in one datagram (RFC 3550 §6.1).
    _feed(viewer, _rr(viewer, VIDEO_SSRC, 20), Sdes((SdesChunk(9, ((1, b"viewer"),)),)),
          Remb(9, 10_000_000, (VIDEO_SSRC,)))
    (switched,) = viewer.events()
    assert isinstance(switched, LayerSwitched) and (switched.frm, switched.to) == ("high", "low")
    assert Reason.LOSS in switched.decision.reasons


def test_a_report_about_the_audio_ssrc_alone_leaves_the_video_layer_alone() -> None:
    studio, viewer = _attached()
    studio.run_frames(13)
    _feed(viewer, _rr(viewer, VIDEO_SSRC, 0))
    studio.run_frames(13)
    _feed(viewer, _rr(viewer, AUDIO_SSRC, 20))
    assert viewer.events() == [] and viewer.core.layer_name == "high"


def test_nacks_are_routed_to_the_track_their_media_ssrc_names() -> None:
    studio, viewer = _attached()
    studio.run_frames(10)
    viewer.report()
    sent = [RtpPacket.parse(d) for _, d in viewer.sent]
    video = tuple(p.sequence_number for p in sent if p.ssrc == VIDEO_SSRC)[-2:]
    out = _feed(viewer, Nack(9, VIDEO_SSRC, video))
    assert [RtpPacket.parse(d).ssrc for d in out] == [RTX_SSRC] * 2
    assert [int.from_bytes(RtpPacket.parse(d).payload[:2], "big") for d in out] == list(video)
    # The same numbers NACKed for the audio SSRC go to the audio track (it
    # has sent nothing here, so nothing to resend): never video RTX.
    assert _feed(viewer, Nack(9, AUDIO_SSRC, video)) == []
    assert viewer.core.stats.nacks == 2
    assert _feed(viewer, Nack(9, 4242, video)) == []
    assert viewer.core.stats.nacks == 2


def test_a_fir_names_its_target_in_the_fci_not_the_media_ssrc() -> None:
    studio, viewer = _attached()
    studio.run_frames(5)
    # RFC 5104 §4.3.1.2: the media source SSRC of a FIR is 0.
    _feed(viewer, Fir(9, (FirEntry(4242, 1),)))
    assert viewer.events() == [] and viewer.core.stats.firs == 0
    _feed(viewer, Fir(9, (FirEntry(VIDEO_SSRC, 2),)))
    assert viewer.events() == [KeyframeWanted()] and viewer.core.stats.firs == 1 and viewer.core.frozen


def test_a_pli_for_the_video_ssrc_freezes_and_one_for_audio_does_not() -> None:
    studio, viewer = _attached()
    studio.run_frames(5)
    _feed(viewer, Pli(9, AUDIO_SSRC))
    assert viewer.events() == [] and not viewer.core.frozen
    _feed(viewer, Pli(9, VIDEO_SSRC))
    assert viewer.events() == [KeyframeWanted()] and viewer.core.stats.plis == 1


def test_a_remb_counts_only_when_it_lists_the_video_ssrc() -> None:
    studio, viewer = _attached()
    studio.run_frames(13)
    _feed(viewer, _rr(viewer, VIDEO_SSRC, 0), Remb(9, 60_000, (4242,)))
    assert viewer.events() == []
    studio.run_frames(3)
    _feed(viewer, _rr(viewer, VIDEO_SSRC, 0), Remb(9, 60_000, (VIDEO_SSRC,)))
    (switched,) = viewer.events()
    assert isinstance(switched, LayerSwitched) and switched.to == "low"
    assert Reason.BANDWIDTH in switched.decision.reasons


def test_a_datagram_that_does_not_parse_is_dropped_whole() -> None:
    studio, viewer = _attached()
    studio.run_frames(13)
    nack = serialize_rtcp((Nack(9, VIDEO_SSRC, (1,)),))
    now = studio.clock.now
    assert viewer.core.on_rtcp_datagram(b"\x80\xc9", now, 0) == []
    # A valid NACK followed by a packet whose length runs past the datagram.
    assert viewer.core.on_rtcp_datagram(nack + b"\x80\xc9\x00\x09", now, 0) == []
    assert viewer.core.stats.nacks == 0 and viewer.events() == []
