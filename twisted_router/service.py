"""
Composing the running router: HTTP listener, health checker, worker
registration and connection-pool cleanup, as one C{MultiService}.

The console script and the twistd plugin both call L{make_router_service}, so
the two ways of running the router are the same program.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IHostnameResolver, IReactorCore, IReactorTCP, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool
from twisted.web.iweb import IAgent

from twisted_router.app import Router
from twisted_router.auth import Keys, open_access_warning
from twisted_router.calls import WorkerCaller
from twisted_router.config import RouterConfig
from twisted_router.control import FleetController
from twisted_router.dispatch import Dispatcher
from twisted_router.drain import DrainingService
from twisted_router.fleet import Fleet
from twisted_router.health import HealthChecker, refresh_capabilities
from twisted_router.jobs import JobOwners
from twisted_router.launcher import (
    FleetPlan,
    LauncherService,
    load_launcher_config,
    make_launcher_service,
    plan_fleet,
    router_listen_ports,
)
from twisted_router.listener import ListenerService
from twisted_router.metrics import metrics_resource
from twisted_router.persist import StateKeeper
from twisted_router.policies import make_policy
from twisted_router.pool import Worker, WorkerPool
from twisted_router.proxy import StreamingProxy
from twisted_router.resolution import check_worker_host
from twisted_router.site import RouterSite
from twisted_router.statefile import LoadedState, open_state_dir
from twisted_router.upstream import WorkerKeyAgent, make_agent, make_http_client
from twisted_router.urls import WorkerURLError


@dataclass
class RouterParts:
    """The wired pieces of one router, kept together so tests and services can reach them."""

    config: RouterConfig
    pool: WorkerPool
    router: Router
    control: FleetController
    health: HealthChecker
    connection_pool: HTTPConnectionPool | None
    fleet: Fleet
    dispatcher: Dispatcher
    jobs: JobOwners


def build_router(
    config: RouterConfig,
    reactor: IReactorTime,
    *,
    agent: IAgent | None = None,
    rng: random.Random | None = None,
    on_quarantine: Callable[[Worker, str], None] | None = None,
    resolver: IHostnameResolver | None = None,
) -> RouterParts:
    """
    Wire the router's pieces on an injected reactor.

    @param agent: the HTTP client agent for worker calls; tests pass an
        in-memory one, production leaves it to a pooled L{Agent}.
    @param on_quarantine: called with the worker and the reason when the
        health checker quarantines a worker (the launcher restarts managed
        ones).
    @param resolver: resolves workers' host names, at registration and at
        every connection, so none that leads to a blocked address is used
        (L{twisted_router.resolution}). Production leaves it to the
        reactor's C{nameResolver}; with an injected C{agent} and no
        resolver, host names are not resolved at registration.
    """
    connection_pool: HTTPConnectionPool | None = None
    if agent is None:
        resolver = resolver or reactor.nameResolver  # type: ignore[attr-defined]
        agent, connection_pool = make_agent(reactor, max_connections=config.max_connections, resolver=resolver)
    if config.worker_api_key is not None:
        agent = WorkerKeyAgent(agent, config.worker_api_key)
    http = make_http_client(agent)
    pool = WorkerPool(now=reactor.seconds)
    caller = WorkerCaller(http, reactor)

    async def refresh(worker: Worker) -> bool:
        return await refresh_capabilities(pool, worker, http, reactor, timeout=config.health_check_timeout)

    control = FleetController(pool, caller, reactor, timeout=config.weight_update_timeout)

    dispatcher = Dispatcher(
        pool=pool,
        policy=make_policy(config.routing_algorithm, rng),
        proxy=StreamingProxy(
            reactor, agent, timeout=config.timeout, max_connections_per_worker=config.max_connections
        ),
        control=control,
        clock=reactor,
        timeout=config.timeout,
        max_inflight_per_worker=config.max_inflight_per_worker,
        max_queue=config.max_queue,
        queue_timeout=config.queue_timeout,
    )
    check_address = None
    if resolver is not None:
        names = resolver

        async def check_address(url: str) -> None:
            await check_worker_host(url, names, reactor)

    fleet = Fleet(
        pool=pool,
        control=control,
        caller=caller,
        refresh_capabilities=refresh,
        timeout=config.timeout,
        check_address=check_address,
    )
    jobs = JobOwners(
        pool, caller, max_video_jobs=config.max_video_jobs, max_image_ids=config.max_image_ids, clock=reactor
    )
    router = Router(
        pool=pool,
        fleet=fleet,
        dispatcher=dispatcher,
        jobs=jobs,
        control=control,
        timeout=config.timeout,
        keys=Keys(api=config.api_key, admin=config.admin_api_key),
        catch_all=config.catch_all,
    )

    def quarantined(worker: Worker, reason: str) -> None:
        # Requests still waiting for its response headers go elsewhere now.
        dispatcher.abandon_unanswered(worker, reason)
        if on_quarantine is not None:
            on_quarantine(worker, reason)

    health = HealthChecker(
        pool,
        http,
        reactor,
        interval=config.health_check_interval,
        failure_threshold=config.health_check_failure_threshold,
        probe_timeout=config.health_check_timeout,
        on_quarantine=quarantined,
        on_first_answer=lambda worker: Deferred.fromCoroutine(fleet.bring_up(worker)),
    )
    dispatcher.probe_unanswered = health.probe_now
    events = router.metrics.events
    dispatcher.on_retry, dispatcher.on_failover = events.retried, events.failed_over
    dispatcher.on_queue_wait = events.queue_waited
    health.on_probe_failure = events.probe_failed
    control.on_broadcast = events.broadcast_ended
    control.on_unresponsive = dispatcher.abandon_unanswered
    return RouterParts(config, pool, router, control, health, connection_pool, fleet, dispatcher, jobs)


def router_site(parts: RouterParts, reactor: IReactorTime) -> RouterSite:
    """The router's HTTP site: its web application, with the request metrics and the access log."""
    config = parts.config
    return RouterSite(
        parts.router.app.resource(),
        # The access line costs CPU on every request (docs/benchmarks.md): on when asked for, or with --verbose.
        access_log=config.access_log or config.verbose,
        reactor=reactor,
        max_request_body=config.max_request_body,
        on_finished=parts.router.metrics.events.observe,
        client_timeout=config.client_timeout,
        keys=Keys(api=config.api_key, admin=config.admin_api_key),
    )


class _StartupWorkers(Service):
    """Registers the C{--worker-urls} workers when the router starts, and learns their capabilities."""

    log = Logger()

    def __init__(self, parts: RouterParts) -> None:
        self._parts = parts
        self._pending: set[Deferred[bool]] = set()

    def startService(self) -> None:
        super().startService()
        config = self._parts.config
        warning = open_access_warning(Keys(api=config.api_key, admin=config.admin_api_key))
        if warning is not None:
            self.log.warn("{warning}", warning=warning)
        for url in self._parts.config.worker_urls:
            d = Deferred.fromCoroutine(self._join(url))
            self._pending.add(d)
            d.addBoth(self._settled, d)

    async def _join(self, url: str) -> bool:
        try:
            worker, created = await self._parts.fleet.register(url)
        except WorkerURLError as exc:
            # The spelling was validated at start-up; a host name that resolves to a
            # blocked address (or not at all) is refused here. The router keeps running.
            self.log.error("cannot register worker {url}: {reason}", url=url, reason=str(exc))
            return False
        if created:
            return await self._parts.fleet.bring_up(worker)
        return True

    def _settled(self, result: object, d: Deferred[bool]) -> None:
        self._pending.discard(d)

    def stopService(self) -> None:
        super().stopService()
        for d in list(self._pending):  # nothing may outlive the router
            d.cancel()


class _KeptState(Service):
    """
    The durable state (C{--state-dir}): restored when the router is built,
    followed from start, and written one last time on stop.
    """

    def __init__(self, keeper: StateKeeper) -> None:
        self._keeper = keeper

    def startService(self) -> None:
        super().startService()
        self._keeper.start()

    def stopService(self) -> None:
        super().stopService()
        self._keeper.stop()


class _OnStop(Service):
    """Runs a clean-up action when the router stops, so no connection, timer or call outlives it."""

    def __init__(self, action: Callable[[], object]) -> None:
        self._action = action

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        result = self._action()
        return result if isinstance(result, Deferred) else None


def make_router_service(
    config: RouterConfig,
    reactor: IReactorTCP,
    *,
    on_listen_failure: Callable[[Failure], None] | None = None,
    launch_plan: FleetPlan | None = None,
    on_launch_failure: Callable[[Failure], None] | None = None,
    state: LoadedState | None = None,
) -> tuple[MultiService, RouterParts, ListenerService]:
    """
    The whole router as one service, plus its parts and its listener.

    With C{--launcher-config}, a service named C{launcher} runs the managed
    workers (C{launch_plan}, or planned here from the file); it spawns them
    only once the router's port is bound (a busy port starts no worker), and
    it is stopped after the listener, so the router stops accepting before
    its workers go.
    With C{--state-dir} (C{state}: the directory checked and its file read
    beforehand, else opened here), the router is restored from the state file
    before anything starts, and keeps it in step (docs/state.md).
    A managed worker the health checker quarantines (hung, say) is handed to
    the launcher, which restarts it. The launcher reports its workers to the
    fleet (L{Fleet.worker_ready}, L{Fleet.worker_lost}), not to the web
    application.
    """
    launcher: LauncherService | None = None

    def quarantined(worker: Worker, reason: str) -> None:
        if launcher is not None:
            launcher.worker_quarantined(worker.url, reason)

    parts = build_router(config, reactor, on_quarantine=quarantined)  # type: ignore[arg-type]
    site = router_site(parts, reactor)  # type: ignore[arg-type]
    listener = ListenerService(
        serverFromString(reactor, config.endpoint_description),
        site,
        name="sglang-d-router",
        scheme="https" if config.endpoint_description.lower().startswith("ssl:") else "http",
        on_failure=on_listen_failure,
    )
    # On stop, the HTTP side drains first (no new connections, requests in
    # flight finish within the grace); only then do the services below stop.
    top = DrainingService(
        in_flight=site.in_flight,
        set_draining=site.set_draining,
        stop_accepting=listener.stopService,
        grace=config.shutdown_grace,
        clock=reactor,  # type: ignore[arg-type]
    )
    if state is None and config.state_dir is not None:
        state = open_state_dir(config.state_dir)
    if state is not None:
        keeper = StateKeeper(
            state.file,
            pool=parts.pool,
            control=parts.control,
            fleet=parts.fleet,
            jobs=parts.jobs,
            clock=reactor,  # type: ignore[arg-type]
        )
        if state.document is not None:
            keeper.restore(state.document)
        _KeptState(keeper).setServiceParent(top)  # stopped last: it saves what the others did
    if parts.connection_pool is not None:
        _OnStop(parts.connection_pool.closeCachedConnections).setServiceParent(top)
    _OnStop(parts.control.stop).setServiceParent(top)
    parts.health.setServiceParent(top)
    _StartupWorkers(parts).setServiceParent(top)
    if config.launcher_config is not None:
        plan = launch_plan or plan_fleet(
            load_launcher_config(config.launcher_config), reserved_ports=router_listen_ports(config)
        )
        launcher = make_launcher_service(
            plan,
            parts.fleet,
            reactor,  # type: ignore[arg-type]
            on_failure=on_launch_failure,
            start_after=listener.when_listening,
        )
        launcher.setServiceParent(top)
    listener.setServiceParent(top)
    if config.metrics_listen is not None:
        metrics_listener = ListenerService(
            serverFromString(reactor, config.metrics_listen),
            # The router's Site, for its bounded bodies and canonical targets; no access log.
            RouterSite(
                metrics_resource(parts.router.metrics),
                access_log=False,
                reactor=reactor,  # type: ignore[arg-type]
                max_request_body=64 * 1024,
                client_timeout=config.client_timeout,
            ),
            name="metrics",
            on_failure=on_listen_failure,
        )
        metrics_listener.setName("metrics")
        metrics_listener.setServiceParent(top)
    return top, parts, listener


def stop_reactor_on_failure(reactor: IReactorCore) -> Callable[[Failure], None]:
    """For unattended runs (twistd): a router that cannot listen must not keep running."""

    def stop(_: Failure) -> None:
        if reactor.running:
            reactor.stop()
        else:
            reactor.callWhenRunning(reactor.stop)

    return stop
