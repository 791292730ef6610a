"""Ingest cores: a source's bytes + ``now`` → calls on a Stream's publisher.

Sans-I/O (no sockets, no clock, no tasks): the protocol servers
(media/srt/…) move the bytes in and arm the timers the cores ask for.

* ``ts`` — MPEG-TS (SRT messages): :class:`~media.ingest.ts.TsIngest`.
"""
