"""The simulated GPU queue: one job at a time, arrival order, exact times on a fake clock."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock

from tests.support.deferreds import assert_no_result, failure_result_of, success_result_of
from twisted_router.simulator.queue import GpuQueue, Work


def _job(log: list[tuple[str, str, float]], clock: Clock, name: str, seconds: float) -> Any:
    def start() -> Work[str]:
        log.append(("start", name, clock.seconds()))

        def finish() -> str:
            log.append(("end", name, clock.seconds()))
            return name

        return Work(seconds, finish)

    return start


def test_jobs_run_one_at_a_time_in_arrival_order() -> None:
    clock = Clock()
    queue = GpuQueue(clock)
    log: list[tuple[str, str, float]] = []
    ds = [queue.submit(_job(log, clock, name, s)) for name, s in (("a", 2.0), ("b", 1.0), ("c", 3.0))]
    assert queue.depth == 3
    assert queue.running is not None
    clock.advance(2.0)
    assert success_result_of(ds[0]) == "a"
    assert_no_result(ds[1])
    clock.advance(1.0)
    assert success_result_of(ds[1]) == "b"
    assert_no_result(ds[2])
    clock.advance(3.0)
    assert success_result_of(ds[2]) == "c"
    assert log == [
        ("start", "a", 0.0), ("end", "a", 2.0),
        ("start", "b", 2.0), ("end", "b", 3.0),
        ("start", "c", 3.0), ("end", "c", 6.0),
    ]
    assert queue.depth == 0 and queue.running is None
    assert queue.completed == 3


def test_latency_grows_linearly_with_queue_depth() -> None:
    clock = Clock()
    queue = GpuQueue(clock)
    done: list[float] = []
    for _ in range(5):
        queue.submit(lambda: Work(0.5, lambda: None)).addCallback(lambda _: done.append(clock.seconds()))
    clock.pump([0.5] * 5)
    assert done == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.5])


def test_zero_time_jobs_complete_at_once_but_still_wait_their_turn() -> None:
    clock = Clock()
    queue = GpuQueue(clock)
    log: list[tuple[str, str, float]] = []
    slow = queue.submit(_job(log, clock, "slow", 1.0))
    instant = queue.submit(_job(log, clock, "instant", 0.0))
    assert_no_result(instant)  # behind the slow job
    clock.advance(1.0)
    assert success_result_of(slow) == "slow"
    assert success_result_of(instant) == "instant"
    alone = queue.submit(_job(log, clock, "alone", 0.0))
    assert success_result_of(alone) == "alone"  # idle queue: synchronous


def test_start_sees_state_at_its_turn_not_at_submission() -> None:
    clock = Clock()
    queue = GpuQueue(clock)
    state = {"sleeping": False}

    def generation() -> Work[str]:
        if state["sleeping"]:
            raise RuntimeError("sleeping")
        return Work(1.0, lambda: "ok")

    def sleep() -> Work[None]:
        return Work(0.0, lambda: state.update(sleeping=True))

    first = queue.submit(generation)
    queue.submit(sleep)
    second = queue.submit(generation)
    clock.advance(1.0)
    assert success_result_of(first) == "ok"
    failure_result_of(second, RuntimeError)


def test_failures_propagate_and_the_queue_continues() -> None:
    clock = Clock()
    queue = GpuQueue(clock)

    def boom() -> str:
        raise ValueError("bad weights")

    bad_start = queue.submit(lambda: (_ for _ in ()).throw(KeyError("x")))
    bad_finish = queue.submit(lambda: Work(1.0, boom))
    good = queue.submit(lambda: Work(1.0, lambda: "fine"))
    failure_result_of(bad_start, KeyError)
    clock.advance(1.0)
    failure_result_of(bad_finish, ValueError)
    clock.advance(1.0)
    assert success_result_of(good) == "fine"


def test_cancelling_a_job_drops_the_answer_but_the_gpu_still_does_the_work() -> None:
    clock = Clock()
    queue = GpuQueue(clock)
    ran: list[str] = []
    first = queue.submit(lambda: Work(1.0, lambda: ran.append("first")))
    second = queue.submit(lambda: Work(1.0, lambda: ran.append("second")))
    second.cancel()
    failure_result_of(second, CancelledError)
    assert queue.depth == 2
    clock.advance(1.0)
    success_result_of(first)
    clock.advance(1.0)
    assert ran == ["first", "second"]
    assert queue.depth == 0


def test_callbacks_may_submit_more_jobs() -> None:
    clock = Clock()
    queue = GpuQueue(clock)
    order: list[str] = []

    def chain(_: object) -> None:
        order.append("a")
        queue.submit(lambda: Work(0.0, lambda: order.append("c")))

    queue.submit(lambda: Work(1.0, lambda: None))
    queue.submit(lambda: Work(0.0, lambda: None)).addCallback(chain)
    queue.submit(lambda: Work(0.0, lambda: order.append("b")))
    clock.advance(1.0)
    assert order == ["a", "b", "c"]  # "c" arrived last, while the queue was draining


def test_many_instant_jobs_do_not_recurse() -> None:
    clock = Clock()
    queue = GpuQueue(clock)
    blocker = queue.submit(lambda: Work(1.0, lambda: None))
    ds = [queue.submit(lambda: Work(0.0, lambda: 1)) for _ in range(5000)]
    clock.advance(1.0)
    success_result_of(blocker)
    assert all(success_result_of(d) == 1 for d in ds)
