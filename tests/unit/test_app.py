"""
The router's HTTP surface, in memory: a real Router over fake workers, driven
through StubTreq, on a fake clock.
"""

from __future__ import annotations

import json
from urllib.parse import quote

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.web._newclient import ResponseNeverReceived
from twisted.web.server import Request

from tests.support.deferreds import assert_no_result, failure_result_of, success_result_of
from tests.support.fleet import json_answer
from tests.support.fleet import make_router as make


def served_by(response: object) -> str:
    return response.headers.getRawHeaders(b"x-worker-id")[0].decode()  # type: ignore[attr-defined]


# ---------------------------------------------------------------- health and registry


def test_health_with_no_workers_is_503() -> None:
    h, _ = make(0)
    code, body = h.json("GET", "/health")
    assert code == 503
    assert body == {
        "status": "unhealthy",
        "healthy_workers": 0,
        "total_workers": 0,
        "dead_workers": 0,
        "sleeping_workers": 0,
        "busy_workers": 0,
        "weight_version": "0",
        "model_path": None,
        "queued_requests": 0,
        "oldest_queued_wait": 0.0,
    }


def test_health_counts_workers() -> None:
    h, _ = make(3)
    h.pool.workers()[0].is_dead = True
    h.pool.workers()[1].is_sleeping = True
    code, body = h.json("GET", "/health")
    assert code == 200
    assert body["status"] == "healthy"
    assert (body["healthy_workers"], body["dead_workers"], body["sleeping_workers"]) == (1, 1, 1)


def test_register_worker_by_query_and_json_and_probe_capabilities() -> None:
    h, _ = make(0)
    url_a, _ = h.fleet.add("a", task_type="T2V")
    url_b, _ = h.fleet.add("b")
    code, body = h.json("POST", f"/workers?url={url_a}/")
    assert code == 200 and body["status"] == "success"
    worker = body["worker"]
    assert worker["url"] == url_a
    assert worker["worker_id"] == quote(url_a, safe="")
    assert worker["display_id"] == "a:8000"
    assert worker["video_support"] is True
    assert worker["active_requests"] == 0 and worker["is_dead"] is False
    code, body = h.json("POST", "/workers", json={"worker_url": url_b})
    assert code == 200 and body["worker"]["video_support"] is False
    code, body = h.json("GET", "/workers")
    assert [w["url"] for w in body["workers"]] == [url_a, url_b]
    # registering again is idempotent
    code, body = h.json("POST", "/workers", json={"url": url_a})
    assert code == 200 and len(h.pool) == 2


def test_a_registered_worker_shows_its_registration_probe_before_the_health_loop_probes_it() -> None:
    h, _ = make(0)
    url, _ = h.fleet.add("a")
    h.clock.advance(50)
    code, body = h.json("POST", "/workers", json={"url": url})
    assert code == 200 and body["worker"]["last_probe_ok_at"] == 50.0  # its /health was 200 at 50 s
    h.clock.advance(3)
    url_b, _ = h.fleet.add("managed")
    d = Deferred.fromCoroutine(h.parts.fleet.worker_ready(url_b))  # the launcher's readiness probe passed
    h.pump()
    success_result_of(d)
    assert h.json("GET", "/workers/" + quote(url_b, safe=""))[1]["worker"]["last_probe_ok_at"] == 53.0


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({}, "worker_url is required (use query ?url=... or JSON body)"),
        ({"data": b"{not json"}, "Invalid JSON body"),
        ({"data": b"[1, 2]"}, "Invalid JSON body"),
        ({"json": {"url": "ftp://x:1"}}, "http"),
        ({"json": {"url": "http://169.254.169.254:80"}}, "blocked"),
        ({"json": {"url": "http://169.254.169.254.nip.io:80"}}, "blocked"),
        ({"json": {"url": "http://[::a9fe:a9fe]:80"}}, "blocked"),
        ({"json": {"url": "http://[2002:a9fe:a9fe::]:80"}}, "blocked"),
        ({"json": {"url": "http://0251.0376.0251.0376:80"}}, "blocked"),
        ({"json": {"url": "http://h:1/path"}}, "path"),
    ],
)
def test_register_rejects_bad_input_without_registering(kwargs: dict, needle: str) -> None:
    h, _ = make(0)
    code, body = h.json("POST", "/workers", **kwargs)
    assert code == 400
    assert needle in body["error"]
    assert len(h.pool) == 0


def test_a_refused_worker_url_is_quoted_without_its_password() -> None:
    h, _ = make(0)
    for url in ("http://user:s3cret-pw@127.0.0.1:41001", "s3cret-pw@127.0.0.1:41001", "ftp://u:s3cret-pw@x:1"):
        code, body = h.json("POST", "/workers", json={"url": url})
        assert code == 400
        assert "s3cret-pw" not in body["error"] and "***@" in body["error"], body
    assert len(h.pool) == 0


def test_get_put_delete_worker_by_encoded_id() -> None:
    h, _ = make(1)
    wid = h.pool.workers()[0].worker_id
    code, body = h.json("GET", f"/workers/{wid}")
    assert code == 200 and body["worker"]["worker_id"] == wid
    code, body = h.json("PUT", f"/workers/{wid}", json={"is_dead": True})
    assert code == 200 and body["worker"]["is_dead"] is True
    assert body["worker"]["dead_reason"] == "marked dead by operator"
    code, body = h.json("PUT", f"/workers/{wid}", json={"is_dead": False, "refresh_video_support": True})
    assert code == 200 and body["worker"]["is_dead"] is False
    code, body = h.json("DELETE", f"/workers/{wid}")
    assert (code, body) == (200, {"status": "success", "worker_id": wid})
    assert len(h.pool) == 0


@pytest.mark.parametrize(
    "payload",
    [{"is_dead": "yes"}, {"weight": 1}, {}, [True]],
)
def test_put_worker_rejects_anything_but_two_booleans(payload: object) -> None:
    h, _ = make(1)
    wid = h.pool.workers()[0].worker_id
    code, body = h.json("PUT", f"/workers/{wid}", json=payload)
    assert code == 400 and "error" in body
    assert h.pool.workers()[0].is_dead is False


def test_unknown_worker_is_404() -> None:
    h, _ = make(1)
    for method in ("GET", "PUT", "DELETE"):
        code, body = h.json(method, "/workers/http%3A%2F%2Fnope%3A1", json={"is_dead": True})
        assert (code, body) == (404, {"error": "Worker not found"})


def test_legacy_worker_api() -> None:
    h, _ = make(0)
    url, _ = h.fleet.add("a")
    code, body = h.json("POST", f"/add_worker?url={url}")
    assert (code, body) == (200, {"status": "success", "worker_urls": [url]})
    code, body = h.json("GET", "/list_workers")
    assert body == {"urls": [url]}
    code, body = h.json("GET", "/health_workers")
    entry = body["workers"][0]
    assert {"url", "active_requests", "is_dead", "consecutive_failures"} <= set(entry)
    code, body = h.json("POST", "/remove_worker", json={"url": url})
    assert (code, body) == (200, {"status": "success", "worker_urls": []})
    code, body = h.json("POST", "/remove_worker", json={"url": url})
    assert (code, body) == (404, {"error": "Worker not found"})


# ---------------------------------------------------------------- generation routing


def test_generation_with_no_workers_is_503() -> None:
    h, _ = make(0)
    code, body = h.json("POST", "/v1/images/generations", json={"prompt": "x"})
    assert (code, body) == (503, {"error": "No workers registered in the pool"})


def test_generation_with_only_dead_workers_is_503() -> None:
    h, _ = make(1)
    h.pool.workers()[0].is_dead = True
    code, body = h.json("POST", "/v1/images/generations", json={"prompt": "x"})
    assert (code, body) == (503, {"error": "No healthy workers available in the pool"})


def test_all_sleeping_is_immediate_503() -> None:
    h, _ = make(2)
    for w in h.pool.workers():
        w.is_sleeping = True
    code, body = h.json("POST", "/v1/diffusion/generate", json={"prompt": "x"})
    assert code == 503 and body["error"].startswith("all workers are sleeping")


def test_worker_answer_is_passed_through_untouched() -> None:
    h, (w0,) = make(1)

    def crash(request: Request) -> bytes:
        request.setResponseCode(500)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"Internal Server Error"

    w0.on(b"POST", b"/v1/images/generations", crash)
    code, body, response = h.call("POST", "/v1/images/generations", json={"prompt": "x"})
    assert code == 500 and body == b"Internal Server Error"
    assert response.headers.getRawHeaders(b"content-type") == [b"text/plain; charset=utf-8"]
    assert h.pool.workers()[0].active_requests == 0


def test_request_body_and_raw_query_reach_the_worker() -> None:
    h, (w0,) = make(1)
    raw = b'{"prompt": "a cat",  "n": 2}'
    code, _, _ = h.call(
        "POST", "/v1/images/generations?x=%2F&y=1", data=raw, headers={"content-type": "application/json"}
    )
    assert code == 200
    seen = w0.seen[-1]
    assert seen.uri == b"/v1/images/generations?x=%2F&y=1"
    assert seen.body == raw


def test_round_robin_alternates_exactly() -> None:
    h, _ = make(3, routing_algorithm="round-robin")
    served = [served_by(h.call("POST", "/v1/images/generations", json={"prompt": "x"})[2]) for _ in range(9)]
    # Exactly alternating: every window of three is a permutation, repeated in the same order.
    assert sorted(served[:3]) == ["w0", "w1", "w2"]
    assert served == served[:3] * 3


def test_least_request_avoids_the_busy_worker() -> None:
    h, (w0, w1) = make(2)
    w0.hold(b"POST", b"/v1/images/generations")
    w1.hold(b"POST", b"/v1/images/generations")
    first = h.client.post("http://router/v1/images/generations", json={"prompt": "x"})
    h.pump()
    busy = [w for w in (w0, w1) if w.held]
    assert len(busy) == 1
    second = h.client.post("http://router/v1/images/generations", json={"prompt": "x"})
    h.pump()
    assert len(w0.held) == 1 and len(w1.held) == 1
    assert sorted(w.active_requests for w in h.pool.workers()) == [1, 1]
    for w in (w0, w1):
        req = w.held.pop()
        req.write(b"{}")
        req.finish()
    h.pump()
    assert success_result_of(first).code == 200 and success_result_of(second).code == 200
    assert [w.active_requests for w in h.pool.workers()] == [0, 0]


def test_unreachable_worker_is_quarantined_and_request_retried_elsewhere() -> None:
    h, (w0, w1) = make(2, routing_algorithm="round-robin")
    h.fleet.down.add("w0:8000")
    for _ in range(2):
        code, body, response = h.call("POST", "/v1/images/generations", json={"prompt": "x"})
        assert code == 200 and served_by(response) == "w1"
    dead = h.pool.workers()[0]
    assert dead.is_dead and "unreachable" in dead.dead_reason
    assert dead.active_requests == 0 and dead.failed_requests == 1


def test_single_unreachable_worker_gives_502() -> None:
    h, _ = make(1)
    h.fleet.down.add("w0:8000")
    code, body = h.json("POST", "/v1/images/generations", json={"prompt": "x"})
    assert code == 502 and body["error"].startswith("Worker request failed: ")
    code, body = h.json("POST", "/v1/images/generations", json={"prompt": "x"})
    assert (code, body) == (503, {"error": "No healthy workers available in the pool"})
    assert h.pool.workers()[0].active_requests == 0


def test_timeout_gives_504_and_releases_the_count() -> None:
    h, (w0,) = make(1, timeout=30)
    w0.hold(b"POST", b"/v1/images/generations")
    d = h.client.post("http://router/v1/images/generations", json={"prompt": "x"})
    h.pump()
    assert_no_result(d)
    assert h.pool.workers()[0].active_requests == 1
    h.clock.advance(31)
    h.pump()
    response = success_result_of(d)
    assert response.code == 504
    body = json.loads(success_result_of(h.client.content(response)))
    assert "within 30s" in body["error"]
    assert h.pool.workers()[0].active_requests == 0
    assert not h.pool.workers()[0].is_dead  # slow is not dead


def test_client_disconnect_keeps_the_count_until_the_worker_finishes() -> None:
    h, (w0,) = make(1)
    w0.hold(b"POST", b"/v1/images/generations")
    d = h.client.post("http://router/v1/images/generations", json={"prompt": "x"})
    h.pump()
    assert h.pool.workers()[0].active_requests == 1
    d.cancel()  # the client goes away; the worker still computes the generation
    failure_result_of(d, CancelledError, ResponseNeverReceived)
    h.pump()
    assert h.pool.workers()[0].active_requests == 1
    [held] = w0.held
    held.write(b'{"data": []}')
    held.finish()
    h.pump()
    assert h.pool.workers()[0].active_requests == 0


def test_catch_all_goes_to_least_loaded_worker() -> None:
    h, (w0, w1) = make(2)
    code, body = h.json("POST", "/get_weights_checksum", json={"module_names": None})
    assert code == 200 and body["path"] == "/get_weights_checksum"
    code, body = h.json("GET", "/some/unknown/path?q=1")
    assert code == 200 and body["path"] == "/some/unknown/path"
    # Load one worker: every catch-all request then goes to the other one.
    for worker in (w0, w1):
        worker.hold(b"POST", b"/v1/images/generations")
    h.client.post("http://router/v1/images/generations", json={"prompt": "x"})
    h.pump()
    idle = "w1" if w0.held else "w0"
    for _ in range(3):
        code, body = h.json("GET", "/some/unknown/path")
        assert code == 200 and body["worker"] == idle


def test_catch_all_without_workers_is_503() -> None:
    h, _ = make(0)
    code, body = h.json("GET", "/anything")
    assert (code, body) == (503, {"error": "No workers registered in the pool"})


def test_legacy_generate_goes_to_images_generations() -> None:
    h, (w0,) = make(1)
    code, _, _ = h.call("POST", "/generate?a=1", json={"prompt": "x"})
    assert code == 200 and w0.seen[-1].uri == b"/v1/images/generations?a=1"


# ---------------------------------------------------------------- sticky images and videos


def test_image_content_goes_to_the_worker_that_made_it() -> None:
    h, (w0, w1) = make(2, routing_algorithm="round-robin")
    ids = []
    for _ in range(2):
        _, body = h.json("POST", "/v1/images/generations", json={"prompt": "x", "response_format": "url"})
        ids.append(body["id"])
    for image_id in ids:
        code, content, response = h.call("GET", f"/v1/images/{image_id}/content")
        assert code == 200 and served_by(response) == image_id.split("-")[0]
    code, body = h.json("GET", "/v1/images/nope/content")
    assert code == 404 and "Unknown image_id" in body["error"]


def test_videos_go_only_to_video_capable_workers() -> None:
    h, (img, vid) = make(2, task_types=("T2I", "T2V"))
    for _ in range(3):
        code, body, response = h.call("POST", "/v1/videos", json={"prompt": "x"})
        assert code == 200 and served_by(response) == "w1"


@pytest.mark.parametrize("task_type", ["T2I", "I2I", "TI2I", "I2M"])
def test_videos_without_video_workers_is_400(task_type: str) -> None:
    h, _ = make(1, task_types=(task_type,))
    code, body = h.json("POST", "/v1/videos", json={"prompt": "x"})
    assert (code, body) == (400, {"error": "No video-capable workers available in current worker pool."})


def test_video_job_is_sticky_for_poll_content_list_and_delete() -> None:
    h, (v0, v1) = make(2, task_types=("T2V", "T2V"), routing_algorithm="round-robin")
    jobs = [h.json("POST", "/v1/videos", json={"prompt": "x"})[1]["id"] for _ in range(4)]
    for job in jobs:
        owner = job.split("-")[0]
        for path in (f"/v1/videos/{job}", f"/v1/videos/{job}/content", f"/v1/videos?video_id={job}", f"/v1/videos?id={job}"):
            code, _, response = h.call("GET", path)
            assert code == 200 and served_by(response) == owner, path
        code, _, response = h.call("DELETE", f"/v1/videos/{job}")
        assert code == 200 and served_by(response) == owner


def test_unknown_video_is_found_by_asking_the_workers() -> None:
    h, (v0, v1) = make(2, task_types=("T2V", "T2V"))

    def not_found(request: Request) -> bytes:
        return json_answer(request, 404, {"detail": "Video not found"})

    v0.on(b"GET", b"/v1/videos/job-42", not_found)
    code, body, response = h.call("GET", "/v1/videos/job-42")
    assert code == 200 and served_by(response) == "w1"
    assert h.parts.jobs.videos.owner("job-42") == h.pool.workers()[1].url


def test_unknown_video_nobody_has_is_404() -> None:
    h, (v0,) = make(1, task_types=("T2V",))
    v0.on(b"GET", b"/v1/videos/ghost", lambda r: json_answer(r, 404, {"detail": "Video not found"}))
    code, body = h.json("GET", "/v1/videos/ghost")
    assert code == 404 and "Unknown video_id" in body["error"]


def test_video_list_is_merged_across_workers() -> None:
    h, (v0, v1) = make(2, task_types=("T2V", "TI2V"))

    def listing(name: str, created: list[int]):
        def answer(request: Request) -> bytes:
            data = [{"id": f"{name}-{c}", "created_at": c, "status": "completed"} for c in created]
            return json_answer(request, 200, {"object": "list", "data": data})

        return answer

    v0.on(b"GET", b"/v1/videos", listing("w0", [1, 4]))
    v1.on(b"GET", b"/v1/videos", listing("w1", [2, 3]))
    code, body = h.json("GET", "/v1/videos")
    assert code == 200
    assert [j["id"] for j in body["data"]] == ["w0-4", "w1-3", "w1-2", "w0-1"]
    code, body = h.json("GET", "/v1/videos?order=asc&limit=2")
    assert [j["id"] for j in body["data"]] == ["w0-1", "w1-2"] and body["has_more"] is True
    assert h.parts.jobs.videos.owner("w1-3") == h.pool.workers()[1].url


@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        ("limit=3_0", "must be an integer"),
        ("limit=%2B3", "must be an integer"),  # +3
        ("limit=+3", "must be an integer"),  # a space, to the query parser
        ("limit=%203", "must be an integer"),
        ("limit=3%20", "must be an integer"),
        ("limit=3.0", "must be an integer"),
        ("limit=-1", "must be an integer"),
        ("limit=abc", "must be an integer"),
        ("limit=%D9%A3", "must be an integer"),  # Arabic-Indic three
        ("limit=" + "9" * 5000, "out of range"),
        ("limit=0", "between 1 and 100"),
        ("limit=101", "between 1 and 100"),
    ],
)
def test_merged_video_list_limit_is_strict(query: str, fragment: str) -> None:
    h, (v0, v1) = make(2, task_types=("T2V", "TI2V"))
    code, body = h.json("GET", "/v1/videos?" + query)
    assert code == 400 and fragment in body["error"]
    assert not any(s.request.path == b"/v1/videos" for w in (v0, v1) for s in w.seen)


def test_merged_video_list_limit_takes_plain_digits() -> None:
    h, (v0, v1) = make(2, task_types=("T2V", "TI2V"))
    for i, v in enumerate((v0, v1)):
        data = [{"id": f"w{i}-{c}", "created_at": c, "status": "completed"} for c in range(5)]
        v.on(b"GET", b"/v1/videos", lambda r, data=data: json_answer(r, 200, {"object": "list", "data": data}))
    code, body = h.json("GET", "/v1/videos?limit=007")
    assert code == 200 and len(body["data"]) == 7


def test_video_map_is_bounded() -> None:
    h, _ = make(1, task_types=("T2V",), max_video_jobs=3)
    for _ in range(10):
        h.call("POST", "/v1/videos", json={"prompt": "x"})
    assert len(h.parts.jobs.videos) == 3


# ---------------------------------------------------------------- models


def test_models_are_merged_and_deduplicated() -> None:
    h, (w0, w1, w2) = make(3)
    w2.model_id = "other/model"
    code, body = h.json("GET", "/v1/models")
    assert code == 200
    assert sorted(c["id"] for c in body["data"]) == ["fake/model", "other/model"]


def test_models_without_workers_is_503() -> None:
    h, _ = make(0)
    code, body = h.json("GET", "/v1/models")
    assert code == 503 and "error" in body


# ---------------------------------------------------------------- control plane


def test_update_weights_broadcasts_to_awake_live_workers() -> None:
    h, (w0, w1, w2, w3) = make(4)
    h.pool.workers()[2].is_dead = True
    h.pool.workers()[3].is_sleeping = True
    code, body = h.json("POST", "/update_weights_from_disk", json={"model_path": "/ckpt/1"})
    assert code == 200 and body["success"] is True
    assert [r["worker_url"] for r in body["results"]] == [w.url for w in h.pool.workers()[:2]]
    assert all(r["status_code"] == 200 for r in body["results"])
    assert json.loads(w0.seen[-1].body) == {"model_path": "/ckpt/1"}
    for skipped in (w2, w3):  # neither the dead nor the sleeping worker is sent the refit
        assert not any(s.request.path == b"/update_weights_from_disk" for s in skipped.seen)


def test_failed_update_is_reported_as_502() -> None:
    h, (w0, w1) = make(2)
    w1.on(
        b"POST",
        b"/update_weights_from_disk",
        lambda r: json_answer(r, 400, {"success": False, "message": "Failed to update module 'vae'"}),
    )
    code, body = h.json("POST", "/update_weights_from_disk", json={"model_path": "/ckpt/1"})
    assert code == 502 and body["success"] is False
    assert [r["success"] for r in body["results"]] == [True, False]


def test_sleep_and_wake_change_routability() -> None:
    h, (w0, w1) = make(2)
    code, body = h.json("POST", "/release_memory_occupation", json={})
    assert code == 200 and len(body["results"]) == 2
    assert all(w.is_sleeping for w in h.pool.workers())
    code, body = h.json("POST", "/release_memory_occupation", json={})
    assert code == 200 and body["message"] == "all workers are already sleeping"
    code, body = h.json("POST", "/v1/images/generations", json={"prompt": "x"})
    assert code == 503
    code, body = h.json("POST", "/resume_memory_occupation")
    assert code == 200 and not any(w.is_sleeping for w in h.pool.workers())
    code, _, _ = h.call("POST", "/v1/images/generations", json={"prompt": "x"})
    assert code == 200


@pytest.mark.parametrize("path", ["/release_memory_occupation", "/resume_memory_occupation"])
@pytest.mark.parametrize("raw", [b"{", b"[]", b"null", b'"sleep"', b"1", b"{} x", b"\xff"])
def test_sleep_and_wake_refuse_a_body_that_is_not_a_json_object(path: str, raw: bytes) -> None:
    h, (w0, w1) = make(2)
    code, body = h.json("POST", path, data=raw, headers={"content-type": "application/json"})
    assert code == 400 and body["error"].startswith("Invalid JSON body")
    assert not any(s.request.path == path.encode() for w in (w0, w1) for s in w.seen)
    assert not any(w.is_sleeping for w in h.pool.workers())


def test_sleep_and_wake_forward_an_object_body_unchanged_and_an_empty_one_as_an_object() -> None:
    h, (w0,) = make(1)
    raw = b'{"tags": ["weights"],  "x": 1}'
    code, _ = h.json("POST", "/release_memory_occupation", data=raw, headers={"content-type": "application/json"})
    assert code == 200 and w0.seen[-1].body == raw
    code, _ = h.json("POST", "/resume_memory_occupation", data=b"  \n")
    assert code == 200 and w0.seen[-1].body == b"{}"


def test_sleep_body_is_checked_before_the_fleet() -> None:
    h, _ = make(0)
    code, body = h.json("POST", "/release_memory_occupation", data=b"{")
    assert code == 400 and body["error"].startswith("Invalid JSON body")


def test_control_with_no_workers_is_503() -> None:
    """The earlier router's words start the error (issue 8 point 3); scripts match on them."""
    h, _ = make(0)
    for path in ("/update_weights_from_disk", "/release_memory_occupation", "/resume_memory_occupation"):
        code, body = h.json("POST", path, json={"model_path": "/ckpt"})
        assert code == 503
        assert body["error"].startswith("No healthy workers available in the pool")
        assert body["error"].endswith("no workers registered")


def test_in_flight_counts_return_to_zero_after_a_mixed_workload() -> None:
    h, (w0, w1) = make(2, task_types=("T2I", "T2V"))
    for path in ("/v1/images/generations", "/v1/videos", "/v1/diffusion/generate", "/rollout/generate"):
        h.call("POST", path, json={"prompt": "x"})
    assert [w.active_requests for w in h.pool.workers()] == [0, 0]
    assert sum(w.total_requests for w in h.pool.workers()) == 4


def test_held_request_is_not_answered_early() -> None:
    """A route must not finish the response before the worker does (Klein + NOT_DONE_YET trap)."""
    h, (w0,) = make(1)
    w0.hold(b"POST", b"/v1/diffusion/generate")
    d = h.client.post("http://router/v1/diffusion/generate", json={"prompt": "x"})
    h.pump()
    req = w0.held[0]
    req.setHeader(b"content-type", b"application/json")
    req.write(b'{"partial": ')
    h.pump()
    response = success_result_of(d)
    chunks: list[bytes] = []
    done = h.client.collect(response, chunks.append)
    h.pump()
    assert b"".join(chunks) == b'{"partial": '
    assert_no_result(done)
    req.write(b"true}")
    req.finish()
    h.pump()
    success_result_of(done)
    assert b"".join(chunks) == b'{"partial": true}'


def test_metrics_expose_per_worker_state() -> None:
    h, (w0, w1) = make(2)
    h.call("POST", "/v1/images/generations", json={"prompt": "x"})
    h.pool.workers()[1].is_dead = True
    code, body, response = h.call("GET", "/metrics")
    assert code == 200
    assert response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
    text = body.decode()
    assert 'sglang_router_worker_dead{worker="http://w1:8001"} 1.0' in text
    assert 'sglang_router_workers{state="routable"} 1.0' in text
    assert 'sglang_router_worker_requests_total{worker="http://w0:8000"}' in text


def test_image_calls_prefer_image_workers_over_video_workers() -> None:
    h, (img, vid) = make(2, task_types=("T2I", "T2V"), routing_algorithm="round-robin")
    for _ in range(4):
        assert served_by(h.call("POST", "/v1/images/generations", json={"prompt": "x"})[2]) == "w0"


def test_image_calls_on_a_video_only_fleet_still_go_through() -> None:
    h, _ = make(1, task_types=("T2V",))
    code, _, response = h.call("POST", "/v1/images/generations", json={"prompt": "x"})
    assert code == 200 and served_by(response) == "w0"


def test_image_calls_with_the_image_worker_asleep_are_503_not_sent_to_video_workers() -> None:
    h, _ = make(2, task_types=("T2I", "T2V"))
    h.pool.workers()[0].is_sleeping = True
    code, body = h.json("POST", "/v1/images/generations", json={"prompt": "x"})
    assert code == 503 and body["error"].startswith("all workers are sleeping")


def test_image_edits_multipart_body_passes_through_untouched() -> None:
    h, (w0,) = make(1)
    boundary = b"XyZ"
    body = (
        b"--XyZ\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nmake it blue\r\n"
        b"--XyZ\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
        b"Content-Type: image/png\r\n\r\n\x89PNG\r\n\x1a\n\x00\x01binary\r\n--XyZ--\r\n"
    )
    code, _, _ = h.call(
        "POST",
        "/v1/images/edits",
        data=body,
        headers={"content-type": b"multipart/form-data; boundary=" + boundary},
    )
    assert code == 200
    seen = w0.seen[-1]
    assert seen.uri == b"/v1/images/edits" and seen.body == body
    assert seen.headers[b"Content-Type"] == [b"multipart/form-data; boundary=XyZ"]


def test_legacy_generate_video_goes_to_v1_videos_on_a_video_worker() -> None:
    h, (img, vid) = make(2, task_types=("T2I", "T2V"))
    code, body, response = h.call("POST", "/generate_video", json={"prompt": "x"})
    assert code == 200 and served_by(response) == "w1"
    assert vid.seen[-1].uri == b"/v1/videos"
    job = json.loads(body)["id"]
    assert h.parts.jobs.videos.owner(job) == h.pool.workers()[1].url


def test_head_on_video_content_reaches_the_owner() -> None:
    h, (v0,) = make(1, task_types=("T2V",))
    _, body = h.json("POST", "/v1/videos", json={"prompt": "x"})
    code, content, _ = h.call("HEAD", f"/v1/videos/{body['id']}/content")
    assert code == 200 and content == b""
    assert v0.seen[-1].method == b"HEAD"


def test_video_list_with_one_worker_is_passed_through_and_learned() -> None:
    h, (v0,) = make(1, task_types=("T2V",))
    v0.on(
        b"GET",
        b"/v1/videos",
        lambda r: json_answer(r, 200, {"object": "list", "data": [{"id": "j1", "status": "queued"}]}),
    )
    code, body = h.json("GET", "/v1/videos?limit=5")
    assert code == 200 and body["data"][0]["id"] == "j1"
    assert v0.seen[-1].uri == b"/v1/videos?limit=5"
    assert h.parts.jobs.videos.owner("j1") == h.pool.workers()[0].url


def test_video_list_without_video_workers_is_400() -> None:
    h, _ = make(1)
    code, body = h.json("GET", "/v1/videos")
    assert code == 400 and body["error"].startswith("No video-capable workers")


def test_deleted_video_is_forgotten() -> None:
    h, (v0,) = make(1, task_types=("T2V",))
    _, body = h.json("POST", "/v1/videos", json={"prompt": "x"})
    code, _, _ = h.call("DELETE", f"/v1/videos/{body['id']}")
    assert code == 200 and body["id"] not in h.parts.jobs.videos


def test_add_worker_with_bad_url_registers_nothing() -> None:
    h, _ = make(0)
    code, body = h.json("POST", "/add_worker?url=http://metadata.google.internal:80")
    assert code == 400 and "blocked" in body["error"]
    assert len(h.pool) == 0


def test_image_id_of_a_large_b64_answer_is_learned_from_its_start() -> None:
    h, (w0, w1) = make(2, routing_algorithm="round-robin")
    big = {"id": "big-1", "created": 1, "data": [{"b64_json": "A" * 200_000, "url": None}]}
    for w in (w0, w1):
        w.on(b"POST", b"/v1/images/generations", lambda r: json_answer(r, 200, big))
    code, body, response = h.call("POST", "/v1/images/generations", json={"prompt": "x"})
    assert code == 200 and len(body) > 200_000
    owner = served_by(response)
    assert h.parts.jobs.images.owner("big-1") == ("http://w0:8000" if owner == "w0" else "http://w1:8001")


def test_a_worker_registered_while_loading_waits_in_starting_until_it_answers() -> None:
    h, (w0,) = make(1)
    url, late = h.fleet.add("loading")
    h.fleet.down.add("loading:8001")  # port closed while the model loads
    code, body = h.json("POST", "/workers", json={"url": url})
    assert code == 200 and body["worker"]["state"] == "starting"
    for _ in range(4):  # traffic goes to the worker that is up; the loading one is never tried
        code, _, response = h.call("POST", "/v1/images/generations", json={"prompt": "x"})
        assert code == 200 and served_by(response) == "w0"
    for _ in range(5):  # failed probes while loading never quarantine it
        h.parts.health.check_all()
        h.pump()
    loading = h.pool.get(url)
    assert loading is not None and not loading.is_dead and loading.state == "starting"
    h.fleet.down.clear()
    h.parts.health.check_all()
    h.pump()
    assert loading.routable and loading.task_type == "T2I"
    served = {served_by(h.call("POST", "/v1/images/generations", json={"prompt": "x"})[2]) for _ in range(4)}
    assert served == {"w0", "loading"}


def test_only_starting_workers_are_tried_and_a_refused_connection_is_502() -> None:
    """Issue 8 point 4: the earlier router's answer, with the cause (more in test_starting_dispatch.py)."""
    h, _ = make(0)
    url, _ = h.fleet.add("loading")
    h.fleet.down.add("loading:8000")
    h.json("POST", "/workers", json={"url": url})
    code, body = h.json("POST", "/v1/images/generations", json={"prompt": "x"})
    assert code == 502 and body["error"].startswith("Worker request failed: loading:8000: ")
    code, health = h.json("GET", "/health")
    assert code == 503 and health["busy_workers"] == 0
