# -*- test-case-name: tests.unit.test_launcher_service -*-
"""
The launcher service: spawns the planned workers, registers each one the
moment it is healthy, takes it out of rotation the moment it dies, and stops
them all with the router.

The router is reached only through L{FleetHooks} (C{worker_ready},
C{worker_lost}), so this module knows nothing of the pool or of HTTP routing,
and tests drive it with a fake router, a fake process reactor and an
in-memory HTTP client.
"""

from __future__ import annotations

import os
import re
import sys
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol
from urllib.parse import urlsplit

from treq.client import HTTPClient
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorProcess
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_router.health import probe_health
from twisted_router.launcher._lines import strip_timestamp
from twisted_router.launcher._plan import FleetPlan, WorkerSpec, process_group_argv
from twisted_router.launcher._ray_client import ClusterOptions, RayCluster
from twisted_router.launcher._ray_supervisor import RayWorkerMonitor, ThreadPools
from twisted_router.launcher._supervisor import WorkerMonitor, describe_exit
from twisted_router.upstream import describe_failure, make_agent, make_http_client
from twisted_router.urls import WorkerURLError, normalize_worker_url

__all__ = [
    "STARTUP_EXIT_LIMIT",
    "TAIL_LINES",
    "FleetHooks",
    "LaunchFailed",
    "LauncherService",
    "make_launcher_service",
]

#: With restarts on, a worker that exits this many times without ever having
#: been ready has failed its start-up (it keeps being restarted, but if every
#: worker is in that state the fleet is broken and the router gives up).
STARTUP_EXIT_LIMIT = 3

#: Output lines kept per worker for the report when it fails.
TAIL_LINES = 50

#: How a process says it could not bind a port: Python's OSError (Linux
#: errno 98, macOS 48), uvicorn, ZMQ and torch.distributed all use one of these.
_ADDRESS_IN_USE = re.compile(r"address already in use|EADDRINUSE|\[Errno (?:98|48)\]", re.IGNORECASE)


class FleetHooks(Protocol):
    """What the launcher needs from the router (L{twisted_router.fleet.Fleet} provides it)."""

    def worker_ready(self, url: str) -> Coroutine[Any, Any, object]:
        """The worker answers C{/health}: register it, or re-admit it once it caught up."""

    def worker_lost(self, url: str, reason: str) -> None:
        """The worker's process is gone: take it out of rotation at once."""


class Supervisor(Protocol):
    """
    What runs the worker processes for the service: L{WorkerMonitor}
    (C{local} and C{simulated}) or L{RayWorkerMonitor} (C{ray}). It reports
    to the service as L{ProcessEvents}.
    """

    def addProcess(self, name: str, args: Sequence[str], *, env: dict[str, str] | None = None) -> None: ...

    def startService(self) -> None: ...

    def stopProcess(self, name: str) -> None: ...

    def running_pid(self, name: str) -> int | None: ...

    def mark_ready(self, name: str, pid: int) -> None: ...

    def do_not_restart(self, name: str) -> None: ...

    def stop_all(self) -> Deferred[None]: ...


class LaunchFailed(Exception):
    """No managed worker became ready: the router has nothing to serve with."""


@dataclass
class _Managed:
    """One planned worker and what the launcher knows about its current process."""

    spec: WorkerSpec
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    #: waiting (not running: before the first start or until a restart),
    #: starting (spawned, /health not 200 yet), registering (worker_ready
    #: running), ready, exited.
    phase: str = "waiting"
    pid: int | None = None
    starts: int = 0
    started_at: float = 0.0
    ever_ready: bool = False
    registered: bool = False
    startup_exits: int = 0
    missed_deadline: bool = False
    #: Its last process exited on its own before it was ready (its output
    #: may still be arriving: see L{LauncherService.process_output}).
    failed_loading: bool = False
    #: It exited before it was ready because a port it needs was taken: not
    #: restarted (its /health URL may be answered by whoever holds the port).
    port_in_use: bool = False
    stopped_by_us: bool = False
    poll: IDelayedCall | None = None
    deadline: IDelayedCall | None = None
    inflight: Deferred[Any] | None = None

    @property
    def index(self) -> int:
        return self.spec.index

    @property
    def url(self) -> str:
        return self.spec.url


class LauncherService(Service):
    """
    Runs the workers of a L{FleetPlan} under a L{WorkerMonitor}.

    A worker is registered (C{hooks.worker_ready}) once its C{GET /health}
    answers 200, polled every C{poll_interval} seconds for at most the
    plan's C{wait_timeout}; one that exits is reported to
    C{hooks.worker_lost} at once, restarted with backoff by the monitor and
    registered again when it is healthy. If no worker ever becomes ready,
    L{when_failed} fails and C{on_failure} is called, so the process can
    exit non-zero instead of serving 503s for ever.

    @param parent_pid: the pid the worker wrapper checks its parent against
        (default: this process's pid when the service starts, which is after
        twistd daemonised).
    @param start_after: returns a Deferred (the router's port being bound)
        that must succeed before any worker is spawned; if it fails, none is.
        A fleet takes minutes of GPU loading to start: not for a router that
        then exits because its port is taken.
    @param supervisor: makes what runs the workers, given this service to
        report to (default: a L{WorkerMonitor} spawning local processes).
    """

    log = Logger()

    def __init__(
        self,
        plan: FleetPlan,
        hooks: FleetHooks,
        reactor: IReactorProcess,
        http: HTTPClient,
        *,
        on_failure: Callable[[Failure], None] | None = None,
        poll_interval: float = 0.5,
        probe_timeout: float = 2.0,
        progress_interval: float = 30.0,
        python: str = sys.executable,
        parent_pid: int | None = None,
        killpg: Callable[[int, int], None] = os.killpg,
        start_after: Callable[[], Deferred[Any]] | None = None,
        supervisor: Callable[[LauncherService], Supervisor] | None = None,
    ) -> None:
        self._plan = plan
        self._start_after = start_after
        self._launched = False
        self._config = plan.config
        self._hooks = hooks
        # The reactor provides IReactorTime too; Any because mypy misreads zope interfaces.
        clock: Any = reactor
        self._clock = clock
        self._http = http
        self._on_failure = on_failure
        self._poll_interval = poll_interval
        self._probe_timeout = probe_timeout
        self._python = python
        self._parent_pid = parent_pid
        self._workers = {spec.name: _Managed(spec) for spec in plan.workers}
        self._by_url = {_url_key(m.url): m for m in self._workers.values()}
        self._monitor: Supervisor
        if supervisor is not None:
            self._monitor = supervisor(self)
        else:
            self._monitor = WorkerMonitor(
                reactor,
                self,
                restart=self._config.restart,
                kill_time=self._config.shutdown_grace,
                killpg=killpg,
            )
        self._progress = LoopingCall(self._log_progress)
        self._progress.clock = self._clock
        self._progress_interval = progress_interval
        self._began = 0.0
        self._stopping = False
        self._outcome: str | None = None  # None while starting up, then "ready" or "failed"
        self._failure: Failure | None = None
        self._failure_waiters: list[Deferred[None]] = []

    # -- public -------------------------------------------------------------------

    @property
    def monitor(self) -> Supervisor:
        """The process monitor running the workers (for inspection; the service drives it)."""
        return self._monitor

    def ready_count(self) -> int:
        """How many workers are registered and serving now."""
        return sum(1 for m in self._workers.values() if m.phase == "ready")

    def worker_quarantined(self, url: str, reason: str) -> None:
        """
        The router's health checker quarantined C{url} (e.g. a hung worker
        that no longer answers C{/health}). If it is one of ours and running,
        restart it: SIGTERM to its process group, SIGKILL after
        C{shutdown_grace}, and a new start with the usual backoff, which is
        registered again once it is healthy. Other workers are not ours to touch.
        """
        m = self._by_url.get(_url_key(url))
        if m is None or self._stopping or m.phase not in ("registering", "ready"):
            return  # not managed, or not running (its restart is under way), or still loading
        if not self._config.restart.enabled:
            self.log.warn(
                "[worker {index}] {url} quarantined by health checks ({reason}); "
                "not restarted: restart is off",
                index=m.index,
                url=m.url,
                reason=reason,
            )
            return
        self.log.warn(
            "[worker {index}] {url} quarantined by health checks ({reason}): restarting it "
            "(SIGTERM to its process group, SIGKILL after {grace:g} s)",
            index=m.index,
            url=m.url,
            reason=reason,
            grace=self._config.shutdown_grace,
        )
        m.stopped_by_us = True
        self._monitor.stopProcess(m.spec.name)

    def when_failed(self) -> Deferred[None]:
        """
        A Deferred that fails with L{LaunchFailed} if no worker becomes
        ready, and never fires otherwise.
        """
        if self._failure is not None:
            return fail(self._failure)
        d: Deferred[None] = Deferred()
        self._failure_waiters.append(d)
        return d

    # -- service ------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self._start_after is None:
            self._launch()
            return
        self._start_after().addCallbacks(self._gate_open, lambda _: None)

    def _gate_open(self, _: object) -> None:
        if self.running and not self._stopping:
            self._launch()

    def _launch(self) -> None:
        self._launched = True
        self._began = self._clock.seconds()
        parent_pid = self._parent_pid if self._parent_pid is not None else os.getpid()
        config = self._config
        self.log.info(
            "launcher: starting {count} {backend} worker(s){gpus}; restart {restart}",
            count=len(self._workers),
            backend=config.backend,
            gpus=f", GPUs from {self._plan.gpu_source}" if self._plan.gpu_source else "",
            restart=(
                f"on (backoff {config.restart.min_delay:g}..{config.restart.max_delay:g} s)"
                if config.restart.enabled
                else "off"
            ),
        )
        for m in self._workers.values():
            spec = m.spec
            self.log.info(
                "[worker {index}] {url}{gpus}: {command}",
                index=spec.index,
                url=spec.placement or spec.url,
                gpus=f" on GPU {spec.gpu_ids}" if spec.gpu_ids is not None else "",
                command=" ".join(spec.argv),
            )
            if spec.placement is None:
                argv = process_group_argv(spec.argv, python=self._python, parent_pid=parent_pid)
            else:
                argv = list(spec.argv)  # run on its node as it is, with the node's ports filled in
            self._monitor.addProcess(spec.name, argv, env=dict(spec.env))
        self._monitor.startService()
        self._progress.start(self._progress_interval, now=False)

    def stopService(self) -> Deferred[None]:
        """Stop every worker: SIGTERM to each process group, SIGKILL after the grace period."""
        super().stopService()
        self._stopping = True
        if not self._launched:
            return succeed(None)  # nothing was spawned (the router's port was never bound)
        if self._progress.running:
            self._progress.stop()
        for m in self._workers.values():
            self._cancel_timers(m)
            if m.inflight is not None:
                m.inflight.cancel()
        running = sum(1 for m in self._workers.values() if m.phase in ("starting", "registering", "ready"))
        self.log.info(
            "launcher: stopping {count} worker(s): SIGTERM to each process group, SIGKILL after {grace:g} s",
            count=running,
            grace=self._config.shutdown_grace,
        )
        d = self._monitor.stop_all()
        d.addCallback(self._all_stopped)
        return d

    def _all_stopped(self, _: None) -> None:
        self.log.info("launcher: all workers stopped")

    # -- process events (from the monitor) -----------------------------------------

    def process_started(self, name: str, pid: int, url: str | None = None) -> None:
        m = self._workers[name]
        if url is not None and url != m.url:
            self._moved(m, url)
        m.starts += 1
        m.pid = pid
        m.phase = "starting"
        m.started_at = self._clock.seconds()
        m.stopped_by_us = False
        m.failed_loading = False
        m.tail.clear()
        self.log.info(
            "[worker {index}] started{again}, pid {pid}; waiting for {url}/health",
            index=m.index,
            again="" if m.starts == 1 else f" again (start {m.starts})",
            pid=pid,
            url=m.url,
        )
        attempt = m.starts
        m.poll = self._clock.callLater(self._poll_interval, self._poll, m, attempt)
        m.deadline = self._clock.callLater(self._config.wait_timeout, self._missed_deadline, m, attempt)

    def process_output(self, name: str, stream: str, line: str) -> None:
        m = self._workers[name]
        m.tail.append(line)
        # One timestamp per line: the router's log adds its own.
        self.log.info("[worker {index}] {line}", index=m.index, line=strip_timestamp(line), stream=stream)
        if (
            m.failed_loading
            and not m.port_in_use
            and not self._stopping
            and m.spec.placement is None  # a Ray worker picks fresh ports on its next start
            and _ADDRESS_IN_USE.search(line)
        ):
            # Its last words arrived after the exit was reported; the restart
            # is scheduled only once its pipes are closed, so this is in time.
            self._port_in_use(m, line)

    def process_exited(self, name: str, reason: Failure) -> None:
        m = self._workers[name]
        self._cancel_timers(m)
        if m.inflight is not None and m.phase == "starting":
            m.inflight.cancel()  # a health probe of a dead process; registering is left to finish
        uptime = self._clock.seconds() - m.started_at if m.starts else 0.0
        was_loading = m.phase == "starting"
        m.phase = "exited"
        m.pid = None
        why = describe_exit(reason)
        if self._stopping:
            self.log.info("[worker {index}] stopped: {why}", index=m.index, why=why)
            return
        if m.registered:
            self._lost(m, f"launcher: worker process {why}")
        m.failed_loading = was_loading and not m.stopped_by_us
        in_use = self._address_in_use(m) if m.failed_loading and m.spec.placement is None else None
        if m.stopped_by_us:
            self.log.info("[worker {index}] stopped: {why}", index=m.index, why=why)
        elif in_use is not None:
            self._port_in_use(m, in_use, why=why)  # checks the start-up too
            return
        else:
            if not m.ever_ready:
                m.startup_exits += 1
            self.log.error(
                "[worker {index}] {url} {why} after {uptime:.0f} s{restart}; {report}",
                index=m.index,
                url=m.url,
                why=why,
                uptime=uptime,
                restart="" if self._config.restart.enabled else " (not restarted: restart is off)",
                report=self._report(m),
            )
        self._check_startup()

    def process_restart_scheduled(self, name: str, delay: float) -> None:
        if self._outcome == "failed":
            return  # the router is about to exit; the restart will be cancelled
        m = self._workers[name]
        self.log.info("[worker {index}] restarting in {delay:.1f} s", index=m.index, delay=delay)

    # -- readiness --------------------------------------------------------------------

    def _poll(self, m: _Managed, attempt: int) -> None:
        m.poll = None
        if m.starts != attempt or m.phase != "starting" or self._stopping:
            return
        d = probe_health(self._http, self._clock, m.url, self._probe_timeout)
        m.inflight = d
        d.addCallbacks(
            self._health_answered, self._health_failed, callbackArgs=(m, attempt), errbackArgs=(m, attempt)
        )

    def _health_answered(self, code: int, m: _Managed, attempt: int) -> None:
        m.inflight = None
        if m.starts != attempt or m.phase != "starting" or self._stopping:
            return
        if code == 200:
            pid = m.pid
            if pid is None or self._monitor.running_pid(m.spec.name) != pid:
                # Whatever answered, it is not the process we started for
                # this port (that one has exited): never register it.
                self.log.warn(
                    "[worker {index}] {url}/health answered, but its process is not running; not registering it",
                    index=m.index,
                    url=m.url,
                )
                return
            self._monitor.mark_ready(m.spec.name, pid)
            self._register(m, attempt)
        else:
            self.log.debug("[worker {index}] /health answered {code}", index=m.index, code=code)
            self._poll_again(m, attempt)

    def _health_failed(self, failure: Failure, m: _Managed, attempt: int) -> None:
        m.inflight = None
        if m.starts != attempt or m.phase != "starting" or self._stopping:
            return
        self.log.debug(
            "[worker {index}] not up yet: {reason}", index=m.index, reason=describe_failure(failure)
        )
        self._poll_again(m, attempt)

    def _poll_again(self, m: _Managed, attempt: int) -> None:
        m.poll = self._clock.callLater(self._poll_interval, self._poll, m, attempt)

    def _register(self, m: _Managed, attempt: int) -> None:
        m.phase = "registering"
        d: Deferred[object] = Deferred.fromCoroutine(self._hooks.worker_ready(m.url))
        m.inflight = d
        d.addCallbacks(
            self._registered, self._register_failed, callbackArgs=(m, attempt), errbackArgs=(m, attempt)
        )

    def _registered(self, _: object, m: _Managed, attempt: int) -> None:
        m.inflight = None
        m.registered = True
        if m.starts != attempt or m.phase != "registering" or self._stopping:
            # It died (or was stopped) while the router was admitting it:
            # take it straight back out.
            if not self._stopping:
                self._lost(m, "launcher: worker process exited while it was being registered")
            return
        m.phase = "ready"
        self._cancel_timers(m)
        now = self._clock.seconds()
        self.log.info(
            "[worker {index}] ready at {url} after {seconds:.0f} s{again}",
            index=m.index,
            url=m.url,
            seconds=now - m.started_at,
            again=" (re-registered after a restart)" if m.ever_ready else "",
        )
        m.ever_ready = True
        self.log.info(
            "{ready}/{total} workers ready ({elapsed:.0f} s)",
            ready=self.ready_count(),
            total=len(self._workers),
            elapsed=now - self._began,
        )
        self._check_startup()

    def _register_failed(self, failure: Failure, m: _Managed, attempt: int) -> None:
        m.inflight = None
        if self._stopping or failure.check(CancelledError):
            return
        self.log.failure("[worker {index}] registering {url} failed", failure, index=m.index, url=m.url)
        if m.starts == attempt and m.phase == "registering":
            m.phase = "starting"
            self._poll_again(m, attempt)

    def _missed_deadline(self, m: _Managed, attempt: int) -> None:
        m.deadline = None
        if m.starts != attempt or m.phase not in ("starting", "registering") or self._stopping:
            return
        m.missed_deadline = m.missed_deadline or not m.ever_ready
        m.stopped_by_us = True
        self.log.error(
            "[worker {index}] {url} was not ready within wait_timeout ({timeout:g} s); stopping it{restart}; {report}",
            index=m.index,
            url=m.url,
            timeout=self._config.wait_timeout,
            restart=" to start it again" if self._config.restart.enabled else "",
            report=self._report(m),
        )
        if m.poll is not None and m.poll.active():
            m.poll.cancel()
        m.poll = None
        self._monitor.stopProcess(m.spec.name)
        self._check_startup()

    # -- helpers -----------------------------------------------------------------------

    def _lost(self, m: _Managed, reason: str) -> None:
        try:
            self._hooks.worker_lost(m.url, reason)
        except Exception:
            self.log.failure("[worker {index}] taking {url} out of rotation failed", index=m.index, url=m.url)

    def _cancel_timers(self, m: _Managed) -> None:
        for call in (m.poll, m.deadline):
            if call is not None and call.active():
                call.cancel()
        m.poll = m.deadline = None

    def _address_in_use(self, m: _Managed) -> str | None:
        """The output line saying the worker could not bind a port, if it said so."""
        for line in reversed(m.tail):
            if _ADDRESS_IN_USE.search(line):
                return line
        return None

    def _port_in_use(self, m: _Managed, line: str, why: str | None = None) -> None:
        """
        A worker exited before it was ready because a port it needs is taken:
        a start-up failure. Restarting cannot help, and while a new start
        loaded, its readiness probe would reach whatever holds the port.
        """
        m.port_in_use = True
        self._monitor.do_not_restart(m.spec.name)
        text = line.strip()
        self.log.error(
            "[worker {index}] {url} could not start{why}: a port it needs is already in use "
            "({line}); not restarting it: free {ports}, or move {keys}; {report}",
            index=m.index,
            url=m.url,
            why=f" ({why})" if why else "",
            line=text if len(text) <= 200 else text[:197] + "...",
            ports=self._ports_of(m),
            keys=(
                "launcher.worker_base_port, master_port_base or scheduler_port_base"
                if self._config.backend == "local"
                else "launcher.worker_base_port"
            ),
            report=self._report(m),
        )
        self._check_startup()

    def _moved(self, m: _Managed, url: str) -> None:
        """A Ray worker reported where it listens (its node's address and the port it picked there)."""
        port = urlsplit(url).port or 0
        self._by_url.pop(_url_key(m.url), None)
        m.spec = replace(m.spec, url=url, host=urlsplit(url).hostname or "", port=port)
        self._by_url[_url_key(url)] = m

    def _ports_of(self, m: _Managed) -> str:
        port = m.spec.port
        ports = [str(port), str(port + 1)]
        if self._config.backend == "local":
            offset = m.index * self._config.internal_port_stride
            ports += [str(self._config.master_port_base + offset), str(self._config.scheduler_port_base + offset)]
        return "port " + ", ".join(ports[:-1]) + " and " + ports[-1]

    def _report(self, m: _Managed) -> str:
        if not m.tail:
            return "it printed nothing"
        lines = "\n".join(f"    {line}" for line in m.tail)
        return f"its last {len(m.tail)} line(s) of output:\n{lines}"

    def _gave_up(self, m: _Managed) -> bool:
        if m.ever_ready:
            return False
        limit = STARTUP_EXIT_LIMIT if self._config.restart.enabled else 1
        return m.missed_deadline or m.port_in_use or m.startup_exits >= limit

    def _check_startup(self) -> None:
        """Decide the start-up once the first worker is ready, or once every worker has given up."""
        if self._stopping:
            return
        workers = self._workers.values()
        settled = all(m.ever_ready or self._gave_up(m) for m in workers)
        if settled and self._progress.running:
            self._progress.stop()
        if self._outcome is not None:
            return
        if any(m.ever_ready for m in workers):
            self._outcome = "ready"
        elif settled:
            limit = STARTUP_EXIT_LIMIT if self._config.restart.enabled else 1
            self._fail(
                f"no worker became ready ({len(self._workers)} launched; each exited "
                f"{limit} time(s) or missed wait_timeout of {self._config.wait_timeout:g} s); "
                "see the [worker N] lines above"
            )

    def fleet_failed(self, message: str) -> None:
        """
        The supervisor cannot run the fleet at all (for Ray: no cluster at
        C{ray_address}, or no room for the placement group): fail the start-up
        like a fleet whose every worker failed, unless a worker was ready.
        """
        if self._stopping or self._outcome is not None:
            self.log.error("{message}", message=message)
            return
        self._fail(message)

    def _fail(self, message: str) -> None:
        self._outcome = "failed"
        if self._progress.running:
            self._progress.stop()
        self.log.critical("launcher: {message}", message=message.removeprefix("launcher: "))
        self._failure = Failure(LaunchFailed(message))
        waiters, self._failure_waiters = self._failure_waiters, []
        for d in waiters:
            d.errback(self._failure)
        if self._on_failure is not None:
            self._on_failure(self._failure)

    def _log_progress(self) -> None:
        """While workers are still loading, say so now and then: a model load takes minutes."""
        waiting = [f"worker {m.index}" for m in self._workers.values() if m.phase != "ready"]
        self.log.info(
            "{ready}/{total} workers ready ({elapsed:.0f} s); waiting for {waiting}",
            ready=self.ready_count(),
            total=len(self._workers),
            elapsed=self._clock.seconds() - self._began,
            waiting=", ".join(waiting),
        )


def _url_key(url: str) -> str:
    """A worker URL as the pool spells it, so the router's and the launcher's spellings match."""
    try:
        return normalize_worker_url(url)
    except WorkerURLError:
        return url


def ray_supervisor(plan: FleetPlan, reactor: Any) -> Callable[[LauncherService], Supervisor]:
    """
    The C{ray} backend's supervisor for C{plan}: a L{RayWorkerMonitor} on the
    real cluster, with its own bounded thread pools (one pending poll per
    worker, and a few threads for starts and stops).
    """
    config = plan.config
    options = ClusterOptions(
        address=config.ray_address,
        num_workers=config.num_workers,
        num_cpus_per_worker=config.num_cpus_per_worker,
        num_gpus_per_worker=config.num_gpus_per_worker,
        strategy=config.strategy,
        temp_dir=config.ray_temp_dir,
    )

    def make(service: LauncherService) -> Supervisor:
        return RayWorkerMonitor(
            service,
            lambda: RayCluster(options),
            ThreadPools(reactor, max_threads=config.num_workers + 4),
            reactor,
            restart=config.restart,
            kill_time=config.shutdown_grace,
            wait_timeout=config.wait_timeout,
            on_fatal=service.fleet_failed,
        )

    return make


def make_launcher_service(
    plan: FleetPlan,
    hooks: FleetHooks,
    reactor: IReactorProcess,
    *,
    on_failure: Callable[[Failure], None] | None = None,
    start_after: Callable[[], Deferred[Any]] | None = None,
) -> LauncherService:
    """
    The launcher service on a real reactor, with its own HTTP client for
    readiness probes.

    The client's connections are not pooled: a probe is one request every
    half second to a worker that is still loading, and a pool would only keep
    sockets (and timers) open after the router stops.
    """
    agent, _ = make_agent(reactor, max_connections=1, persistent=False, connect_timeout=2)
    supervisor = ray_supervisor(plan, reactor) if plan.config.backend == "ray" else None
    service = LauncherService(
        plan,
        hooks,
        reactor,
        make_http_client(agent),
        on_failure=on_failure,
        start_after=start_after,
        supervisor=supervisor,
    )
    service.setName("launcher")
    return service

