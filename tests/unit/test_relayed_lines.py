"""
Relayed worker lines carry one timestamp, and the simulator's quiet site does
not announce its factory (issue 8 point 11).
"""

from __future__ import annotations

import pytest
from twisted.logger import capturedLogs, formatEvent
from twisted.web.resource import Resource

from twisted_router.launcher._lines import strip_timestamp
from twisted_router.simulator.cli import QuietSite


@pytest.mark.parametrize(
    ("line", "relayed"),
    [
        # the simulator (a Twisted text log)
        (
            "2026-12-01T00:06:06+0000 [twisted_router.simulator#info] listening on http://127.0.0.1:10090",
            "[twisted_router.simulator#info] listening on http://127.0.0.1:10090",
        ),
        ("2026-12-01T00:06:06Z [-] Main loop terminated.", "[-] Main loop terminated."),
        # sglang serve: [asctime rank] message
        ("[2026-12-01 00:06:06 TP0] Load weight end.", "[TP0] Load weight end."),
        ("[2026-12-01 00:06:06] Uvicorn running on http://0.0.0.0:30000", "Uvicorn running on http://0.0.0.0:30000"),
        # Python logging's default asctime, with milliseconds
        ("2026-12-01 00:06:06,123 INFO loading", "INFO loading"),
        # no stamp: untouched
        ("INFO:     127.0.0.1:5555 - \"GET /health HTTP/1.1\" 200 OK", "INFO:     127.0.0.1:5555 - \"GET /health HTTP/1.1\" 200 OK"),
        ("usage: sglang serve [-h] ...", "usage: sglang serve [-h] ..."),
        ("[TP0] no stamp here", "[TP0] no stamp here"),
        # a date later in the line is the worker's business
        ("checkpoint saved 2026-12-01 00:06:06", "checkpoint saved 2026-12-01 00:06:06"),
    ],
)
def test_a_workers_own_leading_timestamp_is_dropped(line: str, relayed: str) -> None:
    assert strip_timestamp(line) == relayed


def test_the_simulators_site_does_not_log_starting_factory() -> None:
    site = QuietSite(Resource())
    with capturedLogs() as events:
        site.doStart()
        site.doStop()
    assert not [formatEvent(e) for e in events if "factory" in formatEvent(e).lower()]
