# -*- test-case-name: tests.unit.test_app -*-
"""
One request to one worker: choose, lease, forward, fail over, wait.

The rules a request lives by, from arrival to its answer's first byte:

  - it goes to a routable worker chosen by the routing policy, and the
    worker's in-flight lease is held for the whole exchange;
  - a worker that refuses the connection is quarantined at once and the
    request is tried on the next one, so a dead worker never costs a request
    a live one could serve;
  - a worker that sends no response headers within C{--timeout} is probed at
    once; if it hangs it is quarantined and the request is tried elsewhere,
    once; the other requests waiting on it follow (L{Dispatcher.abandon_unanswered});
  - when every worker that could serve is busy with a control call (refit,
    catch-up, wake) or suspect, the request waits for the pool to change,
    up to C{--timeout}, rather than failing;
  - a worker still starting is tried only when nothing else can serve and
    the fleet still runs its start-up weights;
  - with C{--max-inflight-per-worker N}, a generation is sent only to a
    worker with fewer than N outstanding (in flight, or video jobs running);
    the others wait in the router-side queue and are sent, the moment a slot
    frees up, to the best worker at that moment (late binding). See
    L{Dispatcher} and C{docs/scheduling.md}.

When no worker can answer, a L{RouterError} says why. Everything that
decides when and where a request is sent lives here, and nothing here knows
about routes.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.server import Request

from twisted_router.control import FleetController
from twisted_router.errors import (
    NoWorkers,
    QueueFull,
    QueueTimedOut,
    RouterError,
    WorkerFailed,
    WorkerTimedOutError,
)
from twisted_router.fleet import unavailable
from twisted_router.policies import LeastWork, RoutingPolicy
from twisted_router.pool import Activity, Worker, WorkerPool
from twisted_router.proxy import (
    ForwardResult,
    StreamingProxy,
    UpstreamBodyFailed,
    WorkerAbandoned,
    WorkerNotReady,
    WorkerTimedOut,
    WorkerUnreachable,
)
from twisted_router.requestid import record_of

__all__ = ["QUEUE_BATCH_WINDOW", "Dispatched", "Dispatcher", "QueueKey", "queue_key"]

#: Requests that join the queue within this many seconds of the first one of
#: their group form one batch, ordered longest predicted job first; batches
#: are served in arrival order (see L{queue_key}).
QUEUE_BATCH_WINDOW = 1.0

#: The order of the router-side queue: smaller first.
QueueKey = tuple[int, float, int]


def queue_key(batch: int, work: float, seq: int) -> QueueKey:
    """
    Where a queued request stands: by batch (arrival groups, oldest first),
    then longest predicted job first, then arrival order.

    Longest-processing-time-first is what brings a batch of mixed jobs close
    to the lower bound (a long job started last leaves the other workers idle
    while it finishes); applied across all of an open-loop stream, it would
    let long jobs overtake short ones that arrived much earlier. So it applies
    within a batch: requests that joined the queue within
    L{QUEUE_BATCH_WINDOW} of their batch's first one. Between batches, and for
    equal work, the queue is first come, first served.
    """
    return (batch, -work, seq)


@dataclass(eq=False)
class _Ticket:
    """A generation's place in the queue, kept across its retries."""

    key: QueueKey
    since: float


@dataclass(eq=False)
class _Queued:
    """One generation waiting in the router-side queue for a slot on a worker."""

    ticket: _Ticket
    work: float
    video: bool
    image_only: bool
    tried: set[str]
    chooser: RoutingPolicy
    granted: Deferred[Worker] = field(default_factory=Deferred)
    done: bool = False

    def fits(self, worker: Worker) -> bool:
        """Whether this request may go to C{worker} (given it is routable)."""
        return (
            (not self.video or worker.video_support)
            and (not self.image_only or worker.image_model)
            and worker.url not in self.tried
        )


@dataclass(frozen=True)
class Dispatched:
    """A request that a worker answered (its body has been streamed to the client)."""

    worker: Worker
    result: ForwardResult


def _still_starting(worker: Worker) -> bool:
    """Registered, awake, not quarantined, and has never answered."""
    return worker.activity is Activity.STARTING and not worker.is_dead and not worker.is_sleeping


class Dispatcher:
    """
    Sends requests to workers of the pool and streams their answers back.

    @ivar probe_unanswered: probes a worker at once and quarantines it if the
        probe fails; fires with whether it is still in rotation. Set when the
        health checker is wired in; without it a timeout is a 504 at once.
    """

    log = Logger()

    def __init__(
        self,
        *,
        pool: WorkerPool,
        policy: RoutingPolicy,
        proxy: StreamingProxy,
        control: FleetController,
        clock: IReactorTime,
        timeout: float,
        max_inflight_per_worker: int = 0,
        max_queue: int = 1024,
        queue_timeout: float = 600.0,
    ) -> None:
        """
        @param control: whose C{changed} signal wakes requests waiting for a
            busy worker, and whose weights decide whether a starting worker
            may be tried.
        @param timeout: C{--timeout}: how long a request may wait for
            response headers, and for a busy worker.
        @param max_inflight_per_worker: C{--max-inflight-per-worker}: 0 sends
            every request at once (no router-side queue).
        @param max_queue: C{--max-queue}: generations that may wait; more
            are answered 429.
        @param queue_timeout: C{--queue-timeout}: how long a generation may
            wait in the queue (across its retries) before a 504.
        """
        self._pool = pool
        self._policy = policy
        self._proxy = proxy
        self._control = control
        self._clock = clock
        self._timeout = timeout
        self.probe_unanswered: Callable[[Worker], Deferred[bool]] | None = None
        #: Observers (metrics): an attempt failed and the request looks for
        #: another worker (the worker, and why: unreachable, abandoned, hung,
        #: not_ready); a request answered by another worker than its first
        #: (the one that answered); a queued request given a slot (the worker,
        #: seconds it waited).
        self.on_retry: Callable[[Worker, str], None] | None = None
        self.on_failover: Callable[[Worker], None] | None = None
        self.on_queue_wait: Callable[[Worker, float], None] | None = None
        #: Per worker, the forwards still waiting for response headers, so a
        #: worker found hung can hand them to another worker at once.
        self._unanswered: dict[Worker, set[Deferred[str]]] = {}
        self._max_inflight = max_inflight_per_worker
        self._max_queue = max_queue
        self._queue_timeout = queue_timeout
        #: The router-side queue: a heap of (key, entry); entries that left
        #: (granted, cancelled, timed out) are dropped when they surface.
        self._queue: list[tuple[QueueKey, _Queued]] = []
        self._waiting = 0
        self._seq = 0
        self._batch = 0
        self._batch_started = -math.inf
        #: Slots handed to a queued request that has not taken its lease yet.
        self._reserved: dict[Worker, int] = {}
        self._draining = False
        self._drain_again = False
        if self._max_inflight > 0:
            pool.on_slot_free(lambda _worker: self._drain())
            pool.on_change(self._pool_changed)

    def abandon_unanswered(self, worker: Worker, reason: str) -> None:
        """
        C{worker} was quarantined for not answering: the requests on it that
        have no response headers yet are retried on another worker (once
        each) instead of each waiting out its own timeout.
        """
        waiting = self._unanswered.pop(worker, set())
        if waiting:
            self.log.warn(
                "retrying {count} unanswered request(s) from {worker} elsewhere",
                count=len(waiting),
                worker=worker.display_id,
            )
        for give_up in list(waiting):  # each callback may end its forward, which leaves the set
            give_up.callback(f"the worker was quarantined: {reason}")

    def _never_answered(self, tried: set[str]) -> list[Worker]:
        """Registered workers still C{starting} that this request has not tried yet."""
        return [w for w in self._pool.workers() if _still_starting(w) and w.url not in tried]

    def _first_contact(self, worker: Worker) -> bool:
        """
        A worker that never answered may take a generation only while the
        fleet runs its start-up weights, which a fresh worker holds too.
        """
        return _still_starting(worker) and not self._control.refitted

    async def _none_routable(
        self, *, video: bool, image_only: bool, tried: set[str], deadline: float
    ) -> list[Worker] | None:
        """
        No routable worker is left for a request that no worker has failed
        yet: wait for a busy one, or fall back to one still starting, or say
        why nobody can serve it.

        @return: C{None} after waiting (the pool changed, or the wait timed
            out: look again), else the starting workers to try.
        @raise RouterError: no worker can serve the request.
        """
        busy = [w for w in self._pool.coming_back(video=video) if not image_only or w.image_model]
        remaining = deadline - self._clock.seconds()
        if busy and remaining > 0:
            # Workers mid-refit, mid-catch-up or mid-wake will be back:
            # wait for them rather than fail, and never reach them early.
            await self._control.changed.wait(remaining)
            return None
        if busy:
            doing = sorted({w.activity.description if w.activity else w.state for w in busy})
            raise NoWorkers(
                f"No healthy workers available in the pool: {len(busy)} worker(s) still busy "
                f"({', '.join(doing)}) after {self._timeout:g}s"
            )
        starting = [] if video or image_only else self._never_answered(tried)
        if not starting:
            raise unavailable(self._pool, video=video, image_only=image_only)
        if self._control.refitted:
            raise NoWorkers(
                f"No healthy workers available in the pool: {len(starting)} worker(s) still starting "
                f"(never answered); the fleet is at weight version {self._control.version}, so a "
                "worker must answer and be caught up before it gets traffic"
            )
        # As the earlier router did: try one, so a wrong address or a
        # worker still loading answers 502 with the cause, not a bare 503.
        return starting

    async def dispatch(
        self,
        request: Request,
        *,
        video: bool = False,
        image: bool = False,
        path: bytes | None = None,
        capture: int = 0,
        policy: RoutingPolicy | None = None,
        work: float | None = None,
        on_answer: Callable[[Worker, ForwardResult], None] | None = None,
    ) -> Dispatched:
        """
        Send the request to one routable worker and stream its answer back.

        @param work: the predicted work units of a generation
            (L{twisted_router.cost}); C{None} for anything else. It is
            counted on the worker while the request is in flight, and a
            successful synchronous generation teaches the worker's speed.
        @param on_answer: called with the worker and the result once the
            answer has been relayed, while the lease is still held.

        A worker that cannot be reached is quarantined at once and the request
        goes to the next one, so a dead worker never costs a request that a
        live one could serve. The in-flight lease is held for the whole
        exchange and released on every path, cancellation included.

        @raise RouterError: no worker could answer (the router answers itself).
        @raise UpstreamBodyFailed: the answer broke off after it started.
        """
        chooser = policy or self._policy
        # Image calls skip video and mesh workers while the fleet has image
        # workers; a fleet with none takes them wherever it can.
        image_only = image and any(w.image_model for w in self._pool.workers() if not w.is_dead)
        tried: set[str] = set()
        last_failure: str | None = None
        retried_after_hang = False
        deadline = self._clock.seconds() + self._timeout
        ticket: _Ticket | None = None
        while True:
            if getattr(request, "channel", None) is None and tried:
                raise CancelledError("client gone; not retried")
            candidates = [
                w
                for w in self._pool.routable(video=video)
                if w.url not in tried and (not image_only or w.image_model)
            ]
            fallback: list[Worker] | None = None
            if not candidates:
                if last_failure is not None:
                    raise WorkerFailed(f"Worker request failed: {last_failure}")
                fallback = await self._none_routable(
                    video=video, image_only=image_only, tried=tried, deadline=deadline
                )
                if fallback is None:
                    continue  # waited for a busy worker: look again
                candidates = fallback
            reserved = False
            if self._max_inflight > 0 and work is not None and fallback is None:
                placed = None if self._waiting else self._place(chooser, candidates, work, {})
                if placed is not None:
                    worker = placed
                else:
                    if ticket is None:
                        ticket = self._ticket(work)
                    worker = await self._wait_in_queue(
                        ticket, work=work, video=video, image_only=image_only, tried=tried, chooser=chooser
                    )
                    reserved = True
                    if self.on_queue_wait is not None:
                        self.on_queue_wait(worker, self._clock.seconds() - ticket.since)
            else:
                worker = chooser.choose(candidates, work or 0.0)
            sent_version: list[str | None] = [worker.weight_version]

            def ready(worker: Worker = worker, sent_version: list[str | None] = sent_version) -> bool:
                # The request may have queued for a connection slot while a
                # refit or sleep started on this worker: re-check at send time.
                if worker not in self._pool:
                    return False
                if worker.routable:
                    sent_version[0] = worker.weight_version
                    return True
                if self._first_contact(worker):
                    sent_version[0] = self._control.version  # never refitted: start-up weights
                    return True
                return False

            def version_header(_: object, sent_version: list[str | None] = sent_version) -> dict[bytes, bytes]:
                version = sent_version[0]
                return {b"x-weight-version": version.encode()} if version else {}

            give_up: Deferred[str] = Deferred()
            unanswered = self._unanswered.setdefault(worker, set())
            unanswered.add(give_up)
            timed_out: WorkerTimedOut | None = None
            sent = self._clock.seconds()
            with self._pool.lease(worker, work or 0.0):
                if reserved:
                    self._unreserve(worker)  # the lease holds the slot from here
                try:
                    result = await self._proxy.forward(
                        request,
                        worker.url,
                        path=path,
                        capture_limit=capture,
                        extra_response_headers=version_header,
                        ready=ready,
                        give_up=give_up,
                        keep_load_if_abandoned=True,
                    )
                except WorkerNotReady:
                    self._retrying(worker, "not_ready")
                    continue  # pick again (or wait) with the pool as it is now
                except WorkerAbandoned as exc:
                    self._pool.record_request_failure(worker, str(exc))
                    self._retrying(worker, "abandoned")
                    if retried_after_hang:
                        raise WorkerFailed(f"Worker request failed: {worker.display_id}: {exc}") from None
                    retried_after_hang = True
                    tried.add(worker.url)
                    last_failure = f"{worker.display_id}: {exc}"
                    continue
                except WorkerUnreachable as exc:
                    tried.add(worker.url)
                    last_failure = f"{worker.display_id}: {exc}"
                    self._pool.record_request_failure(worker, str(exc))
                    self._retrying(worker, "unreachable")
                    if worker.activity is Activity.STARTING:
                        # It may still be loading: refusing connections is expected, not a fault.
                        self.log.info(
                            "worker {worker} is still starting (not quarantined): {reason}",
                            worker=worker.display_id,
                            reason=str(exc),
                        )
                        continue
                    if self._pool.quarantine(worker, f"unreachable: {exc}"):
                        self.log.warn(
                            "worker {worker} quarantined: unreachable ({reason}); retrying request {request_id} elsewhere",
                            worker=worker.display_id,
                            reason=str(exc),
                            request_id=_request_id(request),
                        )
                    continue
                except WorkerTimedOut as exc:
                    self._pool.record_request_failure(worker, str(exc))
                    timed_out = exc
                except UpstreamBodyFailed as exc:
                    self._pool.record_request_failure(worker, str(exc))
                    self.log.warn(
                        "answer from {worker} to request {request_id} broke off: {reason}",
                        worker=worker.display_id,
                        reason=str(exc),
                        request_id=_request_id(request),
                    )
                    raise
                finally:
                    _note_worker(request, worker, sent_version[0])
                    unanswered.discard(give_up)
                    if not unanswered and self._unanswered.get(worker) is unanswered:
                        del self._unanswered[worker]
                if timed_out is None and on_answer is not None:
                    # Still holding the lease: what the answer starts (a video
                    # job) is counted before the slot is seen to be free.
                    on_answer(worker, result)
            if timed_out is not None:
                # Slow or hung? Ask at once rather than at the next health
                # round: a hung worker is quarantined, and this request (which
                # got nothing from it) is retried elsewhere, once.
                if self.probe_unanswered is not None and not retried_after_hang:
                    if not await self.probe_unanswered(worker) and not _client_gone(request):
                        retried_after_hang = True
                        tried.add(worker.url)
                        last_failure = f"{worker.display_id}: {timed_out}"
                        self._retrying(worker, "hung")
                        continue
                if _client_gone(request):
                    # An abandoned generation kept as load until now: nobody is
                    # left to answer, so end like any client that went away.
                    raise CancelledError()
                raise WorkerTimedOutError(f"Worker request failed: {worker.display_id}: {timed_out}")
            if work and not video and 200 <= result.status < 300:
                # A video creation returns before the work is done: only
                # synchronous generations measure the worker's speed.
                worker.speed.observe(sent, self._clock.seconds(), work)
                for other in self._pool.workers():
                    if other.speed.samples == 0:
                        other.speed.adopt(worker.speed)
            if tried and self.on_failover is not None:
                self.on_failover(worker)  # another worker failed it first
            return Dispatched(worker, result)

    def _retrying(self, worker: Worker, reason: str) -> None:
        if self.on_retry is not None:
            self.on_retry(worker, reason)

    @property
    def weighs_work(self) -> bool:
        """
        Whether requests' work is predicted: only when something uses it
        (the C{least-work} policy, or the queue, which orders by work and
        queues only generations), so otherwise the request path parses no
        bodies.
        """
        return self._policy.name == "least-work" or self._max_inflight > 0

    # ------------------------------------------------------------------ the router-side queue

    def _has_room(self, worker: Worker) -> bool:
        return worker.outstanding + self._reserved.get(worker, 0) < self._max_inflight

    def _unreserve(self, worker: Worker) -> None:
        left = self._reserved.get(worker, 0) - 1
        if left > 0:
            self._reserved[worker] = left
        else:
            self._reserved.pop(worker, None)

    def _ticket(self, work: float) -> _Ticket:
        """
        A place in the queue for a generation that has not queued before
        (L{queue_key}). A retried request keeps its ticket, and is let in
        even when the queue is full: it was admitted already.

        @raise QueueFull: C{--max-queue} requests are waiting already.
        """
        if self._waiting >= self._max_queue:
            raise QueueFull(
                f"the router's queue is full ({self._max_queue} requests waiting; --max-queue)",
                retry_after=self._retry_after(),
            )
        now = self._clock.seconds()
        if now - self._batch_started > QUEUE_BATCH_WINDOW:
            self._batch += 1
            self._batch_started = now
        self._seq += 1
        return _Ticket(queue_key(self._batch, work, self._seq), now)

    def _retry_after(self) -> int:
        """Seconds until the queue has likely drained: all the work waiting or outstanding over the fleet's speed."""
        workers = self._pool.routable()
        speed = sum(w.speed.units_per_second for w in workers)
        work = sum(w.predicted_work for w in workers) + sum(e.work for _, e in self._queue if not e.done)
        if speed <= 0:
            return 60
        return int(min(3600.0, max(1.0, math.ceil(work / speed))))

    async def _wait_in_queue(
        self,
        ticket: _Ticket,
        *,
        work: float,
        video: bool,
        image_only: bool,
        tried: set[str],
        chooser: RoutingPolicy,
    ) -> Worker:
        """
        Wait in the queue until a slot on a worker that fits is handed over
        (reserved for this request: take the lease at once).

        @raise QueueTimedOut: it waited C{--queue-timeout} in all.
        @raise CancelledError: the client went away (it left the queue).
        @raise RouterError: no worker that could serve it is left.
        """
        remaining = ticket.since + self._queue_timeout - self._clock.seconds()
        if remaining <= 0:
            raise QueueTimedOut(self._timed_out_message())
        entry = _Queued(ticket, work, video, image_only, tried, chooser)

        def leave(_: Deferred[Worker]) -> None:
            self._leave(entry)  # the client went away: the request leaves the queue

        entry.granted = Deferred(leave)
        heapq.heappush(self._queue, (ticket.key, entry))
        self._waiting += 1

        def expire() -> None:
            if self._leave(entry):
                entry.granted.errback(QueueTimedOut(self._timed_out_message()))

        timer = self._clock.callLater(remaining, expire)
        try:
            self._drain()
            return await entry.granted
        finally:
            if timer.active():
                timer.cancel()

    def _timed_out_message(self) -> str:
        return f"Request timed out waiting in the router's queue for {self._queue_timeout:g}s (--queue-timeout)"

    def _leave(self, entry: _Queued) -> bool:
        """Take C{entry} out of the queue (lazily); C{False} if it had already left."""
        if entry.done:
            return False
        entry.done = True
        self._waiting -= 1
        if len(self._queue) > 2 * self._waiting + 64:
            # Many left from the middle (hang-ups, timeouts): compact.
            self._queue = [item for item in self._queue if not item[1].done]
            heapq.heapify(self._queue)
        return True

    def _pool_changed(self) -> None:
        """
        A worker became routable or stopped being so: send what can go now,
        and fail the queued requests that no worker is left to serve.
        """
        self._drain()
        for _, entry in list(self._queue):
            if entry.done:
                continue
            fits = [w for w in self._pool.workers() if entry.fits(w)]
            if not any(w.routable or w.coming_back for w in fits) and self._leave(entry):
                error: RouterError = unavailable(self._pool, video=entry.video, image_only=entry.image_only)
                entry.granted.errback(error)

    def _drain(self) -> None:
        """
        Hand free slots to queued requests, best first, each to the best
        worker for it at this moment. Re-entrant calls (a granted request
        that fails at once frees its slot again) are folded into this one.
        """
        if not self._waiting:
            return
        if self._draining:
            self._drain_again = True
            return
        self._draining = True
        try:
            again = True
            while again:
                self._drain_again = False
                self._drain_once()
                again = self._drain_again and self._waiting > 0
        finally:
            self._draining = False

    def _place(
        self, chooser: RoutingPolicy, candidates: list[Worker], work: float, backlog: dict[Worker, float]
    ) -> Worker | None:
        """
        The worker with a free slot that a request of C{work} units should
        go to now, or C{None} if it should wait.

        Other policies take any candidate with room. C{least-work} looks at
        every candidate, full ones included: when a full worker would still
        finish the request first (a fast worker with a job to go beats an
        idle one four times slower), the request waits for it rather than
        being sent to a worker with room that would finish it later; the
        queue hands the slot over when it frees. C{backlog} is work already
        promised to full workers by requests ahead of this one in the queue
        (a list schedule: each request, in queue order, goes to the worker
        that would finish it first given everything ahead of it).
        """
        roomy = [w for w in candidates if self._has_room(w)]
        if not roomy:
            return None
        if not isinstance(chooser, LeastWork):
            return chooser.choose(roomy, work)

        def finish(w: Worker) -> float:
            return (w.predicted_work + backlog.get(w, 0.0) + work) * w.speed.seconds_per_unit

        best = min(finish(w) for w in roomy)
        full = [w for w in candidates if not self._has_room(w)]
        if full:
            waiting_for = min(full, key=finish)
            if finish(waiting_for) < best * (1 - 1e-9):
                backlog[waiting_for] = backlog.get(waiting_for, 0.0) + work
                return None
        return chooser.choose(roomy, work)

    def _drain_once(self) -> None:
        open_workers = [w for w in self._pool.routable() if self._has_room(w)]
        skipped: list[tuple[QueueKey, _Queued]] = []
        backlog: dict[Worker, float] = {}
        try:
            while open_workers and self._queue:
                item = heapq.heappop(self._queue)
                entry = item[1]
                if entry.done:
                    continue
                if not any(entry.fits(w) for w in open_workers):
                    skipped.append(item)  # e.g. a video while only image workers have room
                    continue
                candidates = [w for w in self._pool.routable(video=entry.video) if entry.fits(w)]
                placed = self._place(entry.chooser, candidates, entry.work, backlog)
                if placed is None:
                    skipped.append(item)  # waits for a better worker that is full now
                    continue
                worker = placed
                self._leave(entry)
                self._reserved[worker] = self._reserved.get(worker, 0) + 1
                entry.granted.callback(worker)  # the request takes its lease now
                open_workers = [w for w in open_workers if w.routable and self._has_room(w)]
        finally:
            for item in skipped:
                heapq.heappush(self._queue, item)

    def queue_status(self) -> dict[str, float | int]:
        """C{queued_requests} and C{oldest_queued_wait} (seconds), for C{/health} and C{/workers}."""
        now = self._clock.seconds()
        waits = [now - e.ticket.since for _, e in self._queue if not e.done]
        return {
            "queued_requests": self._waiting,
            "oldest_queued_wait": round(max(waits), 3) if waits else 0.0,
        }

    @property
    def max_inflight_per_worker(self) -> int:
        """C{--max-inflight-per-worker} (0: no router-side queue)."""
        return self._max_inflight

    async def forward_to(
        self, request: Request, worker: Worker, *, path: bytes | None = None, capture: int = 0
    ) -> Dispatched:
        """Send a request to one particular worker (sticky routing): no retry elsewhere."""
        _note_worker(request, worker, worker.weight_version)
        with self._pool.lease(worker):
            try:
                result = await self._proxy.forward(request, worker.url, path=path, capture_limit=capture)
            except (WorkerUnreachable, WorkerTimedOut) as exc:
                self._pool.record_request_failure(worker, str(exc))
                failed = WorkerTimedOutError if isinstance(exc, WorkerTimedOut) else WorkerFailed
                raise failed(f"Worker request failed: {worker.display_id}: {exc}") from None
            except UpstreamBodyFailed as exc:
                self._pool.record_request_failure(worker, str(exc))
                raise
        return Dispatched(worker, result)


def _note_worker(request: Request, worker: Worker, version: str | None) -> None:
    """Record on the request which worker it was sent to, with which weights (access log, metrics)."""
    record = record_of(request)
    if record is not None:
        record.worker = worker.url
        record.weight_version = version or ""


def _request_id(request: Request) -> str:
    """The request's id for log lines (C{-} when it has no record, as in tests without the Site)."""
    record = record_of(request)
    return record.request_id if record is not None else "-"


def _client_gone(request: Request) -> bool:
    """The client's connection is closed (Twisted marks the request when it is lost)."""
    return bool(getattr(request, "_disconnected", False))
