"""
The RL control plane: fleet-wide weight refits and sleep/wake.

Control calls are serialised by one lock, so a refit never interleaves with
another refit or with a sleep/wake broadcast: the controller always sees the
fleet move from one consistent state to the next.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import DeferredLock
from twisted.logger import Logger

from twisted_router.calls import WorkerCaller, WorkerReply
from twisted_router.pool import Worker, WorkerPool


@dataclass(frozen=True)
class BroadcastOutcome:
    """What one control call did: the HTTP status to answer with and the JSON body."""

    status: int
    body: dict[str, Any]


class FleetController:
    """Runs control broadcasts against the pool and applies their effect on worker state."""

    log = Logger()

    def __init__(self, pool: WorkerPool, caller: WorkerCaller, *, timeout: float) -> None:
        self._pool = pool
        self._caller = caller
        self._timeout = timeout
        self._lock = DeferredLock()

    async def _broadcast(self, targets: list[Worker], path: str, body: bytes) -> list[WorkerReply]:
        self.log.info(
            "broadcasting {path} to {count} worker(s)", path=path, count=len(targets)
        )
        return await self._caller.fan_out(
            [w.url for w in targets], "POST", path, body=body, timeout=self._timeout
        )

    def _no_target(self, what: str) -> BroadcastOutcome:
        if len(self._pool) == 0:
            return BroadcastOutcome(503, {"error": "No workers registered in the pool"})
        return BroadcastOutcome(503, {"error": f"No eligible workers for {what}: {self._describe_fleet()}"})

    def _describe_fleet(self) -> str:
        counts = self._pool.counts()
        return (
            f"{counts['total_workers']} registered, {counts['dead_workers']} dead, "
            f"{counts['sleeping_workers']} sleeping"
        )

    async def update_weights(self, body: bytes) -> BroadcastOutcome:
        """Forward the refit body unchanged to every live, awake worker."""
        await self._lock.acquire()
        try:
            targets = [w for w in self._pool.workers() if not w.is_dead and not w.is_sleeping]
            if not targets:
                return self._no_target("a weight update")
            replies = await self._broadcast(targets, "/update_weights_from_disk", body)
            return self._summarise(replies, failure_status=502)
        finally:
            self._lock.release()

    async def release_memory(self, body: bytes) -> BroadcastOutcome:
        """Put every live, awake worker to sleep; the ones that succeed get no more traffic."""
        await self._lock.acquire()
        try:
            live = [w for w in self._pool.workers() if not w.is_dead]
            targets = [w for w in live if not w.is_sleeping]
            if not targets:
                if live:
                    return BroadcastOutcome(
                        200,
                        {"success": True, "results": [], "message": "all workers are already sleeping"},
                    )
                return self._no_target("release_memory_occupation")
            replies = await self._broadcast(targets, "/release_memory_occupation", body)
            for worker, reply in zip(targets, replies, strict=True):
                if reply.success:
                    self._pool.set_sleeping(worker, True)
            return self._summarise(replies, failure_status=200)
        finally:
            self._lock.release()

    async def resume_memory(self, body: bytes) -> BroadcastOutcome:
        """Wake every live, sleeping worker; the ones that succeed become routable."""
        await self._lock.acquire()
        try:
            live = [w for w in self._pool.workers() if not w.is_dead]
            targets = [w for w in live if w.is_sleeping]
            if not targets:
                if live:
                    return BroadcastOutcome(
                        200, {"success": True, "results": [], "message": "all workers are already awake"}
                    )
                return self._no_target("resume_memory_occupation")
            replies = await self._broadcast(targets, "/resume_memory_occupation", body)
            for worker, reply in zip(targets, replies, strict=True):
                if reply.success:
                    self._pool.set_sleeping(worker, False)
            return self._summarise(replies, failure_status=200)
        finally:
            self._lock.release()

    def _summarise(self, replies: list[WorkerReply], *, failure_status: int) -> BroadcastOutcome:
        """
        Per-worker results plus an overall verdict.

        A failed refit answers 502 because the fleet is no longer uniform; a
        partly failed sleep or wake still answers 200 because each worker's own
        state is exact and the controller reads C{success} per worker.
        """
        success = all(r.success for r in replies)
        for reply in replies:
            if not reply.success:
                self.log.warn(
                    "worker {worker} failed a control call: status={status} error={error} body={body}",
                    worker=reply.worker_url,
                    status=reply.status_code,
                    error=reply.error,
                    body=reply.body,
                )
        return BroadcastOutcome(
            200 if success else failure_status,
            {"success": success, "results": [r.payload() for r in replies]},
        )
