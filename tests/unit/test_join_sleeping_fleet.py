"""
A worker that joins a sleeping fleet (registered, re-admitted, or a managed
worker coming up) is put to sleep too before it gets any traffic, and wakes,
caught up, with the fleet.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.web.server import Request

from tests.support.deferreds import assert_no_result, success_result_of
from tests.support.fleet import FakeWorker, RouterHarness, json_answer
from tests.support.fleet import make_router as make

SLEEP = b"/release_memory_occupation"
WAKE = b"/resume_memory_occupation"
REFIT = b"/update_weights_from_disk"
GENERATE = b"/v1/images/generations"


def paths(worker: FakeWorker) -> list[bytes]:
    return [s.request.path for s in worker.seen if s.request.path not in (b"/v1/models", b"/health")]


def state_of(h: RouterHarness, url: str) -> dict[str, Any]:
    worker = h.pool.get(url)
    assert worker is not None
    return worker.payload()


def generate(h: RouterHarness) -> tuple[int, Any, Any]:
    code, body, response = h.call("POST", "/v1/images/generations", json={"prompt": "x"})
    return code, body, response


def join(h: RouterHarness, name: str = "late") -> tuple[str, FakeWorker]:
    url, worker = h.fleet.add(name)
    code, body = h.json("POST", "/workers", json={"url": url})
    assert code == 200, body
    return url, worker


def test_worker_registered_while_the_fleet_sleeps_joins_asleep_and_wakes_with_it() -> None:
    h, _ = make(2)
    assert h.json("POST", "/release_memory_occupation", json={})[0] == 200
    url, late = join(h)
    assert paths(late) == [SLEEP]
    assert (state_of(h, url)["state"], state_of(h, url)["is_sleeping"]) == ("sleeping", True)

    code, body, _ = generate(h)
    assert code == 503 and b"all workers are sleeping" in body
    assert GENERATE not in paths(late)

    code, body = h.json("POST", "/resume_memory_occupation", json={})
    assert code == 200 and len(body["results"]) == 3
    assert paths(late) == [SLEEP, WAKE]
    assert [w.routable for w in h.pool.workers()] == [True, True, True]
    served = {generate(h)[2].headers.getRawHeaders(b"x-worker-id")[0] for _ in range(6)}
    assert b"late" in served


def test_joiner_of_a_refitted_sleeping_fleet_is_caught_up_when_it_wakes() -> None:
    h, _ = make(1)
    assert h.json("POST", "/update_weights_from_disk", json={"model_path": "/ckpt/3", "weight_version": "3"})[0] == 200
    assert h.json("POST", "/release_memory_occupation", json={})[0] == 200
    url, late = join(h)
    assert paths(late) == [SLEEP]  # asleep: no catch-up while the GPU memory is the trainer's
    assert state_of(h, url)["state"] == "sleeping"

    code, body = h.json("POST", "/resume_memory_occupation", json={})
    assert code == 200 and body["catching_up"] == [url]
    h.pump()
    assert paths(late) == [SLEEP, WAKE, REFIT]
    assert json.loads(late.seen[-1].body) == {"model_path": "/ckpt/3", "weight_version": "3"}
    assert state_of(h, url)["weight_version"] == "3"
    for _ in range(4):
        code, _, response = generate(h)
        assert code == 200 and response.headers.getRawHeaders(b"x-weight-version") == [b"3"]


def test_joiner_that_cannot_be_put_to_sleep_is_quarantined_not_served() -> None:
    h, _ = make(1)
    h.json("POST", "/release_memory_occupation", json={})
    url, late = h.fleet.add("late")

    def refuse(request: Request) -> bytes:
        return json_answer(request, 400, {"success": False, "message": "busy"})

    late.on(b"POST", SLEEP, refuse)
    h.json("POST", "/workers", json={"url": url})
    entry = state_of(h, url)
    assert entry["is_dead"] and "could not be put to sleep with the fleet" in entry["dead_reason"]
    assert generate(h)[0] == 503 and GENERATE not in paths(late)


def test_worker_registered_while_a_sleep_runs_follows_its_outcome() -> None:
    h, (w0,) = make(1)
    w0.hold(b"POST", SLEEP)
    sleeping = h.client.post("http://router/release_memory_occupation", json={})
    h.pump()
    url, late = join(h)
    assert state_of(h, url)["state"] == "joining"  # not routable while the outcome is unknown
    waiting = h.client.post("http://router/v1/images/generations", json={"prompt": "x"})
    h.pump()
    assert_no_result(waiting)  # busy workers are waited for
    held = w0.held.pop()
    held.setHeader(b"content-type", b"application/json")
    held.write(json.dumps({"success": True, "sleeping": True, "message": "released"}).encode())
    held.finish()
    h.pump()
    assert success_result_of(sleeping).code == 200
    assert [w.is_sleeping for w in h.pool.workers()] == [True, True]
    assert paths(late) == [SLEEP]
    assert success_result_of(waiting).code == 503  # the whole fleet sleeps: never served by the joiner


def test_worker_registered_while_a_wake_runs_joins_awake() -> None:
    h, (w0,) = make(1)
    h.json("POST", "/release_memory_occupation", json={})
    w0.hold(b"POST", WAKE)
    waking = h.client.post("http://router/resume_memory_occupation", json={})
    h.pump()
    url, late = join(h)
    assert state_of(h, url)["state"] == "joining"
    held = w0.held.pop()
    held.setHeader(b"content-type", b"application/json")
    held.write(json.dumps({"success": True, "sleeping": False, "message": "resumed"}).encode())
    held.finish()
    h.pump()
    assert success_result_of(waking).code == 200
    assert [w.routable for w in h.pool.workers()] == [True, True]
    assert SLEEP not in paths(late)  # the fleet woke before its turn: an ordinary join


def test_a_half_asleep_fleet_is_awake_for_joiners() -> None:
    h, _ = make(2)
    h.pool.set_sleeping(h.pool.workers()[0], True)
    url, late = join(h)
    assert state_of(h, url)["state"] == "ready" and paths(late) == []


def test_operator_re_admitting_a_worker_into_a_sleeping_fleet_puts_it_to_sleep() -> None:
    h, (w0, w1) = make(2)
    code, _ = h.json("PUT", "/workers/http%3A%2F%2Fw1%3A8001", json={"is_dead": True})
    assert code == 200
    h.json("POST", "/release_memory_occupation", json={})
    assert SLEEP not in paths(w1)
    code, body = h.json("PUT", "/workers/http%3A%2F%2Fw1%3A8001", json={"is_dead": False})
    assert code == 200
    assert paths(w1) == [SLEEP]
    assert state_of(h, "http://w1:8001")["state"] == "sleeping"


def test_managed_worker_coming_up_in_a_sleeping_fleet_sleeps() -> None:
    h, _ = make(1)
    h.json("POST", "/release_memory_occupation", json={})
    url, managed = h.fleet.add("managed")
    d = Deferred.fromCoroutine(h.parts.fleet.worker_ready(url))
    h.pump()
    success_result_of(d)
    assert paths(managed) == [SLEEP]
    assert state_of(h, url)["is_sleeping"]
    assert generate(h)[0] == 503


def test_a_joiner_let_in_after_a_wake_is_caught_up_before_a_waiting_request_reaches_it() -> None:
    """
    The fleet was refitted, then put to sleep. A worker joins while a wake
    runs (so it is joining, not routable) and a generation waits for it. The
    wake wakes nobody (the only other worker never answers and is
    quarantined), so the joiner is let in as an ordinary join, behind the
    fleet's weights: the waiting generation may reach it only after its
    catch-up, never in the moment between its join ending and its catch-up
    beginning.
    """
    h, (w0,) = make(1, timeout=1000.0, weight_update_timeout=10.0)
    assert h.json("POST", "/update_weights_from_disk", json={"model_path": "/ckpt/1"})[0] == 200
    assert h.json("POST", "/release_memory_occupation", json={})[0] == 200
    w0.hold(b"POST", WAKE)
    waking = h.client.post("http://router/resume_memory_occupation", json={})
    h.pump()
    url, late = join(h)
    assert state_of(h, url)["state"] == "joining"
    waiting = h.client.post("http://router/v1/diffusion/generate", json={"prompt": "x"})
    h.pump()
    assert_no_result(waiting)
    h.clock.advance(10)  # w0 never answers its wake: quarantined, and the wake is over
    h.pump()
    assert success_result_of(waking).code == 200
    assert h.pool.workers()[0].is_dead
    response = success_result_of(waiting)
    assert response.code == 200
    assert paths(late) == [REFIT, b"/v1/diffusion/generate"], "served before its catch-up"
    assert response.headers.getRawHeaders(b"x-weight-version") == [b"1"]
