# -*- test-case-name: tests.unit.test_app,tests.unit.test_starting_dispatch -*-
"""
The fleet's lifecycle: workers join, come up, leave, and come back.

Every way a worker enters or leaves rotation outside the request path goes
through L{Fleet}: registration (C{--worker-urls}, C{POST /workers}), bringing
a registered worker up once it answers, the launcher's C{worker_ready} and
C{worker_lost}, the operator's quarantine and re-admission, and
deregistration. Whoever calls them (the web application, the launcher, the
health checker) depends on the fleet, not on each other.

A worker that joins or comes back holds weights the router cannot vouch
for, so each of these hands it to the control plane (L{FleetController.admit}),
which catches it up before it gets traffic. No HTTP serving here: errors
are the router's own (L{NotFound}), answered by the web application.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from twisted.logger import Logger

from twisted_router.calls import WorkerCaller
from twisted_router.control import FleetController
from twisted_router.errors import BadRequest, NotFound, NoWorkers, RouterError
from twisted_router.pool import Activity, UnknownWorker, Worker, WorkerPool
from twisted_router.urls import normalize_worker_url

__all__ = ["CapabilityRefresher", "Fleet", "unavailable"]

#: How long the router waits for a worker's model card for C{/v1/models}.
MODELS_TIMEOUT = 5.0

#: Learns what a worker serves (its model card); fires with whether it could.
CapabilityRefresher = Callable[[Worker], Awaitable[bool]]

#: Checks where a canonical worker URL leads before it is registered (its
#: host name resolved: L{twisted_router.resolution.check_worker_host});
#: raises L{WorkerURLError} to refuse it.
AddressCheck = Callable[[str], Awaitable[None]]


def unavailable(pool: WorkerPool, *, video: bool, image_only: bool = False) -> RouterError:
    """The right error when no worker can take a request, most specific first."""
    live = [w for w in pool.workers() if not w.is_dead]
    if video and not any(w.video_support for w in live):
        # The earlier router's answer, empty pool included: scripts match on it.
        return BadRequest("No video-capable workers available in current worker pool.")
    if len(pool) == 0:
        return NoWorkers("No workers registered in the pool")
    eligible = [w for w in live if (not video or w.video_support) and (not image_only or w.image_model)]
    if eligible and all(w.is_sleeping for w in eligible):
        return NoWorkers("all workers are sleeping (call /resume_memory_occupation to wake them)")
    return NoWorkers("No healthy workers available in the pool")


class Fleet:
    """
    Registers, brings up, re-admits, quarantines and deregisters workers;
    the hooks the launcher (L{worker_ready}, L{worker_lost}) and the health
    checker (L{bring_up}) call.
    """

    log = Logger()

    def __init__(
        self,
        *,
        pool: WorkerPool,
        control: FleetController,
        caller: WorkerCaller,
        refresh_capabilities: CapabilityRefresher,
        timeout: float,
        check_address: AddressCheck | None = None,
    ) -> None:
        """
        @param timeout: how long a worker's C{/health} may take when it is
            brought up.
        @param check_address: run on every new worker URL before it is
            registered (none: only C{urls.py}'s checks of its spelling).
        """
        self._check_address = check_address
        self._pool = pool
        self._control = control
        self._caller = caller
        self._refresh = refresh_capabilities
        self._timeout = timeout

    # ------------------------------------------------------------------ joining

    async def _checked(self, url: str) -> str:
        """
        The canonical URL, once its host name (if it has one) resolves only
        to allowed addresses; checked before anything is registered, so a
        refused URL leaves nothing behind. A registered URL is not checked
        again (its connections are: L{twisted_router.resolution}).
        """
        canonical = normalize_worker_url(url)
        if self._check_address is not None and self._pool.get(canonical) is None:
            await self._check_address(canonical)
        return canonical

    async def register(self, url: str) -> tuple[Worker, bool]:
        """
        Register a worker (idempotently). A new worker gets no traffic until
        it has answered once (it is C{starting}); L{bring_up} admits it then.

        @raise WorkerURLError: the URL is invalid or blocked, or its host
            name resolves to a blocked address or not at all.
        """
        return self.register_restored(await self._checked(url))

    def register_restored(self, url: str) -> tuple[Worker, bool]:
        """
        Register a worker from the router's own state file (C{--state-dir}),
        synchronously, before the router serves: its host name was resolved
        and checked when it was first registered, and every connection to it
        is checked again (L{twisted_router.resolution}), so a name that now
        resolves to a blocked address still gets no request. The URL's
        spelling is checked again (a newer rule may block it).

        @raise WorkerURLError: the URL is invalid or blocked.
        """
        # No traffic before it has answered once: it registers as starting.
        worker, created = self._pool.add(normalize_worker_url(url), activity=Activity.STARTING)
        if created:
            self.log.info("worker {worker} registered", worker=worker.display_id)
        return worker, created

    async def bring_up(self, worker: Worker) -> bool:
        """
        Bring a registered worker into rotation once it answers: learn its
        capabilities, then admit it (caught up to the fleet's weights first
        when needed). A worker still loading stays C{starting}; the health
        checker calls this again when it first answers.

        "Answers" means C{/health} is 200: an upstream worker opens its port
        and serves C{/v1/models} while it warms up, but answers C{/health}
        with 503 until it can take work.
        """
        health = await self._caller.call(worker.url, "GET", "/health", timeout=self._timeout)
        if health.status_code != 200:
            self.log.info(
                "worker {worker} is still starting (health: {health})",
                worker=worker.display_id,
                health=health.error or f"HTTP {health.status_code}",
            )
            return False
        if worker in self._pool:
            self._pool.record_probe_success(worker)  # a probe like the health checker's, and it passed
        if not await self._refresh(worker):
            return False
        if worker.activity is Activity.STARTING and worker in self._pool:
            with self._pool.changes():  # routable only as the control plane admits it
                self._pool.end(worker, Activity.STARTING)
                self._control.admit(worker)
            self.log.info("worker {worker} is up", worker=worker.display_id)
        return True

    async def worker_ready(self, url: str) -> Worker:
        """
        A managed worker answers its health check: register it (or re-admit it
        after a restart) and learn its capabilities.

        Called by the launcher; raises L{WorkerURLError} for an unusable URL.
        """
        # Starting until the control plane admits it (below), as any new worker.
        worker, created = self._pool.add(await self._checked(url), activity=Activity.STARTING)
        worker.managed = True
        self._pool.record_probe_success(worker)  # the launcher's readiness check is a /health probe
        # A fresh process: awake, holding its GPU memory and its start-up weights.
        self._rejoin(worker, fresh_process=True)
        self.log.info(
            "managed worker {worker} {what}", worker=worker.display_id, what="registered" if created else "re-admitted"
        )
        await self._refresh(worker)
        return worker

    def _rejoin(self, worker: Worker, *, fresh_process: bool) -> None:
        """
        Put C{worker} back in rotation through the control plane, which
        catches it up first: a worker that was away may hold any weights.

        @param fresh_process: the worker's process (re)started, so it has
            answered (no longer C{starting}) and is awake, whatever the
            router last knew of it.
        """
        with self._pool.changes():  # nobody sees it routable before the control plane admits it
            if worker.is_dead:
                self._pool.readmit(worker)
            if fresh_process:
                self._pool.end(worker, Activity.STARTING)  # the launcher saw it answer
                self._pool.set_sleeping(worker, False)
            self._control.admit(worker)

    # ------------------------------------------------------------------ leaving

    def worker_lost(self, url: str, reason: str) -> None:
        """A managed worker's process is gone: take it out of rotation at once."""
        worker = self._pool.get(url)
        if worker is not None and self._pool.quarantine(worker, reason):
            self.log.warn("managed worker {worker} out of rotation: {reason}", worker=worker.display_id, reason=reason)

    def set_dead(self, worker: Worker, dead: bool) -> None:
        """
        The operator's C{is_dead}: quarantine the worker, or re-admit a
        quarantined one (caught up before it gets traffic).
        """
        if dead:
            self._control.keep_out(worker)
            if self._pool.quarantine(worker, "marked dead by operator"):
                self.log.info("worker {worker} marked dead by operator", worker=worker.display_id)
        elif worker.is_dead:
            self._rejoin(worker, fresh_process=False)
            self.log.info("worker {worker} re-admitted by operator", worker=worker.display_id)

    def deregister(self, key: str) -> Worker:
        """
        Remove a worker by id, URL or display id.

        @raise NotFound: no worker matches.
        """
        try:
            worker = self._pool.remove(key)
        except UnknownWorker:
            raise NotFound("Worker not found") from None
        self.log.info("worker {worker} deregistered", worker=worker.display_id)
        return worker

    # ------------------------------------------------------------------ asking

    def lookup(self, key: str) -> Worker:
        """
        The worker named by C{key} (id, URL or display id).

        @raise NotFound: no worker matches.
        """
        worker = self._pool.get(key)
        if worker is None:
            raise NotFound("Worker not found")
        return worker

    async def refresh_capabilities(self, worker: Worker) -> bool:
        """Ask the worker what it serves now (its model card); whether it could tell."""
        return await self._refresh(worker)

    async def model_cards(self) -> list[dict[str, Any]]:
        """
        The model cards the live workers serve, one per model id (the first
        worker's card wins).

        @raise RouterError: no live worker, or none answered with a card.
        """
        live = [w for w in self._pool.workers() if not w.is_dead]
        if not live:
            raise unavailable(self._pool, video=False)
        replies = await self._caller.fan_out([w.url for w in live], "GET", "/v1/models", timeout=MODELS_TIMEOUT)
        cards: dict[str, Any] = {}
        for reply in replies:
            body = reply.body
            if reply.status_code == 200 and isinstance(body, dict) and isinstance(body.get("data"), list):
                for card in body["data"]:
                    if isinstance(card, dict) and isinstance(card.get("id"), str):
                        cards.setdefault(card["id"], card)
        if not cards:
            raise NoWorkers("No healthy workers available in the pool (no model cards)")
        return list(cards.values())
