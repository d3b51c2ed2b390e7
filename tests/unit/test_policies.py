"""Tests for L{twisted_router.policies}."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from twisted_router.policies import (
    POLICY_NAMES,
    LeastRequest,
    LeastWork,
    PowerOfTwo,
    RandomChoice,
    RoundRobin,
    RoutingPolicy,
    make_policy,
)
from twisted_router.pool import Worker, WorkerPool


def workers(*loads: int) -> list[Worker]:
    pool = WorkerPool(now=lambda: 0.0)
    result = []
    for i, load in enumerate(loads):
        w, _ = pool.add(f"http://10.0.0.{i + 1}:8000")
        w.active_requests = load
        result.append(w)
    return result


def all_policies() -> list[RoutingPolicy]:
    return [make_policy(name, random.Random(1)) for name in POLICY_NAMES]


def snapshot(ws: list[Worker]) -> list[dict[str, object]]:
    return [w.payload() for w in ws]


# -- make_policy ------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("least-request", LeastRequest),
        ("round-robin", RoundRobin),
        ("random", RandomChoice),
        ("power-of-two", PowerOfTwo),
        ("least-work", LeastWork),
        ("Least_Work", LeastWork),
        ("Least_Request", LeastRequest),
        (" ROUND_ROBIN ", RoundRobin),
    ],
)
def test_make_policy(name: str, cls: type) -> None:
    policy = make_policy(name)
    assert isinstance(policy, cls)
    assert policy.name in POLICY_NAMES


def test_policy_names_match() -> None:
    assert POLICY_NAMES == ("least-request", "round-robin", "random", "power-of-two", "least-work")
    assert [make_policy(n).name for n in POLICY_NAMES] == list(POLICY_NAMES)


@pytest.mark.parametrize("name", ["", "fastest", "least", "cache-aware"])
def test_make_policy_unknown_names_the_choices(name: str) -> None:
    with pytest.raises(ValueError) as info:
        make_policy(name)
    for valid in POLICY_NAMES:
        assert valid in str(info.value)


def test_make_policy_uses_the_given_rng() -> None:
    ws = workers(0, 0, 0, 0, 0)
    a = make_policy("random", random.Random(42))
    b = make_policy("random", random.Random(42))
    assert [a.choose(ws) for _ in range(20)] == [b.choose(ws) for _ in range(20)]


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_empty_candidates_refused(name: str) -> None:
    with pytest.raises(ValueError):
        make_policy(name).choose([])


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_single_candidate(name: str) -> None:
    (w,) = workers(7)
    policy = make_policy(name, random.Random(0))
    assert all(policy.choose([w]) is w for _ in range(5))


# -- least-request ------------------------------------------------------------


def test_least_request_picks_the_minimum() -> None:
    ws = workers(3, 1, 2)
    assert LeastRequest().choose(ws) is ws[1]


def test_least_request_alternates_between_idle_equal_workers() -> None:
    a, b = workers(0, 0)
    policy = LeastRequest()
    # Sequential requests: each finishes before the next is routed.
    chosen = [policy.choose([a, b]) for _ in range(10)]
    assert chosen == [a, b] * 5


def test_least_request_rotates_among_the_tied_minimum_only() -> None:
    a, b, c = workers(0, 5, 0)
    policy = LeastRequest()
    assert [policy.choose([a, b, c]) for _ in range(6)] == [a, c] * 3


def test_least_request_shares_load_when_the_tie_set_changes() -> None:
    a, b, c = workers(0, 0, 0)
    policy = LeastRequest()
    assert policy.choose([a, b, c]) is a
    assert policy.choose([a, b, c]) is b
    # c became busy for a while; a and b keep alternating, least recent first.
    c.active_requests = 1
    assert policy.choose([a, b, c]) is a
    assert policy.choose([a, b, c]) is b
    c.active_requests = 0
    # c has waited longest.
    assert policy.choose([a, b, c]) is c


def test_least_request_concurrent_burst_spreads_evenly() -> None:
    ws = workers(0, 0, 0, 0)
    policy = LeastRequest()
    for _ in range(40):  # requests that stay in flight
        policy.choose(ws).active_requests += 1
    assert [w.active_requests for w in ws] == [10, 10, 10, 10]


@given(st.lists(st.integers(0, 5), min_size=1, max_size=8), st.integers(1, 30))
def test_least_request_always_picks_a_minimum(loads: list[int], rounds: int) -> None:
    ws = workers(*loads)
    policy = LeastRequest()
    for _ in range(rounds):
        chosen = policy.choose(ws)
        assert chosen in ws
        assert chosen.active_requests == min(w.active_requests for w in ws)


@given(st.integers(1, 8), st.integers(1, 10))
def test_least_request_equal_idle_workers_get_exactly_even_share(n: int, k: int) -> None:
    ws = workers(*([0] * n))
    policy = LeastRequest()
    counts = Counter(policy.choose(ws).url for _ in range(n * k))
    assert sorted(counts.values()) == [k] * n


# -- round-robin ---------------------------------------------------------------


def test_round_robin_order() -> None:
    a, b, c = workers(9, 0, 0)
    policy = RoundRobin()
    assert [policy.choose([a, b, c]) for _ in range(6)] == [a, b, c, a, b, c]


@given(st.integers(1, 10), st.integers(1, 10), st.lists(st.integers(0, 9), max_size=10))
def test_round_robin_is_exactly_even(n: int, k: int, loads: list[int]) -> None:
    ws = workers(*([0] * n))
    for w, load in zip(ws, loads, strict=False):
        w.active_requests = load  # round-robin ignores load
    policy = RoundRobin()
    counts = Counter(policy.choose(ws).url for _ in range(n * k))
    assert len(counts) == n
    assert set(counts.values()) == {k}


# -- random and power-of-two ------------------------------------------------------


def test_random_covers_every_candidate() -> None:
    ws = workers(0, 0, 0)
    policy = RandomChoice(random.Random(3))
    assert {policy.choose(ws).url for _ in range(200)} == {w.url for w in ws}


def test_power_of_two_takes_the_less_loaded_of_two() -> None:
    a, b = workers(5, 1)
    policy = PowerOfTwo(random.Random(0))
    assert all(policy.choose([a, b]) is b for _ in range(20))


def test_power_of_two_never_picks_the_most_loaded_of_three_or_more() -> None:
    ws = workers(1, 1, 9)
    policy = PowerOfTwo(random.Random(5))
    # Two distinct samples always include a worker with load 1.
    assert all(policy.choose(ws) is not ws[2] for _ in range(200))


def test_power_of_two_ties_share_the_load() -> None:
    a, b = workers(0, 0)
    policy = PowerOfTwo(random.Random(7))
    counts = Counter(policy.choose([a, b]).url for _ in range(400))
    assert min(counts.values()) > 100


@given(
    st.lists(st.integers(0, 5), min_size=1, max_size=8),
    st.sampled_from(POLICY_NAMES),
    st.integers(0, 2**32),
)
def test_chosen_is_a_candidate_and_nothing_is_mutated(
    loads: list[int], name: str, seed: int
) -> None:
    ws = workers(*loads)
    before = snapshot(ws)
    policy = make_policy(name, random.Random(seed))
    for _ in range(10):
        chosen = policy.choose(ws)
        assert any(chosen is w for w in ws)
    assert snapshot(ws) == before


@given(st.lists(st.integers(0, 5), min_size=2, max_size=8), st.integers(0, 2**32))
def test_power_of_two_never_picks_the_strict_maximum(loads: list[int], seed: int) -> None:
    ws = workers(*loads)
    policy = PowerOfTwo(random.Random(seed))
    top = max(loads)
    if loads.count(top) == 1:
        assert policy.choose(ws).active_requests < top


# -- least-work ------------------------------------------------------------------


def speedy(*specs: tuple[float, float]) -> list[Worker]:
    """Workers with (outstanding predicted work, seconds per unit)."""
    ws = workers(*([0] * len(specs)))
    for w, (work, spu) in zip(ws, specs, strict=True):
        w.predicted_work = work
        w.speed.seconds_per_unit = spu
    return ws


def test_least_work_earliest_finish() -> None:
    # a: 100 units at 0.1 s = 10 s; b: 10 units at 0.5 s = 5 s; c: idle but slow.
    a, b, c = speedy((100.0, 0.1), (10.0, 0.5), (0.0, 2.0))
    policy = LeastWork()
    assert policy.choose([a, b, c], work=1.0) is c  # c: 2 s; b: 5.5 s; a: 10.1 s
    # A large job goes to a busier fast worker when it would finish there first.
    assert policy.choose([a, b, c], work=50.0) is a  # a: 15 s; b: 30 s; c: 100 s


def test_least_work_counts_work_not_requests() -> None:
    a, b = speedy((50.0, 0.1), (5.0, 0.1))
    a.active_requests, b.active_requests = 1, 5  # least-request would pick a
    assert LeastWork().choose([a, b], work=10.0) is b


def test_least_work_ties_share_evenly() -> None:
    ws = speedy((0.0, 0.1), (0.0, 0.1), (0.0, 0.1))
    policy = LeastWork()
    counts = Counter(policy.choose(ws, work=10.0).url for _ in range(30))
    assert sorted(counts.values()) == [10, 10, 10]


def test_least_work_batch_splits_by_speed() -> None:
    """64 equal jobs placed one by one (each counted where it went): shares follow speed 1:1:1:0.25."""
    ws = speedy((0.0, 1.0), (0.0, 1.0), (0.0, 1.0), (0.0, 4.0))
    policy = LeastWork()
    for _ in range(64):
        policy.choose(ws, work=10.0).predicted_work += 10.0
    shares = [round(w.predicted_work / 10) for w in ws]
    assert shares[3] in (4, 5)
    assert sum(shares) == 64
    assert max(shares[:3]) - min(shares[:3]) <= 1


def test_least_work_finish_time() -> None:
    (w,) = speedy((30.0, 0.2))
    assert LeastWork.finish_time(w, 20.0) == pytest.approx(10.0)
