"""
Hung-worker detection (issue 9, defect 4), on task.Clock: a failed probe makes
a worker suspect (no new requests, probed every second until it answers or is
quarantined); a request with no response headers within --timeout has its
worker probed at once, and a failed probe quarantines it; requests left
waiting on a quarantined worker are retried elsewhere, once each.
"""

from __future__ import annotations

import json

from tests.support.deferreds import assert_no_result, success_result_of
from tests.support.fleet import make_router

SMALL = json.dumps({"prompt": "x", "size": "512x512"}).encode()


def test_a_failed_probe_makes_a_worker_suspect_until_a_probe_succeeds() -> None:
    router, (w0, _w1) = make_router(2, health_check_interval=10, health_check_failure_threshold=3)
    worker = router.pool.workers()[0]
    health = router.parts.health
    health.startService()
    try:
        router.pump()
        assert worker.routable
        w0.health_status = 503
        router.clock.advance(10)  # the next round fails
        router.pump()
        assert worker.is_suspect and not worker.routable and not worker.is_dead
        assert worker.state == "suspect" and worker.payload()["is_suspect"] is True
        assert [w.url for w in router.pool.routable()] == [router.pool.workers()[1].url]
        # Probed every second now, not every 10 s.
        probes = sum(1 for s in w0.seen if s.request.path == b"/health")
        router.clock.advance(1)
        router.pump()
        assert sum(1 for s in w0.seen if s.request.path == b"/health") == probes + 1
        w0.health_status = 200
        router.clock.advance(1)
        router.pump()
        assert worker.routable and not worker.is_suspect and worker.consecutive_failures == 0
    finally:
        health.stopService()


def test_a_suspect_worker_is_quarantined_at_the_failure_threshold() -> None:
    router, (w0, _) = make_router(2, health_check_interval=10, health_check_failure_threshold=3)
    worker = router.pool.workers()[0]
    health = router.parts.health
    health.startService()
    try:
        w0.health_status = 503
        router.clock.advance(10)
        router.pump()
        router.clock.advance(1)
        router.pump()
        assert not worker.is_dead and worker.consecutive_failures == 2
        router.clock.advance(1)
        router.pump()
        assert worker.is_dead and "3 consecutive health checks" in (worker.dead_reason or "")
        assert not worker.is_suspect
    finally:
        health.stopService()


def test_requests_wait_for_a_suspect_worker_rather_than_fail() -> None:
    router, (w0,) = make_router(1, health_check_interval=10, timeout=30)
    worker = router.pool.workers()[0]
    health = router.parts.health
    health.startService()
    try:
        w0.health_status = 503
        router.clock.advance(10)
        router.pump()
        assert worker.is_suspect
        d = router.client.post("http://router/v1/images/generations", data=SMALL)
        router.pump()
        assert_no_result(d)  # waiting: the suspect worker may be back in a second
        w0.health_status = 200
        router.clock.advance(1)
        router.pump()
        response = success_result_of(d)
        assert response.code == 200
    finally:
        health.stopService()


def test_no_headers_in_time_probes_the_worker_and_a_failed_probe_quarantines_and_retries() -> None:
    router, (w0, w1) = make_router(
        2, routing_algorithm="round-robin", timeout=5, health_check_timeout=1, health_check_failure_threshold=3
    )
    w0.hold(b"POST", b"/v1/images/generations")
    w0.hold(b"GET", b"/health")  # hung: no answer to anything
    hung = router.pool.workers()[0]
    answers = []
    for _ in range(2):  # round-robin: one to the hung w0, one to w1
        answers.append(router.client.post("http://router/v1/images/generations", data=SMALL))
        router.pump()
    router.clock.advance(2)
    answers.append(router.client.post("http://router/v1/images/generations", data=SMALL))  # to w0 again
    router.pump()
    assert len(w0.held) == 2
    assert_no_result(answers[0])
    assert_no_result(answers[2])

    router.clock.advance(3)  # the first request has had no headers for --timeout (5 s)
    router.pump()
    assert not hung.is_dead  # probed at once; the probe has not timed out yet
    assert_no_result(answers[0])
    router.clock.advance(1)  # the probe times out: quarantined at once, not after 3 failures
    router.pump()
    assert hung.is_dead
    assert "no response headers within the request timeout" in (hung.dead_reason or "")
    # Both requests it held were retried on w1; the second one without waiting its own timeout.
    codes = [success_result_of(d).code for d in answers]
    assert codes == [200, 200, 200]
    served_by_w1 = [s for s in w1.seen if s.request.path == b"/v1/images/generations"]
    assert len(served_by_w1) == 3
    assert hung.active_requests == 0 and router.pool.workers()[1].active_requests == 0


def test_a_slow_worker_whose_probe_succeeds_is_kept_and_the_request_gets_504() -> None:
    router, (w0, _w1) = make_router(2, routing_algorithm="round-robin", timeout=5, health_check_timeout=1)
    w0.hold(b"POST", b"/v1/images/generations")  # slow generation, healthy /health
    slow = router.pool.workers()[0]
    d = router.client.post("http://router/v1/images/generations", data=SMALL)
    router.pump()
    router.clock.advance(5)
    router.pump()
    response = success_result_of(d)
    assert response.code == 504
    assert not slow.is_dead and slow.routable
    assert slow.active_requests == 0


def test_a_request_is_retried_after_a_hang_only_once() -> None:
    router, (w0, w1) = make_router(2, routing_algorithm="round-robin", timeout=5, health_check_timeout=1)
    for worker in (w0, w1):  # both hang
        worker.hold(b"POST", b"/v1/images/generations")
        worker.hold(b"GET", b"/health")
    d = router.client.post("http://router/v1/images/generations", data=SMALL)
    router.pump()
    for _ in range(8):  # w0: 5 s + the 1 s probe, quarantined; w1: 5 s, then no second retry
        router.clock.advance(2)
        router.pump()
    response = success_result_of(d)
    assert response.code == 504  # tried on two workers, then given up, not retried forever
    body = json.loads(success_result_of(router.client.content(response)))
    assert body["error"].startswith("Worker request failed")
    assert all(w.active_requests == 0 for w in router.pool.workers())


def test_health_checks_quarantining_a_hung_worker_retry_all_its_unanswered_requests() -> None:
    router, (w0, w1) = make_router(
        2,
        routing_algorithm="round-robin",
        timeout=120,
        health_check_interval=10,
        health_check_timeout=1,
        health_check_failure_threshold=2,
    )
    w0.hold(b"POST", b"/v1/images/generations")
    hung = router.pool.workers()[0]
    health = router.parts.health
    health.startService()
    try:
        answers = []
        for _ in range(6):  # round-robin: three of them to w0, which never answers
            answers.append(router.client.post("http://router/v1/images/generations", data=SMALL))
            router.pump()
        assert len(w0.held) == 3
        w0.hold(b"GET", b"/health")  # now it hangs entirely
        for _ in range(14):  # the round at 10 s times out at 11 (suspect); the suspect probe at 12 s, at 13
            router.clock.advance(1)
            router.pump()
        assert hung.is_dead and "2 consecutive health checks" in (hung.dead_reason or "")
        # All three were retried on w1 at once, long before their own 120 s timeout.
        assert [success_result_of(d).code for d in answers] == [200] * 6
        served = [s for s in w1.seen if s.request.path == b"/v1/images/generations"]
        assert len(served) == 6
        assert hung.active_requests == 0
    finally:
        health.stopService()
