"""
Tests for L{twisted_router.control}: fleet broadcasts against a real
L{WorkerPool} and a fake caller whose fan-out the test answers by hand.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import CancelledError
from twisted.logger import LogLevel, capturedLogs, formatEvent

from tests.support.control import TIMEOUT, A, Answer, B, C, D, make_fleet
from tests.support.deferreds import assert_no_result, failure_result_of, success_result_of
from twisted_router.app import parse_refit

# -- update_weights ----------------------------------------------------------------


def test_update_targets_only_live_awake_workers_with_the_body_unchanged() -> None:
    fleet = make_fleet(A, B, C, D, dead=(B,), sleeping=(C,))
    body = b'{"model_path": "/ckpt/step-10", "flush_cache": true}'
    d = fleet.run(fleet.control.update_weights(parse_refit(body)))
    [call] = fleet.caller.calls
    assert call.urls == [A, D]
    assert call.method == "POST"
    assert call.path == "/update_weights_from_disk"
    assert call.body == body
    assert call.timeout == TIMEOUT
    assert_no_result(d)


def test_update_answers_200_when_all_succeed() -> None:
    fleet = make_fleet(A, B)
    d = fleet.run(fleet.control.update_weights(parse_refit(b'{"model_path": "/m"}')))
    fleet.caller.calls[0].answer((200, {"success": True, "message": "ok"}), (200, {"success": True}))
    outcome = success_result_of(d)
    assert outcome.status == 200
    assert outcome.body == {
        "success": True,
        "weight_version": "1",
        "results": [
            {"worker_url": A, "status_code": 200, "body": {"success": True, "message": "ok"}, "success": True},
            {"worker_url": B, "status_code": 200, "body": {"success": True}, "success": True},
        ],
    }


@pytest.mark.parametrize(
    "bad",
    [(500, {"error": "oom"}), (200, {"success": False, "message": "bad path"}), "connection refused"],
)
def test_update_answers_502_when_any_fails_with_per_worker_results(bad: tuple[int, Any] | str) -> None:
    fleet = make_fleet(A, B, C)
    for worker in fleet.pool.workers():
        fleet.control.admit(worker)  # on the start-up weights, so clearing them below is observable
    assert fleet.worker(B).weight_version == "0" and fleet.worker(B).weights_seq == 0
    d = fleet.run(fleet.control.update_weights(parse_refit(b'{"model_path": "/m"}')))
    with capturedLogs() as events:
        fleet.caller.calls[0].answer((200, {"success": True}), bad, (200, {"success": True}))
    outcome = success_result_of(d)
    assert outcome.status == 502
    assert outcome.body["success"] is False
    results = outcome.body["results"]
    assert [r["worker_url"] for r in results] == [A, B, C]
    assert [r["success"] for r in results] == [True, False, True]
    if isinstance(bad, str):
        assert results[1]["error"] == bad
        assert results[1]["status_code"] is None
    else:
        assert results[1]["status_code"] == bad[0]
        assert results[1]["body"] == bad[1]
    warnings = [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn]
    assert len(warnings) == 1
    assert "10.0.0.2:30000 quarantined: weight update to version 1 failed" in warnings[0]
    # The worker that failed holds unknown weights: never left routable.
    assert fleet.worker(B).is_dead and fleet.worker(B).weight_version is None
    assert fleet.worker(B).weights_seq is None
    assert fleet.worker(A).weight_version == "1" and fleet.worker(C).weight_version == "1"
    assert [w.url for w in fleet.pool.routable()] == [A, C]


def test_update_does_not_change_sleep_state() -> None:
    fleet = make_fleet(A, B, C, sleeping=(B,))
    d = fleet.run(fleet.control.update_weights(parse_refit(b'{"model_path": "/m"}')))
    fleet.caller.calls[0].all_ok()
    success_result_of(d)
    assert fleet.sleeping() == [B]  # the sleeper stays asleep (it is caught up when woken) ...
    assert [w.url for w in fleet.pool.routable()] == [A, C]  # ... and the updated ones stay awake


def test_update_with_an_empty_pool_is_503_no_workers_registered() -> None:
    fleet = make_fleet()
    outcome = success_result_of(fleet.run(fleet.control.update_weights(parse_refit(b'{"model_path": "/m"}'))))
    assert outcome == Answer(
        503, {"error": "No healthy workers available in the pool for a weight update: no workers registered"}
    )
    assert fleet.caller.calls == []


def test_update_with_only_dead_workers_is_503_no_eligible_workers() -> None:
    fleet = make_fleet(A, B, dead=(A, B))
    outcome = success_result_of(fleet.run(fleet.control.update_weights(parse_refit(b'{"model_path": "/m"}'))))
    assert outcome.status == 503
    assert outcome.body["error"].startswith("No healthy workers available in the pool")
    assert "2 registered, 2 dead, 0 sleeping" in outcome.body["error"]
    assert fleet.caller.calls == []


def test_update_with_only_sleeping_workers_is_503() -> None:
    fleet = make_fleet(A, B, sleeping=(A, B))
    outcome = success_result_of(fleet.run(fleet.control.update_weights(parse_refit(b'{"model_path": "/m"}'))))
    assert outcome.status == 503
    assert outcome.body["error"].startswith("No healthy workers available in the pool for a weight update")
    assert "2 sleeping" in outcome.body["error"]
    assert fleet.caller.calls == []


# -- release_memory ----------------------------------------------------------------


def test_release_targets_live_awake_workers() -> None:
    fleet = make_fleet(A, B, C, D, dead=(B,), sleeping=(C,))
    fleet.run(fleet.control.release_memory(b'{"tags": null}'))
    [call] = fleet.caller.calls
    assert (call.urls, call.method, call.path, call.body, call.timeout) == (
        [A, D],
        "POST",
        "/release_memory_occupation",
        b'{"tags": null}',
        TIMEOUT,
    )


def test_release_marks_only_the_successful_workers_sleeping() -> None:
    fleet = make_fleet(A, B, C)
    d = fleet.run(fleet.control.release_memory(b"{}"))
    assert fleet.sleeping() == []  # nothing changes before the workers answered
    with capturedLogs():
        fleet.caller.calls[0].answer((200, {"success": True}), "timed out after 7s", (200, {"success": False}))
    outcome = success_result_of(d)
    assert fleet.sleeping() == [A]
    # A partly failed sleep still answers 200: each worker's own state is exact.
    assert outcome.status == 200
    assert outcome.body["success"] is False
    assert [r["success"] for r in outcome.body["results"]] == [True, False, False]
    # B did not answer: its memory state is unknown, so it is quarantined; C refused and stays awake.
    assert fleet.worker(B).is_dead
    assert [w.url for w in fleet.pool.routable()] == [C]


def test_release_all_ok() -> None:
    fleet = make_fleet(A, B)
    d = fleet.run(fleet.control.release_memory(b"{}"))
    fleet.caller.calls[0].all_ok()
    outcome = success_result_of(d)
    assert outcome.status == 200
    assert outcome.body["success"] is True
    assert fleet.sleeping() == [A, B]
    assert fleet.pool.routable() == []


def test_release_when_all_live_workers_are_sleeping() -> None:
    fleet = make_fleet(A, B, C, dead=(C,), sleeping=(A, B))
    outcome = success_result_of(fleet.run(fleet.control.release_memory(b"{}")))
    assert outcome == Answer(
        200, {"success": True, "results": [], "message": "all workers are already sleeping"}
    )
    assert fleet.caller.calls == []


def test_release_with_an_empty_pool() -> None:
    fleet = make_fleet()
    outcome = success_result_of(fleet.run(fleet.control.release_memory(b"{}")))
    assert outcome == Answer(
        503,
        {"error": "No healthy workers available in the pool for release_memory_occupation: no workers registered"},
    )


def test_release_with_only_dead_workers() -> None:
    fleet = make_fleet(A, dead=(A,))
    outcome = success_result_of(fleet.run(fleet.control.release_memory(b"{}")))
    assert outcome.status == 503
    assert outcome.body["error"].startswith("No healthy workers available in the pool for release_memory_occupation")
    assert fleet.caller.calls == []


def test_release_of_a_worker_removed_meanwhile_does_not_re_register_it() -> None:
    fleet = make_fleet(A, B)
    d = fleet.run(fleet.control.release_memory(b"{}"))
    fleet.pool.remove(B)
    fleet.caller.calls[0].all_ok()
    assert success_result_of(d).status == 200
    assert [w.url for w in fleet.pool.workers()] == [A]
    assert fleet.sleeping() == [A]


# -- resume_memory -----------------------------------------------------------------


def test_resume_targets_live_sleeping_workers() -> None:
    fleet = make_fleet(A, B, C, D, dead=(B,), sleeping=(B, C, D))
    fleet.run(fleet.control.resume_memory(b"{}"))
    [call] = fleet.caller.calls
    assert call.urls == [C, D]
    assert call.path == "/resume_memory_occupation"
    assert call.method == "POST"


def test_resume_wakes_only_the_successful_workers() -> None:
    fleet = make_fleet(A, B, C, sleeping=(A, B, C))
    d = fleet.run(fleet.control.resume_memory(b"{}"))
    with capturedLogs():
        fleet.caller.calls[0].answer((200, {"success": True}), (503, "busy"), (200, {"success": True}))
    outcome = success_result_of(d)
    assert fleet.sleeping() == [B]
    assert [w.url for w in fleet.pool.routable()] == [A, C]
    assert outcome.status == 200
    assert outcome.body["success"] is False
    assert outcome.body["results"][1] == {
        "worker_url": B,
        "status_code": 503,
        "body": "busy",
        "success": False,
    }


def test_resume_when_all_live_workers_are_awake() -> None:
    fleet = make_fleet(A, B, dead=(B,))
    outcome = success_result_of(fleet.run(fleet.control.resume_memory(b"{}")))
    assert outcome == Answer(
        200, {"success": True, "results": [], "message": "all workers are already awake"}
    )
    assert fleet.caller.calls == []


def test_resume_with_an_empty_pool() -> None:
    fleet = make_fleet()
    outcome = success_result_of(fleet.run(fleet.control.resume_memory(b"{}")))
    assert outcome == Answer(
        503,
        {"error": "No healthy workers available in the pool for resume_memory_occupation: no workers registered"},
    )


def test_resume_does_not_wake_dead_sleeping_workers() -> None:
    fleet = make_fleet(A, dead=(A,), sleeping=(A,))
    outcome = success_result_of(fleet.run(fleet.control.resume_memory(b"{}")))
    assert outcome.status == 503
    assert outcome.body["error"].startswith("No healthy workers available in the pool for resume_memory_occupation")
    assert "1 registered, 1 dead, 1 sleeping" in outcome.body["error"]
    assert fleet.sleeping() == [A]


# -- serialisation -----------------------------------------------------------------


def test_control_calls_are_serialised_in_arrival_order() -> None:
    fleet = make_fleet(A, B)
    first = fleet.run(fleet.control.update_weights(parse_refit(b'{"model_path": "/m", "step": 1}')))
    second = fleet.run(fleet.control.update_weights(parse_refit(b'{"model_path": "/m", "step": 2}')))
    release = fleet.run(fleet.control.release_memory(b"{}"))
    # Only the first broadcast is on the wire.
    assert [c.body for c in fleet.caller.calls] == [b'{"model_path": "/m", "step": 1}']
    assert_no_result(second)
    assert_no_result(release)

    fleet.caller.calls[0].all_ok()
    assert success_result_of(first).status == 200
    assert [c.body for c in fleet.caller.calls] == [b'{"model_path": "/m", "step": 1}', b'{"model_path": "/m", "step": 2}']
    assert_no_result(release)

    fleet.caller.calls[1].all_ok()
    assert success_result_of(second).status == 200
    assert [c.path for c in fleet.caller.calls] == [
        "/update_weights_from_disk",
        "/update_weights_from_disk",
        "/release_memory_occupation",
    ]
    fleet.caller.calls[2].all_ok()
    assert success_result_of(release).status == 200
    assert fleet.sleeping() == [A, B]


def test_queued_call_sees_the_state_left_by_the_previous_one() -> None:
    """A wake queued behind a sleep targets the workers the sleep put to sleep."""
    fleet = make_fleet(A, B)
    release = fleet.run(fleet.control.release_memory(b"{}"))
    resume = fleet.run(fleet.control.resume_memory(b"{}"))
    assert len(fleet.caller.calls) == 1
    with capturedLogs():
        fleet.caller.calls[0].answer((200, {"success": True}), "connection refused")
    success_result_of(release)
    [_, wake] = fleet.caller.calls
    assert wake.urls == [A]
    wake.all_ok()
    assert success_result_of(resume).body["success"] is True
    assert fleet.sleeping() == []


def test_a_failing_broadcast_releases_the_lock() -> None:
    fleet = make_fleet(A)
    first = fleet.run(fleet.control.update_weights(parse_refit(b'{"model_path": "/m", "step": 1}')))
    second = fleet.run(fleet.control.update_weights(parse_refit(b'{"model_path": "/m", "step": 2}')))
    fleet.caller.calls[0].deferred.errback(RuntimeError("caller bug"))
    failure_result_of(first, RuntimeError)
    assert [c.body for c in fleet.caller.calls] == [b'{"model_path": "/m", "step": 1}', b'{"model_path": "/m", "step": 2}']
    fleet.caller.calls[1].all_ok()
    assert success_result_of(second).status == 200


def test_cancelling_a_call_in_flight_releases_the_lock() -> None:
    fleet = make_fleet(A)
    first = fleet.run(fleet.control.update_weights(parse_refit(b'{"model_path": "/m", "step": 1}')))
    second = fleet.run(fleet.control.update_weights(parse_refit(b'{"model_path": "/m", "step": 2}')))
    first.cancel()
    failure_result_of(first, CancelledError)
    assert [c.body for c in fleet.caller.calls] == [b'{"model_path": "/m", "step": 1}', b'{"model_path": "/m", "step": 2}']
    fleet.caller.calls[1].all_ok()
    assert success_result_of(second).status == 200


def test_cancelling_a_queued_call_skips_it() -> None:
    fleet = make_fleet(A)
    first = fleet.run(fleet.control.update_weights(parse_refit(b'{"model_path": "/m", "step": 1}')))
    queued = fleet.run(fleet.control.update_weights(parse_refit(b'{"model_path": "/m", "step": 2}')))
    third = fleet.run(fleet.control.update_weights(parse_refit(b'{"model_path": "/m", "step": 3}')))
    queued.cancel()
    failure_result_of(queued, CancelledError)
    fleet.caller.calls[0].all_ok()
    success_result_of(first)
    assert [c.body for c in fleet.caller.calls] == [b'{"model_path": "/m", "step": 1}', b'{"model_path": "/m", "step": 3}']
    fleet.caller.calls[1].all_ok()
    assert success_result_of(third).status == 200


def test_early_answers_do_not_hold_the_lock() -> None:
    """An answer that needs no broadcast (empty pool) lets the next call through at once."""
    fleet = make_fleet()
    success_result_of(fleet.run(fleet.control.update_weights(parse_refit(b'{"model_path": "/m"}'))))
    fleet.pool.add(A)
    d = fleet.run(fleet.control.update_weights(parse_refit(b'{"model_path": "/m"}')))
    assert len(fleet.caller.calls) == 1
    fleet.caller.calls[0].all_ok()
    assert success_result_of(d).status == 200
