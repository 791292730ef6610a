"""ReturnFeed live QC: sans-I/O detectors fed decoded audio/luma with media time.

One code path serves the live tap and ``returnfeed qc FILE``: a ``QcEngine``
per stream (``live_qc.engine``) with per-stream ``Thresholds``, returning
``MarkerEvent``s (open / close) that carry ``Marker``s.
"""

from .engine import QcEngine, closed_markers
from .markers import Marker, MarkerEvent
from .thresholds import Thresholds

__all__ = ["Marker", "MarkerEvent", "QcEngine", "Thresholds", "closed_markers"]
