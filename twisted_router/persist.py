# -*- test-case-name: tests.unit.test_persist -*-
"""
Keeping the state file (C{--state-dir}) in step with the running router, and
restoring the router from it on start.

Writes follow the change signals the router already has: the pool's
(quarantine, re-admission, removal, and a new registration), the control
plane's refit journal, and the owner maps'. They are coalesced, so the
request path never pays an fsync per generation: fleet changes are written
on the next reactor turn (many transitions of one broadcast become one
write), owner-map changes at most once per L{OWNER_WRITE_DELAY}. The one
write that is not deferred is a refit's journal entry, which is on disk
before any worker is sent the refit: a router killed during the refit then
knows on its next start which workers may hold half-written weights.
"""

from __future__ import annotations

import json
from dataclasses import replace

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from twisted_router.control import FleetController, FleetWeights
from twisted_router.errors import StateNotSaved
from twisted_router.fleet import Fleet
from twisted_router.jobs import JobOwners
from twisted_router.pool import Activity, Worker, WorkerPool
from twisted_router.state import JournalEntry, Owners, StateDocument, WorkerRecord
from twisted_router.statefile import StateFile
from twisted_router.urls import WorkerURLError

__all__ = ["OWNER_WRITE_DELAY", "StateKeeper", "interrupted_reason"]

#: Seconds an owner-map change may wait before it is written: a burst of
#: generations costs one write, and a crash forgets at most this much (a
#: forgotten owner is still found by asking the workers).
OWNER_WRITE_DELAY = 1.0


def interrupted_reason(entry: JournalEntry) -> str:
    """The quarantine reason of a worker a refit was running on when the router stopped."""
    return (
        f"weight update to version {entry.version} ({entry.model_path}) was in progress when the router "
        "stopped; its weights are unknown: re-admit it (PUT /workers/{id} {\"is_dead\": false}) to catch "
        "it up, or refit the fleet"
    )


class StateKeeper:
    """
    Saves the router's state to a L{StateFile} and restores it.

    Also the control plane's L{twisted_router.control.RefitJournal}.
    """

    log = Logger()

    def __init__(
        self,
        store: StateFile,
        *,
        pool: WorkerPool,
        control: FleetController,
        fleet: Fleet,
        jobs: JobOwners,
        clock: IReactorTime,
        owner_delay: float = OWNER_WRITE_DELAY,
    ) -> None:
        self._store = store
        self._pool = pool
        self._control = control
        self._fleet = fleet
        self._jobs = jobs
        self._clock = clock
        self._owner_delay = owner_delay
        self._journal: tuple[JournalEntry, ...] = ()
        self._running: JournalEntry | None = None
        self._pending: IDelayedCall | None = None
        self._body_cache: tuple[bytes, dict[str, object]] | None = None
        self._attached = False
        self._restored = False
        #: Writes done, for tests and the benchmark notes.
        self.writes = 0

    # ------------------------------------------------------------------ restore

    def restore(self, doc: StateDocument) -> None:
        """
        Put the router back where C{doc} left it, before it serves: the
        fleet's weights, the registered workers (quarantined ones stay so,
        with their reason), the owner maps, and the journal. The workers a
        refit was running on when the router stopped are quarantined (see
        L{interrupted_reason}); the journal records that refit as interrupted.
        """
        body = None if doc.last_refit is None else json.dumps(doc.last_refit).encode("utf-8")
        interrupted = doc.refit_in_progress
        labels = doc.labels
        if interrupted is not None and interrupted.version not in dict(labels):
            # A worker may have served answers under the interrupted refit's label
            # before the state caught up: that label stays its checkpoint's.
            labels += ((interrupted.version, interrupted.model_path),)
        self._control.restore_weights(FleetWeights(doc.weight_version, doc.refits, body, labels), doc.model_path)
        cut_short = set(interrupted.targets) if interrupted is not None else set()
        with self._pool.changes():
            for record in doc.workers:
                try:
                    worker, _ = self._fleet.register_restored(record.url)
                except WorkerURLError as exc:  # now blocked (a newer rule): keep it out, and say so
                    self.log.error(
                        "not restoring worker {url}: {reason}", url=record.url, reason=str(exc)
                    )
                    continue
                if record.sleeping:
                    # Asleep, it is not probed (nor brought up as a starting worker would
                    # be) and it would refuse a catch-up: the next wake reaches it, and it
                    # is caught up then, like any worker that slept through a refit.
                    self._pool.end(worker, Activity.STARTING)
                    self._pool.set_sleeping(worker, True)
                    self._control.admit(worker)
                if record.reason is not None:
                    self._pool.quarantine(worker, record.reason)
                elif record.url in cut_short:
                    assert interrupted is not None
                    self._control.refit_interrupted(worker, interrupted_reason(interrupted))
        for owners, saved in ((self._jobs.images, doc.images), (self._jobs.videos, doc.videos)):
            # Bounded by the map's capacity, as in memory (finished items evicted first).
            for finished, rows in ((False, saved.running), (True, saved.finished)):
                for item_id, url in rows:
                    owners.remember(item_id, url, finished=finished)
        journal = doc.journal
        if interrupted is not None:
            journal = doc.with_journal(replace(interrupted, outcome="interrupted")).journal
            self.log.warn(
                "the weight update to version {version} was interrupted by the router's stop; "
                "{count} worker(s) quarantined until re-admitted or refitted",
                version=interrupted.version,
                count=len(cut_short),
            )
        self._journal = journal
        self._restored = True
        self.log.info(
            "state restored: weight version {version}, {workers} worker(s), {images} image and {videos} video owner(s)",
            version=doc.weight_version,
            workers=len(doc.workers),
            images=len(self._jobs.images),
            videos=len(self._jobs.videos),
        )

    # ------------------------------------------------------------------ saving

    def start(self) -> None:
        """
        Follow the router's changes from now on, and write the state once at
        once (a restored interrupted refit is then on disk as such). The
        directory was found writable before the start (L{StateFile.prepare});
        should this write fail anyway, it is logged and the next change tries
        again, as for any later write.
        """
        if not self._attached:
            self._attached = True
            # Where the durable state lives, said once: a launcher run keeps
            # it by default, in a directory the operator may not have chosen.
            self.log.info(
                "durable state in {path} ({how})",
                path=self._store.path.path,
                how="restored from it" if self._restored else "no state file yet: started empty",
            )
            self._pool.on_change(self._fleet_changed)
            self._pool.on_added(self._worker_added)
            self._control.journal = self
            for owners in (self._jobs.images, self._jobs.videos):
                owners.on_change = self._owners_changed
        self._write_logged()

    def stop(self) -> None:
        """Write what is pending now (the router stops), and follow no more changes."""
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
            self._pending = None
            self._write_logged()

    def _fleet_changed(self) -> None:
        self._schedule(0.0)

    def _worker_added(self, worker: Worker) -> None:
        self._schedule(0.0)

    def _owners_changed(self) -> None:
        self._schedule(self._owner_delay)

    def _schedule(self, delay: float) -> None:
        """One write within C{delay} seconds, however many changes ask for one meanwhile."""
        pending = self._pending
        if pending is not None and pending.active():
            if pending.getTime() <= self._clock.seconds() + delay:
                return
            pending.cancel()
        self._pending = self._clock.callLater(delay, self._write_logged)

    def _write_logged(self) -> None:
        try:
            self.write()
        except OSError as exc:
            # The next change tries again; the router keeps serving meanwhile.
            self.log.error(
                "cannot write the state file {path}: {reason}",
                path=self._store.path.path,
                reason=exc.strerror or str(exc),
            )

    def write(self) -> None:
        """Write the state now (durably). @raise OSError: it could not be written."""
        if self._pending is not None and self._pending.active():
            self._pending.cancel()  # this write includes whatever it was waiting to write
        self._pending = None
        self._store.save(self.snapshot())
        self.writes += 1

    def snapshot(self) -> StateDocument:
        """The router's state now, as a document."""
        weights = self._control.weights()
        return StateDocument(
            weight_version=weights.version,
            refits=weights.refits,
            last_refit=self._refit_object(weights.body),
            labels=weights.labels,
            workers=tuple(
                WorkerRecord(w.url, w.dead_reason if w.is_dead else None, w.is_sleeping)
                for w in self._pool.workers()
                if not w.managed
            ),
            journal=self._journal,
            images=Owners(*self._jobs.images.rows()),
            videos=Owners(*self._jobs.videos.rows()),
        )

    def _refit_object(self, body: bytes | None) -> dict[str, object] | None:
        """The refit body as a JSON object (parsed once per refit, not once per write)."""
        if body is None:
            return None
        if self._body_cache is None or self._body_cache[0] is not body:
            self._body_cache = (body, json.loads(body))
        return self._body_cache[1]

    # ------------------------------------------------------------------ the refit journal

    def refit_started(self, version: str, model_path: str, targets: list[Worker]) -> None:
        """
        Write the journal entry (and the rest of the state) before the refit
        is sent.

        @raise StateNotSaved: it could not be written; the refit is not sent.
        """
        number = self._journal[-1].number + 1 if self._journal else 1
        entry = JournalEntry(number, version, model_path, tuple(w.url for w in targets if not w.managed))
        previous = self._journal
        self._journal = StateDocument(journal=previous).with_journal(entry).journal
        try:
            self.write()
        except OSError as exc:
            self._journal = previous
            reason = exc.strerror or str(exc)
            self.log.error("refit to {version} not sent: cannot write the state journal: {reason}", version=version, reason=reason)
            raise StateNotSaved(f"weight update not sent: the router cannot write its state journal ({reason})") from None
        self._running = entry

    def refit_finished(self, outcome: str) -> None:
        """Record the outcome of the refit last started (written at once, like its entry)."""
        if self._running is None:
            return
        entry, self._running = replace(self._running, outcome=outcome), None
        self._journal = StateDocument(journal=self._journal).with_journal(entry).journal
        self._write_logged()
