"""Bridge libsrt's epoll to asyncio: one thread, one hand-off per wakeup.

libsrt sockets are not OS file descriptors, so asyncio cannot poll them. One
thread (``srt-epoll``) waits in ``srt_epoll_uwait`` (timeout
``wait_timeout_ms``, 100 ms by default, so it notices a stop request) over
every socket it was given: listening sockets (readable = a caller waits in
the accept queue) and connected sockets (readable = a message is ready to
play, or the peer went away).

Per wakeup the thread

* accepts at most one caller per ready listening socket (the epoll is level
  triggered, so a second queued caller is reported on the next turn), makes
  the new socket non-blocking and adds it to the epoll;
* drains every readable socket with non-blocking ``srt_recvmsg2`` into one
  reused 1500-byte buffer until libsrt answers ``SRT_EASYNCRCV`` (bounded per
  socket and turn so one busy socket cannot starve the others);
* notices broken/closed sockets (``SRT_EPOLL_ERR`` or a receive error) and
  takes them out of the epoll; a broken socket is then polled every 5 ms
  until libsrt has released what it still held back for TSBPD (at most its
  receive latency + 100 ms), so the last ``latency`` ms a caller sent before
  hanging up are delivered, and only then reported closed;

and hands everything it collected to the event loop with ONE
``loop.call_soon_threadsafe`` — never one per packet. The loop side then
calls the :class:`BridgeSink` (accepted, data, closed, in that order).

The loop side may fall behind; what the thread has handed over but the loop
has not yet consumed is bounded by ``max_pending_bytes``: beyond it the thread
drops received messages (and counts them) instead of growing the loop's
queue without limit (DESIGN invariant 1). libsrt's own receive buffer is the
first line: a reader that does not read loses too-late packets there.

Sends (for ``read:`` consumers) happen on the loop thread with non-blocking
``srt_sendmsg2``: when the socket's send buffer is full libsrt answers
``SRT_EASYNCSND`` and the message is dropped and counted — the loop never
blocks on a slow reader.

ctypes releases the GIL during every libsrt call, so the thread's waiting and
copying does not hold up the loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

from media.errors import SrtApiError
from media.srt.binding import (
    SRT_LIVE_DEF_PLSIZE,
    EpollFlag,
    EpollOpt,
    EpollReader,
    SockOpt,
    SockStatus,
    SrtErrno,
    SrtLibrary,
)

__all__ = ["BridgeSink", "BridgeStats", "SrtBridge"]

log = logging.getLogger("returnfeed.srt")

#: An SRT live-mode message is at most SRT_LIVE_MAX_PLSIZE (1456) bytes; one
#: Ethernet MTU is plenty.
RECV_BUFFER_SIZE: Final = 1500
_EVENTS_CAPACITY: Final = 1024
#: Poll interval while a broken socket's buffer drains (epoll stays silent).
_DRAIN_POLL_MS: Final = 5
_LINGER_MARGIN_S: Final = 0.1

Batch = tuple[
    list[tuple[int, tuple[str, int], int]],  # accepted: (socket, peer, listening socket)
    list[tuple[int, list[bytes]]],  # data: (socket, messages)
    list[tuple[int, str]],  # closed: (socket, reason)
    float,  # time.monotonic() when the thread woke up
    int,  # bytes in this batch
]


class BridgeSink(Protocol):
    """Receives what the epoll thread collected; every method runs on the loop."""

    def bridge_accepted(self, sock: int, peer: tuple[str, int], listener: int) -> None: ...

    def bridge_data(self, sock: int, messages: list[bytes], now: float) -> None: ...

    def bridge_closed(self, sock: int, reason: str) -> None: ...


@dataclass(slots=True)
class BridgeStats:
    """Counters of the epoll thread (written only by it) and the loop side."""

    wakeups: int = 0
    batches: int = 0
    messages: int = 0
    bytes: int = 0
    accepted: int = 0
    closed: int = 0
    lingered_messages: int = 0
    dropped_lag_messages: int = 0
    accept_errors: int = 0
    sink_errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}  # type: ignore[attr-defined]


class SrtBridge:
    """One epoll thread feeding a :class:`BridgeSink` on an asyncio loop."""

    def __init__(
        self,
        lib: SrtLibrary,
        loop: asyncio.AbstractEventLoop,
        sink: BridgeSink,
        *,
        wait_timeout_ms: int = 100,
        max_drain_per_socket: int = 512,
        max_pending_bytes: int = 32 * 1024 * 1024,
        payload_size: int = SRT_LIVE_DEF_PLSIZE,
    ) -> None:
        self._lib = lib
        self._loop = loop
        self._sink = sink
        self._wait_timeout_ms = wait_timeout_ms
        self._max_drain = max_drain_per_socket
        self._max_pending = max_pending_bytes
        self._payload_size = payload_size
        self._eid = lib.epoll_create()
        # Return 0 after the timeout on an empty set instead of SRT_EPOLLEMPTY.
        lib.epoll_set(self._eid, EpollFlag.ENABLE_EMPTY)
        self._listeners: set[int] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._released = False
        # Thread-owned and loop-owned halves of the in-flight byte count; each
        # is written by one thread only, so no lock is needed.
        self._handed_bytes = 0
        self._consumed_bytes = 0
        self.stats = BridgeStats()

    # -- lifecycle (loop thread) ------------------------------------------

    @property
    def thread_native_id(self) -> int | None:
        return self._thread.native_id if self._thread is not None else None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("bridge already started")
        self._thread = threading.Thread(target=self._run, name="srt-epoll", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to stop and wait for it (at most one wait timeout)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    async def aclose(self) -> None:
        """Stop the thread without blocking the loop, then release the epoll."""
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        self.release()

    def release(self) -> None:
        """Release the epoll (after :meth:`stop`)."""
        if self._released:
            return
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("stop the bridge thread before releasing its epoll")
        self._released = True
        self._lib.c.srt_epoll_release(self._eid)

    # -- socket registration (any thread; libsrt's epoll is thread-safe) ----

    def add_listener(self, sock: int) -> None:
        """Watch a listening socket; it is made non-blocking for accept."""
        self._lib.setsockflag(sock, SockOpt.RCVSYN, False)
        self._listeners.add(sock)
        self._lib.epoll_add(self._eid, sock, EpollOpt.IN | EpollOpt.ERR)

    def remove_listener(self, sock: int) -> None:
        self._listeners.discard(sock)
        self._lib.c.srt_epoll_remove_usock(self._eid, sock)

    def add_socket(self, sock: int) -> None:
        """Watch a connected socket (made non-blocking both ways)."""
        self._lib.setsockflag(sock, SockOpt.RCVSYN, False)
        self._lib.setsockflag(sock, SockOpt.SNDSYN, False)
        self._lib.epoll_add(self._eid, sock, EpollOpt.IN | EpollOpt.ERR)

    def remove_socket(self, sock: int) -> None:
        self._lib.c.srt_epoll_remove_usock(self._eid, sock)

    def close_socket(self, sock: int) -> None:
        """Stop watching and ``srt_close`` a socket (errors are ignored: the
        socket may already be gone)."""
        self._lib.c.srt_epoll_remove_usock(self._eid, sock)
        self._lib.c.srt_close(sock)

    # -- sending (loop thread) ----------------------------------------------

    def send(self, sock: int, data: bytes) -> tuple[int, int, bool]:
        """Queue ``data`` on ``sock`` without blocking.

        Data longer than the payload size is split into payload-size messages
        (1316 = 7 TS packets by default). Returns ``(sent, dropped, broken)``
        in messages: ``dropped`` counts messages refused with
        ``SRT_EASYNCSND`` (send buffer full); ``broken`` is True when libsrt
        reported any other error (the connection is gone; the epoll thread
        reports the close) — the unsent rest then counts as dropped.
        """
        send = self._lib.send_nowait
        step = self._payload_size
        if len(data) <= step:
            chunks: list[bytes] | tuple[bytes] = (data,)
        else:
            chunks = [data[i : i + step] for i in range(0, len(data), step)]
        sent = dropped = 0
        for chunk in chunks:
            code = send(sock, chunk)
            if code == 0:
                sent += 1
            elif code == SrtErrno.EASYNCSND:
                dropped += 1
            else:
                return sent, len(chunks) - sent, True
        return sent, dropped, False

    # -- the epoll thread -----------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop_body()
        except BaseException:  # keep the process alive; report loudly
            log.exception("srt.bridge thread crashed")
            raise

    def _linger_deadline(self, sock: int, now: float) -> float:
        """When to give up reading a broken socket: its receive latency (data
        still held back by TSBPD becomes readable by then) plus a margin."""
        try:
            latency_ms = int(self._lib.getsockflag(sock, SockOpt.RCVLATENCY))
        except SrtApiError:
            return now
        return now + min(latency_ms, 10_000) / 1000.0 + _LINGER_MARGIN_S

    def receive_pending(self, sock: int) -> bool:
        """True while data for ``sock`` may still be on its way to the loop:
        libsrt holds received messages for it, or the thread has handed over
        a batch the loop has not consumed yet (any socket's: the batches are
        not split per socket). Thread-safe; one libsrt call."""
        if self._handed_bytes != self._consumed_bytes:
            return True
        return not self._buffer_empty(sock)

    def _buffer_empty(self, sock: int) -> bool:
        try:
            return int(self._lib.getsockflag(sock, SockOpt.RCVDATA)) <= 0
        except SrtApiError:
            return True

    def _loop_body(self) -> None:
        reader = EpollReader(self._lib, self._eid, capacity=_EVENTS_CAPACITY, buffer_size=RECV_BUFFER_SIZE)
        wait = reader.wait
        drain = reader.drain
        remove = self._lib.c.srt_epoll_remove_usock
        getstate = self._lib.c.srt_getsockstate
        monotonic = time.monotonic
        call_soon = self._loop.call_soon_threadsafe
        deliver = self._deliver
        eid = self._eid
        ev_in = int(EpollOpt.IN)
        ev_err = int(EpollOpt.ERR)
        easync_rcv = int(SrtErrno.EASYNCRCV)
        econnlost = int(SrtErrno.ECONNLOST)
        broken_state = int(SockStatus.BROKEN)
        listeners = self._listeners
        max_drain = self._max_drain
        max_pending = self._max_pending
        stats = self.stats
        stop = self._stop
        timeout = self._wait_timeout_ms
        # Broken sockets still holding data: libsrt keeps a broken socket's
        # receive buffer readable, releasing each message at its TSBPD play
        # time, but no longer signals the epoll. Poll them until they are
        # empty or their latency has passed, so the last `latency` ms a
        # caller sent before hanging up are not lost.
        draining: dict[int, tuple[float, str]] = {}

        while not stop.is_set():
            try:
                ready = wait(_DRAIN_POLL_MS if draining else timeout)
            except SrtApiError as exc:
                log.error("srt.bridge epoll wait failed errno=%d", exc.code)
                if stop.wait(timeout / 1000.0):
                    break
                continue
            if not ready and not draining:
                continue
            now = monotonic()
            if ready:
                stats.wakeups += 1
            accepted: list[tuple[int, tuple[str, int], int]] = []
            data: list[tuple[int, list[bytes]]] = []
            closed: list[tuple[int, str]] = []
            batch_bytes = 0
            lagging = (self._handed_bytes - self._consumed_bytes) > max_pending
            for fd, flags in ready:
                if fd in listeners:
                    if flags & ev_in:
                        ns, peer, code = reader.accept(fd)
                        if ns < 0:
                            if code != easync_rcv:
                                stats.accept_errors += 1
                                log.warning("srt.bridge accept failed errno=%d", code)
                            continue
                        stats.accepted += 1
                        accepted.append((ns, peer or ("?", 0), fd))
                        try:
                            self.add_socket(ns)
                        except SrtApiError:
                            # The caller left between the handshake and our
                            # accept: report it accepted and gone at once.
                            closed.append((ns, "broken"))
                    continue
                if fd in draining:
                    continue
                code = 0
                if flags & ev_in:
                    messages: list[bytes] = []
                    nbytes, code = drain(fd, max_drain, messages)
                    if messages:
                        if lagging:
                            stats.dropped_lag_messages += len(messages)
                        else:
                            stats.messages += len(messages)
                            batch_bytes += nbytes
                            data.append((fd, messages))
                if code or flags & ev_err:
                    remove(eid, fd)
                    if code and code != econnlost:
                        closed.append((fd, f"recv_error_{code}"))
                    else:
                        reason = "broken" if getstate(fd) == broken_state else "closed"
                        draining[fd] = (self._linger_deadline(fd, now), reason)
            for fd, (deadline, reason) in list(draining.items()):
                messages = []
                nbytes, code = drain(fd, max_drain, messages)
                if messages:
                    stats.messages += len(messages)
                    stats.lingered_messages += len(messages)
                    batch_bytes += nbytes
                    data.append((fd, messages))
                if (code and code != econnlost) or now >= deadline or (not messages and self._buffer_empty(fd)):
                    del draining[fd]
                    closed.append((fd, reason))
            stats.closed += len(closed)
            if accepted or data or closed:
                stats.bytes += batch_bytes
                stats.batches += 1
                self._handed_bytes += batch_bytes
                try:
                    call_soon(deliver, (accepted, data, closed, now, batch_bytes))
                except RuntimeError:  # loop closed under us: nothing to hand to
                    break

    # -- the loop side ------------------------------------------------------

    def _deliver(self, batch: Batch) -> None:
        accepted, data, closed, now, nbytes = batch
        self._consumed_bytes += nbytes
        sink = self._sink
        for sock, peer, listener in accepted:
            self._guard(sink.bridge_accepted, sock, peer, listener)
        for sock, messages in data:
            self._guard(sink.bridge_data, sock, messages, now)
        for sock, reason in closed:
            self._guard(sink.bridge_closed, sock, reason)

    def _guard(self, fn: Callable[..., None], *args: object) -> None:
        try:
            fn(*args)
        except Exception:
            self.stats.sink_errors += 1
            log.exception("srt.bridge sink %s failed", getattr(fn, "__name__", fn))
