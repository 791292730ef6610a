"""WHIP ingest (RFC 9725): aiortc for ICE/DTLS/SRTP, our own RTP path.

Three layers, outermost last, one module each::

    plan.py        plan_offer / patch_answer / WhipPlan   sans-I/O SDP
    rtp_ingest.py  RtpIngest / IngestConfig / RtpUnit     sans-I/O RTP core
    session.py     WhipSession / WhipService              asyncio + aiortc

An offer is planned (:func:`plan_offer`), aiortc answers and
:func:`patch_answer` adds the simulcast lines it lacks; once ICE/DTLS are up
the session feeds decrypted RTP to :class:`RtpIngest` and publishes the
:class:`RtpUnit` s it returns to the stream hub. Imports point up this list
only: the core knows the plan, the session knows both.
"""

from .plan import MAX_RIDS, WhipPlan, patch_answer, plan_offer
from .rtp_ingest import IngestConfig, IngestStats, RtpIngest, RtpUnit
from .session import SessionInfo, WhipService, WhipSession

__all__ = [
    "RtpUnit",
    "WhipPlan",
    "plan_offer",
    "patch_answer",
    "MAX_RIDS",
    "IngestConfig",
    "IngestStats",
    "RtpIngest",
    "SessionInfo",
    "WhipSession",
    "WhipService",
]
