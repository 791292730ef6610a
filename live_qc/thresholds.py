"""Per-stream QC thresholds: defaults are the ones engineers know from FFmpeg's
detectors and EBU R128 (REFERENCES.md "Loudness and QC")."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass(slots=True, frozen=True)
class Thresholds:
    analysis_fps: float = 10.0
    # blackdetect: pixel black if Y ≤ 16 + pix_th·219 (limited range); picture
    # black if ≥ pic_th of its pixels are; d = minimum duration.
    black_pix_th: float = 0.10
    black_pic_th: float = 0.98
    black_d: float = 2.0
    # freezedetect: mean |ΔY| / 2^bitdepth ≤ n against the freeze's first frame.
    freeze_n: float = 0.001
    freeze_d: float = 2.0
    bars_d: float = 2.0
    # blur: sharpness below blur_ratio × the stream's own recent baseline.
    blur_ratio: float = 0.35
    blur_d: float = 2.0
    blur_baseline_s: float = 8.0
    # shake: RMS of frame-to-frame global motion with the pan (its 1 s mean)
    # removed, in pixels of a 160-pixel-wide analysis image.
    shake_px: float = 2.5
    shake_d: float = 1.0
    # scene-change rate: more than scene_max_cuts cuts within scene_window_s.
    scene_cut_diff: float = 0.25
    scene_max_cuts: int = 6
    scene_window_s: float = 5.0
    # silencedetect: n = −60 dB sample peak on all channels, d = 2 s.
    silence_db: float = -60.0
    silence_d: float = 2.0
    # clipping: ≥ clip_runs runs of ≥ clip_run_len samples at ≥ clip_db in one
    # 50 ms block (a rounded-off top after AAC/Opus is still such a run).
    clip_db: float = -1.0
    clip_run_len: int = 4
    clip_runs: int = 2
    clip_clear_s: float = 0.5
    # phase: energy-weighted L/R correlation below phase_corr.
    phase_corr: float = -0.5
    phase_d: float = 1.0
    # channels: dead below dead_db peak while another channel carries signal;
    # duplicated when correlation ≥ dup_corr at equal level; imbalance ≥ imbalance_db.
    dead_db: float = -60.0
    signal_db: float = -45.0
    dup_corr: float = 0.995
    imbalance_db: float = 6.0
    channel_d: float = 2.0
    # 1 kHz line-up tone: share of the block's energy within ±tone_bw_hz of 1 kHz.
    tone_purity: float = 0.9
    tone_bw_hz: float = 40.0
    tone_d: float = 2.0
    # EBU R128: target −23 LUFS, live tolerance ±1 LU on short-term, −1 dBTP.
    target_lufs: float = -23.0
    tolerance_lu: float = 1.0
    loudness_d: float = 2.0
    true_peak_dbtp: float = -1.0
    # Stream detectors (live_qc/stream.py). stall: a track delivered no frame
    # for stall_d seconds of wall clock while the other track still
    # delivered or the source is still connected.
    stall_d: float = 2.0
    # frame rate: frames over fps_window_s (media time) below fps_ratio × the
    # stream's own rate over the preceding rate_baseline_s, for fps_d.
    fps_ratio: float = 0.8
    fps_window_s: float = 1.0
    fps_d: float = 2.0
    # bitrate: video bytes over bitrate_window_s below bitrate_ratio × the
    # same baseline, for bitrate_d (a window that long holds a keyframe at
    # usual GOPs, so keyframe bursts do not count as swings).
    bitrate_ratio: float = 0.25
    bitrate_window_s: float = 2.0
    bitrate_d: float = 2.0
    rate_baseline_s: float = 10.0
    rate_clear_s: float = 1.0
    # transport: TR 101 290 counters, SRT loss/drop, format changes and
    # B-frames; a marker closes after transport_clear_s without a new one.
    transport_clear_s: float = 2.0
    # PCR_repetition_error is timed on arrival: behind a network and an
    # event loop the PCRs' arrival jitters by tens of ms while FFmpeg's
    # default PCR period is 80 ms at 25 fps (the highest multiple of the
    # frame duration under 100 ms), so a lone excess is measurement noise.
    # The marker needs pcr_repetition_min within pcr_repetition_window_s; a
    # stream whose PCRs really are too far apart exceeds on every one (10 in
    # 2 s at 200 ms), while a loaded 2-core test machine showed bursts of up
    # to 3 in a second on healthy 80 ms-PCR SRT feeds.
    pcr_repetition_min: int = 6
    pcr_repetition_window_s: float = 2.0
    # SRT (and a WHIP publisher's RTP): within srt_window_s, ≥ srt_loss_min
    # packets reported lost and at least srt_loss_ratio of those expected (a
    # retransmission may still repair them: warning); ≥ srt_drop_min dropped
    # as too late (lost for good: error).
    srt_window_s: float = 1.0
    srt_loss_ratio: float = 0.02
    srt_loss_min: int = 10
    srt_drop_min: int = 1

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> "Thresholds":
        """Per-stream overrides (API/config); unknown names are an input error."""
        known = {f.name: f.type for f in fields(cls)}
        unknown = set(values) - set(known)
        if unknown:
            raise ValueError(f"unknown QC thresholds: {', '.join(sorted(unknown))}")
        return cls(**values)
