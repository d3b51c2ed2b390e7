"""
The RL control plane through the whole router, in memory: weight versions,
refit transactions, catch-up before traffic, sleep/wake, and generations
that arrive while the fleet is changing.
"""

from __future__ import annotations

import json

from twisted.internet.defer import CancelledError, Deferred
from twisted.web._newclient import ResponseNeverReceived

from tests.support.deferreds import assert_no_result, failure_result_of, success_result_of
from tests.support.fleet import FakeWorker, RouterHarness, json_answer
from tests.support.fleet import make_router as make


def generate(h: RouterHarness) -> tuple[int, str | None, str | None]:
    """One image generation: (status, serving worker, X-Weight-Version)."""
    code, _, response = h.call("POST", "/v1/images/generations", json={"prompt": "x"})
    version = response.headers.getRawHeaders(b"x-weight-version")
    served = response.headers.getRawHeaders(b"x-worker-id")
    return code, served[0].decode() if served else None, version[0].decode() if version else None


def update_paths(worker: FakeWorker) -> list[bytes]:
    return [s.body for s in worker.seen if s.request.path == b"/update_weights_from_disk"]


def test_fresh_fleet_is_at_version_zero_and_answers_carry_it() -> None:
    h, _ = make(2)
    assert generate(h)[2] == "0"
    code, health = h.json("GET", "/health")
    assert health["weight_version"] == "0"
    _, listing = h.json("GET", "/workers")
    assert [w["weight_version"] for w in listing["workers"]] == ["0", "0"]


def test_update_sets_every_worker_and_every_following_answer_to_the_new_version() -> None:
    h, workers = make(3)
    code, body = h.json("POST", "/update_weights_from_disk", json={"model_path": "/ckpt/7", "weight_version": 7})
    assert code == 200 and body["success"] is True and body["weight_version"] == "7"
    assert [r["status_code"] for r in body["results"]] == [200, 200, 200]
    _, listing = h.json("GET", "/workers")
    assert {(w["weight_version"], w["model_path"]) for w in listing["workers"]} == {("7", "/ckpt/7")}
    for _ in range(6):
        assert generate(h)[2] == "7"
    code, health = h.json("GET", "/health")
    assert (health["weight_version"], health["model_path"]) == ("7", "/ckpt/7")


def test_version_counter_when_no_weight_version_is_given() -> None:
    h, _ = make(1)
    for expected in ("1", "2"):
        _, body = h.json("POST", "/update_weights_from_disk", json={"model_path": "/ckpt"})
        assert body["weight_version"] == expected


def test_update_body_is_forwarded_unchanged() -> None:
    h, (w0,) = make(1)
    raw = b'{"model_path": "/ckpt/1",   "flush_cache": false, "target_modules": ["transformer"]}'
    h.call("POST", "/update_weights_from_disk", data=raw, headers={"content-type": "application/json"})
    assert update_paths(w0) == [raw]


def test_update_with_invalid_json_is_400_and_reaches_no_worker() -> None:
    h, (w0,) = make(1)
    code, body = h.json("POST", "/update_weights_from_disk", data=b"{nope")
    assert code == 400 and body["error"].startswith("Invalid JSON body")
    assert update_paths(w0) == []


def test_failed_update_quarantines_the_worker_and_answers_502() -> None:
    h, (w0, w1) = make(2)
    w1.on(
        b"POST",
        b"/update_weights_from_disk",
        lambda r: json_answer(r, 400, {"success": False, "message": "Failed to update module 'vae': boom"}),
    )
    code, body = h.json("POST", "/update_weights_from_disk", json={"model_path": "/ckpt/1"})
    assert code == 502 and body["success"] is False
    assert [(r["worker_url"], r["success"]) for r in body["results"]] == [
        ("http://w0:8000", True),
        ("http://w1:8001", False),
    ]
    bad = h.pool.workers()[1]
    assert bad.is_dead and "Failed to update module 'vae'" in (bad.dead_reason or "")
    for _ in range(4):
        assert generate(h)[1:] == ("w0", "1")


def test_concurrent_updates_are_applied_one_after_the_other() -> None:
    h, (w0,) = make(1)
    w0.hold(b"POST", b"/update_weights_from_disk")
    first = h.client.post("http://router/update_weights_from_disk", json={"model_path": "/a"})
    second = h.client.post("http://router/update_weights_from_disk", json={"model_path": "/b"})
    h.pump()
    assert len(w0.held) == 1  # the second waits for the first
    req = w0.held.pop()
    req.write(json.dumps({"success": True, "message": "ok"}).encode())
    req.finish()
    h.pump()
    assert success_result_of(first).code == 200
    assert len(w0.held) == 1 and json.loads(w0.held[0].content.getvalue()) == {"model_path": "/b"}
    req = w0.held.pop()
    req.write(b'{"success": true}')
    req.finish()
    h.pump()
    assert success_result_of(second).code == 200
    assert h.pool.workers()[0].model_path == "/b"


def test_generations_during_an_update_wait_and_are_never_served_mid_update() -> None:
    h, (w0, w1) = make(2)
    for w in (w0, w1):
        w.hold(b"POST", b"/update_weights_from_disk")
    update = h.client.post("http://router/update_weights_from_disk", json={"model_path": "/ckpt/2"})
    h.pump()
    assert len(w0.held) == len(w1.held) == 1
    gen = h.client.post("http://router/v1/images/generations", json={"prompt": "x"})
    h.pump()
    assert_no_result(gen)
    generations = [s for w in (w0, w1) for s in w.seen if s.request.path == b"/v1/images/generations"]
    assert generations == []  # nobody got it while updating
    _, health = h.json("GET", "/health")
    assert health["status"] == "healthy" and health["busy_workers"] == 2
    # w0 finishes first, but the generation still waits for the whole refit.
    for w in (w0, w1):
        req = w.held.pop()
        req.write(b'{"success": true}')
        req.finish()
    h.pump()
    assert success_result_of(update).code == 200
    response = success_result_of(gen)
    assert response.code == 200
    assert response.headers.getRawHeaders(b"x-weight-version") == [b"1"]


def test_generation_waiting_for_an_update_times_out_with_503() -> None:
    h, (w0,) = make(1, timeout=20)
    w0.hold(b"POST", b"/update_weights_from_disk")
    h.client.post("http://router/update_weights_from_disk", json={"model_path": "/x"})
    h.pump()
    gen = h.client.post("http://router/v1/images/generations", json={"prompt": "x"})
    h.pump()
    h.clock.advance(21)
    h.pump()
    response = success_result_of(gen)
    assert response.code == 503
    body = json.loads(success_result_of(h.client.content(response)))
    assert "still busy (updating weights)" in body["error"]


def test_a_waiting_client_that_leaves_leaves_nothing_behind() -> None:
    h, (w0,) = make(1)
    w0.hold(b"POST", b"/update_weights_from_disk")
    h.client.post("http://router/update_weights_from_disk", json={"model_path": "/x"})
    h.pump()
    gen = h.client.post("http://router/v1/images/generations", json={"prompt": "x"})
    h.pump()
    assert len(h.parts.control.changed) == 1
    gen.cancel()
    h.pump()
    failure_result_of(gen, CancelledError, ResponseNeverReceived)
    assert len(h.parts.control.changed) == 0
    assert h.pool.workers()[0].active_requests == 0


def test_new_worker_is_caught_up_before_its_first_generation() -> None:
    h, (w0,) = make(1)
    h.json("POST", "/update_weights_from_disk", json={"model_path": "/ckpt/3", "weight_version": "v3"})
    url, w1 = h.fleet.add("late")
    w1.hold(b"POST", b"/update_weights_from_disk")
    code, body = h.json("POST", "/workers", json={"url": url})
    assert code == 200 and body["worker"]["syncing"] is True and body["worker"]["state"] == "syncing"
    h.pump()
    assert len(w1.held) == 1
    assert json.loads(w1.held[0].content.getvalue()) == {"model_path": "/ckpt/3", "weight_version": "v3"}
    for _ in range(4):  # meanwhile everything goes to the worker that is current
        assert generate(h)[1:] == ("w0", "v3")
    req = w1.held.pop()
    req.write(b'{"success": true}')
    req.finish()
    h.pump()
    late = h.pool.get(url)
    assert late is not None and late.weight_version == "v3" and late.routable
    served = {generate(h)[1] for _ in range(4)}
    assert served == {"w0", "late"}


def test_failed_catch_up_keeps_the_worker_out_of_rotation() -> None:
    h, (w0,) = make(1)
    h.json("POST", "/update_weights_from_disk", json={"model_path": "/ckpt/3"})
    url, w1 = h.fleet.add("late")
    w1.on(b"POST", b"/update_weights_from_disk", lambda r: json_answer(r, 400, {"success": False, "message": "no"}))
    h.json("POST", "/workers", json={"url": url})
    h.pump()
    late = h.pool.get(url)
    assert late is not None and late.is_dead and "catch-up to weight version 1 failed" in (late.dead_reason or "")
    assert {generate(h)[1] for _ in range(3)} == {"w0"}


def test_readmitted_worker_is_caught_up_first() -> None:
    h, (w0, w1) = make(2)
    h.json("POST", "/update_weights_from_disk", json={"model_path": "/ckpt/1"})
    wid = h.pool.workers()[1].worker_id
    h.json("PUT", f"/workers/{wid}", json={"is_dead": True})
    h.json("POST", "/update_weights_from_disk", json={"model_path": "/ckpt/2"})
    before = len(update_paths(w1))
    code, body = h.json("PUT", f"/workers/{wid}", json={"is_dead": False})
    assert code == 200 and body["worker"]["state"] in ("syncing", "ready")
    h.pump()
    assert json.loads(update_paths(w1)[-1]) == {"model_path": "/ckpt/2"}
    assert len(update_paths(w1)) == before + 1
    assert h.pool.workers()[1].weight_version == "2" and h.pool.workers()[1].routable


def test_worker_that_slept_through_an_update_is_caught_up_on_wake() -> None:
    h, (w0, w1) = make(2)
    sleeper = h.pool.workers()[1]
    sleeper.is_sleeping = True  # e.g. it alone was put to sleep earlier
    code, body = h.json("POST", "/update_weights_from_disk", json={"model_path": "/ckpt/5", "weight_version": 5})
    assert [r["worker_url"] for r in body["results"]] == ["http://w0:8000"]
    assert sleeper.weight_version == "0"
    w1.hold(b"POST", b"/update_weights_from_disk")
    code, body = h.json("POST", "/resume_memory_occupation", json={})
    assert code == 200 and body["catching_up"] == ["http://w1:8001"]
    assert sleeper.state == "syncing" and not sleeper.routable
    h.pump()
    assert {generate(h)[1] for _ in range(3)} == {"w0"}
    req = w1.held.pop()
    req.write(b'{"success": true}')
    req.finish()
    h.pump()
    assert sleeper.weight_version == "5" and sleeper.routable
    assert {generate(h)[2] for _ in range(4)} == {"5"}


def test_worker_current_on_wake_needs_no_catch_up() -> None:
    h, (w0, w1) = make(2)
    h.json("POST", "/update_weights_from_disk", json={"model_path": "/ckpt/1"})
    h.json("POST", "/release_memory_occupation", json={})
    before = len(update_paths(w0))
    code, body = h.json("POST", "/resume_memory_occupation", json={})
    assert body["catching_up"] == []
    assert len(update_paths(w0)) == before
    assert all(w.routable for w in h.pool.workers())


def test_all_sleeping_gives_an_immediate_503_not_a_wait() -> None:
    h, _ = make(2)
    h.json("POST", "/release_memory_occupation", json={})
    d = h.client.post("http://router/v1/images/generations", json={"prompt": "x"})
    h.pump()  # no clock advance needed
    response = success_result_of(d)
    assert response.code == 503
    body = json.loads(success_result_of(h.client.content(response)))
    assert body["error"].startswith("all workers are sleeping")


def test_sleeping_workers_are_not_health_probed() -> None:
    h, (w0, w1) = make(2)
    h.json("POST", "/release_memory_occupation", json={})
    before = [len(w.seen) for w in (w0, w1)]
    h.parts.health.check_all()
    h.pump()
    assert [len(w.seen) for w in (w0, w1)] == before


def test_release_in_progress_holds_new_generations() -> None:
    h, (w0,) = make(1)
    w0.hold(b"POST", b"/release_memory_occupation")
    release = h.client.post("http://router/release_memory_occupation", json={})
    h.pump()
    gen = h.client.post("http://router/v1/images/generations", json={"prompt": "x"})
    h.pump()
    assert_no_result(gen)
    req = w0.held.pop()
    req.write(b'{"success": true, "sleeping": true, "message": "released"}')
    req.finish()
    h.pump()
    assert success_result_of(release).code == 200
    response = success_result_of(gen)
    assert response.code == 503  # the worker it waited for is now asleep


def test_managed_worker_restart_is_caught_up() -> None:
    h, (w0,) = make(1)
    h.json("POST", "/update_weights_from_disk", json={"model_path": "/ckpt/9"})
    fleet = h.parts.fleet
    fleet.worker_lost("http://w0:8000", "process exited with status 9")
    assert h.pool.workers()[0].is_dead
    d = Deferred.fromCoroutine(fleet.worker_ready("http://w0:8000"))
    h.pump()
    success_result_of(d)
    worker = h.pool.workers()[0]
    assert not worker.is_dead and worker.weight_version == "1" and worker.routable
    assert json.loads(update_paths(w0)[-1]) == {"model_path": "/ckpt/9"}


def test_worker_joining_during_the_first_refit_is_caught_up_after_it() -> None:
    h, (w0,) = make(1)
    w0.hold(b"POST", b"/update_weights_from_disk")
    update = h.client.post("http://router/update_weights_from_disk", json={"model_path": "/ckpt/1"})
    h.pump()
    url, late = h.fleet.add("late")
    code, body = h.json("POST", "/workers", json={"url": url})
    assert body["worker"]["weight_version"] == "0"  # admitted against the fleet as it stood
    req = w0.held.pop()
    req.write(b'{"success": true}')
    req.finish()
    h.pump()
    assert success_result_of(update).code == 200
    joined = h.pool.get(url)
    assert joined is not None and joined.weight_version == "1" and joined.routable
    assert json.loads(update_paths(late)[-1]) == {"model_path": "/ckpt/1"}
    assert {generate(h)[2] for _ in range(4)} == {"1"}


def test_a_refit_every_worker_rejects_changes_nothing_and_quarantines_nobody() -> None:
    h, workers = make(3)
    h.json("POST", "/update_weights_from_disk", json={"model_path": "/ckpt/1"})
    for w in workers:
        w.on(
            b"POST",
            b"/update_weights_from_disk",
            lambda r: json_answer(r, 400, {"success": False, "message": "Module(s) requested for update not found"}),
        )
    code, body = h.json("POST", "/update_weights_from_disk", json={"model_path": "/ckpt/2", "target_modules": ["x"]})
    assert code == 502 and body["success"] is False
    assert body["weight_version"] == "1" and "fleet stays at version 1" in body["message"]
    assert not any(w.is_dead for w in h.pool.workers())
    assert {generate(h)[2] for _ in range(3)} == {"1"}


def test_a_refit_some_workers_reject_quarantines_those() -> None:
    h, (w0, w1) = make(2)
    w1.on(b"POST", b"/update_weights_from_disk", lambda r: json_answer(r, 400, {"success": False, "message": "no"}))
    code, body = h.json("POST", "/update_weights_from_disk", json={"model_path": "/ckpt/1"})
    assert code == 502 and body["weight_version"] == "1"
    assert [w.is_dead for w in h.pool.workers()] == [False, True]


def test_refit_without_model_path_is_refused_by_the_router() -> None:
    h, (w0,) = make(1)
    for payload in ({}, {"model_path": ""}, {"model_path": 3}):
        code, body = h.json("POST", "/update_weights_from_disk", json=payload)
        assert code == 400 and body["error"].startswith("model_path is required")
    code, body = h.json("POST", "/update_weights_from_disk", json={"model_path": "/x", "weight_version": True})
    assert code == 400 and "weight_version" in body["error"]
    assert update_paths(w0) == []
