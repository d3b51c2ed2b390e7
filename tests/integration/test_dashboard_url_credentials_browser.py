"""
The fleet page opened with the key in its URL (C{http://operator:KEY@host/dashboard}),
in headless Chromium: its fetches must not be built relative to that URL (fetch
refuses a URL carrying credentials, and the page would say "Router unreachable"
with the router up), and they must still be let in with the key.

Chromium and Playwright as in L{tests.support.browser}: skipped without them,
failed under C{CI=true}.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.conftest import Processes
from tests.support.browser import chromium, require_browser

pytestmark = pytest.mark.integration

API_KEY = "dashboard-url-key-0123456789"


def test_the_page_opened_with_the_key_in_its_url_is_live(processes: Processes, tmp_path: Path) -> None:
    require_browser()  # before any process starts
    (worker,) = processes.workers([])
    router = processes.router([worker], "--api-key", API_KEY)
    with chromium(tmp_path / "chromium-profile") as context:
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        with_key = router.url.replace("http://", f"http://operator:{API_KEY}@", 1)
        answer = page.goto(f"{with_key}/dashboard")
        assert answer is not None and answer.status == 200
        page.locator('body[data-conn="live"]').wait_for(timeout=15_000)
        assert not page.locator("#alert").is_visible()
        assert page.locator(f'article[data-worker="{worker.url.removeprefix("http://")}"]').count() == 1
        assert not [e for e in errors if "credentials" in e], errors
