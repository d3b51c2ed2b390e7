"""
The least-work policy wired into the router: predicted work counted while in
flight and while a video job runs, speed learned from completions, and both
shown in C{/workers}. All on a fake fleet and C{task.Clock}.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.web.server import Request

from tests.support.fleet import make_router as make
from twisted_router.cost import DEFAULT_SECONDS_PER_UNIT
from twisted_router.health import _parse_model_card
from twisted_router.jobs import JOB_POLL_MAX, JOB_POLL_MIN, JOB_WORK_GRACE
from twisted_router.pool import WorkerPool


def answer(request: Request, payload: dict[str, Any]) -> None:
    request.setHeader(b"content-type", b"application/json")
    request.write(json.dumps(payload).encode())
    request.finish()


IMAGE_10 = {"prompt": "a", "num_inference_steps": 10, "size": "1024x1024"}


def test_work_counted_in_flight_and_speed_learned_on_completion() -> None:
    h, (w0,) = make(1, routing_algorithm="least-work")
    w0.hold(b"POST", b"/v1/images/generations")
    d = h.client.post("http://router/v1/images/generations", json=IMAGE_10)
    h.pump()
    worker = h.pool.workers()[0]
    assert worker.predicted_work == 10.0
    h.clock.advance(2.0)
    answer(w0.held.pop(), {"id": "x", "data": []})
    h.pump()
    assert d.called
    assert worker.predicted_work == 0.0
    assert worker.speed.samples == 1
    assert worker.speed.seconds_per_unit == 0.2
    code, listing = h.json("GET", "/workers")
    entry = listing["workers"][0]
    assert (entry["predicted_work"], entry["speed"], entry["speed_samples"]) == (0.0, 5.0, 1)


def test_failed_generation_releases_work_and_teaches_nothing() -> None:
    h, (w0, w1) = make(2, routing_algorithm="least-work")
    h.fleet.down.add("w0:8000")
    code, _, _ = h.call("POST", "/v1/images/generations", json=IMAGE_10)
    assert code == 200
    for worker in h.pool.workers():
        assert worker.predicted_work == 0.0
        assert worker.active_requests == 0
    assert h.pool.workers()[0].speed.samples == 0


def test_error_answers_do_not_teach_speed() -> None:
    h, (w0,) = make(1, routing_algorithm="least-work")
    w0.hold(b"POST", b"/v1/images/generations")
    h.client.post("http://router/v1/images/generations", json=IMAGE_10)
    h.pump()
    held = w0.held.pop()
    held.setResponseCode(400)
    h.clock.advance(1.0)
    answer(held, {"detail": "bad"})
    h.pump()
    assert h.pool.workers()[0].speed.samples == 0


def test_least_work_avoids_the_worker_with_more_work() -> None:
    h, (w0, w1) = make(2, routing_algorithm="least-work")
    w0.hold(b"POST", b"/v1/images/generations")
    w1.hold(b"POST", b"/v1/images/generations")
    big = {"prompt": "a", "num_inference_steps": 50, "size": "1024x1024"}
    h.client.post("http://router/v1/images/generations", json=big)  # w0 (first of equals)
    h.pump()
    for _ in range(4):  # four small ones all fit on w1 before it has as much as w0
        h.client.post("http://router/v1/images/generations", json=IMAGE_10)
        h.pump()
    assert (len(w0.held), len(w1.held)) == (1, 4)
    assert [w.predicted_work for w in h.pool.workers()] == [50.0, 40.0]


def test_other_policies_do_not_parse_bodies() -> None:
    h, (w0,) = make(1)
    assert not h.parts.dispatcher.weighs_work
    w0.hold(b"POST", b"/v1/images/generations")
    h.client.post("http://router/v1/images/generations", json=IMAGE_10)
    h.pump()
    assert h.pool.workers()[0].predicted_work == 0.0


# -- video jobs ------------------------------------------------------------------

VIDEO = {"prompt": "a", "num_inference_steps": 10, "size": "1024x1024", "num_frames": 8}


def video_router() -> Any:
    return make(2, task_types=("T2V", "T2V"), routing_algorithm="least-work")


def test_video_job_work_counts_until_a_poll_shows_it_finished() -> None:
    h, (w0, w1) = video_router()
    w0.on(b"GET", b"/v1/videos/w0-3", lambda r: json.dumps({"id": "w0-3", "status": "in_progress"}).encode())
    code, job = h.json("POST", "/v1/videos", json=VIDEO)
    assert code == 200
    owner = h.pool.get("w0:8000")
    assert owner is not None
    assert (owner.predicted_work, owner.running_jobs) == (80.0, 1)
    # the next video goes to the other worker: the first one is still running
    code, job2 = h.json("POST", "/v1/videos", json=VIDEO)
    assert job2["id"].startswith("w1-")
    h.json("GET", f"/v1/videos/{job['id']}")  # still in progress
    assert owner.predicted_work == 80.0
    del w0.handlers[(b"GET", b"/v1/videos/w0-3")]
    h.json("GET", f"/v1/videos/{job['id']}")  # the fake answers "completed"
    assert (owner.predicted_work, owner.running_jobs) == (0.0, 0)
    assert h.parts.jobs.running_jobs == 1


def test_deleted_video_job_stops_counting() -> None:
    h, (w0, w1) = video_router()
    w0.on(b"DELETE", b"/v1/videos/w0-3", lambda r: json.dumps({"id": "w0-3", "deleted": True}).encode())
    _, job = h.json("POST", "/v1/videos", json=VIDEO)
    h.call("DELETE", f"/v1/videos/{job['id']}")
    assert h.pool.get("w0:8000").predicted_work == 0.0  # type: ignore[union-attr]
    assert h.parts.jobs.running_jobs == 0


def test_the_router_polls_a_running_job_itself() -> None:
    h, (w0, w1) = video_router()
    w0.on(b"GET", b"/v1/videos/w0-3", lambda r: json.dumps({"id": "w0-3", "status": "in_progress"}).encode())
    h.json("POST", "/v1/videos", json=VIDEO)
    owner = h.pool.get("w0:8000")
    assert owner is not None and owner.predicted_work == 80.0
    polls = lambda: sum(1 for s in w0.seen if s.request.path == b"/v1/videos/w0-3")  # noqa: E731
    predicted = 80.0 * DEFAULT_SECONDS_PER_UNIT  # 22.9 s
    h.clock.advance(predicted - 0.1)
    h.pump()
    assert polls() == 0
    h.clock.advance(0.2)
    h.pump()
    assert polls() == 1
    assert owner.predicted_work == 80.0  # still in progress: asked again later, less often
    h.clock.advance(JOB_POLL_MIN * 2)
    h.pump()
    assert polls() == 2
    del w0.handlers[(b"GET", b"/v1/videos/w0-3")]  # the fake now answers "completed"
    h.clock.advance(JOB_POLL_MIN * 4)
    h.pump()
    assert polls() == 3
    assert (owner.predicted_work, owner.running_jobs) == (0.0, 0)
    h.clock.advance(JOB_POLL_MAX * 2)
    h.pump()
    assert polls() == 3  # no more polls once finished


def test_a_job_the_worker_no_longer_has_stops_counting() -> None:
    h, (w0, w1) = video_router()
    w0.on(b"GET", b"/v1/videos/w0-3", lambda r: (r.setResponseCode(404), b'{"detail": "not found"}')[1])
    h.json("POST", "/v1/videos", json=VIDEO)
    owner = h.pool.get("w0:8000")
    assert owner is not None
    h.clock.advance(JOB_POLL_MAX)
    h.pump()
    assert (owner.predicted_work, owner.running_jobs) == (0.0, 0)


def test_unpolled_video_job_expires() -> None:
    """Even when the worker keeps saying "in progress" (or does not answer)."""
    h, (w0, w1) = video_router()
    w0.on(b"GET", b"/v1/videos/w0-3", lambda r: json.dumps({"id": "w0-3", "status": "in_progress"}).encode())
    h.json("POST", "/v1/videos", json=VIDEO)
    owner = h.pool.get("w0:8000")
    assert owner is not None and owner.predicted_work == 80.0
    hold = 3.0 * 80.0 * DEFAULT_SECONDS_PER_UNIT + JOB_WORK_GRACE
    h.clock.advance(hold - 1.0)
    h.pump()
    assert owner.predicted_work == 80.0
    h.clock.advance(2.0)
    h.pump()
    assert (owner.predicted_work, owner.running_jobs) == (0.0, 0)
    assert h.parts.jobs.running_jobs == 0


def test_failed_video_creation_counts_nothing() -> None:
    h, (w0, w1) = video_router()
    for w in (w0, w1):
        w.on(b"POST", b"/v1/videos", lambda r: (r.setResponseCode(422), b'{"detail": "bad"}')[1])
    code, _, _ = h.call("POST", "/v1/videos", json=VIDEO)
    assert code == 422
    assert [w.predicted_work for w in h.pool.workers()] == [0.0, 0.0]
    assert h.parts.jobs.running_jobs == 0


# -- seeding from the model card ---------------------------------------------------


def test_model_card_num_gpus_seeds_speed() -> None:
    card = {"data": [{"id": "m", "task_type": "T2I", "num_gpus": 4}]}
    assert _parse_model_card(json.dumps(card).encode()) == ("T2I", "m", 4)
    for bad in (0, -1, "4", True, None):
        card["data"][0]["num_gpus"] = bad
        assert _parse_model_card(json.dumps(card).encode())[2] is None
    pool = WorkerPool(now=lambda: 0.0)
    w, _ = pool.add("http://a:1")
    pool.set_capabilities(w, task_type="T2I", model_id="m", num_gpus=4)
    assert w.speed.seconds_per_unit == DEFAULT_SECONDS_PER_UNIT / 4


def test_first_completion_teaches_the_unlearned_workers_its_scale() -> None:
    """A seed 100× off must not make the first worker to finish look 100× faster than its peers."""
    h, (w0, w1) = make(2, routing_algorithm="least-work")
    w0.hold(b"POST", b"/v1/images/generations")
    h.client.post("http://router/v1/images/generations", json=IMAGE_10)
    h.pump()
    h.clock.advance(0.02)
    answer(w0.held.pop(), {"id": "x", "data": []})
    h.pump()
    first, second = h.pool.workers()
    assert first.speed.seconds_per_unit == 0.002
    assert (second.speed.seconds_per_unit, second.speed.samples) == (0.002, 0)


def test_a_completed_job_teaches_speed_from_its_inference_time() -> None:
    h, (w0, w1) = video_router()
    done = {"id": "w0-3", "status": "completed", "inference_time_s": 4.0}
    w0.on(b"GET", b"/v1/videos/w0-3", lambda r: json.dumps(done).encode())
    h.json("POST", "/v1/videos", json=VIDEO)
    h.json("GET", "/v1/videos/w0-3")
    first, second = h.pool.workers()
    assert (first.speed.seconds_per_unit, first.speed.samples) == (0.05, 1)  # 4 s for 80 units
    assert (second.speed.seconds_per_unit, second.speed.samples) == (0.05, 0)  # adopted
    failed = {"id": "w1-3", "status": "failed", "inference_time_s": 0.1}
    w1.on(b"GET", b"/v1/videos/w1-3", lambda r: json.dumps(failed).encode())
    _, job = h.json("POST", "/v1/videos", json=VIDEO)
    assert job["id"] == "w1-3"
    assert second.running_jobs == 1
    h.json("GET", "/v1/videos/w1-3")
    assert second.running_jobs == 0
    assert second.speed.samples == 0  # a failure says nothing about speed
