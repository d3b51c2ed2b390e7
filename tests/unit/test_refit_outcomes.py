"""
Per-worker outcomes of refit, sleep, wake and catch-up: one hung worker holds
up nobody but itself, and a worker still starting is skipped by broadcasts
and caught up when it first answers (issue 9, defects 2 and 3).
"""

from __future__ import annotations

import json

from tests.support.control import A, B, C, Fleet, make_fleet
from tests.support.deferreds import assert_no_result, success_result_of
from tests.support.fleet import make_router
from twisted_router.app import parse_refit
from twisted_router.pool import Activity

OK = (200, {"success": True})


def _admitted(*urls: str, sleeping: tuple[str, ...] = ()) -> Fleet:
    """A fleet whose workers hold the start-up weights (version 0), as after registration."""
    fleet = make_fleet(*urls)
    for worker in fleet.pool.workers():
        fleet.control.admit(worker)
    for url in sleeping:  # put to sleep after joining (a worker joining a sleeping fleet joins asleep)
        fleet.pool.set_sleeping(fleet.worker(url), True)
    return fleet


def test_a_worker_that_finished_its_refit_serves_while_another_still_updates() -> None:
    fleet = _admitted(A, B)
    d = fleet.run(fleet.control.update_weights(parse_refit(b'{"model_path": "/m", "weight_version": "v1"}')))
    waiting = fleet.control.changed.wait(600)
    [call] = fleet.caller.calls
    assert [w.state for w in fleet.pool.workers()] == ["updating", "updating"]

    call.answer_one(A, OK)
    assert success_result_of(waiting) is True  # waiting requests are woken at once
    assert [w.url for w in fleet.pool.routable()] == [A]
    assert fleet.worker(A).weight_version == "v1"
    assert fleet.control.version == "v1"  # the fleet's version is the newest any worker applied
    assert fleet.worker(B).state == "updating"  # still holding the old weights: not routable
    assert_no_result(d)

    call.answer("timed out after 7s")  # B never answers within --weight-update-timeout
    outcome = success_result_of(d)
    assert outcome.status == 502
    assert [(r["worker_url"], r["success"]) for r in outcome.body["results"]] == [(A, True), (B, False)]
    assert fleet.worker(B).is_dead and "timed out" in (fleet.worker(B).dead_reason or "")
    assert fleet.worker(B).weight_version is None and fleet.worker(B).model_path is None


def test_a_worker_that_refused_serves_the_old_weights_until_the_fleet_moves_on() -> None:
    fleet = _admitted(A, B, C)
    d = fleet.run(fleet.control.update_weights(parse_refit(b'{"model_path": "/m"}')))
    [call] = fleet.caller.calls
    call.answer_one(A, (400, {"success": False, "message": "rolled back"}))
    # It rolled back to the fleet's weights, and nobody holds newer ones yet.
    assert [w.url for w in fleet.pool.routable()] == [A]
    assert fleet.worker(A).weight_version == "0" and fleet.control.version == "0"

    call.answer_one(B, OK)
    # The fleet is on version 1 now: A's old weights are stale.
    assert fleet.control.version == "1"
    assert fleet.worker(A).is_dead and "rolled back" in (fleet.worker(A).dead_reason or "")
    assert fleet.worker(A).weight_version is None
    assert [w.url for w in fleet.pool.routable()] == [B]
    call.answer(OK)
    assert success_result_of(d).status == 502
    assert [w.url for w in fleet.pool.routable()] == [B, C]


def test_a_refused_refit_and_a_failed_one_leave_the_refuser_on_the_unchanged_fleet() -> None:
    fleet = _admitted(A, B)
    d = fleet.run(fleet.control.update_weights(parse_refit(b'{"model_path": "/m"}')))
    fleet.caller.calls[0].answer((400, {"success": False, "message": "bad path"}), (500, "oom"))
    assert success_result_of(d).status == 502
    assert fleet.control.version == "0"
    assert [w.url for w in fleet.pool.routable()] == [A]
    assert fleet.worker(B).is_dead


def test_a_worker_quarantined_during_its_refit_keeps_unknown_weights_even_if_it_succeeds() -> None:
    fleet = _admitted(A, B)
    d = fleet.run(fleet.control.update_weights(parse_refit(b'{"model_path": "/m"}')))
    fleet.pool.quarantine(fleet.worker(B), "failed 3 consecutive health checks")
    fleet.caller.calls[0].answer(OK, OK)
    assert success_result_of(d).status == 200
    assert fleet.worker(B).is_dead and fleet.worker(B).weight_version is None
    assert fleet.worker(B).weights_seq is None


def test_sleep_applies_each_outcome_as_it_arrives() -> None:
    fleet = _admitted(A, B)
    d = fleet.run(fleet.control.release_memory(b"{}"))
    [call] = fleet.caller.calls
    call.answer_one(A, OK)
    assert fleet.sleeping() == [A]
    assert fleet.worker(B).state == "releasing"
    call.answer("timed out after 7s")
    assert success_result_of(d).status == 200
    assert fleet.worker(B).is_dead


def test_wake_makes_each_worker_routable_as_it_answers() -> None:
    fleet = _admitted(A, B, sleeping=(A, B))
    d = fleet.run(fleet.control.resume_memory(b"{}"))
    waiting = fleet.control.changed.wait(600)
    [call] = fleet.caller.calls
    call.answer_one(B, OK)
    assert success_result_of(waiting) is True
    assert [w.url for w in fleet.pool.routable()] == [B]
    assert fleet.worker(A).activity is Activity.RESUMING and not fleet.worker(A).routable
    call.answer("timed out after 7s")
    outcome = success_result_of(d)
    assert [r["success"] for r in outcome.body["results"]] == [False, True]
    assert fleet.worker(A).is_dead


def test_catch_up_applies_each_outcome_as_it_arrives() -> None:
    fleet = _admitted(A, B, C, sleeping=(B, C))
    d = fleet.run(fleet.control.update_weights(parse_refit(b'{"model_path": "/m"}')))
    fleet.caller.calls[0].all_ok()  # only A: B and C sleep through the refit
    success_result_of(d)
    d = fleet.run(fleet.control.resume_memory(b"{}"))
    fleet.caller.calls[1].all_ok()
    assert success_result_of(d).body["catching_up"] == [B, C]
    [catch_up] = fleet.caller.calls[2:]
    assert catch_up.urls == [B, C] and catch_up.body == b'{"model_path": "/m"}'
    catch_up.answer_one(C, OK)
    assert [w.url for w in fleet.pool.routable()] == [A, C]
    assert fleet.worker(C).weight_version == "1"
    assert fleet.worker(B).state == "syncing"
    catch_up.answer("timed out after 7s")
    assert fleet.worker(B).is_dead and "catch-up" in (fleet.worker(B).dead_reason or "")


# -- workers still starting (defect 3) -----------------------------------------------


def test_refit_skips_a_starting_worker_and_it_is_caught_up_when_it_first_answers() -> None:
    fleet = _admitted(A)
    starting = fleet.pool.add(B)[0]
    fleet.pool.begin(starting, Activity.STARTING)  # registered, never answered (still loading its model)
    d = fleet.run(fleet.control.update_weights(parse_refit(b'{"model_path": "/m", "weight_version": "v1"}')))
    [call] = fleet.caller.calls
    assert call.urls == [A]
    call.all_ok()
    outcome = success_result_of(d)
    assert outcome.status == 200 and outcome.body["success"] is True
    assert starting.activity is Activity.STARTING and not starting.is_dead

    # It answers its first health check: the router brings it up, and it is
    # caught up to the fleet's weights before it gets traffic.
    fleet.pool.end(starting, Activity.STARTING)
    fleet.control.admit(starting)
    assert starting.state == "syncing"
    [catch_up] = fleet.caller.calls[1:]
    assert catch_up.urls == [B] and catch_up.body == b'{"model_path": "/m", "weight_version": "v1"}'
    catch_up.all_ok()
    assert starting.state == "ready" and starting.weight_version == "v1"


def test_sleep_and_wake_skip_a_starting_worker() -> None:
    fleet = _admitted(A)
    starting = fleet.pool.add(B)[0]
    fleet.pool.begin(starting, Activity.STARTING)
    d = fleet.run(fleet.control.release_memory(b"{}"))
    assert fleet.caller.calls[0].urls == [A]
    fleet.caller.calls[0].all_ok()
    assert success_result_of(d).status == 200
    d = fleet.run(fleet.control.resume_memory(b"{}"))
    assert fleet.caller.calls[1].urls == [A]
    fleet.caller.calls[1].all_ok()
    assert success_result_of(d).status == 200
    assert starting.activity is Activity.STARTING and not starting.is_dead and not starting.is_sleeping


def test_a_fleet_of_only_starting_workers_has_no_refit_target() -> None:
    fleet = make_fleet(A)
    fleet.pool.begin(fleet.worker(A), Activity.STARTING)
    outcome = success_result_of(fleet.run(fleet.control.update_weights(parse_refit(b'{"model_path": "/m"}'))))
    assert outcome.status == 503
    assert fleet.caller.calls == []
    assert not fleet.worker(A).is_dead


def test_through_the_router_generations_go_to_the_updated_worker_while_a_hung_one_holds_the_refit() -> None:
    h, (w0, w1) = make_router(2, weight_update_timeout=600)
    w1.hold(b"POST", b"/update_weights_from_disk")  # hung in its reload
    refit = h.client.post("http://router/update_weights_from_disk", json={"model_path": "/m", "weight_version": "v1"})
    h.pump()
    assert_no_result(refit)
    for _ in range(3):
        code, _, response = h.call("POST", "/v1/images/generations", json={"prompt": "x"})
        assert code == 200
        assert response.headers.getRawHeaders(b"x-worker-id") == [b"w0"]
        assert response.headers.getRawHeaders(b"x-weight-version") == [b"v1"]
    _, health = h.json("GET", "/health")
    assert health["weight_version"] == "v1"
    h.clock.advance(600)
    h.pump()
    response = success_result_of(refit)
    assert response.code == 502
    body = json.loads(success_result_of(h.client.content(response)))
    assert [(r["success"], r.get("error")) for r in body["results"]] == [(True, None), (False, "timed out after 600s")]
    hung = h.pool.workers()[1]
    assert hung.is_dead and hung.weight_version is None


def test_a_worker_hung_in_a_refit_hands_its_unanswered_generations_to_another_worker() -> None:
    h, (w0, w1) = make_router(2, routing_algorithm="round-robin", weight_update_timeout=60, timeout=600)
    w0.hold(b"POST", b"/v1/images/generations")
    stuck = h.client.post("http://router/v1/images/generations", json={"prompt": "x"})  # to w0, which hangs
    h.pump()
    assert len(w0.held) == 1
    w0.hold(b"POST", b"/update_weights_from_disk")
    refit = h.client.post("http://router/update_weights_from_disk", json={"model_path": "/m"})
    h.pump()
    h.clock.advance(60)  # w0 never answers the refit: quarantined, as not answering
    h.pump()
    assert h.pool.workers()[0].is_dead
    assert success_result_of(refit).code == 502
    # The generation it held without answering was retried on w1 at once, not after its 600 s.
    response = success_result_of(stuck)
    assert response.code == 200
    assert response.headers.getRawHeaders(b"x-worker-id") == [b"w1"]
