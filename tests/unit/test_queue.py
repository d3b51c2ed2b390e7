"""
The router-side queue (C{--max-inflight-per-worker}): the cap, late binding,
order, bounds, timeout, hang-ups, routability, retries. On a fake fleet and
C{task.Clock}.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.web._newclient import ResponseNeverReceived
from twisted.web.server import Request

from tests.support.deferreds import failure_result_of, success_result_of
from tests.support.fleet import FakeWorker, RouterHarness
from tests.support.fleet import make_router as make
from twisted_router.config import ConfigError, RouterConfig, config_from_args
from twisted_router.dispatch import queue_key
from twisted_router.pool import Activity

GEN = b"/v1/images/generations"


def answer(request: Request, payload: dict[str, Any] | None = None) -> None:
    request.setHeader(b"content-type", b"application/json")
    request.write(json.dumps(payload or {"id": "x", "data": []}).encode())
    request.finish()


def post(h: RouterHarness, steps: int = 10, path: bytes = GEN, **extra: Any) -> Deferred[Any]:
    d: Deferred[Any] = h.client.post(
        "http://router" + path.decode(), json={"prompt": "p", "num_inference_steps": steps, **extra}
    )
    h.pump()
    return d


def steps_of(request: Request) -> int:
    request.content.seek(0)
    value: int = json.loads(request.content.read())["num_inference_steps"]
    return value


def queued(h: RouterHarness) -> int:
    value: int = h.parts.dispatcher.queue_status()["queued_requests"]
    return value


def holding(n: int, cap: int, **config: Any) -> tuple[RouterHarness, list[FakeWorker]]:
    h, workers = make(n, max_inflight_per_worker=cap, **config)
    for w in workers:
        w.hold(b"POST", GEN)
    return h, workers


# -- order ----------------------------------------------------------------------


def test_queue_key_orders_batches_then_longest_first_then_arrival() -> None:
    keys = [queue_key(2, 5.0, 1), queue_key(1, 1.0, 2), queue_key(1, 9.0, 3), queue_key(1, 9.0, 4)]
    assert sorted(keys) == [queue_key(1, 9.0, 3), queue_key(1, 9.0, 4), queue_key(1, 1.0, 2), queue_key(2, 5.0, 1)]


def test_longest_job_first_within_a_batch() -> None:
    h, (w0,) = holding(1, 1)
    post(h, steps=1)  # occupies the only slot
    for steps in (5, 50, 20, 5):
        post(h, steps=steps)
    assert queued(h) == 4
    order = []
    while w0.held:
        request = w0.held.pop(0)
        order.append(steps_of(request))
        answer(request)
        h.pump()
    assert order == [1, 50, 20, 5, 5]
    assert queued(h) == 0


def test_batches_are_first_come_first_served() -> None:
    h, (w0,) = holding(1, 1)
    post(h, steps=1)
    post(h, steps=5)
    h.clock.advance(2.0)  # a later batch
    post(h, steps=50)
    order = []
    while w0.held:
        request = w0.held.pop(0)
        order.append(steps_of(request))
        answer(request)
        h.pump()
    assert order == [1, 5, 50]


# -- cap and late binding -------------------------------------------------------------


def test_cap_holds_and_a_freed_slot_takes_the_next_request() -> None:
    h, (w0, w1) = holding(2, 2)
    ds = [post(h) for _ in range(7)]
    assert [len(w.held) for w in (w0, w1)] == [2, 2]
    assert [w.active_requests for w in h.pool.workers()] == [2, 2]
    assert queued(h) == 3
    code, health = h.json("GET", "/health")
    assert health["queued_requests"] == 3
    _, listing = h.json("GET", "/workers")
    assert listing["queue"]["queued_requests"] == 3
    assert listing["queue"]["max_inflight_per_worker"] == 2
    answer(w1.held.pop(0))
    h.pump()
    assert [len(w.held) for w in (w0, w1)] == [2, 2]  # w1's free slot went to the head of the queue
    assert queued(h) == 2
    for _ in range(20):
        for w in (w0, w1):
            if w.held:
                answer(w.held.pop(0))
        h.pump()
    assert all(d.called for d in ds)
    assert [w.active_requests for w in h.pool.workers()] == [0, 0]
    assert [w.predicted_work for w in h.pool.workers()] == [0.0, 0.0]
    assert queued(h) == 0


def test_late_binding_sends_to_whichever_worker_frees_first() -> None:
    h, (w0, w1) = holding(2, 1)
    post(h)
    post(h)
    post(h, steps=7)  # queued: bound to no worker yet
    answer(w1.held.pop(0))
    h.pump()
    assert [steps_of(r) for r in w1.held] == [7]


def test_oldest_wait_is_reported() -> None:
    h, (w0,) = holding(1, 1)
    post(h)
    post(h)
    h.clock.advance(3.0)
    _, health = h.json("GET", "/health")
    assert (health["queued_requests"], health["oldest_queued_wait"]) == (1, 3.0)


def test_no_cap_means_no_queue() -> None:
    h, (w0,) = holding(1, 0)
    for _ in range(5):
        post(h)
    assert len(w0.held) == 5
    assert queued(h) == 0


def test_other_requests_bypass_the_queue() -> None:
    h, (w0,) = holding(1, 1)
    post(h)
    post(h)
    code, _, _ = h.call("GET", "/get_server_info")  # catch-all: not a generation
    assert code == 200
    assert queued(h) == 1


# -- bounds, timeout, hang-up ----------------------------------------------------------


def test_overflow_is_429_with_retry_after() -> None:
    h, (w0,) = holding(1, 1, max_queue=2)
    post(h)
    post(h)
    post(h)
    assert queued(h) == 2
    code, body, response = h.call("POST", GEN.decode(), json={"prompt": "p", "num_inference_steps": 10})
    assert code == 429
    assert "queue is full" in json.loads(body)["error"]
    retry_after = int(response.headers.getRawHeaders(b"retry-after")[0])
    assert retry_after >= 1
    assert queued(h) == 2
    assert len(w0.seen) - sum(1 for s in w0.seen if s.request.path != GEN) == 1


def test_queue_timeout_is_504_and_frees_the_place() -> None:
    h, (w0,) = holding(1, 1, queue_timeout=5.0)
    post(h)
    d = post(h)
    h.clock.advance(4.9)
    h.pump()
    assert queued(h) == 1
    h.clock.advance(0.2)
    h.pump()
    response = success_result_of(d)
    assert response.code == 504
    assert "--queue-timeout" in json.loads(success_result_of(h.client.content(response)))["error"]
    assert queued(h) == 0
    answer(w0.held.pop(0))
    h.pump()
    assert w0.held == []  # nothing left to send


def test_client_that_hangs_up_leaves_the_queue() -> None:
    h, (w0,) = holding(1, 1)
    post(h)
    d = post(h)
    assert queued(h) == 1
    d.cancel()
    failure_result_of(d, CancelledError, ResponseNeverReceived)
    h.pump()
    assert queued(h) == 0
    answer(w0.held.pop(0))
    h.pump()
    assert w0.held == []
    assert h.pool.workers()[0].active_requests == 0


# -- routability ----------------------------------------------------------------------


@pytest.mark.parametrize("state", ["sleeping", "dead", "suspect", "starting", "syncing", "updating"])
def test_queued_request_never_reaches_a_non_routable_worker(state: str) -> None:
    h, (w0, w1) = holding(2, 1)
    post(h)
    post(h)
    post(h, steps=7)
    worker0, worker1 = h.pool.workers()
    if state == "sleeping":
        h.pool.set_sleeping(worker1, True)
    elif state == "dead":
        h.pool.quarantine(worker1, "test")
    elif state == "suspect":
        h.pool.record_probe_failure(worker1, "probe timed out", threshold=3)
    else:
        h.pool.begin(worker1, Activity(state))
    answer(w1.held.pop(0))  # w1's slot frees, but it may not take requests
    h.pump()
    assert w1.held == []
    assert queued(h) == 1
    answer(w0.held.pop(0))
    h.pump()
    assert [steps_of(r) for r in w0.held] == [7]
    assert queued(h) == 0


def test_queued_request_never_reaches_an_updating_worker() -> None:
    h, (w0,) = holding(1, 1)
    w0.hold(b"POST", b"/update_weights_from_disk")
    post(h)
    post(h, steps=7)
    refit = h.client.post("http://router/update_weights_from_disk", json={"model_path": "/ckpt/1"})
    h.pump()
    answer(w0.held.pop(0))  # the generation ends while the refit runs
    h.pump()
    assert [r.path for r in w0.held] == [b"/update_weights_from_disk"]
    assert queued(h) == 1
    answer(w0.held.pop(0), {"success": True, "message": "Updated"})
    h.pump()
    assert success_result_of(refit).code == 200
    assert [steps_of(r) for r in w0.held] == [7]


def test_queued_requests_fail_when_no_worker_is_left() -> None:
    h, (w0,) = holding(1, 1)
    post(h)
    d = post(h)
    h.pool.quarantine(h.pool.workers()[0], "gone")
    h.pump()
    response = success_result_of(d)
    assert response.code == 503
    assert queued(h) == 0


# -- retries and failover --------------------------------------------------------------


def test_cap_holds_under_failover() -> None:
    """A request failing over from a dead worker queues for the busy one instead of exceeding its cap."""
    h, (w0, w1) = holding(2, 1)
    post(h)  # w0
    h.fleet.down.add("w1:8001")
    d = post(h, steps=7)  # w1 has room, refuses: quarantined, retried: w0 is full
    assert h.pool.workers()[1].is_dead
    assert len(w0.held) == 1
    assert h.pool.workers()[0].active_requests == 1
    assert queued(h) == 1
    answer(w0.held.pop(0))
    h.pump()
    assert [steps_of(r) for r in w0.held] == [7]
    answer(w0.held.pop(0))
    h.pump()
    assert success_result_of(d).code == 200
    assert h.pool.workers()[0].active_requests == 0


def test_cap_holds_when_a_worker_hangs_and_its_requests_are_retried() -> None:
    h, (w0, w1) = holding(2, 1, timeout=10.0)
    post(h)  # w0
    post(h)  # w1
    post(h, steps=7)  # queued
    worker0 = h.pool.workers()[0]
    h.pool.quarantine(worker0, "hung")  # as the health checker does, then it hands its requests on
    h.parts.dispatcher.abandon_unanswered(worker0, "hung")
    h.pump()
    # w0's request is retried elsewhere: it must wait for w1's slot like the queued one
    assert h.pool.workers()[1].active_requests == 1
    assert len(w1.held) == 1
    assert queued(h) == 2
    for _ in range(3):
        answer(w1.held.pop(0))
        h.pump()
    assert w1.held == []
    assert queued(h) == 0
    assert h.pool.workers()[1].active_requests == 0


# -- video jobs ---------------------------------------------------------------------------


def test_running_video_jobs_count_against_the_cap() -> None:
    h, (w0,) = make(1, task_types=("T2V",), max_inflight_per_worker=1)
    w0.on(b"GET", b"/v1/videos/w0-3", lambda r: json.dumps({"id": "w0-3", "status": "in_progress"}).encode())
    code, job = h.json("POST", "/v1/videos", json={"prompt": "p", "num_frames": 8})
    assert code == 200
    second = post(h, path=b"/v1/videos", num_frames=8)
    assert queued(h) == 1
    h.json("GET", f"/v1/videos/{job['id']}")
    assert queued(h) == 1  # still running
    del w0.handlers[(b"GET", b"/v1/videos/w0-3")]
    h.json("GET", f"/v1/videos/{job['id']}")  # completed: its slot frees up
    h.pump()
    assert queued(h) == 0
    assert success_result_of(second).code == 200


# -- options ------------------------------------------------------------------------------


def test_options() -> None:
    config = config_from_args(["--max-inflight-per-worker", "2", "--max-queue", "10", "--queue-timeout", "30"])
    assert (config.max_inflight_per_worker, config.max_queue, config.queue_timeout) == (2, 10, 30.0)
    defaults = RouterConfig()
    assert (defaults.max_inflight_per_worker, defaults.max_queue, defaults.queue_timeout) == (0, 1024, 600.0)


@pytest.mark.parametrize(
    "kwargs",
    [{"max_inflight_per_worker": -1}, {"max_queue": 0}, {"queue_timeout": 0.0}, {"queue_timeout": float("nan")}],
)
def test_bad_options(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        RouterConfig(**kwargs)


# -- least-work: waiting for a faster worker ------------------------------------------------


def test_least_work_waits_for_a_full_fast_worker_rather_than_an_idle_slow_one() -> None:
    """
    Fast worker (0.1 s/unit) busy with 10 units, slow one (0.4 s/unit) idle,
    three 10-unit requests: in queue order, each goes where it would finish
    first given those ahead of it: fast at 2 s, fast at 3 s, then (4 s on
    either) the idle slow worker; the first two wait for the fast one.
    """
    h, (fast, slow) = holding(2, 1, routing_algorithm="least-work")
    worker_fast, worker_slow = h.pool.workers()
    worker_fast.speed.seconds_per_unit = 0.1
    worker_slow.speed.seconds_per_unit = 0.4
    worker_fast.speed.samples = worker_slow.speed.samples = 1
    h.pool.quarantine(worker_slow, "kept out for the first request")
    post(h, steps=10)
    h.pool.readmit(worker_slow)  # back, idle
    post(h, steps=10)
    assert (len(fast.held), len(slow.held), queued(h)) == (1, 0, 1)  # waits for the fast worker
    post(h, steps=10)
    post(h, steps=10)
    assert (len(fast.held), len(slow.held), queued(h)) == (1, 1, 2)
    answer(fast.held.pop(0))
    h.pump()
    assert (len(fast.held), len(slow.held), queued(h)) == (1, 1, 1)


def test_other_policies_take_any_worker_with_room() -> None:
    h, (fast, slow) = holding(2, 1, routing_algorithm="least-request")
    worker_fast, worker_slow = h.pool.workers()
    worker_fast.speed.seconds_per_unit = 0.1
    worker_slow.speed.seconds_per_unit = 0.4
    post(h, steps=10)
    post(h, steps=10)
    assert (len(fast.held), len(slow.held), queued(h)) == (1, 1, 0)


def test_a_created_video_job_keeps_its_slot_without_a_gap() -> None:
    """The creation's lease is handed to the running job without a moment in which a queued request could take it."""
    h, (w0,) = make(1, task_types=("T2V",), max_inflight_per_worker=1)
    w0.hold(b"POST", b"/v1/videos")
    first = post(h, path=b"/v1/videos", num_frames=8)
    post(h, path=b"/v1/videos", num_frames=8)
    assert (len(w0.held), queued(h)) == (1, 1)
    answer(w0.held.pop(0), {"id": "job-1", "object": "video", "status": "queued"})
    h.pump()
    assert success_result_of(first).code == 200
    worker = h.pool.workers()[0]
    assert (worker.running_jobs, worker.active_requests, len(w0.held), queued(h)) == (1, 0, 0, 1)
