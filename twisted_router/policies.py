# -*- test-case-name: tests.unit.test_policies -*-
"""
Routing policies: which of the routable workers gets the next request.

Pure functions of the candidates (plus a little memory of their own, such as
a rotation counter); they never change a worker, so a policy can be swapped
or called speculatively without side effects on the pool. The caller passes
a non-empty list of routable workers and the request's predicted work (which
only L{LeastWork} uses), and takes the lease itself.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol
from weakref import WeakKeyDictionary

from twisted_router.pool import Worker

__all__ = [
    "POLICY_NAMES",
    "LeastRequest",
    "LeastWork",
    "PowerOfTwo",
    "RandomChoice",
    "RoundRobin",
    "RoutingPolicy",
    "make_policy",
]

POLICY_NAMES = ("least-request", "round-robin", "random", "power-of-two", "least-work")


class RoutingPolicy(Protocol):
    """Chooses one worker for a request."""

    name: str

    def choose(self, candidates: Sequence[Worker], work: float = 0.0) -> Worker:
        """
        @param candidates: non-empty, all routable, in a stable order
            (registration order).
        @param work: the request's predicted work units (L{twisted_router.cost}).
        @return: one of C{candidates}.
        """


def _require(candidates: Sequence[Worker]) -> None:
    if not candidates:
        raise ValueError("no candidate workers to choose from")


class LeastRequest:
    """
    The worker with the fewest requests in flight (the default).

    Ties go to the tied worker chosen least recently, so equal workers share
    the load: sequential requests on idle, equal workers alternate exactly,
    instead of all landing on the first one (which is what a plain C{min}
    does, and what starves every other worker while load is low).
    """

    name = "least-request"

    def __init__(self) -> None:
        # Weak, so removed workers do not accumulate here.
        self._last_chosen: WeakKeyDictionary[Worker, int] = WeakKeyDictionary()
        self._sequence = 0

    def choose(self, candidates: Sequence[Worker], work: float = 0.0) -> Worker:
        _require(candidates)
        least = min(w.active_requests for w in candidates)
        tied = [w for w in candidates if w.active_requests == least]
        # min() keeps the first of equals, so never-chosen workers go in
        # candidate order.
        chosen = min(tied, key=lambda w: self._last_chosen.get(w, -1))
        self._last_chosen[chosen] = self._sequence
        self._sequence += 1
        return chosen


class RoundRobin:
    """
    Each candidate in turn, ignoring load: over a stable candidate list of
    N workers, N*k requests give each worker exactly k.
    """

    name = "round-robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, candidates: Sequence[Worker], work: float = 0.0) -> Worker:
        _require(candidates)
        chosen = candidates[self._next % len(candidates)]
        self._next += 1
        return chosen


class RandomChoice:
    """A uniformly random candidate."""

    name = "random"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng if rng is not None else random.Random()

    def choose(self, candidates: Sequence[Worker], work: float = 0.0) -> Worker:
        _require(candidates)
        return self._rng.choice(candidates)


class PowerOfTwo:
    """
    Power of two choices: sample two distinct candidates, take the less
    loaded. Nearly as good as least-request, without every router of a
    fleet herding onto the same least-loaded worker. A tie goes to whichever
    was sampled first, which is already random.
    """

    name = "power-of-two"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng if rng is not None else random.Random()

    def choose(self, candidates: Sequence[Worker], work: float = 0.0) -> Worker:
        _require(candidates)
        if len(candidates) == 1:
            return candidates[0]
        first, second = self._rng.sample(list(candidates), 2)
        if second.active_requests < first.active_requests:
            return second
        return first


class LeastWork:
    """
    The worker that would finish this request first: the earliest predicted
    finish time C{(outstanding predicted work + this request's work) ×
    seconds per unit}, from each worker's C{predicted_work} and learned
    C{speed} (L{twisted_router.cost.SpeedEstimate}).

    Counting work instead of requests is what keeps a slow worker from
    getting an equal share of a batch, and a worker with one 81-frame video
    from looking as free as one with a 512² image. Adding this request's own
    work matters only between workers of different speeds: a large job goes
    to a fast worker even when a slow one is idle, if the fast one would
    still finish it first. Ties (within a relative 1e-9) go to the tied
    worker chosen least recently, as in L{LeastRequest}.
    """

    name = "least-work"

    def __init__(self) -> None:
        self._last_chosen: WeakKeyDictionary[Worker, int] = WeakKeyDictionary()
        self._sequence = 0

    @staticmethod
    def finish_time(worker: Worker, work: float) -> float:
        """Seconds until C{worker} would finish a request of C{work} units sent now."""
        return (worker.predicted_work + work) * worker.speed.seconds_per_unit

    def choose(self, candidates: Sequence[Worker], work: float = 0.0) -> Worker:
        _require(candidates)
        finish = [self.finish_time(w, work) for w in candidates]
        earliest = min(finish)
        tolerance = abs(earliest) * 1e-9
        tied = [w for w, t in zip(candidates, finish, strict=True) if t <= earliest + tolerance]
        chosen = min(tied, key=lambda w: self._last_chosen.get(w, -1))
        self._last_chosen[chosen] = self._sequence
        self._sequence += 1
        return chosen


def make_policy(name: str, rng: random.Random | None = None) -> RoutingPolicy:
    """
    Build the policy called C{name} (case and C{_}/C{-} are not significant).

    @param rng: randomness for C{random} and C{power-of-two}; a fresh
        C{random.Random()} if omitted. Inject a seeded one for reproducible
        tests and benchmarks.
    @raise ValueError: unknown name; the message lists the valid ones.
    """
    key = name.strip().lower().replace("_", "-") if isinstance(name, str) else ""
    if key == "least-request":
        return LeastRequest()
    if key == "round-robin":
        return RoundRobin()
    if key == "random":
        return RandomChoice(rng)
    if key == "power-of-two":
        return PowerOfTwo(rng)
    if key == "least-work":
        return LeastWork()
    raise ValueError(f"unknown routing policy {name!r}; choose one of: {', '.join(POLICY_NAMES)}")
