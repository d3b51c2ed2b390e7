"""
Headless Chromium for the dashboard's browser tests: Debian's package
(C{/usr/bin/chromium}, which C{.ci/run} installs when missing), driven by
Playwright, which is given that binary and never downloads a browser.
Without Chromium or Playwright a test is skipped, except under C{CI=true},
where it fails.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext

CHROMIUM = Path("/usr/bin/chromium")
#: How Chromium must run here: no sandbox (root), no GPU, and none of its
#: background connections (the machine has no network beyond loopback).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def require_browser() -> None:
    """Skip (fail under C{CI=true}) unless Chromium and Playwright are both here."""
    missing = []
    if not CHROMIUM.exists():
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package (pip install -e '.[test]')")
    if not missing:
        return
    reason = "the dashboard browser test needs " + " and ".join(missing)
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@contextmanager
def chromium(profile: Path, **options: Any) -> Iterator[BrowserContext]:
    """A headless Chromium context with a fresh profile in C{profile}, closed on exit."""
    require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS, **options
        )
        try:
            yield context
        finally:
            context.close()
