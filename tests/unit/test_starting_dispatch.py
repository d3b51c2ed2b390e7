"""
A generation whose only candidates never answered (issue 8 point 4): tried on
one of them as the earlier router did, 502 with the cause when the connection
fails, the worker not quarantined; but once the fleet was refitted such a
worker needs catch-up first, so the answer stays 503 with the reason.
"""

from __future__ import annotations

from tests.support.fleet import RouterHarness, make_router


def starting(h: RouterHarness, name: str, *, up: bool) -> str:
    """Register a worker without letting it answer first: it stays C{starting}."""
    url, _ = h.fleet.add(name)
    if not up:
        h.fleet.down.add(url.split("//")[1])
    h.enroll(url)
    worker = h.pool.get(url)
    assert worker is not None and worker.state == "starting"
    return url


def generation_count(h: RouterHarness, name: str) -> int:
    worker = next(w for w in h.fleet.workers.values() if w.name == name)
    return sum(1 for s in worker.seen if s.request.path == b"/v1/images/generations")


def test_a_refused_connection_is_502_naming_the_worker_and_the_error() -> None:
    h, _ = make_router(0)
    url = starting(h, "loading", up=False)
    code, body = h.json("POST", "/v1/images/generations", json={"prompt": "x"})
    assert code == 502
    assert body["error"] == "Worker request failed: loading:8000: connection refused"
    worker = h.pool.get(url)
    assert worker is not None
    assert (worker.state, worker.is_dead, worker.active_requests, worker.failed_requests) == ("starting", False, 0, 1)


def test_a_starting_worker_that_answers_serves_the_generation_on_start_up_weights() -> None:
    h, _ = make_router(0)
    starting(h, "early", up=True)
    code, _, response = h.call("POST", "/v1/images/generations", json={"prompt": "x"})
    assert code == 200
    assert response.headers.getRawHeaders(b"x-worker-id") == [b"early"]
    assert response.headers.getRawHeaders(b"x-weight-version") == [b"0"]


def test_only_one_of_several_starting_workers_is_tried() -> None:
    h, _ = make_router(0)
    urls = [starting(h, f"s{i}", up=False) for i in range(3)]
    code, body = h.json("POST", "/v1/images/generations", json={"prompt": "x"})
    assert code == 502 and body["error"].startswith("Worker request failed: s")
    failed = [h.pool.get(u).failed_requests for u in urls]  # type: ignore[union-attr]
    assert sorted(failed) == [0, 0, 1]
    assert all(not h.pool.get(u).is_dead for u in urls)  # type: ignore[union-attr]


def test_after_a_refit_a_worker_that_never_answered_is_not_tried_503_with_the_reason() -> None:
    h, _ = make_router(1)
    assert h.json("POST", "/update_weights_from_disk", json={"model_path": "/ckpt/1"})[0] == 200
    h.pool.workers()[0].is_dead = True  # the refitted worker is gone
    starting(h, "late", up=True)
    code, body = h.json("POST", "/v1/images/generations", json={"prompt": "x"})
    assert code == 503
    assert body["error"] == (
        "No healthy workers available in the pool: 1 worker(s) still starting (never answered); "
        "the fleet is at weight version 1, so a worker must answer and be caught up before it gets traffic"
    )
    assert generation_count(h, "late") == 0


def test_a_routable_worker_is_always_preferred_to_a_starting_one() -> None:
    h, _ = make_router(1)
    starting(h, "early", up=True)
    for _ in range(4):
        code, _, response = h.call("POST", "/v1/images/generations", json={"prompt": "x"})
        assert code == 200 and response.headers.getRawHeaders(b"x-worker-id") == [b"w0"]
    assert generation_count(h, "early") == 0


def test_video_with_only_starting_workers_is_400_their_capability_is_unknown() -> None:
    h, _ = make_router(0)
    starting(h, "loading", up=True)
    code, body = h.json("POST", "/v1/videos", json={"prompt": "waves"})
    assert (code, body) == (400, {"error": "No video-capable workers available in current worker pool."})


def test_a_starting_worker_that_begins_answering_still_joins_through_the_health_check() -> None:
    h, _ = make_router(0)
    url = starting(h, "loading", up=False)
    assert h.json("POST", "/v1/images/generations", json={"prompt": "x"})[0] == 502
    h.fleet.down.clear()
    h.parts.health.check_all()
    h.pump()
    worker = h.pool.get(url)
    assert worker is not None and worker.routable and worker.task_type == "T2I"
