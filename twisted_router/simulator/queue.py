# -*- test-case-name: tests.unit.test_simulator_queue -*-
"""
The simulated GPU: one FIFO queue that runs one job at a time.

The real worker's scheduler keeps one C{deque} and pops one item per loop
(§1 of C{docs/worker-api.md}): generations, weight updates, checksums and
sleep/wake all wait their turn, in arrival order, with no batching. That is
what makes a worker's latency grow with its queue depth and makes a sleep
wait for every generation queued before it, so the router's load balancing
and refit logic can only be tested against a worker that behaves the same.

Time comes from an injected L{IReactorTime}, so tests drive the queue with
C{task.Clock} and assert exact completion times.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

T = TypeVar("T")


class Clock(Protocol):
    """
    The two L{IReactorTime} methods the simulator uses, as a typing protocol:
    all a caller (a reactor, C{task.Clock}, a test double) has to provide.
    L{as_clock} converts at the boundary, once.
    """

    def seconds(self) -> float: ...

    def callLater(self, delay: float, callable: Callable[..., Any], *args: Any, **kw: Any) -> Any: ...


def as_clock(reactor: IReactorTime | object) -> Clock:
    """View an L{IReactorTime} provider (a reactor or C{task.Clock}) as a L{Clock}."""
    return cast(Clock, reactor)


@dataclass(frozen=True)
class Work(Generic[T]):
    """
    What a job does once it reaches the GPU.

    @ivar seconds: how long it holds the GPU (0 means it completes at once).
    @ivar finish: called when that time is up; its return value (or
        exception) is the job's result. State changes belong here, so they
        happen when the job completes, as on the real worker.
    """

    seconds: float
    finish: Callable[[], T]


@dataclass
class _Job:
    label: str
    start: Callable[[], Work[Any]]
    deferred: Deferred[Any]
    call: Any = field(default=None)


class GpuQueue:
    """
    One-at-a-time FIFO execution of jobs on a clock.

    A job is a C{start} callable, invoked when the job reaches the head of
    the queue (not when it is submitted), so it sees the worker's state at
    its turn, exactly as the real scheduler checks "sleeping" when it pops a
    request. C{start} either raises (the job fails at once, taking no GPU
    time) or returns a L{Work}.

    Cancelling the Deferred of a submitted job (Klein does this when the
    client disconnects) does I{not} remove the job: the real worker has
    already handed the request to its scheduler and the GPU does the work
    anyway. Only the answer is dropped.
    """

    def __init__(self, clock: IReactorTime) -> None:
        """
        @param clock: schedules the end of each job.
        """
        self._clock = as_clock(clock)
        self._pending: deque[_Job] = deque()
        self._running: _Job | None = None
        self._pumping = False
        self.completed = 0

    @property
    def depth(self) -> int:
        """Jobs waiting plus the one on the GPU."""
        return len(self._pending) + (1 if self._running is not None else 0)

    @property
    def running(self) -> str | None:
        """The label of the job on the GPU, if any."""
        return self._running.label if self._running is not None else None

    def submit(self, start: Callable[[], Work[T]], label: str = "job") -> Deferred[T]:
        """
        Queue a job behind every job submitted before it.

        @param start: called at the job's turn; see the class docstring.
        @param label: a name for logs and for L{running}.
        @return: fires with the result of C{Work.finish}, or fails with what
            C{start} or C{finish} raised.
        """
        d: Deferred[T] = Deferred()
        self._pending.append(_Job(label, start, d))
        self._pump()
        return d

    def _pump(self) -> None:
        # A loop, not recursion: a long run of zero-time jobs (or callbacks
        # that submit more jobs) must not grow the stack.
        if self._pumping:
            return
        self._pumping = True
        try:
            while self._running is None and self._pending:
                self._begin(self._pending.popleft())
        finally:
            self._pumping = False

    def _begin(self, job: _Job) -> None:
        try:
            work = job.start()
        except BaseException:
            self._settle(job, Failure())
            return
        if work.seconds <= 0:
            self._complete(job, work)
            return
        self._running = job
        job.call = self._clock.callLater(work.seconds, self._end, job, work)

    def _end(self, job: _Job, work: Work[Any]) -> None:
        self._running = None
        self._complete(job, work)
        self._pump()

    def _complete(self, job: _Job, work: Work[Any]) -> None:
        try:
            result = work.finish()
        except BaseException:
            self._settle(job, Failure())
            return
        self.completed += 1
        self._settle(job, result)

    def _settle(self, job: _Job, result: object) -> None:
        # A cancelled job's Deferred has already fired with CancelledError and
        # silently ignores this (Deferred suppresses the second result).
        if isinstance(result, Failure):
            job.deferred.errback(result)
        else:
            job.deferred.callback(result)
