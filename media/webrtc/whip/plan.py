"""WHIP offer → answer plan (sans-I/O SDP).

:func:`plan_offer` checks an offer, :func:`patch_answer` completes
aiortc's answer. A WHIP offer is
``sendonly`` H.264 (packetization-mode 1, RFC 6184 §8.1) and/or Opus
(RFC 7587), BUNDLEd (RFC 9725 §4.5), optionally simulcast with RIDs
(RFC 8853 §5.1 ``a=simulcast:send``, RFC 8851 ``a=rid``). aiortc knows
neither RIDs nor simulcast, so after it writes its answer we add, in the
video section, ``a=rid:<id> recv`` (RFC 8851 §4.3: the answerer reverses
the direction), ``a=simulcast:recv <streams>`` (RFC 8853 §5.3) and the
``sdes:rtp-stream-id`` / ``sdes:repaired-rtp-stream-id`` header extensions
(RFC 8852 §3) with the offer's ids (RFC 8285 §6: the answer keeps them).
Without those Chromium sends only its first encoding.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ...rtp.packet import HeaderExtensionUri
from ..sdp import CodecChoice, Offer, OfferedCodec, SdpError, choose_h264_ingest, choose_opus

__all__ = ["WhipPlan", "plan_offer", "patch_answer", "MAX_RIDS"]

URI_MID = HeaderExtensionUri.MID.value
URI_RID = HeaderExtensionUri.RID.value
URI_RRID = HeaderExtensionUri.REPAIRED_RID.value

#: RFC 8851 §10: rid-id = 1*(alpha-numeric / "-" / "_"); one-byte header
#: extension elements carry at most 16 bytes (RFC 8285 §4.2).
_RID_RE = re.compile(r"^[A-Za-z0-9_-]{1,16}$")
#: Most simulcast layers accepted in one offer.
MAX_RIDS = 4


@dataclass(frozen=True, slots=True)
class WhipPlan:
    """What a WHIP offer asks for and what the answer grants."""

    video: CodecChoice | None
    audio: OfferedCodec | None
    video_mid: str | None
    audio_mid: str | None
    rids: tuple[str, ...] = ()  # simulcast RIDs in a=simulcast order
    simulcast: str = ""  # the stream list echoed in a=simulcast:recv
    rid_ext: int | None = None
    rrid_ext: int | None = None
    fid: tuple[tuple[int, int], ...] = ()  # (rtx ssrc, media ssrc), RFC 5576 §4.3 FID groups
    nack: bool = False
    pli: bool = False
    remb: bool = False

    @property
    def answer_extmaps(self) -> list[tuple[int, str]]:
        """Header extensions to add to the video answer (aiortc omits them)."""
        out = []
        if self.rids and self.rid_ext is not None:
            out.append((self.rid_ext, URI_RID))
            if self.rrid_ext is not None and self.video is not None and self.video.rtx is not None:
                out.append((self.rrid_ext, URI_RRID))
        return out


def _sections(text: str) -> list[list[str]]:
    """Lines of each m= section (the session part is dropped)."""
    out: list[list[str]] = []
    for ln in text.replace("\r\n", "\n").split("\n"):
        if ln.startswith("m="):
            out.append([ln])
        elif out and ln:
            out[-1].append(ln)
    return out


def _parse_simulcast(value: str) -> list[str]:
    """RFC 8853 §5.1 ``a=simulcast`` value → RIDs of the send streams
    (first alternative of each; a paused one keeps its '~')."""
    tokens = value.split()
    if len(tokens) % 2:
        raise SdpError(f"malformed a=simulcast: {value[:60]!r}")
    streams: list[str] = []
    for direction, lst in zip(tokens[0::2], tokens[1::2]):
        if direction not in ("send", "recv"):
            raise SdpError(f"malformed a=simulcast direction {direction[:10]!r}")
        if direction != "send":
            continue
        for stream in lst.split(";"):
            alt = stream.split(",")[0]
            if not _RID_RE.match(alt.removeprefix("~")):
                raise SdpError(f"bad RID {alt[:20]!r} in a=simulcast")
            streams.append(alt)
    return streams


def plan_offer(text: str, offer: Offer) -> WhipPlan:
    """Check a (parsed) WHIP offer and decide the answer. Raises
    :class:`SdpError` for an offer that cannot be ingested passthrough."""
    video = offer.section("video")
    audio = offer.section("audio")
    for section in (video, audio):
        if section is not None and section.direction not in ("sendonly", "sendrecv"):
            raise SdpError(f"the {section.kind} section must be sendonly for WHIP (RFC 9725 §4.2), "
                           f"not {section.direction}")
    video_choice = choose_h264_ingest(video) if video is not None else None
    opus = choose_opus(audio) if audio is not None else None
    sections = _sections(text)
    bundle = [ln for ln in text.replace("\r\n", "\n").split("\n") if ln.startswith("a=group:BUNDLE")]
    mids = {m.mid for m in (video, audio) if m is not None}
    if len(mids) > 1 and not any(mids <= set(ln.split()[1:]) for ln in bundle):
        raise SdpError("audio and video must be BUNDLEd on one transport (RFC 9725 §4.5 max-bundle)")
    rids: tuple[str, ...] = ()
    simulcast = ""
    fid: list[tuple[int, int]] = []
    nack = pli = remb = False
    rid_ext = rrid_ext = None
    if video is not None and video_choice is not None:
        lines = next((s for s in sections if s[0].startswith("m=video")), [])
        for ln in lines:
            if ln.startswith("a=ssrc-group:FID "):
                parts = ln.split()[1:]
                if len(parts) == 2 and all(p.isdigit() for p in parts):
                    fid.append((int(parts[1]) & 0xFFFFFFFF, int(parts[0]) & 0xFFFFFFFF))
        sim_lines = [ln[len("a=simulcast:"):] for ln in lines if ln.startswith("a=simulcast:")]
        if sim_lines:
            streams = _parse_simulcast(sim_lines[0])
            declared = {rid for rid, direction in video.rids if direction == "send"}
            for s in streams:
                if s.removeprefix("~") not in declared:
                    raise SdpError(f"a=simulcast names RID {s.removeprefix('~')!r} without an a=rid send line")
            if len(streams) > MAX_RIDS:
                raise SdpError(f"at most {MAX_RIDS} simulcast layers are accepted, the offer has {len(streams)}")
            names = [s.removeprefix("~") for s in streams]
            if len(set(names)) != len(names):
                raise SdpError("a=simulcast repeats a RID")
            if streams:
                rid_ext = video.extmap.get(URI_RID)
                if rid_ext is None:
                    raise SdpError("simulcast needs the RID header extension "
                                   f"({URI_RID}, RFC 8852) in the offer")
                rrid_ext = video.extmap.get(URI_RRID)
                rids = tuple(names)
                simulcast = ";".join(streams)
        fb = video_choice.codec.rtcp_fb
        nack, pli, remb = "nack" in fb, "nack pli" in fb, "goog-remb" in fb
    return WhipPlan(video=video_choice, audio=opus, video_mid=video.mid if video else None,
                    audio_mid=audio.mid if audio else None, rids=rids, simulcast=simulcast, rid_ext=rid_ext,
                    rrid_ext=rrid_ext, fid=tuple(fid), nack=nack, pli=pli, remb=remb)


def patch_answer(answer: str, plan: WhipPlan) -> str:
    """Add what aiortc's answer lacks for RID simulcast (see module docstring)."""
    if not plan.rids or plan.video_mid is None:
        return answer
    lines = answer.split("\r\n")
    trailing = lines and lines[-1] == ""
    if trailing:
        lines.pop()
    starts = [i for i, ln in enumerate(lines) if ln.startswith("m=")] + [len(lines)]
    for a, b in zip(starts, starts[1:]):
        if lines[a].startswith("m=video") and f"a=mid:{plan.video_mid}" in lines[a:b]:
            section = lines[a:b]
            break
    else:
        raise SdpError("the answer has no video section to carry simulcast")
    have = {ln.split()[1] for ln in section if ln.startswith("a=extmap:") and len(ln.split()) > 1}
    extra = [f"a=extmap:{i} {uri}" for i, uri in plan.answer_extmaps if uri not in have]
    ext_at = max((k for k, ln in enumerate(section) if ln.startswith("a=extmap:")), default=None)
    if ext_at is None:
        ext_at = next((k for k, ln in enumerate(section) if ln.startswith("a=mid:")), 0)
    section[ext_at + 1:ext_at + 1] = extra
    section += [f"a=rid:{rid} recv" for rid in plan.rids]
    section.append(f"a=simulcast:recv {plan.simulcast}")
    lines[a:b] = section
    return "\r\n".join(lines) + ("\r\n" if trailing else "")
