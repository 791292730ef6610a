"""Prometheus families of the media path, read at scrape time.

Streams and tracks, WHEP viewers (totals include closed sessions: every
``_total`` only goes up), layer switches, SRT ingest and listener counters,
forwarding latency. :meth:`MediaService.collect` is what the registry calls.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from media.errors import SrtApiError
from media.stream import StreamState

__all__ = ["collect", "counters"]


def counters(rows: Iterable[tuple[str, float, str]]) -> Iterator[CounterMetricFamily]:
    """One unlabelled counter family per ``(name, value, doc)``."""
    for name, value, doc in rows:
        fam = CounterMetricFamily(name, doc)
        fam.add_metric([], value)
        yield fam


def collect(media: Any) -> Iterable[Metric]:
    """``media``: the server's MediaService (typed loosely: this module is
    below it, and the layering test forbids the cycle even for types)."""
    streams = GaugeMetricFamily("returnfeed_stream_live", "1 when the stream is live", labels=["stream"])
    bitrate = GaugeMetricFamily("returnfeed_track_bitrate_bps", "Track bitrate over the last seconds",
                                labels=["stream", "track"])
    viewers = GaugeMetricFamily("returnfeed_viewers", "WebRTC viewers by stream and layer",
                                labels=["stream", "layer"])
    drops = CounterMetricFamily("returnfeed_stream_reader_drops", "Frames dropped by slow readers",
                                labels=["stream"])
    for stream in list(media.hub):
        st = stream.stats()
        streams.add_metric([st.name], 1 if st.state == StreamState.LIVE else 0)
        drops.add_metric([st.name], st.drops_total)
        for t in st.tracks:
            bitrate.add_metric([st.name, t.id], t.bitrate_bps)
    counts: dict[tuple[str, str], int] = {}
    for s in list(media.whep.sessions.values()):
        key = (s.stream_name, s.layer_name or "starting")
        counts[key] = counts.get(key, 0) + 1
    for (name, layer), n in counts.items():
        viewers.add_metric([name, layer], n)
    yield from (streams, bitrate, viewers, drops)

    # Totals include closed sessions: every _total only ever goes up.
    total, send_errors = media.whep.totals()
    yield from counters((
        ("returnfeed_webrtc_packets_sent", total.packets_sent, "RTP packets sent to viewers"),
        ("returnfeed_webrtc_bytes_sent", total.bytes_sent, "RTP bytes sent to viewers, retransmissions included"),
        ("returnfeed_webrtc_nacks", total.nacks, "NACK packets received from viewers"),
        ("returnfeed_webrtc_retransmits", total.retransmits, "Packets retransmitted to viewers"),
        ("returnfeed_webrtc_retransmit_bytes", total.retransmit_bytes, "Bytes retransmitted to viewers"),
        ("returnfeed_webrtc_retransmits_dropped", total.retransmits_dropped,
         "NACKed packets not resent: over the viewer's budget or past its playout window"),
        ("returnfeed_webrtc_probe_bytes", total.probe_bytes,
         "RTX probe bytes sent to find room for a higher layer (also in bytes_sent)"),
        ("returnfeed_webrtc_probes", total.probes, "Bandwidth probes started"),
        ("returnfeed_webrtc_probes_failed", total.probes_failed, "Bandwidth probes stopped on loss, delay or REMB"),
        ("returnfeed_webrtc_plis", total.plis + total.firs, "PLI/FIR received from viewers"),
        ("returnfeed_webrtc_viewer_freezes", total.freezes,
         "Viewer pictures that froze (a PLI/FIR until the next keyframe reached the viewer)"),
        ("returnfeed_webrtc_viewer_frozen_seconds", total.frozen_s,
         "Seconds viewers spent between a PLI/FIR and the next keyframe"),
    ))
    errors = CounterMetricFamily("returnfeed_webrtc_send_errors", "Datagram sends to viewers that failed "
                                 "(counted and survived unless they last)", labels=["errno"])
    for code, n in send_errors.items():
        errors.add_metric([code], n)
    yield errors
    closed = CounterMetricFamily("returnfeed_webrtc_sessions_closed", "WHEP sessions ended, by reason",
                                 labels=["reason"])
    for reason, n in media.whep.closed_by_reason.items():
        closed.add_metric([reason], n)
    yield closed
    struggling = GaugeMetricFamily("returnfeed_webrtc_viewers_struggling",
                                   "Viewers frozen, failing to receive, or losing more than the "
                                   "down-switch threshold", labels=["stream"])
    per_stream: dict[str, int] = {}
    for s in list(media.whep.sessions.values()):
        n = 1 if s.struggling() else 0
        per_stream[s.stream_name] = per_stream.get(s.stream_name, 0) + n
    for name, n in per_stream.items():
        struggling.add_metric([name], n)
    yield struggling
    switches = CounterMetricFamily("returnfeed_webrtc_layer_switches", "Layer switches",
                                   labels=["stream", "from", "to"])
    for (name, frm, to), n in media.whep.switches.items():
        switches.add_metric([name, frm, to], n)
    yield switches
    dropped = CounterMetricFamily("returnfeed_webrtc_viewers_dropped", "Viewers dropped for not keeping up",
                                  labels=["stream"])
    for name, n in media.whep.drops.items():
        dropped.add_metric([name], n)
    yield dropped
    yield from media.forwarding_latency.collect()
    yield from media.first_byte_latency.collect()
    yield from _ice_mux(getattr(media, "ice_mux", None))
    egress = getattr(media, "egress", None)
    if egress is not None:  # the egress worker processes (issue 15)
        yield from egress.collect_workers()

    ing = media.ingest
    yield from counters((
        ("returnfeed_srt_ingest_bytes", ing.bytes, "SRT payload bytes received from publishers"),
        ("returnfeed_srt_ingest_messages", ing.messages, "SRT messages received from publishers"),
        ("returnfeed_ingest_access_units", ing.access_units, "Access units demuxed"),
        ("returnfeed_ingest_demux_errors", ing.demux_errors, "MPEG-TS demux errors"),
        ("returnfeed_ingest_discontinuities", ing.discontinuities,
         "MPEG-TS continuity breaks (lost packets, signalled breaks, sync loss); video restarts at an IDR"),
    ))
    if media.srt is not None:
        lc = media.srt.counters
        g = GaugeMetricFamily("returnfeed_srt_connections", "Active SRT connections")
        g.add_metric([], lc.active)
        yield g
        acc = CounterMetricFamily("returnfeed_srt_accepted", "SRT connections accepted")
        acc.add_metric([], lc.accepted)
        yield acc
        rej = CounterMetricFamily("returnfeed_srt_rejected", "SRT handshakes rejected", labels=["code"])
        for code, n in dict(lc.rejected_by_reason).items():
            rej.add_metric([str(code)], n)
        yield rej
        rl = CounterMetricFamily("returnfeed_srt_rate_limited", "SRT handshakes refused by rate limit")
        rl.add_metric([], lc.rate_limited)
        yield rl
        hf = CounterMetricFamily("returnfeed_srt_handshake_failed",
                                 "SRT handshakes that failed after acceptance (e.g. wrong passphrase)")
        hf.add_metric([], lc.handshake_failed)
        yield hf
        # No peer address in labels (issue 9 item 8): a publisher's IP:port
        # is for directors (the streams API), not for every scraper.
        per = GaugeMetricFamily("returnfeed_srt_link", "Per-connection SRT link statistics",
                                labels=["stream", "layer", "stat"])
        for ingest in list(media.ingests.values()):
            try:
                stats = ingest.conn.stats()
            except SrtApiError:
                continue
            for key in ("msRTT", "pktRcvLoss", "pktRcvRetrans", "pktRcvDrop", "pktRcvBelated",
                        "msRcvBuf", "mbpsRecvRate", "msRcvTsbPdDelay"):
                if key in stats:
                    layer = ingest.conn.request.layer if ingest.conn.request is not None else None
                    per.add_metric([ingest.stream.name, layer or "", key], float(stats[key]))
        yield per

    ice_tcp = getattr(media, "ice_tcp", None)
    if ice_tcp is not None:
        st = ice_tcp.stats
        # Connections handed to egress workers live on there (their figures
        # come with the workers' reports).
        figures = getattr(media.whep, "ice_tcp_figures", None)
        w_open, w_idle, w_dropped = figures() if figures is not None else (0, 0, 0)
        g = GaugeMetricFamily("returnfeed_webrtc_ice_tcp_connections", "ICE-TCP connections open")
        g.add_metric([], ice_tcp.open_connections + w_open)
        yield g
        yield from counters((
            ("returnfeed_webrtc_ice_tcp_accepted", st.accepted, "ICE-TCP connections accepted"),
            ("returnfeed_webrtc_ice_tcp_timed_out", st.timed_out,
             "ICE-TCP connections closed without a valid STUN request in time"),
            ("returnfeed_webrtc_ice_tcp_idle_closed", st.idle_closed + w_idle,
             "ICE-TCP connections closed after idling"),
            ("returnfeed_webrtc_ice_tcp_frames_dropped", st.frames_dropped + w_dropped,
             "Packets not sent on ICE-TCP because the connection's write buffer was full"),
        ))
        refused = CounterMetricFamily("returnfeed_webrtc_ice_tcp_refused", "ICE-TCP connections refused",
                                      labels=["reason"])
        for reason, n in dict(st.refused).items():
            refused.add_metric([reason], n)
        yield refused

def _ice_mux(mux: Any) -> Iterable[Metric]:
    """The shared ICE UDP socket (media/webrtc/icemux.py), when it is on."""
    if mux is None:
        return
    c = mux.counters
    dropped = CounterMetricFamily("returnfeed_webrtc_ice_mux_dropped_packets",
                                  "Datagrams on the shared ICE port that belonged to no session", labels=["reason"])
    for reason, n in (("unknown_ufrag", c.dropped_unknown_ufrag),
                      ("unknown_transaction", c.dropped_unknown_transaction),
                      ("unknown_address", c.dropped_unknown_address),
                      ("not_a_request", c.dropped_not_stun_request)):
        dropped.add_metric([reason], n)
    yield dropped
    yield from counters((
        ("returnfeed_webrtc_ice_mux_dropped_bytes", c.dropped_bytes,
         "Bytes of the datagrams dropped on the shared ICE port"),
        ("returnfeed_webrtc_ice_mux_received_packets", c.received_packets, "Datagrams read on the shared ICE port"),
        ("returnfeed_webrtc_ice_mux_sessions_registered", c.sessions_registered,
         "ICE sessions registered on the shared port"),
        ("returnfeed_webrtc_ice_mux_addresses_learned", c.addresses_learned,
         "Remote addresses proved by a verified STUN request"),
        ("returnfeed_webrtc_ice_mux_addresses_evicted", c.addresses_evicted,
         "Remote addresses forgotten for a session's newer ones"),
        ("returnfeed_webrtc_ice_mux_send_errors", c.send_errors + c.send_dropped,
         "STUN/DTLS sends on the shared ICE port that failed or found the buffer full"),
    ))
    live = GaugeMetricFamily("returnfeed_webrtc_ice_mux_sessions", "ICE sessions on the shared port now")
    live.add_metric([], len(mux.sessions))
    yield live
