"""
Tests for L{twisted_router.health}: the prober and capability discovery.

Everything runs in memory: C{task.Clock} for time and C{StubTreq} over a fake
resource that plays several workers at once, told apart by the C{Host} header.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogEvent, capturedLogs, formatEvent
from twisted.python.failure import Failure

from tests.support.deferreds import assert_no_result, success_result_of
from tests.support.network import Behaviour, ProbedWorkers, RefusingClient, model_card
from twisted_router.health import HealthChecker, refresh_capabilities
from twisted_router.pool import Worker, WorkerPool

INTERVAL = 10.0
TIMEOUT = 5.0


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def pool(clock: Clock) -> WorkerPool:
    return WorkerPool(now=clock.seconds)


@pytest.fixture
def workers() -> ProbedWorkers:
    return ProbedWorkers()


@pytest.fixture
def stub(workers: ProbedWorkers) -> StubTreq:
    return StubTreq(workers)


@pytest.fixture
def net(stub: StubTreq) -> RefusingClient:
    return RefusingClient(stub)


@pytest.fixture
def quarantined() -> list[tuple[Worker, str]]:
    return []


@pytest.fixture
def make_checker(
    pool: WorkerPool, net: RefusingClient, clock: Clock, quarantined: list[tuple[Worker, str]]
) -> Iterator[Callable[..., HealthChecker]]:
    made: list[HealthChecker] = []

    def make(**kwargs: Any) -> HealthChecker:
        options: dict[str, Any] = {
            "interval": INTERVAL,
            "failure_threshold": 3,
            "probe_timeout": TIMEOUT,
            # One probe per round, so these tests can count rounds; suspect
            # probing between rounds is tested in test_suspect.py.
            "suspect_interval": INTERVAL,
            "on_quarantine": lambda w, r: quarantined.append((w, r)),
        }
        options.update(kwargs)
        checker = HealthChecker(pool, net, clock, **options)  # type: ignore[arg-type]
        made.append(checker)
        return checker

    yield make
    for checker in made:
        if checker.running:
            checker.stopService()
    assert not clock.getDelayedCalls(), "a timer leaked"


def messages(events: list[LogEvent] | Any) -> list[str]:
    return [formatEvent(e) for e in events]


# -- the loop ----------------------------------------------------------------


def test_probes_routable_workers_at_start_and_every_interval(
    pool: WorkerPool, workers: ProbedWorkers, clock: Clock, make_checker: Callable[..., HealthChecker]
) -> None:
    a, _ = pool.add("http://a:1")
    b, _ = pool.add("http://b:1")
    c, _ = pool.add("http://c:1")
    pool.quarantine(b, "operator")
    pool.set_sleeping(c, True)
    checker = make_checker()
    checker.startService()
    assert workers.hits("a:1") == 1
    assert workers.hits("b:1") == 0 and workers.hits("c:1") == 0
    assert a.last_probe_ok_at == 0.0
    clock.advance(INTERVAL)
    assert workers.hits("a:1") == 2
    assert a.last_probe_ok_at == INTERVAL
    clock.advance(INTERVAL)
    assert workers.hits("a:1") == 3
    assert workers.hits("b:1") == 0 and workers.hits("c:1") == 0
    assert not b.routable and b.is_dead and c.is_sleeping


def test_quarantine_after_exactly_threshold_failures(
    pool: WorkerPool,
    workers: ProbedWorkers,
    clock: Clock,
    make_checker: Callable[..., HealthChecker],
    quarantined: list[tuple[Worker, str]],
) -> None:
    bad, _ = pool.add("http://bad:1")
    good, _ = pool.add("http://good:1")
    workers.health["bad:1"] = 503
    checker = make_checker(failure_threshold=3)
    with capturedLogs() as events:
        checker.startService()
        assert bad.consecutive_failures == 1 and not bad.is_dead
        clock.advance(INTERVAL)
        assert bad.consecutive_failures == 2 and not bad.is_dead
        assert quarantined == []
        clock.advance(INTERVAL)
    assert bad.is_dead and bad.consecutive_failures == 3
    assert bad.last_error == "HTTP 503"
    assert bad.dead_reason is not None and "HTTP 503" in bad.dead_reason
    assert quarantined == [(bad, "HTTP 503")]
    assert pool.routable() == [good]
    assert good.consecutive_failures == 0
    text = messages(events)
    assert text.count("worker http://bad:1 quarantined after 3 failed health checks: HTTP 503") == 1

    # Dead workers are no longer probed, and never re-admitted by the checker,
    # even once they answer again.
    workers.health["bad:1"] = b"{}"
    probes = workers.hits("bad:1")
    clock.advance(INTERVAL * 5)
    assert workers.hits("bad:1") == probes == 3
    assert bad.is_dead
    assert quarantined == [(bad, "HTTP 503")]


def test_threshold_of_one(
    pool: WorkerPool, net: RefusingClient, make_checker: Callable[..., HealthChecker]
) -> None:
    w, _ = pool.add("http://a:1")
    net.refused.add("a:1")
    make_checker(failure_threshold=1).startService()
    assert w.is_dead and w.last_error == "connection refused"


def test_success_resets_the_count(
    pool: WorkerPool, workers: ProbedWorkers, clock: Clock, make_checker: Callable[..., HealthChecker]
) -> None:
    w, _ = pool.add("http://a:1")
    workers.health["a:1"] = 500
    make_checker(failure_threshold=3).startService()
    clock.advance(INTERVAL)
    assert w.consecutive_failures == 2
    workers.health["a:1"] = b'{"status":"ok"}'
    with capturedLogs() as events:
        clock.advance(INTERVAL)
    assert w.consecutive_failures == 0 and not w.is_dead
    assert any("passed its health check again" in m for m in messages(events))
    workers.health["a:1"] = 500
    clock.advance(INTERVAL)
    clock.advance(INTERVAL)
    assert w.consecutive_failures == 2 and not w.is_dead


def test_non_200_success_codes_count_as_failures(
    pool: WorkerPool, workers: ProbedWorkers, make_checker: Callable[..., HealthChecker]
) -> None:
    w, _ = pool.add("http://a:1")
    workers.health["a:1"] = 204
    make_checker().startService()
    assert w.consecutive_failures == 1 and w.last_error == "HTTP 204"


def test_connection_refused_reason(
    pool: WorkerPool, net: RefusingClient, make_checker: Callable[..., HealthChecker]
) -> None:
    w, _ = pool.add("http://a:1")
    net.refused.add("a:1")
    make_checker().startService()
    assert w.consecutive_failures == 1
    assert w.last_error == "connection refused"


def test_probe_that_never_answers_times_out(
    pool: WorkerPool,
    workers: ProbedWorkers,
    stub: StubTreq,
    clock: Clock,
    make_checker: Callable[..., HealthChecker],
) -> None:
    slow, _ = pool.add("http://slow:1")
    fast, _ = pool.add("http://fast:1")
    workers.health["slow:1"] = "hang"
    checker = make_checker()
    round_done = checker.check_all()
    assert_no_result(round_done)
    # The fast worker's result does not wait for the slow one.
    assert fast.last_probe_ok_at == 0.0
    assert slow.consecutive_failures == 0
    clock.advance(TIMEOUT - 0.1)
    stub.flush()
    assert_no_result(round_done)
    assert workers.ended == []
    clock.advance(0.1)
    assert success_result_of(round_done) is None
    assert slow.consecutive_failures == 1
    assert slow.last_error == f"timed out after {TIMEOUT:g}s"
    # The abandoned request's connection was closed, not left open.
    stub.flush()
    assert len(workers.ended) == 1 and isinstance(workers.ended[0], Failure)


def test_hung_probe_delays_but_does_not_stop_the_loop(
    pool: WorkerPool,
    workers: ProbedWorkers,
    clock: Clock,
    make_checker: Callable[..., HealthChecker],
    quarantined: list[tuple[Worker, str]],
) -> None:
    w, _ = pool.add("http://slow:1")
    workers.health["slow:1"] = "hang"
    make_checker(failure_threshold=2).startService()
    clock.advance(TIMEOUT)
    assert w.consecutive_failures == 1
    clock.advance(INTERVAL - TIMEOUT)
    assert workers.hits("slow:1") == 2
    clock.advance(TIMEOUT)
    assert w.is_dead
    assert quarantined == [(w, f"timed out after {TIMEOUT:g}s")]


def test_trickling_body_times_out_and_is_aborted(
    pool: WorkerPool,
    workers: ProbedWorkers,
    stub: StubTreq,
    clock: Clock,
    make_checker: Callable[..., HealthChecker],
) -> None:
    w, _ = pool.add("http://a:1")
    workers.health["a:1"] = "trickle"
    d = make_checker().check_all()
    stub.flush()
    assert_no_result(d)
    assert workers.ended == []
    clock.advance(TIMEOUT)
    success_result_of(d)
    assert w.last_error == f"timed out after {TIMEOUT:g}s"
    stub.flush()
    assert len(workers.ended) == 1 and isinstance(workers.ended[0], Failure)


def test_a_health_body_over_64_kib_fails_the_probe(
    pool: WorkerPool,
    workers: ProbedWorkers,
    stub: StubTreq,
    make_checker: Callable[..., HealthChecker],
) -> None:
    """The health checker reads /health as the launcher does: at most 64 KiB."""
    w, _ = pool.add("http://a:1")
    workers.health["a:1"] = b"x" * (64 * 1024 + 1)
    d = make_checker().check_all()
    stub.flush()
    success_result_of(d)
    assert w.last_error == f"BodyTooLarge: body larger than {64 * 1024} bytes"
    assert w.consecutive_failures == 1


def test_a_health_body_of_64_kib_passes(
    pool: WorkerPool,
    workers: ProbedWorkers,
    stub: StubTreq,
    make_checker: Callable[..., HealthChecker],
) -> None:
    w, _ = pool.add("http://a:1")
    workers.health["a:1"] = b"x" * (64 * 1024)
    d = make_checker().check_all()
    stub.flush()
    success_result_of(d)
    assert workers.hits("a:1") == 1
    assert (w.consecutive_failures, w.last_error) == (0, None)


def test_exception_in_one_probe_does_not_stop_the_loop(
    pool: WorkerPool,
    workers: ProbedWorkers,
    net: RefusingClient,
    clock: Clock,
    make_checker: Callable[..., HealthChecker],
) -> None:
    broken, _ = pool.add("http://broken:1")
    fine, _ = pool.add("http://fine:1")
    net.broken.add("broken:1")
    checker = make_checker(failure_threshold=10)
    checker.startService()
    assert broken.consecutive_failures == 1
    assert broken.last_error is not None and "client exploded" in broken.last_error
    assert fine.last_probe_ok_at == 0.0
    clock.advance(INTERVAL)
    assert broken.consecutive_failures == 2
    assert workers.hits("fine:1") == 2
    net.broken.clear()
    clock.advance(INTERVAL)
    assert broken.consecutive_failures == 0


def test_bug_in_bookkeeping_is_logged_and_the_loop_survives(
    pool: WorkerPool,
    workers: ProbedWorkers,
    clock: Clock,
    make_checker: Callable[..., HealthChecker],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pool.add("http://a:1")

    def explode(worker: Worker) -> None:
        raise ZeroDivisionError("bug")

    monkeypatch.setattr(pool, "record_probe_success", explode)
    with capturedLogs() as events:
        make_checker().startService()
        clock.advance(INTERVAL)
    assert workers.hits("a:1") == 2
    failures = [e for e in events if "log_failure" in e]
    assert len(failures) == 2
    assert all(e["log_failure"].check(ZeroDivisionError) for e in failures)
    assert "health check of worker http://a:1 failed" in formatEvent(failures[0])


def test_failing_quarantine_hook_is_logged_and_the_loop_survives(
    pool: WorkerPool,
    workers: ProbedWorkers,
    clock: Clock,
    make_checker: Callable[..., HealthChecker],
) -> None:
    bad, _ = pool.add("http://bad:1")
    pool.add("http://good:1")
    workers.health["bad:1"] = 502

    def hook(worker: Worker, reason: str) -> None:
        raise RuntimeError("hook bug")

    with capturedLogs() as events:
        make_checker(failure_threshold=1, on_quarantine=hook).startService()
    assert bad.is_dead
    assert any("log_failure" in e for e in events)
    clock.advance(INTERVAL)
    assert workers.hits("good:1") == 2


def test_a_round_never_fails_even_if_the_pool_does() -> None:
    class BrokenPool(WorkerPool):
        def __iter__(self) -> Iterator[Worker]:
            raise RuntimeError("pool bug")

    clock = Clock()
    checker = HealthChecker(
        BrokenPool(),
        StubTreq(ProbedWorkers()),
        clock,
        interval=1,
        failure_threshold=1,  # type: ignore[arg-type]
    )
    with capturedLogs() as events:
        checker.startService()
        assert success_result_of(checker.check_all()) is None
    assert checker._loop is not None and checker._loop.running
    assert any("log_failure" in e for e in events)
    checker.stopService()


def test_check_all_with_no_workers(make_checker: Callable[..., HealthChecker]) -> None:
    assert success_result_of(make_checker().check_all()) is None


def test_stop_service_stops_the_loop(
    pool: WorkerPool, workers: ProbedWorkers, clock: Clock, make_checker: Callable[..., HealthChecker]
) -> None:
    pool.add("http://a:1")
    checker = make_checker()
    checker.startService()
    assert checker.running
    stopped = checker.stopService()
    assert stopped is not None
    success_result_of(stopped)
    assert not checker.running
    clock.advance(INTERVAL * 10)
    assert workers.hits("a:1") == 1
    assert not clock.getDelayedCalls()


def test_stop_service_cancels_probes_in_flight_without_counting_them(
    pool: WorkerPool,
    workers: ProbedWorkers,
    stub: StubTreq,
    clock: Clock,
    make_checker: Callable[..., HealthChecker],
) -> None:
    w, _ = pool.add("http://slow:1")
    workers.health["slow:1"] = "hang"
    checker = make_checker()
    checker.startService()
    stopped = checker.stopService()
    assert stopped is not None
    success_result_of(stopped)
    assert w.consecutive_failures == 0 and w.last_error is None
    assert not clock.getDelayedCalls()
    stub.flush()
    assert len(workers.ended) == 1 and isinstance(workers.ended[0], Failure)


def test_restart_after_stop(
    pool: WorkerPool, workers: ProbedWorkers, clock: Clock, make_checker: Callable[..., HealthChecker]
) -> None:
    pool.add("http://a:1")
    checker = make_checker()
    checker.startService()
    checker.stopService()
    checker.startService()
    assert workers.hits("a:1") == 2
    clock.advance(INTERVAL)
    assert workers.hits("a:1") == 3


def test_worker_removed_mid_probe_is_ignored(
    pool: WorkerPool,
    workers: ProbedWorkers,
    clock: Clock,
    make_checker: Callable[..., HealthChecker],
    quarantined: list[tuple[Worker, str]],
) -> None:
    old, _ = pool.add("http://a:1")
    workers.health["a:1"] = "hang"
    checker = make_checker(failure_threshold=1)
    d = checker.check_all()
    pool.remove(old.worker_id)
    new, _ = pool.add("http://a:1")
    clock.advance(TIMEOUT)
    success_result_of(d)
    assert old.consecutive_failures == 0 and not old.is_dead
    assert new.consecutive_failures == 0 and not new.is_dead
    assert quarantined == []


def test_worker_quarantined_by_operator_mid_probe_is_left_alone(
    pool: WorkerPool, workers: ProbedWorkers, clock: Clock, make_checker: Callable[..., HealthChecker]
) -> None:
    w, _ = pool.add("http://a:1")
    workers.health["a:1"] = "hang"
    d = make_checker().check_all()
    pool.quarantine(w, "operator")
    clock.advance(TIMEOUT)
    success_result_of(d)
    assert w.dead_reason == "operator" and w.consecutive_failures == 0


def test_manual_check_does_not_probe_a_worker_twice(
    pool: WorkerPool, workers: ProbedWorkers, clock: Clock, make_checker: Callable[..., HealthChecker]
) -> None:
    w, _ = pool.add("http://a:1")
    workers.health["a:1"] = "hang"
    checker = make_checker()
    checker.startService()
    success_result_of(checker.check_all())
    assert workers.hits("a:1") == 1
    clock.advance(TIMEOUT)
    assert w.consecutive_failures == 1


def test_constructor_validates(pool: WorkerPool, net: RefusingClient, clock: Clock) -> None:
    with pytest.raises(ValueError, match="interval"):
        HealthChecker(pool, net, clock, interval=0, failure_threshold=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="threshold"):
        HealthChecker(pool, net, clock, interval=1, failure_threshold=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        HealthChecker(
            pool,
            net,
            clock,
            interval=1,
            failure_threshold=1,
            probe_timeout=0,  # type: ignore[arg-type]
        )


# -- capabilities learned by the checker ------------------------------------------


def test_missing_capabilities_are_fetched_after_the_first_good_probe(
    pool: WorkerPool, workers: ProbedWorkers, clock: Clock, make_checker: Callable[..., HealthChecker]
) -> None:
    w, _ = pool.add("http://a:1")
    workers.models["a:1"] = model_card("TI2V", "Wan-AI/Wan2.2-TI2V-5B")
    make_checker().startService()
    assert w.task_type == "TI2V" and w.model_id == "Wan-AI/Wan2.2-TI2V-5B"
    assert w.video_support
    clock.advance(INTERVAL)
    assert workers.hits("a:1", "/v1/models") == 1


def test_unreadable_capabilities_are_not_refetched_every_round(
    pool: WorkerPool, workers: ProbedWorkers, clock: Clock, make_checker: Callable[..., HealthChecker]
) -> None:
    w, _ = pool.add("http://a:1")
    workers.models["a:1"] = b"garbage"
    make_checker().startService()
    clock.advance(INTERVAL)
    clock.advance(INTERVAL)
    assert workers.hits("a:1", "/v1/models") == 1
    assert w.task_type is None
    # ...but a recovery is a reason to look again.
    workers.health["a:1"] = 503
    clock.advance(INTERVAL)
    workers.health["a:1"] = b"{}"
    workers.models["a:1"] = model_card("T2I", "Qwen/Qwen-Image")
    clock.advance(INTERVAL)
    assert workers.hits("a:1", "/v1/models") == 2
    assert w.task_type == "T2I" and not w.video_support


def test_known_capabilities_are_not_refetched(
    pool: WorkerPool, workers: ProbedWorkers, make_checker: Callable[..., HealthChecker]
) -> None:
    w, _ = pool.add("http://a:1")
    pool.set_capabilities(w, task_type="T2I", model_id="m")
    make_checker().startService()
    assert workers.hits("a:1", "/v1/models") == 0


def test_capability_fetch_can_be_disabled(
    pool: WorkerPool, workers: ProbedWorkers, make_checker: Callable[..., HealthChecker]
) -> None:
    w, _ = pool.add("http://a:1")
    make_checker(fetch_missing_capabilities=False).startService()
    assert workers.hits("a:1", "/v1/models") == 0
    assert w.task_type is None


# -- refresh_capabilities -------------------------------------------------------------


def refresh(pool: WorkerPool, w: Worker, net: RefusingClient, clock: Clock) -> Deferred[bool]:
    return Deferred.fromCoroutine(refresh_capabilities(pool, w, net, clock, timeout=TIMEOUT))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("body", "task_type", "model_id"),
    [
        (model_card("T2V", "Wan-AI/Wan2.1-T2V-1.3B"), "T2V", "Wan-AI/Wan2.1-T2V-1.3B"),
        (model_card("T2I", "Qwen/Qwen-Image"), "T2I", "Qwen/Qwen-Image"),
        (model_card("I2M", "tencent/Hunyuan3D-2"), "I2M", "tencent/Hunyuan3D-2"),
        (model_card("t2v ", "/models/local"), "T2V", "/models/local"),
        (model_card(None, "m"), None, "m"),
        (model_card(7, ["x"]), None, None),
        (b'{"data":[{"id":"m"}]}', None, "m"),
        (b'{"data":[{"id":"a","task_type":"I2V"},{"id":"b","task_type":"T2I"}]}', "I2V", "a"),
    ],
)
def test_refresh_capabilities_parses_the_card(
    pool: WorkerPool,
    workers: ProbedWorkers,
    net: RefusingClient,
    clock: Clock,
    body: bytes,
    task_type: str | None,
    model_id: str | None,
) -> None:
    w, _ = pool.add("http://a:1")
    workers.models["a:1"] = body
    assert success_result_of(refresh(pool, w, net, clock)) is True
    assert (w.task_type, w.model_id) == (task_type, model_id)
    assert w.video_support is (task_type in ("T2V", "I2V", "TI2V"))
    assert workers.seen == [("a:1", "/v1/models")]


@pytest.mark.parametrize(
    "behaviour",
    [
        b"not json",
        b"\xff\xfe",
        b"[]",
        b"null",
        b'{"object":"list"}',
        b'{"data":[]}',
        b'{"data":{}}',
        b'{"data":["T2V"]}',
        b'{"data":[null]}',
        500,
        404,
    ],
)
def test_refresh_capabilities_tolerates_garbage(
    pool: WorkerPool,
    workers: ProbedWorkers,
    net: RefusingClient,
    clock: Clock,
    behaviour: Behaviour,
) -> None:
    w, _ = pool.add("http://a:1")
    pool.set_capabilities(w, task_type="T2V", model_id="before")
    workers.models["a:1"] = behaviour
    with capturedLogs() as events:
        assert success_result_of(refresh(pool, w, net, clock)) is False
    assert (w.task_type, w.model_id) == ("T2V", "before")
    assert any("could not read capabilities of worker http://a:1" in m for m in messages(events))


def test_refresh_capabilities_refused(pool: WorkerPool, net: RefusingClient, clock: Clock) -> None:
    w, _ = pool.add("http://a:1")
    net.refused.add("a:1")
    with capturedLogs() as events:
        assert success_result_of(refresh(pool, w, net, clock)) is False
    assert any("connection refused" in m for m in messages(events))


def test_refresh_capabilities_client_raises(pool: WorkerPool, net: RefusingClient, clock: Clock) -> None:
    w, _ = pool.add("http://a:1")
    net.broken.add("a:1")
    assert success_result_of(refresh(pool, w, net, clock)) is False


def test_refresh_capabilities_times_out(
    pool: WorkerPool, workers: ProbedWorkers, net: RefusingClient, clock: Clock
) -> None:
    w, _ = pool.add("http://a:1")
    workers.models["a:1"] = "hang"
    d = refresh(pool, w, net, clock)
    assert_no_result(d)
    with capturedLogs() as events:
        clock.advance(TIMEOUT)
    assert success_result_of(d) is False
    assert any(f"timed out after {TIMEOUT:g}s" in m for m in messages(events))
    assert not clock.getDelayedCalls()


def test_refresh_capabilities_refuses_huge_bodies(
    pool: WorkerPool, workers: ProbedWorkers, net: RefusingClient, clock: Clock
) -> None:
    w, _ = pool.add("http://a:1")
    workers.models["a:1"] = b'{"data":[{"id":"' + b"x" * (2 * 1024 * 1024) + b'"}]}'
    assert success_result_of(refresh(pool, w, net, clock)) is False
    assert w.model_id is None
