"""Tests for L{twisted_router.pool}: the worker registry, leases and health bookkeeping."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from twisted_router.pool import (
    MAX_ERROR_TEXT,
    Activity,
    UnknownWorker,
    Worker,
    WorkerPool,
)
from twisted_router.tasks import VIDEO_INCAPABLE_TASK_TYPES
from twisted_router.urls import BlockedWorkerURL, WorkerURLError, worker_id_for


class FakeTime:
    def __init__(self, start: float = 1000.0) -> None:
        self.value = start

    def __call__(self) -> float:
        return self.value


@pytest.fixture
def now() -> FakeTime:
    return FakeTime()


@pytest.fixture
def pool(now: FakeTime) -> WorkerPool:
    return WorkerPool(now=now)


# -- registration ------------------------------------------------------------


def test_add_normalises_and_derives_ids(pool: WorkerPool, now: FakeTime) -> None:
    worker, created = pool.add(" HTTP://LocalHost:8000/ ")
    assert created is True
    assert worker.url == "http://localhost:8000"
    assert worker.worker_id == "http%3A%2F%2Flocalhost%3A8000"
    assert worker.display_id == "localhost:8000"
    assert worker.registered_at == now.value
    assert worker.active_requests == 0 and not worker.is_dead and not worker.is_sleeping


def test_add_is_idempotent_across_spellings(pool: WorkerPool) -> None:
    first, created = pool.add("http://h:1")
    first.active_requests = 3
    again, created_again = pool.add("http://H:1/")
    assert created is True and created_again is False
    assert again is first
    assert again.active_requests == 3
    assert len(pool) == 1


def test_add_refuses_bad_and_blocked_urls(pool: WorkerPool) -> None:
    with pytest.raises(WorkerURLError):
        pool.add("http://h")
    with pytest.raises(BlockedWorkerURL):
        pool.add("http://169.254.169.254:80")
    assert len(pool) == 0


def test_registration_order(pool: WorkerPool) -> None:
    urls = [f"http://10.0.0.{i}:8000" for i in (5, 1, 9, 3)]
    for u in urls:
        pool.add(u)
    assert [w.url for w in pool.workers()] == urls
    assert [w.url for w in pool] == urls


def test_iteration_is_a_snapshot(pool: WorkerPool) -> None:
    pool.add("http://a:1")
    pool.add("http://b:1")
    seen = []
    for w in pool:
        seen.append(w.url)
        pool.remove(w.worker_id)
    assert seen == ["http://a:1", "http://b:1"]
    assert len(pool) == 0


@pytest.mark.parametrize(
    "key",
    [
        "http%3A%2F%2F127.0.0.1%3A8000",  # worker_id, as in /workers/{id}
        "http%3a%2f%2f127.0.0.1%3a8000",  # lower-case escapes
        "http://127.0.0.1:8000",
        "http://127.0.0.1:8000/",
        " HTTP://127.0.0.1:8000 ",
        "http%3A%2F%2F127.0.0.1%3A8000%2F",  # id of a non-canonical spelling
        "127.0.0.1:8000",  # display id, when unique
    ],
)
def test_get_and_remove_accept_every_key_form(pool: WorkerPool, key: str) -> None:
    worker, _ = pool.add("http://127.0.0.1:8000")
    pool.add("http://127.0.0.1:8001")
    assert pool.get(key) is worker
    assert key in pool
    assert pool.remove(key) is worker
    assert pool.get(key) is None
    assert [w.url for w in pool] == ["http://127.0.0.1:8001"]


@pytest.mark.parametrize(
    "key",
    ["", "nope", "%", "%ZZ", "http://", "http://169.254.169.254:80", "http://h:99999", "\x00", "/"],
)
def test_get_never_raises_on_malformed_keys(pool: WorkerPool, key: str) -> None:
    pool.add("http://h:1")
    assert pool.get(key) is None
    assert key not in pool


def test_get_non_string_key(pool: WorkerPool) -> None:
    pool.add("http://h:1")
    assert pool.get(None) is None  # type: ignore[arg-type]
    assert 42 not in pool


def test_display_id_lookup_needs_uniqueness(pool: WorkerPool) -> None:
    pool.add("http://h:1")
    pool.add("https://h:1")
    assert pool.get("h:1") is None
    assert pool.get("https://h:1") is not None


def test_remove_unknown_raises(pool: WorkerPool) -> None:
    pool.add("http://h:1")
    with pytest.raises(UnknownWorker) as info:
        pool.remove("http://other:1")
    assert isinstance(info.value, KeyError)
    assert "Worker not found" in str(info.value)
    with pytest.raises(UnknownWorker):
        pool.remove("garbage%%")


def test_removed_then_readded_is_a_new_object(pool: WorkerPool) -> None:
    old, _ = pool.add("http://h:1")
    old.consecutive_failures = 2
    pool.quarantine(old, "bad")
    pool.remove(old.worker_id)
    assert old not in pool
    new, created = pool.add("http://h:1")
    assert created and new is not old
    assert not new.is_dead and new.consecutive_failures == 0
    assert new in pool and old not in pool
    assert new != old  # identity semantics


def test_workers_are_hashable_by_identity(pool: WorkerPool) -> None:
    a, _ = pool.add("http://a:1")
    b = Worker.for_url("http://a:1")
    assert len({a, b}) == 2


# -- routability and capabilities ---------------------------------------------


def test_routable_excludes_dead_and_sleeping(pool: WorkerPool) -> None:
    a, _ = pool.add("http://a:1")
    b, _ = pool.add("http://b:1")
    c, _ = pool.add("http://c:1")
    pool.quarantine(b, "down")
    pool.set_sleeping(c, True)
    assert pool.routable() == [a]
    assert not b.routable and not c.routable and a.routable
    pool.set_sleeping(c, False)
    assert pool.routable() == [a, c]


@pytest.mark.parametrize(
    ("task_type", "video"),
    [
        (None, False),
        ("T2I", False),
        ("I2I", False),
        ("TI2I", False),
        ("I2M", False),  # mesh is not video
        ("T2V", True),
        ("I2V", True),
        ("TI2V", True),
    ],
)
def test_video_support(pool: WorkerPool, task_type: str | None, video: bool) -> None:
    w, _ = pool.add("http://a:1")
    pool.set_capabilities(w, task_type=task_type, model_id="m")
    assert w.video_support is video
    assert w.model_id == "m"
    assert (pool.routable(video=True) == [w]) is video


def test_video_incapable_set() -> None:
    assert frozenset({"T2I", "I2I", "TI2I", "I2M"}) == VIDEO_INCAPABLE_TASK_TYPES


def test_routable_video_filters_and_keeps_order(pool: WorkerPool) -> None:
    img, _ = pool.add("http://img:1")
    vid1, _ = pool.add("http://vid1:1")
    vid2, _ = pool.add("http://vid2:1")
    pool.set_capabilities(img, task_type="T2I", model_id=None)
    pool.set_capabilities(vid1, task_type="T2V", model_id=None)
    pool.set_capabilities(vid2, task_type="I2V", model_id=None)
    pool.set_sleeping(vid1, True)
    assert pool.routable(video=True) == [vid2]
    assert pool.routable() == [img, vid2]


def test_counts(pool: WorkerPool) -> None:
    assert pool.counts() == {
        "healthy_workers": 0,
        "total_workers": 0,
        "dead_workers": 0,
        "sleeping_workers": 0,
        "busy_workers": 0,
    }
    a, _ = pool.add("http://a:1")
    b, _ = pool.add("http://b:1")
    pool.add("http://c:1")
    d, _ = pool.add("http://d:1")
    pool.quarantine(a, "x")
    pool.set_sleeping(b, True)
    pool.begin(d, Activity.SYNCING)
    assert pool.counts() == {
        "healthy_workers": 1,
        "total_workers": 4,
        "dead_workers": 1,
        "sleeping_workers": 1,
        "busy_workers": 1,
    }
    assert pool.coming_back() == [d]
    assert [w.url for w in pool.routable()] == ["http://c:1"]


def test_state_word_and_routability_follow_the_control_activity(pool: WorkerPool) -> None:
    w, _ = pool.add("http://a:1")
    assert (w.state, w.routable, w.coming_back) == ("ready", True, False)
    pool.begin(w, Activity.UPDATING)
    assert (w.state, w.routable, w.coming_back) == ("updating", False, True)
    pool.begin(w, Activity.SYNCING)
    assert w.payload()["syncing"] is True and w.payload()["state"] == "syncing"
    pool.set_sleeping(w, True)
    assert (w.state, w.coming_back) == ("sleeping", False)
    pool.quarantine(w, "x")
    assert (w.state, w.routable) == ("dead", False)


def test_payload_is_json_and_complete(pool: WorkerPool, now: FakeTime) -> None:
    w, _ = pool.add("http://[::1]:8000")
    pool.set_capabilities(w, task_type="T2V", model_id="Wan-AI/Wan2.1-T2V-1.3B")
    payload = json.loads(json.dumps(w.payload()))
    for key in (
        "worker_id",
        "display_id",
        "url",
        "active_requests",
        "is_dead",
        "is_sleeping",
        "is_suspect",
        "consecutive_failures",
        "video_support",
        "state",
        "syncing",
        "weight_version",
        "model_path",
        "dead_reason",
        "task_type",
        "model_id",
        "total_requests",
        "failed_requests",
        "last_error",
        "last_error_at",
        "registered_at",
        "last_probe_ok_at",
    ):
        assert key in payload
    assert payload["worker_id"] == worker_id_for("http://[::1]:8000")
    assert payload["display_id"] == "[::1]:8000"
    assert payload["url"] == "http://[::1]:8000"
    assert payload["video_support"] is True
    assert payload["registered_at"] == now.value
    assert payload["last_probe_ok_at"] is None
    assert (payload["state"], payload["syncing"], payload["is_suspect"]) == ("ready", False, False)
    assert (payload["weight_version"], payload["model_path"]) == (None, None)
    # The fields follow the worker's state.
    pool.begin(w, Activity.SYNCING)
    w.weight_version, w.model_path = "7", "/ckpt/7"
    payload = json.loads(json.dumps(w.payload()))
    assert (payload["state"], payload["syncing"]) == ("syncing", True)
    assert (payload["weight_version"], payload["model_path"]) == ("7", "/ckpt/7")


# -- leases ----------------------------------------------------------------


def test_lease_counts_and_releases(pool: WorkerPool) -> None:
    w, _ = pool.add("http://a:1")
    with pool.lease(w) as leased:
        assert leased is w
        assert w.active_requests == 1 and w.total_requests == 1
        with pool.lease(w):
            assert w.active_requests == 2
        assert w.active_requests == 1
    assert w.active_requests == 0
    assert w.total_requests == 2


def test_lease_counts_predicted_work_exactly_as_long_as_the_request(pool: WorkerPool) -> None:
    w, _ = pool.add("http://a:1")
    freed: list[object] = []
    pool.on_slot_free(freed.append)
    with pool.lease(w, 10.0):
        with pytest.raises(RuntimeError), pool.lease(w, 2.5):
            assert w.predicted_work == 12.5
            raise RuntimeError("boom")
        assert w.predicted_work == 10.0
        assert freed == [w]
    assert w.predicted_work == 0.0
    assert freed == [w, w]
    lease = pool.lease(w, 3.0)
    lease.release()  # never entered: takes and frees nothing
    assert (w.predicted_work, freed) == (0.0, [w, w])


def test_lease_not_entered_takes_nothing(pool: WorkerPool) -> None:
    w, _ = pool.add("http://a:1")
    lease = pool.lease(w)
    lease.release()
    assert w.active_requests == 0 and w.total_requests == 0


def test_lease_released_on_exception(pool: WorkerPool) -> None:
    w, _ = pool.add("http://a:1")
    with pytest.raises(RuntimeError), pool.lease(w):
        raise RuntimeError("boom")
    assert w.active_requests == 0


def test_lease_released_on_generator_close(pool: WorkerPool) -> None:
    w, _ = pool.add("http://a:1")

    def handler() -> Iterator[int]:
        with pool.lease(w):
            yield w.active_requests
            yield w.active_requests

    gen = handler()
    assert next(gen) == 1
    gen.close()  # GeneratorExit inside the with block
    assert w.active_requests == 0


def test_lease_released_on_coroutine_cancellation(pool: WorkerPool) -> None:
    from twisted.internet.defer import CancelledError, Deferred, ensureDeferred

    w, _ = pool.add("http://a:1")
    upstream: Deferred[None] = Deferred()

    async def handler() -> None:
        with pool.lease(w):
            await upstream

    d = ensureDeferred(handler())
    assert w.active_requests == 1
    d.cancel()
    failures: list[object] = []
    d.addErrback(failures.append)
    assert failures and failures[0].check(CancelledError)  # type: ignore[attr-defined]
    assert w.active_requests == 0


def test_lease_released_exactly_once(pool: WorkerPool) -> None:
    w, _ = pool.add("http://a:1")
    other = pool.lease(w)
    other.__enter__()
    lease = pool.lease(w)
    with lease:
        lease.release()  # early, explicit release
        assert lease.released
        assert w.active_requests == 1
    assert w.active_requests == 1  # __exit__ did not release a second time
    lease.release()
    assert w.active_requests == 1
    other.release()
    assert w.active_requests == 0


def test_lease_cannot_be_entered_twice(pool: WorkerPool) -> None:
    w, _ = pool.add("http://a:1")
    lease = pool.lease(w)
    with lease, pytest.raises(RuntimeError), lease:
        pass
    assert w.active_requests == 0


def test_lease_never_negative(pool: WorkerPool) -> None:
    w, _ = pool.add("http://a:1")
    with pool.lease(w):
        w.active_requests = 0  # something reset it (e.g. a bug elsewhere)
    assert w.active_requests == 0


def test_lease_on_removed_worker_releases_cleanly(pool: WorkerPool) -> None:
    w, _ = pool.add("http://a:1")
    with pool.lease(w):
        pool.remove(w.worker_id)
        new, _ = pool.add("http://a:1")
    assert w.active_requests == 0
    assert new.active_requests == 0 and new.total_requests == 0


@given(st.lists(st.tuples(st.booleans(), st.booleans()), max_size=40))
def test_leases_balance_on_every_path(paths: list[tuple[bool, bool]]) -> None:
    pool = WorkerPool(now=lambda: 0.0)
    w, _ = pool.add("http://a:1")
    for fail, release_early in paths:
        lease = pool.lease(w)
        try:
            with lease:
                if release_early:
                    lease.release()
                if fail:
                    raise ValueError
        except ValueError:
            pass
        assert w.active_requests == 0
    assert w.total_requests == len(paths)


# -- request failures ---------------------------------------------------------


def test_record_request_failure(pool: WorkerPool) -> None:
    w, _ = pool.add("http://a:1")
    pool.record_request_failure(w, "connection refused")
    assert w.failed_requests == 1 and w.last_error == "connection refused"
    assert not w.is_dead


def test_last_failure_has_its_time_and_a_bounded_text(pool: WorkerPool, now: FakeTime) -> None:
    """The dashboard shows when the last failure was; a huge reason is cut, not kept whole."""
    w, _ = pool.add("http://a:1")
    assert w.payload()["last_error_at"] is None
    now.value = 1234.5
    pool.record_request_failure(w, "connection refused")
    assert (w.payload()["last_error"], w.payload()["last_error_at"]) == ("connection refused", 1234.5)
    now.value = 2000.0
    pool.record_probe_failure(w, "x" * 10_000, 3)
    assert w.last_error_at == 2000.0
    assert w.last_error is not None and len(w.last_error) == MAX_ERROR_TEXT
    assert w.last_error.startswith("xxx") and w.last_error.endswith("\u2026")
    assert w.failed_requests == 1  # a probe is not a request


# -- health bookkeeping -------------------------------------------------------


def test_probe_failures_quarantine_at_threshold(pool: WorkerPool) -> None:
    w, _ = pool.add("http://a:1")
    assert pool.record_probe_failure(w, "HTTP 503", 3) is False
    assert pool.record_probe_failure(w, "HTTP 503", 3) is False
    assert w.consecutive_failures == 2 and not w.is_dead
    assert pool.record_probe_failure(w, "connection refused", 3) is True
    assert w.is_dead and w.consecutive_failures == 3
    assert w.dead_reason is not None and "connection refused" in w.dead_reason
    assert w.last_error == "connection refused"
    # Already dead: counted, but it does not "become" dead again.
    assert pool.record_probe_failure(w, "x", 3) is False


def test_probe_success_resets_streak(pool: WorkerPool, now: FakeTime) -> None:
    w, _ = pool.add("http://a:1")
    pool.record_probe_failure(w, "x", 3)
    pool.record_probe_failure(w, "x", 3)
    now.value = 2000.0
    pool.record_probe_success(w)
    assert w.consecutive_failures == 0 and w.last_probe_ok_at == 2000.0
    assert pool.record_probe_failure(w, "x", 3) is False
    assert not w.is_dead


def test_threshold_below_one_is_treated_as_one(pool: WorkerPool) -> None:
    w, _ = pool.add("http://a:1")
    assert pool.record_probe_failure(w, "x", 0) is True


def test_sleeping_worker_is_never_quarantined_by_probes(pool: WorkerPool) -> None:
    w, _ = pool.add("http://a:1")
    pool.set_sleeping(w, True)
    for _ in range(5):
        assert pool.record_probe_failure(w, "timed out", 2) is False
    assert not w.is_dead and w.consecutive_failures == 5


def test_quarantine_and_readmit(pool: WorkerPool) -> None:
    w, _ = pool.add("http://a:1")
    w.consecutive_failures = 4
    assert pool.quarantine(w, "operator") is True
    assert pool.quarantine(w, "again") is False
    assert w.dead_reason == "operator"  # the first reason is kept
    pool.readmit(w)
    assert not w.is_dead and w.dead_reason is None and w.consecutive_failures == 0
    assert pool.routable() == [w]


def test_readmit_of_sleeping_worker_stays_unroutable(pool: WorkerPool) -> None:
    w, _ = pool.add("http://a:1")
    pool.quarantine(w, "x")
    pool.set_sleeping(w, True)
    pool.readmit(w)
    assert pool.routable() == []


# -- transitions and the change signal -------------------------------------


def test_activities_are_begun_and_ended_by_the_pool_which_signals_their_end(pool: WorkerPool) -> None:
    signals: list[None] = []
    pool.on_change(lambda: signals.append(None))
    w, _ = pool.add("http://a:1")
    pool.begin(w, Activity.UPDATING)
    assert (w.state, w.routable, signals) == ("updating", False, [])  # nobody gets in by a worker going busy
    assert not pool.end(w, Activity.SYNCING)  # another activity's end leaves this one alone
    assert pool.end(w, Activity.UPDATING)
    assert (w.activity, w.routable, len(signals)) == (None, True, 1)
    assert not pool.end(w)  # nothing left to end, nothing signalled
    assert len(signals) == 1


def test_a_quarantined_worker_cannot_begin_an_activity(pool: WorkerPool) -> None:
    w, _ = pool.add("http://a:1")
    pool.quarantine(w, "x")
    with pytest.raises(ValueError, match="quarantined"):
        pool.begin(w, Activity.SYNCING)
    assert w.activity is None


def test_transitions_made_as_one_change_signal_once_at_its_end(pool: WorkerPool) -> None:
    seen: list[bool] = []
    w, _ = pool.add("http://a:1")
    pool.on_change(lambda: seen.append(w.routable))
    pool.begin(w, Activity.UPDATING)
    with pool.changes():
        pool.end(w, Activity.UPDATING)
        pool.quarantine(w, "refit failed")
        assert seen == []  # nobody saw it routable between the two
    assert seen == [False]


def test_every_transition_that_can_let_a_waiting_request_in_or_out_signals(pool: WorkerPool) -> None:
    signals: list[None] = []
    pool.on_change(lambda: signals.append(None))
    w, _ = pool.add("http://a:1")
    pool.record_probe_failure(w, "timeout", threshold=3)  # suspect
    pool.record_probe_success(w)  # recovered
    pool.set_sleeping(w, True)
    pool.set_sleeping(w, True)  # no change, no signal
    pool.set_sleeping(w, False)
    pool.quarantine(w, "x")
    pool.readmit(w)
    pool.remove(w.url)
    assert len(signals) == 7


def test_activity_words_and_descriptions() -> None:
    assert [a.value for a in Activity] == ["starting", "updating", "syncing", "releasing", "resuming", "joining"]
    assert Activity.UPDATING.description == "updating weights"
    assert not Activity.STARTING.waited_for and Activity.SYNCING.waited_for


def test_going_busy_is_told_to_busy_listeners_only_once_per_change(pool: WorkerPool) -> None:
    changed: list[None] = []
    busy: list[str] = []
    a, _ = pool.add("http://a:1")
    b, _ = pool.add("http://b:1")
    pool.on_change(lambda: changed.append(None))
    pool.on_busy(lambda: busy.append(a.state + "," + b.state))
    pool.begin(a, Activity.UPDATING)
    pool.begin(a, Activity.UPDATING)  # already so: nothing to tell
    assert (busy, changed) == (["updating,ready"], [])
    with pool.changes():
        pool.begin(b, Activity.UPDATING)
        pool.end(a, Activity.UPDATING)
    assert (busy, len(changed)) == (["updating,ready"], 1)  # the change signal covers both
    with pool.changes():
        pool.begin(a, Activity.SYNCING)
        assert busy == ["updating,ready"]
    assert busy == ["updating,ready", "syncing,updating"]


def test_a_new_worker_can_be_added_busy(pool: WorkerPool) -> None:
    seen: list[str] = []
    pool.on_added(lambda w: seen.append(w.state))
    w, created = pool.add("http://a:1", activity=Activity.STARTING)
    assert created and seen == ["starting"] and w.activity is Activity.STARTING
    same, created = pool.add("http://a:1", activity=Activity.SYNCING)  # an existing worker keeps its own
    assert same is w and not created and w.activity is Activity.STARTING
