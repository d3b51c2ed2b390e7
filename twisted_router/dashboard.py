# -*- test-case-name: tests.unit.test_dashboard -*-
"""
The live fleet page (C{GET /dashboard}): one self-contained HTML file shipped
in the package, and the headers it is served with.

The page is static: its script polls C{/health} and C{/workers} and builds
everything it shows with C{textContent}, so the router's JSON stays the one
source of truth and nothing here formats worker data. The
Content-Security-Policy allows exactly the page's own inline script and
style (by their SHA-256 hashes, computed here from the file, so editing the
page cannot silently break or loosen it) and requests to the router itself;
nothing is loaded from anywhere else, so the page works offline and an
injected string could not run or load anything even if it reached the DOM.
"""

from __future__ import annotations

import hashlib
import re
from base64 import b64encode
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources

__all__ = ["DashboardPage", "content_security_policy", "load_page", "page_for"]

#: The page's file inside the C{twisted_router} package (package data).
PAGE_FILE = "dashboard.html"

_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.DOTALL)
_STYLE = re.compile(rb"<style>(.*?)</style>", re.DOTALL)
#: A script or style element with attributes (e.g. C{src}) would escape the hash rule.
_WITH_ATTRIBUTES = re.compile(rb"<(script|style)\s", re.IGNORECASE)


@dataclass(frozen=True)
class DashboardPage:
    """The page's bytes and every header it is answered with."""

    body: bytes
    headers: Mapping[bytes, bytes]


def _hashes(blocks: list[bytes]) -> str:
    return " ".join(f"'sha256-{b64encode(hashlib.sha256(b).digest()).decode()}'" for b in blocks)


def content_security_policy(html: bytes) -> str:
    """
    The policy for C{html}: only its own inline script and style blocks (by
    hash) run, fetches go only to the router, and nothing may frame it.

    @raise ValueError: the page has a script or style element with
        attributes, or none at all: the policy could not describe it.
    """
    if _WITH_ATTRIBUTES.search(html):
        raise ValueError("the dashboard page must use plain <script> and <style> elements only")
    scripts, styles = _SCRIPT.findall(html), _STYLE.findall(html)
    if not scripts or not styles:
        raise ValueError("the dashboard page has no inline <script> or <style>")
    return "; ".join(
        [
            "default-src 'none'",
            f"script-src {_hashes(scripts)}",
            f"style-src {_hashes(styles)}",
            "connect-src 'self'",
            "img-src data:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )


def page_for(html: bytes) -> DashboardPage:
    """The page C{html}, with its policy and no caching (it is tiny; a stale copy would mislead)."""
    return DashboardPage(
        body=html,
        headers={
            b"content-type": b"text/html; charset=utf-8",
            b"content-security-policy": content_security_policy(html).encode("ascii"),
            b"cache-control": b"no-store",
            b"x-content-type-options": b"nosniff",
            b"x-frame-options": b"DENY",
            b"referrer-policy": b"no-referrer",
        },
    )


def load_page() -> DashboardPage:
    """The page shipped with the package (read once, when the router is built)."""
    return page_for(resources.files("twisted_router").joinpath(PAGE_FILE).read_bytes())
