"""SDP offer checks and codec choice for WHEP/WHIP (sans-I/O).

An offer is checked before aiortc sees it (RFC 9725 §4.2: a malformed or
unacceptable offer gets a 4xx, never a partial answer):

* size (``max_bytes``), UTF-8, CRLF/LF lines, starts with ``v=0``;
* at most ``max_lines`` lines and ``max_candidates`` ``a=candidate`` lines;
* at most one audio and one video section (WHIP/WHEP §4.2: one track per
  kind; simulcast is RID-based, RFC 8853), each with ICE credentials and a
  DTLS fingerprint (or session-level ones);
* what can be served passthrough: for video an H.264 payload type with
  packetization-mode=1 (RFC 6184 §5.8) whose profile we can answer; for
  audio Opus (RFC 7587).

:func:`choose_h264` picks the offered H.264 payload type for a source's
``profile-level-id``: the same profile when offered; otherwise the
smallest offered profile whose decoders also decode the source's (H.264
Annex A.2: a High 4:4:4 Predictive decoder decodes High, a High decoder
Main, every one Constrained Baseline); otherwise it refuses, naming the
source's profile and what the viewer offered. The answer never labels a
stream with a profile it does not conform to: a hardware decoder set up for
Constrained Baseline may fail on a High stream that a software decoder
would play. :func:`choose_h264_ingest` picks what a WHIP publisher sends.
The choice and the reason are returned so they are logged, never silent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import RemoteMediaError


class SdpError(RemoteMediaError):
    """The SDP offer is malformed or cannot be served."""


@dataclass(frozen=True, slots=True)
class OfferedCodec:
    payload_type: int
    name: str  # lower case: h264, opus, rtx, vp8 ...
    clock_rate: int
    channels: int
    fmtp: dict[str, str]
    rtcp_fb: tuple[str, ...]

    @property
    def profile_level_id(self) -> str | None:
        v = self.fmtp.get("profile-level-id")
        return v.lower() if v else None

    @property
    def packetization_mode(self) -> int:
        try:
            return int(self.fmtp.get("packetization-mode", "0"))
        except ValueError:
            return -1


@dataclass(slots=True)
class OfferedMedia:
    kind: str
    mid: str | None
    direction: str
    codecs: list[OfferedCodec] = field(default_factory=list)
    extmap: dict[str, int] = field(default_factory=dict)  # uri -> id
    rids: list[tuple[str, str]] = field(default_factory=list)  # (rid, direction)
    has_ice: bool = False
    has_fingerprint: bool = False

    def codec(self, pt: int) -> OfferedCodec | None:
        return next((c for c in self.codecs if c.payload_type == pt), None)

    def rtx_for(self, pt: int) -> OfferedCodec | None:
        return next((c for c in self.codecs if c.name == "rtx" and c.fmtp.get("apt") == str(pt)), None)


@dataclass(slots=True)
class Offer:
    media: list[OfferedMedia]
    candidates: int

    def section(self, kind: str) -> OfferedMedia | None:
        return next((m for m in self.media if m.kind == kind), None)


def parse_offer(text: str | bytes, *, max_bytes: int = 65536, max_lines: int = 2000,
                max_candidates: int = 64) -> Offer:
    if isinstance(text, bytes):
        if len(text) > max_bytes:
            raise SdpError(f"SDP larger than {max_bytes} bytes")
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise SdpError("SDP is not UTF-8") from None
    if len(text) > max_bytes:
        raise SdpError(f"SDP larger than {max_bytes} bytes")
    lines = [ln.rstrip("\r") for ln in text.split("\n")]
    lines = [ln for ln in lines if ln]
    if not lines or lines[0] != "v=0":
        raise SdpError("SDP must start with v=0")
    if len(lines) > max_lines:
        raise SdpError(f"SDP has more than {max_lines} lines")
    media: list[OfferedMedia] = []
    session_ice_attrs: set[str] = set()
    cur_ice_attrs: dict[int, set[str]] = {}
    session_fp = False
    candidates = 0
    cur: OfferedMedia | None = None
    rtpmap: dict[int, tuple[str, int, int]] = {}
    fmtp: dict[int, dict[str, str]] = {}
    fb: dict[int, list[str]] = {}
    pts: list[int] = []

    def close_section() -> None:
        if cur is None:
            return
        for pt in pts:
            name, rate, ch = rtpmap.get(pt, ("", 0, 0))
            if not name and pt < 96:  # static payload types (RFC 3551)
                name, rate, ch = {0: ("pcmu", 8000, 1), 8: ("pcma", 8000, 1), 9: ("g722", 8000, 1)}.get(
                    pt, (f"static{pt}", 0, 0))
            cur.codecs.append(OfferedCodec(pt, name, rate, ch, fmtp.get(pt, {}), tuple(fb.get(pt, []))))

    for ln in lines:
        if len(ln) < 2 or ln[1] != "=":
            raise SdpError(f"malformed SDP line: {ln[:40]!r}")
        key, value = ln[0], ln[2:]
        if key == "m":
            close_section()
            parts = value.split()
            if len(parts) < 4:
                raise SdpError(f"malformed m= line: {value[:60]!r}")
            kind = parts[0]
            cur = OfferedMedia(kind=kind, mid=None, direction="sendrecv")
            media.append(cur)
            rtpmap, fmtp, fb, pts = {}, {}, {}, []
            if kind in ("audio", "video"):
                for p in parts[3:]:
                    if not p.isdigit() or int(p) > 127:
                        raise SdpError(f"bad payload type {p[:10]!r} in m={kind}")
                    pts.append(int(p))
            continue
        if key != "a":
            continue
        attr, _, rest = value.partition(":")
        if attr == "candidate":
            candidates += 1
            if candidates > max_candidates:
                raise SdpError(f"more than {max_candidates} ICE candidates")
            continue
        if attr in ("ice-ufrag", "ice-pwd"):
            (session_ice_attrs if cur is None else cur_ice_attrs.setdefault(id(cur), set())).add(attr)
            if cur is not None:
                cur.has_ice = len(cur_ice_attrs[id(cur)]) == 2
            continue
        if attr == "fingerprint":
            if cur is None:
                session_fp = True
            else:
                cur.has_fingerprint = True
            continue
        if cur is None:
            continue
        if attr == "mid":
            cur.mid = rest.strip()[:32]
        elif attr in ("sendrecv", "sendonly", "recvonly", "inactive"):
            cur.direction = attr
        elif attr == "rtpmap":
            pt_s, _, enc = rest.partition(" ")
            bits = enc.split("/")
            try:
                pt = int(pt_s)
                rate = int(bits[1]) if len(bits) > 1 else 0
                ch = int(bits[2]) if len(bits) > 2 else 1
            except ValueError:
                raise SdpError(f"malformed rtpmap: {rest[:60]!r}") from None
            rtpmap[pt] = (bits[0].lower(), rate, ch)
        elif attr == "fmtp":
            pt_s, _, params = rest.partition(" ")
            if not pt_s.isdigit():
                raise SdpError(f"malformed fmtp: {rest[:60]!r}")
            d: dict[str, str] = {}
            for item in params.split(";"):
                k, _, v = item.strip().partition("=")
                if k:
                    d[k.strip().lower()] = v.strip()
            fmtp[int(pt_s)] = d
        elif attr == "rtcp-fb":
            pt_s, _, what = rest.partition(" ")
            if pt_s.isdigit():
                fb.setdefault(int(pt_s), []).append(what.strip())
        elif attr == "extmap":
            id_s, _, uri = rest.partition(" ")
            id_s = id_s.split("/")[0]
            if id_s.isdigit():
                cur.extmap[uri.split()[0] if uri else ""] = int(id_s)
        elif attr == "rid":
            parts = rest.split()
            if len(parts) >= 2:
                cur.rids.append((parts[0], parts[1]))
    close_section()

    session_ice = len(session_ice_attrs) == 2
    av = [m for m in media if m.kind in ("audio", "video")]
    if not av:
        raise SdpError("SDP offer has no audio or video section")
    for kind in ("audio", "video"):
        if sum(1 for m in av if m.kind == kind) > 1:
            raise SdpError(f"more than one {kind} section (send one track per kind; simulcast uses RIDs)")
    for m in av:
        if not (m.has_ice or session_ice):
            raise SdpError(f"m={m.kind} has no ICE credentials")
        if not (m.has_fingerprint or session_fp):
            raise SdpError(f"m={m.kind} has no DTLS fingerprint")
        if m.mid is None:
            raise SdpError(f"m={m.kind} has no a=mid (BUNDLE requires it)")
    return Offer(media, candidates)


# RFC 6184 §8.1 / RFC 6184 Table 5: profile_idc + constraint flags.
_CB, _BASELINE, _MAIN, _HIGH = "constrained-baseline", "baseline", "main", "high"


def h264_profile(plid: str | None) -> str:
    """Profile family of a profile-level-id ('42e01f' → constrained-baseline)."""
    if not plid or len(plid) != 6:
        return _CB  # RFC 6184 §8.1: absent means Baseline; browsers treat it as CB
    try:
        idc = int(plid[0:2], 16)
        iop = int(plid[2:4], 16)
    except ValueError:
        return "unknown"
    if idc == 0x42:
        return _CB if iop & 0x40 else _BASELINE
    if idc == 0x4D:
        return _CB if iop & 0x80 else _MAIN  # Main with constraint_set1 = CB
    if idc == 0x58:
        return _CB if iop & 0xC0 == 0xC0 else "extended"
    if idc == 0x64:
        return _HIGH
    if idc == 0xF4:
        return "high-444"
    if idc in (0x6E, 0x7A):
        return "high-10" if idc == 0x6E else "high-422"
    return "unknown"


@dataclass(frozen=True, slots=True)
class CodecChoice:
    codec: OfferedCodec
    rtx: OfferedCodec | None
    answer_profile_level_id: str
    reason: str


#: H.264 Annex A.2: each profile's decoders also decode every profile before
#: it in this chain (Baseline is taken as Constrained Baseline, as browsers
#: do: they offer 42001f and decode only the constrained subset).
_DECODES_CHAIN = (_CB, _MAIN, _HIGH, "high-10", "high-422", "high-444")


def _rank(family: str) -> int | None:
    family = _CB if family == _BASELINE else family
    return _DECODES_CHAIN.index(family) if family in _DECODES_CHAIN else None


def _h264_pm1(section: OfferedMedia) -> list[OfferedCodec]:
    h264 = [c for c in section.codecs if c.name == "h264" and c.packetization_mode == 1]
    if not h264:
        raise SdpError("the offer has no H.264 with packetization-mode=1; this server forwards H.264 "
                       "without transcoding")
    return h264


def choose_h264(section: OfferedMedia, source_plid: str | None) -> CodecChoice:
    """Pick the offered H.264 payload type to send a source with
    ``source_plid``; raises :class:`SdpError` when no offered profile can
    decode it."""
    h264 = _h264_pm1(section)
    want = h264_profile(source_plid)
    level = source_plid[4:6] if source_plid and len(source_plid) == 6 else None
    same = [c for c in h264 if h264_profile(c.profile_level_id) == want]
    if same:
        c = same[0]
        # RFC 6184 §8.2.2: the answer keeps the offered profile (profile_idc
        # and constraint flags, e.g. Constrained High 640c); with
        # level-asymmetry-allowed it may state the level the source sends.
        offered = c.profile_level_id or "42e01f"
        return CodecChoice(c, section.rtx_for(c.payload_type), offered[:4] + (level or offered[4:6]),
                           f"offer has the source profile ({want})")
    need = _rank(want)
    wider = []
    for c in h264:
        rank = _rank(h264_profile(c.profile_level_id))
        if need is not None and rank is not None and rank > need:
            wider.append((rank, c))
    if wider:
        c = min(wider, key=lambda rc: rc[0])[1]
        offered = c.profile_level_id or "42e01f"
        family = h264_profile(offered)
        return CodecChoice(c, section.rtx_for(c.payload_type), offered[:4] + (level or offered[4:6]),
                           f"offer lacks the source profile ({want}); sending under {family} payload type "
                           f"{c.payload_type}, whose decoders also decode {want} (H.264 Annex A.2)")
    offered_families = sorted({h264_profile(c.profile_level_id) for c in h264})
    raise SdpError(f"this stream is H.264 {want} (profile-level-id {source_plid}) and the offer has no "
                   f"profile that decodes it (offered: {', '.join(offered_families)}); use a player whose "
                   f"decoder supports H.264 {want}")


def choose_h264_ingest(section: OfferedMedia) -> CodecChoice:
    """Pick the H.264 payload type a WHIP publisher is to send. A browser
    offers several profiles and encodes the one answered: Constrained
    Baseline, which every viewer decodes. A publisher that offers only its
    own stream's profile (ffmpeg's WHIP muxer states its encoder's SPS, e.g.
    ``64001f`` for x264's default High) gets that profile answered as is."""
    h264 = _h264_pm1(section)
    cb = [c for c in h264 if h264_profile(c.profile_level_id) == _CB]
    pick = (cb or h264)[0]
    plid = pick.profile_level_id or "42e01f"
    family = h264_profile(plid)
    note = "" if family == _CB else "; viewers need a decoder for it"
    return CodecChoice(pick, section.rtx_for(pick.payload_type), plid,
                       f"publisher sends {family} (profile-level-id {plid}){note}")


def choose_opus(section: OfferedMedia) -> OfferedCodec:
    for c in section.codecs:
        if c.name == "opus" and c.clock_rate == 48000:
            return c
    raise SdpError("the offer has no Opus; audio is forwarded as Opus")


# -- trickle ICE (RFC 8840) ---------------------------------------------------

_ICE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+/")
_TOKEN_CHARS = frozenset("!#$%&'*+-.0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ^_`abcdefghijklmnopqrstuvwxyz{|}~")


def _digits(value: str, most: int) -> bool:
    return 0 < len(value) <= most and value.isascii() and value.isdigit()


def check_candidate(value: str) -> None:
    """Check one candidate (what follows ``a=candidate:``) against RFC 8839
    §5.1::

        candidate-attribute = "candidate" ":" foundation SP component-id SP
                              transport SP priority SP connection-address SP
                              port SP cand-type [SP rel-addr] [SP rel-port]
                              *(SP cand-extension)
        foundation = 1*32ice-char          component-id = 1*3DIGIT
        priority = 1*10DIGIT               cand-type = "typ" SP candidate-types
        cand-extension = extension-att-name SP extension-att-value

    and the ranges of RFC 8445 §5.1.2 (priority < 2^31) and §5.1.1.1
    (component ID 1..256). Raises :class:`SdpError` with the reason."""
    if not value.isascii() or not value.isprintable():
        raise SdpError("candidate must be printable ASCII")
    bits = value.split()
    if len(bits) < 8 or bits[6] != "typ":
        raise SdpError("candidate must be 'foundation component transport priority address port typ type'")
    foundation, component, transport, priority, address, port, _, cand_type = bits[:8]
    if len(foundation) > 32 or not set(foundation) <= _ICE_CHARS:
        raise SdpError("candidate foundation must be 1-32 ICE characters")
    if not _digits(component, 3) or not 1 <= int(component) <= 256:
        raise SdpError("candidate component ID must be 1..256")
    if not set(transport) <= _TOKEN_CHARS or not set(cand_type) <= _TOKEN_CHARS:
        raise SdpError("candidate transport and type must be tokens")
    if not _digits(priority, 10) or int(priority) >= 2**31:
        raise SdpError("candidate priority must be 1..2^31-1")
    if len(address) > 255:
        raise SdpError("candidate address too long")
    if not _digits(port, 5) or int(port) > 65535:
        raise SdpError("candidate port must be 0..65535")
    rest = bits[8:]
    if len(rest) % 2:
        raise SdpError("candidate extensions must be name value pairs")
    for name, ext in zip(rest[::2], rest[1::2]):
        if name == "rport" and (not _digits(ext, 5) or int(ext) > 65535):
            raise SdpError("candidate rport must be 0..65535")


def parse_trickle_candidates(frag: str, *, max_candidates: int = 64) -> list[str]:
    """The checked candidates of a trickle-ICE fragment (RFC 8840 §9
    sdpfrag): the values of its ``a=candidate:`` lines, in order."""
    out = []
    for line in frag.splitlines():
        line = line.strip()
        if line.startswith("a=candidate:"):
            if len(out) >= max_candidates:
                raise SdpError(f"more than {max_candidates} candidates in one fragment")
            value = line[len("a=candidate:"):]
            check_candidate(value)
            out.append(value)
    return out
