# -*- test-case-name: tests.unit.test_drain -*-
"""
Graceful shutdown: a stopping router finishes the requests it has accepted.

An RL rollout is minutes of GPU time per request; a SIGTERM (a deploy, a
scale-down) that cut every one of them would waste a whole batch. So the
router drains first: it stops accepting connections, answers new requests on
connections already open with 503 (C{/health} says C{draining}, so load
balancers stop sending), lets the requests in flight finish for up to
C{--shutdown-grace} seconds, cuts the ones still running then, and only after
that stops the rest (health checks, control plane, managed workers).

Twisted waits for a Deferred returned by C{stopService} before it lets the
reactor stop, in the console script and under twistd alike, so the drain is
simply the first step of the top service's C{stopService}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, TimeoutError, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.http import Request


class InFlight:
    """The requests a Site is processing now, and a way to wait until there are none."""

    def __init__(self) -> None:
        self._requests: set[Request] = set()
        self._idle: list[Deferred[None]] = []

    def track(self, request: Request) -> None:
        """Count C{request} until it finishes or its connection is lost."""
        self._requests.add(request)
        request.notifyFinish().addBoth(self._finished, request)

    def _finished(self, result: object, request: Request) -> None:
        self._requests.discard(request)
        if not self._requests:
            waiters, self._idle = self._idle, []
            for d in waiters:
                d.callback(None)

    def __len__(self) -> int:
        return len(self._requests)

    def idle(self) -> Deferred[None]:
        """Fires once no request is in flight (at once if none is)."""
        if not self._requests:
            return succeed(None)

        def forget(d: Deferred[None]) -> None:
            if d in self._idle:
                self._idle.remove(d)

        d: Deferred[None] = Deferred(forget)
        self._idle.append(d)
        return d

    def abort_all(self) -> int:
        """Cut the connection of every request still in flight; how many there were."""
        requests = list(self._requests)
        for request in requests:
            transport: Any = getattr(getattr(request, "channel", None), "transport", None)
            if transport is not None:
                transport.abortConnection()
        return len(requests)


class DrainingService(MultiService):
    """
    The router's top service: on stop, drain the HTTP side first, then stop
    every child service.

    @param set_draining: tells the Site to answer new requests 503 (True) or
        to serve them (False, when the service starts).
    @param stop_accepting: stops listening (the listener's own stop; calling
        it again later, as the children are stopped, does nothing).
    """

    log = Logger()

    def __init__(
        self,
        *,
        in_flight: InFlight,
        set_draining: Callable[[bool], None],
        stop_accepting: Callable[[], Deferred[None] | None],
        grace: float,
        clock: IReactorTime,
    ) -> None:
        super().__init__()
        self._in_flight = in_flight
        self._set_draining = set_draining
        self._stop_accepting = stop_accepting
        self._grace = grace
        self._clock = clock
        self._stopping: Deferred[None] | None = None

    def startService(self) -> None:
        self._stopping = None
        self._set_draining(False)
        super().startService()

    def stopService(self) -> Deferred[None]:
        if self._stopping is not None:  # asked twice: one drain, not two
            return self._stopping
        self._stopping = Deferred.fromCoroutine(self._drain_then_stop())
        return self._stopping

    async def _drain_then_stop(self) -> None:
        self._set_draining(True)
        await maybeDeferred(self._stop_accepting)
        waiting = len(self._in_flight)
        if waiting:
            self.log.info(
                "shutting down: no new connections; waiting up to {grace:g}s for {count} request(s) in flight",
                grace=self._grace,
                count=waiting,
            )
            idle = self._in_flight.idle()
            idle.addTimeout(self._grace, self._clock)
            try:
                await idle
            except TimeoutError:
                cut = self._in_flight.abort_all()
                self.log.warn(
                    "shutdown grace of {grace:g}s expired: {count} request(s) still in flight were cut off",
                    grace=self._grace,
                    count=cut,
                )
            else:
                self.log.info("shutting down: every request in flight has finished")
        await super().stopService()
