"""
A registered worker that never answers is reported as still starting, not as
failing, and less and less often (issue 8 point 8).
"""

from __future__ import annotations

from twisted.logger import LogLevel, capturedLogs, formatEvent

from tests.support.fleet import make_router


def test_a_worker_that_never_answers_is_reported_as_starting_at_a_decreasing_rate() -> None:
    h, _ = make_router(0, health_check_interval=10, health_check_failure_threshold=3)
    url, _ = h.fleet.add("loading")
    h.fleet.down.add("loading:8000")
    h.enroll(url)
    with capturedLogs() as events:
        for _ in range(20):
            h.parts.health.check_all()
            h.pump()
            h.clock.advance(10)
    lines = [formatEvent(e) for e in events if "has not answered yet" in formatEvent(e)]
    assert [line.split("(")[1].split(" probe")[0] for line in lines] == ["1", "2", "4", "8", "16"]
    assert lines[2].startswith(
        "worker http://loading:8000 has not answered yet (4 probe(s) in 30s): still starting, not quarantined; last: "
    )
    assert all(e["log_level"] == LogLevel.warn for e in events if "has not answered yet" in formatEvent(e))
    text = "\n".join(formatEvent(e) for e in events)
    assert "failed health check" not in text and "quarantined after" not in text
    worker = h.pool.get(url)
    assert worker is not None and worker.state == "starting" and not worker.is_dead
    assert worker.consecutive_failures == 20


def test_a_worker_that_answered_once_is_still_reported_with_the_threshold() -> None:
    h, _ = make_router(1, health_check_failure_threshold=3)
    h.fleet.down.add("w0:8000")
    with capturedLogs() as events:
        h.parts.health.check_all()
        h.pump()
    assert any("failed health check (1/3)" in formatEvent(e) for e in events)
