# -*- test-case-name: tests.unit.test_pool -*-
"""
The worker registry and each worker's state.

Pure bookkeeping: no I/O and no reactor, so every rule here (who is routable,
when a worker is quarantined, that an in-flight count is released exactly
once) is tested without a network. Everything runs on the reactor thread, so
there are no locks; the only concurrency hazard left is a count that is taken
on one code path and released on another, which is why in-flight counting is
only available through L{WorkerPool.lease}.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from types import TracebackType
from typing import Any
from urllib.parse import unquote

from twisted_router.cost import SpeedEstimate
from twisted_router.tasks import IMAGE_TASK_TYPES, VIDEO_INCAPABLE_TASK_TYPES
from twisted_router.urls import (
    WorkerURLError,
    display_id_for,
    normalize_worker_url,
    worker_id_for,
)

__all__ = [
    "Activity",
    "Lease",
    "UnknownWorker",
    "Worker",
    "WorkerPool",
]

class Activity(Enum):
    """
    What a live worker is busy with. A worker with an activity gets no new
    requests: that is the one rule (L{Worker.routable}) that keeps requests
    off a worker whose weights or memory are changing. The value is the
    state word C{/workers} shows.
    """

    #: Registered, has not answered yet (it may still be loading its model):
    #: probed until it answers, never quarantined for not answering.
    STARTING = "starting"
    #: A refit broadcast is running on it.
    UPDATING = "updating"
    #: Being caught up to the fleet's weights before it gets traffic.
    SYNCING = "syncing"
    #: A sleep broadcast is running on it.
    RELEASING = "releasing"
    #: A wake broadcast is running on it.
    RESUMING = "resuming"
    #: It joined a sleeping fleet and is being put to sleep too (or, if the
    #: fleet woke meanwhile, let in).
    JOINING = "joining"

    @property
    def description(self) -> str:
        """The activity in words, for error messages and logs."""
        return _DESCRIPTIONS[self]

    @property
    def waited_for(self) -> bool:
        """
        Whether requests wait for a worker busy with this: every control
        operation ends soon; a worker still starting may never answer.
        """
        return self is not Activity.STARTING


_DESCRIPTIONS = {
    Activity.STARTING: "starting",
    Activity.UPDATING: "updating weights",
    Activity.SYNCING: "syncing weights",
    Activity.RELEASING: "releasing memory",
    Activity.RESUMING: "resuming memory",
    Activity.JOINING: "joining asleep",
}

#: Longest C{last_error} kept: the failure describer's texts are shorter;
#: this bounds what a worker's answer could make the router hold and show.
MAX_ERROR_TEXT = 300

#: A URL whose "//" after the scheme was merged into one slash.
_MERGED_SCHEME = re.compile(r"^(https?):/(?!/)", re.IGNORECASE)


@dataclass(eq=False)
class Worker:
    """
    One registered worker and everything the router knows about it.

    Compared and hashed by identity (C{eq=False}): a worker removed and
    registered again is a new object, so a lease or probe still holding the
    old one can never touch the new one's counters.

    @ivar url: canonical C{scheme://host:port}.
    @ivar worker_id: C{url} fully percent-encoded; the id in C{/workers/{id}}.
    @ivar display_id: C{host:port}, for humans.
    @ivar active_requests: requests in flight now; only L{WorkerPool.lease}
        changes it.
    @ivar consecutive_failures: failed health probes since the last success.
    @ivar is_dead: quarantined; gets no traffic and is no longer probed until
        an operator re-admits it (it may hold stale weights).
    @ivar is_suspect: its last health probe failed or timed out; gets no new
        requests until a probe succeeds again (probed every second meanwhile),
        so a hung worker stops getting traffic long before the failure
        threshold quarantines it.
    @ivar is_sleeping: memory released (C{/release_memory_occupation}); gets
        no traffic until woken.
    @ivar task_type: C{data[0].task_type} of the worker's C{/v1/models}.
    @ivar model_id: C{data[0].id} of the worker's C{/v1/models}.
    @ivar weight_version: the fleet weight version this worker is known to
        hold; C{None} when unknown (just registered, re-admitted or restarted:
        it may hold anything until it has been caught up).
    @ivar model_path: the C{model_path} of the last weight update it applied.
    @ivar weights_seq: which of the router's refits it holds (0: start-up
        weights), compared instead of the caller-chosen label, which may repeat.
    @ivar admissions: times it has (re)joined; a broadcast result that
        arrives after the worker rejoined concerns the previous process.
    @ivar activity: what it is busy with (L{Activity}), if anything; a
        worker with an activity gets no new requests. Only the pool's
        transitions (L{WorkerPool.begin}, L{WorkerPool.end}) change it.
    @ivar total_requests: requests ever dispatched to it.
    @ivar failed_requests: dispatched requests that failed in transport
        (unreachable, dropped, timed out), as recorded by the dispatcher.
    @ivar last_error: the last failure seen on it (a failed request or
        health probe), in a few words (at most L{MAX_ERROR_TEXT} characters).
    @ivar last_error_at: when C{last_error} happened (the pool's clock), so a
        dashboard can tell a failure of a second ago from one of last week.
    @ivar predicted_work: work units (L{twisted_router.cost}) of the
        generations outstanding on it: those in flight (taken and given back
        by L{WorkerPool.lease} with the count) and the video jobs it is
        still running (L{twisted_router.jobs.JobOwners}).
    @ivar running_jobs: video jobs created on it that the router has not
        yet seen finish; they count against C{--max-inflight-per-worker}
        like requests in flight, since the worker is busy with them.
    @ivar speed: its learned speed (L{SpeedEstimate}).
    @ivar managed: started by the launcher, which registers it again (on a
        new port) after a router restart: not kept in the durable state.
    """

    url: str
    worker_id: str
    display_id: str
    active_requests: int = 0
    consecutive_failures: int = 0
    is_dead: bool = False
    dead_reason: str | None = None
    is_sleeping: bool = False
    is_suspect: bool = False
    task_type: str | None = None
    model_id: str | None = None
    weight_version: str | None = None
    model_path: str | None = None
    activity: Activity | None = None
    weights_seq: int | None = None
    admissions: int = 0
    total_requests: int = 0
    failed_requests: int = 0
    registered_at: float = field(default_factory=time.time)
    last_probe_ok_at: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    predicted_work: float = 0.0
    running_jobs: int = 0
    speed: SpeedEstimate = field(default_factory=SpeedEstimate)
    managed: bool = False

    @classmethod
    def for_url(cls, url: str, *, registered_at: float | None = None) -> Worker:
        """
        Build a worker for an already-normalised URL, deriving both ids, so
        the three names can never disagree.
        """
        worker = cls(url=url, worker_id=worker_id_for(url), display_id=display_id_for(url))
        if registered_at is not None:
            worker.registered_at = registered_at
        return worker

    @property
    def video_support(self) -> bool:
        """
        Whether C{/v1/videos} may go here. Unknown task type means no: sending
        a video job to an image worker fails, refusing it up front does not.
        """
        return self.task_type is not None and self.task_type not in VIDEO_INCAPABLE_TASK_TYPES

    @property
    def image_model(self) -> bool:
        """Known to serve an image model (text/image-to-image)."""
        return self.task_type in IMAGE_TASK_TYPES

    @property
    def routable(self) -> bool:
        """Whether new requests may be sent here."""
        return not self.is_dead and not self.is_sleeping and not self.is_suspect and self.activity is None

    @property
    def coming_back(self) -> bool:
        """
        Busy with a control operation, or suspect: it will soon be routable
        or quarantined, so requests are worth waiting for.
        """
        return (
            not self.is_dead
            and not self.is_sleeping
            and (self.is_suspect or self.activity is not None)
            and (self.activity is None or self.activity.waited_for)
        )

    @property
    def state(self) -> str:
        """One word for dashboards: dead, sleeping, syncing, updating, ..., suspect or ready."""
        if self.is_dead:
            return "dead"
        if self.is_sleeping:
            return "sleeping"
        if self.activity is not None:
            return self.activity.value
        if self.is_suspect:
            return "suspect"
        return "ready"

    def payload(self) -> dict[str, Any]:
        """The JSON-able C{/workers} representation (the first keys are the ones existing scripts read)."""
        return {
            "worker_id": self.worker_id,
            "display_id": self.display_id,
            "url": self.url,
            "active_requests": self.active_requests,
            "is_dead": self.is_dead,
            "is_sleeping": self.is_sleeping,
            "is_suspect": self.is_suspect,
            "consecutive_failures": self.consecutive_failures,
            "video_support": self.video_support,
            "state": self.state,
            "syncing": self.activity is Activity.SYNCING,
            "weight_version": self.weight_version,
            "model_path": self.model_path,
            "dead_reason": self.dead_reason,
            "task_type": self.task_type,
            "model_id": self.model_id,
            "total_requests": self.total_requests,
            "failed_requests": self.failed_requests,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "registered_at": self.registered_at,
            "last_probe_ok_at": self.last_probe_ok_at,
            "predicted_work": round(self.predicted_work, 3),
            "running_jobs": self.running_jobs,
            "speed": round(self.speed.units_per_second, 6),
            "speed_samples": self.speed.samples,
        }

    @property
    def outstanding(self) -> int:
        """Requests in flight plus video jobs running: what C{--max-inflight-per-worker} bounds."""
        return self.active_requests + self.running_jobs

    def add_work(self, work: float) -> None:
        """Count C{work} more (or, negative, fewer) outstanding units; never below zero."""
        self.predicted_work = max(0.0, self.predicted_work + work)
        if self.predicted_work < 1e-9:
            self.predicted_work = 0.0  # float residue of many additions and subtractions


class UnknownWorker(KeyError):
    """No worker in the pool matches the given id or URL."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key

    def __str__(self) -> str:
        # KeyError's str() is the repr of its argument; make it a sentence.
        return f"Worker not found: {self.key!r}"


class Lease:
    """
    One in-flight request on one worker, as a context manager.

    The count is taken on C{__enter__} and given back exactly once, on
    C{__exit__} or L{release}, whichever comes first, on every path: normal
    exit, exception, C{GeneratorExit}/cancellation of an enclosing coroutine.
    A leaked count would make least-request avoid a healthy worker forever.

    @ivar work: predicted work units of the request, counted in the worker's
        C{predicted_work} exactly as long as the in-flight count.
    """

    def __init__(self, worker: Worker, work: float = 0.0, on_release: Callable[[Worker], None] | None = None) -> None:
        self.worker = worker
        self.work = work
        self._on_release = on_release
        self._entered = False
        self._released = False

    def __enter__(self) -> Worker:
        if self._entered:
            raise RuntimeError("a Lease can only be entered once")
        self._entered = True
        self.worker.active_requests += 1
        self.worker.total_requests += 1
        if self.work:
            self.worker.add_work(self.work)
        return self.worker

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    @property
    def released(self) -> bool:
        """Whether the count has been given back."""
        return self._released

    def release(self) -> None:
        """
        Give the count back now (idempotent), for callback-style code where
        the request ends outside the C{with} block's frame.
        """
        if not self._entered or self._released:
            return
        self._released = True
        # Never below zero, even if something else has already reset it.
        self.worker.active_requests = max(0, self.worker.active_requests - 1)
        if self.work:
            self.worker.add_work(-self.work)
        if self._on_release is not None:
            self._on_release(self.worker)


class WorkerPool:
    """
    The registry: workers in registration order, keyed by canonical URL.

    @param now: the clock for timestamps (C{time.time} by default); tests
        inject a fake one.
    """

    def __init__(self, now: Callable[[], float] = time.time) -> None:
        self._now = now
        # dicts keep insertion order, which is the registration order.
        self._workers: dict[str, Worker] = {}
        self._listeners: list[Callable[[], None]] = []
        self._added_listeners: list[Callable[[Worker], None]] = []
        self._release_listeners: list[Callable[[Worker], None]] = []
        self._batch_depth = 0
        self._changed_in_batch = False
        self._busy_listeners: list[Callable[[], None]] = []
        self._busy_in_batch = False

    # -- change signal ----------------------------------------------------

    def on_change(self, listener: Callable[[], None]) -> None:
        """
        Call C{listener} after every transition that may change which
        workers are routable or waited for (one that ends an activity, wakes,
        recovers, quarantines, re-admits or removes a worker), so requests
        waiting for a worker re-check the pool. Starting an activity is not
        signalled: it never lets a waiting request in.
        """
        self._listeners.append(listener)

    def on_busy(self, listener: Callable[[], None]) -> None:
        """
        Call C{listener} after a worker begins an activity (the transitions
        L{on_change} leaves out), batched like them by L{changes}: for
        observers of every state change, such as the state log, not for
        requests waiting for a worker.
        """
        self._busy_listeners.append(listener)

    @contextmanager
    def changes(self) -> Iterator[None]:
        """
        Make the transitions inside one change: the listeners hear of it once,
        at the end.

        Listeners run synchronously (a waiting request may be sent at once),
        so a step that takes several transitions, such as ending a worker's
        refit and then quarantining it because the refit failed, must not let
        anyone look at the pool half-way: in between, that worker would look
        routable.
        """
        self._batch_depth += 1
        try:
            yield
        finally:
            self._batch_depth -= 1
            if self._batch_depth == 0:
                changed, busy = self._changed_in_batch, self._busy_in_batch
                self._changed_in_batch = self._busy_in_batch = False
                if changed:
                    self._signal()
                elif busy:
                    self._signal_busy()

    def _changed(self) -> None:
        if self._batch_depth:
            self._changed_in_batch = True
        else:
            self._signal()

    def _signal(self) -> None:
        for listener in list(self._listeners):
            listener()

    def _went_busy(self) -> None:
        if self._batch_depth:
            self._busy_in_batch = True
        else:
            self._signal_busy()

    def _signal_busy(self) -> None:
        for listener in list(self._busy_listeners):
            listener()

    def on_added(self, listener: Callable[[Worker], None]) -> None:
        """
        Call C{listener} with each newly registered worker. Not a change
        signal: a new worker is starting and lets no waiting request in; the
        durable state records the registration.
        """
        self._added_listeners.append(listener)

    # -- membership -----------------------------------------------------

    def add(self, raw_url: str, *, activity: Activity | None = None) -> tuple[Worker, bool]:
        """
        Register a worker, idempotently.

        @param activity: what a new worker is busy with from its registration
            on (C{STARTING}: no traffic before it has answered once); the
            added listeners see it in that state. An existing worker keeps its own.
        @return: C{(worker, created)}; C{created} is C{False} when the URL (in
            any spelling) is already registered, and the existing worker,
            with its state, is returned.
        @raise WorkerURLError: the URL is invalid or blocked.
        """
        url = normalize_worker_url(raw_url)
        existing = self._workers.get(url)
        if existing is not None:
            return existing, False
        worker = Worker.for_url(url, registered_at=self._now())
        worker.activity = activity
        self._workers[url] = worker
        for listener in list(self._added_listeners):
            listener(worker)
        return worker, True

    def remove(self, key: str) -> Worker:
        """
        Deregister a worker; leases and probes still holding it finish
        harmlessly on the detached object.

        @param key: a worker id (percent-encoded URL, as in
            C{/workers/{worker_id}}), or a URL in any spelling, or a unique
            C{display_id}.
        @raise UnknownWorker: nothing matches.
        """
        worker = self.get(key)
        if worker is None:
            raise UnknownWorker(key)
        del self._workers[worker.url]
        self._changed()  # requests waiting for it must not wait any longer
        return worker

    def get(self, key: str) -> Worker | None:
        """
        Find a worker by id, URL or unique display id (see L{remove});
        C{None} if nothing matches. Never raises on a malformed key, because
        keys come straight from request paths.
        """
        if not isinstance(key, str):
            return None
        found = self._workers.get(key)
        if found is not None:
            return found
        # Request paths arrive with duplicate slashes merged, so a plain URL in
        # /workers/http://h:1 is seen as http:/h:1: restore its "//".
        plain = unquote(key)
        for candidate in (plain, key, _MERGED_SCHEME.sub(r"\1://", plain)):
            try:
                url = normalize_worker_url(candidate)
            except WorkerURLError:
                continue
            found = self._workers.get(url)
            if found is not None:
                return found
        stripped = key.strip()
        by_display = [w for w in self._workers.values() if w.display_id == stripped]
        if len(by_display) == 1:
            return by_display[0]
        return None

    def __iter__(self) -> Iterator[Worker]:
        # Iterate over a snapshot, so callers may add or remove while iterating.
        return iter(list(self._workers.values()))

    def __len__(self) -> int:
        return len(self._workers)

    def __contains__(self, item: object) -> bool:
        """A L{Worker} is in the pool only if it is I{this} registration of its URL."""
        if isinstance(item, Worker):
            return self._workers.get(item.url) is item
        if isinstance(item, str):
            return self.get(item) is not None
        return False

    def workers(self) -> list[Worker]:
        """All workers, in registration order."""
        return list(self._workers.values())

    def busy_with(self, activity: Activity) -> list[Worker]:
        """Workers busy with C{activity}, in registration order."""
        return [w for w in self._workers.values() if w.activity is activity]

    def coming_back(self, *, video: bool = False) -> list[Worker]:
        """Workers busy with a control operation (weights, memory) that requests may wait for."""
        return [
            w for w in self._workers.values() if w.coming_back and (not video or w.video_support)
        ]

    def routable(self, *, video: bool = False) -> list[Worker]:
        """
        Workers that may take a new request now, in registration order.

        @param video: only those that can serve C{/v1/videos}.
        """
        return [w for w in self._workers.values() if w.routable and (not video or w.video_support)]

    # -- load -----------------------------------------------------------

    def lease(self, worker: Worker, work: float = 0.0) -> Lease:
        """
        Count one in-flight request on C{worker} (and its C{work} units) for
        the duration of a C{with} block (see L{Lease}). Works on a worker
        removed meanwhile. The release listeners hear of each release.
        """
        return Lease(worker, work, self.slot_free if self._release_listeners else None)

    def on_slot_free(self, listener: Callable[[Worker], None]) -> None:
        """
        Call C{listener} with the worker each time a lease is given back or
        a video job on it ends: a request slot on it is free (the
        router-side queue sends its next request there).
        """
        self._release_listeners.append(listener)

    def slot_free(self, worker: Worker) -> None:
        """Tell the slot listeners that C{worker} has one more free slot."""
        for listener in list(self._release_listeners):
            listener(worker)

    def record_request_failure(self, worker: Worker, reason: str) -> None:
        """
        Note a dispatched request that failed in transport (the worker did not
        answer), for C{/workers} and metrics.
        """
        worker.failed_requests += 1
        self._note_error(worker, reason)

    def _note_error(self, worker: Worker, reason: str) -> None:
        """Keep the last failure and its time; the text is cut to a bounded size."""
        if len(reason) > MAX_ERROR_TEXT:
            reason = reason[: MAX_ERROR_TEXT - 1] + "\u2026"
        worker.last_error = reason
        worker.last_error_at = self._now()

    # -- health ---------------------------------------------------------

    def record_probe_success(self, worker: Worker) -> None:
        """A health probe answered 200: the failure streak is over, and it may serve again."""
        was_suspect = worker.is_suspect
        worker.consecutive_failures = 0
        worker.is_suspect = False
        worker.last_probe_ok_at = self._now()
        if was_suspect:
            self._changed()

    def record_probe_failure(self, worker: Worker, reason: str, threshold: int) -> bool:
        """
        A health probe failed; quarantine the worker when the streak reaches
        C{threshold}.

        Any failure makes an active worker suspect: no new requests until a
        probe succeeds again.

        A sleeping worker's failures are counted but never quarantine it:
        quarantine is sticky (only an operator lifts it), and a worker that is
        releasing or restoring memory is in transition; it gets no traffic
        anyway, and a failed wake shows the problem.

        @return: C{True} iff the worker became dead because of this failure.
        """
        worker.consecutive_failures += 1
        self._note_error(worker, reason)
        if worker.is_dead or worker.is_sleeping or worker.activity is Activity.STARTING:
            # A worker that never answered yet is still loading, not failing.
            return False
        with self.changes():
            if not worker.is_suspect:
                worker.is_suspect = True
                self._changed()
            if worker.consecutive_failures >= max(1, threshold):
                return self.quarantine(
                    worker,
                    f"failed {worker.consecutive_failures} consecutive health checks (last: {reason})",
                )
        return False

    def quarantine(self, worker: Worker, reason: str) -> bool:
        """
        Take a worker out of rotation until an operator re-admits it.

        @return: C{True} iff it was not already dead (the first reason is
            kept, because it is the one that explains the outage).
        """
        if worker.is_dead:
            return False
        worker.is_dead = True
        worker.is_suspect = False  # dead says more
        worker.dead_reason = reason
        self._changed()
        return True

    def readmit(self, worker: Worker) -> None:
        """
        Put a quarantined worker back in rotation with a clean failure streak.

        Its weights are unknown: the caller hands it to the control plane in
        the same L{changes} block, so nobody sees it routable before that.
        """
        worker.is_dead = False
        worker.dead_reason = None
        worker.consecutive_failures = 0
        worker.is_suspect = False
        self._changed()

    def set_sleeping(self, worker: Worker, sleeping: bool) -> None:
        """Record a successful sleep (C{True}) or wake (C{False}) broadcast."""
        if worker.is_sleeping != sleeping:
            worker.is_sleeping = sleeping
            self._changed()

    # -- activities -------------------------------------------------------

    def begin(self, worker: Worker, activity: Activity) -> None:
        """
        C{worker} is busy with C{activity} from now on: no new requests until
        it ends (those already sent run on).

        @raise ValueError: the worker is quarantined; only re-admission
            brings a dead worker back, never a control operation.
        """
        if worker.is_dead:
            raise ValueError(f"worker {worker.display_id} is quarantined; it cannot begin {activity.description}")
        if worker.activity is not activity:
            worker.activity = activity
            self._went_busy()

    def end(self, worker: Worker, activity: Activity | None = None) -> bool:
        """
        C{worker}'s C{activity} is over (any activity when C{None}); another
        activity that replaced it meanwhile is left alone.

        @return: whether an activity ended.
        """
        if worker.activity is None or (activity is not None and worker.activity is not activity):
            return False
        worker.activity = None
        self._changed()
        return True

    def set_capabilities(
        self, worker: Worker, *, task_type: str | None, model_id: str | None, num_gpus: int | None = None
    ) -> None:
        """
        Record what the worker's C{/v1/models} card says it serves, and seed
        its speed from its GPU count until it has completed a generation.
        """
        worker.task_type = task_type
        worker.model_id = model_id
        worker.speed.seed(num_gpus)

    def counts(self) -> dict[str, int]:
        """The numbers C{GET /health} reports."""
        workers = list(self._workers.values())
        return {
            "healthy_workers": sum(1 for w in workers if w.routable),
            "total_workers": len(workers),
            "dead_workers": sum(1 for w in workers if w.is_dead),
            "sleeping_workers": sum(1 for w in workers if w.is_sleeping),
            "busy_workers": sum(1 for w in workers if w.coming_back),
        }
