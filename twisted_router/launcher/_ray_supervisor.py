# -*- test-case-name: tests.unit.test_launcher_ray -*-
"""
Supervising workers that run as Ray actors: the C{ray} backend's
counterpart of L{WorkerMonitor}, reporting to the same L{ProcessEvents}, so
the launcher service registers, re-admits and reports Ray workers with
exactly the code it uses for local ones.

Every Ray call blocks, so each runs on a thread of the monitor's own bounded
thread pool (L{ThreadPools}); the reactor only ever sees the Deferreds.
Each running worker has one C{poll} call pending on its actor at all times:
it brings the worker's output lines and its exit status, and it fails the
moment the actor, its process or its node dies, so the router takes the
worker out of rotation at once, not after a round of failed health checks.
A worker that ended is replaced by a new actor in the same placement-group
bundle, after the same backoff as a local worker (L{restart_delay}).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from threading import Thread
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall, IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from twisted_router.launcher._config import RestartPolicy
from twisted_router.launcher._ray_actor import Polled, Started
from twisted_router.launcher._ray_client import RayFacade
from twisted_router.launcher._supervisor import ProcessEvents, restart_delay
from twisted_router.upstream import describe_failure

__all__ = ["STOP_PATIENCE", "Offload", "RayWorkerGone", "RayWorkerMonitor", "ThreadPools"]

#: How long past C{shutdown_grace} stopping waits for Ray calls in flight
#: before it gives up on them (a connection attempt to an address nothing
#: answers at, or a node that no longer answers).
STOP_PATIENCE = 10.0

_T = TypeVar("_T")


class Offload(Protocol):
    """Runs blocking calls off the reactor thread."""

    def start(self) -> None:
        """Start the threads."""

    def call(self, f: Callable[..., _T], *args: Any) -> Deferred[_T]:
        """C{f(*args)} on a worker thread."""

    def call_owner(self, f: Callable[..., _T], *args: Any) -> Deferred[_T]:
        """C{f(*args)} on the one long-lived thread that owns the cluster connection."""

    def stop(self) -> None:
        """Stop the threads (after every call has returned)."""

    def abandon(self) -> None:
        """Leave threads still blocked in a call behind; they must not hold up the process's exit."""


class ThreadPools:
    """
    L{Offload} on two Twisted thread pools: one thread that connects and
    disconnects (Ray ties the processes of a private cluster to the thread
    that started them: they die with it, so it must live as long as the
    cluster), and a bounded pool for the other calls (one pending poll per
    worker, plus a few for starts and stops).
    """

    def __init__(self, reactor: IReactorFromThreads, max_threads: int) -> None:
        self._reactor = reactor
        self._owner = _DaemonThreadPool(minthreads=1, maxthreads=1, name="ray-owner")
        self._calls = _DaemonThreadPool(minthreads=0, maxthreads=max_threads, name="ray-calls")

    def start(self) -> None:
        self._owner.start()
        self._calls.start()

    def call(self, f: Callable[..., _T], *args: Any) -> Deferred[_T]:
        return deferToThreadPool(self._reactor, self._calls, f, *args)

    def call_owner(self, f: Callable[..., _T], *args: Any) -> Deferred[_T]:
        return deferToThreadPool(self._reactor, self._owner, f, *args)

    def stop(self) -> None:
        self._calls.stop()
        self._owner.stop()

    def abandon(self) -> None:
        # Joining would wait for the blocked call; daemon threads end with the process.
        pass


def _daemon_thread(*args: Any, **kwargs: Any) -> Thread:
    return Thread(*args, daemon=True, **kwargs)


class _DaemonThreadPool(ThreadPool):
    """
    A thread pool of daemon threads: a Ray call that never returns (a
    cluster address nothing answers at makes C{ray.init} retry for ever)
    must not keep the stopped router's process alive.
    """

    threadFactory = staticmethod(_daemon_thread)  # type: ignore[assignment]


class RayWorkerGone(Exception):
    """A Ray worker ended without an exit status of its own: its actor died, or it could not be started."""

    def __init__(self, description: str) -> None:
        super().__init__(description)
        #: How L{describe_exit} words it (C{worker process {description}}).
        self.exit_description = description


@dataclass
class _Slot:
    """One worker's bundle and what runs in it now."""

    name: str
    index: int
    argv: tuple[str, ...]
    env: Mapping[str, str]
    supervised: bool = True
    #: idle (nothing runs: before the first start, or waiting to restart),
    #: spawning (an actor is being started), running, stopping, exited.
    phase: str = "idle"
    actor: Any = None
    pid: int | None = None
    port: int | None = None
    generation: int = 0
    started_at: float = 0.0
    ready: bool = False
    delay: float | None = None
    restart: IDelayedCall | None = None


class RayWorkerMonitor:
    """
    Runs each worker as a Ray actor in its placement-group bundle (see the
    module docstring); the launcher service drives it like a
    L{WorkerMonitor} (C{addProcess}, C{startService}, C{stopProcess},
    C{running_pid}, C{mark_ready}, C{do_not_restart}, C{stop_all}).

    @param on_fatal: called with one line when the fleet cannot run at all
        (no cluster at C{ray_address}, or the placement group cannot be
        placed within C{wait_timeout}).
    @param poll_timeout: how long one pending C{poll} waits in the actor
        when nothing happens (it returns at once when there is news).
    """

    log = Logger()

    def __init__(
        self,
        events: ProcessEvents,
        cluster: Callable[[], RayFacade],
        offload: Offload,
        clock: IReactorTime,
        *,
        restart: RestartPolicy,
        kill_time: float,
        wait_timeout: float,
        on_fatal: Callable[[str], None],
        poll_timeout: float = 1.0,
    ) -> None:
        self._events = events
        self._make_cluster = cluster
        self._cluster: RayFacade | None = None
        self._connected_to_cluster = False
        self._offload = offload
        self._clock = clock
        self._policy = restart
        self._kill_time = kill_time
        self._wait_timeout = wait_timeout
        self._on_fatal = on_fatal
        self._poll_timeout = poll_timeout
        self._slots: dict[str, _Slot] = {}
        self._inflight: set[Deferred[Any]] = set()
        self.running = False
        self._stopping: Deferred[None] | None = None

    # -- the launcher service's side ---------------------------------------------------

    def addProcess(self, name: str, args: Sequence[str], *, env: dict[str, str] | None = None) -> None:
        """Plan worker C{name}: C{args} with the node's placeholders (see L{WorkerHost.start})."""
        if name in self._slots:
            raise KeyError(f"remove {name} first")
        self._slots[name] = _Slot(name=name, index=len(self._slots), argv=tuple(args), env=dict(env or {}))

    def startService(self) -> None:
        """Connect to the cluster, reserve one bundle per worker, then start every worker."""
        self.running = True
        self._offload.start()
        d = self._track(self._offload.call_owner(self._connect))
        d.addCallback(self._connected)
        d.addCallbacks(self._reserved, self._cannot_run)

    def running_pid(self, name: str) -> int | None:
        """The pid (on its node) of C{name}'s worker while it runs, else C{None}."""
        slot = self._slots.get(name)
        if slot is not None and slot.phase in ("running", "stopping"):
            return slot.pid
        return None

    def mark_ready(self, name: str, pid: int) -> None:
        """Worker C{name} (process C{pid}) answered its health check: its death may restart it at once."""
        slot = self._slots.get(name)
        if slot is not None and slot.pid == pid and slot.phase == "running":
            slot.ready = True

    def do_not_restart(self, name: str) -> None:
        """Stop supervising C{name}: it is not started again when it ends."""
        slot = self._slots.get(name)
        if slot is not None:
            slot.supervised = False
            self._cancel_restart(slot)

    def stopProcess(self, name: str) -> None:
        """Stop C{name}'s worker (SIGTERM to its process group on its node, SIGKILL after C{kill_time})."""
        slot = self._slots[name]
        if slot.phase != "running":
            return
        slot.phase = "stopping"
        actor = slot.actor
        d = self._track(self._offload.call(self._require().stop, actor, self._kill_time))
        d.addErrback(self._ignore, "stopping", slot)  # the pending poll reports how it ended

    def stop_all(self) -> Deferred[None]:
        """
        No more restarts; stop every worker, kill every actor, remove the
        placement group (and stop a private cluster), then the threads.

        @return: fires when all that is done.
        """
        if self._stopping is not None:
            return self._stopping
        self.running = False
        for slot in self._slots.values():
            self._cancel_restart(slot)
        if self._cluster is not None:
            self._cluster.interrupt()  # a placement or a start still waiting gives up within a second
        self._stopping = Deferred.fromCoroutine(self._stop_all())
        return self._stopping

    # -- starting ------------------------------------------------------------------------

    def _require(self) -> RayFacade:
        assert self._cluster is not None, "not connected"
        return self._cluster

    def _connect(self) -> str:
        # Runs on the owner thread: creating the facade may import ray.
        self._cluster = self._make_cluster()
        return self._cluster.connect()

    def _connected(self, described: str) -> Deferred[None] | None:
        self._connected_to_cluster = True
        self.log.info("launcher: connected to the Ray cluster: {cluster}", cluster=described)
        if not self.running:
            return None  # stopped while connecting: reserve nothing
        return self._track(self._offload.call(self._reserve))

    def _reserve(self) -> None:
        self._require().reserve(self._wait_timeout)

    def _reserved(self, _: object) -> None:
        if not self.running:
            return
        self.log.info(
            "launcher: placement group of {count} bundle(s) ready", count=len(self._slots)
        )
        for slot in self._slots.values():
            self._start(slot)

    def _cannot_run(self, failure: Failure) -> None:
        if not self.running:
            return
        stage = "reserving the placement group" if self._connected_to_cluster else "connecting to the Ray cluster"
        self._on_fatal(f"launcher: {stage} failed: {describe_failure(failure)}")

    def _start(self, slot: _Slot) -> None:
        slot.restart = None
        if not self.running or not slot.supervised:
            return
        slot.generation += 1
        slot.phase = "spawning"
        slot.ready = False
        slot.started_at = self._clock.seconds()
        generation = slot.generation
        d = self._track(
            self._offload.call(
                self._require().start, slot.index, slot.argv, slot.env, slot.port, self._wait_timeout
            )
        )
        d.addCallbacks(self._started, self._start_failed, callbackArgs=(slot, generation),
                       errbackArgs=(slot, generation))

    def _started(self, result: tuple[Any, Started], slot: _Slot, generation: int) -> None:
        actor, started = result
        if not self.running or slot.generation != generation or not slot.supervised:
            self._kill(actor, slot)  # stopped while it was starting
            slot.phase = "exited"
            return
        slot.actor = actor
        slot.pid = started.pid
        slot.port = started.port
        slot.phase = "running"
        slot.started_at = self._clock.seconds()
        self._events.process_started(slot.name, started.pid, url=started.url)
        self._poll(slot, generation)

    def _start_failed(self, failure: Failure, slot: _Slot, generation: int) -> None:
        if slot.generation != generation:
            return
        reason = Failure(RayWorkerGone(f"could not be started on Ray: {_first_line(failure)}"))
        self._ended(slot, reason, actor=None)

    # -- watching ------------------------------------------------------------------------

    def _poll(self, slot: _Slot, generation: int) -> None:
        d = self._track(self._offload.call(self._require().poll, slot.actor, self._poll_timeout))
        d.addCallbacks(self._polled, self._poll_failed, callbackArgs=(slot, generation),
                       errbackArgs=(slot, generation))

    def _polled(self, polled: Polled, slot: _Slot, generation: int) -> None:
        if slot.generation != generation or slot.phase not in ("running", "stopping"):
            return
        if polled.dropped:
            self._events.process_output(slot.name, "stderr", f"({polled.dropped} line(s) of output dropped)")
        for stream, line in polled.lines:
            self._events.process_output(slot.name, stream, line)
        code = polled.returncode
        if code is None:
            self._poll(slot, generation)
            return
        reason: Failure
        if code == 0:
            reason = Failure(ProcessDone(0))
        elif code < 0:
            reason = Failure(ProcessTerminated(exitCode=None, signal=-code))
        else:
            reason = Failure(ProcessTerminated(exitCode=code))
        self._ended(slot, reason, actor=slot.actor)

    def _poll_failed(self, failure: Failure, slot: _Slot, generation: int) -> None:
        if slot.generation != generation or slot.phase not in ("running", "stopping"):
            return
        reason = Failure(RayWorkerGone(f"was lost with its Ray actor ({_first_line(failure)})"))
        self._ended(slot, reason, actor=slot.actor)

    def _ended(self, slot: _Slot, reason: Failure, actor: Any) -> None:
        """The worker in C{slot} is gone: report it, kill its actor, and restart it after the backoff."""
        slot.phase = "exited"
        slot.actor = None
        slot.pid = None
        if actor is not None:
            self._kill(actor, slot)
        self._events.process_exited(slot.name, reason)
        if not self._policy.enabled:
            slot.supervised = False
        ran = self._clock.seconds() - slot.started_at
        delay, slot.delay = restart_delay(slot.delay, became_ready=slot.ready, ran=ran, policy=self._policy)
        slot.ready = False
        if self.running and slot.supervised:
            slot.phase = "idle"
            slot.restart = self._clock.callLater(delay, self._start, slot)
            self._events.process_restart_scheduled(slot.name, delay)

    # -- stopping ------------------------------------------------------------------------

    def _kill(self, actor: Any, slot: _Slot) -> None:
        d = self._track(self._offload.call(self._require().kill, actor))
        d.addErrback(self._ignore, "killing the actor of", slot)

    async def _stop_all(self) -> None:
        for slot in self._slots.values():
            if slot.phase == "running":
                self.stopProcess(slot.name)
        # Each pending poll now reports its worker's exit (and its actor is
        # killed), or fails because the actor is gone; starts in flight find
        # the monitor stopped and kill what they started.
        settled = await self._settle(self._clock.seconds() + self._kill_time + STOP_PATIENCE)
        if self._cluster is not None and self._connected_to_cluster:
            try:
                await self._offload.call_owner(self._cluster.close)
            except Exception:  # noqa: BLE001 - logged; the threads still stop
                self.log.failure("launcher: removing the placement group or disconnecting from Ray failed")
        if settled:
            self._offload.stop()
            self.log.info("launcher: Ray actors and placement group removed")
        else:
            self._offload.abandon()

    async def _settle(self, deadline: float) -> bool:
        """Wait for the Ray calls in flight until C{deadline}; whether they all returned."""
        while self._inflight:
            count = len(self._inflight)
            calls = DeferredList(list(self._inflight), consumeErrors=True)
            # Cancelling gives up on them: their threads may return later, to nobody.
            timer = self._clock.callLater(max(0.0, deadline - self._clock.seconds()), calls.cancel)
            await calls
            if not timer.active():
                self.log.warn(
                    "launcher: {count} Ray call(s) still blocked {patience:g} s after the stop "
                    "(is the cluster reachable?); not waiting for them",
                    count=count,
                    patience=self._kill_time + STOP_PATIENCE,
                )
                return False
            timer.cancel()
        return True

    def _ignore(self, failure: Failure, doing: str, slot: _Slot) -> None:
        self.log.debug(
            "[{name}] {doing} it failed: {reason}", name=slot.name, doing=doing, reason=describe_failure(failure)
        )

    # -- helpers -------------------------------------------------------------------------

    def _track(self, d: Deferred[_T]) -> Deferred[_T]:
        """Remember C{d} until it fires, so stopping can wait for every call in flight."""
        self._inflight.add(d)

        def done(result: object) -> object:
            self._inflight.discard(d)
            return result

        d.addBoth(done)
        return d

    def _cancel_restart(self, slot: _Slot) -> None:
        if slot.restart is not None and slot.restart.active():
            slot.restart.cancel()
        slot.restart = None



def _first_line(failure: Failure) -> str:
    """C{ActorDiedError: The actor died unexpectedly ...}: Ray's messages go on for lines (ids, addresses)."""
    lines = str(failure.value).strip().splitlines()
    first = lines[0].strip() if lines else ""
    name = type(failure.value).__name__
    return f"{name}: {first}" if first else name
