"""The viewer page's caption overlay in real Chromium (issue 13).

The real application (``create_app`` on a fresh PostgreSQL database) runs
in a thread with the CaptionService fed by the stand-in caption worker
(tests/unit/caption_fake_worker.py: audio payloads script partial and final
captions), so the page gets real ``/ws/events`` caption messages with its
own signed read link. Checked on a phone-sized page: a partial shows, its
commit turns it white without moving it, a long caption wraps to ≤ 2 lines
of ≤ 42 characters, and the CC toggle hides and shows the overlay.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from caption_fake_worker import FakeCaptionWorker  # noqa: E402
from helpers import LoopThread, Unit, wait_until  # noqa: E402

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
PHONE = {"viewport": {"width": 390, "height": 844}, "device_scale_factor": 2, "is_mobile": True, "has_touch": True}


class Backend(LoopThread):
    """The app + a hub the caption tap reads, on a loop in a thread."""

    def __init__(self, db_url: str, data_dir: Path) -> None:
        super().__init__()
        self.db_url = db_url
        self.data_dir = data_dir
        self.link = ""

    async def _start(self) -> None:
        from aiohttp import web

        from media.stream import SourceInfo, StreamHub
        from server import repo
        from server.app import create_app
        from server.auth import TokenService
        from server.caption_service import CaptionService, CaptionStore
        from server.config import CaptionSettings, load_settings
        from server.db import Database
        from server.directory import Directory
        from server.keys import QC_EVENTS

        settings = load_settings(environ={}, overrides={"database.url": self.db_url, "data_dir": str(self.data_dir)})
        self.db = Database(self.db_url, self.data_dir, supervise=False, statement_timeout=10.0, acquire_timeout=5.0)
        await self.db.start()
        tokens = TokenService("captions-e2e-secret-" * 3)
        async with self.db.pool.acquire() as conn:
            uid = (await repo.create_user(conn, "d1", "x", "director"))["id"]
            show = (await repo.create_production(conn, "show", "", uid))["id"]
            sid = (await repo.create_stream(conn, "camA", show, 16, "Host camera", {}))["id"]
        self.directory = Directory(self.db)
        await self.directory.start()
        self.link, _ = tokens.issue_link("camA", "read", show, 3600, stream_id=sid)
        app = create_app(settings, self.db, tokens, None, None, self.directory)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]
        self.events = app[QC_EVENTS]
        cs = CaptionSettings(enabled=True)
        self.hub = StreamHub()
        self.captions = CaptionService(cs, self.hub, self.events, CaptionStore(self.db, self.directory, queue_max=100),
                                       options_for=lambda name: {"language": "en"},
                                       make_worker=lambda i: FakeCaptionWorker(cs.queue_frames, i),
                                       poll_s=0.05)
        await self.captions.start()
        stream = self.hub.get_or_create("camA")
        stream.attach_publisher(SourceInfo("test"))
        self.pub = stream.publishers[0]
        self._audio(0.0, b"first")

    def _audio(self, t: float, data: bytes) -> None:
        self.pub.publish(Unit("opus", round(t * 90000), round(t * 90000), True, data))

    def say(self, t: float, payload: bytes) -> None:
        self.call(self._audio, t, payload)

    def clients(self) -> int:
        return self.call(lambda: len(self.events.clients))

    def tapped(self) -> bool:
        return self.call(lambda: "camA" in self.captions.host.taps
                         and self.captions.host.slots[0].worker is not None)

    async def _stop(self) -> None:
        await self.captions.stop()
        await self.runner.cleanup()
        await self.directory.stop()
        await self.db.close()


@pytest.fixture(scope="module")
def backend(e2e_db_url: str, tmp_path_factory) -> Iterator[Backend]:
    b = Backend(e2e_db_url, tmp_path_factory.mktemp("captions-e2e")).start()
    try:
        yield b
    finally:
        b.stop()


def overlay(page: Any) -> dict[str, Any]:
    return page.evaluate("""() => {
      const el = document.querySelector('.cc');
      if (!el) return null;
      const rect = el.getBoundingClientRect();
      const colour = (sel) => { const s = el.querySelector(sel); return s ? getComputedStyle(s).color : null; };
      return { hidden: el.hidden, final: el.dataset.final, partial: el.dataset.partial,
               lines: [...el.querySelectorAll('.cc-line')].map((l) => l.textContent),
               clipped: [...el.querySelectorAll('.cc-line')].some((l) => l.scrollWidth > l.clientWidth + 1),
               bar_top: document.getElementById('bar').getBoundingClientRect().top,
               top: rect.top, bottom: rect.bottom, width: rect.width, final_colour: colour('.cc-final'),
               partial_colour: colour('.cc-partial'), button: document.getElementById('btn-cc').hidden,
               pressed: document.getElementById('btn-cc').getAttribute('aria-pressed') };
    }""")


def test_viewer_overlay_shows_partial_then_committed_captions(browser, backend) -> None:
    context = browser.new_context(**PHONE)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(f"{backend.url}/watch/camA?token={backend.link}")
        wait_until(lambda: backend.clients() >= 1, timeout=15)  # the page's /ws/events socket, with its link
        wait_until(backend.tapped, timeout=15)
        time.sleep(0.3)  # the worker has its attach before the first audio
        backend.say(10.0, b"hyp:good evening")
        page.wait_for_function("() => document.querySelector('.cc') && !document.querySelector('.cc').hidden"
                               " && document.querySelector('.cc').dataset.partial === 'good evening'",
                               timeout=15000)
        partial = overlay(page)
        assert partial["final"] == "" and partial["lines"] == ["good evening"]
        assert partial["button"] is False and partial["pressed"] == "true"

        backend.say(10.4, b"say:good evening")
        page.wait_for_function("() => document.querySelector('.cc').dataset.final === 'good evening'", timeout=15000)
        committed = overlay(page)
        # Committed: white, where the partial was (no jump), partial styled apart.
        assert committed["lines"] == ["good evening"] and committed["partial"] == ""
        assert committed["final_colour"] == "rgb(255, 255, 255)"
        assert partial["partial_colour"] != committed["final_colour"]
        assert (committed["top"], committed["bottom"]) == (partial["top"], partial["bottom"])

        backend.say(11.5, b"say:and welcome to the show tonight we have a long sentence to split over two lines")
        page.wait_for_function("() => document.querySelector('.cc').dataset.final.endsWith('two lines')",
                               timeout=15000)
        long = overlay(page)
        assert 1 <= len(long["lines"]) <= 2 and all(len(line) <= 42 for line in long["lines"]), long["lines"]
        assert long["lines"][-1].endswith("two lines")
        assert long["width"] <= 390 and not long["clipped"]
        # Above the control bar, which shows while the viewer touches the page.
        assert long["bottom"] <= long["bar_top"]
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "captions-watch-phone.png"))

        page.click("#btn-cc")
        page.wait_for_function("() => document.querySelector('.cc').hidden", timeout=5000)
        assert overlay(page)["pressed"] == "false"
        page.click("#btn-cc")
        page.wait_for_function("() => !document.querySelector('.cc').hidden", timeout=5000)
        assert errors == []
    finally:
        context.close()
