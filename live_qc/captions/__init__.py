"""Live captions (issue 13): streaming faster-whisper with a stateful VAD and
a commit policy; one code path for the live caption tap and
``returnfeed captions FILE``."""

from .types import Caption, CaptionStats, Word

__all__ = ["Caption", "CaptionStats", "Word"]
