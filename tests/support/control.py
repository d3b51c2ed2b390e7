"""
A fleet for tests of L{twisted_router.control}: a real L{WorkerPool} and a
fake caller whose fan-outs stay in flight until the test answers them, and
what the router's control routes would answer with each result.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from twisted_router.app import memory_status, refit_status
from twisted_router.calls import WorkerReply
from twisted_router.control import BroadcastReport, FleetController
from twisted_router.errors import RouterError
from twisted_router.pool import Worker, WorkerPool


@dataclass(frozen=True)
class Answer:
    """The status and JSON body the router's control routes make of a control result."""

    status: int
    body: dict[str, Any]


def _answer(report: BroadcastReport) -> Answer:
    # Only a refit reports the fleet's weight version.
    status = refit_status(report) if report.weight_version is not None else memory_status(report)
    return Answer(status, report.payload())


def _answer_error(failure: Failure) -> Answer:
    error = failure.trap(RouterError) and failure.value
    assert isinstance(error, RouterError)
    return Answer(error.status, {"error": error.message})


A = "http://10.0.0.1:30000"
B = "http://10.0.0.2:30000"
C = "http://10.0.0.3:30000"
D = "http://10.0.0.4:30000"
TIMEOUT = 7.0


@dataclass
class FanOut:
    urls: list[str]
    method: str
    path: str
    body: bytes | None
    timeout: float
    on_reply: Callable[[int, WorkerReply], object] | None = None
    deferred: Deferred[list[WorkerReply]] = field(default_factory=Deferred)
    early: dict[int, WorkerReply] = field(default_factory=dict)

    @staticmethod
    def _reply(url: str, reply: tuple[int | None, Any] | str) -> WorkerReply:
        if isinstance(reply, str):
            return WorkerReply(url, None, None, reply)
        return WorkerReply(url, reply[0], reply[1])

    def answer_one(self, url: str, reply: tuple[int | None, Any] | str) -> None:
        """One worker answers now, before the others (as the real fan-out reports it)."""
        index = self.urls.index(url)
        assert index not in self.early
        self.early[index] = self._reply(url, reply)
        if self.on_reply is not None:
            self.on_reply(index, self.early[index])

    def answer(self, *replies: tuple[int | None, Any] | str) -> None:
        """
        One reply per URL not answered yet: C{(status, body)}, or an error
        string (no status); then the fan-out ends.
        """
        pending = [i for i in range(len(self.urls)) if i not in self.early]
        assert len(replies) == len(pending)
        for index, reply in zip(pending, replies, strict=True):
            self.answer_one(self.urls[index], reply)
        self.deferred.callback([self.early[i] for i in range(len(self.urls))])

    def all_ok(self) -> None:
        self.answer(*[(200, {"success": True}) for _ in self.urls])


class FakeCaller:
    """A WorkerCaller whose fan-outs stay in flight until the test answers them."""

    def __init__(self) -> None:
        self.calls: list[FanOut] = []

    async def fan_out(
        self,
        worker_urls: list[str],
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        timeout: float,
        on_reply: Callable[[int, WorkerReply], object] | None = None,
    ) -> list[WorkerReply]:
        call = FanOut(list(worker_urls), method, path, body, timeout, on_reply)
        self.calls.append(call)
        return await call.deferred


class Fleet:
    def __init__(self, *urls: str) -> None:
        self.pool = WorkerPool(now=lambda: 0.0)
        self.workers = [self.pool.add(u)[0] for u in urls]
        self.caller = FakeCaller()
        self.clock = Clock()
        self.control = FleetController(self.pool, self.caller, self.clock, timeout=TIMEOUT)  # type: ignore[arg-type]

    def worker(self, url: str) -> Worker:
        found = self.pool.get(url)
        assert found is not None
        return found

    def run(self, coro: Coroutine[Any, Any, BroadcastReport]) -> Deferred[Answer]:
        """Run a control call, and give what its route answers with it."""
        return Deferred.fromCoroutine(coro).addCallbacks(_answer, _answer_error)

    def sleeping(self) -> list[str]:
        return [w.url for w in self.pool.workers() if w.is_sleeping]


def make_fleet(*urls: str, dead: tuple[str, ...] = (), sleeping: tuple[str, ...] = ()) -> Fleet:
    fleet = Fleet(*urls)
    for url in dead:
        fleet.pool.quarantine(fleet.worker(url), "test")
    for url in sleeping:
        fleet.pool.set_sleeping(fleet.worker(url), True)
    return fleet
