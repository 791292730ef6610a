"""A stand-in caption worker process speaking the caption worker's messages
(server/caption_service.py), scripted by the audio payloads it is fed:

* ``say:<words>`` — a final caption of those words, 0.3 s each from ``t``;
* ``hyp:<words>`` — a partial caption of them;
* ``slow:<seconds>`` — sleeps that long (a worker that falls behind);
* ``die`` — exits at once with code 3 (a crash);
* anything else — counted (``stats`` ``extra["frames"]``).

Kept free of heavy imports: it is what the spawned child imports
(``FakeCaptionWorker``, for the parent, imports the tap's process handling
when called).
"""

from __future__ import annotations

import os
import queue
import time
from typing import Any

from live_qc.captions.types import Caption, CaptionStats, Word


def _caption(name: str, t: float, text: str, final: bool) -> Caption:
    words = tuple(Word(w, t + 0.3 * i, t + 0.3 * i + 0.25, 0.9, emphasis=w.isupper())
                  for i, w in enumerate(text.split()))
    end = words[-1].end if words else t
    return Caption(name, final, t, end, " ".join(w.text for w in words), words, "en")


def FakeCaptionWorker(capacity: int, index: int = 0) -> Any:
    """A TapWorker (live_qc.tap) running this stand-in as its process's main."""
    from live_qc.tap import TapWorker

    return TapWorker(capacity, index, target=fake_main, label="fake-captions")


def fake_main(inq: Any, results: Any, parent_pid: int | None = None) -> None:
    streams: dict[str, int] = {}
    while True:
        try:
            msg = inq.get(timeout=0.2)
        except queue.Empty:
            if parent_pid is not None and os.getppid() != parent_pid:
                return
            continue
        except (EOFError, OSError):
            return
        out: list[tuple] = []
        op = msg[0]
        if op == "stop":
            out += [("state", name, "stopped", "worker stopping") for name in streams]
            results.send(out)
            results.close()
            return
        name = msg[1]
        if op == "attach":
            streams[name] = 0
            out.append(("state", name, "running", repr(sorted((msg[2] or {}).items()))))
        elif op == "detach":
            streams.pop(name, None)
            out.append(("state", name, "stopped", ""))
        elif op == "reset" and name in streams:
            out.append(("state", name, "running", f"reset {msg[2]}"))
        elif op == "audio" and name in streams:
            t, data = msg[3], msg[4]
            streams[name] += 1
            if data == b"die":
                os._exit(3)
            if data.startswith(b"slow:"):
                time.sleep(float(data[5:]))
            elif data.startswith(b"say:"):
                out.append(("caption", name, _caption(name, t, data[4:].decode(), True)))
            elif data.startswith(b"hyp:"):
                out.append(("caption", name, _caption(name, t, data[4:].decode(), False)))
            out.append(("stats", name, CaptionStats(rtf=0.25, lag_s=0.5, skipped_s=1.5, cpu_s=0.01,
                                                    extra={"frames": streams[name]})))
        if out:
            try:
                results.send(out)
            except (BrokenPipeError, EOFError, OSError):
                return
