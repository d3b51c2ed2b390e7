"""
The RL control plane: fleet-wide weight refits and sleep/wake, with the
invariant that no worker serves generations on weights older than the fleet's.

How the invariant is kept:

  - The router records the fleet's weights: the body of the last successful
    C{update_weights_from_disk} and its version (the request's
    C{weight_version}, else a counter). Version C{"0"} means the weights the
    workers were started with.
  - Every operation that changes what weights a worker holds (refit, sleep,
    wake, catch-up) runs under one lock, so they never interleave.
  - A worker being updated, or caught up, or put to sleep or woken, has an
    L{Activity} and gets no new requests; requests wait for it (bounded by
    the request timeout) instead of reaching a worker mid-change. Activities
    begin and end only through the pool's transitions, which wake waiting
    requests themselves; each worker's outcome is applied as one change
    (L{WorkerPool.changes}), so nobody sees a worker routable between the
    end of its refit and its quarantine.
  - A worker whose weights are unknown (just registered, re-admitted after
    quarantine, restarted) or older than the fleet's (slept through a refit)
    is first sent the fleet's last update body, and becomes routable only
    when that succeeds. A failed refit or catch-up quarantines the worker.
  - A worker that joins while the fleet sleeps is put to sleep too before it
    gets any traffic, and wakes (and is caught up) with the fleet.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import CancelledError, Deferred, DeferredLock
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_router.calls import WorkerCaller, WorkerReply
from twisted_router.errors import Conflict, NoWorkers
from twisted_router.labels import WeightLabels
from twisted_router.pool import Activity, Worker, WorkerPool

INITIAL_VERSION = "0"


class RefitJournal(Protocol):
    """
    Where refits are recorded durably (C{--state-dir}): an entry before any
    worker is sent a refit, its outcome after.
    """

    def refit_started(self, version: str, model_path: str, targets: list[Worker]) -> None:
        """Record the refit durably before it is sent; raise a router error if that fails (it is not sent)."""

    def refit_finished(self, outcome: str) -> None:
        """Record the outcome of the refit last started: succeeded, partial, rejected, failed or interrupted."""


@dataclass(frozen=True)
class FleetWeights:
    """
    The fleet's weights as the durable state keeps them.

    @ivar refits: successful refits so far (the router's own count).
    @ivar body: the last successful refit's body, C{None} before any.
    @ivar labels: every label used so far and the checkpoint it names.
    """

    version: str
    refits: int
    body: bytes | None
    labels: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Refit:
    """
    A weight update as the controller asked for it: the body, forwarded to
    every worker unchanged, and the two fields the router itself reads.

    @ivar label: the caller's C{weight_version} as text, or C{None} when it
        gave none (the router then numbers the refit itself).
    """

    body: bytes
    model_path: str
    label: str | None


@dataclass(frozen=True)
class BroadcastReport:
    """
    What a refit, sleep or wake did, worker by worker: a domain result, so
    the web application alone decides how it is answered.

    @ivar weight_version: the fleet's version afterwards (refits only).
    @ivar catching_up: the URLs of woken workers being caught up (wakes only).
    @ivar message: a note for the controller when the call did nothing.
    @ivar unsupported: every worker answered 404: none has the call at all
        (a worker version without sleep/wake), so nothing changed anywhere.
    """

    replies: list[WorkerReply]
    weight_version: str | None = None
    catching_up: list[str] | None = None
    message: str | None = None
    unsupported: bool = False

    @property
    def success(self) -> bool:
        """Every targeted worker succeeded (vacuously true when none was targeted)."""
        return all(r.success for r in self.replies)

    def payload(self) -> dict[str, Any]:
        """The JSON-able report: C{success}, the extras, then one result per worker."""
        body: dict[str, Any] = {"success": self.success}
        if not self.replies and self.message is not None:
            body["message"] = self.message
        if self.weight_version is not None:
            body["weight_version"] = self.weight_version
        if self.catching_up is not None:
            body["catching_up"] = self.catching_up
        body["results"] = [r.payload() for r in self.replies]
        if self.replies and self.message is not None:
            body["message"] = self.message
        return body


class ChangeSignal:
    """
    Lets requests wait for "some worker may have become routable".

    Each waiter has its own timer and a canceller, so a client that goes away
    while waiting leaves nothing behind.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._waiters: dict[Deferred[bool], IDelayedCall] = {}

    def wait(self, timeout: float) -> Deferred[bool]:
        """Fire with True on the next L{notify}, or False after C{timeout} seconds."""

        def cancel(d: Deferred[bool]) -> None:
            timer = self._waiters.pop(d, None)
            if timer is not None and timer.active():
                timer.cancel()

        d: Deferred[bool] = Deferred(cancel)

        def expire() -> None:
            if self._waiters.pop(d, None) is not None:
                d.callback(False)

        self._waiters[d] = self._clock.callLater(max(0.0, timeout), expire)
        return d

    def notify(self) -> None:
        """Wake every waiter (they re-check the pool themselves)."""
        waiters, self._waiters = self._waiters, {}
        for d, timer in waiters.items():
            if timer.active():
                timer.cancel()
            d.callback(True)

    def __len__(self) -> int:
        return len(self._waiters)


class FleetController:
    """Runs control broadcasts against the pool and keeps the fleet's weights consistent."""

    log = Logger()

    def __init__(
        self,
        pool: WorkerPool,
        caller: WorkerCaller,
        clock: IReactorTime,
        *,
        timeout: float,
    ) -> None:
        """
        @param timeout: seconds one worker may take for a refit, sleep, wake
            or catch-up (real reloads take minutes).
        """
        self._pool = pool
        self._caller = caller
        self._clock = clock
        self._timeout = timeout
        self._lock = DeferredLock()
        self.changed = ChangeSignal(clock)
        pool.on_change(self.changed.notify)
        self.version = INITIAL_VERSION
        self.model_path: str | None = None
        self._update_body: bytes | None = None
        #: Successful refits so far; a worker is current when its weights_seq equals it.
        self._seq = 0
        self._sync_pending = False
        self._sync_runs: set[Deferred[None]] = set()
        #: The checkpoint each label the fleet was refitted to names.
        self._labels = WeightLabels()
        #: Told about a worker quarantined because it did not answer a
        #: control call (hung), so requests waiting on it can go elsewhere.
        self.on_unresponsive: Callable[[Worker, str], None] | None = None
        #: Told when a refit, sleep or wake ends ("refit", "sleep", "wake"):
        #: its report (C{None} when it was refused before any worker was
        #: called) and how many seconds it took, lock wait included (metrics).
        self.on_broadcast: Callable[[str, BroadcastReport | None, float], None] | None = None
        #: Records refits durably (C{--state-dir}), when configured.
        self.journal: RefitJournal | None = None
        #: Workers quarantined because a refit was running on them when the
        #: router stopped: the next refit targets them too, and readmits them
        #: if it succeeds (it overwrites whatever half-written weights they hold).
        self._interrupted: set[Worker] = set()

    # ------------------------------------------------------------------ helpers

    async def _observed(self, name: str, operation: Callable[[], Any]) -> BroadcastReport:
        """Run a broadcast under the lock, and tell L{on_broadcast} how it ended."""
        started = self._clock.seconds()
        report: BroadcastReport | None = None
        try:
            report = await self._locked(operation)
            return report
        finally:
            if self.on_broadcast is not None:
                self.on_broadcast(name, report, self._clock.seconds() - started)

    async def _locked(self, operation: Callable[[], Any]) -> Any:
        await self._lock.acquire()
        try:
            return await operation()
        finally:
            self._lock.release()

    def _end_all(self, workers: list[Worker]) -> None:
        with self._pool.changes():
            for worker in workers:
                self._pool.end(worker)

    async def _broadcast(
        self, targets: list[Worker], path: str, body: bytes, apply: Callable[[Worker, WorkerReply], None]
    ) -> list[WorkerReply]:
        """
        Call every target concurrently and C{apply} each worker's outcome as
        soon as it arrives, so one hung worker holds up nobody but itself: the
        others are back in rotation (or out of it) at once, and requests
        waiting for them are woken. The result, one reply per target in order,
        is for the caller's report.

        An outcome that concerns a previous registration of the worker (it
        was restarted or re-admitted meanwhile) is not applied: that worker
        has its own catch-up.
        """
        self.log.info("sending {path} to {count} worker(s)", path=path, count=len(targets))
        admissions = self._admissions(targets)

        def settle(index: int, reply: WorkerReply) -> None:
            worker = targets[index]
            if worker.admissions == admissions[index]:
                with self._pool.changes():
                    apply(worker, reply)

        return await self._caller.fan_out(
            [w.url for w in targets], "POST", path, body=body, timeout=self._timeout, on_reply=settle
        )

    async def _busy_broadcast(
        self,
        targets: list[Worker],
        activity: Activity,
        path: str,
        body: bytes,
        apply: Callable[[Worker, WorkerReply], None],
    ) -> list[WorkerReply]:
        """
        Broadcast while the targets are marked busy, so no new request reaches
        them meanwhile; each one stops being busy when its own outcome is
        applied.
        """
        with self._pool.changes():  # all busy at once: one change
            for worker in targets:
                self._pool.begin(worker, activity)

        def done(worker: Worker, reply: WorkerReply) -> None:
            self._pool.end(worker, activity)
            apply(worker, reply)

        try:
            return await self._broadcast(targets, path, body, done)
        finally:
            with self._pool.changes():
                for worker in targets:  # only left busy if we were cancelled
                    self._pool.end(worker, activity)

    def _no_target(self, what: str) -> NoWorkers:
        # Every such answer starts with the earlier router's words, which scripts match on.
        prefix = "No healthy workers available in the pool"
        if len(self._pool) == 0:
            return NoWorkers(f"{prefix} for {what}: no workers registered")
        counts = self._pool.counts()
        return NoWorkers(
            f"{prefix} for {what}: {counts['total_workers']} registered, "
            f"{counts['dead_workers']} dead, {counts['sleeping_workers']} sleeping"
        )

    def _quarantine(self, worker: Worker, reason: str, reply: WorkerReply | None = None) -> None:
        """
        Take C{worker} out of rotation with unknown weights; if C{reply} shows
        it did not answer at all, it is hung, and C{on_unresponsive} is told.
        """
        worker.weights_seq, worker.weight_version, worker.model_path = None, None, None  # it may hold anything now
        if self._pool.quarantine(worker, reason):
            self.log.warn("worker {worker} quarantined: {reason}", worker=worker.display_id, reason=reason)
            if reply is not None and reply.status_code is None and self.on_unresponsive is not None:
                self.on_unresponsive(worker, reason)

    @property
    def refitted(self) -> bool:
        """Whether the fleet was refitted: a worker whose weights are unknown must then be caught up first."""
        return self._update_body is not None

    def status(self) -> dict[str, Any]:
        """The fleet's weights, for C{/health}."""
        return {"weight_version": self.version, "model_path": self.model_path}

    # ------------------------------------------------------------------ durable state

    def weights(self) -> FleetWeights:
        """The fleet's weights, for the state file."""
        return FleetWeights(self.version, self._seq, self._update_body, tuple(self._labels.items()))

    def restore_weights(self, weights: FleetWeights, model_path: str | None) -> None:
        """
        Take the fleet's weights from the state file (before any worker is
        registered): answers carry the restored version, and every worker
        that joins is caught up to the restored body before it gets traffic.
        """
        self.version, self.model_path = weights.version, model_path
        self._seq, self._update_body = weights.refits, weights.body
        for label, path in weights.labels:
            self._labels.record(label, path)

    def refit_interrupted(self, worker: Worker, reason: str) -> None:
        """
        A refit was running on C{worker} when the router stopped: it may hold
        half-written weights. Quarantined until an operator re-admits it (and
        it is caught up) or a new refit succeeds on it.
        """
        self._interrupted.add(worker)
        self._quarantine(worker, reason)

    def keep_out(self, worker: Worker) -> None:
        """The operator quarantined C{worker}: only re-admission brings it back, not a refit."""
        self._interrupted.discard(worker)

    # ------------------------------------------------------------------ weights bookkeeping

    def _is_current(self, worker: Worker) -> bool:
        """Holds the fleet's weights (compared by the router's own refit count, not by label)."""
        return worker.weights_seq == self._seq

    def _make_current(self, worker: Worker) -> None:
        worker.weights_seq = self._seq
        worker.weight_version, worker.model_path = self.version, self.model_path

    def _catch_up_stragglers(self) -> list[Worker]:
        """
        Mark every routable worker not on the fleet's weights as syncing, and
        schedule its catch-up.

        Run after every broadcast: a worker can fall behind in more ways than
        one operation sees (it joined while a refit ran, it refused a sleep
        while its catch-up was queued, it woke after a refit), and this one
        rule catches them all before they get traffic.
        """
        behind = [w for w in self._pool.workers() if w.routable and not self._is_current(w)]
        for worker in behind:
            self._pool.begin(worker, Activity.SYNCING)
        if behind:
            self._schedule_sync()
        return behind

    def _admissions(self, workers: list[Worker]) -> list[int]:
        return [w.admissions for w in workers]

    # ------------------------------------------------------------------ refit

    async def update_weights(self, refit: Refit) -> BroadcastReport:
        """
        Refit every live, awake worker with C{refit.body} (forwarded unchanged).

        The report's C{success} is true only when every targeted worker
        succeeded; the failed workers are quarantined.

        @raise Conflict: the label already names another checkpoint.
        @raise NoWorkers: no worker can be refitted.
        """
        return await self._observed("refit", lambda: self._update(refit))

    async def _update(self, refit: Refit) -> BroadcastReport:
        body, model_path = refit.body, refit.model_path
        if refit.label is None:
            version = self._labels.next_free(self._seq + 1, model_path)
        else:
            version = refit.label
            conflict = self._labels.conflict(version, model_path)
            if conflict is not None:  # checked under the lock: two refits cannot both claim a label
                raise Conflict(conflict)
        # A worker still starting has never answered: it would only fail the
        # refit. It is caught up to the fleet's weights when it first answers.
        targets = [
            w
            for w in self._pool.workers()
            if not w.is_dead and not w.is_sleeping and w.activity is not Activity.STARTING
        ]
        # Workers a refit was interrupted on (router restart) take this one too.
        interrupted = [w for w in self._pool.workers() if w.is_dead and w in self._interrupted]
        targets += interrupted
        if not targets:
            raise self._no_target("a weight update")
        #: Workers that refused the update (4xx) while nobody had applied it:
        #: by the worker contract they rolled back, so they hold the fleet's
        #: weights and are back in rotation until the fleet moves on.
        refused: list[tuple[Worker, int, WorkerReply]] = []
        moved = False

        def apply(worker: Worker, reply: WorkerReply) -> None:
            nonlocal moved
            if reply.success:
                if worker.is_dead or worker not in self._pool:
                    # Quarantined or removed meanwhile: whatever it holds is not
                    # the router's to vouch for.
                    self._quarantine(worker, f"weight update to version {version} ended after quarantine")
                    return
                if not moved:
                    # The first worker on the new weights makes them the fleet's:
                    # from now on only workers holding them may serve.
                    moved = True
                    self._seq += 1
                    self.version, self.model_path, self._update_body = version, model_path, body
                    self._labels.record(version, model_path)
                    self.log.info("fleet weights now version {version}", version=version)
                    for other, admitted, answer in refused:
                        if other.admissions == admitted:
                            self._quarantine(other, f"weight update to version {version} failed: {_reason(answer)}")
                self._make_current(worker)
                self.log.info("worker {worker} on weight version {version}", worker=worker.display_id, version=version)
            elif _rejected(reply) and not moved:
                refused.append((worker, worker.admissions, reply))
            else:
                self._quarantine(worker, f"weight update to version {version} failed: {_reason(reply)}", reply)

        if self.journal is not None:
            self.journal.refit_started(version, model_path, targets)  # durable before any worker is sent it
        with self._pool.changes():  # re-admitted and busy at once: never routable in between
            for worker in interrupted:
                self._interrupted.discard(worker)
                self._pool.readmit(worker)
                self._pool.begin(worker, Activity.UPDATING)
        try:
            replies = await self._busy_broadcast(targets, Activity.UPDATING, "/update_weights_from_disk", body, apply)
        except BaseException:
            if self.journal is not None:
                self.journal.refit_finished("interrupted")
            raise
        if self.journal is not None:
            if moved:
                outcome = "succeeded" if all(r.success for r in replies) else "partial"
            else:
                outcome = "rejected" if refused and all(_rejected(r) for r in replies) else "failed"
            self.journal.refit_finished(outcome)
        self._catch_up_stragglers()
        message = None
        if moved:
            self.log.info(
                "weight update to version {version}: {applied}/{total} workers updated",
                version=version,
                applied=sum(1 for r in replies if r.success),
                total=len(targets),
            )
        elif refused and all(_rejected(r) for r in replies):
            # Every worker refused the update with a 4xx: the worker contract
            # is all-or-nothing with rollback, so the fleet is exactly where it
            # was. Nobody is quarantined for a bad request.
            self.log.warn(
                "every worker rejected the weight update to {version}; the fleet stays at {current}",
                version=version,
                current=self.version,
            )
            message = f"every worker rejected the update; the fleet stays at version {self.version}"
        return BroadcastReport(replies, weight_version=self.version, message=message)

    # ------------------------------------------------------------------ sleep and wake

    async def release_memory(self, body: bytes) -> BroadcastReport:
        """
        Put every live, awake worker to sleep; the ones that succeed get no traffic.

        @raise NoWorkers: no live worker is registered.
        """
        return await self._observed("sleep", lambda: self._sleep_or_wake(body, sleep=True))

    async def resume_memory(self, body: bytes) -> BroadcastReport:
        """
        Wake every live, sleeping worker. A woken worker that slept through a
        refit is caught up before it gets traffic (it shows C{syncing}).

        @raise NoWorkers: no live worker is registered.
        """
        return await self._observed("wake", lambda: self._sleep_or_wake(body, sleep=False))

    async def _sleep_or_wake(self, body: bytes, *, sleep: bool) -> BroadcastReport:
        path = "/release_memory_occupation" if sleep else "/resume_memory_occupation"
        # Workers still starting are skipped: they have never answered, and
        # they join (caught up) when they first do.
        live = [w for w in self._pool.workers() if not w.is_dead and w.activity is not Activity.STARTING]
        targets = [w for w in live if w.is_sleeping != sleep]
        if not targets:
            if live:
                already = "sleeping" if sleep else "awake"
                return BroadcastReport([], message=f"all workers are already {already}")
            raise self._no_target(path.lstrip("/"))
        behind: list[Worker] = []

        def apply(worker: Worker, reply: WorkerReply) -> None:
            if reply.success:
                self._pool.set_sleeping(worker, sleep)
                if not sleep and not worker.is_dead and not self._is_current(worker):
                    # Slept through a refit: caught up before it gets traffic.
                    self._pool.begin(worker, Activity.SYNCING)
                    behind.append(worker)
                    self._schedule_sync()
            elif reply.status_code is None:
                # No answer: the worker may be asleep, awake or half-way; nobody can tell.
                self._quarantine(worker, f"{path.lstrip('/')} failed: {_reason(reply)}", reply)

        activity = Activity.RELEASING if sleep else Activity.RESUMING
        replies = await self._busy_broadcast(targets, activity, path, body, apply)
        behind += self._catch_up_stragglers()
        catching_up = None if sleep else [w.url for w in behind]
        if all(r.status_code == 404 for r in replies):
            # A worker version without sleep/wake (e.g. the RL fork's later
            # main): nothing changed anywhere, and nobody is at fault.
            return BroadcastReport(
                replies,
                catching_up=catching_up,
                message=f"no worker supports {path}: every worker answered 404",
                unsupported=True,
            )
        return BroadcastReport(replies, catching_up=catching_up)

    # ------------------------------------------------------------------ catch-up

    def admit(self, worker: Worker) -> None:
        """
        A worker joins (registered, re-admitted, restarted): its weights are
        unknown. With no refit yet it holds the fleet's start-up weights;
        otherwise it is caught up before it gets any traffic.
        """
        worker.admissions += 1
        worker.weights_seq, worker.weight_version = None, None
        self._interrupted.discard(worker)  # re-admitted: caught up below like any worker that comes back
        if self._update_body is None:
            # Start-up weights. A first refit running right now does not target
            # it; it is caught up when that refit ends (_catch_up_stragglers).
            self._make_current(worker)
        if worker.is_dead or worker.is_sleeping:
            return  # caught up when it is re-admitted or woken
        if self._may_be_asleep(worker):
            # Serving while every other worker sleeps would put generations
            # where the controller freed the GPUs: it joins asleep instead.
            self._pool.begin(worker, Activity.JOINING)
            self._schedule_join()
            return
        if self._update_body is None:
            self.changed.notify()
            return
        self._pool.begin(worker, Activity.SYNCING)
        self._schedule_sync()

    def _fleet_asleep(self, joiner: Worker) -> bool:
        """Every other live worker that has answered sleeps (and there is one)."""
        others = [
            w
            for w in self._pool.workers()
            if w is not joiner and not w.is_dead and w.activity not in (Activity.STARTING, Activity.JOINING)
        ]
        return bool(others) and all(w.is_sleeping for w in others)

    def _may_be_asleep(self, joiner: Worker) -> bool:
        """The fleet sleeps, or a sleep broadcast running now may leave it asleep: decide under the lock."""
        return self._fleet_asleep(joiner) or any(w is not joiner for w in self._pool.busy_with(Activity.RELEASING))

    def _schedule_join(self) -> None:
        """Settle the joiners under the lock, after whatever control call runs now."""
        d = Deferred.fromCoroutine(self._locked(self._join_pass))
        self._sync_runs.add(d)

        def done(result: object) -> None:
            self._sync_runs.discard(d)
            if isinstance(result, Failure) and not result.check(CancelledError):
                self.log.failure("putting joining workers to sleep failed", result)

        d.addBoth(done)

    async def _join_pass(self) -> None:
        joiners = self._pool.busy_with(Activity.JOINING)
        if not joiners:
            return
        if not self._fleet_asleep(joiners[0]):
            # The fleet woke (or never slept) meanwhile: an ordinary join.
            with self._pool.changes():
                self._end_all(joiners)
                self._catch_up_stragglers()
            return
        self.log.info("putting {count} worker(s) that joined a sleeping fleet to sleep", count=len(joiners))
        admissions = self._admissions(joiners)
        try:
            replies = await self._caller.fan_out(
                [w.url for w in joiners], "POST", "/release_memory_occupation", body=b"{}", timeout=self._timeout
            )
        except BaseException:
            with self._pool.changes():
                self._end_all(joiners)
                for worker in joiners:
                    self._quarantine(worker, "joining the sleeping fleet was interrupted")
            raise
        with self._pool.changes():
            for worker, admitted, reply in zip(joiners, admissions, replies, strict=True):
                if worker.admissions != admitted or worker.activity is not Activity.JOINING:
                    continue  # re-admitted, removed or changed meanwhile: it has its own admission
                self._pool.end(worker, Activity.JOINING)
                if worker.is_dead:
                    continue
                if reply.success:
                    self._pool.set_sleeping(worker, True)
                    self.log.info("worker {worker} joined the sleeping fleet asleep", worker=worker.display_id)
                else:
                    # Awake while the fleet sleeps would split it: keep it out.
                    self._quarantine(worker, f"could not be put to sleep with the fleet: {_reason(reply)}")

    def _schedule_sync(self) -> None:
        """Run one catch-up pass soon; passes coalesce, so N joining workers cost one broadcast."""
        if self._sync_pending:
            return
        self._sync_pending = True
        d = Deferred.fromCoroutine(self._locked(self._sync_pass))
        self._sync_runs.add(d)

        def done(result: object) -> None:
            self._sync_runs.discard(d)
            if isinstance(result, Failure) and not result.check(CancelledError):
                self.log.failure("catch-up pass failed", result)

        d.addBoth(done)

    async def _sync_pass(self) -> None:
        self._sync_pending = False
        behind = self._pool.busy_with(Activity.SYNCING)
        if not behind:
            return
        body, version = self._update_body, self.version
        if body is None:  # nothing to catch up to: they hold the start-up weights
            for worker in behind:
                self._make_current(worker)
            self._end_all(behind)
            return
        self.log.info(
            "catching up {count} worker(s) to weight version {version}", count=len(behind), version=version
        )

        def apply(worker: Worker, reply: WorkerReply) -> None:
            if worker.activity is not Activity.SYNCING:
                return  # removed, quarantined or changed meanwhile: it has its own catch-up
            self._pool.end(worker, Activity.SYNCING)
            if worker.is_dead or worker.is_sleeping:
                return
            if reply.success:
                self._make_current(worker)
                self.log.info(
                    "worker {worker} caught up to weight version {version}",
                    worker=worker.display_id,
                    version=version,
                )
            else:
                self._quarantine(worker, f"catch-up to weight version {version} failed: {_reason(reply)}")

        try:
            await self._broadcast(behind, "/update_weights_from_disk", body, apply)
        except BaseException:
            interrupted = [w for w in behind if w.activity is Activity.SYNCING]
            with self._pool.changes():
                self._end_all(interrupted)
                for worker in interrupted:
                    self._quarantine(worker, "catch-up interrupted")
            raise
        self._catch_up_stragglers()

    def stop(self) -> None:
        """Abandon catch-ups in flight (router shutting down)."""
        for d in list(self._sync_runs):
            d.cancel()


def _rejected(reply: WorkerReply) -> bool:
    """The worker answered and refused the request (4xx): by contract it changed nothing."""
    return reply.status_code is not None and 400 <= reply.status_code < 500


def _reason(reply: WorkerReply) -> str:
    """A short account of a failed reply, for dead_reason and logs."""
    if reply.error is not None:
        return reply.error
    body = reply.body
    if isinstance(body, dict):
        message = body.get("message") or body.get("detail") or body.get("error")
        if message:
            return f"HTTP {reply.status_code}: {message}"
    text = body if isinstance(body, str) else json.dumps(body)
    return f"HTTP {reply.status_code}: {text[:200]}"
